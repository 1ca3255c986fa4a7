"""The Transformer's causal softmax attention (Vaswani et al. 2017) with rotary positions (Su et al. 2021).

Training runs through ``scaled_dot_product_attention`` (FlashAttention on GPUs); decoding continues from a KV
cache, so its state grows linearly with length: the cost RetNet is designed to remove. The cache comes in two
kinds: a functional one that each call extends by concatenation (what a fresh sequence builds), and a preallocated
one (:meth:`Attention.allocate_state`) written in place at a position held on the device, which a decoding loop or
a CUDA graph replays without a copy of the whole cache or a new shape per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer
from arch_zoo.flops import linear_flops
from arch_zoo.layers import cached_rotary_cos_sin, rotary_cos_sin, rotate_pairs
from arch_zoo.registry import register_mixer

KV_ATTENTIONS = ("sdpa", "matmul")
CACHE_ALIGN = 16  # SDPA's memory-efficient kernel wants the mask's last dim a multiple of 16


@dataclass
class AttentionConfig(MixerConfig):
    n_heads: int = 4
    rotary: bool = True
    rotary_base: float = 10000.0
    bias: bool = False
    dropout: float = 0.0
    # how a decoding step attends over a preallocated cache: SDPA with a mask, or two batched matmuls
    kv_attention: str = "sdpa"

    def check(self, d_model: int) -> None:
        who = self.name or "attention"  # the name it was selected by ("transformer" in older configs)
        if self.n_heads <= 0 or d_model % self.n_heads:
            raise ConfigError(
                f"{who}: d_model={d_model} is not divisible by n_heads={self.n_heads}; "
                f"set model.mixer.n_heads to a divisor of {d_model}"
            )
        if self.rotary and (d_model // self.n_heads) % 2:
            raise ConfigError(f"{who}: rotary positions need an even head dim; change n_heads or rotary=false")
        if self.kv_attention not in KV_ATTENTIONS:
            raise ConfigError(f"{who}: kv_attention={self.kv_attention!r} is not one of {', '.join(KV_ATTENTIONS)}")


# registered under its own name; "transformer", its first name, still selects it (configs, recorded runs)
@register_mixer("attention", aliases=("transformer",))
class Attention(TokenMixer):
    config_class = AttentionConfig

    def __init__(self, d_model: int, config: AttentionConfig, layer_idx: int = 0) -> None:
        super().__init__(d_model, config, layer_idx)
        self.n_heads = config.n_heads
        self.head_dim = d_model // config.n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=config.bias)
        self.out = nn.Linear(d_model, d_model, bias=config.bias)
        half = self.head_dim // 2
        inv_freq = config.rotary_base ** (-torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def allocate_state(self, batch: int, capacity: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """A KV cache for ``capacity`` tokens (rounded up to a multiple of 16), written in place: ``{"k", "v": [B, H,
        capacity, head_dim], "pos": int64 [] (tokens written, on the device), "cos", "sin": [capacity, head_dim/2]
        rotary tables, "filled": bool}``."""
        capacity = math.ceil(capacity / CACHE_ALIGN) * CACHE_ALIGN
        shape = (batch, self.n_heads, capacity, self.head_dim)
        cos, sin = (None, None)
        if self.config.rotary:  # the same float64 angles as the functional path's tables, rounded once
            cos, sin = rotary_cos_sin(self.inv_freq.to(device), 0, capacity, dtype)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": torch.zeros((), device=device, dtype=torch.long),
            "cos": cos,
            "sin": sin,
            "filled": False,
        }

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        if state is not None and "pos" in state:
            return self._continue_in_place(x, state), state
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = 0 if state is None else state["k"].shape[2]
        if self.config.rotary:
            name = ("rope", self.config.rotary_base, self.head_dim)
            cos, sin = cached_rotary_cos_sin(name, self.inv_freq, start, T, q.dtype)
            q, k = rotate_pairs(q, cos, sin, False), rotate_pairs(k, cos, sin, False)
        if state is not None:
            k = torch.cat((state["k"], k), dim=2)
            v = torch.cat((state["v"], v), dim=2)
        dropout = self.config.dropout if self.training else 0.0
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:  # query i (absolute position start+i) sees keys 0..start+i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = self.out(y.transpose(1, 2).reshape(B, T, self.d_model))
        return y, ({"k": k, "v": v} if return_state else None)

    def _continue_in_place(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Write this call's keys and values at ``pos``. The prompt (the first call) attends causally over itself
        with the training kernel; later calls attend over the whole cache with a mask ``key <= query``, so nothing
        in a decoding step depends on a host-side length."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        positions = state["pos"] + torch.arange(T, device=x.device)
        if self.config.rotary:
            cos, sin = state["cos"][positions], state["sin"][positions]
            q, k = rotate_pairs(q, cos, sin, False), rotate_pairs(k, cos, sin, False)
        state["k"].index_copy_(2, positions, k)
        state["v"].index_copy_(2, positions, v)
        if not state["filled"]:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            state["filled"] = True
        else:
            keys = torch.arange(state["k"].shape[2], device=x.device)
            visible = keys[None, :] <= positions[:, None]  # [T, capacity]: the unwritten tail is masked too
            y = self._attend(q, state["k"], state["v"], visible)
        state["pos"].add_(T)
        return self.out(y.transpose(1, 2).reshape(B, T, self.d_model))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        if self.config.kv_attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        scores = q @ k.transpose(-1, -2)  # half-precision scores: softmax in float32 (float64 stays float64)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * q.shape[-1] ** -0.5
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return weights.to(v.dtype) @ v

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.d_model  # keys and values of every past token

    def flops_per_token(self, seq_len: int) -> float:
        """The projections, plus ``Q K^T`` and ``A V`` over all ``seq_len^2`` scores (the causal half is not
        subtracted, as the usual MFU accounting and torch's counter do)."""
        return linear_flops(self.qkv, self.out) + 4 * seq_len * self.d_model
