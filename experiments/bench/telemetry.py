"""The GPU's SM clock and power draw while a benchmark's timed steps run, sampled by ``nvidia-smi``.

Why: MFU is a fraction of the peak at the GPU's top clock, and a GPU at its power cap runs below it. The same code
stepped 5% apart on two machines of one type (``docs/results/mfu.md``, session 20), and 2.5 ms less kernel time did
not shorten a step (session 21). Beside each row, the clock and the power say whether a difference is the code's or
the machine's. Where the tool is missing or says nothing usable, the fields stay None and the benchmark goes on.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

QUERY = "clocks.sm,power.draw,power.limit"  # fields every driver since the H100's knows
INTERVAL_MS = 50


@dataclass
class Telemetry:
    """Means over the samples taken while a block ran (None: no sample had the field)."""

    sm_clock_mhz: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    samples: int = 0


def parse_samples(lines: list[str]) -> Telemetry:
    """``nvidia-smi --query-gpu=clocks.sm,power.draw,power.limit --format=csv,noheader,nounits`` lines -> their means;
    a field it cannot read (``[N/A]``, ``[Not Supported]``, an error message) is left out of its mean."""
    columns: list[list[float]] = [[], [], []]
    rows = 0
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(columns):
            continue
        rows += 1
        for values, field in zip(columns, fields):
            with contextlib.suppress(ValueError):
                values.append(float(field))
    clock, power, limit = (statistics.fmean(v) if v else None for v in columns)
    return Telemetry(clock, power, limit, rows)


@contextlib.contextmanager
def sampled(gpu_id: str | None, interval_ms: int = INTERVAL_MS) -> Iterator[Telemetry]:
    """Sample GPU ``gpu_id`` every ``interval_ms`` while the block runs; the yielded record is filled in on exit."""
    result = Telemetry()
    tool = shutil.which("nvidia-smi")
    if gpu_id is None or tool is None:
        yield result
        return
    command = [tool, "-i", gpu_id, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", str(interval_ms)]
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        yield result
        return
    try:
        yield result
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        parsed = parse_samples(out.splitlines())
        result.sm_clock_mhz, result.power_w = parsed.sm_clock_mhz, parsed.power_w
        result.power_limit_w, result.samples = parsed.power_limit_w, parsed.samples
