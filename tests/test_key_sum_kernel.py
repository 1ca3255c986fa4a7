"""RetNet's score-normaliser read on its own kernel (``kernels/key_sum_triton.py``) against a float64 loop, and the
mixer's use of it.

On the CPU the kernel runs in Triton's interpreter, in a fresh process (see ``tests/test_kernels.py``). It computes
in float32 with exact products for float32 inputs, so it agrees with float64 to ~1e-7 relative (asserted: 1e-5).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from arch_zoo.kernels import dispatch
from tests.test_kernels import checks_in_interpreter

# (B, T, H, K): key columns short of one part and chunks short of one, several parts and chunks, one token, a
# length that fills its chunks exactly
CASES = [(2, 37, 2, 40), (1, 150, 3, 130), (2, 1, 1, 16), (1, 128, 2, 64)]


def loop(q: torch.Tensor, k: torch.Tensor, log_gamma: torch.Tensor, z0: torch.Tensor | None):
    """``s_t = q_t . z_t``, ``z_t = gamma z_{t-1} + k_t``, token by token in float64 ([B, T, H, K] inputs)."""
    B, T, H, K = q.shape
    z = torch.zeros(B, H, K, dtype=torch.float64) if z0 is None else z0.double()
    gamma = log_gamma.double().exp()[None, :, None]
    s = []
    for t in range(T):
        z = gamma * z + k[:, t].double()
        s.append((q[:, t].double() * z).sum(-1))
    return torch.stack(s, -1), z


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_checks() -> dict[str, float]:
    """Every interpreter comparison as name -> relative error (run with TRITON_INTERPRET=1)."""
    import triton

    from arch_zoo.kernels import key_sum_triton as ks

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 did not take effect"
    results = {}
    for B, T, H, K in CASES:
        g = torch.Generator().manual_seed(T + K)
        log_gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32)))
        # head-first tensors seen through the kernels' [B, T, H, K] layout, as RetNet hands them over (strided views)
        q, k = (torch.randn(B, H, T, K, generator=g).transpose(1, 2) for _ in range(2))
        z0 = torch.randn(B, H, K, generator=g)
        name = f"B{B}_T{T}_H{H}_K{K}"
        for start in (None, z0):
            label = f"{name}/{'state' if start is not None else 'fresh'}"
            with torch.no_grad():
                s, z = ks.key_sum_triton(q, k, log_gamma, start, output_final_state=True)
                s_only, none = ks.key_sum_triton(q, k, log_gamma, start)
            s_ref, z_ref = loop(q, k, log_gamma, start)
            results[f"{label}/s"] = rel(s, s_ref)
            results[f"{label}/z"] = rel(z, z_ref)
            results[f"{label}/no_final"] = max(rel(s_only, s_ref), float(none is not None))
    # two calls through the final state are one call
    q, k = (torch.randn(2, 100, 2, 48, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    log_gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(2, dtype=torch.float32)))
    with torch.no_grad():
        first, z = ks.key_sum_triton(q[:, :70], k[:, :70], log_gamma, output_final_state=True)
        second, _ = ks.key_sum_triton(q[:, 70:], k[:, 70:], log_gamma, z)
    results["continued"] = rel(torch.cat((first, second), -1), loop(q, k, log_gamma, None)[0])
    # the operator's registration (schema, shape function), as torch checks it; and a compiled call in one graph
    lg = log_gamma.contiguous()
    torch.library.opcheck(ks._key_sum_op, (q, k, lg, None, True))
    torch.library.opcheck(ks._key_sum_op, (q, k, lg, torch.randn(2, 2, 48), False))
    results["opcheck"] = 0.0
    compiled = torch.compile(lambda q, k: ks.key_sum_triton(q, k, lg)[0], fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        results["compiled"] = rel(compiled(q, k), loop(q, k, log_gamma, None)[0])
    return results


@pytest.fixture(scope="module")
def kernel_results() -> dict[str, float]:
    return checks_in_interpreter(__file__, "--kernel-checks")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_T{}_H{}_K{}".format(*c))
@pytest.mark.parametrize("start", ["fresh", "state"])
def test_key_sum_kernel_matches_the_loop(kernel_results, case, start):
    prefix = "B{}_T{}_H{}_K{}/".format(*case) + start + "/"
    found = {name: err for name, err in kernel_results.items() if name.startswith(prefix)}
    assert len(found) == 3, found
    assert all(err < 1e-5 for err in found.values()), found


def test_key_sum_kernel_continues_from_its_final_state_registers_and_compiles(kernel_results):
    assert kernel_results["continued"] < 1e-5
    assert kernel_results["opcheck"] == 0.0
    assert kernel_results["compiled"] < 1e-5


def test_the_key_sum_read_is_the_core_on_a_column_of_ones():
    """Off the Triton kernel (here fla's route, run on the PyTorch core) the read is the core with v = 1, and the
    state comes back without its value axis."""
    torch.manual_seed(0)
    B, H, T, K = 2, 3, 21, 8
    q, k = torch.randn(B, H, T, K, dtype=torch.float64), torch.randn(B, H, T, K, dtype=torch.float64)
    log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64)))
    z0 = torch.randn(B, H, K, dtype=torch.float64)
    s, z = dispatch.key_sum_read(q, k, log_decay, "torch", initial_state=z0, output_final_state=True)
    s_ref, z_ref = loop(q.transpose(1, 2), k.transpose(1, 2), log_decay, z0)
    torch.testing.assert_close(s[..., 0], s_ref)
    torch.testing.assert_close(z, z_ref)


def test_the_key_sum_kernel_refuses_a_gradient():
    pytest.importorskip("triton")
    from arch_zoo.kernels.key_sum_triton import key_sum_triton

    q = torch.randn(1, 4, 1, 16, requires_grad=True)
    with pytest.raises(ValueError, match="no backward.*no_grad"):
        key_sum_triton(q, q, torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_key_sum_kernel_on_the_gpu_at_the_paper_head_dims():
    """bf16 inputs at RetNet's 256-wide keys against the loop on the same (rounded) inputs."""
    from arch_zoo.kernels.key_sum_triton import key_sum_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, K = 2, 1000, 4, 256
    q, k = (torch.randn(B, H, T, K, device="cuda", generator=g).bfloat16().transpose(1, 2) for _ in range(2))
    k = k * K**-0.5
    log_gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(H, device="cuda", dtype=torch.float32)))
    z0 = torch.randn(B, H, K, device="cuda", generator=g)
    with torch.no_grad():
        s, z = key_sum_triton(q, k, log_gamma, z0, output_final_state=True)
    s_ref, z_ref = loop(q.cpu(), k.cpu(), log_gamma.cpu(), z0.cpu())
    assert rel(s.cpu(), s_ref) < 1e-5
    assert rel(z.cpu(), z_ref) < 1e-5


if __name__ == "__main__" and sys.argv[1:] == ["--kernel-checks"]:
    print(json.dumps(kernel_checks()))
