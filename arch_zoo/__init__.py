"""arch-zoo: language models assembled from registered token mixers (pure PyTorch; no training code here)."""

from arch_zoo.contract import MixerConfig, TokenMixer, exclude_from_size, set_optim
from arch_zoo.errors import ConfigError
from arch_zoo.layers import FFNConfig, register_ffn
from arch_zoo.model import LanguageModel, ModelConfig
from arch_zoo.registry import available_mixers, build_mixer, get_mixer, make_config, register_mixer

__all__ = [
    "ConfigError",
    "FFNConfig",
    "LanguageModel",
    "MixerConfig",
    "ModelConfig",
    "TokenMixer",
    "available_mixers",
    "build_mixer",
    "exclude_from_size",
    "get_mixer",
    "make_config",
    "register_ffn",
    "register_mixer",
    "set_optim",
]
