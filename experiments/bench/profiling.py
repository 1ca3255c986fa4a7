"""Where one step of a benchmark cell spent its time: the torch profiler's view, summarised for ``--profile``."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from experiments.bench import synchronize

# kernel name fragments -> what they are, for the summary of a profiled step (first match wins)
RETENTION_KERNELS = ("_chunk_output", "_chunk_scores", "_chunk_dkv", "_state_pass", "_state_combine", "_decode_step")
KERNEL_KINDS = (
    ("retention kernels", tuple(f"{name}_kernel" for name in RETENTION_KERNELS)),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul")),
    ("optimizer", ("adam", "multi_tensor_apply")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in lowered for p in parts)), "other")


def kernels(events) -> list:
    """The GPU kernels among a profiler's events. Only kernels count: a GPU-side user annotation
    (``Optimizer.step#AdamW.step``, an autograd node's range) spans kernels already counted, and counting it too put
    the optimizer in twice (a "busy" above 100%)."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def kernel_ms(event) -> float:
    return (event.time_range.end - event.time_range.start) / 1e3


def kernel_time_by_kind(events) -> tuple[dict[str, float], int]:
    """GPU kernel milliseconds by kind, and the launch count, from a profiler's events (kernels only)."""
    by_kind: dict[str, float] = {}
    launched = kernels(events)
    for event in launched:
        kind = kernel_kind(event.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + kernel_ms(event)
    return by_kind, len(launched)


# cuBLAS's CUTLASS kernels name the widest vector access their operands allow (align8 = 16 bytes of bf16), and the
# architecture they were written for (cutlass_80_: Ampere); older kernel families are named after theirs
_ALIGN = re.compile(r"_align([124])(?!\d)")
_ARCH = re.compile(r"(?:cutlass_|(?<![a-z])sm)(\d{2,3})_")
_ARCH_FAMILIES = {"volta": 70, "turing": 75, "ampere": 80}


def kernel_arch(name: str) -> int | None:
    """The compute capability (x10) a matrix-product kernel was built for, where its name says it."""
    found = _ARCH.search(name)
    if found:
        return int(found.group(1))
    lowered = name.lower()
    return next((arch for family, arch in _ARCH_FAMILIES.items() if f"{family}_" in lowered), None)


def slow_matmuls(events, device_arch: int | None) -> dict[str, tuple[float, int]]:
    """Matrix-product kernels that a profile should call out, as (ms, launches): ``misaligned``, those whose
    operands allowed only 2- to 8-byte accesses (a bf16 dim that is not a multiple of 8), and ``older_arch``,
    those built for an older GPU than ``device_arch`` (compute capability x10).

    Why: at the Table 5 shape a matched FFN width of 2046 put three FFN products a layer on Ampere kernels at
    230-260 TFLOP/s, against 690-810 for the same products at 2048 (docs/results/mfu.md, session 22). Inductor pads
    such products or not by timing both ways as it compiles, so the same code stepped 14-25% slower on one H100 than
    on another; a profile that says so saves reading its kernel names by hand."""
    products = [e for e in kernels(events) if kernel_kind(e.name) == "matmul"]

    def older(name: str) -> bool:
        arch = kernel_arch(name)
        return device_arch is not None and arch is not None and arch < device_arch

    found = {
        "misaligned": [e for e in products if _ALIGN.search(e.name)],
        "older_arch": [e for e in products if older(e.name)],
    }
    return {key: (sum(kernel_ms(e) for e in hits), len(hits)) for key, hits in found.items()}


def slow_matmul_lines(slow: dict[str, tuple[float, int]], device_arch: int | None) -> list[str]:
    lines = []
    ms, launches = slow["misaligned"]
    if launches:
        lines.append(
            f"matmul on misaligned operands (align1-4 kernels): {ms:.1f} ms in {launches} launches; a bf16 or fp16 "
            "dim that is not a multiple of 8 (an FFN width matched to a budget: model.ffn_multiple_of=64)"
        )
    ms, launches = slow["older_arch"]
    if launches:
        lines.append(
            f"matmul on kernels for an older GPU than this one (sm{device_arch}): {ms:.1f} ms in {launches} launches"
        )
    return lines


def kernel_idle(events, big_us: float = 20.0) -> dict[str, float]:
    """How long the GPU sat idle between the first and the last kernel of a profiled step, from the kernels' time
    ranges (overlapping kernels, as on several streams, merge): ``span_ms``, ``idle_ms``, ``gaps``, and ``big_ms`` /
    ``big_gaps`` for gaps over ``big_us`` microseconds.

    Why: "busy" (kernel time over the step's time) cannot tell a GPU waiting on the host (launches, a host sync, a
    graph break) from a step whose kernels simply take that long; idle time inside the span can, and a few large
    gaps point at a host sync where many small ones point at launch overhead."""
    ranges = sorted((e.time_range.start, e.time_range.end) for e in kernels(events))
    out = {"span_ms": 0.0, "idle_ms": 0.0, "gaps": 0, "big_ms": 0.0, "big_gaps": 0}
    if not ranges:
        return out
    end = ranges[0][1]
    for start, stop in ranges[1:]:
        if start > end:
            gap = start - end
            out["idle_ms"] += gap / 1e3
            out["gaps"] += 1
            if gap > big_us:
                out["big_ms"] += gap / 1e3
                out["big_gaps"] += 1
        end = max(end, stop)
    out["span_ms"] = (end - ranges[0][0]) / 1e3
    return out


class ProfileSummary(NamedTuple):
    """What a profiled step adds to its row: on a GPU, the kernels' share of the step (percent) and the time of its
    matrix products on misaligned operands (ms, 0 when there are none); None on the CPU."""

    busy_pct: float | None = None
    misaligned_matmul_ms: float | None = None


def profile_step(
    step: Callable[[], object], device: torch.device, path: Path, what: str, step_ms: float | None = None
) -> ProfileSummary:
    """Run one more step under the torch profiler and write where its time went to ``path``.

    On a GPU the summary says how much of the step's time the GPU spent in kernels, by kind, and how long it sat
    idle between them: a step whose kernels add up to much less than its time, with that time in gaps, is bound by
    the host (launches, graph breaks, syncs), not by any kernel. The busy fraction is taken of ``step_ms``, the
    step's time measured without the profiler (recording every host-side op slows a host-bound step down, which would
    hide what it measures), else of the profiled wall time; the idle time, measured under the profiler, is an upper
    bound for the same reason. Matrix products on misaligned operands or older-GPU kernels get a line of their own
    (``slow_matmuls``). The CPU has no separate kernel time: its summary is empty."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    lines = [f"{what} under the profiler: {wall_ms:.1f} ms wall"]
    summary = ProfileSummary()
    if cuda:
        by_kind, launches = kernel_time_by_kind(prof.events())
        kernel_ms = sum(by_kind.values())
        basis, basis_ms = ("the step without the profiler", step_ms) if step_ms else ("the profiled wall", wall_ms)
        busy = 100 * kernel_ms / basis_ms
        lines.append(
            f"GPU kernels: {launches} launches, {kernel_ms:.1f} ms, {busy:.0f}% of {basis} ({basis_ms:.1f} ms)"
        )
        lines += [f"  {kind:<18} {ms:9.1f} ms" for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])]
        idle = kernel_idle(prof.events())
        lines.append(
            f"GPU idle between its first and last kernel: {idle['idle_ms']:.1f} ms of {idle['span_ms']:.1f} ms, in "
            f"{idle['gaps']} gaps ({idle['big_ms']:.1f} ms in {idle['big_gaps']} gaps over 20 us: host syncs or "
            "graph breaks; many small ones are launch overhead)"
        )
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
        slow = slow_matmuls(prof.events(), arch)
        lines += slow_matmul_lines(slow, arch)
        summary = ProfileSummary(busy, slow["misaligned"][0])
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines += ["", events.table(sort_by=sort_by, row_limit=50, max_name_column_width=100)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return summary
