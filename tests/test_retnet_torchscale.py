"""The official RetNet code (torchscale 0.3.0 ``MultiScaleRetention``) as an oracle for our ``retnet`` mixer.

Only ``torchscale.component.multiscale_retention`` is imported: it needs nothing but torch (torchscale's decoder
module pulls in fairscale and timm). Its ``rel_pos`` argument is built here, following ``RetNetRelPos``. Install with
``pip install --no-deps torchscale==0.3.0``.

With the per-head norm's eps at 0 (where torchscale's own modes agree) its parallel, chunkwise and token-by-token
recurrent outputs match ours to <= 1e-5 in float32. At its default eps (1e-6) its chunkwise form departs from its
parallel form, while ours stays on it (``test_torchscale_modes_disagree_at_default_eps``).
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from arch_zoo import ConfigError
from arch_zoo.mixers.retnet import RetNet, RetNetConfig
from tests.torchscale_compat import (
    convert_torchscale_msr_state_dict,
    load_torchscale_msr,
    torchscale_compatible,
    torchscale_retnet_config,
)

msr_module = pytest.importorskip(
    "torchscale.component.multiscale_retention", reason="torchscale 0.3.0 not installed (test extra)"
)

E, V, H, T, C = 64, 128, 4, 24, 8  # 4 heads: key head dim 16, value head dim 32; 3 chunks of 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def rel_pos(length: int, mode: str, position: int = 0):
    """torchscale's ``RetNetRelPos(slen, activate_recurrent, chunkwise_recurrent)`` output, for its MSR."""
    dk = E // H
    angle = (1.0 / 10000 ** torch.linspace(0, 1, dk // 2)).repeat_interleave(2)
    log_decay = torch.log(1 - 2 ** (-5 - torch.arange(H, dtype=torch.float)))
    if mode == "recurrent":
        return (torch.sin(angle * position), torch.cos(angle * position)), log_decay.exp()
    index = torch.arange(length, dtype=torch.float)
    sin_cos = (torch.sin(index[:, None] * angle), torch.cos(index[:, None] * angle))
    size = C if mode == "chunkwise" else length
    block = torch.arange(size, dtype=torch.float)
    distance = block[:, None] - block[None, :]
    mask = torch.exp(distance.masked_fill(distance < 0, math.inf) * log_decay[:, None, None]).nan_to_num()
    if mode == "parallel":
        return sin_cos, mask / mask.sum(-1, keepdim=True).sqrt()
    row_scale = mask.sum(-1, keepdim=True).sqrt()
    last_row = mask[:, -1]
    value_decay = (last_row / last_row.sum(-1, keepdim=True))[..., None]
    cross_decay = torch.exp(log_decay * C)[:, None, None]
    query_decay = torch.exp(log_decay[:, None] * (block + 1))[..., None] / (row_scale / last_row.sum(-1)[:, None, None])
    return sin_cos, (mask / row_scale, cross_decay, query_decay, value_decay)


def torchscale_pair(eps: float, qk_gain: float = 1.0, seed: int = 0):
    """torchscale's MSR and ours with its weights; ``qk_gain`` > 1 makes the score normaliser bite."""
    torch.manual_seed(seed)
    theirs = msr_module.MultiScaleRetention(types.SimpleNamespace(multiway=False, layernorm_eps=eps), E, V, H)
    with torch.no_grad():
        theirs.q_proj.weight.mul_(qk_gain)
        theirs.k_proj.weight.mul_(qk_gain)
    ours = load_torchscale_msr(RetNet(E, torchscale_retnet_config(E, V, H, layernorm_eps=eps, chunk_size=C)), theirs)
    return theirs, ours


def run_torchscale(theirs, x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "recurrent":  # one token at a time, as its decoder does (its multi-token prefill crashes)
        state: dict = {}
        return torch.cat([theirs(x[:, t : t + 1], rel_pos(1, mode, t), incremental_state=state) for t in range(T)], 1)
    return theirs(x, rel_pos(x.shape[1], mode), chunkwise_recurrent=mode == "chunkwise")


def run_ours(ours: RetNet, x: torch.Tensor, mode: str) -> torch.Tensor:
    ours.config.mode = mode
    return ours(x, return_state=False)[0]


@pytest.mark.parametrize("qk_gain", [1.0, 8.0], ids=["init", "qk_x8"])
@pytest.mark.parametrize("their_mode", ["parallel", "chunkwise", "recurrent"])
def test_matches_torchscale_at_eps0(their_mode, qk_gain):
    theirs, ours = torchscale_pair(eps=0.0, qk_gain=qk_gain)
    x = torch.randn(2, T, E)
    with torch.no_grad():
        expected = run_torchscale(theirs, x, their_mode)
        for mode in ("parallel", "chunkwise", "recurrent"):
            assert rel_err(run_ours(ours, x, mode), expected) < 1e-5, mode


def test_score_normaliser_active_with_qk_x8():
    """With q/k weights x8 torchscale's parallel divisor max(|row sum|, 1) exceeds 1 on most rows."""
    theirs, _ = torchscale_pair(eps=0.0, qk_gain=8.0)
    x = torch.randn(2, T, E)
    with torch.no_grad():
        q = theirs.q_proj(x).view(2, T, H, -1).transpose(1, 2)
        k = theirs.k_proj(x).view(2, T, H, -1).transpose(1, 2) * theirs.scaling
        (sin, cos), mask = rel_pos(T, "parallel")
        q, k = msr_module.theta_shift(q, sin, cos), msr_module.theta_shift(k, sin, cos)
        row_sums = ((q @ k.transpose(-1, -2)) * mask).sum(-1).abs()
    assert (row_sums > 1).double().mean() > 0.5


def test_gradients_match_torchscale_parallel():
    theirs, ours = torchscale_pair(eps=0.0, qk_gain=8.0)
    x = torch.randn(2, T, E, requires_grad=True)
    g_out = torch.randn(2, T, E)
    names = ["q_proj", "k_proj", "v_proj", "g_proj", "out_proj"]
    expected = torch.autograd.grad((run_torchscale(theirs, x, "parallel") * g_out).sum(), [x, *theirs.parameters()])
    expected = dict(zip(["x", *(n for n, _ in theirs.named_parameters())], expected, strict=True))
    for mode in ("parallel", "chunkwise"):
        got = torch.autograd.grad((run_ours(ours, x, mode) * g_out).sum(), [x, *ours.parameters()])
        got = dict(zip(["x", *(n for n, _ in ours.named_parameters())], got, strict=True))
        for name in ["x", *(f"{n}.weight" for n in names)]:
            assert rel_err(got[name], expected[name]) < 1e-5, (mode, name)


def test_torchscale_modes_disagree_at_default_eps():
    """At eps = 1e-6 torchscale's chunkwise output leaves its parallel output (chunk-local normalisers that only an
    eps-free norm cancels); ours matches torchscale's parallel form in all three modes."""
    theirs, ours = torchscale_pair(eps=1e-6)
    x = torch.randn(2, T, E)
    with torch.no_grad():
        parallel = run_torchscale(theirs, x, "parallel")
        assert rel_err(run_torchscale(theirs, x, "chunkwise"), parallel) > 1e-3
        for mode in ("parallel", "chunkwise", "recurrent"):
            assert rel_err(run_ours(ours, x, mode), parallel) < 1e-5, mode


def test_float64_agreement_is_capped_by_torchscale_float32_norm():
    """torchscale's per-head RMSNorm runs in float32 even for float64 inputs; our float64 brute force is tighter."""
    theirs, ours = torchscale_pair(eps=0.0, qk_gain=8.0)
    theirs, ours = theirs.double(), ours.double()
    x = torch.randn(2, T, E, dtype=torch.float64)
    with torch.no_grad():
        err = rel_err(run_ours(ours, x, "chunkwise"), run_torchscale(theirs, x, "parallel"))
    assert 1e-12 < err < 1e-5


def test_state_dict_conversion_and_checks():
    theirs, _ = torchscale_pair(eps=0.0)
    decoder_like = {f"layers.1.retention.{k}": v for k, v in theirs.state_dict().items()}
    ours = RetNet(E, torchscale_retnet_config(E, V, H, layernorm_eps=0.0))
    load_torchscale_msr(ours, decoder_like, prefix="layers.1.retention.")
    for name, w in convert_torchscale_msr_state_dict(theirs.state_dict()).items():
        assert torch.equal(ours.state_dict()[name], w)
    with pytest.raises(KeyError, match="multiway"):
        convert_torchscale_msr_state_dict({f"{n}.A.weight": torch.zeros(1) for n in ["q_proj", "k_proj"]})
    paper_decay = RetNet(E, RetNetConfig(name="retnet", head_dim=16))
    with pytest.raises(ConfigError, match="decay_schedule='torchscale'"):
        load_torchscale_msr(paper_decay, theirs)
    load_torchscale_msr(paper_decay, theirs, strict=False)
    assert torch.equal(paper_decay.q_proj.weight, theirs.q_proj.weight)
    with pytest.raises(ConfigError, match="eps"):
        load_torchscale_msr(RetNet(E, torchscale_retnet_config(E, V, H, layernorm_eps=1e-5)), theirs)
    with pytest.raises(ConfigError, match="shape"):
        load_torchscale_msr(RetNet(E, torchscale_retnet_config(E, 2 * V, H, layernorm_eps=0.0)), theirs)
    compatible = torchscale_compatible(RetNetConfig(head_dim=16, learnable_decay=True, mode="chunkwise"))
    assert compatible.decay_schedule == "torchscale" and not compatible.learnable_decay
    assert compatible.mode == "chunkwise"


def test_without_group_norm_ours_is_torchscale_parallel():
    """Paper Table 6 "-GroupNorm": with the per-head norm removed, torchscale's parallel form (its normalisers kept)
    is the function ours computes in every mode; torchscale's own chunkwise form becomes a different function."""
    theirs, _ = torchscale_pair(eps=0.0, qk_gain=8.0)
    theirs.group_norm = torch.nn.Identity()
    config = dataclasses.replace(torchscale_retnet_config(E, V, H, layernorm_eps=0.0, chunk_size=C), group_norm=False)
    ours = load_torchscale_msr(RetNet(E, config), theirs, strict=False)
    x = torch.randn(2, T, E)
    with torch.no_grad():
        parallel = run_torchscale(theirs, x, "parallel")
        assert rel_err(run_torchscale(theirs, x, "chunkwise"), parallel) > 1e-2
        for mode in ("parallel", "chunkwise", "recurrent"):
            assert rel_err(run_ours(ours, x, mode), parallel) < 1e-5, mode
