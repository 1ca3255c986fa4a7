"""A Hydra callback that makes a multirun one MLflow parent run with its trials as child runs, so the MLflow UI
shows a sweep as one expandable row. The parent's id is written into the sweep directory, where every trial (in
this process or in a launcher's worker processes) finds it.

Relaunching the same sweep command reuses its parent run (matched by the tag ``sweep_key``, the multirun's
overrides): its finished trials are skipped (``experiments/train.py``) and the new ones join the same parent, so a
sweep stays one row however often it was interrupted. ``resume=false`` starts a new parent."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.store import mask_secrets, open_experiment, search_all_runs
from experiments.tracking import PARENT_RUN_FILE, sweep_key, tracking_uri

log = logging.getLogger("arch_zoo")


class MlflowSweepParent(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.logger.enabled:
            return
        self.uri = tracking_uri(config.logger.tracking_uri)
        client, experiment_id = open_experiment(self.uri, config.logger.experiment_name)
        sweep = str(config.get("sweep_name") or "sweep")
        key = sweep_key([*config.hydra.overrides.task, *config.hydra.overrides.hydra])
        earlier = (
            client.search_runs(
                [experiment_id],
                filter_string=f"tags.sweep_parent = 'true' and tags.sweep_key = '{key}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if config.get("resume", True)
            else []
        )
        if earlier:
            self.run_id = earlier[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            if "failure_reason" in earlier[0].data.tags:  # the interruption it records is over
                client.delete_tag(self.run_id, "failure_reason")
            log.info("sweep continues in its MLflow parent run %s; finished trials are skipped", self.run_id)
        else:
            overrides = mask_secrets(" ".join(config.hydra.overrides.task))
            tags = {"sweep": sweep, "sweep_parent": "true", "overrides": overrides, "sweep_key": key}
            run_name = parent_name(config.get("sweep_name"), list(config.hydra.overrides.task))
            self.run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(self.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        client = mlflow.MlflowClient(self.uri)
        children = search_all_runs(
            client, [client.get_run(self.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}'"
        )
        failed = sum(r.info.status != "FINISHED" for r in children)
        client.log_metric(self.run_id, "sweep/trials", len(children))
        client.log_metric(self.run_id, "sweep/failed_trials", failed)
        sweeper = config.hydra.get("sweeper") or {}
        monitor = str(sweeper.get("monitor") or "val/loss")
        best = best_trial(children, monitor, maximize=sweeper.get("direction") == "maximize")
        if best is not None:  # the parent row answers "which trial won": its name, run id and score
            client.log_metric(self.run_id, f"sweep/best_{monitor}", best.data.metrics[monitor])
            client.set_tag(self.run_id, "best_trial", best.info.run_name or best.info.run_id)
            client.set_tag(self.run_id, "best_trial_run_id", best.info.run_id)
        client.set_terminated(self.run_id, status="FINISHED")


def parent_name(sweep_name: str | None, overrides: list[str]) -> str:
    """``NAME (sweep)`` for a named sweep; otherwise what it sweeps (the overrides with several values), so that plain
    multiruns are not all called "sweep (sweep)"."""
    if sweep_name:
        return f"{sweep_name} (sweep)"
    swept = [o for o in overrides if "," in o or "range(" in o or "choice(" in o]
    return f"sweep {' '.join(swept)}"[:250] if swept else "sweep"


def best_trial(children: list, monitor: str, maximize: bool = False):
    """The finished trial with the best final ``monitor`` value, or None."""
    scored = [r for r in children if r.info.status == "FINISHED" and monitor in r.data.metrics]
    if not scored:
        return None
    pick = max if maximize else min
    return pick(scored, key=lambda r: r.data.metrics[monitor])
