"""flash-linear-attention (fla) layers as registered mixers: GLA, RWKV-6/7, Mamba-2, (gated) DeltaNet, HGRN-2 and
fla's own retention.

They reach the registry through the ``arch_zoo.mixers`` entry points in this project's ``pyproject.toml``, the same
path a third-party package takes, so the plugin mechanism is exercised by real code. fla's kernels are Triton-only:
on a machine without a CUDA GPU (or without fla) these mixers are listed but refuse to build, with a message that
says so. State continuation goes through fla's own cache object, one per mixer.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer


def unavailable_reason() -> str | None:
    """Why fla layers cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (flash-linear-attention runs Triton kernels only)"
    if importlib.util.find_spec("fla") is None:
        return "needs flash-linear-attention (pip install flash-linear-attention)"
    return None


@dataclass
class FLAConfig(MixerConfig):
    """``num_heads`` and ``mode`` map onto the fla layer's arguments; ``options`` passes any other argument of the
    layer's constructor through unchanged (e.g. ``model.mixer.options='{expand_k: 1.0}'``)."""

    num_heads: int = 4
    mode: str = "chunk"
    options: dict[str, Any] = field(default_factory=dict)

    def check(self, d_model: int) -> None:
        if self.num_heads <= 0 or d_model % self.num_heads:
            raise ConfigError(f"fla mixer: d_model={d_model} is not divisible by num_heads={self.num_heads}")


class FLAMixer(TokenMixer):
    """Wraps one fla layer class (``fla_class``) behind the token-mixer contract."""

    config_class = FLAConfig
    devices = ("cuda",)
    supports_float64 = False  # Triton kernels: float32 and half precision
    flops_uncountable = "fla runs Triton kernels that torch's FLOP counter does not see; its runs report no MFU"
    fla_class: ClassVar[str] = ""
    head_arg: ClassVar[str] = "num_heads"  # constructor argument that takes the head count
    takes_mode: ClassVar[bool] = True
    # constructor arguments whose fla defaults would override the head count (options still win over these)
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def unavailable(cls) -> str | None:
        return unavailable_reason()

    def __init__(self, d_model: int, config: FLAConfig, layer_idx: int = 0) -> None:
        super().__init__(d_model, config, layer_idx)
        reason = self.unavailable()
        if reason is not None:
            raise ConfigError(f"mixer {config.name!r} {reason}; on this machine choose a built-in mixer instead")
        layers = importlib.import_module("fla.layers")
        kwargs = {"hidden_size": d_model, self.head_arg: config.num_heads, "layer_idx": 0}
        kwargs.update({**self.defaults, **self.derived_args(d_model, config), **config.options})
        if self.takes_mode:
            kwargs["mode"] = config.mode
        self.layer = getattr(layers, self.fla_class)(**kwargs)
        self._state_numel: int | None = None

    def derived_args(self, d_model: int, config: FLAConfig) -> dict[str, Any]:
        """Constructor arguments that follow from d_model and the head count (none by default)."""
        return {}

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        if state is None and return_state:
            from fla.models.utils import Cache

            state = Cache()
        out = self.layer(x, past_key_values=state, use_cache=return_state)
        return out[0], (out[2] if return_state else None)

    def state_size(self, seq_len: int) -> int:
        """Numbers in the layer's recurrent state (constant in length), measured once on a one-token input."""
        if self._state_numel is None:
            param = next(self.parameters())
            with torch.no_grad():
                _, cache = self(torch.zeros(1, 1, self.d_model, device=param.device, dtype=param.dtype))
            entry = cache[0]
            values = entry.values() if isinstance(entry, dict) else entry
            self._state_numel = sum(_numel(v) for v in values)
        return self._state_numel


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(v) for v in value)
    return 0


def _fla_mixer(
    class_name: str, head_arg: str = "num_heads", takes_mode: bool = True, defaults: dict[str, Any] | None = None
) -> type[FLAMixer]:
    attrs = {"fla_class": class_name, "head_arg": head_arg, "takes_mode": takes_mode, "defaults": defaults or {}}
    return type(f"FLA{class_name}", (FLAMixer,), {**attrs, "__module__": __name__})


class Mamba2(FLAMixer):
    """fla's Mamba-2: its head dim follows from the head count, ``expand * d_model / num_heads``."""

    fla_class = "Mamba2"
    takes_mode = False

    def derived_args(self, d_model: int, config: FLAConfig) -> dict[str, Any]:
        if "head_dim" in config.options:
            return {}
        expand = config.options.get("expand", 2)
        if (expand * d_model) % config.num_heads:
            raise ConfigError(
                f"fla_mamba2: expand * d_model = {expand * d_model} is not divisible by num_heads={config.num_heads}; "
                "change model.mixer.num_heads or set model.mixer.options.head_dim"
            )
        return {"head_dim": expand * d_model // config.num_heads}

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        """fla's Mamba-2 continues a cached sequence one token per call only; a longer continuation is stepped
        through token by token, so the contract's "continue with a chunk" holds (a prompt still runs whole)."""
        if state is None or len(state) == 0 or x.shape[1] == 1:
            return super().forward(x, state, return_state)
        outs = []
        for t in range(x.shape[1]):
            y, state = super().forward(x[:, t : t + 1], state, True)
            outs.append(y)
        return torch.cat(outs, dim=1), (state if return_state else None)


def gated_backward_broken() -> str | None:
    """fla 0.6 refuses the backward of its gated delta-rule kernels on Hopper GPUs with Triton >= 3.4, < 3.7.1
    (wrong gradients, fla issue #640) unless tilelang is installed: such a mixer cannot train there."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    if importlib.util.find_spec("tilelang") is not None:
        return None
    import triton

    version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:3])
    if (3, 4, 0) <= version < (3, 7, 1):
        return (
            f"cannot train on a Hopper GPU with Triton {triton.__version__}: fla refuses its gated backward there "
            "(wrong gradients, fla issue #640); upgrade Triton to >= 3.7.1 or pip install tilelang"
        )
    return None


class GatedDeltaNet(FLAMixer):
    """fla's gated DeltaNet; unavailable where fla's gated backward is known to be wrong (see above)."""

    fla_class = "GatedDeltaNet"

    @classmethod
    def unavailable(cls) -> str | None:
        return unavailable_reason() or gated_backward_broken()


GatedLinearAttention = _fla_mixer("GatedLinearAttention")
RWKV6 = _fla_mixer("RWKV6Attention")
# fla zero-initialises RWKV-7's output projection (as RWKV-LM's v7 does), so a fresh layer outputs 0: the contract
# checks it with that matrix made random (its failure "output ignores its inputs" on an H100 was that, not a leak).
# fla's RWKV-7 sizes heads by head_dim=64 unless told otherwise, and needs a depth for its layer-wise init; each of
# our mixers is its own fla "layer 0" (one cache per mixer), so every layer gets the first layer's initialisation
RWKV7 = _fla_mixer("RWKV7Attention", defaults={"head_dim": None, "num_hidden_layers": 2})
DeltaNet = _fla_mixer("DeltaNet")
HGRN2 = _fla_mixer("HGRN2Attention", defaults={"expand_ratio": None})  # else expand_ratio=128 sets the heads
Retention = _fla_mixer("MultiScaleRetention")
