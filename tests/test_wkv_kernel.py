"""RWKV-4's fused WKV kernel (``kernels/wkv_triton.py``) against ``wkv_recurrent`` in float64, and the mixer's choice
of it.

On the CPU the kernel runs in Triton's interpreter, in a fresh process (Triton decides at decoration time whether a
function is interpreted). The kernel computes in float32, so values and gradients agree with float64 to ~1e-7
relative (asserted: 1e-5); with keys spread over ~100 the exponents' own float32 rounding dominates (see
test_rwkv.py), asserted 2e-4.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from arch_zoo import ConfigError, build_mixer
from arch_zoo.kernels import dispatch
from arch_zoo.mixers.rwkv import wkv_recurrent
from tests.test_kernels import checks_in_interpreter

# (B, T, C, key scale): channels short of one block and past two (masked lanes), one token, a key spread of ~100
KERNEL_CASES = [(2, 37, 40, 1.0), (1, 50, 130, 30.0), (2, 1, 8, 1.0), (1, 300, 64, 3.0)]


def rel(a: torch.Tensor, b: torch.Tensor | None) -> float:
    """Relative error (absolute where the reference is zero or was never made: w gets none from one token)."""
    b = torch.zeros_like(a, dtype=torch.float64) if b is None else b.double()
    return ((a.double() - b).norm() / (b.norm() if b.norm() > 0 else 1)).item()


def kernel_checks() -> dict[str, float]:
    """Every interpreter comparison as name -> relative error (run with TRITON_INTERPRET=1)."""
    import triton

    from arch_zoo.kernels import wkv_triton as wt

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 did not take effect"
    results = {}
    for B, T, C, spread in KERNEL_CASES:
        name = f"B{B}_T{T}_C{C}_k{spread:g}"
        g = torch.Generator().manual_seed(T + C)
        w = -torch.exp(torch.randn(C, generator=g, dtype=torch.float64) * 2)
        u = torch.randn(C, generator=g, dtype=torch.float64)
        k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * spread
        v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
        dy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
        leaves = [x.float().requires_grad_() for x in (w, u, k, v)]
        y, none = wt.wkv_triton(*leaves, output_final_state=False)
        torch.autograd.backward(y, dy.float())
        ref = [x.clone().requires_grad_() for x in (w, u, k, v)]
        y_ref, (a_ref, b_ref, p_ref) = wkv_recurrent(*ref)
        torch.autograd.backward(y_ref, dy)
        results[f"{name}/y"] = rel(y, y_ref)
        results[f"{name}/no_final_state"] = float(none is not None)
        for n, leaf, r in zip("wukv", leaves, ref):
            results[f"{name}/d{n}"] = rel(leaf.grad, r.grad)
        with torch.no_grad():  # two calls through the state are one call; the final state is the reference's
            half = T // 2
            first, state = wt.wkv_triton(*leaves[:2], k[:, :half].float(), v[:, :half].float())
            second, (a, b, p) = wt.wkv_triton(*leaves[:2], k[:, half:].float(), v[:, half:].float(), state)
        results[f"{name}/continued"] = rel(torch.cat((first, second), 1), y_ref)
        results[f"{name}/final"] = max(
            rel(a.double() * p.double().exp(), a_ref * p_ref.exp()),
            rel(b.double() * p.double().exp(), b_ref * p_ref.exp()),
        )
    # the operator's registration: schema, shape function and autograd rule, as torch checks them
    k = torch.randn(2, 9, 16)
    args = (-torch.rand(16), torch.randn(16), k.requires_grad_(), torch.randn(2, 9, 16).requires_grad_(), None, False)
    torch.library.opcheck(wt._wkv_op, args)
    results["opcheck"] = 0.0
    return results


@pytest.fixture(scope="module")
def kernel_results() -> dict[str, float]:
    return checks_in_interpreter(__file__, "--kernel-checks")


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "B{}_T{}_C{}_k{:g}".format(*c))
def test_kernel_matches_the_recurrence_in_float64(kernel_results, case):
    """Values, the four gradients, a call continued from a state, and the final state."""
    B, T, C, spread = case
    name = f"B{B}_T{T}_C{C}_k{spread:g}"
    bound = 2e-4 if spread > 10 else 1e-5
    errors = {key: e for key, e in kernel_results.items() if key.startswith(name + "/")}
    assert len(errors) == 8, errors
    assert errors.pop(f"{name}/no_final_state") == 0.0
    assert all(e < bound for e in errors.values()), errors


def test_kernel_operator_passes_torch_opcheck(kernel_results):
    assert kernel_results["opcheck"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# The mixer's choice of the kernel (no kernel runs here: the dispatch is what is checked)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch) -> list[dict]:
    """Pretend the kernel is available and record its calls; it answers with the recurrent form."""
    from arch_zoo.kernels import wkv_triton

    calls = []

    def fake(w, u, k, v, state=None, output_final_state=True):
        calls.append({"state": state is not None, "final": output_final_state, "grad": torch.is_grad_enabled()})
        return wkv_recurrent(w, u, k, v, state, output_final_state)

    monkeypatch.setattr(
        dispatch, "choose_backend", lambda backend, device, **kw: "torch" if backend == "torch" else "triton"
    )
    monkeypatch.setattr(wkv_triton, "wkv_triton", fake)
    return calls


def test_auto_trains_on_the_kernel_and_keeps_states_off_it_when_they_need_gradients(kernel_calls):
    torch.manual_seed(0)
    mixer = build_mixer({"name": "rwkv", "zero_init": False}, 16)
    x = torch.randn(2, 12, 16, requires_grad=True)
    y, _ = mixer(x, return_state=False)  # a training call
    assert kernel_calls == [{"state": False, "final": False, "grad": True}]
    chunkwise = build_mixer({"name": "rwkv", "kernel": "torch"}, 16)
    chunkwise.load_state_dict(mixer.state_dict())
    torch.testing.assert_close(y, chunkwise(x, return_state=False)[0])  # what the kernel stands in for

    _, state = mixer(x, return_state=True)  # a gradient through the final state: the chunkwise form
    mixer(x, state, return_state=False)  # and through a given state
    mixer.double()(x.double(), return_state=False)  # float64: the kernel computes in float32
    assert len(kernel_calls) == 1
    with torch.no_grad():  # generation: states carry no gradient, the kernel takes them
        _, state = mixer.float()(x, return_state=True)
        mixer(x, state, return_state=True)
    assert kernel_calls[1:] == [
        {"state": False, "final": True, "grad": False},
        {"state": True, "final": True, "grad": False},
    ]


def test_kernel_triton_insists_and_the_kernel_refuses_a_gradient_through_a_state():
    from arch_zoo.kernels.wkv_triton import wkv_triton

    C = 8
    w, u = -torch.rand(C, requires_grad=True), torch.randn(C)
    k, v = torch.randn(1, 4, C), torch.randn(1, 4, C)
    with pytest.raises(ValueError, match="state=None and output_final_state=False"):
        wkv_triton(w, u, k, v, output_final_state=True)
    with pytest.raises(ValueError, match="state=None"):
        wkv_triton(w, u, k, v, (torch.zeros(1, C), torch.zeros(1, C), torch.zeros(1, C)), False)
    mixer = build_mixer({"name": "rwkv", "kernel": "triton"}, C)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*'torch' or 'auto'"):
        mixer(torch.randn(1, 4, C))
    with pytest.raises(ConfigError, match="kernel='cuda' is not one of auto, torch, triton"):
        build_mixer({"name": "rwkv", "kernel": "cuda"}, C)


def test_flops_on_the_kernel_are_the_projections(kernel_calls):
    """The kernel runs the recurrence (element-wise), so a run on it declares no chunk products."""
    on_kernel = build_mixer({"name": "rwkv"}, 16)
    chunkwise = build_mixer({"name": "rwkv", "kernel": "torch"}, 16)
    recurrent = build_mixer({"name": "rwkv", "mode": "recurrent"}, 16)
    assert on_kernel.flops_per_token(64) == recurrent.flops_per_token(64) < chunkwise.flops_per_token(64)


# ----------------------------------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_kernel_on_the_gpu_in_bf16_and_compiled():
    """A bf16 layer on the kernel against its chunkwise form (values and gradients, to bf16's rounding), eager and
    compiled; and the float32 kernel against float64 at a size with many programs."""
    from arch_zoo.kernels.wkv_triton import wkv_triton

    g = torch.Generator().manual_seed(0)
    C = 1024
    w = -torch.exp(torch.linspace(-5, 3, C, dtype=torch.float64))
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k, v, dy = (torch.randn(3, 300, C, generator=g, dtype=torch.float64) for _ in range(3))
    leaves = [x.cuda().float().requires_grad_() for x in (w, u, k, v)]
    y, _ = wkv_triton(*leaves, output_final_state=False)
    torch.autograd.backward(y, dy.cuda().float())
    ref = [x.clone().requires_grad_() for x in (w, u, k, v)]
    y_ref, _ = wkv_recurrent(*ref)
    torch.autograd.backward(y_ref, dy)
    errors = [rel(y.cpu(), y_ref)] + [rel(a.grad.cpu(), b.grad) for a, b in zip(leaves, ref)]
    assert max(errors) < 1e-5, errors

    torch.manual_seed(0)
    outputs = {}
    for name, kernel, compiled in (("kernel", "auto", False), ("compiled", "auto", True), ("torch", "torch", False)):
        torch.manual_seed(0)
        layer = build_mixer({"name": "rwkv", "zero_init": False, "kernel": kernel}, 256).cuda()
        run = torch.compile(layer) if compiled else layer
        x = torch.randn(4, 512, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        x.requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = run(x, return_state=False)
        out.float().square().mean().backward()
        outputs[name] = (out.float(), x.grad, layer.time_decay.grad, layer.time_first.grad, layer.key.weight.grad)
    for name in ("kernel", "compiled"):
        errors = [rel(a, b) for a, b in zip(outputs[name], outputs["torch"])]
        assert max(errors) < 2e-2, (name, errors)


if __name__ == "__main__" and sys.argv[1:] == ["--kernel-checks"]:
    print(json.dumps(kernel_checks()))
