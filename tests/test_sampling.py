"""The training order: resumable, and sharded across data-parallel ranks without changing the global batches."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("world", [1, 2])
def test_a_run_resumed_under_gradient_accumulation_reads_the_rest_of_the_same_batches(world):
    """With accumulate_grad_batches = a, a step reads a micro-batches: a run resumed at optimiser step k (what a
    checkpoint records) must start at micro-batch k x a (experiment=table5_paper accumulates 16), on every rank."""
    from types import SimpleNamespace

    from experiments.data.base import CachedDataModule

    config = SimpleNamespace(check=lambda: None, batch_size=3, num_workers=0)
    dataset = list(range(29))
    accumulate, steps, done = 4, 5, 2

    def loader(step: int, rank: int) -> list[int]:
        module = CachedDataModule(config, seed=7, total_steps=steps)
        module.trainer = SimpleNamespace(
            accumulate_grad_batches=accumulate, global_step=step, global_rank=rank, world_size=world,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )  # fmt: skip
        return [int(i) for batch in module.resumable_loader(dataset) for i in batch]

    for rank in range(world):
        straight, resumed = loader(0, rank), loader(done, rank)
        assert len(straight) == steps * accumulate * config.batch_size
        assert resumed == straight[done * accumulate * config.batch_size :]
