"""``zoo-export``: a trained run as a self-contained model directory, and as an MLflow Model that generates text.

    zoo-export checkpoint=outputs/2026-12-06/10-00-00 out=exported/retnet-small
    zoo-export run_id=<MLflow run id> log_model=true     # also logs it to that run as an MLflow Model "model"

The directory holds ``config.json`` + ``model.safetensors`` (``arch_zoo.export``: loads back bit for bit with
``load_pretrained``) and the run's tokeniser. Logged to MLflow, ``mlflow.pyfunc.load_model("runs:/<id>/model")``
loads it and ``predict(["def main("])`` (or a DataFrame with a ``prompt`` column) returns continuations, decoded
through the mixers' states; ``params`` take ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``
(``PREDICT_PARAMS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import mlflow
import torch
from hydra.core.config_store import ConfigStore
from mlflow.models import infer_signature
from omegaconf import DictConfig

from arch_zoo.errors import ConfigError
from arch_zoo.export import load_pretrained, read_meta, save_pretrained
from experiments.compose import run_typed
from experiments.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer
from experiments.trained_run import load_text_model, resolve_checkpoint

TOKENIZER_FILE = "tokenizer.json"
# what predict(..., params=) takes, with its defaults: greedy, 64 tokens; top_k 0 and top_p 1 mean no limit
PREDICT_PARAMS = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}


def export_run(checkpoint: Path, out: Path) -> Path:
    """Write the run's model (float32) and tokeniser to ``out``."""
    model, tokenizer, _, step = load_text_model(checkpoint, torch.device("cpu"))
    return save_text_model(model, tokenizer, out, {"step": step, "checkpoint": str(checkpoint)})


def save_text_model(model: torch.nn.Module, tokenizer: Tokenizer, out: Path, extra: dict[str, Any]) -> Path:
    """Write ``model`` (its weights on the CPU) and ``tokenizer`` to ``out`` as :func:`load_pretrained` reads them."""
    save_pretrained(model, out, {"tokenizer": tokenizer.identity, **extra})
    if isinstance(tokenizer, BPETokenizer):
        tokenizer._tok.save(str(out / TOKENIZER_FILE))
    return out


def load_tokenizer(directory: Path) -> Tokenizer:
    identity = read_meta(directory)["extra"].get("tokenizer")
    if identity == ByteTokenizer.identity:
        return ByteTokenizer()
    if (directory / TOKENIZER_FILE).is_file():
        return BPETokenizer(directory / TOKENIZER_FILE)
    raise ConfigError(f"{directory}: no tokeniser for {identity!r} (expected {TOKENIZER_FILE})")


class TextGenerator(mlflow.pyfunc.PythonModel):
    """The exported model behind MLflow's pyfunc interface: prompts in, continuations out."""

    def load_context(self, context) -> None:
        directory = Path(context.artifacts["model"])
        self.model = load_pretrained(directory)
        self.tokenizer = load_tokenizer(directory)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        params = params or {}
        if hasattr(model_input, "columns"):  # a DataFrame: its "prompt" column, else its only one
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = list(model_input[column])
        else:
            prompts = list(model_input)
        generator = torch.Generator().manual_seed(int(params.get("seed", 0)))
        outputs = []
        for prompt in prompts:
            (ids,) = self.tokenizer.encode_batch([str(prompt)])
            tokens = self.model.generate(
                torch.as_tensor(ids, dtype=torch.long)[None],
                int(params.get("max_new_tokens", 64)),
                float(params.get("temperature", 0.0)),
                int(params.get("top_k", 0)) or None,  # 0: no limit
                float(params.get("top_p", 1.0)),
                generator,
            )
            outputs.append(self.tokenizer.decode(tokens[0, len(ids) :].tolist()))
        return outputs


def log_model(run_id: str, directory: Path, tracking_uri: str | None = None) -> str:
    """Log the exported ``directory`` to ``run_id`` as the MLflow Model ``model``; returns its model URI."""
    mlflow.set_tracking_uri(tracking_uri or mlflow.get_tracking_uri())
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TextGenerator(),
            artifacts={"model": str(directory)},
            signature=infer_signature(["def main("], ["..."], params=PREDICT_PARAMS),
            pip_requirements=["arch-zoo"],  # the package that defines the model; nothing to infer
        )
    return info.model_uri


@dataclass
class ExportConfig:
    checkpoint: str | None = None  # a last.ckpt or its run directory
    run_id: str | None = None  # or an MLflow run made on this machine
    tracking_uri: str | None = None
    out: str | None = None  # default: <run directory>/exported
    log_model: bool = False  # also log it to the run (run_id) as an MLflow Model


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def run(cfg: ExportConfig) -> tuple[Path, str | None]:
    if cfg.log_model and cfg.run_id is None:
        raise ConfigError("log_model=true logs to an MLflow run: give run_id=ID")
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.run_id, cfg.tracking_uri)
    out = Path(cfg.out) if cfg.out else checkpoint.resolve().parent.parent / "exported"
    export_run(checkpoint, out)
    uri = log_model(cfg.run_id, out, cfg.tracking_uri) if cfg.log_model else None
    return out, uri


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    out, uri = run_typed("zoo-export", run, cfg)
    print(f"exported to {out}" + (f"; MLflow Model {uri}" if uri else ""))


if __name__ == "__main__":
    main()
