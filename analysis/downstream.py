"""The paper's Table 3 layout (zero- and few-shot accuracy on seven tasks) from ``zoo-eval``'s MLflow records.

    zoo-eval -m run_id=<id> +sweep=downstream          # one evaluation per shot count, into experiment "downstream"
    zoo-table --experiment downstream                  # models x shots, a column per task, and their average

A row is one trained run (the parent of the evaluation) at one shot count; where a run was evaluated more than once
at the same shot count, its newest evaluation of each task counts. Tasks beyond the paper's seven (e.g. our offline
``zoo_mc``) get columns after them and stay out of the average, which spans the paper's tasks a row has. The paper's
own rows (6.7B models, 100B tokens) are printed under ours: at the sizes this project trains, they are the direction
to compare against, not a level to reach.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pandas as pd

from analysis.runs import client_for, experiment_id, load_runs

EXPERIMENT = "downstream"
# lm-eval task -> the paper's column, in the paper's order (Winograd is WSC273; StoryCloze the 2016 test set)
PAPER_TASKS = {
    "hellaswag": "HS",
    "boolq": "BoolQ",
    "copa": "COPA",
    "piqa": "PIQA",
    "wsc273": "Winograd",
    "winogrande": "Winogrande",
    "storycloze_2016": "SC",
}
# Sun et al. 2023 (arXiv 2307.08621), Table 3, p. 8: accuracy (%) of the 6.7B models, in PAPER_TASKS' order; the
# paper does not say which of lm-eval's accuracies (acc or acc_norm) each column is. Avg is the mean of the seven
# (the paper prints 66.07, 69.51, 66.44, 69.76; tests pin the transcription against those).
PAPER_TABLE3 = {
    ("Transformer 6.7B (paper)", 0): (55.9, 62.0, 69.0, 74.6, 69.5, 56.5, 75.0),
    ("RetNet 6.7B (paper)", 0): (60.7, 62.2, 77.0, 75.4, 77.2, 58.1, 76.0),
    ("Transformer 6.7B (paper)", 4): (55.8, 58.7, 71.0, 75.0, 71.9, 57.3, 75.4),
    ("RetNet 6.7B (paper)", 4): (60.5, 60.1, 78.0, 76.0, 77.9, 59.9, 75.9),
}
METRIC = re.compile(r"^metrics\.downstream/(?P<task>[^/]+)/(?P<metric>[^/]+)$")


def downstream_records(frame: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """One row per (evaluated run, shots, task): the newest finished evaluation's ``metric``."""
    rows = []
    if frame.empty or "tags.eval" not in frame:
        return pd.DataFrame(columns=["model", "shots", "task", "value"])
    evals = frame[frame["tags.eval"].eq("true") & frame["status"].eq("FINISHED")]
    for _, run in evals.iterrows():
        parent = run.get("parent_run_id") or run["run_id"]
        name = run.get("tags.trained_run_name") or run.get("tags.mixer") or run["run_name"]
        shots = run.get("params.downstream.num_fewshot", "0")
        for column, value in run.items():
            found = METRIC.match(str(column))
            if found and found["metric"] == metric and isinstance(value, float) and not math.isnan(value):
                task = found["task"]
                rows.append({"model": f"{name} [{parent[:8]}]", "shots": int(shots), "task": task, "value": value})
    records = pd.DataFrame(rows, columns=["model", "shots", "task", "value"])
    return records.drop_duplicates(["model", "shots", "task"], keep="last")  # the frame is oldest first


def table3(records: pd.DataFrame) -> pd.DataFrame:
    """Models x shots, the paper's tasks in its order, then ``Avg`` over the paper's tasks, then any other task."""
    if records.empty:
        raise ValueError(
            "no downstream evaluations here: run zoo-eval with downstream.tasks=[...] (or +sweep=downstream) first"
        )
    wide = records.pivot_table(index=["model", "shots"], columns="task", values="value", aggfunc="last")
    paper = [t for t in PAPER_TASKS if t in wide.columns]
    others = sorted(t for t in wide.columns if t not in PAPER_TASKS)
    table = wide[paper].rename(columns=PAPER_TASKS)
    if paper:
        table["Avg"] = wide[paper].mean(axis=1)
    for task in others:
        table[task] = wide[task]
    return table.reset_index()


def paper_table3() -> pd.DataFrame:
    """The paper's four rows in :func:`table3`'s layout (fractions, like lm-eval's metrics)."""
    columns = list(PAPER_TASKS.values())
    rows = [
        {"model": model, "shots": shots, **{c: v / 100 for c, v in zip(columns, values)}, "Avg": sum(values) / 700}
        for (model, shots), values in PAPER_TABLE3.items()
    ]
    return pd.DataFrame(rows, columns=["model", "shots", *columns, "Avg"])


def _markdown_rows(table: pd.DataFrame) -> list[str]:
    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [str(row["model"]), str(row["shots"])]
        cells += ["–" if pd.isna(row[c]) else f"{100 * row[c]:.1f}" for c in columns[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(table: pd.DataFrame, metric: str) -> str:
    """Percentages with one decimal, as the paper prints them (a task not evaluated is a dash), then the paper's
    rows."""
    ours = "\n".join(_markdown_rows(table))
    paper = "\n".join(_markdown_rows(paper_table3()))
    source = "**the paper (Sun et al. 2023, Table 3: 6.7B models; accuracy, %)**"
    return f"**downstream ({metric}, %)**\n\n{ours}\n\n{source}\n\n{paper}\n"


def log_summary(text: str, files: list[Path], experiment: str, tracking_uri: str | None) -> str:
    """A FINISHED run tagged ``summary=true`` holding the files, the table as its description."""
    client = client_for(tracking_uri)
    tags = {"summary": "true", "mlflow.note.content": text}
    run_id = client.create_run(experiment_id(client, experiment), run_name="summary: table3", tags=tags).info.run_id
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def main(args: argparse.Namespace) -> int:
    """``zoo-table --experiment downstream`` (the arguments of ``analysis.cli``; ``--metric`` picks lm-eval's
    metric, e.g. ``acc_norm``)."""
    import sys

    metric = (args.metric or ["acc"])[0]
    try:
        table = table3(downstream_records(load_runs(args.experiment, args.tracking_uri), metric))
    except ValueError as error:
        print(f"zoo-table: {error}", file=sys.stderr)
        return 2
    text = to_markdown(table, metric)
    out = args.out or Path("tables") / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "table3.md", out / "table3.csv"]
    files[0].write_text(text, encoding="utf-8")
    table.to_csv(files[1], index=False)
    if not args.no_log:
        run_id = log_summary(text, files, args.experiment, args.tracking_uri)
        print(f"logged {len(files)} files to summary run {run_id}", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in files)}", file=sys.stderr)
    print(text, end="")
    return 0
