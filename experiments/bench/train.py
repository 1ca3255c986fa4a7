"""Training cost (the RetNet paper's Table 4): tokens/s and peak memory of a full training step against context length.

A step is what the trainer does: forward, cross-entropy, backward, AdamW update, under bf16 autocast on a GPU
with float32 master weights. The number of tokens per step is held fixed (``batch = tokens_per_step // length``,
at least 1), so longer contexts trade batch for length as in the paper's comparison. Step time is the median of
``steps`` steps after ``warmup`` ones (the first allocates the optimizer state, so the measured peak includes it).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from arch_zoo.model import TRAINING_COMPILE_MODES, compile_model
from experiments.bench import (
    BenchSettings,
    CellRow,
    ModelSpec,
    free_memory,
    peak_mib,
    run_cell,
    smi_gpu_id,
    spec_model,
    synchronize,
)
from experiments.bench.profiling import profile_step
from experiments.bench.telemetry import sampled
from experiments.hardware import matmul_precision, peak_tflops


@dataclass
class TrainRow(CellRow):
    """One cell (model, context length; the batch follows from the tokens per step)."""

    step_ms: float | None = None  # the median of steps timed one by one, the GPU synchronised after each
    back_to_back_ms: float | None = None  # the mean of steps queued back to back, synchronised once, as a run steps
    tokens_per_s: float | None = None
    peak_mib: float | None = None
    loss: float | None = None  # the last step's, to show the step really trained (finite, near log(vocab))
    n_params: int = 0
    tflops: float | None = None  # model FLOPs (three forwards per step, arch_zoo.flops) per second
    mfu: float | None = None  # tflops as a fraction of the device's peak at the run's precision (experiments.hardware)
    busy_pct: float | None = None  # --profile on a GPU: kernel time / wall time of a profiled step
    misaligned_matmul_ms: float | None = None  # and its matrix products on misaligned operands (profiling.slow_matmuls)
    first_step_s: float | None = None  # the first step's wall time: with --compile, mostly the compile (cold start)
    sm_clock_mhz: float | None = None  # on a GPU: the mean SM clock over the timed steps (nvidia-smi's samples)
    power_w: float | None = None  # and the mean power draw, against
    power_limit_w: float | None = None  # the board's power limit


@dataclass(kw_only=True)
class TrainSettings(BenchSettings):
    """``compile``: torch.compile the loss (forward + backward), which fuses the mixers' elementwise work."""

    tokens_per_step: int = 16384
    amp: torch.dtype | None = torch.bfloat16  # None: no autocast (the CPU default)
    lr: float = 1e-4
    compile_scope: str = "model"  # model: one graph with the loss; blocks: each block in place (arch_zoo.model)
    compile_mode: str = "default"  # torch.compile's mode (arch_zoo.model.TRAINING_COMPILE_MODES)
    # model label -> retention kernel tiles pinned while it is built, compiled and timed (retention_triton's _Plan
    # fields, e.g. {"hopper": 2}): a kernel variant side by side with the default in one call
    kernel_tiles: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.compile_mode not in TRAINING_COMPILE_MODES:
            raise ValueError(
                f"compile mode {self.compile_mode!r} is not one a training step can run; choose one of "
                f"{', '.join(TRAINING_COMPILE_MODES)}"
            )


def _autocast(device: torch.device, amp: torch.dtype | None):
    """The step's autocast: ``amp``'s dtype, or none."""
    return torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)


def _step_fn(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    amp: torch.dtype | None,
    compile: bool = False,
    compile_scope: str = "model",
    compile_mode: str = "default",
) -> Callable[[], torch.Tensor]:
    loss_fn = model.loss
    if compile and compile_scope == "model":
        loss_fn = torch.compile(model.loss, mode=compile_mode)
    elif compile:
        compile_model(model, compile_scope, compile_mode)  # in place; a later cell finds its blocks compiled already

    def step() -> torch.Tensor:
        try:
            with _autocast(inputs.device, amp):
                loss = loss_fn(inputs, targets)
            loss.backward()
            optimizer.step()
        finally:  # a step that fails midway (out of memory) leaves no gradients behind for the next cell
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _measure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, row: TrainRow, settings: TrainSettings) -> None:
    device = next(model.parameters()).device
    row.status = "OOM"  # until the timed steps are through
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    tokens = torch.randint(settings.vocab_size, (row.batch, row.length + 1), device=device, generator=generator)
    step = _step_fn(
        model,
        optimizer,
        tokens[:, :-1],
        tokens[:, 1:],
        settings.amp,
        settings.compile,
        settings.compile_scope,
        settings.compile_mode,
    )
    t0 = time.perf_counter()
    step()
    synchronize(device)
    row.first_step_s = time.perf_counter() - t0
    for _ in range(settings.warmup - 1):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with sampled(smi_gpu_id(device)) as gpu:  # a GPU at its power cap runs below the clock its peak assumes
        for _ in range(settings.steps):
            t0 = time.perf_counter()
            loss = step()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    row.sm_clock_mhz, row.power_w, row.power_limit_w = gpu.sm_clock_mhz, gpu.power_w, gpu.power_limit_w
    # A training run does not wait for the GPU after each step (it reads the loss on logging steps only), so the
    # host queues the next step while this one runs; the one-by-one timing above also counts the host's time to
    # reach the next step's first kernel, once a step.
    t0 = time.perf_counter()
    for _ in range(settings.steps):
        step()
    synchronize(device)
    row.back_to_back_ms = (time.perf_counter() - t0) * 1e3 / settings.steps
    row.step_ms = statistics.median(times)
    row.tokens_per_s = row.batch * row.length / (row.step_ms / 1e3)
    row.peak_mib = peak_mib(device)
    row.loss = float(loss)
    with _autocast(device, settings.amp):  # the step's: the dtype decides which core runs, and so its FLOPs
        flops = model.flops_per_token(row.length)
    if flops is not None:
        row.tflops = 3 * flops * row.tokens_per_s / 1e12
        peak = peak_tflops(device, matmul_precision(settings.amp or torch.float32))
        row.mfu = row.tflops / peak if peak else None
    if settings.profile_dir is not None:
        path = settings.profile_dir / f"profile_{row.model}_T{row.length}.txt"
        row.busy_pct, row.misaligned_matmul_ms = profile_step(step, device, path, "one training step", row.step_ms)
    row.status = "ok"


def run_train(
    specs: list[ModelSpec],
    settings: TrainSettings,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> list[TrainRow]:
    """Every (model, length) cell; one model (float32 weights + AdamW state) on the device at a time."""
    rows = []
    for spec in specs:
        with _pinned_kernel_tiles(settings.kernel_tiles.get(spec.name)):
            rows += _train_model(spec, settings, device, log)
    return rows


def _pinned_kernel_tiles(tiles: dict[str, int] | None) -> contextlib.AbstractContextManager[None]:
    """The retention kernels' tiles pinned for one model (imported only then: the kernels need Triton)."""
    if not tiles:
        return contextlib.nullcontext()
    from arch_zoo.kernels.retention_triton import pinned_tiles

    return pinned_tiles(tiles)


def _train_model(
    spec: ModelSpec, settings: TrainSettings, device: torch.device, log: Callable[[str], None]
) -> list[TrainRow]:
    """One model's cells, one per context length."""
    rows = []
    torch.manual_seed(settings.seed)
    model = spec_model(spec, settings, device, torch.float32).train()
    n_params = model.num_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, fused=device.type == "cuda")
    for length in settings.lengths:
        row = TrainRow(spec.name, length, max(1, settings.tokens_per_step // length), n_params=n_params)
        run_cell(row, partial(_measure, model, optimizer, row, settings), device)
        rows.append(row)
        if row.status == "ok":
            log(
                f"{row.model:>14} T={row.length:<6} B={row.batch:<4} {row.step_ms:9.1f} ms/step  "
                f"{row.tokens_per_s:10.0f} tok/s  {row.tflops or 0:6.1f} TFLOP/s"
                + (f" (MFU {row.mfu:.1%})" if row.mfu is not None else "")
                + f"  loss {row.loss:.3f}"
            )
        else:
            log(f"{row.model:>14} T={row.length:<6} B={row.batch:<4} {row.status}")
    del model, optimizer
    free_memory(device)
    return rows
