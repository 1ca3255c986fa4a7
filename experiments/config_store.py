"""Typed schemas in Hydra's ConfigStore: the model, data and optimiser schemas, and every registered mixer's config
(plugins included) under ``model/mixer`` and ``model/hybrid_mixer``, so ``model/mixer=NAME`` selects one and a
misspelt field or a wrong type fails before anything is built."""

from __future__ import annotations

from importlib import resources

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
    mixers = available_mixers()
    for name, spec in mixers.items():
        for group in ("model/mixer", "model/hybrid_mixer"):
            cs.store(group=group, name=name, node=spec.config_class(name=name))
    for name in arch_less_mixers(mixers):
        # ``+arch=NAME`` for a mixer without a paper YAML (a plugin's): the mixer at its own defaults, labelled by its
        # name, so it joins a sweep such as +sweep=table5 as a row of its own
        node = {"defaults": [{"override /model/mixer": name}], "variant": name}
        cs.store(group="arch", name=name, node=node, package="_global_")


def arch_less_mixers(mixers: dict) -> list[str]:
    """Registered mixers with no ``sweeps/configs/arch`` YAML under their name or another name of the same class."""
    folder = resources.files("sweeps.configs") / "arch"
    with_yaml = {mixers[n].mixer_class for n in mixers if (folder / f"{n}.yaml").is_file()}
    return [n for n, spec in mixers.items() if spec.mixer_class not in with_yaml]
