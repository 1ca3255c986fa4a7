"""What a run records in MLflow beyond Lightning's metrics: the resolved config as params, the Hydra config as
artifacts, the git commit, and a readable run name."""

from __future__ import annotations

import subprocess
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


def make_logger(cfg: DictConfig, name: str, tags: dict[str, str]) -> MLFlowLogger:
    return MLFlowLogger(
        experiment_name=cfg.logger.experiment_name,
        run_name=name,
        tracking_uri=tracking_uri(cfg.logger.tracking_uri),
        tags=tags,
        log_model=bool(cfg.logger.log_checkpoint),
    )


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
