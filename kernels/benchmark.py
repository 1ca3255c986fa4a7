"""Benchmark the retention core: ours vs fla vs the PyTorch reference vs causal SDPA, and the decode step.

    python -m arch_zoo.kernels.benchmark                      # the full table (CUDA), logged to MLflow
    python -m arch_zoo.kernels.benchmark --quick              # two shapes, for a smoke run
    python -m arch_zoo.kernels.benchmark --wkv --lengths 2048  # RWKV-4's WKV kernel against the chunkwise form

Each row times one method at one shape (bf16, ``--tokens`` tokens per batch, 8 heads) with
``triton.testing.do_bench`` (median over repeats, inputs rotated so the L2 cache does not flatter small shapes).
The floor of a row is ``max(flops / matmul rate, bytes / copy bandwidth)`` with both ceilings measured on the
same GPU at the start, the flops those of the chunkwise algorithm (64-token chunks) and the bytes each input read
once and each output written once; "floor %" is floor / time. Each row of ours notes the plan it ran (blocks per
sequence, dk/dv fused or split, pipelining stages, value tiles), so that a table tells its plans apart. The table
is printed, written as Markdown and CSV under ``--out`` (rewritten as each row finishes, so a run cut short keeps
what it measured), and logged to MLflow (params, one metric per row, the table as an artifact). ``--cell-timeout``
bounds each cell (first call, compile and autotuning included): fla's first backward compiles for minutes, and a
method that runs out of time is skipped at the larger shapes after it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import platform
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from arch_zoo.kernels.core import step as torch_step
from arch_zoo.kernels.reference import retention_chunkwise_reference

CHUNK = 64


@dataclass
class Row:
    """One measurement; ``ms`` is None where the method failed or does not apply (``note`` says why)."""

    bench: str
    method: str
    T: int
    B: int
    H: int
    K: int
    V: int
    ms: float | None
    tflops: float | None = None
    gbs: float | None = None
    floor_pct: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def retention_flops(B: int, T: int, H: int, K: int, V: int, backward: bool) -> float:
    """Chunkwise matmul flops: causal intra-chunk scores and values (half of a C x C block) + state read and write."""
    c = min(CHUNK, T)
    fwd = B * H * T * (c * K + c * V + 4.0 * K * V)
    return fwd * (3.0 if backward else 1.0)


def retention_bytes(B: int, T: int, H: int, K: int, V: int, backward: bool, elem: int = 2) -> float:
    """Fewest bytes: forward reads q, k, v and writes o; backward reads q, k, v, do and writes dq, dk, dv."""
    fwd = 2 * K + 2 * V
    return B * T * H * elem * (fwd + (2 * K + 2 * V + 2 * K + V if backward else 0))


def attention_flops(B: int, T: int, H: int, K: int, V: int, backward: bool) -> float:
    fwd = B * H * T * T * (K + V)  # causal: half of 2 T^2 (K + V)
    return fwd * (3.5 if backward else 1.0)  # the usual FlashAttention accounting (recomputed scores)


def measure_ceilings() -> tuple[float, float]:
    """Matmul rate (bf16, 8192^3, TFLOP/s) and copy bandwidth (1 GiB device copy, read + write, GB/s)."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    tflops = 2 * 8192**3 / ms / 1e9
    x = torch.randn(2**29 // 2, device="cuda")  # 1 GiB of float32
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    gbs = 2 * x.numel() * 4 / ms / 1e6
    return tflops, gbs


def _inputs(B: int, T: int, H: int, K: int, V: int, n: int, grad: bool) -> list[tuple[torch.Tensor, ...]]:
    """``n`` independent input sets (rotated between repeats) of q, k, v, do; q, k scaled like rotated projections."""
    sets = []
    for _ in range(n):
        q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        for x in (q, k, v):
            x.requires_grad_(grad)
        sets.append((q, k, v, do))
    return sets


class CellTimeout(Exception):
    """A cell ran past ``--cell-timeout``."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CellTimeout` in this (main) thread once ``seconds`` have passed. A compile or autotuning sweep
    is Python between its kernel builds, so it is interrupted at the next build; a running kernel finishes first."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise CellTimeout(f"ran past the {seconds:g} s cell limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _error_note(err: Exception) -> str:
    """A failed cell's note: the exception's type and the first line of its message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}" if str(err) else type(err).__name__


class RowFiles:
    """The table so far as Markdown and CSV under ``out`` (``name.md``, ``name.csv``), rewritten after every row."""

    def __init__(self, out: Path, header: str, name: str = "retention_benchmark") -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.md, self.csv, self.header = out / f"{name}.md", out / f"{name}.csv", header
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.md.write_text(self.header + markdown_table(self.rows) + "\n")
        with self.csv.open("w", newline="") as f:
            fields = [k for k in asdict(row) if k != "extra"]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: v for k, v in asdict(r).items() if k != "extra"})


def _time(fn: Callable[[tuple], object], sets: list[tuple]) -> float:
    """Median ms; gradients are reset to None between repeats so no method pays for accumulating into .grad."""
    from triton.testing import do_bench

    state = {"i": 0}

    def step() -> None:
        state["i"] = (state["i"] + 1) % len(sets)
        fn(sets[state["i"]])

    leaves = [x for s in sets for x in s[:3] if x.requires_grad]
    return do_bench(step, warmup=25, rep=100, return_mode="median", grad_to_none=leaves or None)


def parse_tiles(text: str) -> dict[str, int]:
    """``stages=2,shared_scores=0`` -> a ``TILE_OVERRIDES`` dict (tile choices of our kernels to time side by side)."""
    from arch_zoo.kernels.retention_triton import _Plan

    tiles = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in _Plan.FIELDS or name == "nb" or not value.lstrip("-").isdigit():
            choices = ", ".join(f for f in _Plan.FIELDS if f != "nb")
            raise ValueError(f"--tiles: {item!r} is not NAME=INT with NAME one of {choices}")
        tiles[name] = int(value)
    return tiles


def _ours_with(tiles: dict[str, int], lg: torch.Tensor, scale: float) -> Callable:
    def ours(q, k, v):
        from arch_zoo.kernels import retention_triton as rt

        with rt.pinned_tiles(tiles):  # the backward pass keeps the tiles its forward call chose
            return rt.retention_triton(q, k, v, lg, scale)[0]

    return ours


def plan_note(B: int, T: int, H: int, K: int, V: int, method: str) -> str:
    """What plan our kernels run a cell with (the default's, or a ``--tiles`` variant's, named in ``method``)."""
    from arch_zoo.kernels import retention_triton as rt

    text = method.partition("[")[2].rstrip("]")
    with rt.pinned_tiles(parse_tiles(text) if text else {}):
        return rt._Plan(B, T, H, K, max(V, rt.NARROWEST_VALUES), CHUNK, None).summary()


def retention_methods(H: int, T: int, K: int, variants: list[str] = ()) -> dict[str, Callable]:
    """name -> f(q, k, v) -> o for every method in the table; each is built lazily so a missing package is a note.
    ``variants``: tile choices of ours (``--tiles``), each a row of its own."""
    lg = torch.log1p(-(2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32)))).cuda()  # RetNet's per-head decays
    scale = K**-0.5

    def ours(q, k, v):
        from arch_zoo.kernels.retention_triton import retention_triton

        return retention_triton(q, k, v, lg, scale)[0]

    def fla_chunk(q, k, v):
        from fla.ops.retention import chunk_retention

        return chunk_retention(q, k, v, scale=scale)[0]

    def fla_parallel(q, k, v):
        from fla.ops.retention import parallel_retention

        return parallel_retention(q, k, v, scale=scale)[0]

    def torch_reference(q, k, v):
        return retention_chunkwise_reference(q, k, v, lg, scale, chunk_size=CHUNK)[0]

    def sdpa(q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return o.transpose(1, 2)

    methods = {
        "ours (triton)": ours,
        **{f"ours [{text}]": _ours_with(parse_tiles(text), lg, scale) for text in variants},
        "fla chunk_retention": fla_chunk,
        "fla parallel_retention": fla_parallel,
        "torch reference": torch_reference,
        "SDPA causal attention": sdpa,
    }
    return methods


def bench_retention(
    shapes: list[tuple[int, int, int, int, int]],
    ceilings: tuple[float, float],
    log,
    only: list[str] | None = None,
    variants: list[str] = (),
    sink: Callable[[Row], None] | None = None,
    cell_timeout: float | None = None,
) -> list[Row]:
    rows: list[Row] = []
    timed_out: dict[tuple[str, str], str] = {}  # (method, bench) -> the shape it ran out of time at

    def add(row: Row) -> None:
        rows.append(row)
        if sink is not None:
            sink(row)

    peak_tflops, peak_gbs = ceilings
    for B, T, H, K, V in shapes:
        for name, fn in retention_methods(H, T, K, variants).items():
            if only and not any(o in name for o in only):
                continue
            if name == "torch reference" and B * T * H * max(K, V) > 2**27:
                add(Row("fwd", name, T, B, H, K, V, None, note="skipped: too slow at this size"))
                add(Row("fwd+bwd", name, T, B, H, K, V, None, note="skipped: too slow at this size"))
                continue
            for backward in (False, True):
                bench = "fwd+bwd" if backward else "fwd"
                if (name, bench) in timed_out:
                    add(Row(bench, name, T, B, H, K, V, None, note=f"skipped: timed out at {timed_out[name, bench]}"))
                    continue
                try:
                    sets = _inputs(B, T, H, K, V, 2, backward)
                    if backward:

                        def run(s, fn=fn):
                            fn(s[0], s[1], s[2]).backward(s[3])

                    else:

                        def run(s, fn=fn):
                            with torch.no_grad():
                                fn(s[0], s[1], s[2])

                    with time_limit(cell_timeout):
                        run(sets[0])  # compile / autotune outside the timing
                        torch.cuda.synchronize()
                        ms = _time(run, sets)
                except Exception as err:  # a method that cannot run a shape is a row with a note, not a crash
                    msg = _error_note(err)
                    if isinstance(err, CellTimeout):
                        timed_out[name, bench] = f"T={T} K={K} V={V}"
                    add(Row(bench, name, T, B, H, K, V, None, note=msg))
                    log(f"  {bench:8s} {name:24s} T={T:6d} K={K} V={V}: failed ({msg})")
                    torch.cuda.empty_cache()
                    continue
                finally:
                    sets = None
                attn = name.startswith("SDPA")
                note = "attention flops" if attn else ("gamma fixed by H" if "fla" in name else "")
                if name.startswith("ours"):
                    note = plan_note(B, T, H, K, V, name)
                flops = (attention_flops if attn else retention_flops)(B, T, H, K, V, backward)
                nbytes = retention_bytes(B, T, H, K, V, backward)
                floor = max(flops / (peak_tflops * 1e9), nbytes / (peak_gbs * 1e6))
                row = Row(
                    bench,
                    name,
                    T,
                    B,
                    H,
                    K,
                    V,
                    ms,
                    tflops=flops / ms / 1e9,
                    gbs=nbytes / ms / 1e6,
                    floor_pct=100 * floor / ms,
                    note=note,
                )
                add(row)
                log(f"  {bench:8s} {name:24s} T={T:6d} K={K} V={V}: {ms:8.3f} ms  floor {row.floor_pct:5.1f}%")
                torch.cuda.empty_cache()
    return rows


def bench_decode(shapes: list[tuple[int, int, int, int]], peak_gbs: float, log) -> list[Row]:
    """One token for all heads: ours (eager and in a CUDA graph), fla fused_recurrent_retention, plain PyTorch."""
    from triton.testing import do_bench

    from arch_zoo.kernels.retention_triton import retention_step_triton

    rows = []
    for B, H, K, V in shapes:
        lg = torch.log1p(-(2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32)))).cuda()
        scale = K**-0.5
        q = torch.randn(B, 1, H, K, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, 1, H, K, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, 1, H, V, device="cuda", dtype=torch.bfloat16)
        state = torch.randn(B, H, K, V, device="cuda", dtype=torch.float32)
        nbytes = 2 * state.numel() * 4 + (q.numel() + k.numel() + 2 * v.numel()) * 2

        def ours():
            return retention_step_triton(q, k, v, state, lg, scale)

        def torch_plain():
            return torch_step(q[:, 0], k[:, 0], v[:, 0], state, lg, scale)

        def fla_recurrent():
            from fla.ops.retention import fused_recurrent_retention

            return fused_recurrent_retention(q, k, v, scale=scale, initial_state=state, output_final_state=True)

        for name, fn in (
            ("ours (triton)", ours),
            ("fla fused_recurrent_retention", fla_recurrent),
            ("torch (plain)", torch_plain),
        ):
            for graph in (False, True):
                label = name + (" + CUDA graph" if graph else "")
                try:
                    fn()
                    torch.cuda.synchronize()
                    if graph:
                        g = torch.cuda.CUDAGraph()
                        stream = torch.cuda.Stream()
                        stream.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(stream):
                            fn()
                        torch.cuda.current_stream().wait_stream(stream)
                        with torch.cuda.graph(g):
                            fn()
                        ms = do_bench(g.replay, warmup=25, rep=200, return_mode="median")
                    else:
                        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
                except Exception as err:
                    msg = _error_note(err)
                    rows.append(Row("decode", label, 1, B, H, K, V, None, note=msg))
                    log(f"  decode {label:42s} B={B} K={K} V={V}: failed ({msg})")
                    continue
                floor = nbytes / (peak_gbs * 1e6)
                rows.append(Row("decode", label, 1, B, H, K, V, ms, gbs=nbytes / ms / 1e6, floor_pct=100 * floor / ms))
                log(f"  decode {label:42s} B={B} K={K} V={V}: {ms * 1000:8.1f} us")
    return rows


def wkv_methods() -> dict[str, Callable]:
    """RWKV-4's WKV: the fused kernel, and the chunkwise PyTorch form it replaced (eager and compiled)."""
    from arch_zoo.kernels.wkv_triton import wkv_triton
    from arch_zoo.mixers.rwkv import wkv_chunkwise

    def chunkwise(w, u, k, v):
        return wkv_chunkwise(w, u, k, v, output_final_state=False)[0]

    return {  # the eager form first: the others' notes give their speed-up over it
        "torch chunkwise": chunkwise,
        "ours (triton)": lambda w, u, k, v: wkv_triton(w, u, k, v, output_final_state=False)[0],
        "torch.compile chunkwise": torch.compile(chunkwise),
    }


def bench_wkv(
    shapes: list[tuple[int, int, int]],
    peak_gbs: float,
    log,
    only: list[str] | None = None,
    sink: Callable[[Row], None] | None = None,
    cell_timeout: float | None = None,
    device: str = "cuda",
) -> list[Row]:
    """WKV at ``(B, T, C)`` (bf16 k, v; float32 decays ``-exp(linspace(-5, 3))`` as RWKV-4's init spreads them).
    It is element-wise, so the floor is bytes alone: k and v read and y written (fwd); k, v and dy read and dk,
    dv written besides (fwd+bwd). The note gives the speed-up over the eager chunkwise form at the same shape."""
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        if sink is not None:
            sink(row)

    methods = wkv_methods()  # once: the compiled form compiles at its first shape, not again at every shape
    for B, T, C in shapes:
        base: dict[str, float] = {}
        for name, fn in methods.items():
            if only and not any(o in name for o in only):
                continue
            for backward in (False, True):
                bench = "wkv fwd+bwd" if backward else "wkv fwd"
                gen = torch.Generator(device=device).manual_seed(T)
                w = -torch.exp(torch.linspace(-5, 3, C, device=device)).requires_grad_(backward)
                u = torch.full((C,), -1.2, device=device, requires_grad=backward)
                k, v, dy = (torch.randn(B, T, C, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
                k.requires_grad_(backward), v.requires_grad_(backward)

                def run(_, fn=fn, backward=backward):
                    if backward:  # gradients returned, not accumulated into .grad
                        torch.autograd.grad(fn(w, u, k, v), (w, u, k, v), dy)
                    else:
                        with torch.no_grad():
                            fn(w, u, k, v)

                try:
                    with time_limit(cell_timeout):
                        run(None)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        ms = _time(run, [()])
                except Exception as err:
                    msg = _error_note(err)
                    add(Row(bench, name, T, B, 1, C, C, None, note=msg))
                    log(f"  {bench:12s} {name:28s} T={T:6d} C={C}: failed ({msg})")
                    continue
                finally:
                    torch.cuda.empty_cache()
                nbytes = B * T * C * 2 * (8 if backward else 3)
                if name == "torch chunkwise":
                    base[bench] = ms
                note = f"{base[bench] / ms:.1f}x the eager chunkwise form" if bench in base else ""
                floor_pct = 100 * nbytes / (peak_gbs * 1e6) / ms
                row = Row(bench, name, T, B, 1, C, C, ms, gbs=nbytes / ms / 1e6, floor_pct=floor_pct, note=note)
                add(row)
                log(f"  {bench:12s} {name:28s} T={T:6d} C={C}: {ms:8.3f} ms  floor {row.floor_pct:5.1f}%")
    return rows


def _fmt(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    """Rows as a Markdown table, with each method's speed-up over fla's kernel of the same kind at the same shape."""
    ref = {}
    for r in rows:
        if r.ms is not None and r.method in ("fla chunk_retention", "fla fused_recurrent_retention"):
            ref[(r.bench, r.T, r.B, r.K, r.V)] = r.ms
    lines = [
        "| bench | method | T | B | H | K | V | ms | TFLOP/s | GB/s | floor % | vs fla | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = ref.get((r.bench, r.T, r.B, r.K, r.V))
        speedup = f"{base / r.ms:.2f}x" if base and r.ms else ""
        ms = _fmt(r.ms, 4 if r.bench == "decode" else 3)
        lines.append(
            f"| {r.bench} | {r.method} | {r.T} | {r.B} | {r.H} | {r.K} | {r.V} | {ms} | {_fmt(r.tflops, 1)} | "
            f"{_fmt(r.gbs, 0)} | {_fmt(r.floor_pct, 1)} | {speedup} | {r.note} |"
        )
    return "\n".join(lines)


def log_mlflow(rows: list[Row], params: dict, table: str, csv_path: Path, experiment: str) -> None:
    """One MLflow run: the setup as params, one metric per timed row, the table and CSV as artifacts (the run and
    the table named after the CSV: ``retention_benchmark`` or ``wkv_benchmark``)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    database = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if database and database != ":memory:" and mlflow.get_experiment_by_name(experiment) is None:
        # artifacts beside the database, not in ./mlruns of wherever this ran: the rule of the project's other
        # commands (experiments.store.artifact_location, which the model library does not import)
        folder = re.sub(r"[^\w.-]+", "_", experiment).strip("._") or "experiment"
        location = (Path(database).resolve().parent / "mlruns" / folder).as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    kind = csv_path.stem.removesuffix("_benchmark")
    with mlflow.start_run(run_name=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"):
        mlflow.log_params(params)
        for r in rows:
            if r.ms is None:
                continue
            key = (
                f"{r.bench}/{r.method}/T{r.T}_K{r.K}_V{r.V}_B{r.B}".replace(" ", "_").replace("(", "").replace(")", "")
            )
            key = "".join(c if c.isalnum() or c in "/_-." else "_" for c in key)
            mlflow.log_metric(key + "/ms", r.ms)
            if r.floor_pct is not None:
                mlflow.log_metric(key + "/floor_pct", r.floor_pct)
        mlflow.log_text(table, csv_path.with_suffix(".md").name)
        mlflow.log_artifact(str(csv_path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536, help="tokens per batch (B = tokens / T)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--head-dims", nargs="+", default=["64", "128", "256", "256x512"], help="K or KxV")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--methods", nargs="+", help="only methods whose name contains one of these (e.g. ours chunk)")
    p.add_argument(
        "--tiles",
        nargs="+",
        default=[],
        metavar="NAME=INT,...",
        help="extra rows of ours with these tile choices, e.g. stages=2,shared_scores=0 (see retention_triton)",
    )
    p.add_argument("--no-decode", action="store_true")
    p.add_argument(
        "--wkv",
        action="store_true",
        help="time RWKV-4's WKV instead (ours against the chunkwise form) at B = tokens / T and --channels",
    )
    p.add_argument("--channels", type=int, default=1024, help="WKV's channels (d_model) for --wkv")
    p.add_argument("--cell-timeout", type=float, default=300.0, help="seconds per cell, compile included (0: no limit)")
    p.add_argument("--quick", action="store_true", help="T=2048 at K=V=128 and the paper's 256x512 only")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--experiment", default="kernels-benchmark")
    p.add_argument("--out", type=Path, default=Path("outputs/kernels_benchmark"))
    args = p.parse_args(argv)
    for text in args.tiles:
        try:
            parse_tiles(text)
        except ValueError as err:
            p.error(str(err))
    if not torch.cuda.is_available():
        print("arch_zoo.kernels.benchmark needs a CUDA GPU", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    dims = []
    for d in args.head_dims:
        k, _, v = d.partition("x")
        dims.append((int(k), int(v or k)))
    lengths = args.lengths
    if args.quick:
        lengths, dims = [2048], [(128, 128), (256, 512)]
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    log(f"device: {device}")
    ceilings = measure_ceilings()
    log(f"measured ceilings: {ceilings[0]:.0f} TFLOP/s bf16 matmul, {ceilings[1]:.0f} GB/s copy")
    shapes = [(max(1, args.tokens // T), T, args.heads, K, V) for K, V in dims for T in lengths]
    header = (
        f"Measured on {device}: {ceilings[0]:.0f} TFLOP/s bf16 matmul, {ceilings[1]:.0f} GB/s copy; "
        f"torch {torch.__version__}, triton {_version('triton')}, fla {_version('fla-core')}; "
        f"{args.tokens} tokens per batch, {args.heads} heads, bf16.\n\n"
    )
    files = RowFiles(args.out, header, "wkv_benchmark" if args.wkv else "retention_benchmark")
    if args.wkv:
        wkv_shapes = [(max(1, args.tokens // T), T, args.channels) for T in lengths]
        rows = bench_wkv(wkv_shapes, ceilings[1], log, args.methods, files.add, args.cell_timeout or None)
    else:
        rows = bench_retention(shapes, ceilings, log, args.methods, args.tiles, files.add, args.cell_timeout or None)
    if not (args.no_decode or args.wkv):  # the decode step is retention's
        for row in bench_decode([(args.decode_batch, args.heads, K, V) for K, V in dims], ceilings[1], log):
            rows.append(row)
            files.add(row)
    table = markdown_table(rows)
    csv_path = files.csv
    print(header + table)
    if not args.no_mlflow:
        params = {
            "device": device,
            "tokens": args.tokens,
            "heads": args.heads,
            "dtype": "bfloat16",
            "peak_tflops": round(ceilings[0], 1),
            "peak_gbs": round(ceilings[1], 1),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "python": platform.python_version(),
        }
        log_mlflow(rows, params, header + table, csv_path, args.experiment)
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "retention_flops", "retention_bytes", "markdown_table"]
