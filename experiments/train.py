"""``zoo-train``: the Hydra entry point that builds data, model, trainer and logger from the config and trains.

Order matters for users: every config is checked (unknown mixer, bad sizes, missing files) before any data is
tokenised or any weight allocated, and a check failure is one line naming the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, OmegaConf

from arch_zoo import FFNConfig, ModelConfig, make_config
from arch_zoo.contract import ConfigError
from arch_zoo.model import COMPILE_SCOPES, compile_model
from experiments import interrupts
from experiments.callbacks import InjectFailure, Throughput
from experiments.checkpoints import AtomicCheckpointIO
from experiments.checks import check_optim, check_settings, check_tracking_uri
from experiments.config_store import register_configs
from experiments.lit_module import LanguageModelTask, OptimConfig, metric_prefix
from experiments.preflight import refuse_unknown_mixers
from experiments.store import mask_secrets
from experiments.tracking import (
    config_key,
    config_params,
    experiment_of,
    find_finished_run,
    find_unfinished_run,
    git_info,
    log_hydra_artifacts,
    make_logger,
    mark_failed,
    mark_interrupted,
    mark_sweep_interrupted,
    record_failed_trial,
    run_key,
    run_name,
    supersede_unfinished,
    sweep_tags,
    tracking_uri,
)
from sweeps.optuna_sweeper import register_with_hydra

log = logging.getLogger("arch_zoo")
# Our training order resumes from the step count (experiments/data/sampling.py), not from a loader state_dict, so
# Lightning's warning that a mid-epoch resume "can cause unreliable results" does not apply; the resume test proves it.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
register_configs()
register_with_hydra()


def model_config(cfg: DictConfig, vocab_size: int | None) -> ModelConfig:
    values = OmegaConf.to_container(cfg.model, resolve=True)
    values["ffn"] = FFNConfig(**values["ffn"])
    values["mixer"] = make_config(values["mixer"])
    if values.get("hybrid_mixer") is not None:
        values["hybrid_mixer"] = make_config(values["hybrid_mixer"])
    if values.get("vocab_size") is None:
        values["vocab_size"] = vocab_size
    return ModelConfig(**values)


def check(cfg: DictConfig) -> tuple[ModelConfig, Any, OptimConfig]:
    """Everything that can be wrong with a config, found before anything heavy is built."""
    model = model_config(cfg, vocab_size=cfg.model.vocab_size or 1)
    model.check()
    data = OmegaConf.to_object(cfg.data)
    data.check()
    optim: OptimConfig = OmegaConf.to_object(cfg.optim)
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps <= 0:
        raise ConfigError("trainer.max_steps must be a positive number of optimiser steps")
    check_settings(cfg)
    check_optim(optim, cfg.trainer.max_steps)
    if cfg.logger.enabled:
        check_tracking_uri(tracking_uri(cfg.logger.tracking_uri))
    if cfg.compile_scope not in COMPILE_SCOPES:
        raise ConfigError(f"compile_scope={cfg.compile_scope} is unknown; choose one of {', '.join(COMPILE_SCOPES)}")
    return model, data, optim


def finished_trial(cfg: DictConfig, key: str) -> dict[str, float] | None:
    """A trial whose resolved config already FINISHED in this sweep (the parent run a relaunch reuses) is not trained
    again: a relaunched sweep picks up where it stopped, and its table never sees one (config, seed) twice.
    ``resume=false`` retrains."""
    if not (cfg.logger.enabled and cfg.resume and HydraConfig.get().mode.name == "MULTIRUN"):
        return None
    parent = sweep_tags(cfg).get("mlflow.parentRunId")
    done = find_finished_run(cfg, key, parent) if parent else None
    if done is None:
        return None
    log.info("trial already finished as MLflow run %s; skipped (resume=false trains it again)", done.info.run_id)
    return dict(done.data.metrics)


def train(cfg: DictConfig) -> dict[str, float]:
    model_cfg, data_cfg, optim_cfg = check(cfg)
    identity = config_key(cfg)
    if cfg.logger.enabled:
        experiment_of(cfg)  # the store and experiment exist before any lookup or logger touches them
    if (metrics := finished_trial(cfg, identity)) is not None:
        return metrics
    L.seed_everything(cfg.seed, workers=True)
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)

    data = hydra.utils.get_class(cfg.data._target_)(data_cfg, seed=cfg.seed, total_steps=cfg.trainer.max_steps)
    data.prepare_data()
    model_cfg = dataclasses.replace(model_cfg, vocab_size=cfg.model.vocab_size or data.vocab_size)
    eval_splits = data.eval_split_names
    task = LanguageModelTask(
        model_cfg,
        optim_cfg,
        total_steps=cfg.trainer.max_steps,
        eval_splits=eval_splits,
        bytes_per_token={s: data.bytes_per_token(s) for s in eval_splits},
    )
    if cfg.compile:
        task.model = compile_model(task.model, cfg.compile_scope)
    mixer_name = model_cfg.mixer.name
    overrides = list(hydra_cfg.overrides.task)
    name = cfg.name or run_name(mixer_name, overrides)
    key = run_key(overrides)
    fresh_command = " ".join(["zoo-train", *map(shlex.quote, sys.argv[1:]), "resume=false"])
    resumed = find_unfinished_run(cfg, key, fresh_command) if cfg.logger.enabled and cfg.resume else None
    if resumed is not None:
        output_dir = resumed.output_dir
        log.info("resuming MLflow run %s from %s", resumed.run_id, resumed.checkpoint)

    on_signal = interrupts.CheckpointOnSignal(output_dir / "checkpoints" / "last.ckpt")
    callbacks: list[L.Callback] = [
        Throughput(window=cfg.trainer.log_every_n_steps),
        ModelCheckpoint(
            dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every
        ),
        on_signal,
    ]
    if cfg.inject_failure is not None:
        callbacks.append(InjectFailure(**cfg.inject_failure))
    # extra Lightning callbacks from the config (e.g. a sweeper's pruning callback): name -> {_target_: ..., ...}
    callbacks += [hydra.utils.instantiate(spec) for spec in (cfg.get("callbacks") or {}).values()]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    logger = None
    if cfg.logger.enabled:
        tags = {
            "mixer": mixer_name,
            "overrides": " ".join(overrides),
            "run_key": key,
            "config_key": identity,
            "output_dir": str(output_dir),
            "command": " ".join(sys.argv),
            **git_info(),
            **sweep_tags(cfg),
        }
        logger = make_logger(cfg, name, tags, run_id=resumed.run_id if resumed else None)
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if logger is not None and not cfg.resume:
        supersede_unfinished(cfg, key, logger.run_id)
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        logger=logger or False,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
        plugins=[AtomicCheckpointIO()],
    )

    model = task.model
    n_params = sum(p.numel() for p in model.parameters())
    baselines = data.baselines()
    summary = {
        "model.n_params": n_params,
        "model.vocab_size": model_cfg.vocab_size,  # the config's null is filled from the tokeniser
        "model.n_params_non_embedding": model.num_parameters(non_embedding=True),
        # equal size, as every mixer is matched: counted (the budget) vs not counted (embeddings, positional tables)
        **{f"model.n_params_{kind}": n for kind, n in model.size().items()},
        **data.summary(),
        **{f"model.state_size.T{n}": model.state_size(n) for n in cfg.state_size_lengths},
    }
    if logger is not None and resumed is None:
        logger.log_hyperparams({**config_params(cfg), **summary})
        logger.log_metrics({f"baseline/{k}": v for k, v in baselines.items()}, step=0)
        log_hydra_artifacts(logger, output_dir, cfg)
    log.info(
        "model: %s, %.2fM parameters; data: %s",
        mixer_name,
        n_params / 1e6,
        ", ".join(f"{k.removeprefix('data.')} {v}" for k, v in data.summary().items()),
    )

    metrics: dict[str, float] = {}
    try:
        trainer.fit(task, datamodule=data, ckpt_path=str(resumed.checkpoint) if resumed else None)
        if cfg.final_validate:
            metrics = final_validation(trainer, task, data)
    except BaseException as err:
        stop = interrupts.as_interruption(err)
        if stop is not None:
            saved = f"checkpoint of step {on_signal.saved_at} saved" if on_signal.saved_at else "no new checkpoint"
            stop = interrupts.Interrupted(stop.signum, f" at step {trainer.global_step}; {saved}")
        if logger is not None:
            if stop is not None:
                mark_interrupted(logger, f"{stop}; relaunch the same command to resume")
            elif getattr(err, "pruned", False) or type(err).__name__ == "TrialPruned":
                logger.experiment.set_tag(logger.run_id, "pruned", "true")
                logger.experiment.set_terminated(logger.run_id, status="KILLED")
            else:
                mark_failed(logger, f"{type(err).__name__}: {err}")
            err.mlflow_run_id = logger.run_id  # type: ignore[attr-defined]
        if stop is not None:
            raise stop from err
        raise
    if cfg.final_validate and logger is not None:
        logger.finalize("success")
    if trainer.is_global_zero:  # under DDP every rank runs this function; one summary is enough
        report(metrics, baselines, logger, output_dir)
    return metrics


def final_validation(trainer: L.Trainer, task: LanguageModelTask, data: L.LightningDataModule) -> dict[str, float]:
    """The final weights' validation metrics.

    Under FSDP a second loop after ``fit`` re-wraps the already sharded model and its forward fails on flattened
    weights (Lightning issue #19015), so the fit's last validation stands in: it is the final weights' when
    ``trainer.val_check_interval`` divides ``trainer.max_steps``.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        metrics: dict[str, float] = {}
        for result in trainer.validate(task, datamodule=data, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
        return metrics
    prefixes = tuple(f"{metric_prefix(split)}/" for split in task.eval_splits)
    log.warning(
        "FSDP: the reported metrics are those of the last validation during training (at step %d); set "
        "trainer.val_check_interval to a divisor of trainer.max_steps to make it the final weights'",
        trainer.global_step,
    )
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)}


def report(metrics: dict[str, float], baselines: dict[str, float], logger, output_dir: Path) -> None:
    lines = ["", "run finished"]
    for key, value in sorted(metrics.items(), key=lambda item: (not item[0].startswith("val/"), item[0])):
        if key.endswith(("/bpb", "/acc")) and not (key.endswith("/acc") and key.replace("/acc", "/bpb") in metrics):
            split = key.rsplit("/", 1)[0]
            base = baselines.get(f"unigram_bpb.{split.replace('/', '_')}")
            baseline = f"; unigram baseline {base:.3f} bits/byte" if base is not None else ""
            unit = "bits/byte" if key.endswith("/bpb") else "accuracy"
            lines.append(f"  {split}: {value:.3f} {unit} (loss {metrics[split + '/loss']:.3f}){baseline}")
    lines.append(f"  outputs and checkpoints: {output_dir}")
    if logger is not None:
        uri = mask_secrets(logger._tracking_uri)
        lines.append(f"  MLflow run {logger.run_id} in experiment {logger._experiment_name!r}, store {uri}")
        lines.append(f"  browse it: mlflow ui --backend-store-uri {uri}")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def run(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        metrics = train(cfg)
    except interrupts.Interrupted as stop:
        if multirun and cfg.logger.enabled:  # the sweep stops here, loudly; its relaunch runs the rest
            mark_sweep_interrupted(cfg, f"{stop} in trial {HydraConfig.get().job.num}")
        raise
    except Exception as err:
        if not multirun:
            if isinstance(err, ConfigError):
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            raise
        # one bad trial must not take its siblings down; it is recorded as FAILED, with its reason
        log.exception("trial failed; the sweep goes on")
        if cfg.logger.enabled and not hasattr(err, "mlflow_run_id"):
            record_failed_trial(cfg, list(HydraConfig.get().overrides.task), f"{type(err).__name__}: {err}")
        return float("nan")
    return metrics.get("val/loss")


def main() -> None:
    """``zoo-train``: Hydra's entry point, with SIGTERM/SIGINT turned into a recorded stop and exit code 143/130."""
    interrupts.install()
    refuse_unknown_mixers(sys.argv[1:], "zoo-train")  # before Hydra composes: its report lacks "did you mean"
    try:
        run()
    except interrupts.Interrupted as stop:
        print(f"error: {stop}; relaunch the same command to resume", file=sys.stderr)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
