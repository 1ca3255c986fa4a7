"""Trial packing: how many small training runs one GPU should run at once.

Small models (``experiment=table5_small``: 1-3M parameters) leave most of a GPU idle: their kernels are short and the
host launches them one at a time. Running several trials side by side fills the gaps. This launches ``jobs``
identical ``zoo-train`` runs at once (each in its own folder and MLflow store, different seeds), for each ``jobs``
in the list, and reports aggregate training tokens per second (the sum of the runs' ``perf/train_tokens_per_sec``),
the steady rate (the sum of each run's median ``perf/tokens_per_sec`` window after its first, which holds the warm-up
and, with ``compile=true``, the compile), the wall-clock rate including start-up, and the ratio of each to one run
alone, measured in the same call::

    python -m experiments.bench.packing --jobs 1,2,4,8 -- experiment=table5_small trainer=gpu trainer.max_steps=400

Overrides after ``--`` go to every run. The result is printed and written to ``<out>/packing.{md,json}``, each row as
soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlflow


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_group(jobs: int, overrides: list[str], folder: Path, timeout: float) -> dict[str, float | int | str]:
    """``jobs`` concurrent training runs; their summed training rate and the group's wall-clock rate."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = []
    start = time.perf_counter()
    for i in range(jobs):
        run_dir = folder / f"run{i}"
        args = [
            sys.executable,
            "-m",
            "experiments.train",
            *overrides,
            f"seed={i}",
            f"hydra.run.dir={run_dir}",
            f"logger.tracking_uri=sqlite:///{folder}/mlflow{i}.db",
            "resume=false",
        ]
        log = open(folder / f"run{i}.log", "w")  # noqa: SIM115 - closed below, after the process ends
        procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    failed = 0
    for proc, log in procs:
        try:
            failed += proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start))) != 0
        except subprocess.TimeoutExpired:
            proc.kill()
            failed += 1
        log.close()
    wall = time.perf_counter() - start
    rates, steady, tokens = [], [], 0.0
    for i in range(jobs):
        client = mlflow.MlflowClient(f"sqlite:///{folder}/mlflow{i}.db")
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id]):
                metrics = run.data.metrics
                if "perf/train_tokens_per_sec" in metrics:
                    rates.append(metrics["perf/train_tokens_per_sec"])
                    tokens += metrics.get("perf/train_tokens", 0.0)
                    steady.append(steady_rate(client.get_metric_history(run.info.run_id, "perf/tokens_per_sec")))
    return {
        "jobs": jobs,
        "finished": len(rates),
        "failed": failed,
        "train_tokens_per_s": sum(rates),
        "per_run_tokens_per_s": sum(rates) / len(rates) if rates else float("nan"),
        "steady_tokens_per_s": sum(steady) if steady else float("nan"),  # NaN where a run had one window or none
        "wall_s": wall,
        "wall_tokens_per_s": tokens / wall,
    }


def steady_rate(history: list) -> float:
    """The median of a run's ``perf/tokens_per_sec`` windows after the first (NaN with fewer than two): the first
    window holds the warm-up, and a compiled run's compile, which the whole-fit rate averages in."""
    values = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return statistics.median(values) if values else float("nan")


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| concurrent runs | finished | training tokens/s (sum) | vs 1 | per run | steady tokens/s (sum) | vs 1 "
        "| wall-clock tokens/s | vs 1 | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['jobs']} | {r['finished']}/{r['jobs']} | {r['train_tokens_per_s']:,.0f} | "
            f"{r['train_tokens_per_s'] / base['train_tokens_per_s']:.2f}x | {r['per_run_tokens_per_s']:,.0f} | "
            f"{r['steady_tokens_per_s']:,.0f} | {r['steady_tokens_per_s'] / base['steady_tokens_per_s']:.2f}x | "
            f"{r['wall_tokens_per_s']:,.0f} | {r['wall_tokens_per_s'] / base['wall_tokens_per_s']:.2f}x | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=_ints, default=[1, 2, 4, 8], help="concurrent runs per group, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/packing"))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a group may take")
    args = parser.parse_args(argv[:split])
    overrides = argv[split + 1 :]
    rows = []
    for jobs in args.jobs:
        rows.append(run_group(jobs, overrides, args.out / f"jobs{jobs}", args.timeout))
        print(table(rows).splitlines()[-1], flush=True)
        (args.out / "packing.json").write_text(json.dumps({"overrides": overrides, "rows": rows}, indent=2))
        (args.out / "packing.md").write_text(f"overrides: `{' '.join(overrides)}`\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
