"""``potpourri chat IMAGE --run RUN``: ask a trained VLM about an image in the terminal.

With ``--question`` it answers once and exits; otherwise it reads questions until end of input or ``quit``
(``:image PATH`` switches the image). Each answer is printed; when it contains boxes or masks (MiniGPT-v2 text,
parsed by ``potpourri.textgeo``) the image with them drawn is saved under ``RUN/chat/v<N>/images/`` and its path
printed. ``--inspect`` adds the verdict of a PatchCore / segmenter run and saves its overlay. Every turn is appended
to ``transcript.jsonl``.

Example:
    potpourri chat part.png --run runs/vlm/v0 --question "[refer] where is the scratch?"
    potpourri chat part.png --run runs/vlm/v0 --inspect runs/inspect/v0        # a REPL
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from potpourri.errors import PotpourriError

__all__ = ["ChatSession", "register_cli"]

_QUIT = {"quit", "exit", ":q"}


class ChatSession:
    """One image, one assistant, one output folder: ``turn(question)`` answers, saves drawings, logs the turn."""

    def __init__(self, assistant, image_path: str | Path, out: str | Path | None = None) -> None:
        from potpourri.runs import new_run

        self.assistant = assistant
        self.run = new_run("chat", out, root=assistant.run_dir)
        self.turns = 0
        self.set_image(image_path)

    def set_image(self, image_path: str | Path) -> None:
        """Switch to another image (read now, so a bad file fails before any question)."""
        from potpourri.imaging import read_rgb

        self.image = read_rgb(image_path)
        self.image_path = Path(image_path)

    def turn(self, question: str, stream: TextIO | None = None) -> dict:
        """Answer one question, print the answer (and saved image paths), append it to ``transcript.jsonl``."""
        from PIL import Image

        stream = stream or sys.stdout
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


def _repl(session: ChatSession, stdin: TextIO, stdout: TextIO) -> None:
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
            else:
                session.turn(question, stdout)
        except PotpourriError as exc:  # a bad image or question ends the turn, not the session
            print(f"error: {exc}", file=stdout)


def _cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from potpourri.app.assistant import Assistant
    from potpourri.imaging import read_rgb

    if args.threads:
        torch.set_num_threads(args.threads)
    read_rgb(args.image)  # a missing or corrupt image fails before the model loads
    assistant = Assistant(args.run, inspect=args.inspect, max_new_tokens=args.max_new_tokens)
    session = ChatSession(assistant, args.image, args.out)
    if args.question is not None:
        session.turn(args.question)
    else:
        _repl(session, sys.stdin, sys.stdout)
    print(f"transcript: {session.run.path / 'transcript.jsonl'}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri chat``."""
    chat = subparsers.add_parser("chat", help="ask a trained VLM about an image (terminal; boxes drawn and saved)")
    chat.add_argument("image", help="the image to ask about")
    chat.add_argument("--run", required=True, help="a run folder written by `potpourri vlm train`")
    chat.add_argument("--question", "-q", default=None, help="answer this one question and exit (default: a REPL)")
    chat.add_argument(
        "--inspect", default=None, help="also show a PatchCore (`inspect fit`) or segmenter run's verdict"
    )
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--out", default=None, help="output folder (default RUN/chat/v<N>)")
    chat.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    chat.set_defaults(func=_cmd_chat)
