"""RetNet's score normaliser read, ``s_t = q_t . z_t`` with ``z_t = gamma z_{t-1} + k_t``, as one Triton kernel.

Why a kernel of its own: the normaliser ``max(|s_t|, 1)`` is the retention core with a value width of one (v = 1).
Through the core's kernels that width is padded to a 16-wide value tile, which their tiles serve badly: one chunk
per block, a state sweep before the output kernel, and the 256-deep chunk scores made again. At the Table 5 shape
(B 32, T 2048, 4 heads of 256) that call took about 0.4 ms a layer, more than half the core's own forward pass.

Here the key dim is split instead of the value dim: a program sweeps one sequence and head for ``BK`` key columns,
with its slice of ``z`` (``BK`` floats) in registers, and writes its part of every ``s_t``; the parts (``K / BK``
per token) are summed after. So q and k are read once, the state is a few registers, and there are
``B * H * K / BK`` programs (512 at that shape). Per chunk of ``C`` tokens starting at ``t0``, row ``i`` is::

    s_{t0+i} = sum_{j<=i} gamma^(i-j) q_{t0+i} . k_{t0+j}  +  gamma^(i+1) q_{t0+i} . z_{t0-1}

and ``z`` moves on by ``gamma^n z + sum_j gamma^(n-1-j) k_{t0+j}`` over the chunk's ``n`` tokens. The normaliser is
detached in RetNet, so there is no backward. Registered as ``arch_zoo::retention_key_sum`` (with a shape function)
so that a compiled model keeps it in its graph. Its reference is the core itself with a column of ones for v
(``core.chunkwise``), which ``tests/test_key_sum_kernel.py`` checks it against in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from arch_zoo.kernels.retention_triton import _precision, on_inputs_device

BK = 64  # key columns a program carries: 4 programs per sequence and head at K = 256
C = 64  # tokens per chunk (the [C, C] scores of one chunk and one key slice)
WARPS = 4
STAGES = 2  # chunks in flight: the loads do not depend on z, so the pipeliner can issue them ahead


@triton.jit
def _key_sum_kernel(
    q_ptr,
    k_ptr,
    z0_ptr,
    s_ptr,
    z_ptr,
    log_gamma_ptr,
    stride_b,
    stride_t,
    stride_h,
    T,
    H: tl.constexpr,
    DK: tl.constexpr,
    BK: tl.constexpr,
    C: tl.constexpr,
    HAS_Z0: tl.constexpr,
    STORE_Z: tl.constexpr,
    STAGES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Part ``i_k`` (key columns ``i_k * BK ...``) of ``s`` for one sequence and head, stored at
    ``s[b, h, i_k, t]``; with STORE_Z the slice of the final ``z`` too."""
    i_k, i_bh = tl.program_id(0), tl.program_id(1)
    n_k = tl.num_programs(0)
    i_b = i_bh // H
    i_h = i_bh % H
    lg = tl.load(log_gamma_ptr + i_h).to(tl.float32)
    cols = i_k * BK + tl.arange(0, BK)
    col_ok = cols < DK
    i = tl.arange(0, C)
    gap = (i[:, None] - i[None, :]).to(tl.float32)
    decay = tl.where(i[:, None] >= i[None, :], tl.exp(lg * tl.maximum(gap, 0.0)), 0.0)  # gamma^(i-j), j <= i
    row_decay = tl.exp(lg * (i + 1).to(tl.float32))  # what the chunk's starting z is worth to row i
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_Z0:
        z += tl.load(z0_ptr + i_bh.to(tl.int64) * DK + cols, mask=col_ok, other=0.0).to(tl.float32)
    base = i_b.to(tl.int64) * stride_b + i_h * stride_h
    s_base = s_ptr + (i_bh.to(tl.int64) * n_k + i_k) * T
    for t0 in tl.range(0, T, C, num_stages=STAGES):
        rows = t0 + i
        row_ok = rows < T
        offs = base + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        qt = tl.load(q_ptr + offs, mask=mask, other=0.0)
        kt = tl.load(k_ptr + offs, mask=mask, other=0.0)
        scores = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * decay
        carried = tl.sum(qt.to(tl.float32) * z[None, :], axis=1) * row_decay
        tl.store(s_base + rows, tl.sum(scores, axis=1) + carried, mask=row_ok)
        n = tl.minimum(T - t0, C)  # the last chunk may be short: z is decayed by its own length
        weight = tl.where(i < n, tl.exp(lg * (n - 1 - i).to(tl.float32)), 0.0)
        z = z * tl.exp(lg * n.to(tl.float32)) + tl.sum(kt.to(tl.float32) * weight[:, None], axis=0)
    if STORE_Z:
        tl.store(z_ptr + i_bh.to(tl.int64) * DK + cols, z, mask=col_ok)


def _parts(K: int) -> int:
    return triton.cdiv(K, BK)


def _final_z(q: torch.Tensor, output_final_state: bool) -> torch.Tensor:
    """The final z's buffer, ``[B, H, K]`` float32, or an empty one when it is not asked for."""
    B, _, H, K = q.shape
    return q.new_empty((B, H, K) if output_final_state else (0,), dtype=torch.float32)


@torch.library.custom_op("arch_zoo::retention_key_sum", mutates_args=())
@on_inputs_device
def _key_sum_op(
    q: torch.Tensor,
    k: torch.Tensor,
    log_gamma: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s [B, H, T] float32, final z [B, H, K] float32 or empty)`` for q, k ``[B, T, H, K]`` of one layout."""
    B, T, H, K = q.shape
    parts = q.new_empty(B, H, _parts(K), T, dtype=torch.float32)
    final = _final_z(q, output_final_state)
    z0 = initial_state if initial_state is not None else final
    _key_sum_kernel[(_parts(K), B * H)](
        q, k, z0, parts, final, log_gamma, q.stride(0), q.stride(1), q.stride(2), T,
        H=H, DK=K, BK=BK, C=C, HAS_Z0=initial_state is not None, STORE_Z=output_final_state, STAGES=STAGES,
        PRECISION=_precision(q.dtype), num_warps=WARPS,
    )  # fmt: skip
    return parts.sum(2), final


@_key_sum_op.register_fake
def _(q, k, log_gamma, initial_state, output_final_state):
    B, T, H, _ = q.shape
    return q.new_empty(B, H, T, dtype=torch.float32), _final_z(q, output_final_state)


def key_sum_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    log_gamma: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``s_t = q_t . z_t`` (``z_t = gamma z_{t-1} + k_t``, ``z_{-1}`` = ``initial_state`` or zero) for q, k
    ``[B, T, H, K]`` and log_gamma ``[H]``: ``s`` ``[B, H, T]`` and the final ``z`` ``[B, H, K]`` (float32), no
    gradient (the normaliser it serves is detached)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"key sum: q, k [B, T, H, K] expected; got {tuple(q.shape)}, {tuple(k.shape)}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("key sum: the kernel has no backward (RetNet's normaliser is detached); call it under no_grad")
    B, T, H, K = q.shape
    if initial_state is not None and initial_state.shape != (B, H, K):
        raise ValueError(f"key sum: initial_state must be {(B, H, K)}; got {tuple(initial_state.shape)}")
    if k.stride() != q.stride() or q.stride(-1) != 1:  # the kernel reads both through q's strides
        q, k = q.contiguous(), k.contiguous()
    lg = log_gamma.detach().to(device=q.device, dtype=torch.float32).contiguous()
    z0 = None if initial_state is None else initial_state.float().contiguous()
    s, final = _key_sum_op(q, k, lg, z0, output_final_state)
    return s, final if output_final_state else None
