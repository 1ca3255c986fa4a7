"""Runs -> the comparison table: one row per variant, mean ± std over seeds, Δ against a reference row, and the
paper's numbers beside ours with whether each effect points the paper's way.

A run that failed, diverged or has not finished is never averaged and never dropped: its variant's row says how
many of its runs did not count, and a note under the table names each one with its reason, so a table with a
missing seed cannot pass for a complete one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.paper import PaperRow, PaperTable, normalise_label

# Overrides that do not make a different variant: the seed is what a row averages over; the rest change where and
# how a run is logged, not what it computes.
NOT_A_VARIANT = ("seed", "hydra.", "logger.", "resume", "trainer.enable_progress_bar")
BASELINE = "baseline"  # the label of the runs that override nothing the others do not
# Recorded params that may differ between the runs of one row without changing what they computed: what makes no
# variant, and where, on what and how a run was launched, checkpointed or labelled; numbers it measured.
NOT_A_SETTING = (
    *NOT_A_VARIANT, "name", "callbacks.", "checkpoint_every", "compile", "final_validate", "inject_failure",
    "init_from", "state_size_lengths", "sweep_name", "variant", "paper_table", "peak_tflops", "perf.",
    "model.state_size.", "data.cache_dir", "data.num_workers", "data.tokenize_", "trainer.accelerator",
    "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps",
)  # fmt: skip
LENGTH_METRIC = re.compile(r"^val_len(\d+)/ppl$")
SLICE_ACCURACY = re.compile(r"^slice/kv(\d+)-len(\d+)/acc$")  # MQAR's accuracy on one (pairs, length) setting
NOISE_SE = 2.0  # an effect smaller than this many standard errors of the difference is marked (n.s.)


def override_tokens(overrides: str) -> list[str]:
    """A run's overrides that define its variant, in the order given."""
    kept = []
    for token in overrides.split():
        key = token.partition("=")[0].lstrip("+~")
        if key == "seed" or key.startswith(NOT_A_VARIANT):
            continue
        kept.append(token)
    return kept


def variant_labels(trials: pd.DataFrame) -> pd.Series:
    """Each run's row label: the ``variant`` tag a sweep gives it, else the overrides that set it apart.

    Overrides shared by every untagged run (the sweep's own, ``model=small``) say nothing about the row and are cut,
    so ``model/mixer=retnet model.mixer.swish_gate=false seed=1`` is labelled ``model.mixer.swish_gate=false`` and
    the runs that override nothing more than the shared ones are the ``baseline``.
    """
    tags = trials.get("tags.variant", pd.Series(index=trials.index, dtype=object))
    tagged = tags.notna() & tags.astype(str).str.strip().ne("")
    overrides = trials.get("tags.overrides", pd.Series(index=trials.index, dtype=object)).fillna("")
    tokens = {i: override_tokens(overrides[i]) for i in trials.index[~tagged]}
    common = set.intersection(*(set(t) for t in tokens.values())) if tokens else set()
    labels = tags.where(tagged, "").astype(str).str.strip()
    single_group = len({frozenset(t) for t in tokens.values()}) == 1
    for i, toks in tokens.items():
        # one group alone is named by its overrides: there is nothing for it to be the baseline of
        shown = toks if single_group else [t for t in toks if t not in common]
        labels[i] = " ".join(shown) or BASELINE
    return labels


def default_metrics(trials: pd.DataFrame) -> list[str]:
    """In-domain perplexity, every out-of-domain perplexity, then perplexity at each evaluation length; a recall
    task (per-slice accuracies logged) is judged by accuracy, so its overall and per-slice accuracies come first."""
    names = [c.removeprefix("metrics.") for c in trials.columns if c.startswith("metrics.")]
    ood = sorted(n for n in names if re.fullmatch(r"ood/[^/]+/ppl", n))
    lengths = sorted((n for n in names if LENGTH_METRIC.match(n)), key=lambda n: int(LENGTH_METRIC.match(n)[1]))
    slices = sorted((n for n in names if SLICE_ACCURACY.match(n)), key=slice_order)
    accuracy = (["val/acc"] if slices and "val/acc" in names else []) + slices
    return accuracy + (["val/ppl"] if "val/ppl" in names else []) + ood + lengths


def slice_order(metric: str) -> tuple[int, int]:
    """By length, then pairs: the order MQAR's config lists its slices in, easy to hard at each length."""
    pairs, length = SLICE_ACCURACY.match(metric).groups()
    return int(length), int(pairs)


def fmt(value: float, signed: bool = False, like: float | None = None) -> str:
    """Enough digits to see a seed-to-seed difference at the magnitude of ``like`` (default: the value itself), so
    that a mean, its std and its Δ share one precision (ppl ~ 100: 2 decimals; loss ~ 5, bpb ~ 1: 3)."""
    if value is None or not math.isfinite(value):
        return "—"
    scale = abs(like) if like is not None and math.isfinite(like) else abs(value)
    digits = 3 if scale < 10 else 2 if scale < 1000 else 1
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


@dataclass
class ResultTable:
    """The table as data (``rows``: one per variant, CSV-ready) plus what is needed to render and annotate it."""

    rows: pd.DataFrame
    runs: pd.DataFrame  # the trials, with their ``variant`` label and outcome
    metrics: list[str]
    reference: str
    paper: PaperTable | None
    experiment: str = ""

    @property
    def variants(self) -> list[str]:
        return list(self.rows["variant"])

    def paper_columns(self) -> dict[str, str]:
        """Our metric -> the paper's column, for the metrics the paper reports."""
        if self.paper is None:
            return {}
        pairs = ((m, self.paper.column_of_metric(m)) for m in self.metrics)
        return {m: c for m, c in pairs if c is not None}

    def display(self) -> pd.DataFrame:
        """The human-readable table: formatted strings, one column per shown quantity."""
        shown = pd.DataFrame({"variant": self.rows["variant"]})
        shown["seeds"] = [
            f"{r.seeds}" if r.seeds == r.runs else f"{r.seeds} of {r.runs}" for r in self.rows.itertuples()
        ]
        paper_cols = self.paper_columns()
        is_ref = self.rows["variant"].eq(self.reference)
        for m in self.metrics:
            mean, std, delta = self.rows[f"{m} mean"], self.rows[f"{m} std"], self.rows[f"{m} delta"]
            shown[m] = [
                fmt(a) if not math.isfinite(s) or not math.isfinite(a) else f"{fmt(a)} ± {fmt(s, like=a)}"
                for a, s in zip(mean, std)
            ]
            shown[f"Δ {m}"] = ["ref" if ref else fmt(d, signed=True, like=a) for d, a, ref in zip(delta, mean, is_ref)]
            if m in paper_cols:
                col = paper_cols[m]
                shown[f"paper {col}"] = [fmt(v) for v in self.rows[f"paper {col}"]]
                shown[f"paper Δ {col}"] = [
                    "ref" if ref else fmt(d, signed=True, like=v)
                    for d, v, ref in zip(self.rows[f"paper {col} delta"], self.rows[f"paper {col}"], is_ref)
                ]
                shown[f"as paper ({col})"] = [
                    direction_mark(same, noise)
                    for same, noise in zip(self.rows[f"{m} same_direction"], self.rows[f"{m} within_noise"])
                ]
        shown["status"] = self.rows["status"]
        return shown

    def notes(self) -> list[str]:
        notes = [
            f"Mean ± sample std over the seeds whose run finished with a finite loss; Δ = variant − "
            f"reference ({self.reference})."
        ]
        if self.paper is not None:
            notes.append(
                f"Paper: Sun et al. 2023 (arXiv 2307.08621), {self.paper.caption} Its scale differs from ours, so "
                f"compare the sign of Δ, not the level. ✓: our Δ has the paper's sign; ✗: the opposite; "
                f"(n.s.): |Δ| < {NOISE_SE:g} standard errors of the difference."
            )
            unmatched = [v for v, p in zip(self.rows["variant"], self.rows["paper_row"]) if not p]
            if unmatched:
                notes.append(f"No paper row for: {', '.join(unmatched)}.")
        budget = self.training_budget()
        if budget:
            notes.append(budget)
        pooled = [f"`{v}`: {p}" for v, p in zip(self.rows["variant"], self.rows["pooled_settings"]) if p]
        if pooled:
            notes.append(
                "Warning: these rows average runs whose settings differ beyond the seed, so their spread is not "
                f"seed noise alone: {'; '.join(pooled)}."
            )
        return notes

    def training_budget(self) -> str:
        """What every finished run trained on, when they agree: steps x tokens per optimiser step (the scale a
        reader compares with the paper's, e.g. its 10k steps of 0.5M tokens); empty when runs differ or did not
        record it (runs before ``train.tokens_per_step`` was logged)."""
        ok = self.runs[self.runs["outcome"] == "ok"]
        columns = ("params.trainer.max_steps", "params.train.tokens_per_step")
        if ok.empty or any(c not in ok or ok[c].isna().any() or ok[c].nunique() != 1 for c in columns):
            return ""
        steps, tokens = (int(float(ok[c].iloc[0])) for c in columns)
        return f"Every run trained {steps:,} steps of {tokens:,} tokens ({steps * tokens / 1e6:,.1f}M tokens)."

    def left_out(self) -> list[str]:
        """One line per run not averaged: its variant, seed, outcome, reason and run id (to find it in the UI)."""
        lines = []
        for r in self.runs[self.runs["outcome"] != "ok"].itertuples():
            seed = "?" if pd.isna(r.seed) else int(r.seed)
            reason = r.failure_reason or (
                f"non-finite {r.non_finite_metrics}" if r.non_finite_metrics else f"status {r.status}"
            )
            reason = " ".join(str(reason).split())[:160]
            lines.append(f"`{r.variant}`, seed {seed}: {r.outcome.upper()} — {reason} (run {r.run_id})")
        return lines

    def to_markdown(self) -> str:
        shown = self.display()
        header = "| " + " | ".join(shown.columns) + " |"
        rule = "|" + "|".join("---" if c in ("variant", "status") else "---:" for c in shown.columns) + "|"
        body = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in shown.to_numpy()]
        title = f"**{self.experiment}**: {len(self.runs)} runs, {len(self.rows)} variants" if self.experiment else ""
        notes = [line for note in self.notes() for line in (note, "")]
        left_out = self.left_out()
        if left_out:
            notes += ["Runs not averaged:", "", *(f"- {line}" for line in left_out)]
        return "\n".join(([title, ""] if title else []) + [header, rule, *body, "", *notes]).rstrip() + "\n"

    def left_out_summary(self) -> list[str]:
        n = len(self.left_out())
        return [f"{n} run{'s' if n != 1 else ''} not averaged (listed in table.md)."] if n else []

    def to_latex(self) -> str:
        shown = self.display()
        align = "".join("l" if c in ("variant", "status") else "r" for c in shown.columns)
        lines = [
            "% needs \\usepackage{booktabs,amssymb}",
            "\\begin{table}[t]",
            "\\centering\\small",
            f"\\begin{{tabular}}{{{align}}}",
            "\\toprule",
            " & ".join(latex_cell(c) for c in shown.columns) + " \\\\",
            "\\midrule",
            *(" & ".join(latex_cell(cell) for cell in row) + " \\\\" for row in shown.to_numpy()),
            "\\bottomrule",
            "\\end{tabular}",
            f"\\caption{{{latex_cell(' '.join(self.notes() + self.left_out_summary()))}}}",
            "\\end{table}",
        ]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> list[Path]:
        """table.md, table.tex and table.csv (the unformatted numbers, run ids included) under ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / "table.md", out_dir / "table.tex", out_dir / "table.csv"]
        paths[0].write_text(self.to_markdown(), encoding="utf-8")
        paths[1].write_text(self.to_latex(), encoding="utf-8")
        self.rows.to_csv(paths[2], index=False, encoding="utf-8")
        return paths


def direction_mark(same: object, noise: object) -> str:
    if same is None or pd.isna(same):
        return ""
    return ("✓" if same else "✗") + (" (n.s.)" if noise is True else "")


LATEX_ESCAPES = {c: "\\" + c for c in "&%$#_{}"} | {"~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}
# text-mode <, >, | print as other glyphs in pdflatex's default font
LATEX_ESCAPES |= {"\\": "\\textbackslash{}"} | {c: f"${c}$" for c in "<>|"}
LATEX_SYMBOLS = {"±": "$\\pm$", "Δ": "$\\Delta$", "γ": "$\\gamma$", "−": "$-$", "✓": "\\checkmark", "✗": "$\\times$"}


def latex_cell(text: str) -> str:
    """Escape LaTeX's specials, then spell the table's few non-ASCII symbols as math (pdflatex lacks them)."""
    out = "".join(LATEX_ESCAPES.get(c, c) for c in text)
    for symbol, latex in LATEX_SYMBOLS.items():
        out = out.replace(symbol, latex)
    return out.replace("—", "--")


def choose_reference(labels: list[str], reference: str | None, paper: PaperTable | None) -> str:
    """``--reference`` if given; else the row matching the paper's reference; else a "full"/baseline row; else
    the first variant run."""
    if reference is not None:
        for label in labels:
            if label == reference or normalise_label(label) == normalise_label(reference):
                return label
        raise ValueError(f"reference {reference!r} is not a variant; variants: {labels}")
    if paper is not None:
        for label in labels:
            row = paper.match(label)
            if row is not None and row.label == paper.reference:
                return label
    for label in labels:
        if label == BASELINE or normalise_label(label).startswith("full"):
            return label
    return labels[0]


def summarise(values: pd.Series) -> tuple[float, float, int]:
    values = values.dropna().astype(float)
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    std = float(values.std(ddof=1)) if n > 1 else math.nan
    return mean, std, n


def status_text(outcomes: pd.Series) -> str:
    counts = outcomes.value_counts()
    if set(counts.index) == {"ok"}:
        return "ok"
    order = ["ok", "failed", "diverged", "killed", "unfinished"]
    return ", ".join(f"{counts.get(o, 0)} {o}" for o in order if o == "ok" or counts.get(o, 0))


def pooled_settings(group: pd.DataFrame) -> str:
    """The settings in which the finished runs of one row differ (``name = a / b``; empty when they agree).

    Why: a row averages over seeds, and a sweep's rows are its ``variant`` tags, so runs of one label launched with
    other overrides (a seed run again with more steps, stores merged from two machines) would be averaged as if
    they were seeds of one setting. A setting some runs did not record (it was added later) is not compared."""
    differing = []
    for column in sorted(c for c in group.columns if c.startswith("params.")):
        name = column.removeprefix("params.")
        if name.startswith(NOT_A_SETTING):
            continue
        values = sorted(group[column].dropna().astype(str).unique())
        if len(values) > 1:
            differing.append(f"{name} = {' / '.join(values)}")
    return "; ".join(differing)


def paper_row(paper: PaperTable | None, label: str, group: pd.DataFrame) -> PaperRow | None:
    """The paper's row of a variant, from what its runs recorded (the params they share) and its label."""
    if paper is None:
        return None
    shared = {}
    for column in (c for c in group.columns if c.startswith("params.")):
        values = group[column]
        if values.notna().all() and values.astype(str).nunique() == 1:
            shared[column.removeprefix("params.")] = str(values.iloc[0])
    return paper.match_run(label, shared)


def build_table(
    trials: pd.DataFrame,
    metrics: list[str] | None = None,
    reference: str | None = None,
    paper: PaperTable | None = None,
    experiment: str = "",
) -> ResultTable:
    """Group ``trials`` (from ``analysis.runs.trials``) into variants and compute every column of the table."""
    if trials.empty:
        raise ValueError(f"experiment {experiment!r} has no training runs")
    runs = trials.copy()
    runs["variant"] = variant_labels(runs)
    metrics = list(metrics) if metrics else default_metrics(runs)
    if not metrics:
        raise ValueError("no metrics to tabulate: the runs logged none of val/ppl, ood/*/ppl, val_len*/ppl")
    logged = {c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics.")}
    for m in metrics:
        if m in logged:
            continue
        if runs["outcome"].eq("ok").any():  # a finished run would have logged it: a typo, not a failure
            raise ValueError(f"no run logged metric {m!r}; logged: {sorted(logged)}")
        runs[f"metrics.{m}"] = math.nan  # every run failed before logging it: the rows still show
    first_seen = runs.groupby("variant", sort=False)["start_time"].min()
    labels = list(first_seen.sort_values(kind="stable").index)
    reference = choose_reference(labels, reference, paper)
    paper_rows = {label: paper_row(paper, label, runs[runs["variant"] == label]) for label in labels}
    paper_rank = {label: [r.label for r in paper.rows].index(row.label) for label, row in paper_rows.items() if row}
    labels.sort(key=lambda label: (label != reference, paper_rank.get(label, len(paper_rank) + 1)))

    records = []
    for label in labels:
        group = runs[runs["variant"] == label]
        ok = group[group["outcome"] == "ok"]
        record: dict[str, object] = {
            "variant": label,
            "paper_row": paper_rows[label].label if paper_rows[label] else "",
            "runs": len(group),
            "seeds": len(ok),
            "seed_list": " ".join(str(int(s)) for s in sorted(ok["seed"].dropna())),
            **{o: int((group["outcome"] == o).sum()) for o in ("failed", "diverged", "killed", "unfinished")},
            "status": status_text(group["outcome"]),
            "pooled_settings": pooled_settings(ok),
        }
        for m in metrics:
            mean, std, _ = summarise(ok[f"metrics.{m}"])
            record[f"{m} mean"], record[f"{m} std"] = mean, std
        record["run_ids"] = " ".join(group["run_id"])
        records.append(record)
    rows = pd.DataFrame(records)

    ref = rows[rows["variant"] == reference].iloc[0]
    for m in metrics:
        rows[f"{m} delta"] = rows[f"{m} mean"] - ref[f"{m} mean"]
        # standard error of a difference of two means; undefined with fewer than two seeds on either side
        se = ((rows[f"{m} std"] ** 2 / rows["seeds"]) + ref[f"{m} std"] ** 2 / ref["seeds"]) ** 0.5
        column = paper.column_of_metric(m) if paper else None
        if column is None:
            continue
        rows[f"paper {column}"] = [paper.value(p, column) if p else math.nan for p in rows["paper_row"]]
        rows[f"paper {column} delta"] = [paper.effect(p, column) if p else math.nan for p in rows["paper_row"]]
        same, noise = [], []
        for r, delta, err in zip(rows.itertuples(), rows[f"{m} delta"], se):
            if not r.paper_row or r.variant == reference or not math.isfinite(delta):
                same.append(None)
                noise.append(None)
                continue
            same.append(math.copysign(1, delta) == paper.direction(r.paper_row, column))
            noise.append(bool(abs(delta) < NOISE_SE * err) if math.isfinite(err) else None)
        rows[f"{m} same_direction"] = pd.Series(same, dtype=object)
        rows[f"{m} within_noise"] = pd.Series(noise, dtype=object)
    order = ["variant", "paper_row", "runs", "seeds", "seed_list", "failed", "diverged", "killed", "unfinished"]
    per_metric = [c for m in metrics for c in rows.columns if c.startswith(f"{m} ")]
    paper_cols = [c for c in rows.columns if c.startswith("paper ")]
    rows = rows[order + per_metric + paper_cols + ["status", "pooled_settings", "run_ids"]]
    return ResultTable(rows, runs, metrics, reference, paper, experiment)
