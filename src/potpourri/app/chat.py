"""``potpourri chat IMAGE --run RUN``: ask a trained VLM about an image in the terminal.

With ``--question`` it answers once and exits; otherwise it reads questions until end of input or ``quit``
(``:image PATH`` switches the image). With ``--inspect RUN`` (a segmenter or a PatchCore run), a line starting with
``/`` is a request in plain language, routed to a toolkit call (``app/requests.py``; ``--router keywords|smollm2``)
over every image of the session: ``/how many holes are in this part?``, ``/check for scratches and show me the worst
three``; ``/describe [KIND]`` describes the largest defect of the current image in one sentence. A PatchCore run
answers about anomalies of any kind and says so when asked about one kind. Without ``--run`` the session takes only
``/`` requests (no VLM needed).

Each answer is printed; when it contains boxes or masks (MiniGPT-v2 text,
parsed by ``potpourri.core.textgeo``) the image with them drawn is saved under ``RUN/chat/v<N>/images/`` and its path
printed. ``--inspect`` adds the verdict of a PatchCore / segmenter run and saves its overlay. Every turn is appended
to ``transcript.jsonl``.

Example:
    potpourri chat part.png --run runs/vlm/v0 --question "[refer] where is the scratch?"
    potpourri chat part.png --run runs/vlm/v0 --inspect runs/inspect/v0        # a REPL
    potpourri chat part.png --run runs/vlm/v0 --inspect runs/segmenter/v0 -q "/describe scratch"
    potpourri chat part.png --inspect runs/segmenter/v0 -q "/how many holes are in this part?"   # no VLM
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from potpourri.core.errors import PotpourriError

__all__ = ["NO_RUNNER", "ChatSession"]

_QUIT = {"quit", "exit", ":q"}
NO_RUNNER = "'/' requests need a segmenter run or a PatchCore run with a pixel threshold: pass --inspect RUN"


class ChatSession:
    """One image, one assistant, one output folder: ``turn(question)`` answers, saves drawings, logs the turn."""

    def __init__(self, assistant, image_path: str | Path, out: str | Path | None = None, requests=None,
                 root: str | Path | None = None) -> None:  # fmt: skip
        """``assistant`` None: a session of '/' requests only (``requests`` required); output under ``out`` or
        ``root``/chat/v<N> (default: the assistant's run)."""
        from potpourri.core.runs import new_run

        if assistant is None and requests is None:
            raise PotpourriError(
                "chat needs a VLM run (--run), an inspection run for '/' requests (--inspect), or both"
            )
        self.assistant = assistant
        self.requests = requests  # a RequestRunner for '/' lines, or None
        self.run = new_run("chat", out, root=root or assistant.run_dir)
        self.turns = 0
        self.images: dict[str, object] = {}  # every image of the session, by path: what '/' requests look at
        self.set_image(image_path)

    def set_image(self, image_path: str | Path) -> None:
        """Switch to another image (read now, so a bad file fails before any question)."""
        from potpourri.core.imaging import read_rgb

        self.image = read_rgb(image_path)
        self.image_path = Path(image_path)
        self.images[str(self.image_path)] = self.image

    def request(self, line: str, stream: TextIO | None = None) -> dict:
        """A '/' line: ``/describe [KIND]`` or a plain-language request; print the call and its answer, save a mask
        the call draws, append the turn to ``transcript.jsonl``."""
        from potpourri.app.assistant import draw_answer
        from potpourri.vlm.router import KINDS, Call

        stream = stream or sys.stdout
        if self.requests is None:
            raise PotpourriError(NO_RUNNER)
        text = line.removeprefix("/").strip()
        current = str(self.image_path)
        if text.split(" ")[0].lower() == "describe":
            kind = text[len("describe") :].strip().lower() or "any"
            if kind not in KINDS:
                raise PotpourriError(f"unknown kind '{kind}' for /describe; choose from {', '.join(KINDS)}")
            result = self.requests.run(Call("describe", kind), self.images, current)
        else:
            result = self.requests.answer(text, self.images, current)
        self.turns += 1
        record = {"image": current, "request": text, "call": result.call.text(), "answer": result.text}
        print(f"call: {result.call.text()}\nanswer: {result.text}", file=stream)
        if result.mask is not None and result.mask.any():
            from PIL import Image

            path = self.run.images / f"{self.turns:03d}_{self.image_path.stem}_request.png"
            Image.fromarray(draw_answer(self.image, [], result.mask)).save(path)
            record["annotated"] = str(path)
            print(f"mask drawn on {path}", file=stream)
        with open(self.run.path / "transcript.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        return record

    def turn(self, question: str, stream: TextIO | None = None) -> dict:
        """Answer one question, print the answer (and saved image paths), append it to ``transcript.jsonl``."""
        from PIL import Image

        stream = stream or sys.stdout
        if self.assistant is None:
            raise PotpourriError("questions need a VLM run (--run VLM_RUN); without one, ask '/' requests")
        reply = self.assistant.ask(self.image, question)
        self.turns += 1
        stem = f"{self.turns:03d}_{self.image_path.stem}"
        record = {"image": str(self.image_path), "question": reply.question, "answer": reply.answer,
                  "boxes": [{"phrase": p, "box": [round(v, 2) for v in b]} for p, b in reply.regions]}  # fmt: skip
        print(f"answer: {reply.answer}", file=stream)
        if reply.regions or reply.mask is not None:
            path = self.run.images / f"{stem}_answer.png"
            Image.fromarray(reply.annotated).save(path)
            record["annotated"] = str(path)
            print(f"boxes: {len(reply.regions)}; drawn on {path}", file=stream)
        if reply.inspection is not None:
            path = self.run.images / f"{stem}_{reply.inspection.method}.png"
            Image.fromarray(reply.inspection.overlay).save(path)
            record.update(inspection=reply.inspection.summary, inspection_image=str(path))
            print(f"inspection: {reply.inspection.summary}; overlay {path}", file=stream)
        for note in reply.notes:
            print(f"note: {note}", file=stream)
        with open(self.run.path / "transcript.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        return record


def repl(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
    interactive = stdin.isatty()
    print(f"image: {session.image_path} ({session.image.shape[1]}x{session.image.shape[0]}); ask a question, "
          "':image PATH' switches the image, 'quit' or Ctrl-D ends", file=stdout)  # fmt: skip
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        if question.lower() in _QUIT:
            break
        try:
            if question.startswith(":image"):
                session.set_image(question.removeprefix(":image").strip())
                print(f"image: {session.image_path}", file=stdout)
            elif question.startswith("/"):
                session.request(question, stdout)
            else:
                session.turn(question, stdout)
        except PotpourriError as exc:  # a bad image or question ends the turn, not the session
            print(f"error: {exc}", file=stdout)
