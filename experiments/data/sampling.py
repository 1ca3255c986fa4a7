"""The training order of every data module: resumable, a function of the seed and the position only."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableShuffle(Sampler[int]):
    """The training order as a pure function of the position in the stream: position ``p`` reads the ``p % n``-th
    entry of epoch ``p // n``'s seeded permutation. A resumed run starts at ``steps done x batch size`` and so sees
    exactly the batches an uninterrupted run would have seen."""

    def __init__(self, n: int, seed: int, start: int, length: int) -> None:
        self.n, self.seed, self.start, self.length = n, seed, start, length

    def __iter__(self):
        epoch, perm = -1, None
        for p in range(self.start, self.start + self.length):
            e, i = divmod(p, self.n)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + e))
            yield int(perm[i])

    def __len__(self) -> int:
        return self.length
