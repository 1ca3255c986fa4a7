"""From the Hydra config tree to typed configs: the one path every entry point takes.

zoo-train composes the tree through ``@hydra.main``; other entry points (zoo-bench's labelled models, a run's saved
config) come here. Either way a config becomes its dataclass once, through ``OmegaConf.to_object`` on a node that
the ConfigStore schemas typed (experiments/config_store.py): a misspelt field fails at composition, with Hydra's
message naming it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from arch_zoo import ModelConfig, get_mixer
from arch_zoo.errors import ConfigError
from experiments.config_store import register_configs

CONFIG_MODULE = "experiments.conf"
T = TypeVar("T")


def run_typed(prog: str, run: Callable[[Any], T], cfg: DictConfig) -> T:
    """The body of a ``@hydra.main`` entry point over one typed config (zoo-eval, zoo-generate, zoo-export):
    ``run`` gets the config's dataclass; a config error is one line, ``prog: message``, and exit status 2."""
    try:
        return run(OmegaConf.to_object(cfg))
    except ConfigError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        sys.exit(2)


def model_config(cfg: DictConfig, vocab_size: int | None) -> ModelConfig:
    """The model's dataclass from a config tree; ``vocab_size`` fills a null ``model.vocab_size``.

    A tree composed by Hydra is typed already (the mixer's schema chosen by ``model/mixer=NAME``) and is converted as
    it is. A run's saved ``config.yaml`` is plain YAML: it is merged onto the same schemas first, the mixer's found
    by its name, so a field the schema lacks fails here as it would at composition."""
    node = cfg.model
    if OmegaConf.get_type(node) is not ModelConfig:
        schema = ModelConfig(vocab_size=None)
        for key in ("mixer", "hybrid_mixer"):
            spec = node.get(key)
            if isinstance(spec, DictConfig) and spec.get("name"):
                setattr(schema, key, get_mixer(spec.name).config_class(name=spec.name))
        node = OmegaConf.merge(OmegaConf.structured(schema), node)
    model: ModelConfig = OmegaConf.to_object(node)
    return model if model.vocab_size is not None else dataclasses.replace(model, vocab_size=vocab_size)


def compose_train(overrides: list[str]) -> DictConfig:
    """zoo-train's config tree with ``overrides`` (Hydra's grammar), composed outside a Hydra app."""
    register_configs()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=overrides)
