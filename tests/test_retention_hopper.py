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


def routing_checks() -> dict[str, float]:
    """Forward and backward through ``retention_triton`` with the Hopper pass forced in scope and the twin standing in
    for the kernel (the interpreter cannot run Gluon): the passes it routes there, and the results against float64.
    Run with TRITON_INTERPRET=1 in a fresh process."""
    from arch_zoo.kernels import retention_triton as rt

    calls = []

    def twin(query, key, value, scores, log_gamma, *, stages, widest, **roles):
        calls.append((query.shape[-1], value.shape[-1], roles["reverse"], scores is not None, stages, widest))
        return rh.output_pass_reference(query, key, value, scores, log_gamma, **roles)

    rh.supported = lambda query, value, chunk, widest: chunk == C and query.shape[1] % C == 0
    rh.output_pass = twin
    results = {}
    B, T, H, K, V = 2, 2 * C, 2, 16, 40
    q, k, v, _ = inputs(B, T, H, K, V, dtype=torch.float32, seed=7)
    lg, scale = decays(H).float(), K**-0.5
    for hopper in (0, 2):
        calls.clear()
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        tiles = {"hopper": hopper, "key_piece": 128, "single_block": 1, "shared_scores": 1, "fused_dkv": 0}
        with rt.pinned_tiles(tiles):
            o, _ = rt.retention_triton(*leaves, lg, scale)
        ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
        o_ref = retention_parallel_reference(*ref, lg.double(), scale)[0]
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
        o.backward(do)
        o_ref.backward(do.double())
        results[f"hopper{hopper}/o"] = rel(o, o_ref)
        for name, a, b in zip(["dq", "dk", "dv"], leaves, ref):
            results[f"hopper{hopper}/{name}"] = rel(a.grad, b.grad)
        results[f"hopper{hopper}/calls"] = sorted(calls)
    return results


@pytest.fixture(scope="module")
def routing() -> dict:
    return checks_in_interpreter(__file__, "--routing-checks")


def test_the_plan_routes_all_four_output_passes_to_the_hopper_kernel_and_they_give_the_gradients(routing):
    # (query width, value width, reversed, with scores, stages, widest piece): o, dq (query do), dv (query k), dk
    # (query v), with the plan's stages (its hopper tile) and key piece
    expected = [[16, 40, False, True], [40, 16, False, True], [16, 40, True, True], [40, 16, True, True]]
    assert routing["hopper2/calls"] == sorted(call + [2, 128] for call in expected)
    assert routing["hopper0/calls"] == []
    for name in ("o", "dq", "dk", "dv"):
        assert routing[f"hopper2/{name}"] < 1e-5, name
        assert routing[f"hopper0/{name}"] < 1e-5, name


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
    width: int, value: int, reverse: bool, stages: int = rh.STAGES, widest: int = 256, dtype=torch.bfloat16
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_hopper_kernel_builds_for_an_h100_within_its_registers_and_shared_memory(variant, dtype):
    """What the design rests on, checked in the compiled kernel: no spills with the [256, 64] state split over two
    warp groups (64 registers a thread of it), the stages within one SM's shared memory, and one wait a chunk for
    all its products (ptxas inserts none of its own)."""
    spec = VARIANTS[variant]
    built = build_for_sm90(**spec, dtype=dtype)
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
        n_chunks, (q_rb, q_rh, q_ch, lo, v_rb, v_rh, v_ch) = args[8], args[9:16]
        BK, BV = constants["BK"], constants["BV"]
        assert grid == (V // BV, B * H) and n_chunks == T // C
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


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [{"hopper": 2}, {"hopper": 1, "key_piece": 128}], ids=["2stages", "narrow"])
def test_the_hopper_kernel_on_an_h100_against_float64_and_the_triton_kernels(monkeypatch, tiles):
    """The paper's 256 x 512 heads in bf16, forward and backward, with all four passes on the kernel (counted)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or not rh.AVAILABLE:
        pytest.skip("needs an sm_90 GPU and Triton with Gluon")
    from arch_zoo.kernels import retention_triton as rt

    calls = []
    run = rh.output_pass
    monkeypatch.setattr(rh, "output_pass", lambda *a, **kw: calls.append(kw["reverse"]) or run(*a, **kw))
    B, T, H, K, V = 2, 1024, 4, 256, 512
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, _ = inputs(B, T, H, K, V, dtype=torch.bfloat16, device="cuda", seed=seed)
    lg, scale = decays(H).cuda(), K**-0.5
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref = retention_parallel_reference(*ref, lg, scale)[0]
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    o_ref.backward(do.double())
    errors = {}
    for hopper in (1, 0):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with rt.pinned_tiles({"single_block": 1, **tiles} if hopper else {}):  # 2 x 4 heads: few for one block
            o, _ = rt.retention_triton(*leaves, lg.float(), scale)
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
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or not rh.AVAILABLE:
        pytest.skip("needs an sm_90 GPU and Triton with Gluon")
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
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or not rh.AVAILABLE:
        pytest.skip("needs an sm_90 GPU and Triton with Gluon")
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
