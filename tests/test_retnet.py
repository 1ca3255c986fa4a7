"""RetNet's multi-scale retention: the three paradigms compute one function under every switch.

* a float64 O(T^2) brute force of the paper's equations (explicit decay products, complex rotation, direct row sums)
  is the strictest oracle, outputs and gradients;
* the equivalence grid: parallel vs chunkwise vs recurrent (outputs) and parallel vs chunkwise (gradients w.r.t.
  inputs and every weight) over the switch grid, float64 tight and float32 <= 1e-5 relative;
* partial last chunks, continuation from a state over several tokens, constant state size, parameter counts,
  config errors, and greedy decoding through the recurrent form.

Weights are drawn larger than at initialisation so that the score normaliser max(|.|, 1) is active on some rows
and not on others (``test_score_normaliser_is_exercised`` checks it), and selective decays vary per token.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from arch_zoo import ConfigError, LanguageModel, ModelConfig, build_mixer
from arch_zoo.kernels import core
from arch_zoo.mixers.retnet import (
    RetNet,
    RetNetConfig,
    _continued,
    decay_row_sums,
)

D_MODEL, HEAD_DIM, T, CHUNK = 32, 8, 13, 4  # 4 heads; 13 tokens = 3 full chunks of 4 and a partial one


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make(dtype: torch.dtype = torch.float64, seed: int = 0, d_model: int = D_MODEL, **switches) -> RetNet:
    """A mixer with random weights (larger than the init, so every normaliser branch is taken)."""
    config = RetNetConfig(name="retnet", **{"head_dim": HEAD_DIM, "chunk_size": CHUNK, **switches})
    torch.manual_seed(seed)
    mixer = build_mixer(config, d_model)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name in ("q_proj.weight", "k_proj.weight"):
                p.normal_(0, 2.5 / math.sqrt(p.shape[1]))
            elif name.endswith("proj.weight"):
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
            elif name == "decay_proj.bias" or name == "decay_logit":
                p.add_(torch.randn_like(p) * 0.3)
            elif name.startswith("group_norm"):
                p.add_(torch.randn_like(p) * 0.2)
    return mixer.to(dtype)


def run(mixer: RetNet, x: torch.Tensor, mode: str, state=None, return_state: bool = True):
    mixer.config = dataclasses.replace(mixer.config, mode=mode)
    return mixer(x, state, return_state=return_state)


def inputs(dtype: torch.dtype, batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, D_MODEL, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------- brute force
def paper_gammas(mixer: RetNet, x: torch.Tensor) -> torch.Tensor:
    """gamma [B, H, T] from the paper's formulas, written out independently of the module."""
    c, H = mixer.config, mixer.n_heads
    B, L, _ = x.shape
    if c.selective_decay:
        return torch.sigmoid(x @ mixer.decay_proj.weight.T + mixer.decay_proj.bias).transpose(1, 2)
    if c.learnable_decay:
        per_head = torch.sigmoid(mixer.decay_logit)
    elif not c.decay:
        per_head = torch.ones(H, dtype=x.dtype)
    elif not c.multiscale_decay:
        per_head = torch.full((H,), c.single_scale_gamma, dtype=x.dtype)
    elif c.decay_schedule == "torchscale":
        per_head = torch.tensor([1 - 2 ** (-5 - h) for h in range(H)], dtype=x.dtype)
    else:
        lo, hi = math.log(1 / 32), math.log(1 / 512)
        per_head = torch.tensor([1 - math.exp(lo + (hi - lo) * h / max(H - 1, 1)) for h in range(H)], dtype=x.dtype)
    return per_head[None, :, None].expand(B, H, L)


def brute_force(mixer: RetNet, x: torch.Tensor) -> torch.Tensor:
    """Eq. (5)-(8) of the paper with torchscale's normalisers, in float64: explicit loops and products."""
    c = mixer.config
    B, L, d = x.shape
    H, dk, dv = mixer.n_heads, mixer.key_dim, mixer.value_dim
    q = (x @ mixer.q_proj.weight.T).view(B, L, H, dk).transpose(1, 2)
    k = (x @ mixer.k_proj.weight.T).view(B, L, H, dk).transpose(1, 2) / math.sqrt(dk)
    v = (x @ mixer.v_proj.weight.T).view(B, L, H, dv).transpose(1, 2)
    if c.xpos:  # multiply channel pairs, as complex numbers, by e^{i n theta_j}, theta_j = base^(-j / (dk/2 - 1))
        half = dk // 2
        theta = torch.tensor([c.xpos_base ** (-j / max(half - 1, 1)) for j in range(half)], dtype=torch.float64)
        phase = torch.polar(torch.ones(L, half, dtype=torch.float64), torch.arange(L)[:, None] * theta[None, :])
        q = torch.view_as_real(torch.view_as_complex(q.reshape(B, H, L, half, 2).contiguous()) * phase).flatten(-2)
        k = torch.view_as_real(torch.view_as_complex(k.reshape(B, H, L, half, 2).contiguous()) * phase).flatten(-2)
    gamma = paper_gammas(mixer, x)
    D = torch.zeros(B, H, L, L, dtype=x.dtype)
    for n in range(L):
        for m in range(n + 1):
            D[:, :, n, m] = gamma[:, :, m + 1 : n + 1].prod(-1)
    if c.decay_norm:
        D = D / D.sum(-1, keepdim=True).sqrt()
    R = torch.einsum("bhnd,bhmd->bhnm", q, k) * D
    if c.score_norm:
        R = R / R.sum(-1, keepdim=True).detach().abs().clamp(min=1)
    O = R @ v
    if c.group_norm:
        if c.group_norm_kind == "layernorm":
            O = O - O.mean(-1, keepdim=True)
        O = O / (O.pow(2).mean(-1, keepdim=True) + c.group_norm_eps).sqrt()
        if c.group_norm_affine:
            O = O * mixer.group_norm.weight + (mixer.group_norm.bias if mixer.group_norm.bias is not None else 0)
    Y = O.transpose(1, 2).reshape(B, L, H * dv)
    if c.swish_gate:
        Y = F.silu(x @ mixer.g_proj.weight.T) * Y
    return Y @ mixer.out_proj.weight.T


DECAYS = {
    "paper": {},
    "torchscale": {"decay_schedule": "torchscale"},
    "single_scale": {"multiscale_decay": False},
    "no_decay": {"decay": False},
    "learnable": {"learnable_decay": True},
    "selective": {"selective_decay": True},
}
NORMS = {
    f"gn{int(gn)}_dn{int(dn)}_sn{int(sn)}": {"group_norm": gn, "decay_norm": dn, "score_norm": sn}
    for gn, dn, sn in itertools.product([True, False], repeat=3)
}
OTHERS = {
    "no_gate": {"swish_gate": False},
    "no_gate_no_realloc": {"swish_gate": False, "gate_realloc": "none"},
    "layernorm_affine": {"group_norm_kind": "layernorm", "group_norm_affine": True},
    "rmsnorm_affine_eps0": {"group_norm_affine": True, "group_norm_eps": 0.0},
    "big_eps": {"group_norm_eps": 1e-1},
    "no_xpos": {"xpos": False},
    "value_factor_1": {"value_factor": 1.0},
    "head_dim_16": {"head_dim": 16},
    "head_dim_2": {"head_dim": 2},
    "no_xpos_no_decay_no_gn_selective_off": {"xpos": False, "decay": False, "group_norm": False},
    "selective_layernorm_no_gate": {"selective_decay": True, "group_norm_kind": "layernorm", "swish_gate": False},
    "learnable_single_scale_no_dn": {"learnable_decay": True, "multiscale_decay": False, "decay_norm": False},
}
GRID = {f"{d}-{n}": {**dv, **nv} for (d, dv), (n, nv) in itertools.product(DECAYS.items(), NORMS.items())}
GRID.update(OTHERS)
TOL = {torch.float64: 1e-11, torch.float32: 1e-5}


@pytest.mark.parametrize("switches", list(GRID.values()), ids=list(GRID))
def test_brute_force_oracle_float64(switches):
    mixer = make(**switches)
    x = inputs(torch.float64).requires_grad_()
    expected = brute_force(mixer, x)
    g_out = torch.randn_like(expected)
    grads_expected = torch.autograd.grad((expected * g_out).sum(), [x, *mixer.parameters()])
    names = ["x", *(n for n, _ in mixer.named_parameters())]
    for mode in ("parallel", "chunkwise", "recurrent"):
        y, _ = run(mixer, x, mode)
        assert rel_err(y, expected) < 1e-12, mode
        grads = torch.autograd.grad((y * g_out).sum(), [x, *mixer.parameters()])
        for name, g, ge in zip(names, grads, grads_expected, strict=True):
            assert rel_err(g, ge) < 1e-11, (mode, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("switches", list(GRID.values()), ids=list(GRID))
def test_modes_agree(switches, dtype):
    mixer = make(dtype, **switches)
    x = inputs(dtype).requires_grad_()
    params = list(mixer.parameters())
    outs, grads = {}, {}
    g_out = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    for mode in ("parallel", "chunkwise"):
        y, state = run(mixer, x, mode)
        outs[mode], grads[mode] = y, torch.autograd.grad((y * g_out).sum(), [x, *params])
    with torch.no_grad():
        outs["recurrent"], _ = run(mixer, x, "recurrent")
    tol = TOL[dtype]
    assert rel_err(outs["chunkwise"], outs["parallel"]) < tol
    assert rel_err(outs["recurrent"], outs["parallel"]) < tol
    names = ["x", *(n for n, _ in mixer.named_parameters())]
    for name, gc, gp in zip(names, grads["chunkwise"], grads["parallel"], strict=True):
        assert gp.abs().max() > 0, f"no gradient reaches {name}"
        assert rel_err(gc, gp) < tol, name


def test_score_normaliser_is_exercised():
    """The grid's weights make |q.z|/sqrt(r) cross 1: some rows are divided, others are not."""
    mixer = make()
    x = inputs(torch.float64)
    with torch.no_grad():
        q = mixer.q_proj(x).view(2, T, 4, 8).transpose(1, 2)
        k = mixer.k_proj(x).view(2, T, 4, 8).transpose(1, 2) / math.sqrt(8)
        ones = torch.ones(2, 4, T, 1, dtype=x.dtype)
        qz, _ = core.parallel(q, k, ones, mixer.log_decay(x))
        scores = qz[..., 0].abs() * decay_row_sums(mixer.log_decay(x), torch.arange(T)).rsqrt()
    frac = (scores > 1).double().mean().item()
    assert 0.05 < frac < 0.95, frac


def test_selective_decay_varies_per_token():
    mixer = make(selective_decay=True)
    log_decay = mixer.log_decay(inputs(torch.float64))
    assert log_decay.shape == (2, 4, T)
    assert log_decay.std(-1).min() > 1e-3


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 12, 13, 64])
@pytest.mark.parametrize("decay", ["paper", "selective"])
def test_chunk_sizes_and_partial_last_chunk(chunk_size, decay):
    mixer = make(chunk_size=chunk_size, **DECAYS[decay])
    x = inputs(torch.float64, length=T)
    y_par, s_par = run(mixer, x, "parallel")
    y_chk, s_chk = run(mixer, x, "chunkwise")
    assert rel_err(y_chk, y_par) < 1e-13
    for key in ("kv", "z", "r"):
        if s_par[key] is not None:
            assert rel_err(s_chk[key], s_par[key]) < 1e-13, key


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_continuation_from_state(mode, decay):
    """A prompt, single tokens, then a multi-token piece: the same as one pass, with a state of constant size."""
    mixer = make(**DECAYS[decay])
    x = inputs(torch.float64, length=20)
    full, _ = run(mixer, x, "parallel")
    pieces, state, shapes = [], None, set()
    for lo, hi in [(0, 6), (6, 7), (7, 8), (8, 17), (17, 20)]:
        y, state = run(mixer, x[:, lo:hi], mode, state)
        pieces.append(y)
        shapes.add(tuple((k, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)))
        assert state["offset"] == hi
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-12
    assert len(shapes) == 1, "the state grew with the sequence"


def test_state_independent_of_the_mode_that_wrote_it():
    """Prefill chunkwise, continue in another mode: states are interchangeable."""
    mixer = make(selective_decay=True)
    x = inputs(torch.float64, length=16)
    full, _ = run(mixer, x, "parallel")
    y1, state = run(mixer, x[:, :9], "chunkwise")
    y2, _ = run(mixer, x[:, 9:], "recurrent", state)
    assert rel_err(torch.cat((y1, y2), 1), full) < 1e-12


def test_continued_call_forms():
    mixer = make(mode="parallel")
    assert [mixer.form(9, False), mixer.form(1, True), mixer.form(9, True)] == ["parallel", "recurrent", "chunkwise"]
    mixer.config.mode = "recurrent"
    assert mixer.form(9, True) == "recurrent"


@pytest.mark.parametrize("swish_gate", [True, False], ids=["gate", "no_gate"])
def test_fused_projections_are_the_same_function_with_the_same_parameters(swish_gate):
    """``fused_projections`` makes q, k, v and the gate one product (a speed setting): the same parameters (a
    checkpoint loads either way), and in float64 the same outputs, states and gradients in every form, a prompt then
    single tokens included (a single token takes the four products, which copy no weights)."""
    plain = make(swish_gate=swish_gate)
    fused = make(swish_gate=swish_gate, fused_projections=True)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict())
    x = inputs(torch.float64, length=20)
    for mode in ("parallel", "chunkwise", "recurrent"):
        pieces = {}
        for name, mixer in (("plain", plain), ("fused", fused)):
            mixer.zero_grad()
            y, state = run(mixer, x[:, :17], mode)
            y_next, _ = run(mixer, x[:, 17:18], mode, state)
            (y.square().sum() + y_next.sum()).backward()
            grads = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
            pieces[name] = (y, y_next, state["kv"], grads)
        (y, y_next, kv, grads), (y_f, y_next_f, kv_f, grads_f) = pieces["plain"], pieces["fused"]
        assert rel_err(y_f, y) < 1e-13 and rel_err(y_next_f, y_next) < 1e-13 and rel_err(kv_f, kv) < 1e-13, mode
        assert grads_f.keys() == grads.keys() and all(rel_err(grads_f[n], grads[n]) < 1e-12 for n in grads), mode


def test_shared_input_projections_sum_their_input_gradients_in_place():
    """Several bias-free projections of one input (RetNet's q, k, v and gate; linear attention's q, k, v): the same
    outputs and gradients as separate Linears, with the input gradient made by products that add into one another
    (``addmm_``) instead of one gradient per projection summed afterwards; under autocast the products run in its
    dtype and the weights' gradients come back in theirs; one graph under compile."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from arch_zoo.layers import shared_input_projections

    torch.manual_seed(0)
    projs = [torch.nn.Linear(16, n, bias=False).double() for n in (16, 16, 32, 32)]
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    grads_out = [torch.randn(2, 5, p.out_features, dtype=torch.float64) for p in projs]

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    results = {}
    for name in ("separate", "shared"):
        x.grad = None
        for p in projs:
            p.weight.grad = None
        outs = [p(x) for p in projs] if name == "separate" else shared_input_projections(x, projs)
        with Ops() as ops:
            torch.autograd.backward(outs, grads_out)
        results[name] = (outs, x.grad, [p.weight.grad for p in projs], ops.names)
    (o_s, dx_s, dw_s, ops_s), (o, dx, dw, ops) = results["separate"], results["shared"]
    assert all(rel_err(a, b) < 1e-15 for a, b in zip(o, o_s))
    assert rel_err(dx, dx_s) < 1e-14 and all(rel_err(a, b) < 1e-14 for a, b in zip(dw, dw_s))
    # separately, autograd sums one input gradient per projection; shared, one operator makes the sum
    assert ops_s.count("aten.add.Tensor") == 3 and "arch_zoo.summed_input_grad.default" not in ops_s
    assert ops.count("arch_zoo.summed_input_grad.default") == 1 and "aten.add.Tensor" not in ops, ops
    rows = [g.reshape(10, -1) for g in grads_out]
    weights = [p.weight.detach() for p in projs]
    torch.library.opcheck(torch.ops.arch_zoo.summed_input_grad.default, (rows, weights))
    # a projection with a bias takes the Linears themselves
    biased = [torch.nn.Linear(16, 8).double(), torch.nn.Linear(16, 8, bias=False).double()]
    assert all(torch.equal(a, p(x)) for a, p in zip(shared_input_projections(x, biased), biased))
    # autocast: products in bf16, weight gradients in float32; one graph when compiled
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa = torch.randn(2, 5, 16, requires_grad=True)
        fp32 = [torch.nn.Linear(16, 8, bias=False) for _ in range(3)]
        outs = shared_input_projections(xa, fp32)
    assert [o.dtype for o in outs] == [torch.bfloat16] * 3
    sum(o.float().sum() for o in outs).backward()
    assert xa.grad.dtype == torch.float32 and fp32[0].weight.grad.dtype == torch.float32
    compiled = torch.compile(
        lambda x: sum(o.sum() for o in shared_input_projections(x, projs)), fullgraph=True, backend="aot_eager"
    )
    x.grad = None
    compiled(x).backward()
    assert rel_err(x.grad, sum(p.weight.sum(0) for p in projs).expand_as(x)) < 1e-14  # d(sum of outputs) / dx


def test_float32_long_sequence():
    """Closed-form normalisers keep float32 exact well beyond toy lengths (chunk 64, partial last chunk)."""
    mixer = make(torch.float32, chunk_size=64)
    x = inputs(torch.float32, batch=1, length=300)
    with torch.no_grad():
        y_par, _ = run(mixer, x, "parallel")
        y_chk, _ = run(mixer, x, "chunkwise")
        y_rec, _ = run(mixer, x[:, :80], "recurrent")
    assert rel_err(y_chk, y_par) < 1e-5
    assert rel_err(y_rec, y_par[:, :80]) < 1e-5


@pytest.mark.parametrize("per_token", [False, True])
def test_cores_agree_with_initial_state(per_token):
    """The cores alone (the interface fast kernels implement): outputs and final states, from a given state."""
    g = torch.Generator().manual_seed(0)
    B, H, L, dk, dv = 2, 3, 11, 4, 5
    q, k = (torch.randn(B, H, L, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, L, dv, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, dk, dv, generator=g, dtype=torch.float64)
    a = (
        -torch.rand(B, H, L, generator=g, dtype=torch.float64)
        if per_token
        else torch.tensor([-0.1, -0.01, 0.0]).double()
    )
    ref_o, ref_s = core.recurrent(q, k, v, a, s0)
    # independent check of the recurrence itself: the explicit sum over the decayed history
    gamma = a.exp() if per_token else a.exp()[None, :, None].expand(B, H, L)
    n = 7
    decays = torch.stack([gamma[:, :, m + 1 : n + 1].prod(-1) for m in range(n + 1)], -1)
    direct = torch.einsum("bhd,bhmd,bhm,bhme->bhe", q[:, :, n], k[:, :, : n + 1], decays, v[:, :, : n + 1])
    direct = direct + gamma[:, :, : n + 1].prod(-1)[..., None] * (q[:, :, n, None, :] @ s0).squeeze(-2)
    assert rel_err(ref_o[:, :, n], direct) < 1e-13
    for form in (core.parallel, lambda *args: core.chunkwise(*args, chunk_size=3)):
        o, s = form(q, k, v, a, s0)
        assert rel_err(o, ref_o) < 1e-13 and rel_err(s, ref_s) < 1e-13


def test_decay_row_sums_closed_form():
    log_decay = torch.log(torch.tensor([1 - 1 / 32, 1 - 1 / 512, 1.0], dtype=torch.float64))
    positions = torch.arange(40, 60)
    direct = torch.stack([(log_decay.exp()[:, None] ** torch.arange(p + 1)).sum(-1) for p in positions], 1)
    assert rel_err(decay_row_sums(log_decay, positions), direct) < 1e-14


def test_gate_reallocation_keeps_size():
    """Paper Table 6 "-swish gate": the gate's weights go to wider values, so the mixer's size stays equal."""
    for d_model, head_dim in [(64, 16), (1024, 256)]:
        counts = {}
        for key, switches in [("gate", {}), ("value", {"swish_gate": False}), ("none", OTHERS["no_gate_no_realloc"])]:
            mixer = RetNet(d_model, RetNetConfig(name="retnet", head_dim=head_dim, **switches))
            counts[key] = sum(p.numel() for p in mixer.parameters())
        assert counts["value"] == counts["gate"] == 8 * d_model**2
        assert counts["none"] == 6 * d_model**2


def test_paper_head_dim_ablation_shapes():
    """Table 6 "reduce head dimension": d = 1024, head dim 256 -> 64 gives 16 heads, value heads 128."""
    for head_dim, heads, value in [(256, 4, 512), (64, 16, 128)]:
        mixer = RetNet(1024, RetNetConfig(name="retnet", head_dim=head_dim))
        assert (mixer.n_heads, mixer.key_dim, mixer.value_dim) == (heads, head_dim, value)


def test_decay_schedules():
    mixer = RetNet(1024, RetNetConfig(name="retnet"))  # the paper's: 1 - 1/32 ... 1 - 1/512 over 4 heads
    one_minus = 1 / (1 - mixer.log_decay(torch.zeros(1, 1, 1024, dtype=torch.float64)).exp())
    torch.testing.assert_close(one_minus, torch.tensor([32, 32 * 16 ** (1 / 3), 32 * 16 ** (2 / 3), 512.0]).double())
    mixer = RetNet(1024, RetNetConfig(name="retnet", multiscale_decay=False))
    assert torch.allclose(mixer.log_decay(torch.zeros(1, 1, 1024)).exp(), torch.tensor(127 / 128))


def test_trained_decays_are_parameters_without_weight_decay():
    mixer = make(learnable_decay=True)
    assert mixer.decay_logit._optim == {"weight_decay": 0.0}
    fresh = RetNet(D_MODEL, RetNetConfig(name="retnet", head_dim=HEAD_DIM, learnable_decay=True))
    torch.testing.assert_close(F.logsigmoid(fresh.decay_logit).double(), fresh._initial_log_decay(), rtol=1e-6, atol=0)
    selective = RetNet(D_MODEL, RetNetConfig(name="retnet", head_dim=HEAD_DIM, selective_decay=True))
    assert selective.decay_proj.bias._optim == {"weight_decay": 0.0}


@pytest.mark.parametrize("score_norm", [True, False])
@pytest.mark.parametrize("selective", [True, False])
def test_state_size_is_constant_and_counts_the_state(score_norm, selective):
    mixer = make(score_norm=score_norm, selective_decay=selective)
    sizes = {mixer.state_size(n) for n in (1, 100, 10_000)}
    assert len(sizes) == 1
    _, state = mixer(inputs(torch.float64, batch=1))
    held = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))  # the position is a tensor too
    assert held == sizes.pop()


def test_kernel_field():
    x = inputs(torch.float64)
    y_auto, _ = make(kernel="auto")(x)
    y_torch, _ = make(kernel="torch")(x)
    assert torch.equal(y_auto, y_torch)
    with pytest.raises(ConfigError, match="kernel"):
        make(kernel="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):  # the Triton kernels run on GPUs only
        make(kernel="triton")(x)


@pytest.mark.parametrize(
    ("switches", "d_model", "message"),
    [
        ({"head_dim": 12}, 32, "not divisible by head_dim=12"),
        ({"head_dim": 0}, 32, "head_dim"),
        ({"head_dim": 1}, 32, "must be even"),
        ({"value_factor": 1.3}, 32, "whole number"),
        ({"swish_gate": False, "head_dim": 2, "value_factor": 0.5}, 32, "x1.5 without the gate"),
        ({"mode": "fft"}, 32, "mode"),
        ({"chunk_size": 0}, 32, "chunk_size"),
        ({"decay_schedule": "xpos"}, 32, "decay_schedule"),
        ({"group_norm_kind": "batchnorm"}, 32, "group_norm_kind"),
        ({"group_norm_eps": -1.0}, 32, "group_norm_eps"),
        ({"state_dtype": "float8"}, 32, "state_dtype='float8' is not one of auto, bfloat16, float16"),
        ({"learnable_decay": True, "decay": False}, 32, "needs decay=true"),
        ({"selective_decay": True, "learnable_decay": True}, 32, "choose one"),
        ({"single_scale_gamma": 1.5}, 32, "single_scale_gamma"),
        ({"learnable_decay": True, "multiscale_decay": False, "single_scale_gamma": 1.0}, 32, "gamma < 1"),
    ],
)
def test_config_errors(switches, d_model, message):
    with pytest.raises(ConfigError, match=message):
        RetNet(d_model, RetNetConfig(name="retnet", **{"head_dim": HEAD_DIM, **switches}))


def test_defaults_are_the_paper_and_small_builds():
    c = RetNetConfig()
    assert (c.key_head_dim(1024), c.value_factor, c.swish_gate, c.group_norm, c.decay_schedule) == (
        256,
        2.0,
        True,
        True,
        "paper",
    )
    RetNetConfig.small().check(64)
    RetNetConfig().check(128)  # the defaults scale down: 4 heads of 32 at the quick start's width
    with pytest.raises(ConfigError, match="divisor of 66"):
        RetNetConfig().check(66)
    with pytest.raises(ConfigError, match="divisor of 64"):
        RetNetConfig(head_dim=256).check(64)


def test_greedy_decoding_recurrent_matches_parallel_rerun():
    """generate() steps the recurrent form with a state of constant size; the tokens equal those of re-running the
    parallel form over the growing prefix."""
    torch.manual_seed(0)
    mixer = dataclasses.replace(RetNetConfig.small(), name="retnet", mode="parallel")
    model = LanguageModel(ModelConfig(vocab_size=50, d_model=64, n_layers=2, mixer=mixer)).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # a sharper model than at init, so greedy choices are decisive
            p.add_(torch.randn_like(p) * 0.05)
    prompt = torch.randint(0, 50, (2, 5))
    generated = model.generate(prompt, max_new_tokens=12)
    seq = prompt
    for _ in range(12):
        logits, _ = model(seq)
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(generated, seq)
    assert len({model.state_size(n) for n in (5, 17, 10_000)}) == 1
    calls = []
    for block in model.blocks:
        block.mixer.register_forward_hook(
            lambda m, args, out: calls.append(m.form(args[0].shape[1], _continued(args[1])))
        )
    model.generate(prompt, max_new_tokens=3)
    assert calls == ["parallel"] * 2 + ["recurrent"] * 4


@pytest.mark.parametrize(
    "switches", [{}, {"selective_decay": True}, {"group_norm": False}], ids=["paper", "sel", "nogn"]
)
def test_bfloat16_keeps_the_decay(switches):
    """Half inputs run the core in float32 (gamma = 1 - 1/512 is 1 in bfloat16): close to float32, modes agree."""
    mixer = make(torch.float32, **switches)
    x = inputs(torch.float32)
    reference, _ = run(mixer, x, "parallel")
    mixer = mixer.to(torch.bfloat16)
    outs = {}
    for mode in ("parallel", "chunkwise", "recurrent"):
        outs[mode], state = run(mixer, x.bfloat16(), mode)
        assert outs[mode].dtype == torch.bfloat16 and state["kv"].dtype == torch.float32
        assert rel_err(outs[mode].float(), reference) < 3e-2, mode
    assert rel_err(outs["chunkwise"].float(), outs["parallel"].float()) < 1e-2


def test_kernel_adapter_matches_the_reference_cores():
    """The adapter to the kernels' layout (transposed views, the score normaliser's odd value column split off and
    padded) computes the same core; run here through the kernels package's PyTorch backend."""
    from arch_zoo.kernels import dispatch

    torch.manual_seed(0)
    B, H, T, dk, dv = 2, 3, 37, 16, 33  # 33 = 32 values + the ones column
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for d in (dk, dk, dv))
    log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64)))
    s0 = torch.randn(B, H, dk, dv, dtype=torch.float64)
    want_o, want_s = core.parallel(q, k, v, log_decay, s0)
    got_o, got_s = dispatch.on_kernels(q, k, v, log_decay, "torch", s0)
    torch.testing.assert_close(got_o, want_o)
    torch.testing.assert_close(got_s, want_s)
    with pytest.raises(ValueError, match="selective or learnable decay needs kernel=fla or kernel=torch"):
        dispatch.decayed_linear_attention(q, k, v, log_decay.view(1, H, 1).expand(B, H, T), backend="triton")


def test_auto_kernel_is_pytorch_on_the_cpu_and_trained_decay_refuses_fast_kernels():
    from arch_zoo.kernels.dispatch import choose_backend

    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu, form="parallel") == "torch"
    assert choose_backend("auto", cpu, form="chunkwise", trained_decay=True) == "torch"
    with pytest.raises(ValueError, match="no gradient to it"):
        choose_backend("triton", cpu, trained_decay=True)
    with pytest.raises(ConfigError, match="retnet: kernel=triton takes a fixed decay per head"):
        make(selective_decay=True, kernel="triton")(inputs(torch.float64))


DECODE_SWITCHES = [{}, {"score_norm": False}, {"decay": False}, {"decay_norm": False, "xpos": False}]


@pytest.mark.parametrize("owned", [False, True], ids=["functional", "in_place"])
@pytest.mark.parametrize("switches", DECODE_SWITCHES, ids=["paper", "noscore", "nodecay", "plain"])
def test_decode_steps_match_the_parallel_form(switches, owned):
    """Without autograd a one-token call takes the fused step: the same function as the parallel form. A state the
    caller owns (allocated, then the prompt) is updated in place (same tensors, position included); otherwise the
    input state is left alone."""
    mixer = make(**switches)
    x = inputs(torch.float64, length=12)
    full, _ = run(mixer, x, "parallel")
    with torch.no_grad():
        start = mixer.allocate_state(2, 12, x.device, x.dtype) if owned else None
        y, state = run(mixer, x[:, :5], "chunkwise", start)
        pieces = [y]
        for t in range(5, 12):
            before = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
            y, new = run(mixer, x[:, t : t + 1], "chunkwise", state)
            pieces.append(y)
            assert int(new["offset"]) == t + 1
            for key, value in before.items():
                same = new[key] is state[key]
                assert same == owned, key
                if not owned:
                    assert torch.equal(state[key], value), f"{key} of the input state changed"
            state = new
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-12


@pytest.mark.parametrize("state_dtype,bound", [("bfloat16", 3e-2), ("float16", 4e-3)])
def test_half_precision_state_stays_close_to_float32(state_dtype, bound):
    """``state_dtype`` keeps S in half precision between calls (half a decoding step's state traffic): the stored
    state has that dtype, and 200 steps then a chunk continuing from it stay within the dtype's rounding of the
    float32-state outputs (measured: 1.0e-2 / 1.7e-2 for bfloat16, 1.2e-3 / 1.3e-3 for float16)."""
    x = inputs(torch.float32, length=240)
    outputs = {}
    for dtype in ("auto", state_dtype):
        mixer = make(torch.float32, state_dtype=dtype)
        with torch.no_grad():
            _, state = run(mixer, x[:, :40], "chunkwise", mixer.allocate_state(x.shape[0], 240, x.device, x.dtype))
            steps = []
            for t in range(40, 240):
                y, state = run(mixer, x[:, t : t + 1], "chunkwise", state)
                steps.append(y)
            chunk, state = run(mixer, x[:, :5], "chunkwise", state)
        outputs[dtype] = torch.cat(steps, dim=1), chunk, state["kv"].dtype
    assert outputs[state_dtype][2] == getattr(torch, state_dtype) and outputs["auto"][2] == torch.float32
    assert rel_err(outputs[state_dtype][0], outputs["auto"][0]) < bound
    assert rel_err(outputs[state_dtype][1], outputs["auto"][1]) < bound


def test_half_state_warns_when_it_cannot_hold_a_decay():
    """bfloat16 (epsilon 2^-7) cannot hold the paper schedule's slow decays (1 - gamma down to 1/512); float16
    (2^-10) can, but not the torchscale schedule's slowest two of 8 heads (1 - gamma = 2^-11, 2^-12)."""
    with pytest.warns(UserWarning, match=r"state_dtype=bfloat16 cannot represent the decay of heads \[.*3\]"):
        make(torch.float32, state_dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(torch.float32, state_dtype="float16")
        make(torch.float32, state_dtype="auto", decay_schedule="torchscale", head_dim=4)
    with pytest.warns(UserWarning, match=r"float16 cannot represent the decay of heads \[6, 7\]"):
        make(torch.float32, state_dtype="float16", decay_schedule="torchscale", head_dim=4)


def test_decode_position_is_a_device_tensor():
    """The position lives in the state as a 0-d tensor, so a captured decoding step reads it instead of freezing it;
    an allocated state stays owned (dense, updated in place) after the prompt."""
    mixer = make()
    x = inputs(torch.float64, length=3)
    with torch.no_grad():
        _, state = run(mixer, x, "parallel")
        assert isinstance(state["offset"], torch.Tensor) and state["offset"].dim() == 0
        _, owned = run(mixer, x, "parallel", mixer.allocate_state(x.shape[0], 8, x.device, x.dtype))
        assert owned["in_place"] and all(v.is_contiguous() for v in owned.values() if isinstance(v, torch.Tensor))
        assert rel_err(owned["kv"], state["kv"]) < 1e-13 and int(owned["offset"]) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_step_replays_in_a_cuda_graph(dtype):
    """A whole model's RetNet decoding step captured once replays at every later position: the logits equal those of
    eager steps from the same prompt."""
    torch.manual_seed(0)
    mixer = dataclasses.replace(RetNetConfig(), name="retnet", head_dim=64)
    model = LanguageModel(ModelConfig(vocab_size=128, d_model=256, n_layers=3, mixer=mixer)).cuda().to(dtype).eval()
    prompt = torch.randint(0, 128, (4, 37), device="cuda")
    steps = torch.randint(0, 128, (4, 6), device="cuda")
    with torch.no_grad():
        _, eager_states = model(prompt, return_states=True)
        eager = []
        for t in range(steps.shape[1]):
            logits, eager_states = model(steps[:, t : t + 1], eager_states, return_states=True)
            eager.append(logits[:, -1].float())
        _, states = model(prompt, model.allocate_states(4, 64), return_states=True)
        token = steps[:, :1].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (Triton compiles) on the graph's position, then rewind it
            model(token, states, return_states=True)
        torch.cuda.current_stream().wait_stream(side)
        _, states = model(prompt, model.allocate_states(4, 64), return_states=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured, _ = model(token, states, return_states=True)
        _, fresh = model(prompt, return_states=True)  # capture ran nothing: restart from the prompt's state
        for (dst, _), (src, _) in zip(states, fresh):
            for key in ("kv", "z", "offset"):
                dst[key].copy_(src[key])
        for t in range(steps.shape[1]):
            token.copy_(steps[:, t : t + 1])
            graph.replay()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert rel_err(captured[:, -1].float(), eager[t]) < tol, t


@pytest.mark.gpu
@pytest.mark.parametrize("switches", [{"selective_decay": True}, {"learnable_decay": True}], ids=["sel", "learn"])
def test_fla_core_for_trained_decays_matches_the_pytorch_core(switches):
    """kernel=fla runs a selective or learnable decay through fla's per-token g: outputs and gradients (the decay's
    included) as the PyTorch core's, in float32."""
    pytest.importorskip("fla.ops.simple_gla")
    results = {}
    for kernel in ("torch", "fla"):
        mixer = make(torch.float32, head_dim=16, kernel=kernel, **switches).cuda()
        x = inputs(torch.float32, length=300).cuda().requires_grad_(True)
        y, _ = mixer(x, return_state=False)
        try:
            y.pow(2).mean().backward()
        except RuntimeError as error:  # fla refuses its gated backward on Hopper with Triton 3.4-3.7.0 (fla #640)
            if "Hopper" not in str(error):
                raise
            pytest.skip(f"fla: {str(error).splitlines()[0]}")
        results[kernel] = (y, x.grad, mixer.q_proj.weight.grad, *decay_grads(mixer))
    for got, want in zip(results["fla"], results["torch"]):
        assert torch.isfinite(got).all() and rel_err(got, want) < 1e-3


@pytest.mark.gpu
def test_triton_core_under_autocast_matches_the_pytorch_core():
    """bf16 autocast over float32 weights (the GPU trainer's precision): the Triton core gives the PyTorch core's
    outputs and gradients within bf16 accuracy."""
    torch.manual_seed(0)
    results = {}
    for kernel in ("torch", "triton"):
        mixer = make(torch.float32, head_dim=16, kernel=kernel).cuda()
        x = inputs(torch.float32, length=300).cuda().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = mixer(x, return_state=False)
        y.float().pow(2).mean().backward()
        results[kernel] = (y.float(), x.grad, mixer.q_proj.weight.grad)
    for got, want in zip(results["triton"], results["torch"]):
        assert torch.isfinite(got).all() and rel_err(got, want) < 3e-2


ADAPTER_SWITCHES = {
    "paper": {},
    "nodn": {"decay_norm": False},
    "nosn": {"score_norm": False},
    "selective": {"selective_decay": True},
    "learnable": {"learnable_decay": True},
}


def decay_grads(mixer: RetNet) -> list[torch.Tensor]:
    return [p.grad.clone() for n, p in mixer.named_parameters() if n.startswith("decay_") and p.grad is not None]


@pytest.mark.parametrize("switches", ADAPTER_SWITCHES.values(), ids=ADAPTER_SWITCHES.keys())
def test_mixer_through_the_kernel_adapter_matches_the_pytorch_core(switches, monkeypatch):
    """The path a fast kernel takes inside the mixer (the key-sum read in its own gradient-free call, the state
    carried across calls; a selective or learnable decay handed over per token, as fla takes it) gives the PyTorch
    core's outputs, gradients (the decay's included) and states; run through the kernels package's PyTorch backend."""
    from arch_zoo.kernels import dispatch
    from arch_zoo.kernels.reference import retention_parallel_reference

    def kernels_in_float64(q, k, v, log_gamma, scale, initial_state, output_final_state, recompute_states=False):
        return retention_parallel_reference(q, k, v, log_gamma, scale, initial_state, output_final_state)

    def key_sum_in_float64(q, k, log_gamma, initial_state, output_final_state):  # the core on a column of ones
        z0 = None if initial_state is None else initial_state[..., None]
        ones = q.new_ones(*q.shape[:3], 1)
        s, z = retention_parallel_reference(q, k, ones, log_gamma, 1.0, z0, output_final_state)
        return s[..., 0].transpose(1, 2), None if z is None else z[..., 0]

    mixer = make(**switches)
    x = inputs(torch.float64, length=19).requires_grad_(True)
    results = {}
    for path in ("torch", "adapter"):
        if path == "adapter":  # the mixer and the dispatch take the Triton path, which a float64 stand-in computes
            monkeypatch.setattr(dispatch, "choose_backend", lambda *a, **kw: "triton")
            monkeypatch.setattr(dispatch, "_triton_chunkwise", kernels_in_float64)
            monkeypatch.setattr(dispatch, "_triton_key_sum", key_sum_in_float64)
        x.grad = None
        mixer.zero_grad()
        y1, state = run(mixer, x[:, :11], "chunkwise")
        y2, state = run(mixer, x[:, 11:], "chunkwise", state)
        y = torch.cat((y1, y2), 1)
        y.pow(2).sum().backward()
        results[path] = (y.detach(), x.grad.clone(), mixer.q_proj.weight.grad.clone(), state, decay_grads(mixer))
    (y_t, gx_t, gq_t, s_t, gd_t), (y_a, gx_a, gq_a, s_a, gd_a) = results["torch"], results["adapter"]
    assert rel_err(y_a, y_t) < 1e-12 and rel_err(gx_a, gx_t) < 1e-12 and rel_err(gq_a, gq_t) < 1e-12
    trained = switches.get("selective_decay") or switches.get("learnable_decay")
    assert len(gd_a) == len(gd_t) == (2 if switches.get("selective_decay") else 1 if trained else 0)
    assert all(rel_err(a, t) < 1e-10 for a, t in zip(gd_a, gd_t))
    for key in ("kv", "z", "r"):
        if s_t.get(key) is not None:
            assert rel_err(s_a[key], s_t[key]) < 1e-12, key


def test_fla_takes_a_trained_decay_per_token(monkeypatch):
    """kernel=fla with a selective decay: what reaches fla's ``chunk_simple_gla`` is its documented call (q, k, v
    [B, T, H, D], g [B, T, H] float32 contiguous, the state [B, H, K, V]); here a stand-in with that signature
    computes it on the CPU, and the mixer matches its PyTorch core, gradients included. fla itself runs only on a
    GPU (``test_fla_core_for_trained_decays_matches_the_pytorch_core``)."""
    import arch_zoo.kernels.dispatch as dispatch
    from arch_zoo.kernels.reference import retention_parallel_reference

    calls = []

    def chunk_simple_gla(q, k, v, *, g, scale, initial_state, output_final_state):
        assert g.shape == q.shape[:3] and g.dtype == torch.float32 and g.is_contiguous()
        assert initial_state is None or initial_state.shape == (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        calls.append(g.shape)
        return retention_parallel_reference(q, k, v, g, scale, initial_state, output_final_state)

    choose = dispatch.choose_backend
    monkeypatch.setattr(
        dispatch, "choose_backend", lambda backend, *a, **kw: "fla" if backend == "fla" else choose(backend, *a, **kw)
    )
    monkeypatch.setattr(dispatch, "_fla", lambda name: chunk_simple_gla)
    results = {}
    for kernel in ("torch", "fla"):
        mixer = make(selective_decay=True, kernel=kernel)
        x = inputs(torch.float64, length=19).requires_grad_(True)
        y1, state = run(mixer, x[:, :11], "chunkwise")
        y2, _ = run(mixer, x[:, 11:], "chunkwise", state)
        torch.cat((y1, y2), 1).pow(2).sum().backward()
        results[kernel] = (torch.cat((y1, y2), 1).detach(), x.grad, *decay_grads(mixer))
    assert calls, "the fla path was not taken"
    for got, want in zip(results["fla"], results["torch"]):
        assert rel_err(got, want) < 1e-6  # fla takes g in float32: the float64 decay is rounded on the way


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_gated_head_norm_is_the_gate_times_the_norm_with_every_gradient(kind):
    """The output stage in one function (``HeadNorm.gated``): ``silu(gate) * (norm(o * scale) * w + b)`` with the heads
    side by side, against autograd of that formula in float64, for o, the row scale, the gate, w and b; and it keeps
    for the backward pass only its inputs and the per-row norm (not the normalised heads)."""
    from arch_zoo.mixers.retnet import HeadNorm

    torch.manual_seed(0)
    B, H, T, dv = 2, 3, 10, 16
    norm = HeadNorm(H, dv, kind, 1e-6, affine=True).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if norm.bias is not None:
            norm.bias.normal_()
    o = (torch.randn(B, H, T, dv, dtype=torch.float64) * 3 + 1).requires_grad_()
    scale = (torch.rand(B, H, T, 1, dtype=torch.float64) + 0.1).requires_grad_()
    gate = torch.randn(B, T, H * dv, dtype=torch.float64, requires_grad=True)
    leaves = [o, scale, gate] + [p for p in norm.parameters()]

    def formula(o, scale, gate):
        x = o * scale
        x = x - x.mean(-1, keepdim=True) if kind == "layernorm" else x
        z = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
        z = z + norm.bias if norm.bias is not None else z
        return F.silu(gate) * z.transpose(1, 2).reshape(B, T, H * dv)

    d_out = torch.randn(B, T, H * dv, dtype=torch.float64)
    torch.testing.assert_close(norm.gated(o, scale, gate), formula(o, scale, gate))
    got = torch.autograd.grad(norm.gated(o, scale, gate), leaves, d_out)
    want = torch.autograd.grad(formula(o, scale, gate), leaves, d_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    small = [x[:1, :2, :3].detach().clone().requires_grad_() for x in (o, scale)] + [
        gate[:1, :3, : 2 * dv].detach().clone().requires_grad_()
    ]
    two_heads = HeadNorm(2, dv, kind, 1e-6, affine=True).double()
    assert torch.autograd.gradcheck(lambda o, s, g: two_heads.gated(o, s, g), small)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        norm.gated(o, scale, gate)
    assert max(sizes) == o.numel() and sizes.count(o.numel()) == 2  # o and the gate; the heads are recomputed


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_head_norm_gradients_match_the_formula_and_keep_only_the_half_input(kind):
    """The head norm's own backward against autograd of the plain formula (float64, exact), then at bfloat16: close
    to the float64 gradient, with only the bf16 input and the per-row scale kept for the backward pass."""
    from arch_zoo.mixers.retnet import HeadNorm

    norm = HeadNorm(3, 32, kind, 1e-6, affine=False)

    def formula(o):
        x = o - o.mean(-1, keepdim=True) if kind == "layernorm" else o
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    torch.manual_seed(0)
    o = (torch.randn(2, 3, 10, 32, dtype=torch.float64) * 3 + 1).requires_grad_()
    dy = torch.randn(2, 3, 10, 32, dtype=torch.float64)
    (got,) = torch.autograd.grad(norm(o), o, dy)
    (want,) = torch.autograd.grad(formula(o), o, dy)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda x: norm(x), (o[:1, :1, :4, :8].detach().clone().requires_grad_(),))
    # with the normalisers' row scale taken inside: the norm of o * scale, whose gradient reaches a trained scale
    scale = (torch.rand(2, 3, 10, 1, dtype=torch.float64) + 0.1).requires_grad_()
    scaled = torch.autograd.grad(norm(o, scale), (o, scale), dy)
    scaled_want = torch.autograd.grad(formula(o * scale), (o, scale), dy)
    for a, b in zip(scaled, scaled_want):
        torch.testing.assert_close(a, b)
    small = (o[:1, :1, :4, :8].detach().clone().requires_grad_(), scale[:1, :1, :4].detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, s: norm(x, s), small)

    saved = []
    half = o.detach().bfloat16().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = norm(half)
    assert sum(t.numel() * t.element_size() for t in saved) == half.nbytes + 2 * 3 * 10 * 4  # input + fp32 scale
    (g_half,) = torch.autograd.grad(y, half, dy.bfloat16())
    assert rel_err(g_half.double(), want) < 1e-2


def _graph_breaks(device: str, length: int) -> list[str]:
    """Why ``torch.compile`` would cut a RetNet language model's loss into pieces (empty: one graph)."""
    mixer = RetNetConfig(name="retnet", head_dim=32, mode="chunkwise")
    model = LanguageModel(ModelConfig(vocab_size=97, d_model=64, n_layers=2, mixer=mixer)).to(device)
    tokens = torch.randint(97, (1, length + 1), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model.loss)(tokens[:, :-1], tokens[:, 1:])
    return [b.reason.splitlines()[0] for b in explained.break_reasons]


def test_a_retnet_language_model_compiles_to_one_graph():
    """A graph break per layer left the GPU idle between the pieces of a compiled training step (cost.md)."""
    assert _graph_breaks("cpu", 200) == []


@pytest.mark.gpu
def test_a_retnet_language_model_on_the_kernels_compiles_to_one_graph():
    """On CUDA the layer runs our kernels' operators (a split state pass at this length and batch): still one graph."""
    assert _graph_breaks("cuda", 4096) == []


def _compiled_decode(device: str, dtype: torch.dtype) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """A RetNet language model's decoding step (state owned, updated in place) under ``torch.compile``: why the
    compiler cut it (empty: one graph), and three steps' logits compiled and eager from the same prompt."""
    torch.manual_seed(0)
    mixer = RetNetConfig(name="retnet", head_dim=32)
    model = LanguageModel(ModelConfig(vocab_size=97, d_model=128, n_layers=2, mixer=mixer)).to(device, dtype).eval()
    prompt = torch.randint(97, (2, 21), device=device)
    steps = torch.randint(97, (2, 3), device=device)

    def run(step) -> torch.Tensor:
        _, states = model(prompt, model.allocate_states(2, 24), return_states=True)
        logits = []
        for t in range(steps.shape[1]):
            out, states = step(steps[:, t : t + 1], states, return_states=True)
            logits.append(out[:, -1].float())
        return torch.stack(logits)

    with torch.no_grad():
        _, states = model(prompt, model.allocate_states(2, 24), return_states=True)
        explained = torch._dynamo.explain(model)(steps[:, :1], states, return_states=True)
        torch._dynamo.reset()
        return [b.reason.splitlines()[0] for b in explained.break_reasons], run(torch.compile(model)), run(model)


def test_a_retnet_decoding_step_compiles_to_one_graph():
    """``zoo-bench decode --compile``: the step with its in-place state update is one graph, equal to the eager step."""
    breaks, compiled, eager = _compiled_decode("cpu", torch.float32)
    assert breaks == []
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_a_retnet_decoding_step_on_the_kernels_compiles_to_one_graph():
    """On CUDA the step is our step kernel's operator, which declares the state it updates: no graph break (it was one
    per layer), and the compiled steps equal the eager ones."""
    breaks, compiled, eager = _compiled_decode("cuda", torch.float32)
    assert breaks == []
    assert rel_err(compiled, eager) < 1e-4


@pytest.mark.gpu
def test_kernel_auto_takes_the_reference_where_the_kernels_tiles_do_not_fit():
    """float32 with the paper's head dims (key 256, value 512) is past the kernels' float32 tiles: kernel=auto runs
    the PyTorch core there instead of failing."""
    mixer = make(torch.float32, d_model=512, head_dim=256, kernel="auto")
    x = torch.randn(2, 200, 512, generator=torch.Generator().manual_seed(1))
    on_cpu, _ = mixer(x, return_state=False)
    on_gpu, _ = mixer.cuda()(x.cuda(), return_state=False)
    assert rel_err(on_gpu.cpu(), on_cpu) < 1e-4


def bf16_kernel_run(**switches) -> tuple[torch.Tensor, ...]:
    """A small RetNet on the kernels under bf16 autocast, forward and backward on the GPU: its output and the
    gradients of the input, the query projection and the gate."""
    mixer = make(torch.float32, head_dim=16, kernel="triton", chunk_size=64, **switches).cuda()
    x = inputs(torch.float32, length=1000).cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = mixer(x, return_state=False)
    y.float().pow(2).mean().backward()
    return y.float(), x.grad, mixer.q_proj.weight.grad, mixer.g_proj.weight.grad


@pytest.mark.gpu
def test_recomputed_block_states_give_the_kept_states_gradients():
    """``recompute_states=true`` (less training memory) changes what the kernels keep, not what they compute."""
    for got, want in zip(bf16_kernel_run(recompute_states=True), bf16_kernel_run(recompute_states=False)):
        assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5


@pytest.mark.gpu
def test_fused_projections_on_the_gpu_under_bf16_autocast():
    """One product for q, k, v and the gate (``fused_projections``) on the kernels under bf16 autocast, against four:
    the same function up to the products' bf16 rounding, in outputs and in every gradient."""
    for got, want in zip(bf16_kernel_run(fused_projections=True), bf16_kernel_run(fused_projections=False)):
        assert torch.isfinite(got).all() and rel_err(got, want) < 2e-2


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
def test_a_fixed_decay_builds_its_row_normaliser_once_per_length(learnable):
    """A small model's GPU step is host work (docs/results/packing.md): the decay-row normaliser of a fixed decay from
    position 0 depends only on the length, so it is built once, not by 16 small operators a layer every step. The
    output is the same to the bit; a learned decay (its gradient flows through it) and a new length build it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    mixer = build_mixer(RetNetConfig(n_heads=4, learnable_decay=learnable), 64)
    x = torch.randn(2, 16, 64)

    def forward(length: int) -> tuple[torch.Tensor, list[str]]:
        with Ops() as ops:
            y, _ = mixer(x[:, :length], return_state=False)
        return y, [name for name in ops.names if name.startswith("expm1")]  # decay_row_sums' own operator

    first, built = forward(16)
    again, rebuilt = forward(16)
    assert built and torch.equal(first, again)
    assert bool(rebuilt) == learnable
    assert forward(8)[1]  # another length: built for it
