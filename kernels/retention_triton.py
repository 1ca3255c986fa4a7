"""Fused Triton kernels for the retention core (see ``kernels/reference.py`` for the function and the layout).

Why these are faster than fla's generic ``chunk_simple_gla`` kernels: the cost of chunkwise retention at RetNet's
sizes is moving bytes, and most of fla's bytes are the per-chunk states ``[K, V]`` it writes to memory every 64
tokens (twice the size of q at K = V = 128) and reads back, in the forward pass and twice more in the backward.
Here a program keeps its running state in registers across ``NC`` sub-chunks of ``C`` tokens, so a state is
stored only every ``C * NC`` tokens (one "block"), and the whole backward pass is a few launches (three at
K, V <= 128). Where the output kernels' grids alone keep the GPU busy (``_Plan.single_block``), a block is the
whole sequence: no block states are stored and neither pass runs a state sweep of its own.

Two kernels do all the work of the forward and the backward pass, each called with different roles for its
inputs ("query", "key", "value"), in forward or reversed time (``REVERSE`` reads the rows from the end, which turns
``sum_{m<=n}`` into ``sum_{m>=n}``):

* ``_state_pass_kernel``: one sequential sweep over the chunks with the state ``G`` in registers, storing ``G`` at
  each block's start (and the final state). Forward: key = k, value = v. Backward: key = q, value = do, reversed,
  which gives the states the key/value gradients need (and the initial state's gradient).
* ``_chunk_output_kernel``: parallel over blocks; inside a block, for each sub-chunk,
  ``out = scale * (masked decayed query.key^T) value + state_scale * (decayed query) G`` and G moves on.
  Forward o: (q, k, v). dq: (do, v, k) with the forward states transposed. dv: (k, q, do) and dk: (v, do, q),
  reversed, with the backward states; ``_chunk_dkv_kernel`` does these two in one pass where the state fits.
* ``_chunk_scores_kernel``: where a call has many value blocks (the paper's V = 512: eight), each chunk's
  ``[C, C]`` scores are made once with the whole key dim and read by every block, instead of recomputed by each;
  the backward reads the forward's matrix and its own ``do . v^T`` mirrored for dv and dk.

The chunkwise core is registered as two operators (``arch_zoo::retention_chunkwise`` and its backward) with shape
functions and an autograd rule, so a compiled model keeps it in its graph; tile choices are made once per forward
call and carried to the backward.

States are kept in the "G" convention ``G = gamma * S`` (the state already decayed into the next token), so that a
state at a block start contributes ``gamma^i`` to the block's i-th row and no kernel ever divides by gamma.

Not covered here: a per-token (selective) decay, and RetNet's per-row normalisers, which the mixer applies to the
core's output. Measured results: docs/results/kernels.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CHUNK = 64  # tokens per sub-chunk: the [C, C] intra-chunk scores and the tensor-core tiles


@triton.jit
def _time_rows(t, T, REVERSE: tl.constexpr):
    """The rows of time steps ``t`` (counted from the end when REVERSE) and which of them exist."""
    if REVERSE:
        row = T - 1 - t
    else:
        row = t
    return row, t < T


@triton.jit
def _load_rows(base_ptr, row, row_ok, cols, cols_ok, row_stride):
    """A [rows, cols] tile of a [B, T, H, D] tensor (rows are time steps); masked entries read as zero."""
    return tl.load(
        base_ptr + row[:, None] * row_stride + cols[None, :], mask=row_ok[:, None] & cols_ok[None, :], other=0.0
    )


@triton.jit
def _state_pass_kernel(
    k_ptr,
    v_ptr,
    g0_ptr,
    h_ptr,
    final_ptr,
    log_gamma_ptr,
    kv_scale,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    T,
    NB,
    NC,
    n_chunks,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_G0: tl.constexpr,
    G0_DECAY: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    FINAL_SHIFT: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Sweep the sequence once (per [BK, BV] tile of the state): G <- gamma^L G + kv_scale sum_j gamma^(L-j) k_j^T v_j.

    ``h[b, blk, h]`` gets G at the start of each block of ``C * NC`` tokens (in the input dtype). The final output is
    ``gamma^(-FINAL_SHIFT)`` times G after the last token, computed without a division: FINAL_SHIFT = 1 gives the
    forward final state S_{T-1}, 0 gives the initial state's gradient in the reversed sweep.

    With SPLIT each program sweeps one block from zero (the grid's last axis is batch x head x block) and leaves its
    block's own contribution where ``_state_combine_kernel`` chains them: in ``h[blk + 1]``, or in ``final`` for
    the last block. A sweep of few sequences then has blocks' worth of programs in flight, not one per state tile.
    """
    if SPLIT:
        i_k, i_v, i_bh, i_blk = tl.program_id(0), tl.program_id(1), tl.program_id(2) // NB, tl.program_id(2) % NB
    else:
        i_k, i_v, i_bh, i_blk = tl.program_id(0), tl.program_id(1), tl.program_id(2), 0
    i_b = i_bh // H
    i_h = i_bh % H
    lg = tl.load(log_gamma_ptr + i_h).to(tl.float32)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    j = tl.arange(0, C)
    mask_kv = (rk[:, None] < DK) & (rv[None, :] < DV)
    state_off = (i_b * H + i_h).to(tl.int64) * DK * DV + rk[:, None] * DV + rv[None, :]
    if HAS_G0:
        g = tl.load(g0_ptr + state_off, mask=mask_kv, other=0.0).to(tl.float32)
        if G0_DECAY:
            g = g * tl.exp(lg)
    else:
        g = tl.zeros([BK, BV], dtype=tl.float32)
    k_base = k_ptr + i_b.to(tl.int64) * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b.to(tl.int64) * stride_vb + i_h * stride_vh
    c_start, c_end = 0, n_chunks
    if SPLIT:
        c_start, c_end = i_blk * NC, tl.minimum(i_blk * NC + NC, n_chunks)
    for c in range(c_start, c_end):
        if STORE_H:
            if c % NC == 0:
                h_off = ((i_b * NB + c // NC) * H + i_h).to(tl.int64) * DK * DV
                tl.store(h_ptr + h_off + rk[:, None] * DV + rv[None, :], g.to(h_ptr.dtype.element_ty), mask=mask_kv)
        t = c * C + j
        row, row_ok = _time_rows(t, T, REVERSE)
        kt = _load_rows(k_base, row, row_ok, rk, rk < DK, stride_kt)
        vt = _load_rows(v_base, row, row_ok, rv, rv < DV, stride_vt)
        length = tl.minimum(T - c * C, C)
        shift = tl.where(c == n_chunks - 1, FINAL_SHIFT, 0)
        span = length - shift
        w = tl.where(row_ok, tl.exp(lg * (span - j).to(tl.float32)), 0.0) * kv_scale
        kw = (kt.to(tl.float32) * w[:, None]).to(kt.dtype)
        g = g * tl.exp(lg * span.to(tl.float32))
        g = tl.dot(tl.trans(kw), vt, acc=g, input_precision=PRECISION)
    if SPLIT:
        if i_blk < NB - 1:
            h_off = ((i_b * NB + i_blk + 1) * H + i_h).to(tl.int64) * DK * DV
            tl.store(h_ptr + h_off + rk[:, None] * DV + rv[None, :], g.to(h_ptr.dtype.element_ty), mask=mask_kv)
        elif STORE_FINAL:
            tl.store(final_ptr + state_off, g, mask=mask_kv)
    elif STORE_FINAL:
        tl.store(final_ptr + state_off, g, mask=mask_kv)


@triton.jit
def _state_combine_kernel(
    g0_ptr,
    h_ptr,
    tail_ptr,
    final_ptr,
    log_gamma_ptr,
    T,
    NB,
    block_tokens,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_G0: tl.constexpr,
    G0_DECAY: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    FINAL_SHIFT: tl.constexpr,
):
    """Chain the blocks' own contributions (from a SPLIT state pass) into the states at the block starts, in place
    in ``h``: G_(blk+1) = gamma^(block tokens) G_blk + contribution_blk; and the final state from the last one."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    lg = tl.load(log_gamma_ptr + i_h).to(tl.float32)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mask_kv = (rk[:, None] < DK) & (rv[None, :] < DV)
    tile = rk[:, None] * DV + rv[None, :]
    state_off = (i_b * H + i_h).to(tl.int64) * DK * DV
    if HAS_G0:
        g = tl.load(g0_ptr + state_off + tile, mask=mask_kv, other=0.0).to(tl.float32)
        if G0_DECAY:
            g = g * tl.exp(lg)
    else:
        g = tl.zeros([BK, BV], dtype=tl.float32)
    block_decay = tl.exp(lg * block_tokens)  # every block but the last is whole
    for blk in range(0, NB):
        h_ptrs = h_ptr + ((i_b * NB + blk) * H + i_h).to(tl.int64) * DK * DV + tile
        if blk > 0:
            g = g * block_decay + tl.load(h_ptrs, mask=mask_kv, other=0.0).to(tl.float32)
        tl.store(h_ptrs, g.to(h_ptr.dtype.element_ty), mask=mask_kv)
    if STORE_FINAL:
        last_span = T - (NB - 1) * block_tokens - FINAL_SHIFT
        g = g * tl.exp(lg * last_span.to(tl.float32))
        g += tl.load(tail_ptr + state_off + tile, mask=mask_kv, other=0.0)
        tl.store(final_ptr + state_off + tile, g, mask=mask_kv)


@triton.jit
def _chunk_scores_kernel(
    q_ptr,
    k_ptr,
    a_ptr,
    log_gamma_ptr,
    scale,
    stride_b,
    stride_t,
    stride_h,
    T,
    n_chunks,
    H: tl.constexpr,
    DK: tl.constexpr,
    BK: tl.constexpr,
    C: tl.constexpr,
    REVERSE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One chunk's masked, decayed scores ``scale * (query . key^T) * gamma^(i-j)`` (i >= j), ``[C, C]``, stored at
    ``a[b, h, chunk]``: computed once here with the whole key dim instead of once per value block of the output
    kernel (eight times at the paper's value head dim of 512)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    lg = tl.load(log_gamma_ptr + i_h).to(tl.float32)
    i = tl.arange(0, C)
    row, row_ok = _time_rows(i_c * C + i, T, REVERSE)
    q_base = q_ptr + i_b.to(tl.int64) * stride_b + i_h * stride_h
    k_base = k_ptr + i_b.to(tl.int64) * stride_b + i_h * stride_h
    acc = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < DK
        qt = _load_rows(q_base, row, row_ok, rk, k_ok, stride_t)
        kt = _load_rows(k_base, row, row_ok, rk, k_ok, stride_t)
        acc = tl.dot(qt, tl.trans(kt), acc=acc, input_precision=PRECISION)
    gap = (i[:, None] - i[None, :]).to(tl.float32)
    decay = tl.where(i[:, None] >= i[None, :], tl.exp(lg * tl.maximum(gap, 0.0)), 0.0) * scale
    a_base = a_ptr + (i_bh.to(tl.int64) * n_chunks + i_c) * C * C
    tl.store(a_base + i[:, None] * C + i[None, :], (acc * decay).to(a_ptr.dtype.element_ty))


@triton.jit
def _chunk_output_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    h_ptr,
    a_ptr,
    o_ptr,
    log_gamma_ptr,
    scale,
    state_scale,
    kv_scale,
    stride_hk,
    stride_hv,
    stride_hblock,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_vb,
    stride_vt,
    stride_vh,
    T,
    NB,
    NC,
    n_chunks,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BKP: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_STATE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    SCORES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One block of ``C * NC`` tokens and ``BV`` value columns: the block's output, its state carried in registers.

    ``h[b, blk, h]`` is the block's starting state G in the "key" x "value" roles, read through strides so that the
    backward pass can use the forward states transposed, or a slice of their key dim. Query and key share one
    layout (strides), value and output another, so a 512-wide key dim can be handled as two 256-wide views, the
    second call adding into the first one's output (ACCUMULATE). Without HAS_STATE the block starts from zero.

    SCORES says where the intra-chunk scores come from: computed from query and key (0), read from ``a`` as
    ``_chunk_scores_kernel`` stored them in this kernel's frame (1), read from scores stored in the opposite time
    direction, flipped and transposed (2: the backward reuses one score matrix for two gradients; T a multiple of
    C), or none (3: a later key piece, whose scores the first piece already added).
    """
    i_v, i_blk, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H
    lg = tl.load(log_gamma_ptr + i_h).to(tl.float32)
    rk = tl.arange(0, BKP)
    rv = i_v * BV + tl.arange(0, BV)
    i = tl.arange(0, C)
    k_ok = rk < DK
    v_ok = rv < DV
    dtype = v_ptr.dtype.element_ty
    g = tl.zeros([BKP, BV], dtype=tl.float32)
    if HAS_STATE:
        h_base = h_ptr + ((i_b * NB + i_blk) * H + i_h).to(tl.int64) * stride_hblock
        g += tl.load(
            h_base + rk[:, None] * stride_hk + rv[None, :] * stride_hv, mask=k_ok[:, None] & v_ok[None, :], other=0.0
        ).to(tl.float32)
    gap = (i[:, None] - i[None, :]).to(tl.float32)
    decay = tl.where(i[:, None] >= i[None, :], tl.exp(lg * tl.maximum(gap, 0.0)), 0.0) * scale  # gamma^(i-j)
    q_decay = tl.exp(lg * i.to(tl.float32)) * state_scale  # row i sees the chunk's starting G with gamma^i
    k_decay = tl.exp(lg * (C - i).to(tl.float32)) * kv_scale  # key j reaches the next chunk's G with gamma^(C-j)
    chunk_decay = tl.exp(lg * C)
    q_base = q_ptr + i_b.to(tl.int64) * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b.to(tl.int64) * stride_qb + i_h * stride_qh
    v_base = v_ptr + i_b.to(tl.int64) * stride_vb + i_h * stride_vh
    o_base = o_ptr + i_b.to(tl.int64) * stride_vb + i_h * stride_vh
    t_block = i_blk * C * NC
    for ci in range(0, NC):  # a last partial block runs past T: its rows are masked (no traffic)
        row, row_ok = _time_rows(t_block + ci * C + i, T, REVERSE)
        qt = _load_rows(q_base, row, row_ok, rk, k_ok, stride_qt)
        kt = _load_rows(k_base, row, row_ok, rk, k_ok, stride_qt)
        vt = _load_rows(v_base, row, row_ok, rv, v_ok, stride_vt)
        # the decays scale rows of the small results, not the [C, key dim] tiles: q goes straight into the product
        out = tl.dot(qt, g.to(dtype), input_precision=PRECISION) * q_decay[:, None]
        chunk = i_blk * NC + ci
        if SCORES == 0:
            scores = (tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * decay).to(dtype)
        elif SCORES == 1:
            a_ptrs = a_ptr + (i_bh.to(tl.int64) * n_chunks + chunk) * C * C + i[:, None] * C + i[None, :]
            scores = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        elif SCORES == 2:  # element [i, j] of this frame is [C-1-j, C-1-i] of the mirrored chunk
            a_base = a_ptr + (i_bh.to(tl.int64) * n_chunks + n_chunks - 1 - chunk) * C * C
            scores = tl.load(a_base + (C - 1 - i)[:, None] + (C - 1 - i)[None, :] * C, mask=row_ok[:, None], other=0.0)
        if SCORES != 3:
            out = tl.dot(scores, vt, acc=out, input_precision=PRECISION)
        o_ptrs = o_base + row[:, None] * stride_vt + rv[None, :]
        o_mask = row_ok[:, None] & v_ok[None, :]
        if ACCUMULATE:
            out += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
        vw = (vt.to(tl.float32) * k_decay[:, None]).to(dtype)  # k_j^T v_j gamma^(C-j): weight the value rows
        g = tl.dot(tl.trans(kt), vw, acc=g * chunk_decay, input_precision=PRECISION)


@triton.jit
def _chunk_dkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    h_ptr,
    dk_ptr,
    dv_ptr,
    log_gamma_ptr,
    scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_vb,
    stride_vt,
    stride_vh,
    T,
    NB,
    NC,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BKP: tl.constexpr,
    BVP: tl.constexpr,
    C: tl.constexpr,
    HAS_STATE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk and dv of one block in reversed time, sharing the loads of q, k, v, do and one [K, V] state.

    The same arithmetic as two ``_chunk_output_kernel`` calls (dv: query k, key q, value do; dk: query v, key do,
    value q, state transposed), fused because both read the same four tiles and the same state: a third fewer
    bytes for the backward pass. Used when the whole state tile fits (K * V <= 128 * 128).
    """
    i_blk, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    lg = tl.load(log_gamma_ptr + i_h).to(tl.float32)
    rk = tl.arange(0, BKP)
    rv = tl.arange(0, BVP)
    i = tl.arange(0, C)
    k_ok = rk < DK
    v_ok = rv < DV
    dtype = q_ptr.dtype.element_ty
    if HAS_STATE:
        h_base = h_ptr + ((i_b * NB + i_blk) * H + i_h).to(tl.int64) * DK * DV
        g = tl.load(h_base + rk[:, None] * DV + rv[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        g = g.to(tl.float32)
    else:
        g = tl.zeros([BKP, BVP], dtype=tl.float32)
    gap = (i[:, None] - i[None, :]).to(tl.float32)
    decay = tl.where(i[:, None] >= i[None, :], tl.exp(lg * tl.maximum(gap, 0.0)), 0.0) * scale
    q_decay = tl.exp(lg * i.to(tl.float32))
    k_decay = tl.exp(lg * (C - i).to(tl.float32)) * scale
    chunk_decay = tl.exp(lg * C)
    k_off = i_b.to(tl.int64) * stride_qb + i_h * stride_qh  # q, k and dk share a layout; v, do and dv another
    v_off = i_b.to(tl.int64) * stride_vb + i_h * stride_vh
    t_block = i_blk * C * NC
    for ci in range(0, NC):
        t = t_block + ci * C + i
        row_ok = t < T
        row = T - 1 - t
        qt = _load_rows(q_ptr + k_off, row, row_ok, rk, k_ok, stride_qt)
        kt = _load_rows(k_ptr + k_off, row, row_ok, rk, k_ok, stride_qt)
        vt = _load_rows(v_ptr + v_off, row, row_ok, rv, v_ok, stride_vt)
        dot_ = _load_rows(do_ptr + v_off, row, row_ok, rv, v_ok, stride_vt)
        gc = g.to(dtype)
        # dv_m = scale sum_{n>=m} gamma^(n-m) (k_m . q_n) do_n + gamma^i k_m G
        dv = tl.dot(kt, gc, input_precision=PRECISION) * q_decay[:, None]
        a = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * decay
        dv = tl.dot(a.to(dtype), dot_, acc=dv, input_precision=PRECISION)
        kv_mask = row_ok[:, None] & v_ok[None, :]
        tl.store(dv_ptr + v_off + row[:, None] * stride_vt + rv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
        # dk_m = scale sum_{n>=m} gamma^(n-m) (v_m . do_n) q_n + gamma^i v_m G^T
        dk = tl.dot(vt, tl.trans(gc), input_precision=PRECISION) * q_decay[:, None]
        a = tl.dot(vt, tl.trans(dot_), input_precision=PRECISION) * decay
        dk = tl.dot(a.to(dtype), qt, acc=dk, input_precision=PRECISION)
        kk_mask = row_ok[:, None] & k_ok[None, :]
        tl.store(dk_ptr + k_off + row[:, None] * stride_qt + rk[None, :], dk.to(dk_ptr.dtype.element_ty), mask=kk_mask)
        dow = (dot_.to(tl.float32) * k_decay[:, None]).to(dtype)
        g = tl.dot(tl.trans(qt), dow, acc=g * chunk_decay, input_precision=PRECISION)


@triton.jit
def _decode_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    s_ptr,
    o_ptr,
    z_ptr,
    zq_ptr,
    log_gamma_ptr,
    scale,
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_Z: tl.constexpr,
):
    """S <- gamma S + k^T v in place, o = scale q S, for one (batch row, head) and BV value columns.

    The key dim is walked in BK-row pieces, so a program can own wide value tiles (long contiguous rows of the
    state, which is what the memory system rewards) without holding a [K, BV] tile in registers. With HAS_Z the
    value-block-0 program also steps the decayed key sum ``z <- gamma z + k`` (in place) and writes ``scale q . z``:
    RetNet's score normaliser, which would otherwise be four more launches per layer.
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    rv = i_v * BV + tl.arange(0, BV)
    v_ok = rv < DV
    gamma = tl.exp(tl.load(log_gamma_ptr + i_h).to(tl.float32))
    v = tl.load(v_ptr + i_bh * DV + rv, mask=v_ok, other=0.0).to(tl.float32)
    s_base = s_ptr + i_bh.to(tl.int64) * DK * DV
    acc = tl.zeros([BV], dtype=tl.float32)
    zq = tl.zeros([BK], dtype=tl.float32)
    for k0 in tl.static_range(0, DK, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < DK
        q = tl.load(q_ptr + i_bh * DK + rk, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + i_bh * DK + rk, mask=k_ok, other=0.0).to(tl.float32)
        s_off = rk[:, None] * DV + rv[None, :]
        s_mask = k_ok[:, None] & v_ok[None, :]
        s = tl.load(s_base + s_off, mask=s_mask, other=0.0).to(tl.float32)
        s = s * gamma + k[:, None] * v[None, :]
        tl.store(s_base + s_off, s.to(s_ptr.dtype.element_ty), mask=s_mask)
        acc += tl.sum(q[:, None] * s, axis=0)
        if HAS_Z:
            if i_v == 0:
                z = tl.load(z_ptr + i_bh * DK + rk, mask=k_ok, other=0.0).to(tl.float32) * gamma + k
                tl.store(z_ptr + i_bh * DK + rk, z.to(z_ptr.dtype.element_ty), mask=k_ok)
                zq += q * z
    tl.store(o_ptr + i_bh * DV + rv, (acc * scale).to(o_ptr.dtype.element_ty), mask=v_ok)
    if HAS_Z:
        if i_v == 0:
            tl.store(zq_ptr + i_bh, tl.sum(zq, axis=0) * scale)


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------------


def on_inputs_device(op: Callable) -> Callable:
    """Run ``op`` (an operator's implementation) with the CUDA device of its first tensor argument current.

    Why: a Triton kernel launches on the current device, not on the device of its tensors. A model on ``cuda:1``
    while ``cuda:0`` was current (``zoo-bench --device cuda:1``, a notebook) had its kernels launched on the other
    GPU. A compiled graph sets the device itself; an eager call, and the call that a compiled graph's operator makes,
    come through here."""

    @functools.wraps(op)
    def on_device(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        if not first.is_cuda:
            return op(*args, **kwargs)
        with torch.cuda.device(first.device):
            return op(*args, **kwargs)

    return on_device


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (tf32 would cost ~3e-4 relative error); half types use tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


# one block per sequence (_Plan.single_block) where every output-kernel launch still has this many programs (about
# two per SM of a 132-SM H100). Measured on an H100 (bf16, 65,536 tokens, 8 heads, fwd+bwd ms, stored block states
# -> one block): it won wherever the narrowest launch had 256 programs or more (64 x 64 at T = 2048: 0.713 -> 0.525;
# 128 x 128 at 2048: 1.268 -> 1.034; 256 x 256 at 2048 / 8192: 4.288 -> 3.370 / 4.334 -> 3.492; 256 x 512 at 2048 /
# 8192: 8.063 -> 6.282 / 8.110 -> 6.486) and lost wherever it had 64 or fewer (64 x 64 and 128 x 128 at 8192: 0.760
# -> 0.873, 1.409 -> 1.488; 128 x 128 and 256 x 512 at 32768: 1.506 -> 5.557, 8.508 -> 13.591)
SINGLE_BLOCK_PROGRAMS = 256

# the narrowest value width the kernels are run at (a narrower one is padded): on an H100, a value width of one (bf16,
# K = 256, batch 32 x 2048 tokens, blocks of four chunks) made an illegal memory access where the same call padded to
# 16 did not; padded and on one-chunk blocks it was exact (session 12; unpadded on one-chunk blocks: not checked)
NARROWEST_VALUES = 16

MAX_GRID_Z = 65535  # CUDA's limit on a grid's last axis (a split state pass puts batch x head x block there)

# Tile choices can be pinned here (keys of _Plan's attributes) to time alternatives; empty in normal use.
TILE_OVERRIDES: dict[str, int] = {}


@contextlib.contextmanager
def _pinned(overrides: dict[str, int], tiles: dict[str, int]) -> Iterator[None]:
    saved = dict(overrides)
    overrides.clear()
    overrides.update(tiles)
    try:
        yield
    finally:
        overrides.clear()
        overrides.update(saved)


def pinned_tiles(tiles: dict[str, int]) -> contextlib.AbstractContextManager[None]:
    """``TILE_OVERRIDES`` set to ``tiles`` for the calls (and plans) made inside, and restored after."""
    return _pinned(TILE_OVERRIDES, tiles)


def pinned_decode_tiles(tiles: dict[str, int]) -> contextlib.AbstractContextManager[None]:
    """``DECODE_TILE_OVERRIDES`` (``bk``, ``bv``, ``warps``) set to ``tiles`` inside, and restored after."""
    return _pinned(DECODE_TILE_OVERRIDES, tiles)


class _Plan:
    """Tile sizes for one call, chosen from the head dims: a state tile must fit in registers."""

    def __init__(
        self, B: int, T: int, H: int, K: int, V: int, chunk: int, sub_chunks: int | None, half: bool = True
    ) -> None:
        self.chunk = chunk
        kp, vp = _pow2(K), _pow2(V)
        # o and dv hold a [pow2(K), bv_fwd] float32 state, dq and dk a [256-wide key piece, bv_bwd] one. Measured
        # on an H100 (bf16): 64 value columns and 4 warps beat 128 columns / 8 warps by 10-15% at K = V = 128 (more
        # programs in flight per SM), and 4 warps beat 8 at K = 256 (2.4 vs 3.0 ms forward at the paper's 256 x 512).
        self.bv_fwd = min(vp, 64, max(16, 16384 // kp))
        self.bv_bwd = min(kp, 64, max(16, 16384 // min(vp, 256)))
        self.key_piece = 256  # widest key dim of one output-kernel call; wider ones run as pieces that add up
        self.warps_fwd = 4
        self.warps_bwd = 4
        # software pipelining of the output kernels' loads: at K = 256 its buffers crowd out the state tiles (one
        # stage took the paper's 256 x 512 forward + backward from 11.5 to 9.2 ms on an H100); two below that
        self.stages = 1 if kp >= 256 else 2
        # the state sweep is sequential in time: with few sequences it runs on 32-wide state tiles (4x the
        # programs), and with fewer still (under 264 programs even so) split into blocks swept at once and chained
        # after (state_split). Measured on an H100 (fwd+bwd), the split lost where 32-wide tiles give 1,024 programs
        # (B = 1, 256 x 512, T = 8192: 1.50 vs 1.37 ms; B = 8, 128 x 128, T = 8192: 1.66 vs 1.40 ms) and won where
        # they give 256 (B = 2, 128 x 128, T = 32768: 1.51 vs 1.60 ms)
        programs = B * H * triton.cdiv(K, 64) * triton.cdiv(V, 64)
        few = programs < 264
        self.state_split = -1  # decided below, from the number of blocks
        self.bk_state = min(32 if few else 64, kp)
        self.bv_state = min(32 if few else 64, vp)
        self.warps_state = 4
        self.fused_dkv = int(kp * vp <= 16384)  # the whole [K, V] state of the dk/dv kernel fits in registers
        # compute each chunk's scores once (a [C, C] matrix per chunk) rather than once per value block, where
        # there are many value blocks; the backward then reuses one matrix for two gradients when T % C == 0
        self.shared_scores = int(triton.cdiv(V, self.bv_fwd) >= 4)
        self.warps_dkv = 8
        # one block per sequence: each output kernel's program carries its state across the whole sequence, so no
        # block states are stored and neither pass sweeps the state on its own (the forward's and the backward's
        # state passes, which read k and v, q and do once per state tile). Chosen where the narrowest of those
        # grids still has SINGLE_BLOCK_PROGRAMS programs (-1: by that rule; 0: off; 1: on)
        self.single_block = -1
        self.nc = 0
        # the block states h (one [K, V] state per block of nc chunks) kept for the backward pass, or swept again
        # there from k and v: the paper's 256 x 512 heads at 8k tokens keep 33.5 MB of them per layer and sequence
        self.recompute = 0
        # the output passes on the Gluon kernel for Hopper (retention_hopper: TMA-fed stages, two warp groups per 64
        # value columns) where it takes the call, with this many stages (0: off) and key pieces of at most key_piece;
        # off until timed on an H100 against these kernels
        self.hopper = 0
        for name, value in TILE_OVERRIDES.items():
            setattr(self, name, value)
        if sub_chunks is not None:
            self.nc = sub_chunks
        if self.nc <= 0:
            per_block = B * H * triton.cdiv(V, self.bv_fwd)
            if self.single_block < 0:
                self.single_block = int(self.narrowest_grid(B, H, K, V) >= SINGLE_BLOCK_PROGRAMS)
            if self.bv_fwd < 64 or self.bv_bwd < min(64, kp):
                # one chunk per block on value tiles narrower than 64: on an H100 (bf16, K = 256, T = 2048), blocks
                # of several chunks on 16-wide tiles gave outputs 50-70% off (a narrow call: RetNet's score
                # normaliser at batch 16 and 32), and one block per sequence on 16- or 32-wide tiles made illegal
                # memory accesses; one chunk per block was exact (session 12). The backward's dq and dk did the
                # same on pinned 16- and 32-wide tiles under a 512-wide key piece (session 13); by default their
                # tiles are 64 wide, or the whole key dim where it is narrower
                self.nc = 1
            elif self.single_block:
                self.nc = triton.cdiv(T, self.chunk)
                if kp * vp == 16384 and half:
                    # the fused dk/dv kernel at its register limit (K = V = 128) sweeping whole sequences: one
                    # program per sequence and head is too few. Split dk and dv (twice the programs, each still one
                    # block per sequence) with four load stages, which fit only without the fused kernel. On an H100
                    # (bf16, fwd + bwd, session 16): B 32 x T 2048, 8 heads: 1.040 -> 0.787 ms (split alone 0.917,
                    # four stages alone out of shared memory); stored-state plans and 64 x 64 did not gain. Half
                    # precision only: float32 tiles take twice the shared memory a stage, and were not measured
                    if "fused_dkv" not in TILE_OVERRIDES:
                        self.fused_dkv = 0
                    if "stages" not in TILE_OVERRIDES and not self.fused_dkv:
                        self.stages = 4
            else:  # as many sub-chunks per stored state as keep >= ~4 waves of programs on a 132-SM GPU, at most 8
                self.nc = 8
                while self.nc > 1 and triton.cdiv(T, self.chunk * self.nc) * per_block < 4 * 132:
                    self.nc //= 2
        self.nb = triton.cdiv(T, self.chunk * self.nc)
        self.single_block = int(self.nb == 1)  # what the call does, whichever way nc was set
        if self.state_split < 0:
            self.state_split = int(4 * programs < 264 and self.nb > 1 and B * H * self.nb <= MAX_GRID_Z)
            if self.state_split and "bk_state" not in TILE_OVERRIDES and "bv_state" not in TILE_OVERRIDES:
                self.bk_state, self.bv_state = min(64, kp), min(64, vp)  # the blocks give the programs

    def narrowest_grid(self, B: int, H: int, K: int, V: int) -> int:
        """Programs in the smallest output-kernel launch of a call run as one block per sequence."""
        if self.fused_dkv:
            return B * H  # the dk/dv kernel: one program per sequence and head
        # o and dv: value blocks of bv_fwd columns; dq and dk (each 256-wide key piece a launch): bv_bwd over K
        return B * H * min(triton.cdiv(V, self.bv_fwd), triton.cdiv(K, self.bv_bwd))

    def summary(self) -> str:
        """The choices that move a call's time, in words (the benchmark's note on each of its rows)."""
        chunks = f"{self.nc} chunk" + "s" * (self.nc > 1)
        blocks = "one block per sequence" if self.nb == 1 else f"{self.nb} blocks of {chunks}"
        parts = [
            blocks,
            f"dk/dv {'fused' if self.fused_dkv else 'split'}",
            f"{self.stages} stage{'s' if self.stages != 1 else ''}",
            f"value tiles {self.bv_fwd}/{self.bv_bwd}",
        ]
        if self.chunk != CHUNK:
            parts.append(f"{self.chunk}-token chunks")
        if self.shared_scores:
            parts.append("shared scores")
        if self.recompute:
            parts.append("states recomputed")
        if self.hopper:
            stages = f"{self.hopper} stage" + "s" * (self.hopper > 1)
            parts.append(f"Hopper output kernel ({stages}, pieces of {self.key_piece})")
        return ", ".join(parts)

    FIELDS = (
        "chunk", "bv_fwd", "bv_bwd", "warps_fwd", "warps_bwd", "stages", "bk_state", "bv_state", "warps_state",
        "fused_dkv", "warps_dkv", "shared_scores", "state_split", "single_block", "nc", "nb", "recompute", "key_piece",
        "hopper",
    )  # fmt: skip

    def as_list(self) -> list[int]:
        """The choices as the operators carry them: made once, at the forward call, so the backward pass uses the
        same tiles even if ``TILE_OVERRIDES`` changed in between."""
        return [int(getattr(self, name)) for name in self.FIELDS]

    @classmethod
    def from_list(cls, values: list[int]) -> _Plan:
        plan = cls.__new__(cls)
        for name, value in zip(cls.FIELDS, values, strict=True):
            setattr(plan, name, value)
        return plan


def _state_pass(
    key: torch.Tensor,
    value: torch.Tensor,
    log_gamma: torch.Tensor,
    plan: _Plan,
    *,
    g0: torch.Tensor | None,
    g0_decay: bool,
    kv_scale: float,
    reverse: bool,
    store_h: bool,
    final_shift: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    B, T, H, K = key.shape
    V = value.shape[-1]
    h = key.new_empty(B, plan.nb, H, K, V) if store_h else None
    final = key.new_empty(B, H, K, V, dtype=torch.float32) if final_shift is not None else None
    grid = (triton.cdiv(K, plan.bk_state), triton.cdiv(V, plan.bv_state), B * H)
    split = bool(plan.state_split) and store_h and plan.nb > 1 and B * H * plan.nb <= MAX_GRID_Z
    tail = torch.empty_like(final) if split and final is not None else final  # the last block's own part
    _state_pass_kernel[grid[:2] + (B * H * plan.nb,) if split else grid](
        key,
        value,
        None if split else g0,
        h,
        tail,
        log_gamma,
        kv_scale,
        *key.stride()[:3],
        *value.stride()[:3],
        T,
        plan.nb,
        plan.nc,
        triton.cdiv(T, plan.chunk),
        H,
        K,
        V,
        BK=plan.bk_state,
        BV=plan.bv_state,
        C=plan.chunk,
        REVERSE=reverse,
        HAS_G0=g0 is not None and not split,
        G0_DECAY=g0_decay,
        STORE_H=store_h and not split,
        STORE_FINAL=final is not None,
        FINAL_SHIFT=final_shift or 0,
        SPLIT=split,
        PRECISION=_precision(key.dtype),
        num_warps=plan.warps_state,
        num_stages=3,
    )
    if split:
        _state_combine_kernel[grid](
            g0,
            h,
            tail,
            final,
            log_gamma,
            T,
            plan.nb,
            plan.chunk * plan.nc,
            H,
            K,
            V,
            BK=plan.bk_state,
            BV=plan.bv_state,
            HAS_G0=g0 is not None,
            G0_DECAY=g0_decay,
            STORE_FINAL=final is not None,
            FINAL_SHIFT=final_shift or 0,
            num_warps=plan.warps_state,
        )
    return h, final


# Where the output kernel's intra-chunk scores come from (its SCORES argument)
COMPUTE, LOAD, FLIPPED, NONE = 0, 1, 2, 3


class Scores:
    """Chunk scores made once by ``_chunk_scores`` and how an output kernel call reads them (LOAD or FLIPPED)."""

    def __init__(self, a: torch.Tensor, mode: int) -> None:
        self.a, self.mode = a, mode


def _chunk_scores(
    query: torch.Tensor, key: torch.Tensor, log_gamma: torch.Tensor, scale: float, chunk: int, reverse: bool
) -> torch.Tensor:
    """``[B, H, n_chunks, C, C]`` masked decayed scores of each chunk, in forward or reversed time."""
    B, T, H, K = query.shape
    assert _same_layout(query, key) and query.stride(-1) == 1
    n_chunks = triton.cdiv(T, chunk)
    a = query.new_empty(B, H, n_chunks, chunk, chunk)
    _chunk_scores_kernel[(n_chunks, B * H)](
        query,
        key,
        a,
        log_gamma,
        scale,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        T,
        n_chunks,
        H,
        K,
        BK=min(64, _pow2(K)),
        C=chunk,
        REVERSE=reverse,
        PRECISION=_precision(query.dtype),
        num_warps=4,
        num_stages=2,
    )
    return a


def _chunk_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    h: torch.Tensor | None,
    h_layout: tuple[int, int, int],
    log_gamma: torch.Tensor,
    plan: _Plan,
    *,
    bv: int,
    warps: int,
    scale: float,
    state_scale: float,
    kv_scale: float,
    reverse: bool,
    out: torch.Tensor | None = None,
    scores: Scores | None = None,
    skip_scores: bool = False,
) -> torch.Tensor:
    """Launch the output kernel; ``h_layout`` = (element offset, key stride, value stride) of the state in ``h``.

    ``query``/``key`` may be views with a common layout (slices of a wider tensor); with ``out`` the result is
    added into it. ``scores``: read the intra-chunk scores instead of computing them; ``skip_scores``: leave the
    intra-chunk term out (another call adds it).
    """
    B, T, H, K = query.shape
    V = value.shape[-1]
    assert _same_layout(query, key) and query.stride(-1) == 1 and value.stride(-1) == 1
    accumulate = out is not None
    if out is None:
        out = torch.empty_like(value)  # value's layout: value is dense (see _usable)
    assert _same_layout(out, value)
    offset, stride_hk, stride_hv = h_layout
    mode = NONE if skip_scores else (scores.mode if scores is not None else COMPUTE)
    grid = (triton.cdiv(V, bv), plan.nb, B * H)
    _chunk_output_kernel[grid](
        query,
        key,
        value,
        h.view(-1)[offset:] if h is not None else None,
        scores.a if scores is not None else None,
        out,
        log_gamma,
        scale,
        state_scale,
        kv_scale,
        stride_hk,
        stride_hv,
        h[0, 0, 0].numel() if h is not None else 0,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        T,
        plan.nb,
        plan.nc,
        triton.cdiv(T, plan.chunk),
        H,
        K,
        V,
        BKP=_pow2(K),
        BV=bv,
        C=plan.chunk,
        REVERSE=reverse,
        HAS_STATE=h is not None,
        ACCUMULATE=accumulate,
        SCORES=mode,
        PRECISION=_precision(query.dtype),
        num_warps=warps,
        num_stages=plan.stages,
    )
    return out


def _chunk_output_pieces(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    h: torch.Tensor | None,
    transposed: bool,
    log_gamma: torch.Tensor,
    plan: _Plan,
    **kw,
) -> torch.Tensor:
    """The output kernel with the key dim cut into ``plan.key_piece``-wide pieces, each adding into the output.

    The result is linear in the key-dim pieces of (query . key) and of query G, so summing per-piece outputs is
    exact up to rounding. ``transposed``: the state is stored [value, key] (the backward's dq and dk use the
    [K, V] states with V as their key dim), so a piece is an offset along the contiguous axis.
    """
    hopper = _hopper_pass(query, key, value, h, transposed, log_gamma, plan, **kw)
    if hopper is not None:
        return hopper
    width = query.shape[-1]
    state_v = h.shape[-1] if h is not None else 0
    shared = kw.get("scores") is not None
    out = None
    for lo in range(0, width, plan.key_piece):
        hi = min(lo + plan.key_piece, width)
        layout = (lo, 1, state_v) if transposed else (lo * state_v, state_v, 1)
        skip = shared and lo > 0  # shared scores cover the whole key dim: the first piece adds them
        piece = (query[..., lo:hi], key[..., lo:hi], value, h, layout, log_gamma, plan)
        out = _chunk_output(*piece, out=out, skip_scores=skip, **kw)
    return out


def _hopper_pass(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    h: torch.Tensor | None,
    transposed: bool,
    log_gamma: torch.Tensor,
    plan: _Plan,
    *,
    scores: Scores | None = None,
    state_scale: float,
    kv_scale: float,
    reverse: bool,
    **_tiles,
) -> torch.Tensor | None:
    """The pass on ``retention_hopper``'s kernel where the plan asks for it and the call is in its scope, else None.

    Its scope: the chunk scores stored in forward time (read as stored, or mirrored by a reversed pass), the layouts
    and widths ``retention_hopper.supported`` takes, and block states (if any) as this module stores them."""
    if not plan.hopper or scores is None or scores.mode != (FLIPPED if reverse else LOAD):
        return None
    from arch_zoo.kernels import retention_hopper  # Gluon is imported only where it is used

    if not retention_hopper.supported(query, value, plan.chunk, plan.key_piece):
        return None
    states = None if h is None else retention_hopper.States(h, transposed, plan.nc)
    roles = dict(state_scale=state_scale, kv_scale=kv_scale, reverse=reverse, states=states)
    return retention_hopper.output_pass(
        query, key, value, scores.a, log_gamma, **roles, stages=plan.hopper, widest=plan.key_piece
    )


def _chunk_dkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    dh: torch.Tensor | None,
    log_gamma: torch.Tensor,
    plan: _Plan,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    assert _same_layout(q, k) and _same_layout(v, do)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _chunk_dkv_kernel[(plan.nb, B * H)](
        q,
        k,
        v,
        do,
        dh,
        dk,
        dv,
        log_gamma,
        scale,
        *q.stride()[:3],
        *v.stride()[:3],
        T,
        plan.nb,
        plan.nc,
        H,
        K,
        V,
        BKP=_pow2(K),
        BVP=_pow2(V),
        C=plan.chunk,
        HAS_STATE=dh is not None,
        PRECISION=_precision(q.dtype),
        num_warps=plan.warps_dkv,
        num_stages=plan.stages,
    )
    return dk, dv


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether one set of strides indexes both (strides of size-1 dims never matter: the index there is 0)."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _usable(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when the kernels can read it through its strides, else a contiguous copy.

    The kernels index every tensor through its own strides, so a ``[B, T, H, D]`` view of a ``[B, H, T, D]``
    tensor (the layout a compiled graph hands over) is read in place: copying it would cost as much as a pass of
    the kernels. Those two layouts are taken (outputs are allocated like the input, so it must be dense); any
    other is copied. (``is_contiguous`` rather than a sort of the strides: a compiler traces it with symbolic
    shapes.)"""
    return x if x.is_contiguous() or x.transpose(1, 2).is_contiguous() else x.contiguous()


def _like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` in ``like``'s layout (a copy only when they differ): pairs of tensors share one set of strides."""
    return x if _same_layout(x, like) else torch.empty_like(like).copy_(x)


def _needs_block_states(plan: _Plan, has_s0: bool) -> bool:
    return plan.nb > 1 or has_s0


# The chunkwise core as two registered operators (forward, backward) with shape functions and an autograd rule:
# a compiled model traces through them as opaque calls in one graph, where a graph break per layer left the GPU
# waiting between the pieces (docs/results/cost.md). Optional results come back as empty tensors.


def _nothing(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def _forward_states(
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    plan: _Plan,
    initial_state: torch.Tensor | None,
    store_h: bool,
    output_final_state: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The forward sweep: block states ``h`` and/or the final state (redone by the backward under ``recompute``)."""
    return _state_pass(
        k,
        v,
        log_gamma,
        plan,
        g0=initial_state,
        g0_decay=True,
        kv_scale=1.0,
        reverse=False,
        store_h=store_h,
        final_shift=1 if output_final_state else None,
    )


@torch.library.custom_op("arch_zoo::retention_chunkwise", mutates_args=())
@on_inputs_device
def _retention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    tiles: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, final state, block states h, chunk scores a)``: the last two are what the backward pass reads; a result
    that is not made comes back empty (an operator returns tensors only)."""
    plan = _Plan.from_list(tiles)
    h, final = None, None
    store_h = _needs_block_states(plan, initial_state is not None)
    if store_h or output_final_state:
        h, final = _forward_states(k, v, log_gamma, plan, initial_state, store_h, output_final_state)
    a = _chunk_scores(q, k, log_gamma, scale, plan.chunk, reverse=False) if plan.shared_scores else None
    fwd = dict(bv=plan.bv_fwd, warps=plan.warps_fwd, scores=Scores(a, LOAD) if a is not None else None)
    o = _chunk_output_pieces(
        q, k, v, h, False, log_gamma, plan, **fwd, scale=scale, state_scale=scale, kv_scale=1.0, reverse=False
    )
    return o, _nothing(v) if final is None else final, _nothing(k) if h is None else h, _nothing(q) if a is None else a


@_retention_op.register_fake
def _(q, k, v, log_gamma, scale, initial_state, output_final_state, tiles):
    plan = _Plan.from_list(tiles)
    B, T, H, K = q.shape
    V = v.shape[-1]
    final = v.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else _nothing(v)
    h = k.new_empty(B, plan.nb, H, K, V) if _needs_block_states(plan, initial_state is not None) else _nothing(k)
    a = q.new_empty(B, H, triton.cdiv(T, plan.chunk), plan.chunk, plan.chunk) if plan.shared_scores else _nothing(q)
    return torch.empty_like(v), final, h, a


@torch.library.custom_op("arch_zoo::retention_chunkwise_backward", mutates_args=())
@on_inputs_device
def _retention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    h: torch.Tensor | None,
    a: torch.Tensor | None,
    do: torch.Tensor,
    d_final: torch.Tensor | None,
    scale: float,
    want_ds0: bool,
    tiles: list[int],
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, d initial state)``; ``do`` in v's layout. ``h`` is None when the plan recomputes it (from k, v
    and ``initial_state``, the forward's own sweep)."""
    plan = _Plan.from_list(tiles)
    if h is None and _needs_block_states(plan, initial_state is not None):
        h, _ = _forward_states(k, v, log_gamma, plan, initial_state, True, False)
    need_dh = _needs_block_states(plan, d_final is not None)  # the same rule: the reversed sweep's initial state
    dh, ds0 = None, None
    if need_dh or want_ds0:
        dh, ds0 = _state_pass(
            q,
            do,
            log_gamma,
            plan,
            g0=d_final,
            g0_decay=False,
            kv_scale=scale,
            reverse=True,
            store_h=need_dh,
            final_shift=0 if want_ds0 else None,
        )
    fwd = dict(log_gamma=log_gamma, plan=plan, scale=scale, bv=plan.bv_fwd, warps=plan.warps_fwd)
    bwd = dict(log_gamma=log_gamma, plan=plan, scale=scale, bv=plan.bv_bwd, warps=plan.warps_bwd)
    dq_scores = dk_scores = dv_scores = None
    if a is not None:
        # dq reads (do . v^T), dk the same matrix in reversed time, dv the forward's (q . k^T) in reversed time
        da = _chunk_scores(do, v, log_gamma, scale, plan.chunk, reverse=False)
        dq_scores = Scores(da, LOAD)
        if not plan.fused_dkv:
            if q.shape[1] % plan.chunk == 0:
                dk_scores, dv_scores = Scores(da, FLIPPED), Scores(a, FLIPPED)
            else:  # reversed chunks straddle the forward ones: score them in reversed time
                dk_scores = Scores(_chunk_scores(v, do, log_gamma, scale, plan.chunk, reverse=True), LOAD)
                dv_scores = Scores(_chunk_scores(k, q, log_gamma, scale, plan.chunk, reverse=True), LOAD)
    dq = _chunk_output_pieces(
        do, v, k, h, True, state_scale=scale, kv_scale=1.0, reverse=False, scores=dq_scores, **bwd
    )
    if plan.fused_dkv:
        dk, dv = _chunk_dkv(q, k, v, do, dh, log_gamma, plan, scale)
    else:
        dv = _chunk_output_pieces(
            k, q, do, dh, False, state_scale=1.0, kv_scale=scale, reverse=True, scores=dv_scores, **fwd
        )
        dk = _chunk_output_pieces(
            v, do, q, dh, True, state_scale=1.0, kv_scale=scale, reverse=True, scores=dk_scores, **bwd
        )
    return dq, dk, dv, _nothing(v) if ds0 is None else ds0


@_retention_backward_op.register_fake
def _(q, k, v, log_gamma, h, a, do, d_final, scale, want_ds0, tiles, initial_state):
    plan = _Plan.from_list(tiles)
    B, T, H, K = q.shape
    ds0 = v.new_empty(B, H, K, v.shape[-1], dtype=torch.float32) if want_ds0 else _nothing(v)
    # the layouts the launchers allocate: each output is made like the tensor in its "value" role
    if plan.fused_dkv:
        return torch.empty_like(k), torch.empty_like(k), torch.empty_like(v), ds0
    return torch.empty_like(k), torch.empty_like(q), torch.empty_like(do), ds0


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_gamma, scale, initial_state, output_final_state, tiles = inputs
    _, _, h, a = output
    plan = _Plan.from_list(tiles)
    keep_h = _needs_block_states(plan, initial_state is not None) and not plan.recompute
    s0 = initial_state if plan.recompute else None  # what the backward's sweep starts from
    ctx.save_for_backward(q, k, v, log_gamma, h if keep_h else None, a if plan.shared_scores else None, s0)
    ctx.args = (scale, tiles)
    ctx.s0_dtype = initial_state.dtype if initial_state is not None else None
    ctx.set_materialize_grads(False)  # an unused final state must cost no backward sweep


def _backward(ctx, do, d_final, _dh, _da):
    q, k, v, log_gamma, h, a, s0 = ctx.saved_tensors
    scale, tiles = ctx.args
    do = torch.zeros_like(v) if do is None else _like(_usable(do), v)  # None: only the final state was used
    want_ds0 = ctx.s0_dtype is not None and ctx.needs_input_grad[5]
    d_final = d_final.contiguous() if d_final is not None else None
    dq, dk, dv, ds0 = _retention_backward_op(q, k, v, log_gamma, h, a, do, d_final, scale, want_ds0, tiles, s0)
    ds0 = ds0.to(ctx.s0_dtype) if want_ds0 else None
    return dq, dk, dv, None, None, ds0, None, None


_retention_op.register_autograd(_backward, setup_context=_setup_context)


def supported(dtype: torch.dtype, K: int, V: int, on_gpu: bool = True) -> bool:
    """Whether the kernels take these head dims: on a GPU, float32 tiles are twice as large, so they stop at 128.

    (Triton's interpreter, which runs on CPU tensors, has no shared-memory limit.)
    """
    if dtype == torch.float32:
        return (K <= 128 and V <= 128) or (not on_gpu and K <= 256 and V <= 512)
    return dtype in (torch.float16, torch.bfloat16) and K <= 256 and V <= 512


def retention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK,
    sub_chunks: int | None = None,
    recompute_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Retention core through the Triton kernels: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, log_gamma ``[H]``.

    ``scale`` defaults to ``K ** -0.5``. The final state is float32 ``[B, H, K, V]`` and carries no gradient; the
    initial state gets one. ``log_gamma`` is a constant (RetNet's decays are fixed): asking for its gradient is an
    error rather than a silent zero. ``chunk_size`` / ``sub_chunks`` are exposed for the tests (a small chunk
    exercises the block logic on short inputs); leave them at their defaults otherwise. ``recompute_states`` keeps
    no block states for the backward pass, which sweeps k and v again for them: less memory in training, one more
    state pass per layer.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"retention: q, k [B, T, H, K] and v [B, T, H, V] expected; got {q.shape}, {k.shape}, {v.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"retention: q, k, v must share one of float32/float16/bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    B, T, H, K = q.shape
    V = v.shape[-1]
    if not supported(q.dtype, K, V, q.is_cuda) or T == 0:
        raise ValueError(
            f"retention: the Triton kernels take T >= 1 and K <= 256, V <= 512 in bf16/fp16 (K, V <= 128 in float32); "
            f"got {q.dtype}, K={K}, V={V}, T={T}"
        )
    if log_gamma.requires_grad and torch.is_grad_enabled():
        raise ValueError("retention: log_gamma is treated as a constant by the Triton kernels; detach it")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"retention: initial_state must be {(B, H, K, V)}; got {tuple(initial_state.shape)}")
    scale = K**-0.5 if scale is None else float(scale)
    if V < NARROWEST_VALUES:  # as one tile of the narrowest width: narrower values made illegal memory accesses
        pad = NARROWEST_VALUES - V
        s0 = None if initial_state is None else F.pad(initial_state, (0, pad))
        o, final = retention_triton(
            q, k, F.pad(v, (0, pad)), log_gamma, scale, s0, output_final_state, chunk_size, sub_chunks, recompute_states
        )
        return o[..., :V], None if final is None else final[..., :V]
    lg = log_gamma.detach().to(device=q.device, dtype=torch.float32).contiguous()
    q = _usable(q)
    s0 = initial_state.contiguous() if initial_state is not None else None
    plan = _Plan(B, T, H, K, V, chunk_size, sub_chunks, half=q.dtype != torch.float32)
    plan.recompute = int(recompute_states or plan.recompute)
    tiles = plan.as_list()
    o, final, _, _ = _retention_op(q, _like(_usable(k), q), _usable(v), lg, scale, s0, output_final_state, tiles)
    return o, final if output_final_state else None


# Decode tile choices can be pinned here ("bv", "bk", "warps"; pinned_decode_tiles) to time alternatives; empty in
# normal use.
DECODE_TILE_OVERRIDES: dict[str, int] = {}


def _decode_tiles(B: int, H: int, K: int, V: int) -> tuple[int, int, int]:
    """(BK, BV, warps): 64 x 64 tiles of the state (256-byte rows), the value tile narrowed while there are too few
    programs to keep every SM busy (about two per SM), the key piece keeping a tile at 4096 elements. Measured on
    an H100 (K x V = 256 x 512, float32 state, in a CUDA graph): 64 x 64 moves 2.85 TB/s at batch 128, against
    2.79 for 32 x 128 and 2.20 for the former [K, 16] tiles; at batch 1, [256, 16] is the fastest (10.2 us)."""
    bv = min(_pow2(V), 64)
    while bv > 16 and B * H * triton.cdiv(V, bv) < 2 * 132:
        bv //= 2
    bk = min(_pow2(K), max(16, 4096 // bv))
    tiles = {"bk": bk, "bv": bv, "warps": 4, **DECODE_TILE_OVERRIDES}
    return tiles["bk"], tiles["bv"], tiles["warps"]


def retention_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float | None = None,
    key_sum: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decoding step for all heads in one launch: ``state`` ``[B, H, K, V]`` is updated in place.

    q, k ``[B, H, K]`` and v ``[B, H, V]`` (contiguous), or the same with a length-1 time axis ``[B, 1, H, *]``,
    which the output then keeps. With ``key_sum`` (``[B, H, K]``, contiguous) the decayed key sum is stepped too,
    in place, and ``(o, scale * q . key_sum)`` is returned, the second ``[B, H]`` float32. A step is a few
    microseconds of state traffic, so the launch is what costs: capture the model's step in a CUDA graph.
    """
    squeeze = q.dim() == 4
    if squeeze:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    B, H, K = q.shape
    V = v.shape[-1]
    if state.shape != (B, H, K, V) or not state.is_contiguous():
        raise ValueError(f"retention_step: state must be a contiguous {(B, H, K, V)} tensor; got {tuple(state.shape)}")
    if key_sum is not None and (key_sum.shape != (B, H, K) or not key_sum.is_contiguous()):
        raise ValueError(f"retention_step: key_sum must be a contiguous {(B, H, K)} tensor; got {tuple(key_sum.shape)}")
    scale = K**-0.5 if scale is None else float(scale)
    lg = log_gamma if log_gamma.dtype == torch.float32 and log_gamma.is_contiguous() else log_gamma.float().contiguous()
    o, zq = _step_op(q, k, v, state, lg, scale, key_sum)
    o = o[:, None] if squeeze else o
    return o if key_sum is None else (o, zq)


# The step as a registered operator that declares what it updates in place: a compiled decoding step keeps it in
# its graph (the model's whole step is one graph, fused around it, and one CUDA graph replays it). Called as a
# plain Triton launch instead, it was a graph break per layer (a compiled 24-layer step: 25 graphs).
@torch.library.custom_op("arch_zoo::retention_step", mutates_args=("state", "key_sum"))
@on_inputs_device
def _step_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    key_sum: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, H, V], scale * q . key_sum [B, H] float32)``; the second is empty without ``key_sum``."""
    B, H, K = q.shape
    V = v.shape[-1]
    o = v.new_empty(B, H, V)
    zq = torch.empty(B, H, device=q.device, dtype=torch.float32) if key_sum is not None else None
    bk, bv, warps = _decode_tiles(B, H, K, V)
    _decode_step_kernel[(triton.cdiv(V, bv), B * H)](
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        state,
        o,
        key_sum,
        zq,
        log_gamma,
        scale,
        H,
        K,
        V,
        BK=bk,
        BV=bv,
        HAS_Z=key_sum is not None,
        num_warps=warps,
    )
    return o, q.new_empty(0, dtype=torch.float32) if zq is None else zq


@_step_op.register_fake
def _(q, k, v, state, log_gamma, scale, key_sum):
    B, H, _ = q.shape
    zq = q.new_empty(B, H, dtype=torch.float32) if key_sum is not None else q.new_empty(0, dtype=torch.float32)
    return v.new_empty(B, H, v.shape[-1]), zq


__all__ = ["retention_triton", "retention_step_triton", "supported", "CHUNK"]
