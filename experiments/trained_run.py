"""A finished (or interrupted) ``zoo-train`` run, rebuilt from what it left: its saved config, its data module and
its weights, through the training entry point's own functions, so that whatever reads a checkpoint (generation,
measurements) sees the model and the tokens the run trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import mlflow
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from arch_zoo import LanguageModel
from arch_zoo.errors import ConfigError
from experiments.compose import model_config

CONFIG_NAMES = ("config_resolved.yaml", ".hydra/config.yaml")  # beside checkpoints/, in order of preference


def find_config(checkpoint: Path) -> Path:
    """The config a ``zoo-train`` run saved: ``RUN/checkpoints/last.ckpt`` -> ``RUN/config_resolved.yaml``."""
    run_dir = checkpoint.resolve().parent.parent
    for name in CONFIG_NAMES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise ConfigError(
        f"no {' or '.join(CONFIG_NAMES)} in {run_dir}, the run directory of {checkpoint}; pass --config PATH"
    )


def data_config(cfg: DictConfig) -> Any:
    """The typed data config: the run's values merged into the schema that ``zoo-train`` registered for its
    ``_target_`` (a saved YAML is untyped; the data modules expect their dataclass)."""
    from experiments.config_store import register_configs

    register_configs()
    target = cfg.data.get("_target_")
    for name, node in ConfigStore.instance().repo["data"].items():
        if node.node.get("_target_") == target:
            return OmegaConf.to_object(OmegaConf.merge(ConfigStore.instance().load(f"data/{name}").node, cfg.data))
    raise ConfigError(f"the run's data._target_={target!r} has no registered data schema")


def checkpoint_of_run(run_id: str, tracking_uri: str | None = None) -> Path:
    """The last checkpoint of an MLflow run that ``zoo-train`` made on this machine (its ``output_dir`` tag)."""
    try:
        run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise ConfigError(f"no MLflow run {run_id!r} in {tracking_uri or mlflow.get_tracking_uri()}: {err}") from None
    output_dir = run.data.tags.get("output_dir")
    checkpoint = Path(output_dir or "") / "checkpoints" / "last.ckpt"
    if not output_dir or not checkpoint.is_file():
        raise ConfigError(
            f"run {run_id} has no checkpoint on this machine (looked for {checkpoint}); pass checkpoint=PATH instead"
        )
    return checkpoint


def build_data_module(cfg: DictConfig, config: Any | None = None) -> Any:
    """The run's data module, prepared (tokenised and cached as in training); ``config`` replaces its data config."""
    config = config or data_config(cfg)
    data = hydra.utils.get_class(config._target_)(config, seed=cfg.get("seed", 0))
    data.prepare_data()
    return data


def checkpoint_weights(checkpoint: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The ``LanguageModel`` weights of a training checkpoint and its step (the task's ``model.`` prefix and a
    compiled model's ``_orig_mod.`` removed)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = {}
    for key, value in saved["state_dict"].items():
        if key.startswith("model."):
            weights[key.removeprefix("model.").removeprefix("_orig_mod.")] = value
    return weights, int(saved.get("global_step", -1))


def init_weights_from(model: torch.nn.Module, source: str, tracking_uri: str | None = None) -> dict[str, str]:
    """Load the weights of ``source`` (a run id, a run directory or a checkpoint) into ``model`` (a warm start: the
    optimiser and schedule start afresh); returns the tags that link the new run to it. A checkpoint of another
    shape is refused with the parameters that differ."""
    path = Path(source)
    by_path = path.exists()
    checkpoint = resolve_checkpoint(source if by_path else None, None if by_path else source, tracking_uri)
    weights, step = checkpoint_weights(checkpoint)
    own = model.state_dict()
    differ = sorted(
        k for k in own.keys() | weights.keys() if k not in own or k not in weights or own[k].shape != weights[k].shape
    )
    if differ:
        shown = ", ".join(differ[:5]) + (", ..." if len(differ) > 5 else "")
        raise ConfigError(
            f"init_from={source}: its model differs from this run's in {len(differ)} parameter(s) ({shown}); "
            "warm-start from a run of the same model shape"
        )
    model.load_state_dict(weights)
    tags = {"init_from": str(checkpoint), "init_from_step": str(step)}
    if not by_path:
        tags["init_from_run_id"] = source
    return tags


def load_model(cfg: DictConfig, checkpoint: Path, vocab_size: int, device: torch.device) -> tuple[LanguageModel, int]:
    """The trained ``LanguageModel`` (float32, eval mode) and the checkpoint's step. Weights only: the Lightning
    task's keys are ``model.<name>`` (``model._orig_mod.<name>`` when it was compiled)."""
    model = LanguageModel(model_config(cfg, vocab_size))  # vocab_size fills a null model.vocab_size, as in training
    weights, step = checkpoint_weights(checkpoint)
    model.load_state_dict(weights)
    return model.to(device=device, dtype=torch.float32).eval(), step


def resolve_checkpoint(checkpoint: str | None, run_id: str | None, tracking_uri: str | None = None) -> Path:
    """The ``last.ckpt`` that ``checkpoint`` (the file or its run directory) or ``run_id`` names (exactly one)."""
    if (checkpoint is None) == (run_id is None):
        raise ConfigError("say which run: checkpoint=PATH or run_id=ID (one of them)")
    path = Path(checkpoint) if checkpoint else checkpoint_of_run(run_id, tracking_uri)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    return path


def load_text_model(checkpoint: Path, device: torch.device) -> tuple[LanguageModel, Any, int, int]:
    """``(model, tokenizer, vocab_size, step)`` of a run trained on text, its tokeniser built as in training."""
    cfg = OmegaConf.load(find_config(checkpoint))
    data = build_data_module(cfg)
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"the run's data ({type(data).__name__}) has no text tokeniser")
    model, step = load_model(cfg, checkpoint, data.vocab_size, device)
    return model, tokenizer, data.vocab_size, step
