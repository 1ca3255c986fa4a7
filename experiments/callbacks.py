"""Callbacks that measure cost: training tokens per second and peak memory, logged as metrics."""

from __future__ import annotations

import os
import resource
import signal
import sys
import time

import lightning as L
import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class Throughput(L.Callback):
    """Tokens per second over each logging window (excluding validation), and overall at the end of training; all
    devices together (``perf/tokens_per_sec``) and per device (``..._per_device``)."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._tokens = 0
        self._seconds = 0.0
        self._total_tokens = 0
        self._total_seconds = 0.0
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._start
        tokens = batch[0].numel() * trainer.world_size
        self._tokens += tokens
        self._seconds += elapsed
        self._total_tokens += tokens
        self._total_seconds += elapsed
        if trainer.global_step % self.window == 0 and self._seconds > 0:
            rate = self._tokens / self._seconds
            pl_module.log("perf/tokens_per_sec", rate, on_step=True, on_epoch=False)
            # against one device's perf/tokens_per_sec at the same per-device batch: the scaling efficiency
            pl_module.log("perf/tokens_per_sec_per_device", rate / trainer.world_size, on_step=True, on_epoch=False)
            pl_module.log("perf/peak_mem_mb", peak_memory_mb(pl_module.device), on_step=True, on_epoch=False)
            self._tokens, self._seconds = 0, 0.0

    def on_train_end(self, trainer, pl_module) -> None:
        if self._total_seconds > 0 and trainer.logger is not None:
            rate = self._total_tokens / self._total_seconds
            trainer.logger.log_metrics(
                {
                    "perf/train_tokens_per_sec": rate,
                    "perf/train_tokens_per_sec_per_device": rate / trainer.world_size,
                    "perf/train_tokens": float(self._total_tokens),
                    "perf/peak_mem_mb": peak_memory_mb(pl_module.device),
                },
                step=trainer.global_step,
            )

    @property
    def tokens_per_sec(self) -> float:
        return self._total_tokens / self._total_seconds if self._total_seconds else float("nan")


class InjectFailure(L.Callback):
    """Fail on purpose at a given step (``inject_failure={at_step: 5, kind: kill}``), to exercise what users
    rely on: ``kill`` ends the process abruptly (resume), ``sigterm``/``sigint`` send the process that signal (a
    scheduler's stop, Ctrl+C), ``raise`` raises (a failed trial), ``diverge`` makes the loss NaN."""

    KINDS = ("kill", "sigterm", "sigint", "raise", "diverge")

    def __init__(self, at_step: int, kind: str = "raise") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"inject_failure.kind={kind!r}; choose one of {', '.join(self.KINDS)}")
        self.at_step, self.kind = at_step, kind

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step:
            return
        if self.kind in ("kill", "sigterm", "sigint"):
            os.kill(os.getpid(), getattr(signal, "SIG" + self.kind.removeprefix("sig").upper()))
            return
        if self.kind == "raise":
            raise RuntimeError(f"injected failure at step {self.at_step}")
        with torch.no_grad():
            pl_module.model.embedding.weight.fill_(float("nan"))
