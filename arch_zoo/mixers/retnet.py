"""RetNet's multi-scale retention (MSR; Sun et al. 2023, arXiv 2307.08621), exact in all three paradigms.

Per head, with rotated queries/keys ``q_n, k_n`` (k scaled by ``dk^-1/2``), values ``v_n`` and decay ``gamma``
(one per head, or one per token and head when the decay is selective), retention is

    S_n = gamma_n S_{n-1} + k_n^T v_n,        o_n = q_n S_n        (= sum_{m<=n} (q_n . k_m) D[n, m] v_m)

with ``D[n, m] = gamma_{m+1} ... gamma_n``. The paper (and torchscale) adds three per-row normalisers:

* decay rows: ``D~[n, m] = D[n, m] / sqrt(r_n)``, ``r_n = sum_{i<=n} D[n, i]`` (closed form for a per-head decay,
  the recurrence ``r_n = gamma_n r_{n-1} + 1`` for a selective one);
* retention scores: divided by ``max(|sum_m (q_n . k_m) D~[n, m]|, 1)`` (detached, as in torchscale 0.3.0). The
  signed sum is ``q_n . z_n / sqrt(r_n)`` for the decayed key-sum ``z_n = gamma_n z_{n-1} + k_n``, which we carry
  in the state next to ``S`` (as an extra value column of ones), so chunks and decoding steps see the same scalar;
* a per-head norm ("GroupNorm") over the value channels.

torchscale computes the first two chunk-locally in its chunkwise form and omits the score normaliser when decoding,
so its three modes agree only after an eps-free per-head norm; here all three compute the same function under every
switch. The retention *core* (unnormalised decayed linear attention with an optional initial state) lives in
``arch_zoo.kernels``, shared with linear attention; ``kernels.dispatch`` picks its backend from the config field
``kernel``, and this module adds what makes it retention: rotation, decays, normalisers, gate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer, set_optim
from arch_zoo.flops import linear_flops
from arch_zoo.kernels import core, dispatch
from arch_zoo.kernels.core import FORMS, at_least_float32
from arch_zoo.layers import cached_rotary_cos_sin, rotate_pairs, shared_input_projections
from arch_zoo.registry import register_mixer

MODES = tuple(FORMS)
DECAY_SCHEDULES = ("paper", "torchscale")
GROUP_NORM_KINDS = ("rmsnorm", "layernorm")
GATE_REALLOCATIONS = ("value", "none")
STATE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decay_row_sums(log_decay: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``r_n = sum_{i<=n} gamma^(n-i) = (1 - gamma^(n+1)) / (1 - gamma)`` (``n + 1`` at gamma = 1): ``[H, T]``.

    ``positions`` are absolute (a continued sequence keeps counting), which makes the decay-row normaliser the same
    number in every paradigm and at every chunk boundary.
    """
    a = log_decay[:, None]
    count = (positions + 1).to(log_decay.dtype)[None, :]
    no_decay = a == 0
    safe = torch.where(no_decay, torch.full_like(a, -1.0), a)  # keeps 0/0 out of the graph
    return torch.where(no_decay, count.expand(a.shape[0], -1), torch.expm1(count * safe) / torch.expm1(safe))


def decay_schedule(n_heads: int, schedule: str) -> torch.Tensor:
    """Per-head log(gamma) in float64: torchscale's ``1 - 2^(-5-h)`` or the paper's size-independent schedule."""
    if schedule == "torchscale":
        return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))))
    return torch.log1p(-torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), n_heads, dtype=torch.float64)))


# ----------------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RetNetConfig(MixerConfig):
    """Multi-scale retention; defaults are the paper's 200M comparison model (head dim 256, value factor 2).

    See docs/retnet.md for every switch and the paper's ablation row it reproduces.
    """

    mode: str = "parallel"  # parallel | chunkwise | recurrent: the form used for a call (with or without state)
    chunk_size: int = 512
    kernel: str = "auto"  # auto | torch | triton | fla: the retention core (auto: Triton on CUDA, PyTorch on CPU)
    # our kernels keep no block states for the backward pass and sweep k, v again for them: less training memory
    # (the paper's heads at 8k tokens: 33.5 MB a layer and sequence), one more state pass per layer
    recompute_states: bool = False
    # q, k, v and the gate as one product of x with their weights side by side (the parameters stay four Linears, so
    # checkpoints and the torchscale mapping are unchanged): one input-gradient product in the backward instead of
    # four and their sum. The same function; only the rounding of half-precision products may differ. Off: on an H100
    # (Table 5 shape, compiled per block) it was 7.6% slower, the backward copying the four gradients side by side
    fused_projections: bool = False
    n_heads: int = 4  # the paper's 200M model: d_model 1024 / 4 heads = key head dim 256
    head_dim: int | None = None  # key dim per head; set, it wins over n_heads (n_heads = d_model / head_dim)
    value_factor: float = 2.0  # value head dim = value_factor * head_dim
    # key head dim = (head_dim, or d_model / n_heads) / head_dim_divisor, d_model unchanged: the paper's "reduce head
    # dimension" row is 4 (256 -> 64 at its width), relative to whatever head dim the ablated model has
    head_dim_divisor: int = 1
    swish_gate: bool = True
    gate_realloc: str = "value"  # gate off: "value" widens the values so the size stays equal; "none" drops it
    group_norm: bool = True
    group_norm_kind: str = "rmsnorm"  # rmsnorm (torchscale 0.3.0) | layernorm (GroupNorm proper)
    group_norm_eps: float = 1e-6
    group_norm_affine: bool = False
    decay: bool = True  # off: gamma = 1
    multiscale_decay: bool = True  # off: every head gamma = single_scale_gamma
    single_scale_gamma: float = 127 / 128
    decay_schedule: str = "paper"  # paper | torchscale
    learnable_decay: bool = False  # gamma per head trained, initialised from the schedule
    selective_decay: bool = False  # gamma_t = sigmoid(x_t W + b) per head, b initialised from the schedule
    xpos: bool = True  # rotate q and k by e^{i n theta}
    xpos_base: float = 10000.0
    decay_norm: bool = True  # divide decay-mask rows by sqrt(row sum)
    score_norm: bool = True  # divide retention scores by max(|row sum|, 1), detached
    # what S is kept in between calls: auto = the core's (float32 or wider); bfloat16 / float16 halve a decoding
    # step's state traffic (the arithmetic stays float32, each step rounds once), as torchscale's fp16 models do
    state_dtype: str = "auto"

    def check(self, d_model: int) -> None:
        def choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ConfigError(f"retnet: {field}={value!r} is not one of {', '.join(allowed)}")

        choice("mode", self.mode, MODES)
        choice("kernel", self.kernel, dispatch.BACKENDS)
        choice("decay_schedule", self.decay_schedule, DECAY_SCHEDULES)
        choice("group_norm_kind", self.group_norm_kind, GROUP_NORM_KINDS)
        choice("gate_realloc", self.gate_realloc, GATE_REALLOCATIONS)
        choice("state_dtype", self.state_dtype, tuple(STATE_DTYPES))
        if self.head_dim is None and (self.n_heads <= 0 or d_model % self.n_heads):
            raise ConfigError(
                f"retnet: d_model={d_model} is not divisible by n_heads={self.n_heads}; "
                f"set model.mixer.n_heads (or model.mixer.head_dim) to a divisor of {d_model}"
            )
        if self.head_dim is not None and (self.head_dim <= 0 or d_model % self.head_dim):
            raise ConfigError(
                f"retnet: d_model={d_model} is not divisible by head_dim={self.head_dim}; "
                f"set model.mixer.head_dim to a divisor of {d_model}"
            )
        base = self.head_dim if self.head_dim is not None else d_model // self.n_heads
        if self.head_dim_divisor < 1 or base % self.head_dim_divisor:
            raise ConfigError(
                f"retnet: head_dim_divisor={self.head_dim_divisor} must be a positive divisor of the head dim {base}"
            )
        head_dim = self.key_head_dim(d_model)
        if self.xpos and head_dim % 2:
            raise ConfigError(f"retnet: xpos rotates pairs of channels, so head_dim={head_dim} must be even")
        if self.chunk_size < 1:
            raise ConfigError(f"retnet: chunk_size={self.chunk_size} must be at least 1")
        self.value_head_dim(d_model)  # raises when the value width is not a whole number
        if self.group_norm_eps < 0:
            raise ConfigError(f"retnet: group_norm_eps={self.group_norm_eps} must be >= 0")
        if not 0 < self.single_scale_gamma <= 1:
            raise ConfigError(f"retnet: single_scale_gamma={self.single_scale_gamma} must lie in (0, 1]")
        trained = [n for n in ("learnable_decay", "selective_decay") if getattr(self, n)]
        if trained and not self.decay:
            raise ConfigError(f"retnet: {trained[0]}=true needs decay=true (decay=false fixes gamma = 1)")
        if len(trained) == 2:
            raise ConfigError("retnet: choose one of learnable_decay and selective_decay (selective is trained too)")
        if trained and not self.multiscale_decay and self.single_scale_gamma >= 1:
            raise ConfigError("retnet: a trained decay starts from gamma < 1; lower single_scale_gamma")

    def key_head_dim(self, d_model: int) -> int:
        base = self.head_dim if self.head_dim is not None else d_model // self.n_heads
        return base // self.head_dim_divisor

    def value_head_dim(self, d_model: int) -> int:
        """Value dim per head; without the gate, ``gate_realloc="value"`` gives its weights to wider values."""
        width = self.value_factor * self.key_head_dim(d_model)
        if not self.swish_gate and self.gate_realloc == "value":
            width *= 1.5  # q, k: 2 d^2; v, g, out: 3 d V  ->  v, out: 2 d (1.5 V)
        if width < 1 or abs(width - round(width)) > 1e-9:
            hint = " (x1.5 without the gate; or gate_realloc=none)" if not self.swish_gate else ""
            raise ConfigError(
                f"retnet: the value head dim value_factor*head_dim={width:g}{hint} must be a positive whole number; "
                "change value_factor or head_dim"
            )
        return int(round(width))

    @classmethod
    def small(cls) -> RetNetConfig:
        return cls(head_dim=16, mode="chunkwise", chunk_size=16)


class _NormalizeLastDim(torch.autograd.Function):
    """``x / rms(x)`` over the last dim of ``x = o * row_scale`` (centred first for a layer norm), float32 inside for
    half inputs.

    Why a Function: autograd of the plain formula keeps the float32 copy of the input for the backward pass (twice
    the input's bytes at bf16: RetNet's head norm sees the widest activation of the layer, 2 d per token); this one
    keeps the input as it came and the per-row scale, and recomputes the rest. The row scale (RetNet's decay and
    score normalisers, ``[..., 1]``) is applied inside, so the scaled copy of ``o`` is never written out."""

    @staticmethod
    def _normalized(
        o: torch.Tensor, row_scale: torch.Tensor | None, eps: float, center: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = o.float() if o.dtype in (torch.float16, torch.bfloat16) else o
        if row_scale is not None:
            x = x * row_scale
        if center:
            x = x - x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * rstd, rstd

    @staticmethod
    def forward(ctx, o: torch.Tensor, row_scale: torch.Tensor | None, eps: float, center: bool) -> torch.Tensor:
        y, rstd = _NormalizeLastDim._normalized(o, row_scale, eps, center)
        ctx.save_for_backward(o, row_scale, rstd)
        ctx.eps, ctx.center = eps, center
        return y.to(o.dtype)

    @staticmethod
    def _input_grads(
        dy: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, o: torch.Tensor, row_scale: torch.Tensor | None,
        center: bool, scale_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """The gradients of ``o`` and (with ``scale_grad``: a trained decay's normaliser) ``row_scale`` from the
        normalised output's ``dy``, both in float32 for half inputs."""
        dx = rstd * (dy - y * (dy * y).mean(-1, keepdim=True))
        if center:  # the centring is a projection: its gradient is centred too
            dx = dx - dx.mean(-1, keepdim=True)
        d_scale = None
        if row_scale is not None and scale_grad:
            d_scale = (dx * o.to(dx.dtype)).sum(-1, keepdim=True).to(row_scale.dtype)
        return (dx if row_scale is None else dx * row_scale), d_scale

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None]:
        o, row_scale, rstd = ctx.saved_tensors
        y, _ = _NormalizeLastDim._normalized(o, row_scale, ctx.eps, ctx.center)
        do, d_scale = _NormalizeLastDim._input_grads(
            dy.to(y.dtype), y, rstd, o, row_scale, ctx.center, ctx.needs_input_grad[1]
        )
        return do.to(o.dtype), d_scale, None, None


class _GatedHeadNorm(torch.autograd.Function):
    """The mixer's output stage in one function: ``silu(gate) * (norm(o * row_scale) * weight + bias)``, heads put
    side by side (``[B, T, H * dv]``, in the gate's dtype), float32 inside for half inputs.

    Why: as separate steps, the normalised heads are written out for the gate's backward and read back by the gate;
    here only the inputs (o, the gate) and the per-row scales are kept, and the backward recomputes the rest, so a
    compiler can make the forward one pass over o and the gate."""

    @staticmethod
    def forward(ctx, o, row_scale, gate, weight, bias, eps: float, center: bool) -> torch.Tensor:
        B, H, T, dv = o.shape
        y, rstd = _NormalizeLastDim._normalized(o, row_scale, eps, center)
        z = y if weight is None else y * weight
        z = z if bias is None else z + bias
        z = z.transpose(1, 2).reshape(B, T, H * dv)
        ctx.save_for_backward(o, row_scale, rstd, gate, weight, bias)
        ctx.eps, ctx.center = eps, center
        return (F.silu(gate.to(z.dtype)) * z).to(gate.dtype)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        o, row_scale, rstd, gate, weight, bias = ctx.saved_tensors
        B, H, T, dv = o.shape
        y, _ = _NormalizeLastDim._normalized(o, row_scale, ctx.eps, ctx.center)
        z = y if weight is None else y * weight
        z = z if bias is None else z + bias
        heads = (B, T, H, dv)
        d = d_out.view(heads).transpose(1, 2).to(y.dtype)
        gt = gate.view(heads).transpose(1, 2).to(y.dtype)
        sig = torch.sigmoid(gt)
        d_gate = (d * z * sig * (1 + gt * (1 - sig))).transpose(1, 2).reshape(gate.shape).to(gate.dtype)
        dz = d * gt * sig
        d_weight = None if weight is None else (dz * y).sum((0, 2)).view(weight.shape).to(weight.dtype)
        d_bias = None if bias is None else dz.sum((0, 2)).view(bias.shape).to(bias.dtype)
        dy = dz if weight is None else dz * weight
        do, d_scale = _NormalizeLastDim._input_grads(dy, y, rstd, o, row_scale, ctx.center, ctx.needs_input_grad[1])
        return do.to(o.dtype), d_scale, d_gate, d_weight, d_bias, None, None


class HeadNorm(nn.Module):
    """The per-head "GroupNorm": RMS- or layer-normalise each head's value channels (float32 for half inputs)."""

    def __init__(self, n_heads: int, head_dim: int, kind: str, eps: float, affine: bool) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(n_heads, 1, head_dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, head_dim)) if affine and kind == "layernorm" else None

    def forward(self, o: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:  # [B, H, T, dv]
        """The norm of ``o * row_scale`` (``row_scale`` ``[..., 1]``, float32, or None)."""
        y = _NormalizeLastDim.apply(o, row_scale, self.eps, self.kind == "layernorm")
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y

    def gated(self, o: torch.Tensor, row_scale: torch.Tensor | None, gate: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * forward(o, row_scale)`` with the heads side by side: ``[B, T, H * dv]`` (see
        :class:`_GatedHeadNorm`)."""
        return _GatedHeadNorm.apply(o, row_scale, gate, self.weight, self.bias, self.eps, self.kind == "layernorm")


@register_mixer("retnet")
class RetNet(TokenMixer):
    """Multi-scale retention. ``forward`` runs the paradigm that ``form`` picks; every paradigm is the same function.

    The state is ``{"kv": [B, H, dk, dv], "z": [B, H, dk] | None, "r": [B, H] | None, "offset": 0-d tensor}``:
    the decayed key-value sum, the decayed key sum (score normaliser), the decay-row sum (only for a selective
    decay; a per-head decay has it in closed form) and the number of tokens seen (positions for the rotation). An
    allocated state (:meth:`allocate_state`) also carries ``"in_place"`` and ``"started"``.
    """

    config_class = RetNetConfig

    def __init__(self, d_model: int, config: RetNetConfig, layer_idx: int = 0) -> None:
        super().__init__(d_model, config, layer_idx)
        self.key_dim = config.key_head_dim(d_model)
        self.n_heads = d_model // self.key_dim
        self.value_dim = config.value_head_dim(d_model)
        self._constants: dict[tuple, torch.Tensor] = {}  # see _constant
        H, dv = self.n_heads, self.value_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, H * dv, bias=False)
        self.g_proj = nn.Linear(d_model, H * dv, bias=False) if config.swish_gate else None
        self.out_proj = nn.Linear(H * dv, d_model, bias=False)
        self.group_norm = (
            HeadNorm(H, dv, config.group_norm_kind, config.group_norm_eps, config.group_norm_affine)
            if config.group_norm
            else None
        )
        self.decay_logit = None
        self.decay_proj = None
        if config.learnable_decay:  # gamma = sigmoid(logit) stays in (0, 1)
            self.decay_logit = set_optim(nn.Parameter(torch.empty(H)), weight_decay=0.0)
        if config.selective_decay:
            self.decay_proj = nn.Linear(d_model, H, bias=True)
            set_optim(self.decay_proj.bias, weight_decay=0.0)
        self.reset_parameters()
        self._check_state_dtype()

    def reset_parameters(self) -> None:
        """torchscale's initialisation: xavier with gain 2^-2.5 for q, k, v, g; gain 1 for the output (0.3.0)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            if proj is not None:
                nn.init.xavier_uniform_(proj.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.decay_logit is not None:
            with torch.no_grad():
                self.decay_logit.copy_(_logit_from_log(self._initial_log_decay()))
        if self.decay_proj is not None:
            nn.init.xavier_uniform_(self.decay_proj.weight, gain=2**-2.5)
            with torch.no_grad():
                self.decay_proj.bias.copy_(_logit_from_log(self._initial_log_decay()))

    def _check_state_dtype(self) -> None:
        """Warn when a half-precision state cannot hold a head's decay: once 1 - gamma is under the dtype's epsilon,
        ``gamma * S`` rounds back to (or far from) ``S``, so that head's memory stops decaying between decoding steps
        (measured in docs/results/state_precision_cpu: bfloat16 already does this to the paper schedule's slow heads).
        """
        dtype = STATE_DTYPES[self.config.state_dtype]
        if dtype is None:
            return
        one_minus_gamma = -torch.expm1(self._initial_log_decay())
        eps = torch.finfo(dtype).eps
        heads = [h for h, gap in enumerate(one_minus_gamma.tolist()) if 0 < gap < eps]
        if heads:
            warnings.warn(
                f"retnet: state_dtype={self.config.state_dtype} cannot represent the decay of heads {heads} "
                f"(1 - gamma below its epsilon {eps:.1e}): their decoding state decays wrongly between steps; "
                "use state_dtype=float16 (if its epsilon allows) or auto",
                stacklevel=3,
            )

    def _initial_log_decay(self) -> torch.Tensor:
        """Fixed (or initial) per-head log(gamma), float64."""
        c = self.config
        if not c.decay:
            return torch.zeros(self.n_heads, dtype=torch.float64)
        if not c.multiscale_decay:
            return torch.full((self.n_heads,), math.log(c.single_scale_gamma), dtype=torch.float64)
        return decay_schedule(self.n_heads, c.decay_schedule)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """log(gamma): ``[H]`` for a per-head decay, ``[B, H, T]`` for a selective one."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # never half: see at_least_float32
        if self.decay_proj is not None:
            return F.logsigmoid(self.decay_proj(x).to(dtype)).transpose(1, 2)
        if self.decay_logit is not None:
            return F.logsigmoid(self.decay_logit).to(dtype)
        # cached per device and dtype, not a buffer: a float32 buffer would carry its rounding into float64 runs,
        # and a decoding step (or a CUDA graph of it) must not rebuild it on the host every call
        return self._constant(("log_decay", x.device, dtype), lambda: self._initial_log_decay().to(x.device, dtype))

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        dk = self.key_dim
        return self._constant(
            ("inv_freq", device),
            lambda: self.config.xpos_base ** -torch.linspace(0, 1, dk // 2, dtype=torch.float64, device=device),
        )

    def _decay_row_scale(self, log_decay: torch.Tensor, offset: Any, T: int) -> torch.Tensor:
        """The decay-row normaliser ``r_n^-1/2`` of rows ``offset .. offset + T - 1``, ``[1, H, T, 1]``.

        A fixed decay from position 0 (every training and evaluation window) is cached per length, device and dtype:
        rebuilt every call it was 16 small operators a layer, host work that a small model's GPU step waits on
        (docs/results/packing.md). A learned decay, or a continued sequence, computes it each call."""

        def make() -> torch.Tensor:
            positions = offset + torch.arange(T, device=log_decay.device)
            return decay_row_sums(log_decay, positions).rsqrt()[None, :, :, None]

        if self.decay_logit is None and isinstance(offset, int) and offset == 0:
            return self._constant(("decay_row_scale", T, log_decay.device, log_decay.dtype), make)
        return make()

    def _constant(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        # a plain dict attribute (some compiler versions break the graph on __dict__ access). A compiled graph reads
        # a constant an eager call made (a decoding step after an eager prefill: no kernels for it), and makes a
        # missing one itself without storing it: stored, it would break the guard of its own lookup (a recompile)
        if key in self._constants:
            return self._constants[key]
        value = make()
        if not torch.compiler.is_compiling():
            self._constants[key] = value
        return value

    def allocate_state(self, batch: int, capacity: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The empty state, owned by the caller (``in_place``): decoding steps update ``kv``, ``z`` and ``offset``
        in place, which halves a step's state traffic against a copy and keeps a CUDA graph's buffers fixed. Its
        size does not depend on ``capacity``."""
        H, dk, dv, c = self.n_heads, self.key_dim, self.value_dim, self.config
        work = torch.promote_types(dtype, torch.float32)  # what the core computes in
        kv_dtype = STATE_DTYPES[c.state_dtype] or work
        return {
            "kv": torch.zeros(batch, H, dk, dv, device=device, dtype=kv_dtype),
            "z": torch.zeros(batch, H, dk, device=device, dtype=work) if c.score_norm else None,
            "r": torch.zeros(batch, H, device=device, dtype=work) if c.selective_decay and c.decay_norm else None,
            "offset": torch.zeros((), device=device, dtype=torch.long),
            "in_place": True,
            "started": False,  # the prompt then runs in the configured mode, as a fresh sequence's does
        }

    def form(self, n_tokens: int, continued: bool) -> str:
        """The paradigm of a call: ``mode`` for a fresh sequence; a continued one steps recurrently through a
        single token and runs chunkwise over several (memory bounded by the chunk), unless ``mode`` is recurrent."""
        mode = self.config.mode
        if mode == "recurrent" or (continued and n_tokens == 1):
            return "recurrent"
        return "chunkwise" if continued else mode

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q, k, v and the gate's input (None without a gate), as four products or as one (``fused_projections``;
        not for a single token, where putting the weights side by side would copy them every decoding step)."""
        projs = [p for p in (self.q_proj, self.k_proj, self.v_proj, self.g_proj) if p is not None]
        if not self.config.fused_projections or x.shape[1] == 1:
            outs = shared_input_projections(x, projs)
        else:
            weight = torch.cat([p.weight for p in projs])
            outs = F.linear(x, weight).split([p.out_features for p in projs], dim=-1)
        return outs[0], outs[1], outs[2], outs[3] if len(outs) > 3 else None

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        c = self.config
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.key_dim, self.value_dim
        offset = 0 if state is None else state["offset"]  # a 0-d tensor on x's device (an int in older states)
        q, k, v, g = self._project(x)
        q = q.view(B, T, H, dk).transpose(1, 2)
        k = k.view(B, T, H, dk).transpose(1, 2) * dk**-0.5
        v = v.view(B, T, H, dv).transpose(1, 2)
        if c.xpos:
            # in q's dtype, not x's: under autocast the projections are already half precision
            name = ("xpos", self.config.xpos_base, dk)
            cos, sin = cached_rotary_cos_sin(name, self._inv_freq(x.device), offset, T, q.dtype)
            q, k = rotate_pairs(q, cos, sin, True), rotate_pairs(k, cos, sin, True)
        log_decay = self.log_decay(x)
        trained = c.learnable_decay or c.selective_decay
        if self._steps(T, state, trained):
            o, score_sum, new_state = self._step(q, k, v, log_decay, state)
        else:
            o, score_sum, new_state = self._sequence(q, k, v, log_decay, state, return_state, trained)
        row_scale = None  # the decay and score normalisers: one factor per row of o
        if c.decay_norm:
            if log_decay.dim() == 1:
                inv_sqrt_r = self._decay_row_scale(log_decay, offset, T)
            else:  # a selective decay has no closed form: the same core on ones gives r_n = gamma_n r_{n-1} + 1
                ones = log_decay.new_ones(B, H, T, 1)
                r0 = None if state is None else state["r"][..., None, None]
                # a key dim of one is below any kernel's tile: the PyTorch core does this one
                r, r_last = dispatch.decayed_linear_attention(
                    ones,
                    ones,
                    ones,
                    log_decay,
                    backend="torch",
                    form=self.form(T, _continued(state)),
                    initial_state=r0,
                    output_final_state=return_state,
                    chunk_size=c.chunk_size,
                )
                inv_sqrt_r = r.rsqrt()
                if new_state is not None:
                    new_state["r"] = r_last[..., 0, 0]
            row_scale = inv_sqrt_r
        if c.score_norm:
            if c.decay_norm:
                score_sum = score_sum * inv_sqrt_r
            inv_score = 1 / score_sum.detach().abs().clamp(min=1)
            row_scale = inv_score if row_scale is None else row_scale * inv_score
        # back to the projections' dtype: under autocast x is float32 and the normalisers are, but the head norm,
        # gate and output projection run in half precision like every other activation. The head norm takes the
        # normalisers' row scale inside (no scaled copy of o is written); without it they scale o here
        if self.group_norm is not None and g is not None:  # the paper's block: the norm and the gate in one step
            y = self.group_norm.gated(o.to(v.dtype), row_scale, g)
        else:
            if self.group_norm is not None:
                o = self.group_norm(o.to(v.dtype), row_scale)
            else:
                o = (o if row_scale is None else o * row_scale).to(v.dtype)
            y = o.transpose(1, 2).reshape(B, T, H * dv)
            if g is not None:
                y = F.silu(g) * y
        y = self.out_proj(y)
        if not return_state:
            return y, None
        owned = state is not None and state.get("in_place", False)
        if owned and isinstance(offset, torch.Tensor):
            new_state["offset"] = offset.add_(T)
        else:
            new_state["offset"] = torch.as_tensor(offset + T, device=x.device)
        if owned:  # dense buffers, which the steps then update in place (a chunk's state can be a column slice)
            new_state = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in new_state.items()}
            new_state["in_place"] = True
            new_state["started"] = True
        return y, new_state

    def _backend(self, form: str, device: torch.device, dtype: torch.dtype, trained: bool) -> str:
        """The core's backend for a call (``dispatch.choose_backend`` on this layer's config and head dims)."""
        try:
            return dispatch.choose_backend(
                self.config.kernel, device, form=form, dtype=dtype, dims=(self.key_dim, self.value_dim),
                trained_decay=trained,
            )  # fmt: skip
        except ValueError as err:
            raise ConfigError(f"retnet: {err}") from None

    def _steps(self, n_tokens: int, state: Any, trained: bool) -> bool:
        """Whether a call is one decoding step through the fused step (state updated in one pass, no autograd)."""
        return n_tokens == 1 and state is not None and not trained and not torch.is_grad_enabled()

    def _sequence(self, q, k, v, log_decay, state, return_state: bool, trained: bool):
        """Any number of tokens through the configured core: ``(o, score_sum | None, state without offset)``."""
        c = self.config
        B, H, T, _ = q.shape
        dv = self.value_dim
        form = self.form(T, _continued(state))
        backend = self._backend(form, q.device, v.dtype, trained)

        def core(q, k, v, initial_state):
            return dispatch.decayed_linear_attention(
                q,
                k,
                v,
                log_decay,
                backend=backend,
                form=form,
                initial_state=initial_state,
                output_final_state=return_state,
                chunk_size=c.chunk_size,
                recompute_states=c.recompute_states,
            )

        # a half-precision state (state_dtype) enters the core's arithmetic as float32
        kv0 = None if state is None else at_least_float32(state["kv"])[0]
        if c.score_norm and backend != "torch":
            # on the kernels the key sum is read in a call of its own, without autograd (the normaliser is
            # detached): no copy of the values with a column of ones, and no backward for it
            o, kv = core(q, k, v, kv0)
            with torch.no_grad():
                score_sum, z = dispatch.key_sum_read(
                    q,
                    k,
                    log_decay,
                    backend,
                    initial_state=None if state is None else state["z"],
                    output_final_state=return_state,
                )
            if not return_state:
                return o, score_sum, None
            return o, score_sum, {"kv": self._stored(kv), "z": z, "r": None}
        # one core call gives q.S and, through a column of ones appended to v, the key-sum read q.z
        if c.score_norm:
            v = torch.cat((v, v.new_ones(B, H, T, 1)), dim=-1)
            kv0 = None if state is None else torch.cat((kv0, state["z"][..., None].to(kv0.dtype)), dim=-1)
        o, kv = core(q, k, v, kv0)
        score_sum = None
        if c.score_norm:
            o, score_sum = o[..., :dv], o[..., dv:]
        if not return_state:
            return o, score_sum, None
        new_state = {
            "kv": self._stored(kv[..., :dv] if c.score_norm else kv),
            "z": kv[..., dv] if c.score_norm else None,
            "r": None,
        }
        return o, score_sum, new_state

    def _stored(self, kv: torch.Tensor) -> torch.Tensor:
        """The state as kept between calls: rounded to ``state_dtype`` when one is set."""
        dtype = STATE_DTYPES[self.config.state_dtype]
        return kv if dtype is None else kv.to(dtype)

    def _step(self, q, k, v, log_decay, state):
        """One token: ``S = gamma S + k^T v`` and ``z = gamma z + k`` with their reads in one pass over the state (one
        fused kernel launch on CUDA), in place when the caller owns the state (:meth:`allocate_state`), into copies
        otherwise."""
        in_place = bool(state.get("in_place"))
        kv, z = state["kv"], state["z"]
        if not in_place or not kv.is_contiguous():
            kv = self._stored(kv).clone(memory_format=torch.contiguous_format)
        if z is not None and (not in_place or not z.is_contiguous()):
            z = z.clone(memory_format=torch.contiguous_format)
        backend = self.config.kernel if self.config.kernel in ("torch", "fla") else "auto"
        v1 = v[:, :, 0].to(torch.promote_types(kv.dtype, torch.float32))
        out = dispatch.retention_step(q[:, :, 0], k[:, :, 0], v1, kv, log_decay, 1.0, backend, z)
        o, key_sum_read = out if z is not None else (out, None)
        score_sum = None if key_sum_read is None else key_sum_read[:, :, None, None].to(v.dtype)
        return o[:, :, None].to(v.dtype), score_sum, {"kv": kv, "z": z, "r": None}

    def state_size(self, seq_len: int) -> int:
        """Constant in length: S, z (score norm), r (selective decay with the decay norm) and the position."""
        H, dk, dv = self.n_heads, self.key_dim, self.value_dim
        c = self.config
        return H * dk * dv + (H * dk if c.score_norm else 0) + (H if c.selective_decay and c.decay_norm else 0) + 1

    def flops_per_token(self, seq_len: int) -> float:
        """The projections (and a selective decay's), plus the core in the form it runs (the configured one; chunkwise
        on the kernels, whatever the mode; chunks counted at most ``core.MODEL_CHUNK`` long, the kernels' chunk): the
        score normaliser is one more value column, a selective decay's row sums one more core call of width one. On a
        GPU, call it in the forward's autocast: the dtype decides whether the kernels run."""
        c, H = self.config, self.n_heads
        projections = linear_flops(self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.out_proj, self.decay_proj)
        weight = self.q_proj.weight
        form = self.form(seq_len, continued=False)
        if form != "recurrent":  # on the kernels, chunkwise whatever the mode
            trained = c.learnable_decay or c.selective_decay
            try:
                backend = self._backend(form, weight.device, dispatch.run_dtype(weight), trained)
            except RuntimeError:  # a kernel this device cannot run: the forward says so, not the count
                backend = "torch"
            form = dispatch.computed_form(form, backend)
        heads = core.model_flops(form, seq_len, self.key_dim, self.value_dim + int(c.score_norm), c.chunk_size)
        if c.selective_decay and c.decay_norm:
            heads += core.model_flops(form, seq_len, 1, 1, c.chunk_size)
        return projections + H * heads / seq_len


def _continued(state: Any) -> bool:
    """Whether a call continues a sequence (an allocated state that no call has written yet does not)."""
    return state is not None and state.get("started", True)


def _logit_from_log(log_gamma: torch.Tensor) -> torch.Tensor:
    """logit(gamma) from log(gamma), so that logsigmoid(logit) = log(gamma): log(gamma) - log(1 - gamma)."""
    return log_gamma - torch.log(-torch.expm1(log_gamma))
