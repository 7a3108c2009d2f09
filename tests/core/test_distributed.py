"""The process-group helper in one process: rank 0 of 1, blocks that cover a list, errors that reach every rank."""

from __future__ import annotations

import pytest
import torch

from potpourri.core.distributed import ProcessGroup, join, rows_in_parts, shard_bounds
from potpourri.core.errors import PotpourriError


@pytest.mark.parametrize("n", [0, 1, 7, 26])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_are_contiguous_blocks_that_concatenate_to_the_list(n: int, world: int) -> None:
    items = list(range(n))
    blocks = [ProcessGroup(rank, world).shard(items) for rank in range(world)]
    assert [x for block in blocks for x in block] == items
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [shard_bounds(n, r, world)[1] for r in range(world)][-1] == n


@pytest.mark.parametrize(("n", "batch", "world"), [(11, 4, 2), (13, 16, 2), (40, 16, 3), (0, 4, 2)])
def test_batch_blocks_are_whole_batches_of_one_process_in_rank_order(n: int, batch: int, world: int) -> None:
    blocks = [ProcessGroup(rank, world).batch_block(n, batch) for rank in range(world)]
    assert [b for _, b in blocks[:-1]] == [a for a, _ in blocks[1:]] and blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(start % batch == 0 for start, stop in blocks if stop > start)


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


class Rank(ProcessGroup):
    """One rank of a 2-process job played in this process: ranks run one after the other, so no barrier is needed."""

    def barrier(self) -> None:
        pass


KEYS = [f"img{i:02d}.png" for i in range(11)]
FIELDS = ["image", "score"]


def scorer(calls: list, fail_after: int | None = None):
    done = []

    def score(first: int, stop: int) -> list[dict]:
        if fail_after is not None and len(done) == fail_after:
            raise KeyboardInterrupt  # the job dies here, after ``fail_after`` batches of this rank are on disk
        calls.append((first, stop))
        done.append(first)
        return [{"image": k, "score": sum(map(ord, k)) / (stop - first)} for k in KEYS[first:stop]]  # batch-dependent

    return score


def job(csv_path, world: int, calls: list, fail_after: dict | None = None) -> list[dict]:
    """Every rank of a ``world``-process job, rank 0 last (it merges)."""
    rows = []
    for rank in reversed(range(world)):
        score = scorer(calls, (fail_after or {}).get(rank))
        rows = rows_in_parts(Rank(rank, world), csv_path, KEYS, score, batch_size=4, fieldnames=FIELDS)
    return rows


def test_parts_merge_in_key_order_and_equal_one_process(tmp_path) -> None:
    one_calls, two_calls = [], []
    job(tmp_path / "one.csv", 1, one_calls)
    merged = job(tmp_path / "two.csv", 2, two_calls)
    assert [r["image"] for r in merged] == KEYS
    assert sorted(two_calls) == one_calls == [(0, 4), (4, 8), (8, 11)]  # the same batches, split by rank
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert not list(tmp_path.glob("two.part*"))


def test_a_killed_job_resumes_from_its_parts_without_rescoring(tmp_path) -> None:
    job(tmp_path / "straight.csv", 2, [])
    with pytest.raises(KeyboardInterrupt):  # rank 1 finishes, rank 0 dies after its first batch
        job(tmp_path / "killed.csv", 2, [], fail_after={0: 1})
    part = tmp_path / "killed.part0-of-2.csv"
    part.write_text(part.read_text() + "img05.png,0.5")  # a line cut by the kill
    calls = []
    job(tmp_path / "killed.csv", 2, calls)
    assert calls == [(4, 8)]  # only rank 0's unfinished batch
    assert (tmp_path / "killed.csv").read_text() == (tmp_path / "straight.csv").read_text()


def test_a_part_of_other_images_is_one_clear_error(tmp_path) -> None:
    (tmp_path / "p.part1-of-2.csv").write_text("image,score\r\nelsewhere.png,1\r\n")
    with pytest.raises(PotpourriError, match="other images"):
        rows_in_parts(Rank(1, 2), tmp_path / "p.csv", KEYS, scorer([]), batch_size=4, fieldnames=FIELDS)


def boxes_scorer(calls: list, fail_after: int | None = None):
    """Image i has i % 3 boxes (none, one or two): rows of a detector, scored batch by batch."""
    done = []

    def score(first: int, stop: int) -> list[dict]:
        if fail_after is not None and len(done) == fail_after:
            raise KeyboardInterrupt
        calls.append((first, stop))
        done.append(first)
        return [{"image": KEYS[i], "score": i + b / 10} for i in range(first, stop) for b in range(i % 3)]

    return score


def boxes_job(csv_path, world: int, calls: list, fail_after: dict | None = None) -> list[dict]:
    rows = []
    for rank in reversed(range(world)):
        score = boxes_scorer(calls, (fail_after or {}).get(rank))
        rows = rows_in_parts(Rank(rank, world), csv_path, KEYS, score, batch_size=4, fieldnames=FIELDS, many=True)
    return rows


def test_images_with_any_number_of_rows_merge_to_the_one_process_csv(tmp_path) -> None:
    one_calls, two_calls = [], []
    boxes_job(tmp_path / "one.csv", 1, one_calls)
    merged = boxes_job(tmp_path / "two.csv", 2, two_calls)
    expected = [(KEYS[i], f"{i + b / 10}") for i in range(11) for b in range(i % 3)]  # 10 rows, images 0, 3, ... none
    assert [(r["image"], r["score"]) for r in merged] == expected
    assert sorted(two_calls) == one_calls == [(0, 4), (4, 8), (8, 11)]
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert (tmp_path / "one.csv").read_text().splitlines()[0] == "image,score"  # no counting column left
    assert not list(tmp_path.glob("*.part*"))


@pytest.mark.parametrize("world", [1, 2])
def test_a_killed_job_with_rows_per_image_resumes_to_the_uninterrupted_csv(tmp_path, world: int) -> None:
    boxes_job(tmp_path / "straight.csv", world, [])
    with pytest.raises(KeyboardInterrupt):  # rank 0 dies after its first batch (images 0-3)
        boxes_job(tmp_path / "killed.csv", world, [], fail_after={0: 1})
    part = tmp_path / f"killed.part0-of-{world}.csv"
    # the kill cut the next batch: image 4's only row is whole, image 5's second row is missing, a line is torn
    part.write_text(part.read_text() + "img04.png,4.0,1\r\nimg05.png,5.0,2\r\nimg05.png,5.")
    calls = []
    boxes_job(tmp_path / "killed.csv", world, calls)
    assert calls == [(4, 8)] if world == 2 else calls == [(4, 8), (8, 11)]  # the unfinished batches only
    assert (tmp_path / "killed.csv").read_text() == (tmp_path / "straight.csv").read_text()
    calls = []
    boxes_job(tmp_path / "killed.csv", world, calls)  # a finished merge is done: nothing is scored again
    assert calls == [] and (tmp_path / "killed.csv").read_text() == (tmp_path / "straight.csv").read_text()
