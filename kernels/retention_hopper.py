"""Hopper (sm_90) kernels for the retention core's output passes, written in Gluon (Triton's explicit-layout dialect).

Why a second kernel: at the paper's 256 x 512 heads, ``retention_triton._chunk_output_kernel`` is latency bound
(docs/results/kernels.md, sessions 18 and 21). Each of its programs holds a ``[256, 64]`` float32 state plus q and k
staged through registers (255 registers a thread), so two programs share an SM, and each waits for every product as
soon as it is issued. Triton 3.6 gave no way past that (tiles, seven rewrites, TMA loads, warp specialisation).
Gluon states the schedule outright:

* TMA copies load each chunk's q, k, v and scores into a ring of shared-memory stages while the tensor cores work
  on the chunk before (no registers spent on staging);
* 8 warps as two warp groups split 64 value columns, so q and k are read once for both, and the ``[256, 64]`` state
  costs 64 registers a thread;
* the chunk's three products (state read, intra-chunk scores, state update) are issued together and waited for
  once, and the chunk before's output is stored (and, for a second key piece, the first one's read back) while they
  run.

One kernel runs all four output passes of a layer, with the roles retention_triton's output kernel gives them
(query, key, value, scores): ``o`` (q, k, v, the forward's scores), ``dq`` (do, v, k, the backward's ``do . v^T``),
and in reversed time ``dv`` (k, q, do, the forward's scores transposed) and ``dk`` (v, do, q, the backward's
transposed). Per chunk ``c`` of ``C`` tokens, with the state ``G`` in registers:

    out_c = rowdecay * (Q_c G) + S_c V_c            G <- gamma^C G + K_c^T (keydecay * V_c)

forward (chunks in order): ``S`` = the chunk's scores, ``rowdecay_i = state_scale gamma^i``,
``keydecay_i = kv_scale gamma^(C-i)``; reversed (chunks from the last, rows in their own order): ``S`` = the
scores transposed, ``rowdecay_i = state_scale gamma^(C-1-i)``, ``keydecay_i = kv_scale gamma^(i+1)``. Either way
``G`` is retention_triton's state (the "G convention"), so a block can start from the states its state passes
store. ``output_pass_reference`` is the same loop in PyTorch, the CPU tests' check of these roles and decays.

Scope: T a multiple of the 64-token chunk, bf16/fp16, query/key pieces of 64, 128 or 256 columns, value widths a
multiple of 64; one block per sequence from zero, or blocks of chunks each from its stored state (``States``). Off by
default (the ``hopper`` tile of ``retention_triton._Plan``) until measured on an H100 against the Triton kernel it
replaces.
"""

from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; its TMA names changed in 3.7
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    AVAILABLE = True
except ImportError:  # pragma: no cover - an older Triton, or none
    AVAILABLE = False

CHUNK = 64  # tokens per chunk, as retention_triton.CHUNK
VALUE_BLOCK = 64  # value columns per program: two warp groups of 32
WARPS = 8
STAGES = 2  # chunks in flight: 2 x 80 KB of q, k, v and scores at 256-wide pieces, within the SM's 227 KB
PIECES = (256, 128, 64)  # query/key widths a launch takes; a wider query runs as pieces that add up

if AVAILABLE:
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.jit
    def _load_chunk(q_desc, k_desc, v_desc, a_desc, q_b, k_b, v_b, a_b, bar, s, row, col_q, col_v, a_row,
                    SCORES: gl.constexpr):  # fmt: skip
        """Start the TMA copies of one chunk's tiles into stage ``s``; ``bar`` counts their bytes in."""
        tiles: gl.constexpr = q_desc.block_type.nbytes + k_desc.block_type.nbytes + v_desc.block_type.nbytes
        nbytes: gl.constexpr = tiles + (a_desc.block_type.nbytes if SCORES else 0)
        mbarrier.expect(bar, nbytes)
        _tma_load(q_desc, [row, col_q], bar, q_b.index(s))
        _tma_load(k_desc, [row, col_q], bar, k_b.index(s))
        _tma_load(v_desc, [row, col_v], bar, v_b.index(s))
        if SCORES:
            _tma_load(a_desc, [a_row, 0], bar, a_b.index(s))

    @gluon.jit
    def _chunk(p, n_chunks, REVERSE: gl.constexpr):
        """The chunk processed ``p``-th: counted from the last in a reversed pass."""
        if REVERSE:
            return n_chunks - 1 - p
        return p

    @gluon.jit
    def _epilogue(o, o_s, p_s, o_desc, bar, step, row, col, n_steps, REVERSE: gl.constexpr,
                  ACCUMULATE: gl.constexpr, layout: gl.constexpr):  # fmt: skip
        """Store the output of the block's chunk ``step`` (of ``n_steps``; plus what an earlier call wrote there, read
        back into ``p_s``), and start reading back the next chunk's."""
        if ACCUMULATE:
            mbarrier.wait(bar, step & 1)
            o += p_s.load(layout).to(gl.float32)
            if step + 1 < n_steps:
                rn = row - o_desc.block_type.shape[0] if REVERSE else row + o_desc.block_type.shape[0]
                mbarrier.expect(bar, o_desc.block_type.nbytes)
                _tma_load(o_desc, [rn, col], bar, p_s)
        tma.store_wait(pendings=0)  # the chunk before's output has left o_s
        o_s.store(o.to(o_desc.dtype))
        fence_async_shared()
        _tma_store(o_desc, [row, col], o_s)

    @gluon.jit
    def _output_kernel(
        q_desc, k_desc, v_desc, a_desc, o_desc, log_gamma_ptr, h_ptr, state_scale, kv_scale, n_chunks,
        q_rb, q_rh, q_ch, q_lo, v_rb, v_rh, v_ch, h_block, h_key, h_value, NC,
        H: gl.constexpr, BK: gl.constexpr, BV: gl.constexpr, C: gl.constexpr, NS: gl.constexpr,
        REVERSE: gl.constexpr, SCORES: gl.constexpr, ACCUMULATE: gl.constexpr, HAS_STATE: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        """One block of ``NC`` chunks (in processing order), head and ``BV`` value columns; see the module docstring.

        A tile's row in its 2-D descriptor is ``b * rb + h * rh + t`` and its column ``h * ch (+ q_lo)``: both
        layouts the kernels take ([B, T, H, D] and [B, H, T, D]) are one row of a 2-D tensor per token. With
        HAS_STATE the block starts from its state in ``h`` (element strides: a block, a key row, a value column;
        ``h_ptr`` already at this piece's first key row), else from zero.
        """
        i_v = gl.program_id(0)
        i_blk = gl.program_id(1)
        i_bh = gl.program_id(2)
        n_blocks = gl.num_programs(1)
        i_b = i_bh // H
        i_h = i_bh % H
        dtype: gl.constexpr = q_desc.dtype
        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, BV // (num_warps // 4), 16]
        )
        rows: gl.constexpr = gl.SliceLayout(1, mma)
        q_b = gl.allocate_shared_memory(dtype, [NS, C, BK], q_desc.layout)
        k_b = gl.allocate_shared_memory(dtype, [NS, C, BK], k_desc.layout)
        v_b = gl.allocate_shared_memory(dtype, [NS, C, BV], v_desc.layout)
        a_b = gl.allocate_shared_memory(dtype, [NS, C, C], a_desc.layout)
        g_s = gl.allocate_shared_memory(dtype, [BK, BV], gl.NVMMASharedLayout.get_default_for([BK, BV], dtype))
        vw_s = gl.allocate_shared_memory(dtype, [C, BV], v_desc.layout)
        o_s = gl.allocate_shared_memory(dtype, [C, BV], o_desc.layout)
        p_s = gl.allocate_shared_memory(dtype, [C, BV], o_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [NS + 1, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(NS + 1):  # one barrier a stage, and one for the output tile read back
            mbarrier.init(bars.index(st), count=1)

        lg = gl.load(log_gamma_ptr + i_h).to(gl.float32)
        i = gl.arange(0, C, layout=rows).to(gl.float32)
        if REVERSE:  # the state holds one more gamma than the rows it is read by need: retention_triton's G
            row_decay = gl.exp(lg * (C - 1 - i)) * state_scale
            key_decay = gl.exp(lg * (i + 1)) * kv_scale
        else:
            row_decay = gl.exp(lg * i) * state_scale
            key_decay = gl.exp(lg * (C - i)) * kv_scale
        chunk_decay = gl.exp(lg * C)

        q_row = i_b * q_rb + i_h * q_rh
        v_row = i_b * v_rb + i_h * v_rh
        col_q = i_h * q_ch + q_lo
        col_v = i_h * v_ch + i_v * BV
        a_row = i_bh * n_chunks * C
        first = i_blk * NC  # this block's first chunk, counted in processing order
        n_steps = gl.minimum(NC, n_chunks - first)
        for st in gl.static_range(NS):
            if st < n_steps:
                c0 = _chunk(first + st, n_chunks, REVERSE)
                _load_chunk(q_desc, k_desc, v_desc, a_desc, q_b, k_b, v_b, a_b, bars.index(st), st,
                            q_row + c0 * C, col_q, col_v, a_row + c0 * C, SCORES)  # fmt: skip

        if HAS_STATE:
            rk = gl.arange(0, BK, layout=rows)
            rv = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, mma))
            h_base = h_ptr + ((i_b * n_blocks + i_blk) * H + i_h).to(gl.int64) * h_block
            g = gl.load(h_base + rk[:, None] * h_key + rv[None, :] * h_value).to(gl.float32)
        else:
            g = gl.zeros([BK, BV], gl.float32, mma)
        zero = gl.zeros([C, BV], gl.float32, mma)
        o = zero
        if ACCUMULATE:  # the first chunk's earlier output, read back while the first products run
            c0 = _chunk(first, n_chunks, REVERSE)
            mbarrier.expect(bars.index(NS), o_desc.block_type.nbytes)
            _tma_load(o_desc, [v_row + c0 * C, col_v], bars.index(NS), p_s)
        for step in range(n_steps):
            c = _chunk(first + step, n_chunks, REVERSE)
            s = step % NS
            mbarrier.wait(bars.index(s), (step // NS) & 1)
            qs = q_b.index(s)
            ks = k_b.index(s)
            vs = v_b.index(s)
            # the register work first, so no product is in flight while its registers are touched
            g_s.store(g.to(dtype))
            vw_s.store((vs.load(mma).to(gl.float32) * key_decay[:, None]).to(dtype))
            g = g * chunk_decay
            fence_async_shared()
            if SCORES:
                if REVERSE:
                    o2 = warpgroup_mma(a_b.index(s).permute((1, 0)), vs, zero, use_acc=False, is_async=True)
                else:
                    o2 = warpgroup_mma(a_b.index(s), vs, zero, use_acc=False, is_async=True)
            o1 = warpgroup_mma(qs, g_s, zero, use_acc=False, is_async=True)
            g = warpgroup_mma(ks.permute((1, 0)), vw_s, g, is_async=True)
            if step > 0:  # the chunk before's output leaves while this chunk's products run
                cp = c + 1 if REVERSE else c - 1
                _epilogue(o, o_s, p_s, o_desc, bars.index(NS), step - 1, v_row + cp * C, col_v, n_steps, REVERSE,
                          ACCUMULATE, mma)  # fmt: skip
            if SCORES:
                o1, o2, g = warpgroup_mma_wait(num_outstanding=0, deps=(o1, o2, g))
                o = o1 * row_decay[:, None] + o2
            else:
                o1, g = warpgroup_mma_wait(num_outstanding=0, deps=(o1, g))
                o = o1 * row_decay[:, None]
            nxt = step + NS  # this stage is free again: start the copies of the chunk NS steps on
            if nxt < n_steps:
                cn = _chunk(first + nxt, n_chunks, REVERSE)
                _load_chunk(q_desc, k_desc, v_desc, a_desc, q_b, k_b, v_b, a_b, bars.index(s), s,
                            q_row + cn * C, col_q, col_v, a_row + cn * C, SCORES)  # fmt: skip
        cl = _chunk(first + n_steps - 1, n_chunks, REVERSE)
        _epilogue(o, o_s, p_s, o_desc, bars.index(NS), n_steps - 1, v_row + cl * C, col_v, n_steps, REVERSE,
                  ACCUMULATE, mma)  # fmt: skip
        tma.store_wait(pendings=0)
        for st in gl.static_range(NS + 1):
            mbarrier.invalidate(bars.index(st))


def token_rows(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``(rb, rh, ch)`` such that token ``t`` of sequence ``b``, head ``h`` of a ``[B, T, H, D]`` tensor is row
    ``b * rb + h * rh + t`` of a 2-D view with one token a row, starting at column ``h * ch``; None where the
    layout has no such view (TMA reads 2-D tiles of rows)."""
    B, T, H, D = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 != 1 or x.data_ptr() % 16 or (s1 * x.element_size()) % 16:
        return None
    one = B == 1  # a batch of one: its batch stride is never used (compiled graphs hand over arbitrary ones)
    if s2 == D and s1 >= H * D and (one or s0 == T * s1):  # [B, T, H, D], maybe a slice of wider rows
        return T, 0, D
    if s1 == D and s2 == T * D and (one or s0 == H * T * D):  # [B, H, T, D] seen as [B, T, H, D]
        return H * T, T, 0
    return None


def _descriptor(x: torch.Tensor, rows: tuple[int, int, int], block: list[int]) -> TensorDescriptor:
    """A TMA descriptor of ``x`` as its 2-D view with a token a row (``token_rows``)."""
    B, T, H, D = x.shape
    _, rh, _ = rows
    shape = [B * T, H * D] if rh == 0 else [B * H * T, D]
    return TensorDescriptor(x, shape, [x.stride(1), 1], block, _tile_layout(block, x.dtype))


def _tile_layout(block: list[int], dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The shared-memory layout a TMA copy of a ``block`` tile lands in, as the tensor cores read it."""
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def piece_width(width: int, widest: int = PIECES[0]) -> int | None:
    """The query/key piece a call of this width runs in, at most ``widest`` (None: not taken). Narrower pieces take
    less shared memory and fewer registers (two programs an SM at 128 with one stage), for more launches."""
    return next((p for p in PIECES if p <= widest and width % p == 0), None)


def supported(query: torch.Tensor, value: torch.Tensor, chunk: int, widest: int = PIECES[0]) -> bool:
    """Whether these tensors can take the Hopper path: the scope in the module docstring, on an sm_90 device."""
    if not (AVAILABLE and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)):
        return False
    if torch.cuda.get_device_capability(query.device) != (9, 0):
        return False
    T = query.shape[1]
    width = piece_width(query.shape[-1], widest)
    if chunk != CHUNK or T % CHUNK or width is None or value.shape[-1] % VALUE_BLOCK:
        return False
    return token_rows(query) is not None and token_rows(value) is not None


class States:
    """The block states a pass starts its blocks from: ``h`` ``[B, n_blocks, H, K, V]`` as retention_triton's state
    passes store them (in the G convention), read as ``[K, V]`` (the query's key rows) or, ``transposed``, as
    ``[V, K]``; and how many chunks a block holds."""

    def __init__(self, h: torch.Tensor, transposed: bool, chunks_per_block: int) -> None:
        if not h.is_contiguous():
            raise ValueError("retention_hopper: block states must be contiguous")
        self.h, self.transposed, self.chunks_per_block = h, transposed, chunks_per_block

    def view(self) -> torch.Tensor:
        """``[B, n_blocks, H, query width, value width]``: the states as this pass's key rows and value columns."""
        return self.h.transpose(-1, -2) if self.transposed else self.h


def launches(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scores: torch.Tensor | None,
    log_gamma: torch.Tensor,
    out: torch.Tensor,
    *,
    state_scale: float,
    kv_scale: float,
    reverse: bool,
    accumulate: bool,
    states: States | None = None,
    stages: int = STAGES,
    widest: int = PIECES[0],
) -> list[tuple[tuple[int, int, int], tuple, dict]]:
    """``(grid, arguments, compile-time constants)`` of each kernel launch of an output pass: one a query piece."""
    B, T, H, DQ = query.shape
    n_chunks = T // CHUNK
    width = piece_width(DQ, widest)
    q_rows, v_rows = token_rows(query), token_rows(value)
    if not (width and q_rows and v_rows and key.stride() == query.stride() and out.stride() == value.stride()):
        raise ValueError("retention_hopper: these tensors are outside the kernel's scope (see supported())")
    descs = (
        _descriptor(query, q_rows, [CHUNK, width]),
        _descriptor(key, q_rows, [CHUNK, width]),
        _descriptor(value, v_rows, [CHUNK, VALUE_BLOCK]),
    )
    a = (scores if scores is not None else value.new_empty(1, CHUNK, CHUNK)).view(-1, CHUNK)
    a_desc = TensorDescriptor(a, list(a.shape), [CHUNK, 1], [CHUNK, CHUNK], _tile_layout([CHUNK, CHUNK], a.dtype))
    o_desc = _descriptor(out, v_rows, [CHUNK, VALUE_BLOCK])
    if states is None:
        per_block, h_strides = n_chunks, (0, 0, 0)
    else:
        view = states.view()
        per_block, h_strides = states.chunks_per_block, (view.stride(2), view.stride(3), view.stride(4))
        expected = (B, -(-n_chunks // per_block), H, DQ, value.shape[-1])
        if tuple(view.shape) != expected:
            raise ValueError(f"retention_hopper: block states of shape {tuple(view.shape)}, {expected} expected")
    grid = (value.shape[-1] // VALUE_BLOCK, -(-n_chunks // per_block), B * H)
    runs = []
    for lo in range(0, DQ, width):
        # the states from this piece's first key row (any tensor stands in for them without states)
        h = value if states is None else states.h.view(-1)[lo * h_strides[1] :]
        args = (*descs, a_desc, o_desc, log_gamma, h, state_scale, kv_scale, n_chunks, *q_rows, lo, *v_rows)
        args += (*h_strides, per_block)
        constants = dict(
            H=H, BK=width, BV=VALUE_BLOCK, C=CHUNK, NS=stages, REVERSE=reverse,
            SCORES=scores is not None and lo == 0, ACCUMULATE=accumulate or lo > 0, HAS_STATE=states is not None,
            num_warps=WARPS,
        )  # fmt: skip
        runs.append((grid, args, constants))
    return runs


def output_pass(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scores: torch.Tensor | None,
    log_gamma: torch.Tensor,
    *,
    state_scale: float,
    kv_scale: float,
    reverse: bool,
    out: torch.Tensor | None = None,
    states: States | None = None,
    stages: int = STAGES,
    widest: int = PIECES[0],
) -> torch.Tensor:
    """One output pass (see the module docstring) over the whole query width, in pieces that add up.

    ``scores``: ``[B, H, n_chunks, C, C]`` as ``retention_triton._chunk_scores`` made them in forward time (read
    transposed when ``reverse``), or None to leave the intra-chunk term out. ``out``: added into. ``states``: each
    block's starting state (None: one block per sequence, from zero). ``stages``: chunks whose copies are in flight;
    ``widest``: the widest query piece a launch takes.
    """
    accumulate = out is not None
    out = torch.empty_like(value) if out is None else out
    roles = dict(state_scale=state_scale, kv_scale=kv_scale, reverse=reverse, accumulate=accumulate, states=states)
    for grid, args, constants in launches(
        query, key, value, scores, log_gamma, out, **roles, stages=stages, widest=widest
    ):
        _output_kernel[grid](*args, **constants)
    return out


def output_pass_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scores: torch.Tensor | None,
    log_gamma: torch.Tensor,
    *,
    state_scale: float,
    kv_scale: float,
    reverse: bool,
    out: torch.Tensor | None = None,
    states: States | None = None,
) -> torch.Tensor:
    """``output_pass`` as a PyTorch loop over chunks, in float64: the same roles, decays, chunk order and block
    states, so the CPU tests check what the kernel is asked to compute against the retention reference's gradients.
    (How the kernel runs, its stages and pieces, is not part of what it computes.)"""
    B, T, H, _ = query.shape
    C = CHUNK
    n_chunks = T // C
    q, k, v = (x.double().transpose(1, 2) for x in (query, key, value))  # [B, H, T, D]
    lg = log_gamma.double().view(1, H, 1)
    i = torch.arange(C, dtype=torch.float64, device=q.device)
    row_decay = torch.exp(lg * ((C - 1 - i) if reverse else i)) * state_scale  # [1, H, C]
    key_decay = torch.exp(lg * ((i + 1) if reverse else (C - i))) * kv_scale
    chunk_decay = torch.exp(lg * C).unsqueeze(-1)
    per_block = n_chunks if states is None else states.chunks_per_block
    assert states is None or states.view().shape[-2] == q.shape[-1], "the twin takes whole-width calls with states"
    o = torch.zeros_like(v)
    for step in range(n_chunks):
        if step % per_block == 0:  # a block starts: from its stored state, or from zero
            blk = step // per_block
            g = q.new_zeros(B, H, q.shape[-1], v.shape[-1]) if states is None else states.view()[:, blk].double()
        c = n_chunks - 1 - step if reverse else step
        rows = slice(c * C, (c + 1) * C)
        qc, kc, vc = q[:, :, rows], k[:, :, rows], v[:, :, rows]
        oc = row_decay.unsqueeze(-1) * (qc @ g)
        if scores is not None:
            s = scores[:, :, c].double()
            oc = oc + (s.transpose(-1, -2) if reverse else s) @ vc
        o[:, :, rows] = oc
        g = chunk_decay * g + kc.transpose(-1, -2) @ (key_decay.unsqueeze(-1) * vc)
    o = o.transpose(1, 2)
    if out is not None:
        o = o + out.double()
    return o.to(value.dtype)
