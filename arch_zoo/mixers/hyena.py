"""The Hyena operator (Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon, Re; ICML 2023, arXiv 2302.10866).

Of order ``N`` (2 by default)::

    x_0, ..., x_{N-1}, v = short_conv(W_in u)     # N+1 streams of d_model channels, depthwise causal conv (len 3)
    for n = N-1 .. 1:  v <- h_n * (x_n . v) + b_n . (x_n . v)      # FFT long convolution with a bias skip
    y = W_out (x_0 . v)                            # so for N = 2: y = W_out(x_0 . (h * (x_1 . v) + b . x_1 . v))

The long filters ``h_n`` are implicit: ``h[t] = MLP(z_t) . exp(-|delta| s_t)``, where ``s_t = t / (l_max - 1)``
is the normalised position, ``z_t`` holds ``s_t`` and ``(emb_dim - 1) / 2`` cosine/sine bands of ``t / l_max``,
the MLP has sine activations (one shared, trained frequency vector), and the exponential window, with a decay
rate per channel, biases the filters towards recent tokens to a different degree in each channel. Parameters
grow with the MLP, not with the filter length, so a filter as long as the sequence costs no more parameters than
a short one.

Training form: FFT long convolutions, ``O(T log T)``. Decoding form: there is no recurrence with a fixed-size
state (the filters are arbitrary), so the state is a cached history: the short convolution's last
``short_filter_order - 1`` inputs and every past input of each long convolution. A new token costs one dot
product per channel over its history: ``O(t)`` per token at position ``t`` (like attention), the filters being
computed once and cached while gradients are off. State size after ``T`` tokens:
``(order + 1) * d_model * (short_filter_order - 1) + (order - 1) * d_model * T`` numbers; it grows with ``T``.
Sequences are limited to ``l_max`` tokens, since the positional features are defined on ``[0, l_max)``.

Config (defaults: the paper's language models on the Pile, as in its reference configs):
    order: depth ``N`` of the recurrence of gates and long convolutions (2).
    l_max: the longest sequence; positions are normalised by it, so it is part of the function. The reference
        ties it to the training length (``l_max: ${dataset.max_length}``); ``sweeps/configs/arch/hyena.yaml`` ties
        it to ``data.block_size`` likewise. Default 2048, the RetNet paper's training length.
    filter_order: width of the filter MLP (64).
    filter_emb_dim: size of the positional features, odd: ``t`` plus ``(emb_dim-1)/2`` cosine and sine bands (33).
    filter_inner_layers: hidden ``filter_order x filter_order`` layers of the MLP (2).
    sine_freq: initial frequency of the sine activations (14).
    short_filter_order: length of the depthwise short convolution (3).
    modulate: multiply the filters by the exponential-decay window (true).
    fast_decay_pct, slow_decay_pct, decay_target: the window's decay rates span
        ``log(target)/slow .. log(target)/fast`` over the channels: the fastest channel decays to ``target`` after
        ``fast`` of ``l_max``, the slowest after ``slow`` of it (0.3, 1.5, 1e-2).
    filter_lr: learning rate of the filter MLP and sine frequencies, trained without weight decay. ``None``: the
        base learning rate (the Pile configs); the reference's synthetic-task configs use 1e-3.
    pos_emb_lr: learning rate of the positional features, trained without weight decay; ``None``: the base
        learning rate (the Pile configs); 0: frozen. Either way they are a positional table ``[l_max, emb_dim]``
        whose size follows the length, not the width, so equal-size comparisons do not count them.
    init_n_layers: the model's depth (the model fills it in): the output projection starts at
        ``N(0, 0.02 / sqrt(2 n_layers))``, the reference language model's GPT-2 rescaling of ``out_proj``; unset
        (a layer built on its own): ``N(0, 0.02)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer, exclude_from_size, set_optim
from arch_zoo.convolutions import ShortCausalConv, causal_conv_tail, fft_causal_conv
from arch_zoo.flops import linear_flops
from arch_zoo.registry import register_mixer


@dataclass
class HyenaConfig(MixerConfig):
    order: int = 2
    l_max: int = 2048
    filter_order: int = 64
    filter_emb_dim: int = 33
    filter_inner_layers: int = 2
    sine_freq: float = 14.0
    short_filter_order: int = 3
    modulate: bool = True
    fast_decay_pct: float = 0.3
    slow_decay_pct: float = 1.5
    decay_target: float = 1e-2
    filter_lr: float | None = None
    pos_emb_lr: float | None = None
    init_n_layers: int | None = None

    def for_depth(self, n_layers: int) -> HyenaConfig:
        return self if self.init_n_layers is not None else dataclasses.replace(self, init_n_layers=n_layers)

    def check(self, d_model: int) -> None:
        if self.order < 2:
            raise ConfigError(f"hyena: order={self.order} must be >= 2; set model.mixer.order")
        if self.filter_emb_dim < 3 or self.filter_emb_dim % 2 == 0:
            raise ConfigError(
                f"hyena: filter_emb_dim={self.filter_emb_dim} must be odd and >= 3 (time, then cosine/sine pairs); "
                "set model.mixer.filter_emb_dim"
            )
        for name in ("l_max", "filter_order", "short_filter_order"):
            if getattr(self, name) < 1:
                raise ConfigError(f"hyena: {name} must be >= 1; set model.mixer.{name}")
        if self.init_n_layers is not None and self.init_n_layers < 1:
            raise ConfigError("hyena: init_n_layers must be >= 1 (or null)")
        if self.filter_inner_layers < 0:
            raise ConfigError("hyena: filter_inner_layers must be >= 0")
        if not (0 < self.fast_decay_pct and 0 < self.slow_decay_pct and 0 < self.decay_target < 1):
            raise ConfigError("hyena: need fast_decay_pct > 0, slow_decay_pct > 0 and 0 < decay_target < 1")


class Sine(nn.Module):
    """``sin(freq * x)`` with a trained frequency per feature."""

    def __init__(self, width: int, freq: float) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((width,), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """``channels`` long filters of length up to ``l_max``: ``h[c, t] = MLP(z_t)[c] * exp(-|delta_c| s_t)``."""

    def __init__(self, channels: int, config: HyenaConfig) -> None:
        super().__init__()
        L, bands = config.l_max, (config.filter_emb_dim - 1) // 2
        t = torch.linspace(0, 1, L, dtype=torch.float64)[:, None]  # normalised time, [L, 1]
        angle = 2 * math.pi * torch.arange(L, dtype=torch.float64)[:, None] / L
        freqs = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, :]
        z = torch.cat((t, torch.cos(freqs * angle), -torch.sin(freqs * angle)), dim=-1).float()  # [L, emb_dim]
        t = t.float()
        if config.pos_emb_lr == 0:
            self.register_buffer("z", z)
        else:
            lr = {} if config.pos_emb_lr is None else {"lr": config.pos_emb_lr}
            self.z = exclude_from_size(set_optim(nn.Parameter(z), weight_decay=0.0, **lr))
        self.register_buffer("t", t)
        sine = Sine(config.filter_order, config.sine_freq)  # one module, so one frequency vector, for all layers
        layers: list[nn.Module] = [nn.Linear(config.filter_emb_dim, config.filter_order), sine]
        for _ in range(config.filter_inner_layers):
            layers += [nn.Linear(config.filter_order, config.filter_order), sine]
        layers.append(nn.Linear(config.filter_order, channels, bias=False))
        self.mlp = nn.Sequential(*layers)
        lr = {} if config.filter_lr is None else {"lr": config.filter_lr}
        for p in self.mlp.parameters():
            set_optim(p, weight_decay=0.0, **lr)
        self.modulate = config.modulate
        target = math.log(config.decay_target)
        self.register_buffer(
            "deltas", torch.linspace(target / config.slow_decay_pct, target / config.fast_decay_pct, channels)
        )
        self._cache: tuple[tuple[tuple[int, int], ...], torch.Tensor] | None = None

    def compute(self, length: int) -> torch.Tensor:
        """The filters at positions ``0 .. length-1``, ``[channels, length]``."""
        h = self.mlp(self.z[:length])
        if self.modulate:
            h = h * torch.exp(-self.t[:length] * self.deltas.abs())
        return h.transpose(0, 1)

    def forward(self, length: int) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.compute(length)
        # Decoding asks for the filters at every token; they change only when a tensor does (identity/version).
        key = tuple((p.data_ptr(), p._version) for p in (*self.parameters(), *self.buffers()))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.compute(self.t.shape[0]))
        return self._cache[1][:, :length]


@register_mixer("hyena")
class Hyena(TokenMixer):
    config_class = HyenaConfig

    def __init__(self, d_model: int, config: HyenaConfig, layer_idx: int = 0) -> None:
        super().__init__(d_model, config, layer_idx)
        self.order = config.order
        self.in_proj = nn.Linear(d_model, (config.order + 1) * d_model)
        self.short_conv = ShortCausalConv((config.order + 1) * d_model, config.short_filter_order)
        self.filter = ImplicitFilter((config.order - 1) * d_model, config)
        self.filter_bias = nn.Parameter(torch.randn((config.order - 1) * d_model))  # the long convs' skip
        self.out_proj = nn.Linear(d_model, d_model)
        # The reference language model initialises every Linear (the filter MLP's too) as N(0, 0.02), bias 0;
        # the sine frequency of 14 is tuned to that scale.
        for module in (self.in_proj, self.out_proj, *self.filter.mlp):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if config.init_n_layers is not None:  # the reference's residual rescaling, by its name "out_proj.weight"
            nn.init.normal_(self.out_proj.weight, std=0.02 / math.sqrt(2 * config.init_n_layers))

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        B, T, D = x.shape
        start = 0 if state is None else state["long"][0].shape[-1]
        if start + T > self.config.l_max:
            raise ConfigError(
                f"hyena: sequence of {start + T} tokens exceeds l_max={self.config.l_max}; "
                "set model.mixer.l_max to at least the longest sequence (training or generation)"
            )
        u, short_history = self.short_conv(self.in_proj(x).transpose(1, 2), None if state is None else state["short"])
        *gates, v = u.split(D, dim=1)  # each [B, D, T]
        h = self.filter(start + T).view(self.order - 1, D, start + T)
        bias = self.filter_bias.view(self.order - 1, D)
        history = []
        for n, gate in enumerate(reversed(gates[1:])):
            v = v * gate
            if state is None:
                history.append(v)
                v = fft_causal_conv(v, h[n], bias[n])
            else:
                history.append(torch.cat((state["long"][n], v), dim=-1))
                v = causal_conv_tail(history[-1], h[n], T, bias[n])
        y = self.out_proj((gates[0] * v).transpose(1, 2))
        return y, ({"short": short_history, "long": history} if return_state else None)

    @property
    def max_length(self) -> int:
        return self.config.l_max

    def state_size(self, seq_len: int) -> int:
        c = self.config
        return (c.order + 1) * self.d_model * (c.short_filter_order - 1) + (c.order - 1) * self.d_model * seq_len

    def flops_per_token(self, seq_len: int) -> float:
        """The projections and the short depthwise convolution. The long convolutions are FFTs and their implicit
        filters are computed once per call for the whole batch (see :mod:`arch_zoo.flops`)."""
        short = 2 * self.short_conv.out_channels * self.config.short_filter_order
        return linear_flops(self.in_proj, self.out_proj) + short
