"""``zoo-merge-runs``: copy one MLflow store's runs of an experiment into another, so that trials run on separate
machines (one GPU lease per seed, a laptop and a cluster) make one table.

What a table reads travels: params, tags, run names, statuses, times and every metric's whole history; sweep
children keep their parent. Artifacts and logged models stay in the source store (their runs say where). Merging
is idempotent: each copy is tagged with the store and id where its run was first recorded, and a run the destination
already holds (as itself or as a copy) is skipped, so running the command twice, after an interrupted copy, or back
the other way never double-counts a trial. A store is known by its URI as written: give it the same way each time.
Unfinished runs are copied with their status; ``zoo-table`` keeps only finished trials.

    zoo-merge-runs sqlite:///seed2/mlflow.db sqlite:///mlflow.db --experiment table5
"""

from __future__ import annotations

import argparse
import sys

import mlflow
from mlflow.entities import Metric, Param, Run, RunTag

from experiments.store import mask_secrets, open_experiment, search_all_runs

COPIED_FROM = "arch_zoo.copied_from"  # tag: "<store> <run id>" where the run was first recorded
PARENT = "mlflow.parentRunId"
BATCH = 900  # MLflow accepts at most 1000 entries per log_batch (params: 100)


def _source_key(source_uri: str, run_id: str) -> str:
    return f"{mask_secrets(source_uri)} {run_id}"


def _origin(run: Run, store_uri: str) -> str:
    """Where a run was first recorded: a copy carries its original's key, anything else is its own. Keying copies by
    origin keeps a merge back the other way (B into A after A into B) or round a ring of stores from copying a run
    into the store that already holds it."""
    return run.data.tags.get(COPIED_FROM) or _source_key(store_uri, run.info.run_id)


def merge_runs(source_uri: str, dest_uri: str, experiment: str) -> tuple[int, int]:
    """Copy ``experiment``'s runs from ``source_uri`` into ``dest_uri``; returns (copied, already there)."""
    src = mlflow.MlflowClient(source_uri)
    exp = src.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in src.search_experiments())
        raise SystemExit(f"no experiment {experiment!r} in {mask_secrets(source_uri)}; it has: {', '.join(names)}")
    dst, dest_exp = open_experiment(dest_uri, experiment)
    runs = search_all_runs(src, [exp.experiment_id])
    done = {_origin(r, dest_uri): r.info.run_id for r in search_all_runs(dst, [dest_exp])}
    origins = {r.info.run_id: _origin(r, source_uri) for r in runs}
    copied = 0
    for run in sorted(runs, key=lambda r: PARENT in r.data.tags):  # parents first, so children can point at them
        key = origins[run.info.run_id]
        if key in done:
            continue
        tags = {k: v for k, v in run.data.tags.items() if k != COPIED_FROM}
        if PARENT in tags:  # the parent's copy (copied first), or the source id if the parent is not in the store
            parent = origins.get(tags[PARENT], _source_key(source_uri, tags[PARENT]))
            tags[PARENT] = done.get(parent, tags[PARENT])
        done[key] = _copy(src, dst, dest_exp, run, tags, key)
        copied += 1
    return copied, len(runs) - copied


def _copy(src: mlflow.MlflowClient, dst: mlflow.MlflowClient, dest_exp: str, run: Run, tags: dict, key: str) -> str:
    """One run into ``dest_exp`` with ``tags``; marked as the copy of ``key`` last, once everything else is in."""
    new = dst.create_run(dest_exp, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
    new_id = new.info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), 100):
        dst.log_batch(new_id, params=params[i : i + 100])
    metrics = [
        Metric(m.key, m.value, m.timestamp, m.step)
        for name in run.data.metrics
        for m in src.get_metric_history(run.info.run_id, name)
    ]
    for i in range(0, len(metrics), BATCH):
        dst.log_batch(new_id, metrics=metrics[i : i + BATCH])
    # tagged last: a copy interrupted before this point is not taken for a finished one (it is copied again)
    dst.log_batch(new_id, tags=[RunTag(COPIED_FROM, key)])
    dst.set_terminated(new_id, run.info.status, end_time=run.info.end_time)
    return new_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zoo-merge-runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="tracking URI to copy from (e.g. sqlite:///seed2/mlflow.db)")
    parser.add_argument("dest", help="tracking URI to copy into (created if missing)")
    parser.add_argument("--experiment", required=True, action="append", help="experiment name (repeatable)")
    args = parser.parse_args(argv)
    for name in args.experiment:
        copied, skipped = merge_runs(args.source, args.dest, name)
        print(f"{name}: copied {copied} runs into {mask_secrets(args.dest)}, {skipped} were there already")
    return 0


if __name__ == "__main__":
    sys.exit(main())
