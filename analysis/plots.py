"""PNG figures of a result table: learning curves per variant, a bar chart per metric, perplexity against length,
and accuracy against decoding-state size (zoology's view of a recall task: what a mixer buys per number of state).

Every figure averages only the runs the table averages (finished, finite loss); a failed or diverged run is drawn
as a thin dotted line in the curves, so a crash or a blow-up is seen where it happened rather than vanishing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.runs import state_size_lengths  # noqa: E402
from analysis.table import LENGTH_METRIC, ResultTable  # noqa: E402

DPI = 150
ACCURACY_METRIC = "val/acc"  # what the state-size plot shows by default: accuracy over every evaluated answer


def slug(metric: str) -> str:
    """``val/ppl`` -> ``val_ppl``: a metric name as a file name."""
    return re.sub(r"[^0-9A-Za-z]+", "_", metric).strip("_")


def colours(labels: list[str]) -> dict[str, object]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def plot_curves(table: ResultTable, history: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """``metric`` against step per variant: the mean over seeds with a ± std band; non-averaged runs dotted.

    ``history`` is ``analysis.runs.metric_history`` for the table's runs. Returns None when no run logged the metric.
    """
    if history.empty:
        return None
    runs = table.runs.set_index("run_id")
    history = history.assign(variant=history["run_id"].map(runs["variant"]))
    history = history.assign(ok=history["run_id"].map(runs["outcome"]).eq("ok"))
    colour = colours(table.variants)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in table.variants:
        mine = history[history["variant"] == label]
        ok = mine[mine["ok"]]
        if not ok.empty:
            wide = ok.pivot(index="step", columns="run_id", values="value").sort_index()
            mean, std = wide.mean(axis=1), wide.std(axis=1, ddof=1).fillna(0.0)
            ax.plot(mean.index, mean, color=colour[label], label=f"{label} (n={wide.shape[1]})")
            ax.fill_between(mean.index, mean - std, mean + std, color=colour[label], alpha=0.2, linewidth=0)
        for i, (run_id, curve) in enumerate(mine[~mine["ok"]].groupby("run_id")):
            outcome = runs.at[run_id, "outcome"]
            ax.plot(
                curve["step"],
                curve["value"],
                color=colour[label],
                linestyle=":",
                linewidth=1,
                label=f"{label} ({outcome})" if i == 0 else None,
            )
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{table.experiment}: {metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_bars(table: ResultTable, metric: str, path: Path) -> Path | None:
    """One bar per variant with ± std error bars; the reference's level is a dashed line.

    The axis starts near the smallest bar, not at zero: ablation effects are a few percent of the level and would
    be invisible otherwise. A variant with no averaged run gets an empty slot labelled with its status.
    """
    rows = table.rows
    means, stds = rows[f"{metric} mean"], rows[f"{metric} std"].fillna(0.0)
    if not means.notna().any():
        return None
    colour = colours(table.variants)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.5))
    x = range(len(rows))
    ax.bar(x, means.fillna(0.0), yerr=stds, capsize=4, color=[colour[v] for v in rows["variant"]])
    low = float((means - stds).min())
    high = float((means + stds).max())
    pad = 0.15 * (high - low) if high > low else 0.05 * abs(high) or 1.0
    ax.set_ylim(low - pad, high + pad)
    ref = rows.loc[rows["variant"] == table.reference, f"{metric} mean"].iloc[0]
    if math.isfinite(ref):
        ax.axhline(ref, color="grey", linestyle="--", linewidth=1, label=f"reference: {table.reference}")
        ax.legend(fontsize=8)
    for i, (mean, std, status, seeds) in enumerate(zip(means, stds, rows["status"], rows["seeds"])):
        if not math.isfinite(mean):
            ax.text(i, low, status, ha="center", va="bottom", fontsize=7, rotation=90)
        else:
            ax.text(i, mean + std, f"n={seeds}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), [v if len(v) <= 28 else v[:25] + "…" for v in rows["variant"]], rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{table.experiment}: {metric} (mean ± std over seeds; axis not from 0)")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def plot_length(table: ResultTable, path: Path) -> Path | None:
    """Perplexity against evaluation length per variant (per mixer in a mixer comparison), on a log2 axis.

    The training length (``data.block_size``) is marked, and the in-domain ``val/ppl`` stands for it when no
    ``val_len<N>`` metric was logged at that length, so extrapolation beyond the training length is read off the
    right of the line. Returns None when no run logged a ``val_len<N>/ppl`` metric.
    """
    runs = table.runs[table.runs["outcome"] == "ok"]
    lengths = {int(m[1]): c for c in runs.columns if (m := LENGTH_METRIC.match(c.removeprefix("metrics.")))}
    if not lengths:
        return None
    train_len = None
    if "params.data.block_size" in runs and runs["params.data.block_size"].nunique() == 1:
        train_len = int(runs["params.data.block_size"].iloc[0])
        if train_len not in lengths and "metrics.val/ppl" in runs:
            lengths[train_len] = "metrics.val/ppl"
    colour = colours(table.variants)
    xs = sorted(lengths)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in table.variants:
        mine = runs[runs["variant"] == label]
        if mine.empty:
            continue
        means = [mine[lengths[n]].mean() for n in xs]
        stds = [mine[lengths[n]].std(ddof=1) if len(mine) > 1 else 0.0 for n in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=colour[label], label=label)
    if train_len is not None:
        ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(n) for n in xs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    low, high = ax.get_ylim()
    if low > 0 and high / low > 10:  # a blow-up beyond the training length would flatten everything else
        ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{table.experiment}: perplexity against evaluation length")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, path)


def architecture_labels(runs: pd.DataFrame) -> pd.Series:
    """Each run's line across widths: the sweep's ``variant`` param (``RetNet``, without the width the row label
    adds), else the ``mixer`` tag, else the ``model.mixer.name`` param; the variant keeps hybrids apart."""
    labels = pd.Series(pd.NA, index=runs.index, dtype=object)
    for column in ("params.variant", "tags.mixer", "params.model.mixer.name"):
        if column in runs:
            named = runs[column].where(~runs[column].astype(str).str.strip().isin(["", "None", "nan"]))
            labels = labels.fillna(named)  # an unset config value is logged as the string "None"
    return labels.fillna("?").astype(str)


def state_size_length(runs: pd.DataFrame) -> int | None:
    """The length whose state size most runs logged, the largest of those: where the state sizes differ most."""
    lengths = state_size_lengths(runs)
    if not lengths:
        return None
    return max(lengths, key=lambda n: (runs[f"params.model.state_size.T{n}"].notna().sum(), n))


def state_size_points(table: ResultTable, metric: str, length: int) -> pd.DataFrame:
    """One point per table row: its architecture, width (``model.d_model``), decoding-state size after ``length``
    tokens, and ``metric``'s mean ± std over the row's averaged seeds; lines in table order, points by state size.

    A point is a row of the table, so the plot averages exactly what the table does; runs without the state size
    or the metric are left out.
    """
    columns = ["architecture", "variant", "width", "state_size", "mean", "std", "seeds"]
    runs = table.runs[table.runs["outcome"] == "ok"]
    size, value = f"params.model.state_size.T{length}", f"metrics.{metric}"
    if size not in runs or value not in runs:
        return pd.DataFrame(columns=columns)
    width = runs["params.model.d_model"] if "params.model.d_model" in runs else pd.Series(math.nan, index=runs.index)
    frame = pd.DataFrame(
        {
            "architecture": architecture_labels(runs),
            "variant": runs["variant"],
            "width": pd.to_numeric(width, errors="coerce"),
            "state_size": pd.to_numeric(runs[size], errors="coerce"),
            "value": pd.to_numeric(runs[value], errors="coerce"),
        }
    ).dropna(subset=["state_size", "value"])
    records = []
    for (arch, variant, state), group in frame.groupby(["architecture", "variant", "state_size"], sort=False):
        widths = group["width"].dropna().unique()
        records.append(
            {
                "architecture": arch,
                "variant": variant,
                "width": int(widths[0]) if len(widths) == 1 else math.nan,
                "state_size": int(state),
                "mean": float(group["value"].mean()),
                "std": float(group["value"].std(ddof=1)) if len(group) > 1 else math.nan,
                "seeds": len(group),
            }
        )
    points = pd.DataFrame(records, columns=columns)
    rank = {v: i for i, v in enumerate(table.variants)}
    first = points.assign(rank=points["variant"].map(rank)).groupby("architecture")["rank"].transform("min")
    order = points.assign(first=first).sort_values(["first", "architecture", "state_size"], kind="stable").index
    return points.loc[order].reset_index(drop=True)


def plot_state_size(table: ResultTable, metric: str, path: Path, length: int | None = None) -> Path | None:
    """``metric`` against decoding-state size after ``length`` tokens (default: ``state_size_length``), one line
    of points (widths) per architecture with ± std error bars, on a log axis; chance is a dashed line when logged.

    Returns None when no averaged run logged both a ``model.state_size.T<length>`` param and the metric.
    """
    runs = table.runs[table.runs["outcome"] == "ok"]
    length = length or state_size_length(runs)
    points = state_size_points(table, metric, length) if length else pd.DataFrame()
    if points.empty:
        return None
    colour = colours(list(dict.fromkeys(points["architecture"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch, line in points.groupby("architecture", sort=False):
        ax.errorbar(
            line["state_size"],
            line["mean"],
            yerr=line["std"].fillna(0.0),
            marker="o",
            capsize=3,
            color=colour[arch],
            label=arch,
        )
        for x, y, w in zip(line["state_size"], line["mean"], line["width"]):
            if math.isfinite(w):
                ax.annotate(f"d={int(w)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    # MQAR logs chance per split as baseline/chance_acc.<split>: val/acc -> val, slice/kv8-len64/acc -> slice_kv8-len64
    chance = f"metrics.baseline/chance_acc.{metric.removesuffix('/acc').replace('/', '_')}"
    if chance in runs and runs[chance].nunique() == 1:
        level = float(runs[chance].dropna().iloc[0])
        ax.axhline(level, color="grey", linestyle="--", linewidth=1, label=f"chance {level:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"decoding state after {length} tokens (numbers per sequence, model.state_size.T{length})")
    ax.set_ylabel(metric)
    ax.set_title(f"{table.experiment}: {metric} against state size (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, path)


def save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
