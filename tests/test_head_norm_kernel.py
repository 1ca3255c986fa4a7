"""RetNet's gated head norm on its Triton kernel (``kernels/head_norm_triton.py``) against the PyTorch formula in
float64, and the mixer through it.

On the CPU the kernel runs in Triton's interpreter, in a fresh process (see ``tests/test_kernels.py``). Its
arithmetic is float32, so on float32 inputs it agrees with float64 to ~1e-7 relative (asserted: 1e-5).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.test_kernels import checks_in_interpreter

# (B, H, T, dv): RetNet's value head a power of two, one that is not (masked columns), rows that do not fill the
# last program, one token (a decoding step)
CASES = [(2, 3, 10, 32), (1, 2, 7, 24), (3, 1, 5, 48), (2, 4, 1, 16)]


def formula(o, row_scale, gate, weight, bias, eps, center):
    """``silu(gate) * (norm(o * row_scale) * weight + bias)`` with the heads side by side, and the norm's rstd, in
    float64."""
    B, H, T, dv = o.shape
    x = o.double() * (1 if row_scale is None else row_scale.double())
    x = x - x.mean(-1, keepdim=True) if center else x
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    z = x * rstd
    z = z if weight is None else z * weight.double()
    z = z if bias is None else z + bias.double()
    return F.silu(gate.double()) * z.transpose(1, 2).reshape(B, T, H * dv), rstd


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_checks() -> dict[str, float]:
    """Every interpreter comparison as name -> relative error (run with TRITON_INTERPRET=1)."""
    import triton

    from arch_zoo.kernels import head_norm_triton as hn

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 did not take effect"
    results = {}
    for B, H, T, dv in CASES:
        g = torch.Generator().manual_seed(T * dv)
        # the core's output as the mixer sees it: a head-first view of [B, T, H, dv] memory
        o = torch.randn(B, T, H, dv, generator=g).transpose(1, 2) * 3 + 1
        gate = torch.randn(B, T, H * dv, generator=g)
        weight, bias = torch.rand(H, 1, dv, generator=g) + 0.5, torch.randn(H, 1, dv, generator=g)
        scales = {
            "none": None,
            "per_row": torch.rand(B, H, T, 1, generator=g) + 0.1,
            "per_head": torch.rand(1, H, T, 1, generator=g) + 0.1,  # the decay normaliser alone: no batch dim
        }
        for scale_name, scale in scales.items():
            for center, w, b in ((False, weight, None), (True, weight, bias), (False, None, None)):
                label = f"B{B}_H{H}_T{T}_dv{dv}/{scale_name}/{'layer' if center else 'rms'}{'' if w is None else '_w'}"
                y, rstd = hn.gated_head_norm_triton(o, scale, gate, w, b, 1e-6, center)
                y_ref, rstd_ref = formula(o, scale, gate, w, b, 1e-6, center)
                results[f"{label}/y"] = rel(y, y_ref)
                results[f"{label}/rstd"] = rel(rstd, rstd_ref)
    # the operator's registration (schema, shape function), as torch checks it; and a compiled call in one graph
    o, gate = torch.randn(2, 3, 5, 16).transpose(1, 2).contiguous().transpose(1, 2), torch.randn(2, 5, 48)
    w, s = torch.rand(3, 1, 16), torch.rand(2, 3, 5, 1)
    torch.library.opcheck(hn._gated_head_norm_op, (o, s, gate, w, None, 1e-6, False))
    torch.library.opcheck(hn._gated_head_norm_op, (o, None, gate, None, None, 1e-6, True))
    results["opcheck"] = 0.0
    compiled = torch.compile(
        lambda o, s, g: hn.gated_head_norm_triton(o, s, g, w, None, 1e-6, False)[0], fullgraph=True
    )
    results["compiled"] = rel(compiled(o, s, gate), formula(o, s, gate, w, None, 1e-6, False)[0])
    results.update(mixer_checks())
    return results


def mixer_checks() -> dict[str, float]:
    """A RetNet layer with its head norm's forward on the kernel (as on CUDA) against the PyTorch formula: outputs and
    every gradient (o's, the gate's, the norm's weight, the decay's through the row scale), float32."""
    from arch_zoo.kernels import dispatch
    from tests.test_retnet import inputs, make

    results = {}
    x = inputs(torch.float32, length=37)
    affine_layernorm = {"group_norm_kind": "layernorm", "group_norm_affine": True, "learnable_decay": True}
    for name, switches in {"paper": {}, "layernorm_learnable": affine_layernorm}.items():
        got = {}
        for on_kernel in (False, True):
            dispatch.head_norm_on_kernel = lambda kernel, o, on=on_kernel: on
            torch.manual_seed(0)
            mixer = make(torch.float32, **switches)
            xi = x.clone().requires_grad_(True)
            y, _ = mixer(xi, return_state=False)
            y.pow(2).sum().backward()
            grads = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
            got[on_kernel] = (y.detach(), xi.grad, grads)
        (y0, gx0, gp0), (y1, gx1, gp1) = got[False], got[True]
        results[f"mixer/{name}/y"] = rel(y1, y0)
        results[f"mixer/{name}/x_grad"] = rel(gx1, gx0)
        assert gp0.keys() == gp1.keys()
        results[f"mixer/{name}/param_grads"] = max(rel(gp1[n], gp0[n]) for n in gp0)
        results[f"mixer/{name}/n_param_grads"] = float(len(gp1))
    return results


@pytest.fixture(scope="module")
def kernel_results() -> dict[str, float]:
    return checks_in_interpreter(__file__, "--kernel-checks")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}_T{}_dv{}".format(*c))
def test_gated_head_norm_kernel_matches_the_formula(kernel_results, case):
    prefix = "B{}_H{}_T{}_dv{}/".format(*case)
    found = {name: err for name, err in kernel_results.items() if name.startswith(prefix)}
    assert len(found) == 3 * 3 * 2, found  # three row scales x three norms x (output, rstd)
    assert all(err < 1e-5 for err in found.values()), found


def test_gated_head_norm_kernel_registers_and_compiles(kernel_results):
    assert kernel_results["opcheck"] == 0.0
    assert kernel_results["compiled"] < 1e-5


@pytest.mark.parametrize("name", ["paper", "layernorm_learnable"])
def test_retnet_with_its_head_norm_on_the_kernel_matches_the_formula(kernel_results, name):
    """The mixer's outputs and gradients (the learnable decay's through the row scale included) are those of the
    PyTorch formula: the backward reads the kernel's rstd."""
    assert kernel_results[f"mixer/{name}/y"] < 1e-5
    assert kernel_results[f"mixer/{name}/x_grad"] < 1e-5
    assert kernel_results[f"mixer/{name}/param_grads"] < 1e-4
    # q, k, v, g and out; with the affine layer norm and the learnable decay, its weight, bias and the decay too
    assert kernel_results[f"mixer/{name}/n_param_grads"] == (5 if name == "paper" else 8)


def test_the_head_norm_stays_in_pytorch_off_cuda_in_float64_and_under_kernel_torch():
    from arch_zoo.kernels import dispatch

    cpu, gpu_like = torch.zeros(1), torch.zeros(1)
    assert not dispatch.head_norm_on_kernel("auto", cpu)
    if torch.cuda.is_available():
        gpu_like = gpu_like.cuda()
        assert dispatch.head_norm_on_kernel("auto", gpu_like)
        assert dispatch.head_norm_on_kernel("triton", gpu_like.bfloat16())
        assert not dispatch.head_norm_on_kernel("torch", gpu_like)
        assert not dispatch.head_norm_on_kernel("auto", gpu_like.double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gated_head_norm_kernel_on_the_gpu_at_the_paper_head_dims():
    """bf16 at RetNet's Table 5 heads (4 of 512 values) against the formula on the same (rounded) inputs: the one
    rounding of the output to bf16."""
    from arch_zoo.kernels.head_norm_triton import gated_head_norm_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, T, dv = 2, 4, 1000, 512
    o = torch.randn(B, T, H, dv, device="cuda", generator=g).bfloat16().transpose(1, 2)
    gate = torch.randn(B, T, H * dv, device="cuda", generator=g).bfloat16()
    scale = torch.rand(B, H, T, 1, device="cuda", generator=g) + 0.1
    weight = torch.rand(H, 1, dv, device="cuda", generator=g) + 0.5
    y, rstd = gated_head_norm_triton(o, scale, gate, weight, None, 1e-6, False)
    y_ref, rstd_ref = formula(o, scale, gate, weight, None, 1e-6, False)
    assert y.dtype == torch.bfloat16 and rel(y, y_ref) < 5e-3
    assert rel(rstd, rstd_ref) < 1e-5


if __name__ == "__main__" and sys.argv[1:] == ["--kernel-checks"]:
    print(json.dumps(kernel_checks()))
