"""The Hopper output kernel (``kernels/retention_hopper.py``): what it is asked to compute, that the plan routes every
output pass of a call to it with the right roles, and that it builds for an H100 within the SM's registers and
shared memory.

On the CPU: its PyTorch twin (``output_pass_reference``, the kernel's loop with the same roles, decays and chunk
order) against the float64 reference's output and gradients; the routing through ``retention_triton`` in Triton's
interpreter with the twin standing in for the kernel; and the kernel compiled for sm_90a (Triton's bundled ptxas).
On an H100, the kernel itself against the twin and the Triton kernels.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from arch_zoo.kernels import retention_hopper as rh
from arch_zoo.kernels.reference import retention_parallel_reference
from tests.test_kernels import checks_in_interpreter, decays, inputs, rel

C = rh.CHUNK


def chunk_scores(query: torch.Tensor, key: torch.Tensor, log_gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, H, n_chunks, C, C]``: ``scale * (query . key^T) * gamma^(i-j)`` for i >= j inside each chunk, as
    ``retention_triton._chunk_scores`` stores them (forward time)."""
    B, T, H, _ = query.shape
    q = query.double().reshape(B, T // C, C, H, -1).permute(0, 3, 1, 2, 4)
    k = key.double().reshape(B, T // C, C, H, -1).permute(0, 3, 1, 2, 4)
    i = torch.arange(C, dtype=torch.float64, device=query.device)
    gap = i[:, None] - i[None, :]
    decay = torch.where(gap >= 0, torch.exp(log_gamma.double().view(H, 1, 1, 1) * gap.clamp(min=0)), 0.0)
    return scale * (q @ k.transpose(-1, -2)) * decay[None]


# each pass's (query, key, value, scores) as indices into (q, k, v, do, a, da), its time direction, and whether the
# scale goes with the state read (forward passes) or into the state (reversed ones): retention_triton's roles
ROLES = {
    "o": (0, 1, 2, 4, False),
    "dq": (3, 2, 1, 5, False),
    "dv": (1, 0, 3, 4, True),
    "dk": (2, 3, 0, 5, True),
}


def pass_args(name: str, tensors: tuple, lg: torch.Tensor, scale: float) -> tuple[tuple, dict]:
    """``(query, key, value, scores, log_gamma), roles`` of one pass."""
    qi, ki, vi, si, reverse = ROLES[name]
    scales = dict(state_scale=1.0, kv_scale=scale) if reverse else dict(state_scale=scale, kv_scale=1.0)
    return (tensors[qi], tensors[ki], tensors[vi], tensors[si], lg), dict(reverse=reverse, **scales)


def passes(q, k, v, do, lg, scale, pieces: int | None = None):
    """o, dq, dk, dv through the twin with the roles ``retention_triton`` gives its output passes; ``pieces``:
    each query as two pieces that add up, as the kernel runs a 512-wide one."""
    tensors = (q, k, v, do, chunk_scores(q, k, lg, scale), chunk_scores(do, v, lg, scale))
    out = {}
    for name in ROLES:
        (query, key, value, scores, lg), roles = pass_args(name, tensors, lg, scale)
        if not pieces:
            out[name] = rh.output_pass_reference(query, key, value, scores, lg, **roles)
            continue
        half = query.shape[-1] // 2
        first = rh.output_pass_reference(query[..., :half], key[..., :half], value, scores, lg, **roles)
        out[name] = rh.output_pass_reference(query[..., half:], key[..., half:], value, None, lg, **roles, out=first)
    return out


@pytest.mark.parametrize("pieces", [None, 2], ids=["whole", "pieces"])
def test_the_four_output_passes_give_the_core_and_its_gradients(pieces):
    B, T, H, K, V = 2, 3 * C, 2, 16, 24
    q, k, v, _ = inputs(B, T, H, K, V, seed=11)
    lg, scale = decays(H), K**-0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = retention_parallel_reference(*leaves, lg, scale)[0]
    do = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    o_ref.backward(do)
    got = passes(q, k, v, do, lg, scale, pieces)
    assert rel(got["o"], o_ref) < 1e-12
    for name, leaf in zip(["dq", "dk", "dv"], leaves):
        assert rel(got[name], leaf.grad) < 1e-12, name


def test_a_wrong_role_is_caught_by_the_twin_check():
    """The check above can fail: the forward's decays on a reversed pass give another dv."""
    q, k, v, _ = inputs(1, 2 * C, 2, 16, 16, seed=5)
    lg, scale = decays(2), 0.25
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = retention_parallel_reference(*leaves, lg, scale)[0]
    do = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o_ref.backward(do)
    a = chunk_scores(q, k, lg, scale)
    wrong = rh.output_pass_reference(k, q, do, a, lg, state_scale=1.0, kv_scale=scale, reverse=False)
    assert rel(wrong, leaves[2].grad) > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# The routing: retention_triton with the plan's ``hopper`` tile on, in Triton's interpreter
# ---------------------------------------------------------------------------------------------------------------


# the plans routed: one block per sequence (no states), blocks of one and of two chunks (each starting from the block
# states the Triton state passes store, read transposed by dq and dk), and one block continuing from an initial state
ROUTES = {
    "single": ({"single_block": 1}, 2, False),
    "blocks1": ({"single_block": 0, "nc": 1}, 3, False),
    "blocks2": ({"single_block": 0, "nc": 2}, 3, False),
    "state": ({"single_block": 1}, 2, True),
}


def routing_checks() -> dict[str, float]:
    """Forward and backward through ``retention_triton`` with the Hopper pass forced in scope and the twin standing in
    for the kernel (the interpreter cannot run Gluon): the passes it routes there, and the results against float64.
    Run with TRITON_INTERPRET=1 in a fresh process."""
    from arch_zoo.kernels import retention_triton as rt

    calls = []

    def twin(query, key, value, scores, log_gamma, *, stages, widest, states, **roles):
        calls.append((query.shape[-1], value.shape[-1], roles["reverse"], scores is not None, stages, widest))
        calls[-1] += (None if states is None else (states.transposed, states.chunks_per_block),)
        return rh.output_pass_reference(query, key, value, scores, log_gamma, states=states, **roles)

    rh.supported = lambda query, value, chunk, widest: chunk == C and query.shape[1] % C == 0
    rh.output_pass = twin
    results = {}
    H, K, V = 2, 16, 40
    lg, scale = decays(H).float(), K**-0.5
    for route, (plan, n_chunks, with_state) in ROUTES.items():
        B, T = 2, n_chunks * C
        q, k, v, s0 = inputs(B, T, H, K, V, dtype=torch.float32, seed=7 + n_chunks)
        for hopper in (0, 2):
            calls.clear()
            leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)][: 3 + with_state]
            tiles = {"hopper": hopper, "key_piece": 128, "shared_scores": 1, "fused_dkv": 0, **plan}
            with rt.pinned_tiles(tiles):
                o, _ = rt.retention_triton(*leaves[:3], lg, scale, leaves[3] if with_state else None)
            ref = [x.detach().double().requires_grad_() for x in leaves]
            o_ref = retention_parallel_reference(*ref[:3], lg.double(), scale, ref[3] if with_state else None)[0]
            do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
            o.backward(do)
            o_ref.backward(do.double())
            prefix = f"{route}/hopper{hopper}"
            results[f"{prefix}/o"] = rel(o, o_ref)
            for name, a, b in zip(["dq", "dk", "dv", "ds0"], leaves, ref):
                results[f"{prefix}/{name}"] = rel(a.grad, b.grad)
            results[f"{prefix}/calls"] = list(calls)
    return results


@pytest.fixture(scope="module")
def routing() -> dict:
    return checks_in_interpreter(__file__, "--routing-checks")


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_plan_routes_all_four_output_passes_to_the_hopper_kernel_and_they_give_the_gradients(routing, route):
    """(query width, value width, reversed, with scores, stages, widest piece, block states): o, dq (query do), dv
    (query k) and dk (query v), with the plan's stages (its hopper tile) and key piece; where the plan keeps block
    states, each pass starts its blocks from them (dq and dk reading them transposed), and all four give float64's
    gradients, as the Triton kernels do with the tile off."""
    plan, n_chunks, with_state = ROUTES[route]
    per_block = plan.get("nc", n_chunks)
    expected = []
    for width, value, reverse, transposed in [(16, 40, False, False), (40, 16, False, True), (16, 40, True, False),
                                              (40, 16, True, True)]:  # fmt: skip
        # blocks: every pass starts from stored states; an initial state: the forward's (o, and dq reading them)
        stored = plan["single_block"] == 0 or (with_state and not reverse)
        expected.append([width, value, reverse, True, 2, 128, [transposed, per_block] if stored else None])
    assert sorted(map(json.dumps, routing[f"{route}/hopper2/calls"])) == sorted(map(json.dumps, expected))
    assert routing[f"{route}/hopper0/calls"] == []
    names = ("o", "dq", "dk", "dv", "ds0") if with_state else ("o", "dq", "dk", "dv")
    for hopper in (0, 2):
        for name in names:
            assert routing[f"{route}/hopper{hopper}/{name}"] < 1e-5, (route, hopper, name)


# ---------------------------------------------------------------------------------------------------------------
# The kernel built for an H100 (sm_90a) without one: registers, spills and shared memory of each pass's variant
# ---------------------------------------------------------------------------------------------------------------

SM90_SHARED_BYTES = 232448  # the most shared memory one block may take on an H100 (227 KB)

# the variants a RetNet layer at the paper's 256 x 512 heads launches: o and dv (query width 256), dq and dk (512:
# two pieces, the second adding into the first's output without scores)
VARIANTS = {
    "o": dict(width=256, value=512, reverse=False),
    "dq": dict(width=512, value=256, reverse=False),
    "dv": dict(width=256, value=512, reverse=True),
    "dk": dict(width=512, value=256, reverse=True),
}
# pieces of 128 with one stage: small enough for two programs an SM (registers and shared memory), for more latency
# hidden by the other program than by the copies in flight
TWO_PER_SM = {"o": dict(width=256, value=512, reverse=False), "dk": dict(width=512, value=256, reverse=True)}


def build_for_sm90(
    width: int,
    value: int,
    reverse: bool,
    stages: int = rh.STAGES,
    widest: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    states: bool = False,
) -> list[dict]:
    """Compile each launch of one output pass for sm_90a (CPU tensors stand in for the data: nothing runs)."""
    triton = pytest.importorskip("triton")
    if not rh.AVAILABLE:
        pytest.skip(f"triton {triton.__version__} has no Gluon")
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    B, T, H = 1, 2 * C, 2
    query = torch.zeros(B, T, H, width, dtype=dtype)
    val = torch.zeros(B, T, H, value, dtype=dtype)
    a = torch.zeros(B, H, T // C, C, C, dtype=dtype)
    out = torch.empty_like(val)
    roles = dict(state_scale=1.0, kv_scale=0.0625, reverse=reverse, accumulate=False, stages=stages, widest=widest)
    if states:  # blocks of one chunk from stored states; a 512-wide query reads them transposed, as dq and dk do
        transposed = width > value
        shape = (B, T // C, H, value, width) if transposed else (B, T // C, H, width, value)
        roles["states"] = rh.States(torch.zeros(shape, dtype=dtype), transposed, 1)
    built = []
    for _, args, constants in rh.launches(query, query, val, a, torch.zeros(H), out, **roles):
        signature, consts = {}, {}
        for param, arg in zip(rh._output_kernel.params, list(args) + [None] * len(constants)):
            if param.name in constants:
                signature[param.name], consts[param.name] = "constexpr", constants[param.name]
            else:
                signature[param.name] = "fp32" if isinstance(arg, float) else mangle_type(arg)
        source = GluonASTSource(rh._output_kernel, signature, consts)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": rh.WARPS})
        ptx = kernel.asm["ptx"]
        report = subprocess.run(
            [get_ptxas(90).path, "-arch=sm_90a", "-v", "-", "-o", "/dev/null"],
            input=ptx, capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
        used = re.search(r"Used (\d+) registers", report)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        built.append(
            dict(
                shared=kernel.metadata.shared,
                registers=int(used.group(1)),
                spilled=int(spill.group(1)) + int(spill.group(2)),
                injected_waits="warpgroup.wait is injected" in report,
                waits=ptx.count("wgmma.wait_group"),
                products=ptx.count("wgmma.mma_async"),
            )
        )
    return built


BUILDS = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "states": (torch.bfloat16, True)}


@pytest.mark.parametrize("dtype,states", BUILDS.values(), ids=BUILDS.keys())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_hopper_kernel_builds_for_an_h100_within_its_registers_and_shared_memory(variant, dtype, states):
    """What the design rests on, checked in the compiled kernel: no spills with the [256, 64] state split over two
    warp groups (64 registers a thread of it), the stages within one SM's shared memory, and one wait a chunk for
    all its products (ptxas inserts none of its own)."""
    spec = VARIANTS[variant]
    built = build_for_sm90(**spec, dtype=dtype, states=states)
    assert len(built) == spec["width"] // 256  # a 512-wide query runs as two pieces of 256
    for piece, b in enumerate(built):
        assert b["spilled"] == 0, b
        assert b["registers"] <= 168, b
        assert b["shared"] <= SM90_SHARED_BYTES, b
        assert not b["injected_waits"], b
        assert b["waits"] == 1, b
        # 16 products for the state read and 16 for its update (K = 256 in steps of 16, M = 256 in four rows of 64
        # for the update), 4 for the scores: only on the piece that carries them
        assert b["products"] == 32 + 4 * (piece == 0), b


@pytest.mark.parametrize("variant", list(TWO_PER_SM))
def test_the_narrow_one_stage_variant_fits_two_programs_an_sm(variant):
    spec = TWO_PER_SM[variant]
    built = build_for_sm90(**spec, stages=1, widest=128)
    assert len(built) == spec["width"] // 128
    for piece, b in enumerate(built):
        assert b["spilled"] == 0 and not b["injected_waits"] and b["waits"] == 1, b
        assert 2 * b["registers"] * 32 * rh.WARPS <= 65536, b  # an H100 SM's register file
        assert 2 * (b["shared"] + 1024) <= 233472, b  # its 228 KB of shared memory, 1 KB a block reserved
        assert b["products"] == 8 + 8 + 4 * (piece == 0), b  # K = 128: 8 steps of 16; the update 2 rows of 64 x 4


@pytest.mark.parametrize("layout", ["BTHD", "BHTD"])
def test_each_tile_the_kernel_copies_is_the_chunk_it_means(layout):
    """The TMA geometry, emulated: each launch's descriptors, read at the coordinates the kernel computes (row
    ``b * rb + h * rh + t``, column ``h * ch + piece``; the scores at ``(b * H + h) * n_chunks * C + t``), give
    the chunk, head and columns of the tensors they describe, in both layouts and for every key piece."""
    if not rh.AVAILABLE:
        pytest.skip("Triton with Gluon is needed to build the descriptors")
    B, T, H, K, V = 2, 3 * C, 3, 512, 128
    g = torch.Generator().manual_seed(0)

    def make(D):
        x = torch.randn(B, T, H, D, generator=g).bfloat16()
        return x if layout == "BTHD" else x.transpose(1, 2).contiguous().transpose(1, 2)

    q, k, v = make(K), make(K), make(V)
    a = torch.randn(B, H, T // C, C, C, generator=g).bfloat16()
    out = torch.empty_like(v)
    roles = dict(state_scale=1.0, kv_scale=1.0, reverse=False, accumulate=False)
    runs = rh.launches(q, k, v, a, torch.zeros(H), out, **roles)
    assert len(runs) == 2  # two pieces of 256

    def view(desc):
        return torch.as_strided(desc.base, desc.shape, desc.strides)

    for grid, args, constants in runs:
        q_d, k_d, v_d, a_d, o_d = args[:5]
        n_chunks, (q_rb, q_rh, q_ch, lo, v_rb, v_rh, v_ch) = args[9], args[10:17]
        BK, BV = constants["BK"], constants["BV"]
        assert grid == (V // BV, 1, B * H) and n_chunks == T // C  # one block per sequence: no states
        assert q_d.block_shape == k_d.block_shape == [C, BK] and v_d.block_shape == o_d.block_shape == [C, BV]
        for b in range(B):
            for h in range(H):
                for c in range(n_chunks):
                    rows = slice(c * C, (c + 1) * C)
                    r_q, r_v = b * q_rb + h * q_rh + c * C, b * v_rb + h * v_rh + c * C
                    for desc, x in ((q_d, q), (k_d, k)):
                        tile = view(desc)[r_q : r_q + C, h * q_ch + lo : h * q_ch + lo + BK]
                        assert torch.equal(tile, x[b, rows, h, lo : lo + BK])
                    for i_v in range(V // BV):
                        cols = slice(h * v_ch + i_v * BV, h * v_ch + (i_v + 1) * BV)
                        assert torch.equal(view(v_d)[r_v : r_v + C, cols], v[b, rows, h, i_v * BV : (i_v + 1) * BV])
                        assert view(o_d)[r_v : r_v + C, cols].data_ptr() == out[b, rows, h, i_v * BV :].data_ptr()
                    r_a = (b * H + h) * n_chunks * C + c * C
                    assert torch.equal(view(a_d)[r_a : r_a + C], a[b, h, c])


@pytest.mark.parametrize("transposed", [False, True], ids=["kv", "vk"])
def test_each_block_starts_from_the_state_it_means(transposed):
    """The state a program loads, emulated: at the kernel's addresses (``h_ptr`` at the piece's first key row, then
    ``((b * n_blocks + blk) * H + h) * h_block + row * h_key + column * h_value``) each program finds its block's
    state, as this pass reads it (transposed for dq and dk), for every key piece and value block."""
    if not rh.AVAILABLE:
        pytest.skip("Triton with Gluon is needed to build the descriptors")
    B, T, H, K, V, per_block = 2, 5 * C, 2, 512, 128, 2
    g = torch.Generator().manual_seed(1)
    query, value = torch.randn(B, T, H, K, generator=g).bfloat16(), torch.randn(B, T, H, V, generator=g).bfloat16()
    n_blocks = 3  # 5 chunks in blocks of 2
    h = torch.randn((B, n_blocks, H, V, K) if transposed else (B, n_blocks, H, K, V), generator=g).bfloat16()
    states = rh.States(h, transposed, per_block)
    roles = dict(state_scale=1.0, kv_scale=1.0, reverse=False, accumulate=False, states=states)
    runs = rh.launches(query, query, value, None, torch.zeros(H), torch.empty_like(value), **roles)
    for grid, args, constants in runs:
        h_ptr, (h_block, h_key, h_value, nc), lo = args[6], args[17:21], args[13]
        BK, BV = constants["BK"], constants["BV"]
        assert grid == (V // BV, n_blocks, B * H) and nc == per_block and constants["HAS_STATE"]
        assert h_ptr.data_ptr() == h.data_ptr() + lo * h_key * h.element_size()
        flat = h.view(-1)[lo * h_key :]
        rows, cols = torch.arange(BK)[:, None], torch.arange(BV)[None, :]
        for b in range(B):
            for blk in range(n_blocks):
                for head in range(H):
                    for i_v in range(V // BV):
                        base = ((b * n_blocks + blk) * H + head) * h_block
                        loaded = flat[base + rows * h_key + (i_v * BV + cols) * h_value]
                        want = states.view()[b, blk, head, lo : lo + BK, i_v * BV : (i_v + 1) * BV]
                        assert torch.equal(loaded, want)


def test_calls_outside_the_kernels_scope_stay_on_the_triton_kernels():
    """On a machine without an sm_90 GPU (this one), or outside the shapes it takes, nothing is routed there."""
    x = torch.zeros(1, 2 * C, 2, 256, dtype=torch.bfloat16)
    assert not rh.supported(x, x, C)  # a CPU tensor
    assert rh.piece_width(512) == 256 and rh.piece_width(192) == 64 and rh.piece_width(40) is None
    assert rh.token_rows(x) == (2 * C, 0, 256)
    assert rh.token_rows(x.transpose(1, 2).contiguous().transpose(1, 2)) == (2 * 2 * C, 2 * C, 0)
    assert rh.token_rows(x[:, :, :, :128]) is None  # a slice of the head dim: rows are not one token's
    assert rh.token_rows(x.as_strided(x.shape, (12345, *x.stride()[1:]))) == (2 * C, 0, 256)  # batch of one
    gapped = torch.zeros(3 * 2 * C * 512)[: 2 * 3 * C * 512].as_strided((2, 2 * C, 2, 256), (3 * C * 512, 512, 256, 1))
    assert rh.token_rows(gapped) is None  # two sequences with a gap between them: not one run of rows


def skip_without_hopper() -> None:
    """The GPU tests run the kernel itself: an sm_90 GPU and a Triton with Gluon."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or not rh.AVAILABLE:
        pytest.skip("needs an sm_90 GPU and Triton with Gluon")


# (tiles, with an initial state): one block per sequence, two stages or the narrow variant; blocks of four chunks
# from the stored block states; one block continuing from an initial state (the forward and dq read its states)
GPU_CALLS = {
    "2stages": ({"hopper": 2, "single_block": 1}, False),
    "narrow": ({"hopper": 1, "key_piece": 128, "single_block": 1}, False),
    "blocks": ({"hopper": 2, "single_block": 0, "nc": 4}, False),
    "state": ({"hopper": 2, "single_block": 1}, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CALLS))
def test_the_hopper_kernel_on_an_h100_against_float64_and_the_triton_kernels(monkeypatch, case):
    """The paper's 256 x 512 heads in bf16, forward and backward, with all four passes on the kernel (counted)."""
    skip_without_hopper()
    from arch_zoo.kernels import retention_triton as rt

    tiles, with_state = GPU_CALLS[case]
    calls = []
    run = rh.output_pass
    monkeypatch.setattr(rh, "output_pass", lambda *a, **kw: calls.append(kw["reverse"]) or run(*a, **kw))
    B, T, H, K, V = 2, 1024, 4, 256, 512
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, s0 = inputs(B, T, H, K, V, dtype=torch.bfloat16, device="cuda", seed=seed)
    s0 = s0.float() if with_state else None
    lg, scale = decays(H).cuda(), K**-0.5
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref = retention_parallel_reference(*ref, lg, scale, None if s0 is None else s0.double())[0]
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    o_ref.backward(do.double())
    errors = {}
    for hopper in (1, 0):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with rt.pinned_tiles(tiles if hopper else {}):
            o, _ = rt.retention_triton(*leaves, lg.float(), scale, s0)
        o.backward(do)
        errors[hopper] = {"o": rel(o, o_ref)} | {
            name: rel(a.grad, b.grad) for name, a, b in zip(["dq", "dk", "dv"], leaves, ref)
        }
    assert sorted(calls) == [False, False, True, True], calls  # o and dq forward in time, dv and dk reversed
    assert all(e < 1e-2 for e in errors[1].values()), f"seed {seed}: {errors}"
    # no worse than the Triton kernels by more than rounding
    assert all(errors[1][n] < 2 * errors[0][n] + 1e-3 for n in errors[1]), f"seed {seed}: {errors}"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["BTHD", "BHTD"])
@pytest.mark.parametrize("T", [C, 2 * C, 5 * C], ids=["one_chunk", "two_chunks", "five_chunks"])
@pytest.mark.parametrize("name", list(ROLES))
@pytest.mark.parametrize("tiles", [(2, 256), (1, 128)], ids=["2stages", "narrow"])
def test_each_pass_of_the_hopper_kernel_on_an_h100_equals_its_twin(name, T, layout, tiles):
    """One pass at a time, so a failure names the pass: one chunk, the stages' depth, and refilled stages; both
    layouts the kernels take; the paper's head dims (the 512-wide queries of dq and dk run as pieces)."""
    skip_without_hopper()
    B, H, K, V = 2, 4, 256, 512
    g = torch.Generator(device="cuda").manual_seed(T)

    def make(D):
        x = torch.randn(B, T, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
        return x if layout == "BTHD" else x.transpose(1, 2).contiguous().transpose(1, 2)

    q, k, v, do = make(K), make(K), make(V), make(V)
    lg, scale = decays(H).float().cuda(), K**-0.5
    a, da = chunk_scores(q, k, lg, scale).bfloat16(), chunk_scores(do, v, lg, scale).bfloat16()
    args, roles = pass_args(name, (q, k, v, do, a, da), lg, scale)
    assert rh.supported(args[0], args[2], C, tiles[1])
    got = rh.output_pass(*args, **roles, stages=tiles[0], widest=tiles[1])
    want = rh.output_pass_reference(*args, **roles)
    assert got.stride() == args[2].stride()
    assert rel(got, want) < 1e-2, (name, rel(got, want))


@pytest.mark.gpu
def test_a_retnet_layer_at_the_papers_dims_runs_its_core_on_the_hopper_kernel(monkeypatch):
    """The model's own path: a RetNet layer (d 1024, 4 heads of 256 x 512) under bf16 autocast hands its core to the
    kernel when the tile is pinned (all four passes, counted: the layouts it hands over are in scope), and trains as
    on the Triton kernels."""
    skip_without_hopper()
    from arch_zoo.kernels import retention_triton as rt
    from arch_zoo.mixers.retnet import RetNet, RetNetConfig

    calls = []
    run = rh.output_pass
    monkeypatch.setattr(rh, "output_pass", lambda *a, **kw: calls.append(kw["reverse"]) or run(*a, **kw))
    x = torch.randn(16, 1024, 1024, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    results = {}
    for tiles in ({"hopper": 2}, {}):
        torch.manual_seed(0)
        mixer = RetNet(1024, RetNetConfig(name="retnet")).cuda()
        xi = x.clone().requires_grad_()
        with rt.pinned_tiles(tiles), torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = mixer(xi, return_state=False)
            y.float().pow(2).mean().backward()
        results[bool(tiles)] = (y.float(), xi.grad, mixer.q_proj.weight.grad, mixer.v_proj.weight.grad)
    assert sorted(calls) == [False, False, True, True], calls
    for got, want in zip(results[True], results[False]):
        assert torch.isfinite(got).all() and rel(got, want) < 2e-2


if __name__ == "__main__" and sys.argv[1:] == ["--routing-checks"]:
    print(json.dumps(routing_checks()))
