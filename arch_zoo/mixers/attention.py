"""The Transformer's causal softmax attention (Vaswani et al. 2017) with rotary positions (Su et al. 2021).

Training runs through ``scaled_dot_product_attention`` (FlashAttention on GPUs); decoding continues from a KV
cache, so its state grows linearly with length: the cost RetNet is designed to remove.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer
from arch_zoo.layers import cached_rotary_cos_sin, rotate_pairs
from arch_zoo.registry import register_mixer


@dataclass
class AttentionConfig(MixerConfig):
    n_heads: int = 4
    rotary: bool = True
    rotary_base: float = 10000.0
    bias: bool = False
    dropout: float = 0.0

    def check(self, d_model: int) -> None:
        if self.n_heads <= 0 or d_model % self.n_heads:
            raise ConfigError(
                f"transformer: d_model={d_model} is not divisible by n_heads={self.n_heads}; "
                f"set model.mixer.n_heads to a divisor of {d_model}"
            )
        if self.rotary and (d_model // self.n_heads) % 2:
            raise ConfigError("transformer: rotary positions need an even head dim; change n_heads or rotary=false")


@register_mixer("transformer")
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

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
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

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.d_model  # keys and values of every past token
