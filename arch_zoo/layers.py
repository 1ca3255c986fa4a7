"""Parts shared by the model and the mixers: norms and the block's feed-forward network (FFN).

FFN kinds live in a small registry so that a mixer file can contribute the FFN of its paper (RWKV's channel mix)
without the model knowing about it. An FFN follows the same state contract as a mixer, because some (RWKV's
channel mix) look at the previous token: ``forward(x, state=None, return_state=True) -> (y, state)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo.errors import ConfigError
from arch_zoo.flops import linear_flops
from arch_zoo.kernels.core import at_least_float32  # noqa: F401 - shared by the mixers; defined beside the core


class RMSNorm(nn.Module):
    """Root-mean-square norm with an optional affine weight, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y.to(dtype)
        return y * self.weight if self.weight is not None else y


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ConfigError(f"unknown norm {kind!r}; choose layernorm or rmsnorm")


@dataclass
class FFNConfig:
    """The block's channel mixer. ``mult`` sets the hidden width as a multiple of d_model.

    kinds: ``gelu`` (2 matrices, the RetNet paper's FFN), ``relu``, ``swiglu``/``geglu`` (3 matrices),
    ``none`` (no FFN), plus kinds registered by mixers (e.g. ``rwkv_channel``).
    """

    kind: str = "gelu"
    mult: float = 2.0
    bias: bool = False
    dropout: float = 0.0
    hidden_size: int | None = None  # set, it wins over mult (the model sets it to match a parameter budget)
    n_layers: int | None = None  # the model's depth, set by the model: an FFN whose init depends on it reads it

    def hidden(self, d_model: int) -> int:
        if self.hidden_size is not None:
            return self.hidden_size
        return max(1, int(round(self.mult * d_model)))


FFNFactory = Callable[[int, FFNConfig, int], nn.Module]
_FFN_KINDS: dict[str, FFNFactory] = {}


def register_ffn(kind: str) -> Callable[[FFNFactory], FFNFactory]:
    def decorate(factory: FFNFactory) -> FFNFactory:
        _FFN_KINDS[kind] = factory
        return factory

    return decorate


def ffn_kinds() -> list[str]:
    import arch_zoo.mixers  # noqa: F401  - mixers may contribute FFN kinds

    return sorted(_FFN_KINDS)


def build_ffn(config: FFNConfig, d_model: int, layer_idx: int = 0) -> nn.Module | None:
    if config.kind == "none":
        return None
    kinds = ffn_kinds()
    if config.kind not in _FFN_KINDS:
        raise ConfigError(f"unknown FFN kind {config.kind!r}; registered kinds: {', '.join(kinds + ['none'])}")
    return _FFN_KINDS[config.kind](d_model, config, layer_idx)


class MLP(nn.Module):
    """Position-wise FFN: ``W2 act(W1 x)``, or the gated ``W2 (act(W1 x) * W3 x)``."""

    def __init__(self, d_model: int, config: FFNConfig, act: Callable[[torch.Tensor], torch.Tensor], gated: bool):
        super().__init__()
        hidden = config.hidden(d_model)
        self.act = act
        self.fc1 = nn.Linear(d_model, hidden, bias=config.bias)
        self.gate = nn.Linear(d_model, hidden, bias=config.bias) if gated else None
        self.fc2 = nn.Linear(hidden, d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        h = self.act(self.fc1(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.fc2(self.dropout(h)), None

    def flops_per_token(self, seq_len: int) -> float:
        return linear_flops(self.fc1, self.gate, self.fc2)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


for _kind, _act, _gated in [
    ("gelu", F.gelu, False),
    ("relu", F.relu, False),
    ("relu2", _relu2, False),
    ("swiglu", F.silu, True),
    ("geglu", F.gelu, True),
]:
    register_ffn(_kind)(lambda d, c, i, _a=_act, _g=_gated: MLP(d, c, _a, _g))


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate pairs of channels of ``x [..., T, D]`` by the angles whose cos/sin are ``[T, D/2]``.

    ``interleaved`` pairs (x0, x1), (x2, x3), ... (GPT-J / torchscale); otherwise the halves (x_i, x_{i+D/2})
    (GPT-NeoX / RoPE). Either way ``q_n . k_m`` depends on positions only through ``n - m``.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_cos_sin(
    inv_freq: torch.Tensor, start: int | torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[length, D/2]`` for positions ``start .. start+length-1`` (angles computed in float64).

    ``start`` may be a 0-d tensor on ``inv_freq``'s device: a decoding step then reads its position from memory,
    which is what lets a CUDA graph replay it at every position."""
    pos = start + torch.arange(length, device=inv_freq.device, dtype=torch.float64)
    angles = pos[:, None] * inv_freq.double()[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


_ROTARY_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def cached_rotary_cos_sin(
    name: tuple, inv_freq: torch.Tensor, start: int | torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_cos_sin`` sliced from a table made once per frequency set (``name``, which must identify
    ``inv_freq``'s values), device and dtype, and shared by every layer.

    Why: recomputed per call, the float64 cos/sin is work that a compiler fuses into the rotation kernel itself,
    where it is redone for every head and again in the backward (4% of a compiled RetNet training step at 8k on an
    H100). A position given as a tensor (a captured decoding step: one token) is still computed on the fly.
    """
    if isinstance(start, torch.Tensor):
        return rotary_cos_sin(inv_freq, start, length, dtype)
    return _rotary_slice(repr(name), inv_freq, start, length, dtype)


# A registered operator, opaque to a compiler: traced through, the cache lookup became a guard that the first call's
# own filling of the cache broke, so a compiled model compiled twice (the whole model, at its second step). The
# slice comes back as a copy ([length, D/2], a few microseconds): an operator's result may not alias memory it keeps.
@torch.library.custom_op("arch_zoo::rotary_slice", mutates_args=())
def _rotary_slice(
    name: str, inv_freq: torch.Tensor, start: int, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    end = start + length
    key = (name, inv_freq.device, dtype)
    table = _ROTARY_TABLES.get(key)
    if table is None or table[0].shape[0] < end:
        table = rotary_cos_sin(inv_freq, 0, 1 << max(end - 1, 1).bit_length(), dtype)  # a power of two >= end
        _ROTARY_TABLES[key] = table
    return table[0][start:end].clone(), table[1][start:end].clone()


@_rotary_slice.register_fake
def _(name, inv_freq, start, length, dtype):
    shape = (length, inv_freq.shape[0])
    return inv_freq.new_empty(shape, dtype=dtype), inv_freq.new_empty(shape, dtype=dtype)


@torch.library.custom_op("arch_zoo::summed_input_grad", mutates_args=())
def _summed_input_grad(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i grads[i] @ weights[i]``, each product after the first adding into the first one's output in place (a
    matrix product with beta = 1): no gradient per product is written and then read back to be summed. Opaque to
    the compiler, which would otherwise rewrite the in-place chain as out-of-place products and copies."""
    out = torch.mm(grads[0], weights[0])
    for g, w in zip(grads[1:], weights[1:], strict=True):
        out.addmm_(g, w)
    return out


@_summed_input_grad.register_fake
def _(grads, weights):
    return grads[0].new_empty(grads[0].shape[0], weights[0].shape[1])


class _SharedInputLinears(torch.autograd.Function):
    """``x @ w_i^T`` for several weights, whose input gradients the backward pass sums as it makes them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        rows = [g.reshape(-1, g.shape[-1]) for g in grads]
        dx = _summed_input_grad(rows, weights).view(x.shape) if ctx.needs_input_grad[0] else None
        x_rows = x.reshape(-1, x.shape[-1])
        dws = [g.t() @ x_rows if need else None for g, need in zip(rows, ctx.needs_input_grad[1:], strict=True)]
        return dx, *dws


def shared_input_projections(x: torch.Tensor, projections: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """``[p(x) for p in projections]`` (bias-free Linears of one input), with one input gradient made in place.

    Separate Linears hand autograd one ``[tokens, d]`` input gradient per projection, which the norm before them
    then reads and sums: RetNet's four (q, k, v, gate) made its first norm's backward about 0.47 ms a layer slower
    than the Transformer's one ``qkv`` at the Table 5 shape on an H100 (docs/results/mfu.md, session 17). Here each
    input-gradient product adds into the previous one's output instead. Under autocast the products run in its dtype,
    as a Linear's do. Projections with a bias take the Linears themselves."""
    if any(p.bias is not None for p in projections):
        return [p(x) for p in projections]
    weights = [p.weight for p in projections]
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(dtype), [w.to(dtype) for w in weights]
    return list(_SharedInputLinears.apply(x, *weights))
