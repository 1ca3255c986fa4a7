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

from experiments.store import mask_secrets, open_experiment
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
            self.run_id = client.create_run(experiment_id, run_name=f"{sweep} (sweep)", tags=tags).info.run_id
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(self.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        client = mlflow.MlflowClient(self.uri)
        children = client.search_runs(
            [client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
        )
        failed = sum(r.info.status != "FINISHED" for r in children)
        client.log_metric(self.run_id, "sweep/trials", len(children))
        client.log_metric(self.run_id, "sweep/failed_trials", failed)
        client.set_terminated(self.run_id, status="FINISHED")
