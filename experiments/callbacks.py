"""Callbacks of a run: speed (tokens per second, model FLOPs, MFU) and peak memory as metrics, a progress bar in
optimiser steps, the model summary with the model's declared FLOPs, and failures injected on purpose for the tests."""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from experiments.hardware import matmul_precision, misaligned_ffn_note, peak_tflops
from experiments.lit_module import logging_step

log = logging.getLogger("arch_zoo")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def declared_flops_per_token(trainer, pl_module, length: int) -> float | None:
    """The model's declared forward FLOPs per token at ``length``, under the precision plugin's forward context (the
    run's autocast): a mixer counts the form it runs, and whether its kernels run depends on the dtype (RetNet on
    them is chunkwise whatever its mode; counted outside autocast, a bfloat16 run's parallel mode was counted as
    the T^2 form, over a third more than the FLOPs it does at Table 5's shape)."""
    with trainer.precision_plugin.forward_context():
        return pl_module.model.flops_per_token(length)


class DeclaredFlopsSummary(RichModelSummary):
    """Lightning's model summary, its "Total FLOPs" the model's declared forward FLOPs of one training sequence of
    ``length`` tokens (:meth:`LanguageModel.flops_per_token` x ``length``; Lightning's own count where the model
    declares none or the length is unknown).

    Why: Lightning counts FLOPs by running an ``example_input_array`` under torch's FLOP counter. The model sets none,
    so every run printed ``Total FLOPs: 0``, and that counter would not see the Triton kernels anyway."""

    def __init__(self, length: int | None, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)
        self.length = length
        self._declared: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        flops = declared_flops_per_token(trainer, pl_module, self.length) if self.length else None
        self._declared = None if flops is None else round(flops * self.length)
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:  # fmt: skip
        flops = total_flops
        if self._declared is not None:  # Lightning's per-layer column is its own count: zeros without an example input
            flops = self._declared
            names = dict(summary_data)["Name"]
            per_row = [get_human_readable_count(flops) if name == "model" else "-" for name in names]
            summary_data = [(c, per_row if c == "FLOPs" else values) for c, values in summary_data]
        RichModelSummary.summarize(
            summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, flops, **kwargs
        )


class Throughput(L.Callback):
    """Training speed over each logging window (validation excluded) and over the whole fit: tokens per second for all
    devices together (``perf/tokens_per_sec``) and per device, and, where the model declares its FLOPs
    (:meth:`LanguageModel.flops_per_token`), achieved model TFLOP/s per device (a step is three forwards) and MFU, its
    fraction of the device's peak (``peak_tflops``, else :mod:`experiments.hardware`'s table; none on the CPU).

    The clock is read at window boundaries only: a GPU is synchronised once per window, not once per step, so the
    measurement does not stall the queue of work it measures."""

    def __init__(self, window: int = 10, peak_tflops: float | None = None) -> None:
        self.window = window
        self.peak_tflops = peak_tflops
        self._flops: dict[int, float | None] = {}  # forward FLOPs per token, by sequence length
        self._tokens = 0
        self._train_flops = 0.0
        self._seconds = 0.0
        self._total_tokens = 0
        self._total_flops = 0.0
        self._total_seconds = 0.0
        self._start: float | None = None

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        precision = matmul_precision(trainer.precision)
        if self.peak_tflops is None:
            self.peak_tflops = peak_tflops(pl_module.device, precision)
        config = pl_module.model.config
        matched = config.budget_per_layer is not None or config.target_params is not None
        note = misaligned_ffn_note(config.ffn.hidden(config.d_model), matched, precision)
        if note and config.ffn.kind != "none" and pl_module.device.type == "cuda" and trainer.is_global_zero:
            log.warning(note)

    def _flops_per_token(self, trainer, pl_module, length: int) -> float | None:
        if length not in self._flops:
            self._flops[length] = declared_flops_per_token(trainer, pl_module, length)
        return self._flops[length]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._flops and trainer.logger is not None and trainer.is_global_zero:
            # the run's declared cost, once: forward FLOPs per token at its training length, and the peak it is held to
            flops = self._flops_per_token(trainer, pl_module, batch[0].shape[-1])
            trainer.logger.log_hyperparams({"model.flops_per_token": flops, "perf.peak_tflops": self.peak_tflops})
        if self._start is None:
            self._start = self._now(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._close_window(pl_module)

    def _close_window(self, pl_module) -> None:
        if self._start is not None:
            elapsed = self._now(pl_module) - self._start
            self._seconds += elapsed
            self._total_seconds += elapsed
            self._start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = batch[0].numel() * trainer.world_size
        flops = self._flops_per_token(trainer, pl_module, batch[0].shape[-1])
        self._tokens += tokens
        self._total_tokens += tokens
        if flops is not None:
            self._train_flops += 3 * flops * tokens
            self._total_flops += 3 * flops * tokens
        if trainer.global_step % self.window == 0:
            self._close_window(pl_module)
            if self._seconds > 0:
                for key, value in self._rates(self._tokens, self._train_flops, self._seconds, trainer).items():
                    pl_module.log(key, value, on_step=True, on_epoch=False)
                pl_module.log("perf/peak_mem_mb", peak_memory_mb(pl_module.device), on_step=True, on_epoch=False)
            self._tokens, self._train_flops, self._seconds = 0, 0.0, 0.0

    def _rates(self, tokens: int, flops: float, seconds: float, trainer, prefix: str = "perf/") -> dict[str, float]:
        rate = tokens / seconds
        # per device: against one device's perf/tokens_per_sec at the same per-device batch, the scaling efficiency
        rates = {f"{prefix}tokens_per_sec": rate, f"{prefix}tokens_per_sec_per_device": rate / trainer.world_size}
        if flops > 0:
            tflops = flops / seconds / trainer.world_size / 1e12
            rates[f"{prefix}tflops"] = tflops
            if self.peak_tflops:
                rates[f"{prefix}mfu"] = tflops / self.peak_tflops
        return rates

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_window(pl_module)
        if self._total_seconds > 0 and trainer.logger is not None:
            metrics = self._rates(self._total_tokens, self._total_flops, self._total_seconds, trainer, "perf/train_")
            metrics["perf/train_tokens"] = float(self._total_tokens)
            metrics["perf/peak_mem_mb"] = peak_memory_mb(pl_module.device)
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    @property
    def tokens_per_sec(self) -> float:
        return self._total_tokens / self._total_seconds if self._total_seconds else float("nan")


class StepProgressBar(RichProgressBar):
    """Rich's progress bar, labelled by the run's length in optimiser steps: runs here are sized by
    ``trainer.max_steps`` (``max_epochs`` is -1), where Lightning's label reads "Epoch 0/-2".

    It shows the training loss as of the last logging step: reading it from the device waits for the GPU to finish
    the step, which keeps the host from queueing the next step ahead of it, so it is read once per logging step
    (when Lightning reads it for the logger anyway), not at every refresh."""

    LOSS = "train/loss"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._loss: float | None = None
        self._read_at = -1  # the step whose loss is shown (one read a step, whatever its micro-batches)

    def get_metrics(self, trainer, pl_module) -> dict:
        step = trainer.global_step
        if trainer.training and (self._loss is None or logging_step(trainer)) and step != self._read_at:
            loss = trainer.callback_metrics.get(self.LOSS)
            self._loss, self._read_at = (None if loss is None else float(loss)), step
        metrics = super().get_metrics(trainer, pl_module)
        return metrics if self._loss is None else {self.LOSS: self._loss, **metrics}

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the label
        steps = self.trainer.max_steps
        label = f"train ({steps:,} steps)" if steps and steps > 0 else f"Epoch {current_epoch}"
        return f"{label:{len(self.validation_description)}}"


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
