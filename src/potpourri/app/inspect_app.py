"""``potpourri serve --run RUN`` for an ``inspect fit`` run: an inspection web app and a JSON endpoint.

The page (Gradio): upload images (or a folder), see per image the verdict, score, normalised score, heat map and
predicted mask, download the CSV. The endpoint ``POST /api/inspect`` takes the raw bytes of one image and answers
JSON: score, normalised score, verdict, threshold and the anomaly map (a PNG, base64, at the model's input size,
scaled between the run's calibration minimum and maximum). Both refuse non-images, corrupt files and images above
``max_megapixels`` (checked from the header, before decoding) with a clear message; the server keeps serving.
One lock serialises the model, so concurrent clients get the same answers as ``inspect predict``.

Example:
    potpourri serve --run runs/inspect/v0 --port 7860      # then open http://127.0.0.1:7860
"""

from __future__ import annotations

import base64
import csv
import io
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # gradio's web stack; the annotation below must resolve at module level
from fastapi.responses import JSONResponse
from PIL import Image

from potpourri.core.errors import PotpourriError

__all__ = ["InspectionService", "UploadError", "build_inspection_app", "serve_inspection"]

TITLE = "potpourri inspection"


class UploadError(PotpourriError):
    """An upload the service refuses (not an image, corrupt, too large); the message is shown to the user."""


@dataclass
class Verdict:
    """What the service says about one image."""

    name: str
    score: float
    normalised: float | None
    label: bool | None
    anomaly_map: np.ndarray  # (S, S) float32 at the model's input size
    mask: np.ndarray | None  # (S, S) bool
    image: np.ndarray  # (H, W, 3) uint8 as uploaded

    @property
    def verdict(self) -> str:
        return "uncalibrated" if self.label is None else ("defect" if self.label else "good")

    def row(self) -> dict[str, Any]:
        return {"image": self.name, "verdict": self.verdict, "score": round(self.score, 6),
                "normalised": None if self.normalised is None else round(self.normalised, 4),
                "defect_fraction": None if self.mask is None else round(float(self.mask.mean()), 4)}  # fmt: skip


class InspectionService:
    """A loaded inspection run behind a lock: ``inspect(bytes)`` -> ``Verdict``, or ``UploadError``."""

    def __init__(self, run_dir: str | Path, *, max_megapixels: float = 50.0, device: str = "cpu",
                 precision: str = "fp32") -> None:  # fmt: skip
        from potpourri.inspect.base import load_method

        self.run_dir = Path(run_dir)
        self.method = load_method(run_dir).to(device, precision)
        self.max_megapixels = max_megapixels
        self.lock = threading.Lock()

    def decode(self, data: bytes, name: str = "upload") -> np.ndarray:
        """Check the header (an image, not above the pixel limit), then decode; one ``UploadError`` otherwise."""
        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                width, height = img.size
                megapixels = width * height / 1e6
                if megapixels > self.max_megapixels:
                    raise UploadError(
                        f"{name}: {width}x{height} is {megapixels:.1f} megapixels, above the limit of "
                        f"{self.max_megapixels:g} (serve --max-megapixels)"
                    )
                return np.asarray(img.convert("RGB"))
        except UploadError:
            raise
        except Image.DecompressionBombError:
            raise UploadError(f"{name}: too many pixels to decode safely") from None
        except Exception as exc:  # PIL raises several kinds for non-images and truncated files
            raise UploadError(f"{name}: not a readable image ({type(exc).__name__})") from None

    def inspect(self, data: bytes, name: str = "upload") -> Verdict:
        """Score one uploaded image with the run (serialised: one image at a time through the model)."""
        image = self.decode(data, name)
        with self.lock:
            result = self.method.predict([image])[0]
        return Verdict(name, result.score, result.normalised, result.label, result.anomaly_map, result.mask, image)

    def map_png(self, verdict: Verdict) -> str:
        """The anomaly map as a base64 8-bit PNG, scaled between the calibration minimum and maximum score."""
        t = self.method.thresholds
        low = t.image_min if t.image_min is not None else float(verdict.anomaly_map.min())
        high = t.image_max if t.image_max is not None else float(verdict.anomaly_map.max())
        scaled = np.clip((verdict.anomaly_map - low) / max(high - low, 1e-12), 0, 1)
        buffer = io.BytesIO()
        Image.fromarray((scaled * 255).astype(np.uint8)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    def as_json(self, verdict: Verdict) -> dict[str, Any]:
        t = self.method.thresholds
        return {**verdict.row(), "label": verdict.label, "threshold": t.image, "map_png": self.map_png(verdict),
                "map_size": list(verdict.anomaly_map.shape), "map_scale": [t.image_min, t.image_max]}  # fmt: skip

    def overlay(self, verdict: Verdict) -> np.ndarray:
        """The heat map (and the predicted mask's outline colour) over the image at its own size."""
        from potpourri.report.inspect_plots import heatmap_overlay

        h, w = verdict.image.shape[:2]
        full = np.asarray(Image.fromarray(verdict.anomaly_map).resize((w, h), Image.Resampling.BILINEAR))
        t = self.method.thresholds
        low = t.image_min if t.image_min is not None else float(full.min())
        high = t.image_max if t.image_max is not None else float(full.max())
        out = heatmap_overlay(verdict.image, full, vmin=low, vmax=high)
        if verdict.mask is not None:
            mask = np.asarray(Image.fromarray(verdict.mask.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST))
            edge = mask.astype(bool) & ~np.pad(mask, 1, mode="edge")[2:, 1:-1].astype(bool)
            out[edge] = (255, 255, 255)
        return out


def answer_files(service: InspectionService, requests: Any, files: list | None, text: str) -> tuple:
    """A plain-language request over the uploaded files (the first one is "this part"): (the call, its answer, the
    first image with the mask the call draws or None). Unreadable uploads are named in a ``PotpourriError``."""
    from potpourri.app.assistant import draw_answer

    images = {}
    for file in files or []:
        path = Path(file if isinstance(file, str) else file.name)
        images[path.name] = service.decode(path.read_bytes(), path.name)
    if not images:
        raise PotpourriError("no images; upload some, then ask")
    current = next(iter(images))
    with service.lock:
        result = requests.answer(text, images, current)
    drawn = draw_answer(images[current], [], result.mask) if result.mask is not None else None
    return result.call.text(), result.text, drawn


def build_inspection_page(service: InspectionService, requests: Any = None) -> Any:
    """The Gradio ``Blocks`` page: upload, verdicts, heat maps, CSV; with ``requests`` (a ``RequestRunner`` over the
    same method) a plain-language request field over the uploads."""
    from potpourri.app.serve import require_gradio

    gr = require_gradio()

    def run_files(files: list | None) -> tuple:
        rows, gallery, messages = [], [], []
        for file in files or []:
            path = Path(file if isinstance(file, str) else file.name)
            try:
                verdict = service.inspect(path.read_bytes(), path.name)
            except UploadError as exc:
                messages.append(f"- {exc}")
                continue
            rows.append(verdict.row())
            caption = f"{path.name}: {verdict.verdict}, score {verdict.score:.4g}"
            gallery.append((service.overlay(verdict), caption))
        csv_path = None
        if rows:
            csv_path = Path(tempfile.mkdtemp()) / "predictions.csv"
            with open(csv_path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        table = [[r[k] for k in ("image", "verdict", "score", "normalised", "defect_fraction")] for r in rows]
        note = "\n".join(messages) if messages else f"{len(rows)} image(s) inspected."
        return table, gallery, None if csv_path is None else str(csv_path), note

    t = service.method.thresholds
    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}\nrun `{service.run_dir}`: {service.method.name}, image threshold {t.image} "
                    f"({t.source}); uploads up to {service.max_megapixels:g} megapixels")  # fmt: skip
        files = gr.File(label="images (or a folder)", file_count="multiple", elem_id="upload", type="filepath")
        go = gr.Button("Inspect", elem_id="inspect", variant="primary")
        note = gr.Markdown(elem_id="messages")
        table = gr.Dataframe(headers=["image", "verdict", "score", "normalised", "defect_fraction"],
                             elem_id="results", interactive=False)  # fmt: skip
        gallery = gr.Gallery(label="heat maps (white: predicted mask outline)", elem_id="maps", format="png")
        download = gr.File(label="predictions.csv", elem_id="csv", interactive=False)
        go.click(run_files, inputs=[files], outputs=[table, gallery, download, note])
        if requests is not None:

            def run_request(uploaded: list | None, text: str) -> tuple:
                try:
                    return answer_files(service, requests, uploaded, text)
                except PotpourriError as exc:
                    raise gr.Error(str(exc)) from None

            with gr.Row():
                request = gr.Textbox(label="request (plain language; anomalies of any kind, first file is this part)",
                                     elem_id="request", placeholder="how many defects are in this part?")  # fmt: skip
                ask = gr.Button("Run request", elem_id="run-request")
            call = gr.Textbox(label="call", elem_id="call", interactive=False)
            reply = gr.Textbox(label="request answer", elem_id="request-answer", interactive=False)
            masked = gr.Image(type="numpy", label="request mask", elem_id="request-mask", interactive=False)
            ask.click(run_request, inputs=[files, request], outputs=[call, reply, masked])
            request.submit(run_request, inputs=[files, request], outputs=[call, reply, masked])
    return page


def build_inspection_app(service: InspectionService, requests: Any = None) -> Any:
    """The FastAPI app: ``build_inspection_page`` at ``/`` and ``POST /api/inspect`` (raw image bytes in, JSON out)."""
    from fastapi import FastAPI

    from potpourri.app.serve import require_gradio

    gr = require_gradio()
    api = FastAPI(title=TITLE)

    @api.post("/api/inspect")
    async def inspect_endpoint(request: Request) -> JSONResponse:
        data = await request.body()
        try:
            verdict = await _in_thread(service.inspect, data, request.query_params.get("name", "upload"))
        except UploadError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        return JSONResponse(service.as_json(verdict))

    return gr.mount_gradio_app(api, build_inspection_page(service, requests), path="/")


async def _in_thread(function: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(function, *args)


def serve_inspection(service: InspectionService, *, host: str, port: int, requests: Any = None) -> None:
    """Serve the app with uvicorn until interrupted (``requests``: see ``build_inspection_app``)."""
    import uvicorn

    print(f"serving {service.run_dir} on http://{host}:{port} (POST /api/inspect for JSON; Ctrl-C stops)", flush=True)
    uvicorn.run(build_inspection_app(service, requests), host=host, port=port, log_level="warning")
