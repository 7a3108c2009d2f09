"""``potpourri serve --run RUN``: the inspection assistant as a Gradio web app (extra ``[app]``).

Upload an image, ask a question; the page shows the answer, the image with the boxes / masks the answer locates, and
with ``--inspect`` the PatchCore anomaly map or the segmenter's classes. Gradio is imported only here, when serving.

Example:
    potpourri serve --run runs/vlm/v0 --inspect runs/inspect/v0 --port 7860      # then open http://127.0.0.1:7860
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from potpourri.core.errors import PotpourriError

__all__ = ["build_app", "require_gradio"]

TITLE = "potpourri inspection assistant"


def require_gradio() -> Any:
    """Import gradio, or a one-line ``PotpourriError`` naming the extra."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no telemetry calls
    try:
        import gradio
    except ImportError:
        raise PotpourriError("the web app needs gradio: pip install 'potpourri[app]'") from None
    return gradio


def build_app(assistant: Any) -> Any:
    """The Gradio ``Blocks`` page of an ``Assistant``: image + question in, answer + drawings (+ inspection) out."""
    gr = require_gradio()

    def answer(image: np.ndarray | None, question: str) -> tuple:
        try:
            reply = assistant.ask(image, question)
        except PotpourriError as exc:
            raise gr.Error(str(exc)) from None
        boxes = "\n".join(f"{phrase or 'box'}: ({', '.join(f'{v:.0f}' for v in box)})" for phrase, box in reply.regions)
        extra = [reply.inspection.overlay, reply.inspection.summary] if reply.inspection else []
        return (reply.answer, boxes or "(no boxes in the answer)", reply.annotated, *extra)

    shown = {"format": "png", "height": 320}  # png: the drawn pixels reach the browser unchanged (no lossy webp)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\nVLM run `{assistant.run_dir}`; prefix a task: `[vqa]`, `[refer]`, `[grounding]`, …")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="numpy", label="image", elem_id="upload", sources=["upload"], height=320)
                question = gr.Textbox(label="question", elem_id="question", placeholder="[refer] where is the crack?")
                ask = gr.Button("Ask", elem_id="ask", variant="primary")
            with gr.Column():
                text = gr.Textbox(label="answer", elem_id="answer", interactive=False)
                boxes = gr.Textbox(label="boxes (pixels)", elem_id="boxes", interactive=False)
                drawn = gr.Image(type="numpy", label="answer drawn", elem_id="annotated", interactive=False, **shown)
        outputs = [text, boxes, drawn]
        if assistant.inspector is not None:
            with gr.Row():
                overlay = gr.Image(type="numpy", label="inspection", elem_id="inspection", interactive=False, **shown)
                verdict = gr.Textbox(label="inspection verdict", elem_id="verdict", interactive=False)
            outputs += [overlay, verdict]
        ask.click(answer, inputs=[image, question], outputs=outputs)
        question.submit(answer, inputs=[image, question], outputs=outputs)
    return app
