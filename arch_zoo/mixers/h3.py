"""H3, "Hungry Hungry Hippos" (Fu, Dao, Saab, Thomas, Rudra, Re; ICLR 2023, arXiv 2212.14052).

For each head ``h`` of ``head_dim`` channels ``i, j``::

    q, k, v = W_q x, W_k x, W_v x
    k      <- shift_ssm(k) + D_k * k              # per channel: a learned causal FIR of length d_state
    kv_ij  = k_i * v_j                            # outer product per head (elementwise when head_dim = 1)
    s_ij   = diag_ssm_h(kv_ij) + D_h * kv_ij      # S4D: one diagonal SSM per head, shared by its channels
    y_j    = sum_i q_i * s_ij;   out = W_o y

Why: the shift SSM lets a key see the few tokens before it, the diagonal SSM carries the products ``k*v`` over
the whole sequence, and the multiplications by ``v`` and ``q`` let the layer compare tokens; together they recall
a value stored after a key, which SSMs alone cannot (the paper's associative-recall and induction-head tasks).

Training form: both SSMs are convolutions. The shift SSM's kernel is its taps; the diagonal SSM's kernel is
``K_l = C diag(A_bar)^l B_bar`` (the Vandermonde product of S4D, computed as a product of two ``sqrt(T)``-sized
Vandermonde factors). Both are applied by FFT long convolution: ``O(T log T)`` time.
Decoding form: the recurrences, ``O(1)`` per token. The shift SSM is a shift register (we keep the last
``d_state - 1`` keys, all its next output reads); the diagonal SSM keeps ``x_t = A_bar x_{t-1} + B_bar u_t`` for
each of the ``head_dim^2`` channels of each head. A chunk continues from a state by an FFT over the chunk plus the
state's decaying contribution ``C A_bar^(t+1) x_0``, so chunked, token-wise and whole-sequence runs agree.

State size (numbers per sequence, a complex number counting two): ``d_model * (d_state - 1)`` for the shift
register plus ``(d_model / head_dim) * head_dim^2 * d_state`` for the diagonal SSM; constant in ``T``.

Config (defaults: the paper and its reference code):
    d_state: state size ``N`` of both SSMs (64). A complex diagonal SSM has ``N/2`` modes in conjugate pairs and
        outputs ``2 Re(C x)``, so it holds ``N`` real numbers like the real one.
    head_dim: channels per head (1: ``k*v`` is elementwise, the H3 paper's and reference config's default). The
        RetNet paper's Table 5 ran H3 with head dim 8 (``sweeps/configs/arch/h3.yaml`` sets it).
    complex_ssm: S4D-Lin init ``A_n = -1/2 + i pi n`` (true, the reference config's ``diag-lin``); false: S4D-Real,
        ``A_n = -(n+1)`` with ``N`` real modes.
    discretization: ``bilinear`` (``A_bar = (1 + dt A/2) / (1 - dt A/2)``, ``B_bar = dt B / (1 - dt A/2)``: the
        default of the reference code's diagonal kernel, ``SSKernelDiag(disc='bilinear')``, which the H3 layer
        never overrides) or ``zoh`` (S4D's choice: ``A_bar = exp(dt A)``, ``B_bar = (A_bar - 1) / A * B``).
    dt_min, dt_max: each head's step ``dt`` is drawn log-uniformly in ``[dt_min, dt_max]``.
    ssm_lr: cap on the learning rate of ``dt``, ``A`` and ``B`` of the diagonal SSM, which are trained without
        weight decay: their peak rate is ``min(ssm_lr, optim.lr)``, the reference config's
        ``lr: min(0.001, optimizer.lr)``. ``None``: the base learning rate.

Differences from the reference code, neither changing the function class: the shift SSM's input vector ``B`` is
fixed to ``e_1`` (the reference also trains it, an over-parameterisation of the same FIR); output channels are
ordered ``(head, j)`` rather than ``(j, head)``, a permutation absorbed by ``W_o``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer, set_optim
from arch_zoo.convolutions import causal_conv_tail, fft_causal_conv, keep_last
from arch_zoo.flops import linear_flops
from arch_zoo.registry import register_mixer


@dataclass
class H3Config(MixerConfig):
    d_state: int = 64
    head_dim: int = 1
    complex_ssm: bool = True
    discretization: str = "bilinear"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    ssm_lr: float | None = 1e-3

    def check(self, d_model: int) -> None:
        if self.head_dim <= 0 or d_model % self.head_dim:
            raise ConfigError(
                f"h3: d_model={d_model} is not divisible by head_dim={self.head_dim}; "
                f"set model.mixer.head_dim to a divisor of {d_model}"
            )
        if self.d_state <= 0 or (self.complex_ssm and self.d_state % 2):
            raise ConfigError(
                f"h3: d_state={self.d_state} must be positive, and even when complex_ssm=true (conjugate pairs); "
                "set model.mixer.d_state to an even number or model.mixer.complex_ssm=false"
            )
        if self.discretization not in ("zoh", "bilinear"):
            raise ConfigError(f"h3: unknown discretization {self.discretization!r}; choose zoh or bilinear")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"h3: need 0 < dt_min <= dt_max, got {self.dt_min} and {self.dt_max}")


def _powers(log_a: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """``a^start .. a^(start+length-1)`` along a new last dim, as ``exp(l * log a)`` (a Vandermonde matrix)."""
    exponents = torch.arange(start, start + length, device=log_a.device, dtype=log_a.real.dtype)
    return torch.exp(log_a[..., None] * exponents)


def _vandermonde_sum(coef: torch.Tensor, log_a: torch.Tensor, length: int) -> torch.Tensor:
    """``sum_n coef[..., n] * a[..., n]^l`` for ``l < length``, without the ``[..., n, length]`` Vandermonde matrix.

    Writing ``l = i + b j`` with ``b ~ sqrt(length)`` makes the sum a batched matrix product of
    ``coef a^i`` and ``a^(b j)``: ``O(n sqrt(length))`` exponentials and memory instead of ``O(n length)``.
    """
    b = math.isqrt(max(length - 1, 0)) + 1
    inner = coef[..., None] * _powers(log_a, 0, b)  # [..., n, b]: coef a^i
    outer = _powers(log_a * b, 0, -(-length // b))  # [..., n, ceil(length / b)]: a^(b j)
    return (outer.transpose(-1, -2) @ inner).flatten(-2)[..., :length]  # [..., j, i] -> l = b j + i


class DiagonalSSM(nn.Module):
    """``n_ssm`` independent S4D SSMs ``x_t = A_bar x_{t-1} + B_bar u_t``, ``y_t = C x_t`` (``2 Re`` if complex).

    ``forward`` maps ``u: [B, n_ssm, channels, T]`` (each SSM shared by its ``channels``) to ``y`` of the same
    shape, from an optional state ``[B, n_ssm, channels, modes]``. Complex parameters are stored as real pairs
    so that ``.to(dtype)`` and optimisers treat them like any other tensor.
    """

    def __init__(self, n_ssm: int, config: H3Config) -> None:
        super().__init__()
        self.complex = config.complex_ssm
        self.discretization = config.discretization
        modes = config.d_state // 2 if self.complex else config.d_state
        n = torch.arange(modes, dtype=torch.float32).expand(n_ssm, modes)
        log_dt = torch.rand(n_ssm) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min)
        self.log_dt = nn.Parameter(log_dt)
        if self.complex:  # S4D-Lin
            self.log_A_real = nn.Parameter(torch.full((n_ssm, modes), math.log(0.5)))
            self.A_imag = nn.Parameter(math.pi * n.clone())
            self.B = nn.Parameter(torch.view_as_real(torch.ones(n_ssm, modes, dtype=torch.cfloat)).clone())
            self.C = nn.Parameter(torch.view_as_real(torch.randn(n_ssm, modes, dtype=torch.cfloat)).clone())
        else:  # S4D-Real
            self.log_A_real = nn.Parameter(torch.log(n + 1))
            self.A_imag = None
            self.B = nn.Parameter(torch.ones(n_ssm, modes))
            self.C = nn.Parameter(torch.randn(n_ssm, modes))
        # The reference trains dt, A and B at min(1e-3, base lr) and without weight decay.
        lr = {} if config.ssm_lr is None else {"lr_max": config.ssm_lr}
        for p in (self.log_dt, self.log_A_real, self.A_imag, self.B):
            if p is not None:
                set_optim(p, weight_decay=0.0, **lr)

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log A_bar, B_bar, C)``, each ``[n_ssm, modes]``; ``A_bar^l = exp(l log A_bar)``."""
        dt = self.log_dt.exp()[:, None]
        A = -self.log_A_real.exp()
        B, C = self.B, self.C
        if self.complex:
            A = torch.complex(A, self.A_imag)
            B, C = torch.view_as_complex(B), torch.view_as_complex(C)
        dtA = dt * A
        if self.discretization == "zoh":  # exact for inputs held constant over each step
            return dtA, torch.expm1(dtA) / A * B, C
        return torch.log((1 + dtA / 2) / (1 - dtA / 2)), dt * B / (1 - dtA / 2), C

    def _real(self, y: torch.Tensor) -> torch.Tensor:
        return 2 * y.real if self.complex else y  # the conjugate modes add the complex conjugate

    def kernel(self, length: int) -> torch.Tensor:
        """The convolution kernel ``K_l = C A_bar^l B_bar``, ``[n_ssm, length]``."""
        log_dA, dB, C = self.discretize()
        return self._real(_vandermonde_sum(C * dB, log_dA, length))

    def forward(
        self, u: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = u.shape[-1]
        log_dA, dB, C = self.discretize()
        if state is not None and T == 1:  # the recurrence: O(1) per token
            x = log_dA.exp()[:, None] * state + dB[:, None] * u.to(dB.dtype)
            return self._real((C[:, None] * x).sum(-1, keepdim=True)).to(u.dtype), x
        y = fft_causal_conv(u, self._real(_vandermonde_sum(C * dB, log_dA, T))[:, None])
        if state is None and not return_state:  # training
            return y, None
        powers = _powers(log_dA, 0, T)  # [n_ssm, modes, T]
        if state is not None:  # the initial state decays into the chunk: C A_bar^(t+1) x_0
            decay = C[..., None] * powers * log_dA.exp()[..., None]
            y = y + self._real(torch.einsum("bhcn,hnt->bhct", state, decay)).to(y.dtype)
        if not return_state:
            return y, None
        # x_{T-1} = A_bar^T x_0 + sum_s A_bar^(T-1-s) B_bar u_s
        x = torch.einsum("bhct,hnt->bhcn", u.to(dB.dtype), dB[..., None] * powers.flip(-1))
        if state is not None:
            x = x + (log_dA * T).exp()[:, None] * state
        return y, x


@register_mixer("h3")
class H3(TokenMixer):
    config_class = H3Config

    def __init__(self, d_model: int, config: H3Config, layer_idx: int = 0) -> None:
        super().__init__(d_model, config, layer_idx)
        self.head_dim = config.head_dim
        self.n_heads = d_model // config.head_dim
        self.in_proj = nn.Linear(d_model, 3 * d_model)  # q, k, v
        # Shift SSM: A = shift, B = e_1, so its kernel is C itself; tap 0 weighs the current key.
        bound = 1 / math.sqrt(config.d_state)  # nn.Conv1d's init for a length-d_state filter
        self.shift_kernel = nn.Parameter(torch.empty(d_model, config.d_state).uniform_(-bound, bound))
        self.shift_skip = nn.Parameter(torch.randn(d_model))
        self.ssm = DiagonalSSM(self.n_heads, config)
        self.ssm_skip = nn.Parameter(torch.randn(self.n_heads))
        self.out_proj = nn.Linear(d_model, d_model)
        for linear in (self.in_proj, self.out_proj):  # the reference language model's init of every Linear
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        B, T, D = x.shape
        H, d = self.n_heads, self.head_dim
        q, k, v = self.in_proj(x).view(B, T, 3, D).permute(2, 0, 3, 1)  # each [B, D, T]
        if state is None:
            keys = k
            shifted = fft_causal_conv(k, self.shift_kernel)
        else:
            keys = torch.cat((state["shift"], k), dim=-1)
            shifted = causal_conv_tail(keys, self.shift_kernel, T)
        k = shifted + self.shift_skip[:, None] * k
        kv = (k.reshape(B, H, d, 1, T) * v.reshape(B, H, 1, d, T)).reshape(B, H, d * d, T)
        s, ssm_state = self.ssm(kv, None if state is None else state["ssm"], return_state)
        s = s + self.ssm_skip[:, None, None] * kv
        y = (q.reshape(B, H, d, 1, T) * s.view(B, H, d, d, T)).sum(2)  # [B, H, d, T]
        y = self.out_proj(y.reshape(B, D, T).transpose(1, 2))
        if not return_state:
            return y, None
        return y, {"shift": keep_last(keys, self.config.d_state - 1), "ssm": ssm_state}

    def state_size(self, seq_len: int) -> int:
        N = self.config.d_state
        return self.d_model * (N - 1) + self.n_heads * self.head_dim**2 * N

    def flops_per_token(self, seq_len: int) -> float:
        """The input and output projections. The shift and diagonal SSMs run as FFT convolutions, the per-head
        ``k v^T`` and its read by ``q`` are element-wise, and the SSM kernel is shared by the batch (see
        :mod:`arch_zoo.flops`)."""
        return linear_flops(self.in_proj, self.out_proj)
