"""``potpourri chat`` (terminal) and ``potpourri serve`` (Gradio web app) around a trained VLM run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError


def _cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from potpourri.app.assistant import Assistant
    from potpourri.app.chat import NO_RUNNER, ChatSession, repl
    from potpourri.core.imaging import read_rgb

    if args.run is None and args.inspect is None:
        raise PotpourriError("chat needs a VLM run (--run), an inspection run for '/' requests (--inspect), or both")
    if args.threads:
        torch.set_num_threads(args.threads)
    read_rgb(args.image)  # a missing or corrupt image fails before the model loads
    if args.run is None:  # '/' requests only: no VLM
        from potpourri.app.requests import RequestRunner

        if args.question is not None and not args.question.startswith("/"):
            raise PotpourriError("questions need a VLM run (--run VLM_RUN); without one, ask '/' requests")
        session = ChatSession(None, args.image, args.out, RequestRunner.from_run(args.inspect, router=args.router),
                              root=args.inspect)  # fmt: skip
    else:
        assistant = Assistant(args.run, inspect=args.inspect, max_new_tokens=args.max_new_tokens,
                              device=args.device, precision=args.precision)  # fmt: skip
        requests = _request_runner(assistant, args.router)
        if requests is None and args.question is not None and args.question.startswith("/"):
            raise PotpourriError(NO_RUNNER)
        session = ChatSession(assistant, args.image, args.out, requests)
    if args.question is not None and args.question.startswith("/"):
        session.request(args.question)
    elif args.question is not None:
        session.turn(args.question)
    else:
        repl(session, sys.stdin, sys.stdout)
    print(f"transcript: {session.run.path / 'transcript.jsonl'}")
    return 0


def _request_runner(assistant, router: str):
    """A ``RequestRunner`` over the assistant's ``--inspect`` run: a segmenter, or PatchCore when it draws masks (a
    pixel threshold); None otherwise."""
    from potpourri.app.requests import AnomalyClasses, RequestRunner, load_router

    inspector = assistant.inspector
    if inspector is None:
        return None
    if inspector.method == "segmenter":
        return RequestRunner(load_router(router), inspector.model)
    if inspector.model.thresholds.pixel is None:
        return None
    return RequestRunner(load_router(router), AnomalyClasses(inspector.model))


def _register_chat(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri chat``."""
    chat = subparsers.add_parser("chat", help="ask a trained VLM about an image (terminal; boxes drawn and saved)")
    chat.add_argument("image", help="the image to ask about")
    chat.add_argument("--run", default=None,
                      help="a run folder written by `potpourri vlm train` (optional with --inspect: '/' requests "
                      "only)")  # fmt: skip
    chat.add_argument("--question", "-q", default=None, help="answer this one question and exit (default: a REPL)")
    chat.add_argument(
        "--inspect", default=None,
        help="also show a PatchCore (`inspect fit`) or segmenter run's verdict; '/' requests run on it",
    )  # fmt: skip
    chat.add_argument(
        "--router", choices=("keywords", "smollm2"), default="keywords",
        help="routes '/' requests in plain language to toolkit calls (needs --inspect: a segmenter run, or a "
        "PatchCore run, which answers about anomalies of any kind)",
    )  # fmt: skip
    chat.add_argument("--max-new-tokens", type=flags.non_negative_int, default=64)
    chat.add_argument("--out", default=None, help="output folder (default RUN/chat/v<N>)")
    chat.add_argument("--threads", type=flags.non_negative_int, default=0, help="torch threads (0: leave as is)")
    flags.add_compute(chat)
    chat.set_defaults(func=_cmd_chat)


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from potpourri.app.assistant import Assistant
    from potpourri.app.serve import build_app, require_gradio
    from potpourri.deploy.runs import run_kind

    require_gradio()  # fail before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    if (Path(args.run) / "metadata.json").is_file() and run_kind(args.run) == "inspection":
        from potpourri.app.inspect_app import InspectionService, serve_inspection

        if args.inspect:
            raise PotpourriError("--inspect adds an inspection run to a VLM run; RUN already is an inspection run")
        service = InspectionService(args.run, max_megapixels=args.max_megapixels, device=args.device,
                                    precision=args.precision)  # fmt: skip
        requests = None
        if service.method.thresholds.pixel is not None:  # the page's request field answers from the pixel mask
            from potpourri.app.requests import AnomalyClasses, RequestRunner, load_router

            requests = RequestRunner(load_router(args.router), AnomalyClasses(service.method))
        serve_inspection(service, host=args.host, port=args.port, requests=requests)
        return 0
    assistant = Assistant(args.run, inspect=args.inspect, max_new_tokens=args.max_new_tokens, device=args.device,
                          precision=args.precision)  # fmt: skip
    app = build_app(assistant, _request_runner(assistant, args.router))
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    app.launch(server_name=args.host, server_port=args.port, quiet=True, show_error=True)
    return 0


def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri serve``."""
    serve = subparsers.add_parser(
        "serve", help="an inspection run or the VLM assistant as a web app (Gradio; pip install 'potpourri[app]')"
    )
    serve.add_argument(
        "--run", required=True, help="an `inspect fit` run (inspection app + JSON endpoint) or a `vlm train` run"
    )
    serve.add_argument(
        "--max-megapixels", type=flags.positive_float, default=50.0, help="inspection app: larger uploads are refused"
    )
    serve.add_argument("--inspect", default=None, help="also show a PatchCore (`inspect fit`) or segmenter run")
    serve.add_argument(
        "--router", choices=("keywords", "smollm2"), default="keywords",
        help="routes the page's plain-language requests to toolkit calls (with a segmenter --inspect run, or a "
        "PatchCore run with a pixel threshold: anomalies of any kind)",
    )  # fmt: skip
    serve.add_argument("--port", type=flags.positive_int, default=7860)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    serve.add_argument("--max-new-tokens", type=flags.non_negative_int, default=64)
    serve.add_argument("--threads", type=flags.non_negative_int, default=0, help="torch threads (0: leave as is)")
    flags.add_compute(serve)
    serve.set_defaults(func=_cmd_serve)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri chat`` and ``potpourri serve``."""
    _register_chat(subparsers)
    _register_serve(subparsers)
