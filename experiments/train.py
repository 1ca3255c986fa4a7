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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from arch_zoo import ModelConfig
from arch_zoo.contract import MixerConfig
from arch_zoo.errors import ConfigError
from arch_zoo.model import COMPILE_MODES, COMPILE_SCOPES, CUDA_GRAPH_MODES, compile_model
from experiments import interrupts
from experiments.callbacks import InjectFailure
from experiments.checkpoints import AtomicCheckpointIO
from experiments.checks import (
    check_optim,
    check_settings,
    check_tokens_per_step,
    check_tracking_uri,
    micro_batches_per_step,
    windowed,
)
from experiments.compose import model_config
from experiments.config_store import register_configs
from experiments.hardware import MATMUL_PRECISIONS, float32_matmul_precision
from experiments.lit_module import LanguageModelTask, OptimConfig, validation_metrics
from experiments.preflight import refuse_unknown_mixers
from experiments.store import mask_secrets
from experiments.tracking import (
    Resumable,
    config_key,
    config_params,
    experiment_of,
    find_finished_run,
    find_unfinished_run,
    git_info,
    log_environment,
    log_hydra_artifacts,
    make_logger,
    mark_failed,
    mark_interrupted,
    mark_sweep_interrupted,
    mixer_origins,
    param_text,
    record_failed_trial,
    run_key,
    run_name,
    supersede_unfinished,
    sweep_tags,
    swept_keys,
    tracking_uri,
)
from experiments.trained_run import init_weights_from

log = logging.getLogger("arch_zoo")
# Our training order resumes from the step count (experiments/data/sampling.py), not from a loader state_dict, so
# Lightning's warning that a mid-epoch resume "can cause unreliable results" does not apply; the resume test proves it.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
register_configs()


class Settings(NamedTuple):
    """The typed parts of a composed config, each turned into its dataclass once (``OmegaConf.to_object``) and
    checked once, before anything heavy is built; the run is built from these, not from the tree again."""

    model: ModelConfig
    data: Any  # the data module's own config dataclass (DataConfig, MQARConfig, ...)
    optim: OptimConfig
    layer_mixers: tuple[MixerConfig, MixerConfig | None]  # what model.check() returned: the model builds from these


def check(cfg: DictConfig) -> Settings:
    """Everything that can be wrong with a config, found before anything heavy is built."""
    model = model_config(cfg, vocab_size=1)  # vocab_size 1 stands in for the data's until the data is prepared
    settings = Settings(model, OmegaConf.to_object(cfg.data), OmegaConf.to_object(cfg.optim), model.check())
    settings.data.check()
    if cfg.trainer.max_steps is None or cfg.trainer.max_steps <= 0:
        raise ConfigError("trainer.max_steps must be a positive number of optimiser steps")
    check_settings(cfg)
    check_tokens_per_step(cfg)
    check_optim(settings.optim, cfg.trainer.max_steps)
    if cfg.logger.enabled:
        check_tracking_uri(tracking_uri(cfg.logger.tracking_uri))
    if cfg.compile_scope not in COMPILE_SCOPES:
        raise ConfigError(f"compile_scope={cfg.compile_scope} is unknown; choose one of {', '.join(COMPILE_SCOPES)}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode={cfg.compile_mode} is unknown; choose one of {', '.join(COMPILE_MODES)}")
    if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES:
        # a captured graph's outputs live in its own memory pool, and a training step keeps tensors past the next
        # step's graph (the loss, until the logging step's finiteness check and Lightning's logging read it): on an
        # H100, compile_mode=reduce-overhead failed at the first steps of a run (docs/results/packing.md, session 24)
        raise ConfigError(
            f"compile_mode={cfg.compile_mode} runs the model as captured CUDA graphs, which a training run does not "
            "support; use compile_mode=default or compile_mode=max-autotune-no-cudagraphs"
        )
    if cfg.float32_matmul_precision not in MATMUL_PRECISIONS:
        raise ConfigError(
            f"float32_matmul_precision={cfg.float32_matmul_precision} is unknown; choose one of "
            f"{', '.join(MATMUL_PRECISIONS)}"
        )
    return settings


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


@dataclass
class Run:
    """A training run built and not yet fitted: what :func:`fit` needs, and what another entry point (a benchmark,
    an evaluation) may take from a build without training."""

    cfg: DictConfig
    task: LanguageModelTask
    data: L.LightningDataModule
    trainer: L.Trainer
    logger: MLFlowLogger | None
    output_dir: Path
    resumed: Resumable | None
    on_signal: interrupts.CheckpointOnSignal


def configured_callbacks(cfg: DictConfig, logged: bool) -> list[L.Callback]:
    """The ``callbacks`` config group's Lightning callbacks (``callbacks/default.yaml``; a sweeper adds its own with
    ``+callbacks.NAME={_target_: ...}``), less those this run cannot take: Lightning refuses a progress bar when
    ``trainer.enable_progress_bar=false`` and a learning-rate monitor without a logger; a model summary is left out
    when ``+trainer.enable_model_summary=false``."""
    built = [hydra.utils.instantiate(spec) for spec in (cfg.get("callbacks") or {}).values() if spec is not None]
    return [
        callback
        for callback in built
        if not (isinstance(callback, ProgressBar) and not cfg.trainer.enable_progress_bar)
        and not (isinstance(callback, LearningRateMonitor) and not logged)
        and not (isinstance(callback, ModelSummary) and cfg.trainer.get("enable_model_summary") is False)
    ]


def prepared_params(model_cfg: ModelConfig, data: Any) -> dict[str, Any]:
    """The params a run logs once its data is prepared: the data's identity and size, and the vocabulary that fills
    the config's null."""
    return {"model.vocab_size": model_cfg.vocab_size, **data.summary()}


def build_run(cfg: DictConfig, settings: Settings | None = None) -> Run:
    """Data, model, callbacks, logger and trainer of a run, built from its checked settings (and run tags logged),
    ready for :func:`fit`. An unfinished run with the same overrides is resumed into its MLflow run and folder."""
    model_cfg, data_cfg, optim_cfg, layer_mixers = settings or check(cfg)
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
        layer_mixers=layer_mixers,  # checked above, before the data: not again
    )
    init_tags = {}
    if cfg.get("init_from"):  # before compiling: the weights' names are the plain model's
        init_tags = init_weights_from(task.model, str(cfg.init_from), tracking_uri(cfg.logger.tracking_uri))
    if cfg.compile:
        task.model = compile_model(task.model, cfg.compile_scope, cfg.compile_mode)
    mixer_name = model_cfg.mixer.name
    overrides = list(hydra_cfg.overrides.task)
    name = cfg.name or run_name(str(cfg.get("variant") or mixer_name), overrides, swept_keys())
    key = run_key(overrides)
    fresh_command = " ".join(["zoo-train", *map(shlex.quote, sys.argv[1:]), "resume=false"])
    resumed = None
    if cfg.logger.enabled and cfg.resume:
        # what this run would log as its params, as far as they are known before the model is built: a run recorded
        # under other settings is not resumed (tracking.changed_settings)
        params = config_params(cfg) | {k: param_text(v) for k, v in prepared_params(model_cfg, data).items()}
        resumed = find_unfinished_run(cfg, key, fresh_command, params)
    if resumed is not None:
        output_dir = resumed.output_dir
        log.info("resuming MLflow run %s from %s", resumed.run_id, resumed.checkpoint)

    # checkpointing and the stop on a signal are how a run resumes, so they are part of every run, not settings
    on_signal = interrupts.CheckpointOnSignal(output_dir / "checkpoints" / "last.ckpt")
    checkpoints = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every
    )
    callbacks: list[L.Callback] = [checkpoints, on_signal]
    if cfg.inject_failure is not None:
        callbacks.append(InjectFailure(**cfg.inject_failure))
    callbacks += configured_callbacks(cfg, logged=cfg.logger.enabled)
    logger = None
    if cfg.logger.enabled:
        tags = {
            "mixer": mixer_name,
            "overrides": " ".join(overrides),
            "run_key": key,
            "config_key": config_key(cfg),
            "output_dir": str(output_dir),
            "command": " ".join(sys.argv),
            **git_info(),
            **sweep_tags(cfg),
            **init_tags,
        }
        logger = make_logger(cfg, name, tags, run_id=resumed.run_id if resumed else None)
    if logger is not None and not cfg.resume:
        supersede_unfinished(cfg, key, logger.run_id)
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        logger=logger or False,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
        plugins=[AtomicCheckpointIO()],
    )
    if cfg.get("tokens_per_step"):
        accumulate = micro_batches_per_step(
            cfg.tokens_per_step, cfg.data.batch_size, cfg.data.block_size, trainer.world_size
        )
        trainer.accumulate_grad_batches = accumulate
        OmegaConf.update(cfg, "trainer.accumulate_grad_batches", accumulate, force_add=True)  # the param logged
    return Run(cfg, task, data, trainer, logger, output_dir, resumed, on_signal)


def tokens_per_step_param(cfg: DictConfig, trainer: L.Trainer) -> dict[str, int]:
    """The optimiser's batch in tokens, over every rank and accumulated micro-batch: the number a paper's batch is
    compared with (windowed text data; others have no fixed tokens per sample)."""
    if not windowed(cfg.data):
        return {}
    tokens = cfg.data.batch_size * cfg.data.block_size * trainer.accumulate_grad_batches * trainer.world_size
    return {"train.tokens_per_step": tokens}


def fit(run: Run) -> dict[str, float]:
    """Train a built run, validate its final weights, and record the outcome (FINISHED, FAILED with the reason,
    KILLED when interrupted or pruned); returns the final validation metrics."""
    cfg, task, data, trainer, logger = run.cfg, run.task, run.data, run.trainer, run.logger
    model = task.model
    n_params = sum(p.numel() for p in model.parameters())
    baselines = data.baselines()
    summary = {
        "model.n_params": n_params,
        **tokens_per_step_param(cfg, trainer),
        "model.n_params_non_embedding": model.num_parameters(non_embedding=True),
        # equal size, as every mixer is matched: counted (the budget) vs not counted (embeddings, positional tables)
        **{f"model.n_params_{kind}": n for kind, n in model.size().items()},
        **prepared_params(model.config, data),
        **{f"model.state_size.T{n}": model.state_size(n) for n in cfg.state_size_lengths},
        **mixer_origins(cfg),
    }
    if logger is not None and run.resumed is None:
        logger.log_hyperparams({**config_params(cfg), **summary})
        logger.log_metrics({f"baseline/{k}": v for k, v in baselines.items()}, step=0)
        log_hydra_artifacts(logger, run.output_dir, cfg)
        log_environment(logger, run.output_dir)
    log.info(
        "model: %s, %.2fM parameters; data: %s",
        task.model.config.mixer.name,
        n_params / 1e6,
        ", ".join(f"{k.removeprefix('data.')} {v}" for k, v in data.summary().items()),
    )

    metrics: dict[str, float] = {}
    try:
        trainer.fit(task, datamodule=data, ckpt_path=str(run.resumed.checkpoint) if run.resumed else None)
        if cfg.final_validate:
            metrics = final_validation(trainer, task, data)
    except BaseException as err:
        stop = interrupts.as_interruption(err)
        if stop is not None:
            saved = (
                f"checkpoint of step {run.on_signal.saved_at} saved" if run.on_signal.saved_at else "no new checkpoint"
            )
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
    if logger is not None and cfg.logger.get("log_model") and trainer.is_global_zero:
        log_final_model(run, logger)
    if cfg.final_validate and logger is not None:
        logger.finalize("success")
    if trainer.is_global_zero:  # under DDP every rank runs this function; one summary is enough
        report(metrics, baselines, logger, run.output_dir)
    return metrics


def log_final_model(run: Run, logger) -> None:
    """The final weights as the run's MLflow Model ``model`` (see ``logger.log_model``). A failure here is reported and
    tagged, not raised: the run trained, and its checkpoint is in its folder."""
    from experiments.export import log_model, save_text_model

    try:
        out = save_text_model(
            run.task.model, run.data.tokenizer, run.output_dir / "model", {"step": run.trainer.global_step}
        )
        log_model(logger.run_id, out, tracking_uri(run.cfg.logger.tracking_uri))
    except Exception as err:  # noqa: BLE001 - anything: the training result must still be recorded
        log.warning("could not log the trained model to MLflow: %s: %s", type(err).__name__, err)
        logger.experiment.set_tag(logger.run_id, "model_logging_error", f"{type(err).__name__}: {err}"[:5000])


def train(cfg: DictConfig) -> dict[str, float]:
    """Check, skip a trial its sweep already finished, build, fit."""
    settings = check(cfg)
    if cfg.logger.enabled:
        experiment_of(cfg)  # the store and experiment exist before any lookup or logger touches them
    if (metrics := finished_trial(cfg, config_key(cfg))) is not None:
        return metrics
    with float32_matmul_precision(cfg.float32_matmul_precision):
        return fit(build_run(cfg, settings))


def final_validation(trainer: L.Trainer, task: LanguageModelTask, data: L.LightningDataModule) -> dict[str, float]:
    """The final weights' validation metrics: those of the fit's last validation when it ran at the last step (no
    second pass over the validation data, no repeated point at the end of every curve), else one more validation.

    Under FSDP a second loop after ``fit`` re-wraps the already sharded model and its forward fails on flattened
    weights (Lightning issue #19015), so the fit's last validation stands in: it is the final weights' when
    ``trainer.val_check_interval`` divides ``trainer.max_steps``.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if getattr(task, "validated_at_step", None) == trainer.global_step:
        pass  # the fit validated these very weights at its last step: a second pass would give the same numbers
    elif not isinstance(trainer.strategy, FSDPStrategy):
        trainer.validate(task, datamodule=data, verbose=False)
    else:
        log.warning(
            "FSDP: the reported metrics are those of the last validation during training (at step %d); set "
            "trainer.val_check_interval to a divisor of trainer.max_steps to make it the final weights'",
            trainer.global_step,
        )
    return validation_metrics(trainer, task.eval_splits)


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
