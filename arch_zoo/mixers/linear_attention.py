"""Linear attention, the "Linear Transformer" (Katharopoulos, Vyas, Pappas, Fleuret; ICML 2020, arXiv 2006.16236).

Softmax attention weighs value ``v_j`` by ``exp(q_i . k_j)``; linear attention replaces the exponential by a dot
product of feature maps, ``phi(q_i) . phi(k_j)``, so that the sum over the past factors through a matrix that does
not depend on ``i``. Per head (``dk = dv = d_model / n_heads``)::

    q, k, v = W_q x, W_k x, W_v x;     Q = phi(q),  K = phi(k)
    S_i = S_{i-1} + K_i^T v_i   [dk, dv],      z_i = z_{i-1} + K_i   [dk]
    y_i = Q_i S_i / (Q_i . z_i + eps);         out = W_o concat_heads(y)

The paper's ``phi(x) = elu(x) + 1`` keeps features positive, so the normaliser ``Q_i . z_i`` is positive and the
layer is an average of values like softmax attention (without the ``1/sqrt(dk)`` scaling: the feature map replaces
the exponential, not the logits).

Training forms (``mode``): ``parallel``, the masked quadratic form ``((Q K^T) * M) [v | 1]``: ``O(T^2 d)`` time,
``O(T^2)`` memory per head; ``chunkwise``, quadratic inside chunks of ``chunk_size`` tokens with ``(S, z)`` carried
across them: ``O(T L d + T d^2 / H)``. The normaliser is the same product with a column of ones appended to ``v``,
so numerator and denominator come out of one pass. Decoding form (``recurrent``): the recurrence above,
``O(d^2 / H)`` per token. State per sequence: ``S`` and ``z``, ``H dk dv + H dk = d^2 / H + d`` numbers, constant in
``T``. All forms continue from a state and compute the same function.

Config (defaults: the paper):
    n_heads: number of heads (8, as in the reference implementation's examples); each has ``d_model / n_heads``
        channels.
    feature_map: ``elu`` (``elu(x) + 1``, the paper), ``relu`` (``max(x, 0)``) or ``identity`` (``x``: plain
        linear attention, only without the normaliser, since ``Q . z`` then has no sign and can vanish).
    normalize: divide by ``Q_i . z_i + eps`` (true, the paper); false leaves the raw numerator ``Q_i S_i``.
    eps: added to the normaliser (1e-6, the reference implementation); with ``relu`` it decides the output when
        every feature is zero.
    mode: ``chunkwise`` (default), ``parallel`` or ``recurrent``: the form of a call. A continued call of one token
        always steps recurrently; a continued call of several tokens runs chunkwise unless ``mode`` is recurrent.
    chunk_size: tokens per chunk of the chunkwise form (64).
    bias: biases on the four projections (false: the paper's equations ``Q = x W_Q``; its code has them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer
from arch_zoo.layers import at_least_float32
from arch_zoo.registry import register_mixer

MODES = ("parallel", "chunkwise", "recurrent")


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``, as ``x + 1`` / ``exp(x)``: written as a sum, ``(exp(x) - 1) + 1`` cancels to 0 in float32 for
    x below about -17, and a query whose features all vanish reads 0 / eps instead of its average."""
    # clamp: the branch not taken must stay finite, or its gradient (0 * inf) would be nan
    return torch.where(x > 0, x + 1, torch.exp(x.clamp(max=0)))


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": _elu_plus_one,
    "relu": F.relu,
    "identity": lambda x: x,
}

# ----------------------------------------------------------------------------------------------------------------
# The linear-attention core: causal, unnormalised. Head-first layout: q, k [B, H, T, dk] (feature maps applied),
# v [B, H, T, dv], state S [B, H, dk, dv]. o_i = q_i S_i with S_i = S_{i-1} + k_i^T v_i, from an optional S_0.
# ----------------------------------------------------------------------------------------------------------------


def parallel_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``o = tril(q k^T) v + q S_0``: the masked quadratic form, ``O(T^2)`` per head."""
    out_dtype = v.dtype
    q, k, v = at_least_float32(q, k, v)
    o = (q @ k.transpose(-1, -2)).tril() @ v
    if initial_state is not None:
        o = o + q @ initial_state
    state = None
    if output_final_state:
        state = k.transpose(-1, -2) @ v
        if initial_state is not None:
            state = state + initial_state
    return o.to(out_dtype), state


def chunkwise_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quadratic inside chunks of ``chunk_size`` tokens (all at once), ``S`` carried across chunk boundaries by a
    prefix sum of the chunks' ``k^T v``; a last partial chunk continues from the final full chunk's state."""
    out_dtype = v.dtype
    q, k, v = at_least_float32(q, k, v)
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    L = max(1, min(chunk_size, T))
    N = T // L
    full = N * L
    state = initial_state
    outputs = []
    if N:
        qc, kc = q[..., :full, :].reshape(B, H, N, L, dk), k[..., :full, :].reshape(B, H, N, L, dk)
        vc = v[..., :full, :].reshape(B, H, N, L, dv)
        o = (qc @ kc.transpose(-1, -2)).tril() @ vc
        writes = kc.transpose(-1, -2) @ vc  # [B, H, N, dk, dv]: each chunk's k^T v
        after = writes.cumsum(2)  # the state after each chunk (without S_0)
        before = after - writes
        if state is not None:
            before = before + state[:, :, None]
        o = o + qc @ before
        outputs.append(o.reshape(B, H, full, dv))
        state = after[:, :, -1] + (state if state is not None else 0)
    if full < T:
        o, state = parallel_linear_attention(q[..., full:, :], k[..., full:, :], v[..., full:, :], state)
        outputs.append(o)
    return torch.cat(outputs, dim=2).to(out_dtype), (state if output_final_state else None)


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``S_i = S_{i-1} + k_i^T v_i``, ``o_i = q_i S_i``, one token at a time: ``O(dk dv)`` per token and head."""
    out_dtype = v.dtype
    q, k, v = at_least_float32(q, k, v)
    B, H, T, dk = q.shape
    state = initial_state if initial_state is not None else q.new_zeros(B, H, dk, v.shape[-1])
    outputs = []
    for t in range(T):
        state = state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((q[:, :, t, None, :] @ state).squeeze(-2))
    return torch.stack(outputs, dim=2).to(out_dtype), (state if output_final_state else None)


@dataclass
class LinearAttentionConfig(MixerConfig):
    """Katharopoulos et al.'s causal linear attention; the module docstring describes every field."""

    n_heads: int = 8
    feature_map: str = "elu"  # elu (elu + 1) | relu | identity
    normalize: bool = True  # divide by phi(q) . sum phi(k) + eps
    eps: float = 1e-6
    mode: str = "chunkwise"  # parallel | chunkwise | recurrent
    chunk_size: int = 64
    bias: bool = False

    def check(self, d_model: int) -> None:
        if self.n_heads <= 0 or d_model % self.n_heads:
            raise ConfigError(
                f"linear_attention: d_model={d_model} is not divisible by n_heads={self.n_heads}; "
                f"set model.mixer.n_heads to a divisor of {d_model}"
            )
        if self.feature_map not in FEATURE_MAPS:
            raise ConfigError(
                f"linear_attention: feature_map={self.feature_map!r} is not one of {', '.join(FEATURE_MAPS)}"
            )
        if self.mode not in MODES:
            raise ConfigError(f"linear_attention: mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.chunk_size < 1:
            raise ConfigError(f"linear_attention: chunk_size={self.chunk_size} must be at least 1")
        if self.eps < 0:
            raise ConfigError(f"linear_attention: eps={self.eps} must be >= 0")
        if self.normalize and self.feature_map == "identity":
            raise ConfigError(
                "linear_attention: feature_map=identity gives a normaliser q . sum(k) of either sign, which can "
                "vanish; set model.mixer.normalize=false, or choose feature_map=elu or relu"
            )

    @classmethod
    def small(cls) -> LinearAttentionConfig:
        return cls(n_heads=4, chunk_size=16)


@register_mixer("linear_attention")
class LinearAttention(TokenMixer):
    config_class = LinearAttentionConfig

    def __init__(self, d_model: int, config: LinearAttentionConfig, layer_idx: int = 0) -> None:
        super().__init__(d_model, config, layer_idx)
        self.n_heads = config.n_heads
        self.head_dim = d_model // config.n_heads
        self.feature_map = FEATURE_MAPS[config.feature_map]
        self.q_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        c = self.config
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q = self.feature_map(self.q_proj(x).view(B, T, H, d).transpose(1, 2))
        k = self.feature_map(self.k_proj(x).view(B, T, H, d).transpose(1, 2))
        v = self.v_proj(x).view(B, T, H, d).transpose(1, 2)
        q, k, v = at_least_float32(q, k, v)  # and the division below: in half precision the sums overflow
        s0 = None
        if c.normalize:  # a column of ones after v: the same product then also gives q . z
            v = torch.cat((v, v.new_ones(B, H, T, 1)), dim=-1)
            s0 = None if state is None else torch.cat((state["S"], state["z"][..., None]), dim=-1)
        elif state is not None:
            s0 = state["S"]

        if c.mode == "recurrent" or (state is not None and T == 1):
            o, s = recurrent_linear_attention(q, k, v, s0, return_state)
        elif c.mode == "parallel" and state is None:
            o, s = parallel_linear_attention(q, k, v, s0, return_state)
        else:  # memory bounded by the chunk, also when continuing a long prompt
            o, s = chunkwise_linear_attention(q, k, v, s0, return_state, c.chunk_size)
        if c.normalize:
            o = o[..., :d] / (o[..., d:] + c.eps)
        y = self.out_proj(o.to(x.dtype).transpose(1, 2).reshape(B, T, self.d_model))
        if not return_state:
            return y, None
        if c.normalize:
            return y, {"S": s[..., :d], "z": s[..., d]}
        return y, {"S": s, "z": None}

    def state_size(self, seq_len: int) -> int:
        H, d = self.n_heads, self.head_dim
        return H * d * d + (H * d if self.config.normalize else 0)  # S, and z for the normaliser
