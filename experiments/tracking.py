"""What a run records in MLflow beyond Lightning's metrics: the resolved config as params, the Hydra config as
artifacts, the git commit, and a readable run name."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from arch_zoo.errors import ConfigError
from arch_zoo.registry import mixer_origin
from experiments.checkpoints import previous_of, usable_checkpoint
from experiments.store import artifact_location, mask_secrets, open_experiment, search_all_runs

log = logging.getLogger("arch_zoo")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys; lists stay whole values (``[512, 2048]``), as a user would override them."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def param_text(value: Any) -> str:
    """A param's text as the config spells it: booleans ``true``/``false`` (YAML's and the override grammar's), so
    an MLflow filter ``params.x = 'false'`` finds them; Python's ``False`` would match nothing a user types."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as MLflow params, credentials in store URLs masked."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {k: mask_secrets(param_text(v))[:MAX_PARAM_LENGTH] for k, v in flatten(resolved).items()}


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


def run_name(mixer: str, overrides: list[str], swept: set[str] | None = None) -> str:
    """``retnet swish_gate=false seed=1``: the mixer (a sweep's row label), then this run's overrides with their group
    prefixes cut; in a sweep only those its trials differ in (``swept``), not the settings they all share."""
    shown = []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key in ("model/mixer",) or key.startswith("hydra") or (swept is not None and key not in swept):
            continue
        shown.append(f"{key.split('.')[-1].split('/')[-1]}={value}")
    return mask_secrets(" ".join([mixer, *shown]))[:250]


SWEEP_SYNTAX = (",", "range(", "choice(", "interval(", "glob(")


def swept_keys() -> set[str] | None:
    """The keys a multirun varies (overrides with several values, and its sweeper's ``params``), read from the
    ``multirun.yaml`` the sweeper writes into the sweep folder; None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    path = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if hydra_cfg.mode is None or hydra_cfg.mode.name != "MULTIRUN" or not path.is_file():
        return None
    sweep = OmegaConf.load(path).hydra
    keys = {str(k).lstrip("+~") for k in (sweep.sweeper.get("params") or {})}
    for item in sweep.overrides.task:
        key, _, value = str(item).partition("=")
        if any(mark in value for mark in SWEEP_SYNTAX):
            keys.add(key.lstrip("+~"))
    return keys


def tracking_uri(configured: str | None) -> str:
    return configured or mlflow.get_tracking_uri()


def experiment_of(cfg: DictConfig) -> tuple[mlflow.MlflowClient, str]:
    """The configured store and experiment, created if missing (safely when many runs start at once)."""
    return open_experiment(tracking_uri(cfg.logger.tracking_uri), cfg.logger.experiment_name)


def make_logger(cfg: DictConfig, name: str, tags: dict[str, str], run_id: str | None = None) -> MLFlowLogger:
    uri = tracking_uri(cfg.logger.tracking_uri)
    logger = MLFlowLogger(
        experiment_name=cfg.logger.experiment_name,
        run_name=mask_secrets(name),
        tracking_uri=uri,
        artifact_location=artifact_location(uri, cfg.logger.experiment_name),  # if the logger makes the experiment
        tags={k: mask_secrets(v) for k, v in tags.items()},
        log_model=bool(cfg.logger.log_checkpoint),
        run_id=run_id,
    )
    if run_id is not None:  # a resumed run is running again
        logger.experiment.update_run(run_id, status="RUNNING")
    return logger


SHOWN = ("trainer.enable_progress_bar", "trainer.enable_model_summary")  # what a run prints, not what it computes
IGNORED_IN_RUN_KEY = ("hydra.", "resume", "inject_failure", *SHOWN, "logger.")
# What a trial computes does not depend on these: how it is shown, logged or labelled by a sweeper. (An injected
# failure is part of a trial: a sweep over failures has as many trials as failures.)
IGNORED_IN_CONFIG_KEY = ("resume", "logger", "name", "callbacks", *SHOWN)
# Settings added after runs were first keyed, each with the value at which a run computes what runs recorded before
# it computed: at that value a setting stays out of the key, so a sweep relaunched after an upgrade still finds its
# finished trials, and a table over older and newer runs counts each (config, seed) once. A new setting goes here
# with its neutral value (tests/test_tracking_keys.py pins keys recorded before these existed).
KEY_NEUTRAL: dict[str, object] = {
    "float32_matmul_precision": "highest",
    "tokens_per_step": None,
    "optim.schedule": "cosine",
    "model.mixer.half_core": False,
    "compile_mode": "default",
    "model.mixer.fused_projections": False,
    "model.ffn_multiple_of": 1,
}
NEUTRAL_PARAMS = {k: param_text(v) for k, v in KEY_NEUTRAL.items()}  # the same, as a run's params spell them


def run_key(overrides: list[str]) -> str:
    """Identity of a run for resuming: its overrides, minus those that do not change what it computes."""
    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith(IGNORED_IN_RUN_KEY))
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def config_key(cfg: DictConfig) -> str:
    """Identity of what a run computes: its resolved config (seed included), whatever the position of the trial in a
    sweep or the overrides that produced it; a relaunched sweep matches its finished trials by it."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    kept = {
        k: v
        for k, v in flatten(resolved).items()
        if not k.startswith(IGNORED_IN_CONFIG_KEY) and not (k in KEY_NEUTRAL and KEY_NEUTRAL[k] == v)
    }
    return hashlib.sha256(repr(sorted(kept.items())).encode()).hexdigest()[:16]


def sweep_key(overrides: list[str]) -> str:
    """Identity of a sweep: its multirun overrides (``seed=0,1,2``) and its sweeper's (``hydra.sweeper.*``), so the
    same command finds its parent run; where it writes and how it launches do not count."""
    kept = [o for o in overrides if o.lstrip("+~").startswith(("hydra.sweeper", "hydra/sweeper"))]
    return run_key(overrides) + hashlib.sha256("\n".join(sorted(kept)).encode()).hexdigest()[:8]


def find_finished_run(cfg: DictConfig, key: str, parent_run_id: str) -> mlflow.entities.Run | None:
    """The newest FINISHED trial of the sweep ``parent_run_id`` whose resolved config is ``key``."""
    client, experiment_id = experiment_of(cfg)
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.config_key = '{key}' and tags.mlflow.parentRunId = '{parent_run_id}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def resumed_settings(params: dict[str, str]) -> dict[str, str]:
    """The settings a resumed run must share with the run it continues, from its params as :func:`config_params`
    gives them: what a run computes (not how it is shown, logged or named, nor an injected failure, which the
    relaunch of a killed run drops), a setting at its neutral value left out as if it did not exist."""
    ignored = (*IGNORED_IN_CONFIG_KEY, *IGNORED_IN_RUN_KEY)
    return {k: v for k, v in params.items() if not k.startswith(ignored) and NEUTRAL_PARAMS.get(k) != v}


def changed_settings(recorded: dict[str, str], now: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Settings whose value differs between a recorded run's params and this run's, as (then, now). A setting that one
    side lacks counts only where it has a neutral value (a run recorded before it existed computed that value);
    otherwise it was added or removed without one and cannot be compared, and params a run logs beyond its config
    (sizes, the data's hash once prepared) are absent from a config not yet run."""
    then, current = resumed_settings(recorded), resumed_settings(now)
    changed = {}
    for key in sorted(then.keys() | current.keys()):
        if key in then and key in current:
            if then[key] != current[key]:
                changed[key] = (then[key], current[key])
        elif key in NEUTRAL_PARAMS:
            changed[key] = (then.get(key, NEUTRAL_PARAMS[key]), current.get(key, NEUTRAL_PARAMS[key]))
    return changed


@dataclass
class Resumable:
    run_id: str
    output_dir: Path
    checkpoint: Path


def find_unfinished_run(
    cfg: DictConfig, key: str, fresh_command: str, params: dict[str, str] | None = None
) -> Resumable | None:
    """The newest run with the same overrides that did not finish, was not superseded by a fresh start, and left a
    checkpoint; the newest intact one of its checkpoints (``experiments/checkpoints.py``).

    Raises ConfigError, naming ``fresh_command``, when every checkpoint of that run is damaged, when the command now
    resolves to other ``params`` than the run recorded (a default changed between the stop and the relaunch: its
    checkpoint may not even fit the new model, and resuming would mix two configurations in one run), or when the run's
    recorded output directory lies outside ``resume_root`` (anyone who can write tags on a shared tracking server
    could otherwise choose where a relaunch reads and writes)."""
    client, experiment_id = experiment_of(cfg)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.run_key = '{key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )
    root = Path(cfg.get("resume_root") or Path.cwd()).resolve()
    for run in runs:
        if "superseded_by" in run.data.tags:
            continue
        output_dir = Path(run.data.tags.get("output_dir", ""))
        newest = output_dir / "checkpoints" / "last.ckpt"
        if not (newest.is_file() or previous_of(newest).is_file()):
            continue
        run_id = run.info.run_id
        if not output_dir.resolve().is_relative_to(root):
            raise ConfigError(
                f"MLflow run {run_id} records its outputs in {output_dir}, outside {root}; it is not resumed. "
                f"Set resume_root=DIR to trust checkpoints under DIR, or start afresh: {fresh_command}"
            )
        changed = changed_settings(run.data.params, params) if params is not None else {}
        if changed:
            said = "; ".join(f"{key} {then} then, {now} now" for key, (then, now) in changed.items())
            raise ConfigError(
                f"MLflow run {run_id} of this command stopped before it finished, but the command now resolves to "
                f"other settings ({said}: a default or the data changed since it started), so its checkpoint is not "
                f"resumed under them; it stays in {output_dir / 'checkpoints'}. Start afresh with: {fresh_command}"
            )
        checkpoint, problems = usable_checkpoint(newest)
        for line in problems:
            log.warning(line)
        if checkpoint is None:
            raise ConfigError(
                f"cannot resume MLflow run {run_id}: {'; '.join(problems)}. Start afresh with: {fresh_command}"
            )
        if problems:
            log.warning("resuming from the previous checkpoint, %s", checkpoint)
        return Resumable(run_id, output_dir, checkpoint)
    return None


def supersede_unfinished(cfg: DictConfig, key: str, new_run_id: str) -> None:
    """After an explicit fresh start (``resume=false``), the unfinished runs of the same overrides are never resumed:
    tagged ``superseded_by``, and those left RUNNING by a crash are closed as KILLED."""
    client, experiment_id = experiment_of(cfg)
    for run in search_all_runs(client, [experiment_id], f"tags.run_key = '{key}' and attributes.status != 'FINISHED'"):
        run_id = run.info.run_id
        if run_id == new_run_id or "superseded_by" in run.data.tags:
            continue
        client.set_tag(run_id, "superseded_by", new_run_id)
        if run.info.status == "RUNNING":
            client.set_tag(run_id, "failure_reason", f"superseded by a fresh start (resume=false): run {new_run_id}")
            client.set_terminated(run_id, status="KILLED")


def mark_failed(logger: MLFlowLogger, reason: str) -> None:
    client, run_id = logger.experiment, logger.run_id
    client.set_tag(run_id, "failure_reason", mask_secrets(reason)[:5000])
    if "Diverged" in reason:
        client.set_tag(run_id, "diverged", "true")
    client.set_terminated(run_id, status="FAILED")


def mark_interrupted(logger: MLFlowLogger, reason: str) -> None:
    """A run stopped by a signal: KILLED (not FAILED: nothing is wrong with it), the signal in its reason."""
    client, run_id = logger.experiment, logger.run_id
    client.set_tag(run_id, "failure_reason", mask_secrets(reason)[:5000])
    client.set_terminated(run_id, status="KILLED")


def mark_sweep_interrupted(cfg: DictConfig, reason: str) -> None:
    """The parent run of a sweep stopped by a signal: KILLED with the reason; relaunching the sweep reuses it."""
    from hydra.core.hydra_config import HydraConfig

    parent_file = Path(HydraConfig.get().sweep.dir) / PARENT_RUN_FILE
    if not parent_file.is_file():
        return
    client = mlflow.MlflowClient(tracking_uri(cfg.logger.tracking_uri))
    run_id = parent_file.read_text().strip()
    client.set_tag(run_id, "failure_reason", f"{reason}; relaunch the same command to run the remaining trials")
    client.set_terminated(run_id, status="KILLED")


def sweep_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags that group a sweep's trials: its name, the paper table it reproduces, the row label it gives this trial,
    and its parent run."""
    from hydra.core.hydra_config import HydraConfig

    tags = {}
    if cfg.get("sweep_name"):
        tags["sweep"] = str(cfg.sweep_name)
    if cfg.get("paper_table"):
        tags["paper_table"] = str(cfg.paper_table)
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
    resolved.write_text(mask_secrets(OmegaConf.to_yaml(cfg, resolve=True)))
    client, run_id = logger.experiment, logger.run_id
    client.log_artifact(run_id, str(resolved), "hydra")
    if hydra_dir.is_dir():
        with tempfile.TemporaryDirectory() as masked:  # the copies on the server hold no credentials
            for path in sorted(hydra_dir.glob("*.yaml")):
                copy = Path(masked) / path.name
                copy.write_text(mask_secrets(path.read_text()))
                client.log_artifact(run_id, str(copy), "hydra")


def mixer_origins(cfg: DictConfig) -> dict[str, str]:
    """Where the run's mixers come from (``model.mixer.origin.distribution`` / ``.version`` / ``.entry_point``; the
    same under ``model.hybrid_mixer``): a table row then says which release of a plugin produced it."""
    params = {}
    for key in ("mixer", "hybrid_mixer"):
        spec = cfg.model.get(key)
        name = spec if isinstance(spec, str) else (spec or {}).get("name")
        if name:
            params.update({f"model.{key}.origin.{k}": v for k, v in mixer_origin(name).items()})
    return params


def log_environment(logger: MLFlowLogger, output_dir: Path) -> None:
    """The installed packages (``name==version``, sorted) and the interpreter, as ``environment/packages.txt``: what
    a run needs to be made again, beside the git commit."""
    packages = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions() if d.metadata["Name"]},
        key=str.lower,
    )
    path = output_dir / "packages.txt"
    path.write_text(f"# python {platform.python_version()} on {platform.platform()}\n" + "\n".join(packages) + "\n")
    logger.experiment.log_artifact(logger.run_id, str(path), "environment")


def record_failed_trial(cfg: DictConfig, overrides: list[str], reason: str) -> None:
    """A trial that failed before its run existed (a bad config in a sweep) still gets a FAILED run."""
    client, experiment_id = experiment_of(cfg)
    tags = {
        "overrides": mask_secrets(" ".join(overrides)),
        "run_key": run_key(overrides),
        "failure_reason": mask_secrets(reason)[:5000],
        **sweep_tags(cfg),
    }
    label = cfg.get("variant") or (cfg.model.mixer.get("name") if cfg.get("model") else None) or "run"
    name = "failed: " + run_name(str(label), overrides, swept_keys())
    run = client.create_run(experiment_id, run_name=name[:250], tags=tags)
    client.set_terminated(run.info.run_id, status="FAILED")
