"""RetNet's output stage, ``silu(gate) * (norm(o * row_scale) * w + b)`` with the heads side by side, forward as
one Triton kernel.

Why a kernel: compiled, the stage became two Inductor kernels, a reduction for the norm's statistics and then the
gate's product, and so read the heads ``o`` twice. At the Table 5 shape (B 32, T 2048, 4 heads of 512 values, bf16)
they took 177 + 258 us a layer on an H100; the fewest bytes (o and the gate read once, the output written once) are
3 x 268 MB. Here one program normalises ``ROWS`` rows of ``dv`` values (one head of one token each) in registers
and writes the gated output straight into the ``[B, T, H * dv]`` layout the output projection reads.

The statistics are float32 whatever the input (the norm is float32 inside for half inputs), and the output is
rounded once. The backward stays in PyTorch (``_GatedHeadNorm.backward`` in ``arch_zoo/mixers/retnet.py``, whose
compiled kernel runs near the copy bandwidth); it reads the per-row ``rstd`` this kernel stores. Registered as
``arch_zoo::gated_head_norm`` with a shape function, so a compiled model keeps it in its graph. Its reference is the
PyTorch formula in that module, which ``tests/test_head_norm_kernel.py`` checks it against in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WARPS = 4
VALUES_PER_PROGRAM = 2048  # ROWS = this / (dv rounded up to a power of two): 4 heads of 512 a program


@triton.jit
def _gated_head_norm_kernel(
    o_ptr,
    s_ptr,
    g_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    rstd_ptr,
    n_rows,
    T,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_sb,
    stride_sh,
    stride_st,
    eps,
    H: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CENTER: tl.constexpr,
):
    """Rows ``r = (b * T + t) * H + h`` (the output's order): ``y[b, t, h*dv:(h+1)*dv]`` and ``rstd[b, h, t]``."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = r < n_rows
    h = r % H
    bt = r // H
    t = bt % T
    b = bt // T
    c = tl.arange(0, BLOCK_DV)
    c_ok = c < DV
    ok = r_ok[:, None] & c_ok[None, :]
    o_row = b.to(tl.int64) * stride_ob + h * stride_oh + t.to(tl.int64) * stride_ot
    x = tl.load(o_ptr + o_row[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s_row = b.to(tl.int64) * stride_sb + h * stride_sh + t.to(tl.int64) * stride_st
        x = x * tl.load(s_ptr + s_row, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    if CENTER:
        x = tl.where(ok, x - tl.sum(x, axis=1)[:, None] / DV, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / DV + eps)
    z = x * rstd[:, None]
    if HAS_WEIGHT:
        z = z * tl.load(w_ptr + h[:, None] * DV + c[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(b_ptr + h[:, None] * DV + c[None, :], mask=ok, other=0.0).to(tl.float32)
    y_offs = r.to(tl.int64)[:, None] * DV + c[None, :]
    gate = tl.load(g_ptr + y_offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_offs, (gate * tl.sigmoid(gate) * z).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + (b.to(tl.int64) * H + h) * T + t, rstd, mask=r_ok)


def _outputs(o: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated output ``[B, T, H * dv]`` (the gate's dtype) and ``rstd`` ``[B, H, T, 1]`` float32."""
    B, H, T, _ = o.shape
    return torch.empty_like(gate, memory_format=torch.contiguous_format), o.new_empty(B, H, T, 1, dtype=torch.float32)


@torch.library.custom_op("arch_zoo::gated_head_norm", mutates_args=())
def _gated_head_norm_op(
    o: torch.Tensor,
    row_scale: torch.Tensor | None,
    gate: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)`` for o ``[B, H, T, dv]`` (last dim contiguous), row_scale ``[B, H, T, 1]`` (any strides), a
    contiguous gate ``[B, T, H * dv]`` and weight, bias ``[H, 1, dv]`` (contiguous) or None."""
    B, H, T, dv = o.shape
    y, rstd = _outputs(o, gate)
    n_rows = B * T * H
    block = triton.next_power_of_2(dv)
    rows = max(1, VALUES_PER_PROGRAM // block)
    s = row_scale.expand(B, H, T, 1) if row_scale is not None else None
    s_strides = s.stride()[:3] if s is not None else (0, 0, 0)
    _gated_head_norm_kernel[(triton.cdiv(n_rows, rows),)](
        o, s, gate, weight, bias, y, rstd, n_rows, T, o.stride(0), o.stride(1), o.stride(2), *s_strides, eps,
        H=H, DV=dv, BLOCK_DV=block, ROWS=rows, HAS_SCALE=s is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, CENTER=center, num_warps=WARPS,
    )  # fmt: skip
    return y, rstd


@_gated_head_norm_op.register_fake
def _(o, row_scale, gate, weight, bias, eps, center):
    return _outputs(o, gate)


def gated_head_norm_triton(
    o: torch.Tensor,
    row_scale: torch.Tensor | None,
    gate: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate) * (norm(o * row_scale) * weight + bias)`` heads side by side, and the norm's ``rstd``, for
    o ``[B, H, T, dv]``, row_scale ``[..., 1]`` broadcasting to ``[B, H, T, 1]`` (or None), gate ``[B, T, H * dv]``
    and weight, bias ``[H, 1, dv]`` (or None). No gradient: the caller's autograd function has the backward."""
    B, H, T, dv = o.shape
    if gate.shape != (B, T, H * dv):
        raise ValueError(f"gated head norm: gate {(B, T, H * dv)} expected for o {tuple(o.shape)}; got {gate.shape}")
    if o.stride(-1) != 1:
        o = o.contiguous()
    gate = gate.contiguous()
    weight = None if weight is None else weight.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    return _gated_head_norm_op(o, row_scale, gate, weight, bias, float(eps), bool(center))
