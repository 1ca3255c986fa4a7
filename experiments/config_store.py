"""Typed schemas in Hydra's ConfigStore: the model, data and optimiser schemas, and every registered mixer's config
(plugins included) under ``model/mixer`` and ``model/hybrid_mixer``, so ``model/mixer=NAME`` selects one and a
misspelt field or a wrong type fails before anything is built."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from arch_zoo import ModelConfig, available_mixers
from experiments.data.datamodule import DataConfig
from experiments.data.mqar import register_mqar_config
from experiments.lit_module import OptimConfig


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="model", name="base", node=ModelConfig(vocab_size=None))
    cs.store(group="data", name="base", node=DataConfig)
    register_mqar_config()
    cs.store(group="optim", name="base", node=OptimConfig)
    for name, spec in available_mixers().items():
        for group in ("model/mixer", "model/hybrid_mixer"):
            cs.store(group=group, name=name, node=spec.config_class(name=name))
