"""The training order of every data module: resumable, a function of the seed and the position only."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffle(Sampler[int]):
    """The training order as a pure function of the position in the stream: position ``p`` reads the ``p % n``-th
    entry of epoch ``p // n``'s seeded permutation. A resumed run starts at ``steps done x global batch`` and so sees
    exactly the batches an uninterrupted run would have seen.

    Under data parallelism the stream is consumed in global batches of ``batch_size x world_size``: rank ``r`` reads
    the ``r``-th slice of ``batch_size`` positions of each, so N devices at ``batch_size`` see, step for step, the
    samples that one device sees at ``N x batch_size`` (the same loss curve at the same global batch). ``start`` is a
    position in the global stream; ``length`` counts this rank's samples."""

    def __init__(
        self, n: int, seed: int, start: int, length: int, rank: int = 0, world_size: int = 1, batch_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.seed, self.start, self.length = n, seed, start, length
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def positions(self) -> Iterator[int]:
        """This rank's positions in the global stream, step by step."""
        step_stride, offset = self.batch_size * self.world_size, self.rank * self.batch_size
        for i in range(self.length):
            step, j = divmod(i, self.batch_size)
            yield self.start + step * step_stride + offset + j

    def __iter__(self) -> Iterator[int]:
        epoch, perm = -1, None
        for p in self.positions():
            e, i = divmod(p, self.n)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + e))
            yield int(perm[i])

    def __len__(self) -> int:
        return self.length
