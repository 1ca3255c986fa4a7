"""MLflow's records of an experiment as one pandas DataFrame: a row per run, its params, metrics and tags flattened.

Only MLflow's client is used, so any tracking URI works (a local sqlite file, a directory, a server) and nothing of
the training code is imported: what a run means is read from what it recorded, as a reader of the MLflow UI would.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import mlflow
import pandas as pd
from mlflow.entities import Run, ViewType

# MLflow's SQL store clamps +-inf to the largest float on the way in, so "not finite" must include what it became.
CLAMPED_INF = 1e300

# Metrics whose NaN/inf means the optimisation diverged (others, e.g. throughput, say nothing about the model).
LOSS_METRIC = re.compile(r"^(train|val|ood/[^/]+|val_len\d+)/(loss|ppl|bpb)$")

# What a run's outcome can be in a table; "ok" runs are the only ones averaged.
OUTCOMES = ("ok", "failed", "diverged", "killed", "unfinished")

# The decoding-state size a run logs for each of its ``state_size_lengths`` (numbers per sequence after n tokens).
STATE_SIZE_PARAM = re.compile(r"^params\.model\.state_size\.T(\d+)$")


def is_finite(value: float) -> bool:
    return math.isfinite(value) and abs(value) < CLAMPED_INF


def client_for(tracking_uri: str | None) -> mlflow.MlflowClient:
    """A client for ``tracking_uri``, or for MLflow's default (``MLFLOW_TRACKING_URI``, else its local default)."""
    return mlflow.MlflowClient(tracking_uri)


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments(view_type=ViewType.ALL))
        raise ValueError(f"no MLflow experiment {name!r} at {client.tracking_uri}; experiments there: {known}")
    return experiment.experiment_id


def search_all(client: mlflow.MlflowClient, experiment: str) -> list[Run]:
    """Every active run of the experiment, following MLflow's pages (a sweep can exceed one page)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def outcome(status: str, diverged: bool) -> str:
    """A diverged run is reported as diverged whatever status it ended with; RUNNING/SCHEDULED are unfinished."""
    if diverged:
        return "diverged"
    return {"FINISHED": "ok", "FAILED": "failed", "KILLED": "killed"}.get(status, "unfinished")


def seed_of(params: dict[str, str], overrides: str) -> int | None:
    """The run's seed: its resolved ``seed`` param, else a ``seed=`` override (a trial that failed early)."""
    text = params.get("seed")
    if text is None:
        found = re.search(r"(?:^|\s)\+*seed=(\S+)", overrides)
        text = found.group(1) if found else None
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def run_record(run: Run) -> dict[str, object]:
    info, data = run.info, run.data
    tags = data.tags
    non_finite = sorted(k for k, v in data.metrics.items() if LOSS_METRIC.match(k) and not is_finite(v))
    diverged = tags.get("diverged", "").lower() == "true" or bool(non_finite)
    overrides = tags.get("overrides", "")
    record: dict[str, object] = {
        "run_id": info.run_id,
        "run_name": info.run_name or tags.get("mlflow.runName", ""),
        "status": info.status,
        "start_time": pd.to_datetime(info.start_time, unit="ms") if info.start_time else pd.NaT,
        "end_time": pd.to_datetime(info.end_time, unit="ms") if info.end_time else pd.NaT,
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "seed": seed_of(data.params, overrides),
        "diverged": diverged,
        "non_finite_metrics": " ".join(non_finite),
        "outcome": outcome(info.status, diverged),
        "failure_reason": tags.get("failure_reason", ""),
    }
    record.update({f"params.{k}": v for k, v in data.params.items()})
    record.update({f"metrics.{k}": v for k, v in data.metrics.items()})
    record.update({f"tags.{k}": v for k, v in tags.items()})
    return record


def runs_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """Runs -> DataFrame, oldest first, with ``is_parent`` (a sweep's parent run) and ``is_summary`` marked."""
    frame = pd.DataFrame([run_record(r) for r in runs])
    if frame.empty:
        columns = ["run_id", "status", "outcome", "parent_run_id", "is_parent", "is_summary", "is_eval"]
        return pd.DataFrame(columns=columns)
    # an evaluation (zoo-eval, tag eval=true) is a child of the run it measured, which stays a trial
    frame["is_eval"] = frame.get("tags.eval", pd.Series(index=frame.index, dtype=object)).eq("true")
    children_of = set(frame.loc[~frame["is_eval"], "parent_run_id"].dropna())
    sweep_parent = frame.get("tags.sweep_parent", pd.Series(index=frame.index, dtype=object)).eq("true")
    frame["is_parent"] = frame["run_id"].isin(children_of) | sweep_parent
    frame["is_summary"] = frame.get("tags.summary", pd.Series(index=frame.index, dtype=object)).eq("true")
    return frame.sort_values("start_time", kind="stable").reset_index(drop=True)


def load_runs(experiment: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Every run of an MLflow experiment (parents and summaries included, marked), as a DataFrame."""
    client = client_for(tracking_uri)
    return runs_frame(search_all(client, experiment_id(client, experiment)))


def trials(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs that trained something: a sweep's parent run and our own summary runs are bookkeeping, and an
    evaluation of a trained run is not a run of the table."""
    if frame.empty:
        return frame
    kept = frame[~frame["is_parent"] & ~frame["is_summary"] & ~frame["is_eval"]].reset_index(drop=True)
    # a metric only the left-out runs logged (an evaluation at another length) is no column of the trials
    unlogged = [c for c in kept.columns if c.startswith("metrics.") and kept[c].isna().all()]
    return kept.drop(columns=unlogged)


def identity(frame: pd.DataFrame) -> pd.Series:
    """What a run computed, as its producer tagged it: ``config_key`` (the resolved config, seed included), else the
    older ``run_key`` (the overrides); NaN where a run carries neither."""
    empty = pd.Series(index=frame.index, dtype=object)
    return frame.get("tags.config_key", empty).fillna(frame.get("tags.run_key", empty))


def deduplicate(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One run per (config, seed): where a store holds several (a sweep relaunched by an older version trained a
    finished trial again), the newest finished one is kept, else the newest. Returns (kept, left out)."""
    if frame.empty:
        return frame, frame
    key = identity(frame)
    keyed = frame[key.notna()].assign(_key=key[key.notna()], _ok=lambda f: f["outcome"].eq("ok"))
    keyed = keyed.sort_values(["_ok", "start_time"], kind="stable")
    dropped = keyed[keyed.duplicated(["_key", "seed"], keep="last")].index
    kept = frame.drop(index=dropped).reset_index(drop=True)
    return kept, frame.loc[dropped].reset_index(drop=True)


def metric_names(frame: pd.DataFrame) -> list[str]:
    return sorted(c.removeprefix("metrics.") for c in frame.columns if c.startswith("metrics."))


def state_size_lengths(frame: pd.DataFrame) -> list[int]:
    """The lengths at which some run logged its decoding-state size (``model.state_size.T<n>``), ascending."""
    found = (int(m[1]) for c in frame.columns if (m := STATE_SIZE_PARAM.match(c)) and frame[c].notna().any())
    return sorted(found)


def metric_history(run_ids: Iterable[str], key: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Every logged value of one metric for the given runs: columns run_id, step, value (the last value per step).

    Lightning logs the final validation again at the last step; keeping the last value per step makes a curve a
    function of the step.
    """
    client = client_for(tracking_uri)
    rows = [
        {"run_id": run_id, "step": m.step, "timestamp": m.timestamp, "value": m.value}
        for run_id in run_ids
        for m in client.get_metric_history(run_id, key)
    ]
    if not rows:
        return pd.DataFrame(columns=["run_id", "step", "value"])
    history = pd.DataFrame(rows).sort_values(["run_id", "step", "timestamp"], kind="stable")
    history = history.drop_duplicates(["run_id", "step"], keep="last").drop(columns="timestamp")
    history["value"] = history["value"].where(history["value"].abs() < CLAMPED_INF)
    return history.reset_index(drop=True)
