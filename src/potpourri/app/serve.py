"""``potpourri serve --run RUN``: the inspection assistant as a Gradio web app (extra ``[app]``).

Upload an image, ask a question; the page shows the answer, the image with the boxes / masks the answer locates, and
with ``--inspect`` the PatchCore anomaly map or the segmenter's classes; with a segmenter run, a "request" field takes
plain language ("how many holes are in this part?"), routes it to a toolkit call (``app/requests.py``) and shows the
call, its answer and any mask it draws. Gradio is imported only here, when serving.

Example:
    potpourri serve --run runs/vlm/v0 --inspect runs/inspect/v0 --port 7860      # then open http://127.0.0.1:7860
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from potpourri.core.errors import PotpourriError

__all__ = ["answer_request", "build_app", "require_gradio"]

TITLE = "potpourri inspection assistant"


def require_gradio() -> Any:
    """Import gradio, or a one-line ``PotpourriError`` naming the extra."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no telemetry calls
    try:
        import gradio
    except ImportError:
        raise PotpourriError("the web app needs gradio: pip install 'potpourri[app]'") from None
    return gradio


def answer_request(requests: Any, image: np.ndarray | None, text: str) -> tuple[str, str, np.ndarray | None]:
    """One plain-language request on one uploaded image: (the call, its answer, the image with its mask or None)."""
    from potpourri.app.assistant import draw_answer
    from potpourri.core.imaging import as_rgb

    if image is None:
        raise PotpourriError("no image; upload one")
    pixels = np.asarray(as_rgb(image))
    result = requests.answer(text, {"upload": pixels}, "upload")
    drawn = draw_answer(pixels, [], result.mask) if result.mask is not None else None
    return result.call.text(), result.text, drawn


def build_app(assistant: Any, requests: Any = None) -> Any:
    """The Gradio ``Blocks`` page of an ``Assistant``: image + question in, answer + drawings (+ inspection) out;
    with ``requests`` (a ``RequestRunner``) also a plain-language request field."""
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
        if requests is not None:

            def run_request(picture: np.ndarray | None, text: str) -> tuple:
                try:
                    return answer_request(requests, picture, text)
                except PotpourriError as exc:
                    raise gr.Error(str(exc)) from None

            with gr.Row():
                with gr.Column():
                    request = gr.Textbox(label="request (plain language)", elem_id="request",
                                         placeholder="how many holes are in this part?")  # fmt: skip
                    go = gr.Button("Run request", elem_id="run-request")
                with gr.Column():
                    call = gr.Textbox(label="call", elem_id="call", interactive=False)
                    reply = gr.Textbox(label="request answer", elem_id="request-answer", interactive=False)
                    masked = gr.Image(type="numpy", label="request mask", elem_id="request-mask", interactive=False,
                                      **shown)  # fmt: skip
            go.click(run_request, inputs=[image, request], outputs=[call, reply, masked])
            request.submit(run_request, inputs=[image, request], outputs=[call, reply, masked])
    return app
