"""Load the official RetNet code's weights (torchscale 0.3.0 ``MultiScaleRetention``) into our ``retnet`` mixer:
the oracle side of ``test_retnet_torchscale.py``, kept with the tests because nothing else uses it.

torchscale's MSR equals ours under these settings (``torchscale_retnet_config`` builds them): its decay schedule
``gamma_h = 1 - 2^(-5-h)``, interleaved rotation with ``theta_i = 10000^(-i/(dk/2-1))``, k scaled by ``dk^-1/2``,
an RMSNorm without affine weight per head, the swish gate and no biases. Parameter names are the same
(``q_proj``, ``k_proj``, ``v_proj``, ``g_proj``, ``out_proj``); the per-head norm has no parameters.

Agreement is exact only with the per-head norm's eps at 0: torchscale's chunkwise and recurrent forms differ from
its parallel form by positive per-row factors (chunk-local normalisers; no score normaliser when decoding) that
only an eps-free norm cancels. Ours computes the same function in every mode at any eps (docs/retnet.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo.contract import ConfigError
from arch_zoo.mixers.retnet import RetNet, RetNetConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj")

# our settings that torchscale 0.3.0 hard-codes (head_dim, value_factor, eps and mode follow its arguments)
TORCHSCALE_SETTINGS = {
    "swish_gate": True,
    "group_norm": True,
    "group_norm_kind": "rmsnorm",
    "group_norm_affine": False,
    "decay": True,
    "multiscale_decay": True,
    "decay_schedule": "torchscale",
    "learnable_decay": False,
    "selective_decay": False,
    "xpos": True,
    "xpos_base": 10000.0,
    "decay_norm": True,
    "score_norm": True,
}


def torchscale_retnet_config(
    embed_dim: int,
    value_dim: int,
    num_heads: int,
    layernorm_eps: float = 1e-6,
    mode: str = "parallel",
    chunk_size: int = 512,
) -> RetNetConfig:
    """Our config for ``MultiScaleRetention(args, embed_dim, value_dim, num_heads)`` with ``args.layernorm_eps``."""
    if embed_dim % num_heads or value_dim % num_heads:
        raise ConfigError(f"torchscale MSR needs embed_dim={embed_dim} and value_dim={value_dim} divisible by heads")
    head_dim = embed_dim // num_heads
    return RetNetConfig(
        name="retnet",
        mode=mode,
        chunk_size=chunk_size,
        head_dim=head_dim,
        value_factor=(value_dim // num_heads) / head_dim,
        group_norm_eps=layernorm_eps,
        **TORCHSCALE_SETTINGS,
    )


def convert_torchscale_msr_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Our mixer's state dict from a torchscale MSR's (``prefix`` selects one layer of a whole decoder, e.g.
    ``"layers.3.retention."``). Multiway checkpoints (``q_proj.A.weight``) and biases are refused, not dropped."""
    out = {}
    for name in PROJECTIONS:
        key = f"{prefix}{name}.weight"
        if key not in state_dict:
            multiway = f"{prefix}{name}.A.weight" in state_dict
            why = "multiway MSR checkpoints are not supported" if multiway else "missing from the checkpoint"
            raise KeyError(f"{key}: {why}")
        if f"{prefix}{name}.bias" in state_dict:
            raise ConfigError(f"{prefix}{name}.bias: torchscale 0.3.0 MSR has no biases and neither does ours")
        out[f"{name}.weight"] = state_dict[key]
    if f"{prefix}group_norm.weight" in state_dict:
        raise ConfigError("the checkpoint's per-head norm has an affine weight; torchscale 0.3.0's has none")
    return out


def load_torchscale_msr(
    mixer: RetNet, source: nn.Module | Mapping[str, torch.Tensor], prefix: str = "", strict: bool = True
) -> RetNet:
    """Copy torchscale's MSR weights (a module or a state dict) into ``mixer`` after checking the settings agree.

    ``strict=False`` checks only the shapes, to start an ablated variant (e.g. ``group_norm=False``) from them.
    """
    c = mixer.config
    wrong = {k: getattr(c, k) for k, v in TORCHSCALE_SETTINGS.items() if getattr(c, k) != v}
    if wrong and strict:
        fix = ", ".join(f"{k}={TORCHSCALE_SETTINGS[k]!r}" for k in wrong)
        raise ConfigError(f"retnet mixer is not torchscale-compatible: set {fix} (torchscale_retnet_config does)")
    if isinstance(source, nn.Module):
        if getattr(source, "gate_fn", F.silu) is not F.silu:
            raise ConfigError("the torchscale MSR uses a gelu gate; ours is swish")
        if getattr(getattr(source, "args", None), "multiway", False):
            raise ConfigError("multiway torchscale MSR modules are not supported")
        eps = getattr(getattr(source, "group_norm", None), "eps", c.group_norm_eps)
        if eps != c.group_norm_eps and strict:
            raise ConfigError(
                f"per-head norm eps differs: torchscale {eps}, ours {c.group_norm_eps}; set group_norm_eps"
            )
        state_dict = source.state_dict()
    else:
        state_dict = source
    weights = convert_torchscale_msr_state_dict(state_dict, prefix)
    ours = mixer.state_dict()
    for name, w in weights.items():
        if ours[name].shape != w.shape:
            raise ConfigError(
                f"{name}: torchscale shape {tuple(w.shape)} != ours {tuple(ours[name].shape)}; "
                "build ours with torchscale_retnet_config(embed_dim, value_dim, num_heads)"
            )
    with torch.no_grad():
        for name, w in weights.items():
            mixer.get_parameter(name).copy_(w)
    return mixer


def torchscale_compatible(config: RetNetConfig) -> RetNetConfig:
    """``config`` with torchscale's hard-coded settings switched on (shape, eps and mode kept)."""
    return dataclasses.replace(config, **TORCHSCALE_SETTINGS)
