"""Benchmark rows -> a Markdown table, Figure-6-style PNGs, CSV/JSON, and an MLflow run holding all of them.

Every table starts with the machine and the settings, because a cost number means nothing without them. With a
reference model, a second table gives each other model's cost relative to it cell by cell (the paper's "8.4x
faster, 70% less memory" are such ratios). In MLflow each number is a metric ``MODEL/B<batch>/<name>`` (decode)
or ``MODEL/<name>`` (train) whose *step is the context length*, so the UI draws it against length directly.

The end of a measuring command (table files, metrics from rows, the MLflow run, what is printed where) is shared
with ``experiments.state_precision``, the other producer that measures outside a training run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.store import open_experiment  # noqa: E402

DPI = 150
EXPERIMENT = "bench"

# (field, header, format) of each kind's table
COLUMNS = {
    "decode": [
        ("model", "model", "{}"),
        ("length", "length", "{}"),
        ("batch", "batch", "{}"),
        ("prefill_ms", "prefill (ms)", "{:.1f}"),
        ("latency_ms", "latency (ms/token)", "{:.3f}"),
        ("tokens_per_s", "throughput (tokens/s)", "{:,.0f}"),
        ("peak_mib", "decode peak (MiB)", "{:,.0f}"),
        ("prefill_peak_mib", "prefill peak (MiB)", "{:,.0f}"),
        ("state_mib", "state (MiB)", "{:,.1f}"),
        ("graph", "CUDA graph", "{}"),
        ("busy_pct", "GPU busy (%)", "{:.0f}"),
        ("shared_gpu", "other GPU processes", "{}"),
        ("status", "status", "{}"),
    ],
    "train": [
        ("model", "model", "{}"),
        ("length", "length", "{}"),
        ("batch", "batch", "{}"),
        ("step_ms", "step (ms)", "{:.1f}"),
        ("back_to_back_ms", "step, back to back (ms)", "{:.1f}"),
        ("tokens_per_s", "throughput (tokens/s)", "{:,.0f}"),
        ("tflops", "model TFLOP/s", "{:.1f}"),
        ("mfu", "MFU (%)", "{:.1%}"),
        ("peak_mib", "peak memory (MiB)", "{:,.0f}"),
        ("loss", "loss", "{:.3f}"),
        ("first_step_s", "first step (s)", "{:.1f}"),
        ("busy_pct", "GPU busy (%)", "{:.0f}"),
        ("misaligned_matmul_ms", "misaligned matmul (ms)", "{:.1f}"),
        ("sm_clock_mhz", "SM clock (MHz)", "{:,.0f}"),
        ("power_w", "power (W)", "{:,.0f}"),
        ("power_limit_w", "power limit (W)", "{:,.0f}"),
        ("shared_gpu", "other GPU processes", "{}"),
        ("status", "status", "{}"),
    ],
}
# shown only when some row has a value (--profile on a GPU; a GPU of known peak; nvidia-smi's samples on a GPU)
OPTIONAL = {"busy_pct", "misaligned_matmul_ms", "mfu", "sm_clock_mhz", "power_w", "power_limit_w"}
SHOWN_IF_POSITIVE = {"shared_gpu"}  # shown only when some row has a count above zero (a GPU shared with others)
METRICS = {
    "decode": ("prefill_ms", "latency_ms", "tokens_per_s", "peak_mib", "prefill_peak_mib", "state_mib", "busy_pct"),
    "train": (
        "step_ms",
        "back_to_back_ms",
        "tokens_per_s",
        "tflops",
        "mfu",
        "peak_mib",
        "loss",
        "first_step_s",
        "busy_pct",
        "misaligned_matmul_ms",
        "sm_clock_mhz",
        "power_w",
        "power_limit_w",
    ),
}


def format_cell(value: Any, fmt: str) -> str:
    """A Markdown table cell: a dash where a number is missing (None or NaN), and no ``|`` to split the row."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value).replace("|", "/")


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok"]


def ratio_table(kind: str, rows: list[dict[str, Any]], reference: str) -> str:
    """Each model against ``reference`` in every cell where both ran: speed as a multiple, memory as a share."""
    key = ("length", "batch") if kind == "decode" else ("length",)
    ref = {tuple(r[k] for k in key): r for r in _ok(rows) if r["model"] == reference}
    body = []
    for r in _ok(rows):
        other = ref.get(tuple(r[k] for k in key))
        if r["model"] == reference or other is None:
            continue
        cells = [r["model"], *(str(r[k]) for k in key), f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x"]
        if kind == "decode":
            cells.append(f"{r['latency_ms'] / other['latency_ms']:.2f}x")
        mem = r["peak_mib"] is not None and other["peak_mib"] is not None
        cells.append(f"{100 * r['peak_mib'] / other['peak_mib']:.0f}%" if mem else "–")
        body.append(cells)
    if not body:
        return ""
    header = ["model", *key, "throughput", *(["latency"] if kind == "decode" else []), "peak memory"]
    return f"Relative to {reference} (same cell):\n\n" + markdown(header, body)


def _shown(field: str, rows: list[dict[str, Any]]) -> bool:
    """Whether a column is shown: an optional one needs a value in some row, a count a positive one."""
    if field in OPTIONAL:
        return any(r.get(field) is not None for r in rows)
    if field in SHOWN_IF_POSITIVE:
        return any(r.get(field) for r in rows)
    return True


def to_markdown(kind: str, rows: list[dict[str, Any]], meta: dict[str, Any], reference: str | None = None) -> str:
    columns = [c for c in COLUMNS[kind] if _shown(c[0], rows)]
    body = [[format_cell(r[field], fmt) for field, _, fmt in columns] for r in rows]
    params = ", ".join(f"{name} {n / 1e6:,.1f}M" for name, n in meta.get("n_params", {}).items())
    text = f"**{kind}** on {meta['device']}; {meta['summary']}\n\n"
    if params:
        text += f"parameters: {params}\n\n"
    text += markdown([header for _, header, _ in columns], body)
    shared = [r for r in rows if r.get("shared_gpu")]
    if shared:
        text += (
            f"\n**Warning:** {len(shared)} of {len(rows)} cells ran while other processes held this GPU (column "
            '"other GPU processes"): their timings include that sharing. Rerun them on an idle GPU.\n'
        )
    if reference:
        ratios = ratio_table(kind, rows, reference)
        text += "\n" + ratios if ratios else f"\n(no cell where both {reference} and another model ran)\n"
    return text


def _colours(models: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(models)}


MARKERS = "osD^v<>ph*"
STYLES = ("-", "--", ":", "-.")


def _memory_field(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """GPU peak memory where it was measured; on the CPU the decode state's size, labelled as such."""
    if any(r.get("peak_mib") is not None for r in rows):
        return "peak_mib", "peak GPU memory (GiB)"
    return "state_mib", "decoding state (GiB; no peak on the CPU)"


def _panel_lines(ax, rows: list[dict[str, Any]], x: str, series: str, y: str, colours: dict[str, Any]) -> None:
    frame = pd.DataFrame(_ok(rows))
    if frame.empty:
        return
    for i, (value, group) in enumerate(sorted(frame.groupby(series), key=lambda kv: kv[0])):
        for model, line in group.groupby("model"):
            line = line.sort_values(x)
            scale = 1 / 1024 if y in ("peak_mib", "state_mib") else 1.0
            ax.plot(
                line[x],
                line[y] * scale,
                color=colours[model],
                marker=MARKERS[i % len(MARKERS)],
                linestyle=STYLES[i % len(STYLES)],
                label=f"{model}, {series} {value}",
            )


def _failed_marks(ax, rows: list[dict[str, Any]], x: str, colours: dict[str, Any]) -> None:
    """Cells that did not run (OOM) as crosses on the axis floor, so a missing point is seen, not guessed."""
    for r in rows:
        if r["status"] != "ok":
            ax.plot(r[x], 0, marker="x", color=colours[r["model"]], linestyle="none", clip_on=False)


def plot_decode(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> list[Path]:
    """Figure 6: memory, throughput and latency against length (a line per model and batch), and against batch."""
    colours = _colours(list(dict.fromkeys(r["model"] for r in rows)))
    memory, memory_label = _memory_field(rows)
    panels = [(memory, memory_label), ("tokens_per_s", "decode throughput (tokens/s)"), ("latency_ms", "ms/token")]
    written = []
    for x, series, name in (("length", "batch", "decode_vs_length.png"), ("batch", "length", "decode_vs_batch.png")):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        for ax, (y, label) in zip(axes, panels):
            _panel_lines(ax, rows, x, series, y, colours)
            _failed_marks(ax, rows, x, colours)
            _log2_axis(ax, sorted({r[x] for r in rows}))
            ax.set_xlabel("context length" if x == "length" else "batch size")
            ax.set_ylabel(label)
            if y == "tokens_per_s":
                ax.set_yscale("log")
            ax.set_ylim(bottom=0 if y != "tokens_per_s" else None)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"decoding cost on {meta['device']} ({meta['summary']}); x: OOM", fontsize=9)
        written.append(_save(fig, out / name))
    return written


def plot_train(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> list[Path]:
    colours = _colours(list(dict.fromkeys(r["model"] for r in rows)))
    frame = pd.DataFrame(_ok(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = [("tokens_per_s", "training throughput (tokens/s)"), ("peak_mib", "peak GPU memory (GiB)")]
    for ax, (y, label) in zip(axes, panels):
        if not frame.empty and frame[y].notna().any():
            for model, line in frame.groupby("model"):
                line = line.sort_values("length")
                scale = 1 / 1024 if y == "peak_mib" else 1.0
                ax.plot(line["length"], line[y] * scale, marker="o", color=colours[model], label=model)
        else:
            ax.text(0.5, 0.5, "not measured on this device", ha="center", transform=ax.transAxes)
        _failed_marks(ax, rows, "length", colours)
        _log2_axis(ax, sorted({r["length"] for r in rows}))
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"training cost on {meta['device']} ({meta['summary']}); x: OOM", fontsize=9)
    return [_save(fig, out / "train.png")]


def _log2_axis(ax, ticks: list[int]) -> None:
    """Lengths and batches double: a log2 axis with the measured values as plain-number ticks."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_outputs(
    kind: str, rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, reference: str | None = None
) -> tuple[str, list[Path]]:
    """``<kind>.md``, ``<kind>.csv``, ``<kind>.json`` (rows + settings) and the PNGs under ``out``."""
    text = to_markdown(kind, rows, meta, reference)
    files = [*write_table(out, kind, text, rows), out / f"{kind}.json"]
    files[2].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    files += plot_decode(rows, meta, out) if kind == "decode" else plot_train(rows, meta, out)
    return text, files


def log_run(
    kind: str,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    files: list[Path],
    table: str,
    tracking_uri: str | None,
    experiment: str = EXPERIMENT,
) -> str:
    """One FINISHED run in ``experiment``: the settings as params, every number as a metric (step = length), the
    files as artifacts and the table as the run's description."""
    models = ",".join(dict.fromkeys(r["model"] for r in rows))
    prefix = (lambda r: f"{r['model']}/B{r['batch']}") if kind == "decode" else (lambda r: r["model"])
    metrics = row_metrics(_ok(rows), METRICS[kind], prefix, lambda r: int(r["length"]))
    run_name = f"{kind}: {models} on {meta['device']}"
    return record_measurement(tracking_uri, experiment, run_name, table, meta, metrics, files, {"bench": kind})


# ----------------------------------------------------------------------------------------------------------------
# What every measuring command outside a training run shares (zoo-bench, experiments.state_precision)
# ----------------------------------------------------------------------------------------------------------------


def log(line: str) -> None:
    """A progress line on stderr, flushed at once: stdout holds only the table, for a pipe or a file."""
    print(line, file=sys.stderr, flush=True)


def write_table(out: Path, name: str, text: str, rows: list[dict[str, Any]]) -> list[Path]:
    """``<name>.md`` holding the table ``text`` and ``<name>.csv`` holding every field of ``rows``, under ``out``:
    the Markdown for reading, the CSV for every number the table leaves out."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.md", out / f"{name}.csv"]
    files[0].write_text(text)
    pd.DataFrame(rows).to_csv(files[1], index=False)
    return files


def row_metrics(
    rows: list[dict[str, Any]],
    names: Sequence[str],
    key: Callable[[dict[str, Any]], str],
    step: Callable[[dict[str, Any]], int],
) -> list[mlflow.entities.Metric]:
    """Every number of ``rows`` among ``names`` as a metric ``<key(row)>/<name>`` at ``step(row)``, under one
    timestamp (a measurement is one moment; the step carries the axis, e.g. the context length)."""
    now = int(time.time() * 1000)
    return [
        mlflow.entities.Metric(f"{key(r)}/{name}", float(r[name]), now, step(r))
        for r in rows
        for name in names
        if r.get(name) is not None
    ]


def record_measurement(
    tracking_uri: str | None,
    experiment: str,
    run_name: str,
    table: str,
    meta: dict[str, Any],
    metrics: list[mlflow.entities.Metric],
    files: list[Path],
    tags: dict[str, str] | None = None,
) -> str:
    """A measurement as one FINISHED run (:func:`record_run`): its settings (``meta["params"]``) and machine as
    params, the machine and the table (the run's description) as tags beside ``tags``. Returns the run id."""
    params = {**meta.get("params", {}), "device_name": meta["device"]}
    tags = {**(tags or {}), "device": meta["device"], "mlflow.note.content": table}
    return record_run(tracking_uri, experiment, run_name, tags, params, metrics, files)


def finish(table: str, files: list[Path], record: Callable[[], str] | None, experiment: str) -> int:
    """The end of every measuring command: the MLflow run (``record``; None with --no-log), where the files went
    (stderr), then the table (stdout). Returns the exit status."""
    if record is not None:
        log(f"logged {len(files)} files to MLflow run {record()} (experiment {experiment})")
    log(f"wrote {', '.join(str(p) for p in files)}")
    print(table, end="")
    return 0


def record_run(
    tracking_uri: str | None,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
    metrics: list[mlflow.entities.Metric],
    files: list[Path],
) -> str:
    """Write one measurement as a FINISHED MLflow run in one go, for the commands that measure outside a training
    run: params (values cut to MLflow's 6,000 characters), metrics in MLflow's batches of at most 1,000, the files as
    artifacts. The experiment is made if new, as every run's is (``experiments.store.open_experiment``). Returns the
    run id."""
    client, experiment_id = open_experiment(tracking_uri or mlflow.get_tracking_uri(), experiment)
    run_id = client.create_run(experiment_id, run_name=run_name[:250], tags=tags).info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED")
    return run_id
