"""``zoo-table``: an MLflow experiment -> table.md / table.tex / table.csv and PNG plots, logged back to MLflow.

    zoo-table --experiment retnet_ablation                 # Table 6 side by side (the runs' paper_table tag)
    zoo-table --experiment table5 --metric val/ppl --metric ood/pydoc/ppl --tracking-uri sqlite:///mlflow.db
    zoo-table --experiment mqar --state-size-length 64     # accuracy against the state after 64 tokens, not 128

The outputs are also logged as artifacts of a *summary run* (tag ``summary=true``) in the same experiment, so the
table lives next to the runs it came from in the MLflow UI; summary runs are never counted as runs of the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis import downstream, plots
from analysis.paper import TABLES, PaperTable, get_table
from analysis.runs import (
    client_for,
    deduplicate,
    experiment_id,
    load_runs,
    metric_history,
    metric_names,
    state_size_lengths,
    trials,
)
from analysis.table import ResultTable, build_table

CURVE_METRICS = ("val/loss", "train/loss")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="zoo-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (a sweep's runs share one)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own default)")
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric to tabulate; repeat for more (default: val/ppl, every ood/*/ppl, every val_len*/ppl; "
        "val/acc and every slice/*/acc first where slices were logged, as MQAR's are)",
    )
    parser.add_argument("--reference", default=None, help="variant label Δ is measured against")
    parser.add_argument(
        "--paper",
        choices=["auto", *sorted(TABLES), "none"],
        default="auto",
        help="the paper's table to print beside ours (auto: from the runs' paper_table tag, which sweeps log)",
    )
    parser.add_argument(
        "--state-size-length",
        type=int,
        default=None,
        help="x of the accuracy-vs-state-size plot: model.state_size.T<N> (default: the largest most runs logged)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ./tables/<experiment>/)")
    parser.add_argument("--no-log", action="store_true", help="write files only; do not create a summary run")
    return parser.parse_args(argv)


def guess_paper(runs: pd.DataFrame) -> PaperTable | None:
    """The paper table the runs say they reproduce: the tag ``paper_table`` a sweep's YAML sets and zoo-train logs
    (the most common one, should runs disagree). Runs without it (recorded before the tag, or loose runs) get no
    paper columns unless ``--paper`` names a table."""
    if "tags.paper_table" not in runs:
        return None
    named = runs["tags.paper_table"].dropna()
    named = named[named.astype(str).str.len() > 0]
    return get_table(named.value_counts().index[0]) if len(named) else None


def write_plots(
    table: ResultTable, out: Path, tracking_uri: str | None, state_size_length: int | None = None
) -> list[Path]:
    """Every plot the runs have the records for; one they lack (no accuracy, no state size) is not drawn."""
    written = []
    run_ids = list(table.runs["run_id"])
    logged = metric_names(table.runs)
    for metric in CURVE_METRICS:
        if metric in logged:
            history = metric_history(run_ids, metric, tracking_uri)
            written.append(plots.plot_curves(table, history, metric, out / f"curves_{plots.slug(metric)}.png"))
    for metric in table.metrics:
        written.append(plots.plot_bars(table, metric, out / f"bars_{plots.slug(metric)}.png"))
    written.append(plots.plot_length(table, out / "ppl_vs_length.png"))
    if plots.ACCURACY_METRIC in logged and state_size_lengths(table.runs):
        path = out / f"state_size_{plots.slug(plots.ACCURACY_METRIC)}.png"
        written.append(plots.plot_state_size(table, plots.ACCURACY_METRIC, path, state_size_length))
    return [p for p in written if p is not None]


def log_summary(table: ResultTable, files: list[Path], tracking_uri: str | None, paper: PaperTable | None) -> str:
    """A FINISHED run tagged ``summary=true`` holding the outputs as artifacts and the table as its description."""
    client = client_for(tracking_uri)
    run = client.create_run(
        experiment_id(client, table.experiment),
        run_name="summary: table",
        tags={"summary": "true", "mlflow.note.content": table.to_markdown()},
    )
    run_id = run.info.run_id
    params = {
        "metrics": " ".join(table.metrics),
        "reference": table.reference,
        "paper": paper.name if paper else "none",
        "n_runs": str(len(table.runs)),
        "n_variants": str(len(table.rows)),
    }
    for key, value in params.items():
        client.log_param(run_id, key, value[:6000])
    for path in files:  # only this invocation's outputs, not what an earlier one left in the folder
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.experiment == downstream.EXPERIMENT:  # zoo-eval's records: the paper's Table 3 layout
        return downstream.main(args)
    try:
        frame, duplicates = deduplicate(trials(load_runs(args.experiment, args.tracking_uri)))
        if not duplicates.empty:
            print(
                f"zoo-table: warning: the store holds {len(duplicates)} more run(s) of a (config, seed) already "
                f"counted; each is counted once (the newest finished run). Left out: {' '.join(duplicates['run_id'])}",
                file=sys.stderr,
            )
        paper = guess_paper(frame) if args.paper == "auto" else get_table(args.paper)
        table = build_table(frame, args.metric, args.reference, paper, args.experiment)
        lengths = state_size_lengths(frame)
        if args.state_size_length is not None and args.state_size_length not in lengths:
            raise ValueError(f"no run logged model.state_size.T{args.state_size_length}; logged lengths: {lengths}")
    except ValueError as error:
        print(f"zoo-table: {error}", file=sys.stderr)
        return 2
    out = args.out or Path("tables") / args.experiment
    files = table.write(out) + write_plots(table, out, args.tracking_uri, args.state_size_length)
    if not args.no_log:
        run_id = log_summary(table, files, args.tracking_uri, paper)
        print(f"logged {len(files)} files to summary run {run_id}", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in files)}", file=sys.stderr)
    print(table.to_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
