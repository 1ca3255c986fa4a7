"""What every data module of the platform shares: built once into an on-disk cache, loaded lazily."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from experiments.data.sampling import ResumableShuffle


class CachedDataModule(L.LightningDataModule):
    """``config.check()`` runs first (errors before any work); ``_load()`` builds or reads the cache, once, from
    whichever of ``prepare_data``/``setup`` Lightning calls first. ``total_steps`` sizes the training stream."""

    def __init__(self, config: Any, seed: int = 0, total_steps: int = 1) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.seed = seed
        self.total_steps = total_steps

    @property
    def cache_dir(self) -> Path:
        return Path(os.path.expanduser(self.config.cache_dir))

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def resumable_loader(self, dataset: Dataset) -> DataLoader:
        """One training loader for the whole run: the remaining ``total_steps`` batches (fewer when resuming), in an
        order that depends only on the seed and the step, so a resumed run sees what an uninterrupted one would."""
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        done = (trainer.global_step if trainer is not None else 0) * accumulate
        total = self.total_steps * accumulate
        bs = self.config.batch_size
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        order = ResumableShuffle(len(dataset), self.seed, done * bs * world, max(0, total - done) * bs, rank, world, bs)
        # a batch in pinned memory goes to a GPU without the stream sync that the driver may make to stage pageable
        # memory (CUDA's API synchronization behavior), so the host can queue the next step while this one runs
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            dataset,
            batch_size=bs,
            sampler=order,
            drop_last=True,
            num_workers=self.config.num_workers,
            persistent_workers=self.config.num_workers > 0,
            pin_memory=on_gpu,
        )
