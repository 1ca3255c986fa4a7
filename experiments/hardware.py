"""Peak dense matrix throughput per device, the denominator of model-FLOPs utilisation (MFU).

Vendor datasheet figures, dense (without 2:4 sparsity), per device, by the precision the matrix products run in. A
device that is not in the table, or a figure that differs on yours (a power-capped card, another clock), is given
with ``peak_tflops=...`` on the command line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# (substring of torch.cuda.get_device_name, more specific first) -> TFLOP/s by matmul precision
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 (HBM3)
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
]

# torch.set_float32_matmul_precision's settings -> the precision float32 matrix products then run in
MATMUL_PRECISIONS = {"highest": "fp32", "high": "tf32", "medium": "bf16"}


@contextmanager
def float32_matmul_precision(setting: str) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(setting)`` for the block, the process's own setting restored after it:
    a run or a benchmark in a process that goes on (a sweep's in-process jobs, tests) leaves no trace."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def matmul_precision(precision: str | int | torch.dtype | None) -> str | None:
    """The precision matrix products take under Lightning's ``trainer.precision`` or an autocast dtype (None:
    float64, which the table does not hold)."""
    dtypes = {torch.bfloat16: "bf16", torch.float16: "16", torch.float32: "32", torch.float64: "64"}
    text = dtypes.get(precision, str(precision)) if isinstance(precision, torch.dtype) else str(precision)
    if text.startswith("bf16"):
        return "bf16"
    if text.startswith("16"):
        return "fp16"
    if text.startswith("64"):
        return None
    return MATMUL_PRECISIONS[torch.get_float32_matmul_precision()]


def peak_tflops(device: torch.device, precision: str | None) -> float | None:
    """The table's peak for this device and precision, or None (a CPU, an unknown GPU, float64)."""
    if device.type != "cuda" or precision is None:
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(precision)
    return None


def misaligned_ffn_note(ffn_width: int, matched: bool, precision: str | None) -> str | None:
    """A warning for a GPU run whose FFN width, in bf16 or fp16, is not a multiple of 8, else None.

    Why: such a row is not 16 bytes long, so cuBLAS runs the FFN's products on older kernels for 2-element
    alignment, 3x slower than at an aligned width, unless the compiler pads them, which Inductor decides by timing
    both ways as it compiles: at the Table 5 shape one H100 stepped 14-25% slower than another on the same code
    (docs/results/mfu.md, session 22). ``matched``: the width was chosen by the size budget, which
    ``model.ffn_multiple_of`` rounds."""
    if precision not in ("bf16", "fp16") or ffn_width % 8 == 0:
        return None
    fix = (
        "model.ffn_multiple_of=64 rounds the width matched to the size budget"
        if matched
        else "choose model.ffn.hidden_size (or mult) to make it one"
    )
    return (
        f"the FFN width {ffn_width} is not a multiple of 8: in {precision} its matrix products may run on slow "
        f"misaligned GPU kernels (docs/results/mfu.md); {fix}"
    )
