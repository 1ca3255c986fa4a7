"""The training order: resumable, and sharded across data-parallel ranks without changing the global batches."""

from __future__ import annotations

import pytest

from experiments.data.sampling import ResumableShuffle


def batches(sampler: ResumableShuffle, batch_size: int) -> list[list[int]]:
    order = list(sampler)
    assert len(order) == len(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_see_the_single_device_global_batches(world):
    """N ranks at batch b read, step for step, exactly the samples one device reads at batch N x b."""
    n, seed, b, steps = 37, 3, 3, 9  # 37 is not a multiple of the global batch: epochs wrap inside a batch
    single = batches(ResumableShuffle(n, seed, 0, steps * b * world, batch_size=b * world), b * world)
    shards = [batches(ResumableShuffle(n, seed, 0, steps * b, rank, world, b), b) for rank in range(world)]
    for step in range(steps):
        assert sum((shard[step] for shard in shards), []) == single[step]


def test_resumed_ranks_continue_where_they_stopped():
    """A rank restarted after k steps (start = k x global batch) reads the rest of what it would have read."""
    n, seed, b, world, steps, done = 23, 1, 2, 2, 10, 4
    for rank in range(world):
        full = list(ResumableShuffle(n, seed, 0, steps * b, rank, world, b))
        resumed = list(ResumableShuffle(n, seed, done * b * world, (steps - done) * b, rank, world, b))
        assert resumed == full[done * b :]


def test_single_device_order_is_unchanged_and_bad_rank_is_refused():
    plain = list(ResumableShuffle(11, 0, 5, 30))
    assert plain == list(ResumableShuffle(11, 0, 5, 30, 0, 1, 4))  # batch size is irrelevant on one device
    assert sorted(plain[6:17]) == list(range(11))  # positions 11..21: one whole epoch, each sample once
    with pytest.raises(ValueError, match="rank 2"):
        ResumableShuffle(11, 0, 0, 4, rank=2, world_size=2)
