"""The one flag vocabulary of every verb: ``--data --out --run --image-size --batch-size --epochs/--steps --lr --seed
--threads``. Old spellings stay as hidden aliases for one release (help=SUPPRESS).
"""

from __future__ import annotations

import argparse

from potpourri.core.errors import PotpourriError

__all__ = [
    "OneLineParser",
    "add_compute",
    "add_config",
    "add_image_size",
    "add_run",
    "check_compute",
    "device_name",
    "existing_path",
    "fraction",
    "image_side",
    "index_list",
    "model_name",
    "non_negative_float",
    "non_negative_int",
    "normalise_run",
    "positive_float",
    "positive_int",
    "probability",
    "with_config",
]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``PotpourriError`` line (exit code 2), not usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise PotpourriError(f"{self.prog.split(' ', 1)[-1]}: {message}")


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    """An integer ≥ 1 (counts: epochs, steps, batch size, images, threads)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer ≥ 0 (seeds, workers, optional counts where 0 means off)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, time budgets)."""
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number ≥ 0 (weight decay, loss weights, clipping where 0 means off)."""
    value = _number(text, float)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1] (coreset ratio, validation share)."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1] (confidence, IoU and score thresholds)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def existing_path(text: str) -> str:
    """A file or folder that exists."""
    from pathlib import Path

    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"'{text}' does not exist")
    return text


def model_name(text: str) -> str:
    """A registered model or a timm model (``timm/`` prefix optional), checked without building it."""
    from potpourri.core.registry import check_model_name

    try:
        return check_model_name(text)
    except PotpourriError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_run(parser: argparse.ArgumentParser, what: str) -> None:
    """``--run RUN``: an existing run folder (``what`` says which verb wrote it); ``RUN`` as the first positional is
    the old spelling and still works."""
    parser.add_argument("--run", help=f"an existing run folder ({what})")
    parser.add_argument("legacy_run", nargs="?", metavar="RUN", help=argparse.SUPPRESS)


def image_side(text: str) -> int:
    """A square input side in pixels, 16 or more (smaller maps vanish in stride-16/32 backbones)."""
    value = _number(text, int)
    if value < 16:
        raise argparse.ArgumentTypeError(f"must be at least 16 pixels, got {value}")
    return value


def add_image_size(parser: argparse.ArgumentParser, *, default: int | None, help: str, old: str | None = None) -> None:
    """``--image-size N`` (square input side); ``old`` is a former spelling kept as a hidden alias."""
    parser.add_argument("--image-size", dest="image_size", type=image_side, default=default, help=help)
    if old:
        parser.add_argument(old, dest="image_size", type=image_side, default=default, help=argparse.SUPPRESS)


def normalise_run(args: argparse.Namespace) -> None:
    """Resolve ``--run`` against the old positional spelling; with ``--run``, a leading positional is an image."""
    if not hasattr(args, "legacy_run"):
        return
    legacy = args.__dict__.pop("legacy_run")
    images = getattr(args, "images", None)
    if args.run is None:
        if legacy is None:
            raise PotpourriError("give the run folder: --run RUN")
        args.run = legacy
    elif legacy is not None:
        if images is None:
            raise PotpourriError(f"unexpected argument '{legacy}': the run folder is already given by --run")
        images.insert(0, legacy)


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that this machine has (CUDA names fail here without a GPU)."""
    from potpourri.core.training import resolve_device

    try:
        resolve_device(text)
    except PotpourriError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
    return text


def add_compute(parser: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda|cuda:N`` and ``--precision fp32|bf16|fp16``, resolved by ``core.training``."""
    from potpourri.core.training import PRECISIONS

    parser.add_argument(
        "--device", type=device_name, default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="fp32, bf16 (CPU or GPU) or fp16 (GPU, GradScaler)"
    )


def add_sync_bn(parser: argparse.ArgumentParser) -> None:
    """``--sync-bn``: under torchrun, BatchNorm layers that train use the statistics of every process's batch."""
    parser.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: BatchNorm layers that train use the statistics of every process's slice of the batch "
        "(core.syncbn, CPU or CUDA); no effect in one process",
    )


def check_compute(args: argparse.Namespace) -> None:
    """Refuse a ``--precision`` the chosen ``--device`` cannot run, before any work starts."""
    if not hasattr(args, "precision") or not hasattr(args, "device"):
        return
    from potpourri.core.training import check_precision, resolve_device

    check_precision(args.precision, resolve_device(args.device))


# keys of a run's config.yaml that describe that run, not how to make another one
_NOT_FROM_CONFIG = {"out", "resume", "run", "config", "func", "help"}


def add_config(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: take every flag not given on the command line from a run's ``config.yaml``."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a run's config.yaml: its settings, unless given here (re-runs it into a new --out)",
    )


def with_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Expand ``--config FILE`` into the flags it sets for the chosen verb; flags on the command line win. Every
    value then goes through the flag's own validation. A missing or non-mapping file is one clear error."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    from pathlib import Path

    import yaml

    rest, path = [], None
    tokens = iter(argv)
    for token in tokens:
        if token == "--config":
            path = next(tokens, None)
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
        else:
            rest.append(token)
    if not path or not Path(path).is_file():
        raise PotpourriError(f"--config: '{path}' does not exist; pass a run's config.yaml")
    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise PotpourriError(f"--config: '{path}' is not valid YAML ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise PotpourriError(f"--config: '{path}' is not a mapping of settings")
    leaf = parser
    for token in rest:  # follow the verb (and sub-verb) to the parser that owns the flags
        subs = [a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and token in subs[0].choices:
            leaf = subs[0].choices[token]
        elif not token.startswith("-"):
            break
    given = {t.split("=", 1)[0] for t in rest if t.startswith("--")}
    given_dests = {a.dest for a in leaf._actions if given & set(a.option_strings)}  # old aliases count too
    extra: list[str] = []
    for action in leaf._actions:
        options = [o for o in action.option_strings if o.startswith("--")]
        if (
            not options
            or action.dest in _NOT_FROM_CONFIG
            or action.dest not in config
            or action.help == argparse.SUPPRESS
        ):
            continue
        if action.dest in given_dests:
            continue
        value = config[action.dest]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            extra.append(options[0] if value else f"--no-{options[0][2:]}")
        elif action.nargs == 0:  # store_true / store_false
            if bool(value) == bool(action.const):
                extra.append(options[0])
        elif isinstance(value, list):
            extra += [options[0], *map(str, value)]
        else:
            extra += [options[0], str(value)]
    return rest + extra


def index_list(text: str) -> list[int]:
    """Comma-separated indices ≥ 0, e.g. ``2,4`` (layers to tap)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"must be indices 0 or more, e.g. 2,4; got '{text}'")
    return values
