"""A third-party mixer package, as a user would write one: a causal exponential moving average of a projection.

It registers nothing itself; the platform finds it through the ``arch_zoo.mixers`` entry point in its metadata.
"""

from dataclasses import dataclass

import torch
from torch import nn

from arch_zoo import MixerConfig, TokenMixer


@dataclass
class EMAConfig(MixerConfig):
    decay: float = 0.9


class EMAMixer(TokenMixer):
    config_class = EMAConfig

    def __init__(self, d_model: int, config: EMAConfig, layer_idx: int = 0) -> None:
        super().__init__(d_model, config, layer_idx)
        self.proj = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x, state=None, return_state=True):
        h = self.proj(x)
        acc = torch.zeros_like(h[:, 0]) if state is None else state
        outs = []
        for t in range(h.shape[1]):
            acc = self.config.decay * acc + (1 - self.config.decay) * h[:, t]
            outs.append(acc)
        return self.out(torch.stack(outs, 1)), (acc if return_state else None)

    def state_size(self, seq_len: int) -> int:
        return self.d_model

    def flops_per_token(self, seq_len: int) -> float:
        return 2 * 2 * self.d_model * self.d_model  # two d x d projections; the average is element-wise
