"""A Hydra callback that makes a multirun one MLflow parent run with its trials as child runs, so the MLflow UI
shows a sweep as one expandable row. The parent's id is written into the sweep directory, where every trial (in
this process or in a launcher's worker processes) finds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.tracking import PARENT_RUN_FILE, tracking_uri


class MlflowSweepParent(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.logger.enabled:
            return
        self.uri = tracking_uri(config.logger.tracking_uri)
        client = mlflow.MlflowClient(self.uri)
        name = config.logger.experiment_name
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        sweep = str(config.get("sweep_name") or "sweep")
        overrides = " ".join(config.hydra.overrides.task)
        run = client.create_run(
            experiment_id,
            run_name=f"{sweep} (sweep)",
            tags={"sweep": sweep, "sweep_parent": "true", "overrides": overrides},
        )
        self.run_id = run.info.run_id
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
