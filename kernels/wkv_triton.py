"""Fused Triton kernels for RWKV-4's WKV operator (see ``wkv_recurrent`` in ``arch_zoo/mixers/rwkv.py``, the
reference they are tested against).

Why a kernel: WKV is a recurrence over time whose state per channel is three numbers (numerator, denominator and
max exponent). The PyTorch chunkwise form runs it as ``T / L`` small element-wise steps plus chunk-local matrix
products; at the Table 5 shape that is thousands of launches a step, most of the step's time, and a host sync per
layer (its check for underflowed rows). Here one program runs the recurrence for a block of channels of one
sequence with the state in registers, reading k and v once and writing y once: the forward pass is one launch
and moves ``B T C`` inputs and outputs, nothing else.

Forward, per channel (the max trick keeps every exponential at most 1; ``p`` is the state's exponent)::

    q = max(p, u + k_t);  y_t = (e^{p-q} a + e^{u+k_t-q} v_t) / (e^{p-q} b + e^{u+k_t-q})
    p' = max(p + w, k_t); a, b = e^{p+w-p'} a + e^{k_t-p'} v_t, e^{p+w-p'} b + e^{k_t-p'}

Backward, with ``D_t`` the denominator of ``y_t`` (``log D_t = q + log(den)``) and ``G_t = dy_t / D_t``::

    dv_j = e^{u+k_j} G_j + e^{k_j} R1_j            R1_j = sum_{t>j} e^{(t-1-j) w} G_t
    dk_j = e^{u+k_j} G_j (v_j - y_j) + e^{k_j} (v_j R1_j - R2_j)   R2_j = sum_{t>j} e^{(t-1-j) w} G_t y_t
    du = sum_t e^{u+k_t} G_t (v_t - y_t)
    dw = sum_t G_t (dA_t - y_t dB_t)               dA, dB: the derivatives of the state's sums by w

One program does both: a forward sweep recomputes the states, y and ``log D`` (written to a float32 scratch) and
sums ``du`` and ``dw`` (the state's derivatives move as ``dA' = e^w (dA + A)``); a reversed sweep carries ``R1``
and ``R2`` (as ``r e^s`` with a running max exponent ``s``, so again nothing overflows: ``k_j + s <= 0`` because
``D_t`` contains the term it divides) and writes dk and dv. The forward saves nothing but its inputs.

Each sweep is a loop over time with one load and one store per token and channel; the loads do not depend on the
recurrence, so Triton's software pipeliner (``STAGES``) issues them several tokens ahead through asynchronous copies,
so a program no longer waits out a memory latency on every token. Measured on an H100 at the Table 5 shape (B 32,
T 2048, C 1024, bf16; ``docs/results/kernels.md``): forward 0.44 ms, backward 1.32 ms, 25x the eager chunkwise form
timed beside it and 7x the compiled one (timed in another call). Loading 16 tokens as one register tile instead
was slower (forward 2.7 ms, backward 64 ms): picking rows out of a tile cost more than the latency it hid.

Registered as the operators ``arch_zoo::wkv4`` and ``arch_zoo::wkv4_backward`` with shape functions and an autograd
rule, so a compiled model keeps WKV in its graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from arch_zoo.kernels.retention_triton import on_inputs_device

# tiles, timed on an H100 at the Table 5 shape against 32/64/128 channels, 1-4 warps and 1-4 stages (kernels.md):
# two channels a thread make 4-byte loads, which the pipeliner can copy asynchronously
BLOCK_C = 64  # channels a program carries (B * C / 64 programs: 512 at the Table 5 shape)
WARPS = 1
STAGES = 4  # tokens in flight per sweep


@triton.jit
def _program_channels(w_ptr, u_ptr, C, BLOCK_C: tl.constexpr):
    """This program's channels (and which exist), its sequence, and their decays and bonuses in float32."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return cols, col_ok, tl.program_id(1).to(tl.int64), w, u


@triton.jit
def _wkv_forward_kernel(
    k_ptr,
    v_ptr,
    w_ptr,
    u_ptr,
    y_ptr,
    s0_ptr,
    final_ptr,
    T,
    C,
    BC,
    HAS_S0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr,
):
    cols, col_ok, seq, w, u = _program_channels(w_ptr, u_ptr, C, BLOCK_C)
    state = seq * C + cols
    if HAS_S0:  # [3, B, C]: numerator, denominator, exponent
        a = tl.load(s0_ptr + state, mask=col_ok, other=0.0)
        b = tl.load(s0_ptr + BC + state, mask=col_ok, other=0.0)
        p = tl.load(s0_ptr + 2 * BC + state, mask=col_ok, other=float("-inf"))
    else:
        a = tl.zeros([BLOCK_C], dtype=tl.float32)
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
        p = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    offs = seq * T * C + cols
    for _ in tl.range(0, T, num_stages=STAGES):
        k = tl.load(k_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
        q = tl.maximum(p, u + k)
        e_state = tl.exp(p - q)
        e_new = tl.exp(u + k - q)
        tl.store(
            y_ptr + offs, ((e_state * a + e_new * v) / (e_state * b + e_new)).to(y_ptr.dtype.element_ty), mask=col_ok
        )
        decayed = p + w
        p = tl.maximum(decayed, k)
        e_state = tl.exp(decayed - p)
        e_new = tl.exp(k - p)
        a = e_state * a + e_new * v
        b = e_state * b + e_new
        offs += C
    if STORE_FINAL:
        tl.store(final_ptr + state, a, mask=col_ok)
        tl.store(final_ptr + BC + state, b, mask=col_ok)
        tl.store(final_ptr + 2 * BC + state, p, mask=col_ok)


@triton.jit
def _wkv_backward_kernel(
    k_ptr,
    v_ptr,
    w_ptr,
    u_ptr,
    dy_ptr,
    y_ptr,
    logd_ptr,
    dk_ptr,
    dv_ptr,
    dw_ptr,
    du_ptr,
    T,
    C,
    BLOCK_C: tl.constexpr,
    STAGES: tl.constexpr,
):
    cols, col_ok, seq, w, u = _program_channels(w_ptr, u_ptr, C, BLOCK_C)

    # forward sweep: the states and their derivatives by w; y and log D to the scratch; du and dw summed
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    da = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    p = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    du = tl.zeros([BLOCK_C], dtype=tl.float32)
    offs = seq * T * C + cols
    for _ in tl.range(0, T, num_stages=STAGES):
        k = tl.load(k_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
        q = tl.maximum(p, u + k)
        e_state = tl.exp(p - q)
        e_new = tl.exp(u + k - q)
        den = e_state * b + e_new
        y = (e_state * a + e_new * v) / den
        tl.store(y_ptr + offs, y, mask=col_ok)
        tl.store(logd_ptr + offs, q + tl.log(den), mask=col_ok)
        du += g * (e_new / den) * (v - y)
        dw += g * (e_state / den) * (da - y * db)
        decayed = p + w
        p = tl.maximum(decayed, k)
        e_state = tl.exp(decayed - p)
        e_new = tl.exp(k - p)
        da = e_state * (da + a)
        db = e_state * (db + b)
        a = e_state * a + e_new * v
        b = e_state * b + e_new
        offs += C
    tl.store(dw_ptr + seq * C + cols, dw, mask=col_ok)
    tl.store(du_ptr + seq * C + cols, du, mask=col_ok)

    # reversed sweep: R1, R2 as r e^s; dk and dv
    r1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    r2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    for _ in tl.range(0, T, num_stages=STAGES):
        offs -= C
        k = tl.load(k_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=col_ok, other=0.0)
        log_d = tl.load(logd_ptr + offs, mask=col_ok, other=0.0)
        bonus = tl.exp(u + k - log_d) * g
        e_past = tl.exp(k + s)
        tl.store(dv_ptr + offs, (bonus + e_past * r1).to(dv_ptr.dtype.element_ty), mask=col_ok)
        tl.store(dk_ptr + offs, (bonus * (v - y) + e_past * (v * r1 - r2)).to(dk_ptr.dtype.element_ty), mask=col_ok)
        decayed = s + w
        s = tl.maximum(decayed, -log_d)
        e_s = tl.exp(decayed - s)
        e_g = tl.exp(-log_d - s) * g
        r1 = e_s * r1 + e_g
        r2 = e_s * r2 + e_g * y


def _grid(B: int, C: int) -> tuple[int, int]:
    return (triton.cdiv(C, BLOCK_C), B)


def _final_state(k: torch.Tensor, output_final_state: bool) -> torch.Tensor:
    """The final state's buffer, ``[3, B, C]`` float32, or an empty one when it is not asked for."""
    B, _, C = k.shape
    return k.new_empty((3, B, C) if output_final_state else (0,), dtype=torch.float32)


@torch.library.custom_op("arch_zoo::wkv4", mutates_args=())
@on_inputs_device
def _wkv_op(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, final state [3, B, C] or empty)``; y in v's dtype."""
    B, T, C = k.shape
    y = torch.empty_like(v)
    final = _final_state(k, output_final_state)
    s0 = initial_state if initial_state is not None else final
    _wkv_forward_kernel[_grid(B, C)](
        k, v, w, u, y, s0, final, T, C, B * C,
        HAS_S0=initial_state is not None, STORE_FINAL=output_final_state,
        BLOCK_C=BLOCK_C, STAGES=STAGES, num_warps=WARPS,
    )  # fmt: skip
    return y, final


@_wkv_op.register_fake
def _(w, u, k, v, initial_state, output_final_state):
    return torch.empty_like(v), _final_state(k, output_final_state)


@torch.library.custom_op("arch_zoo::wkv4_backward", mutates_args=())
@on_inputs_device
def _wkv_backward_op(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dw, du, dk, dv)``: dw and du summed over the batch (float32), dk and dv in k's and v's dtypes."""
    B, T, C = k.shape
    scratch = k.new_empty(2, B, T, C, dtype=torch.float32)  # y and log D of the forward sweep, for the reversed one
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dw, du = k.new_empty(B, C, dtype=torch.float32), k.new_empty(B, C, dtype=torch.float32)
    _wkv_backward_kernel[_grid(B, C)](
        k, v, w, u, dy, scratch[0], scratch[1], dk, dv, dw, du, T, C,
        BLOCK_C=BLOCK_C, STAGES=STAGES, num_warps=WARPS,
    )  # fmt: skip
    return dw.sum(0), du.sum(0), dk, dv


@_wkv_backward_op.register_fake
def _(w, u, k, v, dy):
    C = k.shape[-1]
    return (
        k.new_empty(C, dtype=torch.float32),
        k.new_empty(C, dtype=torch.float32),
        torch.empty_like(k),
        torch.empty_like(v),
    )


def _setup_context(ctx, inputs, output) -> None:
    w, u, k, v, _, _ = inputs
    ctx.save_for_backward(w, u, k, v)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _d_final):
    w, u, k, v = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None, None
    dw, du, dk, dv = _wkv_backward_op(w, u, k, v, dy.contiguous())
    return dw.to(w.dtype), du.to(u.dtype), dk, dv, None, None


_wkv_op.register_autograd(_backward, setup_context=_setup_context)


def wkv_triton(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """WKV through the kernels: ``w`` (negative decays), ``u`` ``[C]`` and k, v ``[B, T, C]``, the signature of
    ``wkv_recurrent``. Gradients reach w, u, k and v; a given state and the final state carry none, so with
    gradients on they are refused rather than silently cut (the mixer runs its chunkwise form for those calls)."""
    if k.dim() != 3 or v.shape != k.shape or w.shape != (k.shape[-1],) or u.shape != w.shape:
        raise ValueError(f"wkv: k, v [B, T, C] and w, u [C] expected; got {k.shape}, {v.shape}, {w.shape}, {u.shape}")
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v))
    if needs_grad and (state is not None or output_final_state):
        raise ValueError("wkv: the kernels carry no gradient through a state; call them with state=None and "
                         "output_final_state=False when training, or use wkv_chunkwise")  # fmt: skip
    s0 = None if state is None else torch.stack([s.float() for s in state]).contiguous()
    w32 = w.float().contiguous()
    u32 = u.float().contiguous()
    y, final = _wkv_op(w32, u32, k.contiguous(), v.contiguous(), s0, output_final_state)
    return y, (final[0], final[1], final[2]) if output_final_state else None
