"""What every data module of the platform shares: built once into an on-disk cache, loaded lazily."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L


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
