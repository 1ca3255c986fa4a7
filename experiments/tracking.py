"""What a run records in MLflow beyond Lightning's metrics: the resolved config as params, the Hydra config as
artifacts, the git commit, and a readable run name."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys; lists stay whole values (``[512, 2048]``), as a user would override them."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_params(cfg: DictConfig) -> dict[str, str]:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(resolved).items()}


def git_info() -> dict[str, str]:
    """Commit and dirty flag of the checkout the code runs from (empty outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(dirty)).lower()}


def run_name(mixer: str, overrides: list[str]) -> str:
    """``retnet swish_gate=false seed=1``: the mixer, then this run's overrides with their group prefixes cut."""
    shown = []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key in ("model/mixer",) or key.startswith("hydra"):
            continue
        shown.append(f"{key.split('.')[-1].split('/')[-1]}={value}")
    return " ".join([mixer, *shown])[:250]


def tracking_uri(configured: str | None) -> str:
    return configured or mlflow.get_tracking_uri()


def make_logger(cfg: DictConfig, name: str, tags: dict[str, str], run_id: str | None = None) -> MLFlowLogger:
    logger = MLFlowLogger(
        experiment_name=cfg.logger.experiment_name,
        run_name=name,
        tracking_uri=tracking_uri(cfg.logger.tracking_uri),
        tags=tags,
        log_model=bool(cfg.logger.log_checkpoint),
        run_id=run_id,
    )
    if run_id is not None:  # a resumed run is running again
        logger.experiment.update_run(run_id, status="RUNNING")
    return logger


IGNORED_IN_RUN_KEY = ("hydra.", "resume", "inject_failure", "trainer.enable_progress_bar", "logger.")


def run_key(overrides: list[str]) -> str:
    """Identity of a run for resuming: its overrides, minus those that do not change what it computes."""
    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith(IGNORED_IN_RUN_KEY))
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


@dataclass
class Resumable:
    run_id: str
    output_dir: Path
    checkpoint: Path


def find_unfinished_run(cfg: DictConfig, key: str) -> Resumable | None:
    """The newest run with the same overrides that did not finish and left a checkpoint."""
    client = mlflow.MlflowClient(tracking_uri(cfg.logger.tracking_uri))
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.run_key = '{key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    for run in runs:
        output_dir = Path(run.data.tags.get("output_dir", ""))
        checkpoint = output_dir / "checkpoints" / "last.ckpt"
        if checkpoint.is_file():
            return Resumable(run.info.run_id, output_dir, checkpoint)
    return None


def mark_failed(logger: MLFlowLogger, reason: str) -> None:
    client, run_id = logger.experiment, logger.run_id
    client.set_tag(run_id, "failure_reason", reason[:5000])
    if "Diverged" in reason:
        client.set_tag(run_id, "diverged", "true")
    client.set_terminated(run_id, status="FAILED")


def sweep_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that group a sweep's trials: its name, the row label it gives this trial, and its parent run."""
    from hydra.core.hydra_config import HydraConfig

    tags = {}
    if cfg.get("sweep_name"):
        tags["sweep"] = str(cfg.sweep_name)
    if cfg.get("variant"):
        detail = cfg.get("variant_detail")
        tags["variant"] = f"{cfg.variant} {detail}" if detail else str(cfg.variant)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode.name == "MULTIRUN":
        parent_file = Path(hydra_cfg.sweep.dir) / PARENT_RUN_FILE
        if parent_file.is_file():
            tags["mlflow.parentRunId"] = parent_file.read_text().strip()
    return tags


PARENT_RUN_FILE = "mlflow_parent_run_id"


def log_hydra_artifacts(logger: MLFlowLogger, output_dir: Path, cfg: DictConfig) -> None:
    """The composed config, Hydra's own config and the overrides, as files under ``hydra/`` in the run."""
    hydra_dir = output_dir / ".hydra"
    resolved = output_dir / "config_resolved.yaml"
    resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    client, run_id = logger.experiment, logger.run_id
    client.log_artifact(run_id, str(resolved), "hydra")
    if hydra_dir.is_dir():
        for path in sorted(hydra_dir.glob("*.yaml")):
            client.log_artifact(run_id, str(path), "hydra")


def record_failed_trial(cfg: DictConfig, overrides: list[str], reason: str) -> None:
    """A trial that failed before its run existed (a bad config in a sweep) still gets a FAILED run."""
    client = mlflow.MlflowClient(tracking_uri(cfg.logger.tracking_uri))
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.logger.experiment_name)
    tags = {
        "overrides": " ".join(overrides),
        "run_key": run_key(overrides),
        "failure_reason": reason[:5000],
        **sweep_tags(cfg),
    }
    run = client.create_run(experiment_id, run_name="failed: " + " ".join(overrides)[:200], tags=tags)
    client.set_terminated(run.info.run_id, status="FAILED")
