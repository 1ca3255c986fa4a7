"""``zoo-eval``: a trained run, measured after the fact, recorded as a child MLflow run of it.

    zoo-eval checkpoint=outputs/2026-12-06/10-00-00 lengths=[256,1024]        # perplexity at two lengths
    zoo-eval run_id=<MLflow run id> downstream.tasks=[zoo_mc]                 # + the project's lm-eval task
    zoo-eval -m run_id=<id> +sweep=downstream                                  # the paper's Table 3 (network)

Three measurements, each optional: loss / perplexity / bits per byte on the run's data (or another data config,
``data=wikitext103``) at the window lengths asked for, with the same metric names training logs (``val/ppl``,
``ood/<set>/ppl``, ``val_len<N>/ppl``); stepped decoding against the whole-sequence forward for any mixer
(``decode/*``, see ``experiments/decoding_check.py``); and lm-evaluation-harness tasks (``downstream/<task>/<metric>``).
The child run shares the trained run's store and experiment (or ``experiment_name``) and carries its id in
``mlflow.parentRunId``, so the MLflow UI shows it under the run it measured.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import mlflow
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from arch_zoo.contract import ConfigError
from experiments.bench import resolve_device
from experiments.compose import run_typed
from experiments.config_store import register_configs
from experiments.decoding_check import decoding_agreement, reduced_state_costs
from experiments.store import open_experiment
from experiments.trained_run import build_data_module, data_config, find_config, load_model, resolve_checkpoint

NOT_SCORES = {"sample_len"}  # lm-eval's bookkeeping beside a task's scores (standard errors are skipped too)


@dataclass
class DecodingCheckConfig:
    enabled: bool = True
    sequences: int = 4  # validation windows, decoded as one batch
    length: int | None = None  # tokens per window (null: the run's block size)
    prompt: int = 16  # tokens run as one call before one-token steps
    # also decode with the state kept in these dtypes (mixers with a state_dtype setting, e.g. RetNet): the cost of a
    # reduced-precision state, as decode/state_<dtype>/*
    state_dtypes: list[str] = field(default_factory=list)


@dataclass
class DownstreamConfig:
    tasks: list[str] = field(default_factory=list)  # lm-eval task names; zoo_mc is ours and offline
    num_fewshot: int = 0
    limit: int | None = None  # documents per task (null: all)
    batch_size: int = 8
    max_length: int | None = None  # context kept (null: the model's limit, else 2048)
    include_path: str | None = None  # more local lm-eval task folders, beside ours


@dataclass
class EvalConfig:
    checkpoint: str | None = None  # a last.ckpt or its run directory
    run_id: str | None = None  # or the MLflow run zoo-train made on this machine
    tracking_uri: str | None = None  # default: the run's own store, else MLflow's default
    experiment_name: str | None = None  # default: the trained run's experiment
    device: str = "auto"
    lengths: list[int] = field(default_factory=list)  # window lengths scored (empty: the run's block size)
    perplexity: bool = True
    data: Any = None  # another data config of the training tree (data=NAME); null: the run's
    decoding: DecodingCheckConfig = field(default_factory=DecodingCheckConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    log: bool = True  # false: print only, no MLflow run


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
register_configs()  # data=NAME selects a data config of the training tree, typed by its schema


# ---------------------------------------------------------------------------------------------------------------
# The trained run: its config, data and weights; its MLflow run
# ---------------------------------------------------------------------------------------------------------------


def eval_data(run_cfg: DictConfig, cfg: EvalConfig) -> Any:
    """The data module to score on: the run's (or ``cfg.data``) with ``cfg.lengths`` as its evaluation lengths."""
    config = trained = data_config(run_cfg)
    if cfg.data is not None:
        config = cfg.data if dataclasses.is_dataclass(cfg.data) else data_config(OmegaConf.create({"data": cfg.data}))
        tokenizer = getattr(trained, "tokenizer", None)
        # bytes read any text; a BPE is the one trained on the run's corpus, so another corpus would get another one
        other_corpus = tokenizer != "bytes" and getattr(config, "corpus", None) != trained.corpus
        if getattr(config, "tokenizer", None) != tokenizer or other_corpus:
            raise ConfigError(
                f"data= must tokenise as the run did (tokenizer={tokenizer}); with a BPE run, only its own corpus"
            )
    if cfg.lengths:
        if not hasattr(config, "eval_lengths"):
            raise ConfigError(f"{type(config).__name__} has no window lengths to choose; leave lengths= empty")
        if any(n < 2 for n in cfg.lengths):
            raise ConfigError(f"lengths={cfg.lengths}: every length must be >= 2")
        config = dataclasses.replace(config, eval_lengths=[n for n in cfg.lengths if n != config.block_size])
    return build_data_module(run_cfg, config)


def parent_run(
    checkpoint: Path, run_id: str | None, tracking_uri: str | None
) -> tuple[mlflow.MlflowClient, mlflow.entities.Run | None]:
    """The MLflow run that trained ``checkpoint``: ``run_id``, else the run whose ``output_dir`` tag is its run
    directory (None when the store has no such run)."""
    client = mlflow.MlflowClient(tracking_uri)
    if run_id is not None:
        return client, client.get_run(run_id)
    run_dir = str(checkpoint.resolve().parent.parent)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.output_dir = '{run_dir}'", max_results=1) if experiments else []
    return client, (runs[0] if runs else None)


# ---------------------------------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------------------------------


def perplexity(model: torch.nn.Module, data: Any, device: torch.device) -> dict[str, float]:
    """Every evaluation split of ``data`` through the training module's own validation step, so the names and
    values are those a training run logs."""
    import lightning as L

    from experiments.lit_module import LanguageModelTask, OptimConfig, validation_metrics

    splits = data.eval_split_names
    task = LanguageModelTask(model.config, OptimConfig(), 1, splits, {s: data.bytes_per_token(s) for s in splits})
    task.model = model
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(task, datamodule=data, verbose=False)
    return validation_metrics(trainer, task.eval_splits)


def decoding(model: torch.nn.Module, data: Any, cfg: DecodingCheckConfig, device: torch.device) -> dict[str, float]:
    """``decode/*``: the first validation windows, stepped against the whole-sequence forward."""
    dataset = data.val_dataloader()[0].dataset
    count = min(cfg.sequences, len(dataset))
    inputs, targets = (torch.stack(t) for t in zip(*(dataset[i] for i in range(count))))
    length = cfg.length or inputs.shape[1]
    if length > inputs.shape[1]:
        raise ConfigError(f"decoding.length={length} exceeds the validation windows ({inputs.shape[1]} tokens)")
    inputs, targets = inputs[:, :length].to(device), targets[:, :length].to(device)
    result = decoding_agreement(model, inputs, targets, cfg.prompt)
    metrics = {f"decode/{k}": float(v) for k, v in result.items()}
    for dtype, row in reduced_state_costs(model, inputs, targets, cfg.prompt, list(cfg.state_dtypes)).items():
        metrics.update({f"decode/state_{dtype}/{k}": float(v) for k, v in row.items()})
    return metrics


def downstream(model: torch.nn.Module, tokenizer: Any, cfg: DownstreamConfig) -> tuple[dict[str, float], dict]:
    """lm-evaluation-harness on ``cfg.tasks``: ``downstream/<task>/<metric>`` and lm-eval's whole result."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("downstream tasks need lm-evaluation-harness: pip install 'arch-zoo[eval]'") from None
    from experiments.downstream.lm import ArchZooLM
    from experiments.downstream.tasks import TASKS_DIR

    paths = [str(TASKS_DIR), *([cfg.include_path] if cfg.include_path else [])]
    lm = ArchZooLM(model, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)
    result = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=TaskManager(include_path=paths),
        log_samples=False,
        bootstrap_iters=0,  # standard errors by bootstrap take minutes and are not what a table shows
    )
    metrics = {}
    for task, values in result["results"].items():
        for key, value in values.items():
            name = key.split(",")[0]
            if name.endswith("_stderr"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in NOT_SCORES:
                metrics[f"downstream/{task}/{name}"] = float(value)
    return metrics, {k: result[k] for k in ("results", "configs", "versions", "n-shot") if k in result}


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def run(cfg: EvalConfig) -> tuple[dict[str, float], str | None]:
    """Measure, print, and record the child run; returns the metrics and the child run's id."""
    device = resolve_device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.run_id, cfg.tracking_uri)
    run_cfg = OmegaConf.load(find_config(checkpoint))
    tracking_uri = cfg.tracking_uri or OmegaConf.select(run_cfg, "logger.tracking_uri") or None
    data = eval_data(run_cfg, cfg)
    model, step = load_model(run_cfg, checkpoint, data.vocab_size, device)
    if cfg.decoding.enabled and cfg.decoding.length:
        from experiments.decoding_check import check_prompt

        check_prompt(cfg.decoding.prompt, cfg.decoding.length)  # before any slow step
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    if cfg.perplexity:
        metrics.update(perplexity(model, data, device))
    if cfg.decoding.enabled:
        metrics.update(decoding(model, data, cfg.decoding, device))
    results: dict = {}
    if cfg.downstream.tasks:
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(f"downstream tasks are text; this run's data ({type(data).__name__}) has no tokeniser")
        scores, results = downstream(model, tokenizer, cfg.downstream)
        metrics.update(scores)
    seconds = time.perf_counter() - start
    for name, value in sorted(metrics.items()):
        print(f"{name:40s} {value:.6g}")
    child = log_child(cfg, checkpoint, step, metrics, results, tracking_uri, seconds) if cfg.log else None
    return metrics, child


def log_child(
    cfg: EvalConfig,
    checkpoint: Path,
    step: int,
    metrics: dict[str, float],
    results: dict,
    tracking_uri: str | None,
    seconds: float,
) -> str:
    """A FINISHED run under the trained one: the eval settings as params, the measurements as metrics at the
    checkpoint's step, lm-eval's full result as ``downstream.json``."""
    client, parent = parent_run(checkpoint, cfg.run_id, tracking_uri)
    if parent is not None:
        experiment_id = parent.info.experiment_id
        name = f"eval: {parent.info.run_name}"
    else:
        print(f"zoo-eval: no MLflow run trained {checkpoint} in this store; the eval run stands alone", file=sys.stderr)
        experiment_id, name = None, f"eval: {checkpoint.resolve().parent.parent.name}"
    if cfg.experiment_name or experiment_id is None:
        _, experiment_id = open_experiment(tracking_uri or mlflow.get_tracking_uri(), cfg.experiment_name or "eval")
    tags = {"eval": "true", "checkpoint": str(checkpoint), "step": str(step)}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.info.run_id
        tags["mixer"] = parent.data.tags.get("mixer", "")
        tags["trained_run_name"] = parent.info.run_name or ""
    child = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {
        "lengths": str(list(cfg.lengths)),
        "downstream.tasks": ",".join(cfg.downstream.tasks),
        "downstream.num_fewshot": cfg.downstream.num_fewshot,
        "downstream.limit": cfg.downstream.limit,
        "decoding.prompt": cfg.decoding.prompt,
        "decoding.sequences": cfg.decoding.sequences,
        "decoding.state_dtypes": ",".join(cfg.decoding.state_dtypes),
        "step": step,
        "seconds": round(seconds, 2),
    }
    for key, value in params.items():
        client.log_param(child, key, str(value))
    now = int(time.time() * 1000)
    batch = [mlflow.entities.Metric(k, v, now, max(step, 0)) for k, v in metrics.items()]
    for start in range(0, len(batch), 500):
        client.log_batch(child, metrics=batch[start : start + 500])
    if results:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "downstream.json"
            path.write_text(json.dumps(results, indent=1, default=str))
            client.log_artifact(child, str(path))
    client.set_terminated(child, status="FINISHED")
    where = f"under run {parent.info.run_id}" if parent is not None else "standalone"
    print(f"zoo-eval: logged MLflow run {child} ({where})", file=sys.stderr)
    return child


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_typed("zoo-eval", run, cfg)


if __name__ == "__main__":
    main()
