"""RWKV-4 time mixing (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", arXiv 2305.13048),
and RWKV's channel mixing as the FFN kind ``rwkv_channel``.

Time mixing, per channel ``c`` (every operation below is element-wise across channels)::

    x'_t = x_{t-1}                                    # token shift (zero before the first token)
    k_t = W_k (mu_k x_t + (1 - mu_k) x'_t),  likewise v_t (mu_v, W_v) and r_t (mu_r, W_r)
    wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i) w + k_i} + e^{u + k_t})
    out_t = W_o (sigmoid(r_t) * wkv_t)

with the decay ``w = -exp(time_decay) < 0`` and the bonus ``u = time_first`` of the current token. WKV is a
softmax-like average of past values whose weights decay exponentially with distance, so it is an RNN whose state is
the running numerator and denominator. ``e^{k}`` overflows float32 once ``k > 88``; both forms below therefore keep
every sum as ``a * e^p`` with a running max exponent ``p`` (RWKV's max trick), so no exponential exceeds 1.

Training form: chunkwise. The sequence is cut into chunks of ``L = chunk_size`` tokens and the state ``(a, b, p)``
is carried across chunk boundaries: a loop of ``T / L`` steps over ``[B, C]`` tensors. Inside a chunk, for all
chunks at once, the weights factor as ``e^{(t-1-i) w} * e^{k_i - ref}`` with one reference ``ref`` (the chunk's
largest key) per chunk and channel: a ``[C, L, L]`` decay matrix times the chunk's vectors, one batched matrix
product. Every factor is ``<= 1``, so nothing overflows; a row whose keys all lie ~55 or more below the chunk's
largest key would underflow in float32, and such rows (none at ordinary key sizes) are recomputed exactly, each
weight normalised by its row's own max exponent. The max exponents are detached: any reference exponent gives the
same function, so its gradient is zero. Cost: ``O(B T L C)`` multiply-adds inside a matrix product, ``O(B T C)``
exponentials and ``O(B T C)`` memory for the backward. Why not the alternatives: a Python loop over every token is
``T`` autograd steps of tiny tensors (4x slower at ``T = 256`` on two CPU cores, the gap growing with ``T``); the
exact per-row form everywhere does ``O(B T L C)`` exponentials (~10x slower); and a cumulative sum over the
whole sequence (``e^{(t-1) w} sum_i e^{k_i - i w} v_i``) needs exponents of size ``|w| T`` (~40 000 at the initial
decays and ``T = 2048``) whose float32 rounding alone is a relative error of ~1e-3. Chunked float32 agrees with
float64 to ~1e-7.

On CUDA a whole sequence runs on a fused kernel instead (``kernel``, below): the recurrence with the state in
registers, one launch forward and one backward, the same function in float32 (``arch_zoo/kernels/wkv_triton.py``).

Decoding form: RWKV's recurrence, ``O(C)`` per token besides the projections. State per sequence: the last token's
``x`` (for the shift) and WKV's numerator ``a``, denominator ``b`` and max exponent ``p`` (numerator ``a e^p``,
denominator ``b e^p``): ``4 * d_model`` numbers, constant in ``T``. A call with several tokens continues from a state
chunkwise.

Initialisation (RWKV-4's, it depends on the layer ``l`` of ``n`` through ``r0 = l / (n - 1)`` and
``r1 = 1 - l / n``): ``time_decay_c = -5 + 8 (c / (C-1))^(0.7 + 1.3 r0)``, ``time_first_c = log 0.3 + 0.5 zigzag``,
``mu_k = (c/C)^r1``, ``mu_v = (c/C)^r1 + 0.3 r0``, ``mu_r = (c/C)^(0.5 r1)``; ``W_k``, ``W_r`` and ``W_o`` zero,
``W_v`` orthogonal. The depth ``n`` is the config field ``init_n_layers``, which the model fills in with its own
depth. ``time_decay``, ``time_first`` and the ``mu`` are trained without weight decay, and ``time_decay`` and
``time_first`` at 2x and 3x the run's learning rate, as RWKV-LM's v4 trainer does (``layerwise_lr``).

Config (defaults: RWKV-4):
    mode: ``chunkwise`` (the training form; with ``chunk_size >= T`` it is the fully parallel masked form) or
        ``recurrent`` (token by token, for tests and decoding). A continued call with one token always steps
        recurrently.
    chunk_size: tokens per chunk of the chunkwise form (32): larger chunks mean fewer sequential steps but
        ``O(T L C)`` multiply-adds; 16-64 is fastest on a CPU.
    kernel: ``auto`` (default), ``torch`` or ``triton``: where a whole sequence's WKV runs outside ``recurrent``
        mode. ``triton`` is the fused kernel (``arch_zoo.kernels.wkv_triton``: the recurrence in registers, one
        launch forward and one backward, float32 inside); ``torch`` the chunkwise form above. ``auto`` takes the
        kernel on CUDA, except in float64 and for a call that must carry a gradient through a state (a given state,
        or the final one returned while gradients are on), which the kernel does not; ``triton`` refuses those
        calls.
    init_n_layers: the depth over which the layer-dependent initialisation is spread (RWKV's ``n_layer``). Unset,
        a model fills in its own depth; a layer built on its own uses 16, the depth of the RetNet paper's
        comparison models. Layers past it start like the last one.
    decay_lr_scale, first_lr_scale: learning-rate multipliers of ``time_decay`` (2) and ``time_first`` (3), RWKV-LM
        v4's ``my_lr_scale`` groups.
    zero_init: start ``W_k``, ``W_r``, ``W_o`` at zero as RWKV-4 does (the layer adds nothing at first); false
        draws them orthogonal like ``W_v``, which tests of a random layer need.

The channel mix (``model.ffn.kind=rwkv_channel``): ``k = W_k(mix_k(x_t, x_{t-1}))``,
``out = sigmoid(W_r mix_r(x_t, x_{t-1})) * W_v relu(k)^2``. Its hidden width is ``model.ffn.mult * d_model``
(RWKV-4 uses ``mult=4``). Its init spreads over the model's depth (``model.ffn.n_layers``, which the model sets).
Its state is the last token's ``x``: ``d_model`` numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer, set_optim
from arch_zoo.flops import linear_flops
from arch_zoo.kernels import dispatch
from arch_zoo.layers import FFNConfig, at_least_float32, register_ffn
from arch_zoo.registry import register_mixer

MODES = ("chunkwise", "recurrent")
WKV_BACKENDS = ("auto", "torch", "triton")
INIT_N_LAYERS = 16

WKVState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (a, b, p), each [B, C]

# ----------------------------------------------------------------------------------------------------------------
# The WKV operator. k, v: [B, T, C]; w (= -exp(time_decay), negative) and u (time_first): [C].
# The state after token t is (a, b, p) with a e^p = sum_{i<=t} e^{(t-i) w + k_i} v_i and b e^p the same without v_i.
# ----------------------------------------------------------------------------------------------------------------


def empty_wkv_state(batch: int, channels: int, like: torch.Tensor) -> WKVState:
    """The state before the first token: empty sums, with max exponent -inf (so e^{p - anything} = 0)."""
    zeros = like.new_zeros(batch, channels)
    return zeros, zeros, torch.full_like(zeros, float("-inf"))


def wkv_recurrent(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, WKVState | None]:
    """WKV one token at a time, RWKV's RNN form with the max trick: ``O(C)`` per token."""
    out_dtype = v.dtype
    w, u, k, v = at_least_float32(w, u, k, v)
    B, T, C = k.shape
    a, b, p = state if state is not None else empty_wkv_state(B, C, k)
    outputs = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        bonus = u + kt  # the current token, read with the bonus
        m = torch.maximum(p, bonus).detach()  # a reference exponent: detaching it leaves the function unchanged
        e_state, e_new = torch.exp(p - m), torch.exp(bonus - m)
        outputs.append((e_state * a + e_new * vt) / (e_state * b + e_new))
        decayed = p + w  # the state moves one step further from every past token
        m = torch.maximum(decayed, kt).detach()
        e_state, e_new = torch.exp(decayed - m), torch.exp(kt - m)
        a, b, p = e_state * a + e_new * vt, e_state * b + e_new, m
    y = torch.stack(outputs, dim=1).to(out_dtype)
    return y, ((a, b, p) if output_final_state else None)


def _underflow_threshold(dtype: torch.dtype) -> float:
    """Below this, a chunk row's factored denominator has lost digits to underflow (``tiny / eps^2``: ~1e-24 in
    float32, ~1e-277 in float64, i.e. a key spread of ~55 resp. ~640 inside one chunk)."""
    info = torch.finfo(dtype)
    return info.tiny / info.eps**2


def _intra_chunk_direct(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk-local WKV sums, each row normalised by its own max exponent; exact for any keys, ``O(L^2)`` exps.

    ``k, v: [..., L]``, ``w, u`` broadcastable to ``[...]``. Returns ``(num, den, ref)``, each ``[..., L]``, with
    ``num e^ref = sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t`` and ``den e^ref`` the same without ``v``.
    """
    L = k.shape[-1]
    idx = torch.arange(L, device=k.device, dtype=k.dtype)
    dist = (idx[:, None] - 1 - idx[None, :]) * w[..., None, None]  # [..., L, L]: (t-1-i) w
    diagonal = torch.eye(L, dtype=torch.bool, device=k.device)
    future = torch.ones(L, L, dtype=torch.bool, device=k.device).triu(1)
    log_weights = torch.where(diagonal, u[..., None, None], dist).masked_fill(future, float("-inf"))
    exponents = log_weights + k[..., None, :]
    ref = exponents.detach().amax(-1)  # finite: the diagonal u + k_t is
    weights = torch.exp(exponents - ref[..., None])
    return (weights * v[..., None, :]).sum(-1), weights.sum(-1), ref


def _intra_chunk_factored(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sums of :func:`_intra_chunk_direct` for ``k, v: [B, N, C, L]`` and ``w, u: [C]``, with one reference
    exponent per chunk and channel: ``e^{(t-1-i) w} e^{k_i - ref}``, a ``[C, L, L]`` decay matrix times ``[L]``
    vectors (a batched matrix product, ``O(L)`` exps per token). Every factor is ``<= 1``, so nothing overflows,
    but a row whose keys all lie far below the chunk's largest key underflows; the caller checks ``den``."""
    L = k.shape[-1]
    idx = torch.arange(L, device=k.device, dtype=k.dtype)
    past = torch.ones(L, L, dtype=torch.bool, device=k.device).tril(-1)
    dist = (idx[:, None] - 1 - idx[None, :]) * w[:, None, None]
    decay = torch.exp(dist.masked_fill(~past, float("-inf")))  # [C, L, L]: e^{(t-1-i) w} for i < t, else 0
    ref = k.detach().amax(-1, keepdim=True) + u.detach().clamp(min=0)[:, None]  # >= k_i and >= u + k_i
    x = torch.exp(k - ref)
    bonus = torch.exp(u[:, None] + k - ref)
    B, N, C, _ = k.shape
    # one [C, L, L] @ [C, L, 2BN] product for numerator and denominator; contiguous operands keep it a single BLAS call
    sums = torch.bmm(decay, torch.stack((x * v, x)).permute(3, 4, 0, 1, 2).reshape(C, L, 2 * B * N))
    num, den = sums.view(C, L, 2, B, N).permute(2, 3, 4, 0, 1)  # each [B, N, C, L]
    return num + bonus * v, den + bonus, ref.expand_as(k)


def wkv_chunkwise(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
    output_final_state: bool = True,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, WKVState | None]:
    """WKV over chunks of ``chunk_size`` tokens: chunk-local sums for all chunks at once, the state ``(a, b, p)``
    carried across chunk boundaries (``T / L`` sequential steps). The same function as :func:`wkv_recurrent`."""
    out_dtype = v.dtype
    w, u, k, v = at_least_float32(w, u, k, v)
    B, T, C = k.shape
    L = max(1, min(chunk_size, T))
    N = -(-T // L)
    pad = N * L - T
    if pad:  # padded keys are -inf: they weigh nothing, here or in the state
        k = F.pad(k, (0, 0, 0, pad), value=float("-inf"))
        v = F.pad(v, (0, 0, 0, pad))
    kc = k.view(B, N, L, C).transpose(-1, -2)  # [B, N, C, L]
    vc = v.view(B, N, L, C).transpose(-1, -2)
    idx = torch.arange(L, device=k.device, dtype=k.dtype)

    # Chunk-local sums: the fast factored form, and the exact direct form for the (rare) rows where it underflows.
    num, den, ref = _intra_chunk_factored(w, u, kc, vc)
    real = (torch.arange(N * L, device=k.device) < T).view(N, 1, L)  # padded rows may underflow: they are dropped
    lost = ((den.detach() < _underflow_threshold(den.dtype)) & real).any(-1).nonzero(as_tuple=True)  # (b, n, c)
    if lost[0].numel():
        c = lost[2]
        rows = _intra_chunk_direct(w[c], u[c], kc[lost], vc[lost])
        num, den, ref = (full.index_put(lost, row) for full, row in zip((num, den, ref), rows))

    # Each chunk's own contribution to the state at its last token: e^{(L-1-i) w + k_i} v_i.
    write = (L - 1 - idx) * w[:, None] + kc  # [B, N, C, L]
    p_chunk = write.detach().amax(-1)  # [B, N, C]
    e_write = torch.exp(write - p_chunk[..., None])
    a_chunk, b_chunk = (e_write * vc).sum(-1), e_write.sum(-1)

    a, b, p = state if state is not None else empty_wkv_state(B, C, k)
    chunk_decay = L * w
    before: list[WKVState] = []
    for n in range(N):  # the only sequential part: T / L steps over [B, C]
        before.append((a, b, p))
        decayed = p + chunk_decay
        m = torch.maximum(decayed, p_chunk[:, n]).detach()  # reference exponents are detached (see wkv_recurrent)
        e_state, e_chunk = torch.exp(decayed - m), torch.exp(p_chunk[:, n] - m)
        a, b, p = e_state * a + e_chunk * a_chunk[:, n], e_state * b + e_chunk * b_chunk[:, n], m

    # Outputs: the chunk's own terms plus the incoming state, decayed by j steps for the chunk's j-th token.
    a0, b0, p0 = (torch.stack(s, dim=1)[..., None] for s in zip(*before))  # [B, N, C, 1]
    past = p0 + idx * w[:, None]  # [B, N, C, L]
    m = torch.maximum(ref, past.detach())
    e_intra, e_past = torch.exp(ref - m), torch.exp(past - m)
    wkv = (e_intra * num + e_past * a0) / (e_intra * den + e_past * b0)
    y = wkv.transpose(-1, -2).reshape(B, N * L, C)[:, :T].to(out_dtype)
    if not output_final_state:
        return y, None
    # the padded state sits `pad` steps after the last real token; undo that much decay
    return y, (a, b, p - pad * w)


# ----------------------------------------------------------------------------------------------------------------
# Layer-dependent initialisation (RWKV-4).
# ----------------------------------------------------------------------------------------------------------------


def _depth_ratios(layer_idx: int, n_layers: int) -> tuple[float, float]:
    """RWKV-4's ``(layer / (n - 1), 1 - layer / n)``: 0 -> 1 and 1 -> ~0 with depth (clamped past ``n``)."""
    layer = min(layer_idx, n_layers - 1)
    return layer / max(n_layers - 1, 1), 1.0 - layer / n_layers


def _channel_ramp(d_model: int) -> torch.Tensor:
    """``c / C`` for every channel ``c``: the base of RWKV-4's token-shift mixing coefficients."""
    return torch.arange(d_model, dtype=torch.float64) / d_model


def _orthogonal(linear: nn.Linear) -> None:
    """RWKV-LM's default for a matrix: orthogonal, with gain ``sqrt(out / in)`` when it widens."""
    out_features, in_features = linear.weight.shape
    nn.init.orthogonal_(linear.weight, gain=math.sqrt(max(out_features / in_features, 1.0)))


def _token_shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """``x_{t-1}`` for every t: the previous call's last token (or zeros) before the first."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last[:, None].to(x.dtype)
    return torch.cat((first, x[:, :-1]), dim=1)


def _mix(x: torch.Tensor, shifted: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``mu x_t + (1 - mu) x_{t-1}``: a learned per-channel interpolation with the previous token."""
    return shifted + mu * (x - shifted)


@dataclass
class RWKVConfig(MixerConfig):
    """RWKV-4 time mixing; the module docstring describes every field."""

    mode: str = "chunkwise"  # chunkwise | recurrent
    chunk_size: int = 32
    kernel: str = "auto"  # auto | torch | triton: the fused WKV kernel for whole sequences (auto: on CUDA)
    init_n_layers: int | None = None  # depth that RWKV-4's layer-dependent init is spread over (None: the model's)
    zero_init: bool = True  # W_k, W_r, W_o start at zero (RWKV-4)
    decay_lr_scale: float = 2.0  # RWKV-LM v4: time_decay trains at 2x the learning rate
    first_lr_scale: float = 3.0  # RWKV-LM v4: time_first trains at 3x the learning rate

    def for_depth(self, n_layers: int) -> RWKVConfig:
        return self if self.init_n_layers is not None else dataclasses.replace(self, init_n_layers=n_layers)

    def depth(self) -> int:
        """The depth the init spreads over: the field, or 16 for a layer built outside a model."""
        return self.init_n_layers if self.init_n_layers is not None else INIT_N_LAYERS

    def check(self, d_model: int) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"rwkv: mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.kernel not in WKV_BACKENDS:
            raise ConfigError(f"rwkv: kernel={self.kernel!r} is not one of {', '.join(WKV_BACKENDS)}")
        if self.chunk_size < 1:
            raise ConfigError(f"rwkv: chunk_size={self.chunk_size} must be at least 1")
        if self.init_n_layers is not None and self.init_n_layers < 1:
            raise ConfigError(
                f"rwkv: init_n_layers={self.init_n_layers} must be at least 1 (or null: the model's depth)"
            )
        if d_model < 2:
            raise ConfigError(f"rwkv: d_model={d_model} must be at least 2 (the decay init spans the channels)")

    @classmethod
    def small(cls) -> RWKVConfig:
        # several chunks at the contract tests' lengths; random (not zero) projections so the layer does something
        return cls(chunk_size=16, zero_init=False)


@register_mixer("rwkv")
class RWKV(TokenMixer):
    config_class = RWKVConfig

    def __init__(self, d_model: int, config: RWKVConfig, layer_idx: int = 0) -> None:
        super().__init__(d_model, config, layer_idx)
        self.time_decay = set_optim(
            nn.Parameter(torch.empty(d_model)), weight_decay=0.0, lr_scale=config.decay_lr_scale
        )
        self.time_first = set_optim(
            nn.Parameter(torch.empty(d_model)), weight_decay=0.0, lr_scale=config.first_lr_scale
        )
        self.time_mix_k = set_optim(nn.Parameter(torch.empty(d_model)), weight_decay=0.0)
        self.time_mix_v = set_optim(nn.Parameter(torch.empty(d_model)), weight_decay=0.0)
        self.time_mix_r = set_optim(nn.Parameter(torch.empty(d_model)), weight_decay=0.0)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.output = nn.Linear(d_model, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        C = self.d_model
        r0, r1 = _depth_ratios(self.layer_idx, self.config.depth())
        c = torch.arange(C, dtype=torch.float64)
        self.time_decay.copy_(-5 + 8 * (c / (C - 1)) ** (0.7 + 1.3 * r0))  # slow .. fast decays across channels
        zigzag = ((c + 1) % 3 - 1) * 0.5
        self.time_first.copy_(math.log(0.3) + zigzag)
        ramp = _channel_ramp(C)
        self.time_mix_k.copy_(ramp**r1)
        self.time_mix_v.copy_(ramp**r1 + 0.3 * r0)
        self.time_mix_r.copy_(ramp ** (0.5 * r1))
        _orthogonal(self.value)
        for proj in (self.key, self.receptance, self.output):
            if self.config.zero_init:
                nn.init.zeros_(proj.weight)
            else:
                _orthogonal(proj)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        B, T, C = x.shape
        shifted = _token_shift(x, None if state is None else state["x"])
        k = self.key(_mix(x, shifted, self.time_mix_k))
        v = self.value(_mix(x, shifted, self.time_mix_v))
        r = self.receptance(_mix(x, shifted, self.time_mix_r))
        (time_decay,) = at_least_float32(self.time_decay)
        w = -torch.exp(time_decay)
        wkv_state = None if state is None else (state["a"], state["b"], state["p"])
        if self.config.mode == "recurrent" or (state is not None and T == 1):
            wkv, wkv_state = wkv_recurrent(w, self.time_first, k, v, wkv_state, return_state)
        elif self._on_kernel(k, through_state=wkv_state is not None or return_state):
            from arch_zoo.kernels.wkv_triton import wkv_triton

            wkv, wkv_state = wkv_triton(w, self.time_first, k, v, wkv_state, return_state)
        else:
            wkv, wkv_state = wkv_chunkwise(w, self.time_first, k, v, wkv_state, return_state, self.config.chunk_size)
        y = self.output(torch.sigmoid(r) * wkv.to(x.dtype))
        if not return_state:
            return y, None
        a, b, p = wkv_state
        return y, {"x": x[:, -1], "a": a, "b": b, "p": p}

    def _on_kernel(self, k: torch.Tensor, through_state: bool = False) -> bool:
        """Whether a whole sequence's WKV (keys like ``k``) runs on the fused kernel rather than the chunkwise form
        (see the ``kernel`` field; the callers have already sent ``recurrent`` mode to the recurrence). ``auto``
        leaves float64 to the chunkwise form: the kernel computes in float32."""
        c = self.config
        if dispatch.choose_backend(c.kernel, k.device) != "triton":
            return False
        if c.kernel == "triton":
            return True
        return k.dtype != torch.float64 and not (through_state and torch.is_grad_enabled())

    def state_size(self, seq_len: int) -> int:
        return 4 * self.d_model  # last x for the token shift; WKV's numerator, denominator and max exponent

    def flops_per_token(self, seq_len: int) -> float:
        """The four projections, plus (chunkwise) the chunk-local sums: one ``[L, L]`` decay matrix times numerator
        and denominator inputs per channel, over the sequence padded to whole chunks. The recurrent form, the fused
        kernel (it runs the recurrence; counted where the weights' device and dtype put it) and the rest of WKV are
        element-wise."""
        projections = linear_flops(self.key, self.value, self.receptance, self.output)
        if self.config.mode == "recurrent" or self._on_kernel(self.key.weight):
            return projections
        L = max(1, min(self.config.chunk_size, seq_len))
        padded = -(-seq_len // L) * L
        return projections + 4 * L * self.d_model * padded / seq_len


class RWKVChannelMix(nn.Module):
    """RWKV's channel mixing: a squared-ReLU FFN on token-shifted inputs, gated by a sigmoid receptance."""

    def __init__(self, d_model: int, config: FFNConfig, layer_idx: int = 0):
        super().__init__()
        init_n_layers = config.n_layers if config.n_layers is not None else INIT_N_LAYERS
        hidden = config.hidden(d_model)
        self.d_model = d_model
        self.time_mix_k = set_optim(nn.Parameter(torch.empty(d_model)), weight_decay=0.0)
        self.time_mix_r = set_optim(nn.Parameter(torch.empty(d_model)), weight_decay=0.0)
        self.key = nn.Linear(d_model, hidden, bias=config.bias)
        self.receptance = nn.Linear(d_model, d_model, bias=config.bias)
        self.value = nn.Linear(hidden, d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        with torch.no_grad():
            _, r1 = _depth_ratios(layer_idx, init_n_layers)
            ramp = _channel_ramp(d_model)
            self.time_mix_k.copy_(ramp**r1)
            self.time_mix_r.copy_(ramp**r1)
            _orthogonal(self.key)
            nn.init.zeros_(self.receptance.weight)  # RWKV-4: the FFN adds nothing to the residual stream at first
            nn.init.zeros_(self.value.weight)
            for linear in (self.key, self.receptance, self.value):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
                linear._keep_init = True  # the model's generic FFN init must not overwrite RWKV's

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        shifted = _token_shift(x, state)
        k = torch.square(F.relu(self.key(_mix(x, shifted, self.time_mix_k))))
        y = torch.sigmoid(self.receptance(_mix(x, shifted, self.time_mix_r))) * self.value(self.dropout(k))
        return y, (x[:, -1] if return_state else None)

    def state_size(self, seq_len: int) -> int:
        return self.d_model  # the last token's x

    def flops_per_token(self, seq_len: int) -> float:
        return linear_flops(self.key, self.receptance, self.value)


@register_ffn("rwkv_channel")
def _rwkv_channel_mix(d_model: int, config: FFNConfig, layer_idx: int) -> RWKVChannelMix:
    return RWKVChannelMix(d_model, config, layer_idx)
