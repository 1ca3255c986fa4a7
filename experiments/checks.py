"""Checks of a run's settings that need nothing built: each failure is one line naming the fix, raised before any
data is read or weight allocated (a bad learning rate or store URL would otherwise surface minutes later, as a
library's traceback)."""

from __future__ import annotations

import difflib
import logging
import math
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from arch_zoo.errors import ConfigError
from experiments.lit_module import SCHEDULES, OptimConfig
from experiments.store import mask_secrets

log = logging.getLogger("arch_zoo")
PRIMARY_CONFIG = Path(__file__).resolve().parent / "conf" / "train.yaml"
# URI schemes MLflow opens a tracking store for (a plain path is a local directory store)
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "uc")


@cache
def known_settings() -> frozenset[str]:
    """The top-level keys of the primary config and its config groups."""
    primary = OmegaConf.load(PRIMARY_CONFIG)
    groups = {next(iter(entry)) for entry in primary.defaults if isinstance(entry, DictConfig)}
    return frozenset({*primary.keys(), *groups} - {"defaults", "hydra"})


def check_settings(cfg: DictConfig) -> None:
    """A key added with ``+key=value`` that no part of the program reads (a typo, a stale option) is refused, and so
    is an accelerator the machine lacks."""
    for key in cfg.keys():
        if key in known_settings():
            continue
        close = difflib.get_close_matches(str(key), sorted(known_settings()), n=1)
        hint = f"did you mean {close[0]}=...? " if close else ""
        raise ConfigError(
            f"unknown setting {key!r}: nothing reads it; {hint}settings are {', '.join(sorted(known_settings()))} "
            "(+name=... adds only config groups such as +sweep=NAME)"
        )
    if "trainer" in cfg:
        check_accelerator(cfg.trainer)  # the hardware a setting asks for, before the Trainer is built


def check_accelerator(trainer: DictConfig) -> None:
    """``trainer=gpu`` / ``trainer=ddp`` on a machine without enough CUDA GPUs: one line, not Lightning's traceback
    from inside the Trainer's constructor."""
    import torch

    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = trainer.get("devices", "auto")
    wanted = devices if isinstance(devices, int) and devices > 0 else 1
    if available == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu, trainer=ddp) needs a CUDA GPU and this machine has none; "
            "train on the CPU with trainer=default"
        )
    if wanted > available:
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {available} CUDA GPU(s); set trainer.devices={available}"
        )


def check_optim(optim: OptimConfig, max_steps: int) -> None:
    for name in ("lr", "weight_decay", "eps", "min_lr_ratio"):
        value = getattr(optim, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and name in ("lr", "eps")):
            default = getattr(OptimConfig, name)
            raise ConfigError(f"optim.{name}={value} must be a finite positive number, e.g. optim.{name}={default}")
    if optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={optim.warmup_steps}: set 0 or more steps")
    if optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={optim.schedule} is unknown; choose one of {', '.join(SCHEDULES)}")
    if optim.warmup_steps >= max_steps:
        log.warning(
            "optim.warmup_steps=%d >= trainer.max_steps=%d: the learning rate never leaves its warmup; "
            "lower optim.warmup_steps",
            optim.warmup_steps,
            max_steps,
        )


def micro_batches_per_step(tokens_per_step: int, batch_size: int, block_size: int, world_size: int = 1) -> int:
    """Micro-batches per optimiser step that make ``tokens_per_step`` tokens across every rank (the
    ``trainer.accumulate_grad_batches`` of a run that sets ``tokens_per_step``). A paper's batch is met exactly or
    refused, never rounded: the error names the micro-batch sizes that divide it."""
    per_micro_batch = batch_size * block_size * world_size
    steps, rest = divmod(tokens_per_step, per_micro_batch)
    if rest or steps == 0:
        windows, partial = divmod(tokens_per_step, block_size * world_size)  # per rank, whole windows
        sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if not partial and windows % b == 0]
        fix = f"set data.batch_size to one of {', '.join(map(str, sizes))}" if sizes else "change tokens_per_step"
        raise ConfigError(
            f"tokens_per_step={tokens_per_step} is not a whole number of micro-batches of {per_micro_batch:,} tokens "
            f"(data.batch_size={batch_size} x data.block_size={block_size} x {world_size} device(s)); {fix}"
        )
    return steps


def windowed(data: DictConfig) -> bool:
    """Whether a data config yields fixed windows (``batch_size`` of ``block_size`` tokens): only then is a batch a
    number of tokens."""
    return "block_size" in data and "batch_size" in data


def check_tokens_per_step(cfg: DictConfig) -> None:
    """``tokens_per_step`` fixes the optimiser's batch in tokens and derives the accumulation from it: it cannot be
    set with an accumulation of its own, and one device's micro-batch must divide it (more devices are checked when
    the Trainer knows how many there are)."""
    tokens = cfg.get("tokens_per_step")
    if tokens is None:
        return
    if not isinstance(tokens, int) or tokens <= 0:
        raise ConfigError(f"tokens_per_step={tokens} must be a positive whole number of tokens, e.g. 524288")
    if int(cfg.trainer.get("accumulate_grad_batches", 1) or 1) != 1:
        raise ConfigError(
            f"tokens_per_step={tokens} and trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} both "
            "set the optimiser's batch; set one (tokens_per_step derives the accumulation)"
        )
    if not windowed(cfg.data):
        raise ConfigError(f"tokens_per_step needs a data config with block_size and batch_size ({cfg.data._target_})")
    micro_batches_per_step(tokens, cfg.data.batch_size, cfg.data.block_size)


def check_tracking_uri(uri: str) -> None:
    """A tracking URI MLflow can open: a known scheme, and sqlite's three slashes (two name no file)."""
    scheme = urlparse(uri).scheme.lower().split("+")[0]
    if len(scheme) == 1:  # a Windows drive letter: a local path
        scheme = ""
    fix = "e.g. logger.tracking_uri=sqlite:///mlflow.db, a directory, or http://host:5000"
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"logger.tracking_uri={mask_secrets(uri)} has an unknown scheme {scheme!r}; {fix}")
    if scheme == "sqlite" and not (uri.startswith("sqlite:///") or uri == "sqlite://"):
        raise ConfigError(f"logger.tracking_uri={mask_secrets(uri)} names no file: sqlite URIs start sqlite:///; {fix}")
    if scheme in ("http", "https", "postgresql", "mysql", "mssql") and not urlparse(uri).hostname:
        raise ConfigError(f"logger.tracking_uri={mask_secrets(uri)} names no host; {fix}")
