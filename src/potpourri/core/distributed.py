"""The torch.distributed process group every scale-out path shares: join it from torchrun's environment (gloo on the
CPU, nccl on CUDA), ask rank and world size, split work by rank, gather results, and leave it cleanly.

A single process is rank 0 of 1 and every call is a cheap no-op, so loops need no ``if distributed`` branches::

    with process_group(device) as group:   # torchrun --nproc-per-node N script.py (or plain python)
        mine = group.shard(paths)           # a contiguous block of the sorted list
        parts = group.all_gather_object(score(mine))
        if group.is_main:
            write(parts)

Reading order: ``ProcessGroup`` (where this process sits, its collectives) → ``process_group`` (join from the
environment) → ``current_group`` (the group someone already joined) → ``rows_in_parts`` (a prediction job's
CSV: one part file per process, merged by rank 0, resumable after a kill).
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.io import atomic_write_bytes, kill_point, write_csv

__all__ = ["ProcessGroup", "current_group", "join", "process_group", "rows_in_parts", "shard_bounds"]

T = TypeVar("T")


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one)."""
    return round(rank * n / world), round((rank + 1) * n / world)


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a torchrun job (a single process is rank 0 of 1) and the collectives it needs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this object joined the group, so it destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes run files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        """Wait until every process reaches this point (a no-op in one process)."""
        if self.distributed:
            torch.distributed.barrier()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous block of ``items`` (blocks in rank order concatenate back to ``items``)."""
        start, stop = shard_bounds(len(items), self.rank, self.world)
        return list(items[start:stop])

    def batch_block(self, n: int, batch_size: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's whole batches of ``n`` items: the batches one process would run, so a
        model whose numbers depend on what else is in its batch gives the same numbers."""
        n_batches = -(-n // batch_size)
        start, stop = shard_bounds(n_batches, self.rank, self.world)
        return min(n, start * batch_size), min(n, stop * batch_size)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` in rank order; the first dimension may differ between ranks (padded in transit)."""
        if not self.distributed:
            return [tensor]
        lengths = [int(n) for n in self.all_gather_object(tensor.shape[0])]
        nccl = torch.distributed.get_backend() == "nccl"  # nccl moves CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else tensor.device
        padded = torch.zeros((max(lengths), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, padded)
        return [g[:n].to(tensor.device) for g, n in zip(gathered, lengths, strict=True)]

    def all_gather_with_grad(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``all_gather`` that keeps autograd for this rank's own part (the others' are detached copies), its gradient
        multiplied by the world size: when every process computes the same loss of the gathered parts (contrastive
        negatives), the gradients averaged over processes are one process's gradient of that loss."""
        if not self.distributed:
            return [tensor]
        parts = self.all_gather(tensor.detach())
        parts[self.rank] = _ScaledGradient.apply(tensor, float(self.world))
        return parts

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the other ranks' arguments are ignored)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, action: Callable[[], T]) -> T:
        """Run ``action`` on rank 0 only and hand its result to every rank; a ``PotpourriError`` there is raised on
        every rank, so a bad flag ends the whole job with one message instead of a hang."""
        outcome: Any = None
        if self.is_main:
            try:
                outcome = ("ok", action())
            except PotpourriError as exc:
                outcome = ("error", str(exc))
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise PotpourriError(value)
        return value

    def after_main_writes(self) -> None:
        """Every rank calls this once rank 0 has written a verb's files (the others right away): in a group the caller
        joined, all then leave together, so a next step can read them; a group the verb joined is gone, a no-op."""
        if self.distributed and not self.owns_group and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def destroy(self) -> None:
        """Leave the process group if this object joined it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _ScaledGradient(torch.autograd.Function):
    """The identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def current_group() -> ProcessGroup:
    """The group some caller already joined (rank 0 of 1 when none): for library code that never joins itself."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ProcessGroup()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return ProcessGroup(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)


def join(device: torch.device | str = "cpu") -> ProcessGroup:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (gloo for a CPU ``device``, nccl for CUDA); else
    rank 0 of 1. Joined twice, the second call reuses the group and does not own it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessGroup()
    if not torch.distributed.is_available():
        raise PotpourriError("WORLD_SIZE > 1 but this torch has no torch.distributed; run one process")
    if torch.distributed.is_initialized():
        return current_group()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl" and not torch.distributed.is_nccl_available():
        raise PotpourriError("--device cuda under torchrun needs NCCL, which this torch lacks; use --device cpu")
    torch.distributed.init_process_group(backend=backend)
    group = current_group()
    return ProcessGroup(group.rank, group.world, group.local_rank, owns_group=True)


@contextlib.contextmanager
def process_group(device: torch.device | str = "cpu") -> Iterator[ProcessGroup]:
    """``join`` for the duration of a ``with`` block; the group is destroyed on the way out, error or not.

    Example:
        with process_group("cpu") as group: rows = group.shard(paths)
    """
    group = join(device)
    try:
        yield group
    finally:
        group.destroy()


# ----------------------------------------------------------------------------------------------------------------
# rows of a prediction job, one part file per process


def _complete_rows(path: Path, key: str) -> list[dict[str, str]]:
    """The rows of a part file up to its last full line (a line cut by a kill is dropped and the file rewritten)."""
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        atomic_write_bytes(path, text.encode())
    return [row for row in csv.DictReader(text.splitlines()) if row.get(key)]


def rows_in_parts(
    group: ProcessGroup,
    csv_path: str | os.PathLike,
    keys: Sequence[str],
    score: Callable[[int, int], list[dict[str, Any]]],
    *,
    batch_size: int,
    fieldnames: list[str],
    key: str = "image",
    progress: bool = False,
) -> list[dict[str, str]]:
    """Rows for every entry of ``keys`` (files, in output order): this process scores its contiguous block of the
    one-process batches (``score(first, stop)`` gives the rows of ``keys[first:stop]``) into its own part file,
    appended and fsynced per batch, skipping batches a killed run already completed; rank 0 then merges every part
    into ``csv_path`` in the order of ``keys`` (one process: the part is ``csv_path`` itself). Returns the merged
    rows on rank 0, this process's rows on the others.

    Example:
        rows = rows_in_parts(group, run.path / "predictions.csv", paths, score, batch_size=8, fieldnames=FIELDS)
    """
    from tqdm.auto import tqdm

    csv_path = Path(csv_path)

    def part_of(rank: int) -> Path:
        return csv_path.with_name(f"{csv_path.stem}.part{rank}-of-{group.world}{csv_path.suffix}")

    part = part_of(group.rank) if group.distributed else csv_path
    start, stop = group.batch_block(len(keys), batch_size)
    mine = set(keys[start:stop])
    done = {}
    for source in dict.fromkeys([csv_path, part]):  # a finished merge counts as done too
        for row in _complete_rows(source, key):
            if source == part and row[key] not in mine:
                raise PotpourriError(f"'{part}' holds rows of other images ({row[key]}); start a new --out")
            done[row[key]] = row
    if not part.is_file() or not part.read_text():
        atomic_write_bytes(part, (",".join(fieldnames) + "\r\n").encode())
    scored: list[dict[str, str]] = []
    bar = tqdm(total=stop - start, desc=csv_path.stem, unit="img", disable=not (progress and group.is_main))
    with bar, open(part, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames)
        for first in range(start, stop, batch_size):
            last = min(first + batch_size, stop)
            if all(k in done for k in keys[first:last]):  # whole batches only: a resumed run sees the same batches
                scored += [done[k] for k in keys[first:last]]
                bar.update(last - first)
                continue
            rows = score(first, last)
            writer.writerows(rows)  # one batch per write, flushed: a kill loses at most this batch
            fh.flush()
            os.fsync(fh.fileno())
            scored += [{k: str(v) for k, v in row.items()} for row in rows]
            bar.update(last - first)
            kill_point((first - start) // batch_size + 1)
    group.barrier()  # every part is complete before rank 0 reads them
    if not group.is_main:
        return scored
    merged = {**done}
    for rank in range(group.world):
        merged.update({row[key]: row for row in _complete_rows(part_of(rank), key)})
    merged.update({row[key]: row for row in scored})
    missing = [k for k in keys if k not in merged]
    if missing:
        raise PotpourriError(f"no row for '{missing[0]}' in the parts of '{csv_path}'; rerun with --resume")
    rows = [merged[k] for k in keys]
    write_csv(csv_path, rows, fieldnames=fieldnames)
    if group.distributed:  # the merged file now holds every row: the parts can go
        for rank in range(group.world):
            part_of(rank).unlink(missing_ok=True)
    return rows
