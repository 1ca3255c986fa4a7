"""A model as two files that load back bit for bit without the training code: ``config.json`` (the resolved
``ModelConfig``: mixer fields and the FFN width a parameter budget chose, so nothing is recomputed) and
``model.safetensors`` (the weights; tied embeddings stored once).

    save_pretrained(model, "exported/")            # + anything the caller wants kept beside it (``extra``)
    model = load_pretrained("exported/")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from arch_zoo.errors import ConfigError
from arch_zoo.layers import FFNConfig
from arch_zoo.model import LanguageModel, ModelConfig

FORMAT = "arch-zoo-model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def config_dict(config: ModelConfig) -> dict[str, Any]:
    """The resolved config as plain JSON values (mixer configs as dicts with their ``name``)."""

    def plain(value: Any) -> Any:
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    values = {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    values["target_params"] = None  # already spent: ffn.hidden_size holds the width it chose
    return values


def save_pretrained(model: LanguageModel, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "model": config_dict(model.config), "extra": extra or {}}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    save_model(model, str(directory / WEIGHTS_FILE))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} holds no {CONFIG_FILE}: not an exported model (see arch_zoo.export)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
    return meta


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
    """The exported model, in eval mode, with exactly the saved weights."""
    values = dict(read_meta(directory)["model"])
    values["ffn"] = FFNConfig(**values["ffn"])
    model = LanguageModel(ModelConfig(**values))
    load_model(model, str(Path(directory) / WEIGHTS_FILE), device=str(device))
    return model.to(device).eval()
