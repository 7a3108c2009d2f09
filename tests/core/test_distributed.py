"""The process-group helper in one process: rank 0 of 1, blocks that cover a list, errors that reach every rank."""

from __future__ import annotations

import pytest
import torch

from potpourri.core.distributed import ProcessGroup, join, shard_bounds
from potpourri.core.errors import PotpourriError


@pytest.mark.parametrize("n", [0, 1, 7, 26])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_contiguous_blocks_that_concatenate_to_the_list(n: int, world: int) -> None:
    items = list(range(n))
    blocks = [ProcessGroup(rank, world).shard(items) for rank in range(world)]
    assert [x for block in blocks for x in block] == items
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [shard_bounds(n, r, world)[1] for r in range(world)][-1] == n


def test_one_process_is_rank_0_of_1_and_collectives_are_identities(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = join("cpu")
    assert (group.rank, group.world, group.is_main, group.owns_group) == (0, 1, True, False)
    rows = torch.arange(6.0).view(3, 2)
    assert group.all_gather(rows)[0] is rows and group.all_gather_object("a") == ["a"]
    assert group.broadcast_object(3) == 3
    group.barrier()
    group.destroy()


def test_main_first_hands_back_the_result_and_raises_its_error() -> None:
    group = ProcessGroup()
    assert group.main_first(lambda: 5) == 5

    def bad() -> None:
        raise PotpourriError("--out 'x' exists; pass another --out")

    with pytest.raises(PotpourriError, match="--out 'x' exists"):
        group.main_first(bad)
