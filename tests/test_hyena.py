"""Hyena, its implicit filters and the cached-history convolutions, against the paper's equations written naively.

Tolerances as in test_h3.py: the FFT's rounding is ~eps * log T relative to the signal, so the FFT (training) and
cached dot-product (decoding) forms agree to ~1e-15 in float64 (asserted 1e-12) and ~1e-7..1e-6 in float32
(asserted 1e-5).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.func import functional_call

from arch_zoo import ConfigError, build_mixer
from arch_zoo.convolutions import ShortCausalConv, causal_conv_tail, fft_causal_conv
from arch_zoo.mixers.hyena import HyenaConfig

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
CONFIGS = {
    "order2": HyenaConfig(name="hyena", l_max=64),
    "order3": HyenaConfig(
        name="hyena", l_max=64, order=3, filter_order=8, filter_emb_dim=5, short_filter_order=1, modulate=False
    ),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def naive_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s<=t} k_{t-s} u_s, one output at a time."""
    y = torch.zeros_like(u)
    for t in range(u.shape[-1]):
        for s in range(max(0, t - k.shape[-1] + 1), t + 1):
            y[..., t] += k[..., t - s] * u[..., s]
    return y


def make_hyena(config: HyenaConfig, d_model: int = 16, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    return build_mixer(config, d_model).to(dtype).eval()


def naive_filter(filt, config: HyenaConfig, length: int) -> torch.Tensor:
    """h[c, t] = MLP(z_t)[c] * exp(-|delta_c| t / (l_max - 1)), the MLP written layer by layer."""
    L = config.l_max
    s = torch.arange(length, dtype=torch.float64)[:, None]
    bands = (config.filter_emb_dim - 1) // 2
    f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, :]
    z = torch.cat((s / (L - 1), torch.cos(2 * math.pi * f * s / L), -torch.sin(2 * math.pi * f * s / L)), dim=-1)
    torch.testing.assert_close(filt.z[:length].double(), z, rtol=0, atol=1e-6)  # the initial positional features
    linears = [m for m in filt.mlp if isinstance(m, torch.nn.Linear)]
    freq = filt.mlp[1].freq.double()
    h = filt.z[:length].double()
    for linear in linears[:-1]:
        h = torch.sin(freq * (h @ linear.weight.double().T + linear.bias.double()))
    h = h @ linears[-1].weight.double().T
    if config.modulate:
        target = math.log(config.decay_target)
        deltas = torch.linspace(target / config.slow_decay_pct, target / config.fast_decay_pct, h.shape[-1])
        h = h * torch.exp(-(s / (L - 1)) * deltas.double().abs())
    return h.T


def naive_hyena(mixer, x: torch.Tensor) -> torch.Tensor:
    """y = W_out(x_0 . (h_1 * (x_1 . ... (h_{N-1} * (x_{N-1} . v) + b . x_{N-1} . v) ...)))."""
    B, T, D = x.shape
    N = mixer.order
    u = mixer.in_proj(x).transpose(1, 2)
    w = mixer.short_conv.weight[:, 0]  # [C, K], tap K-1 weighs the current input
    u = naive_causal_conv(u, w.flip(-1)) + mixer.short_conv.bias[:, None]
    streams = list(u.split(D, dim=1))
    v = streams[-1]
    h = mixer.filter.compute(T).view(N - 1, D, T)
    bias = mixer.filter_bias.view(N - 1, D)
    for n, gate in enumerate(reversed(streams[1:-1])):
        z = gate * v
        v = naive_causal_conv(z, h[n]) + bias[n][:, None] * z
    return mixer.out_proj((streams[0] * v).transpose(1, 2))


# ---- cached-history convolutions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel_size", [1, 3, 4])
def test_short_conv_matches_direct_and_continues_from_its_history(kernel_size, dtype):
    torch.manual_seed(0)
    conv = ShortCausalConv(6, kernel_size).to(dtype)
    x = torch.randn(2, 6, 17, dtype=dtype)
    with torch.no_grad():
        expected = naive_causal_conv(x, conv.weight[:, 0].flip(-1)) + conv.bias[:, None]
        y, history = conv(x)
        assert rel_err(y, expected) < TOL[dtype]
        assert history.shape == (2, 6, kernel_size - 1)
        pieces, history = [], None
        for lo, hi in [(0, 1), (1, 2), (2, 9), (9, 17)]:
            y, history = conv(x[..., lo:hi], history)
            pieces.append(y)
        assert rel_err(torch.cat(pieces, dim=-1), expected) < TOL[dtype]
        reference = torch.nn.functional.conv1d(x, conv.weight, conv.bias, padding=kernel_size - 1, groups=6)
        assert rel_err(y, reference[..., 9:17]) < TOL[dtype]  # nn.Conv1d padded both sides, cropped: the same


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_out", [1, 4])
def test_conv_tail_matches_direct_convolution(n_out, dtype):
    torch.manual_seed(0)
    u = torch.randn(2, 3, 20, dtype=dtype)
    skip = torch.randn(3, dtype=dtype)
    for kernel_len in (20, 6):
        k = torch.randn(3, kernel_len, dtype=dtype)
        expected = naive_causal_conv(u.double(), k.double()) + skip.double()[:, None] * u.double()
        y = causal_conv_tail(u, k, n_out, skip)
        assert y.shape == (2, 3, n_out)
        assert rel_err(y.double(), expected[..., -n_out:]) < TOL[dtype]


@pytest.mark.parametrize("n_out", [1, 3])
def test_conv_tail_gradcheck(n_out):
    torch.manual_seed(0)
    u = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, k, s: causal_conv_tail(u, k, n_out, s), (u, k, skip))


# ---- the implicit filter -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_filter_matches_its_definition_and_does_not_depend_on_length(name):
    config = CONFIGS[name]
    filt = make_hyena(config).filter
    with torch.no_grad():
        h = filt.compute(config.l_max)
        # 1e-6, not 1e-12: the module builds its constants (t, deltas) in float32, like its parameters
        assert rel_err(h, naive_filter(filt, config, config.l_max)) < 1e-6
        # a prefix: decoding sees the filters training saw. To rounding, not bit for bit: MKL blocks a matmul of 10
        # rows differently from one of l_max rows on some CPUs (AVX-512), which moves the last bit of a few taps
        assert rel_err(filt.compute(10), h[:, :10]) < 1e-14


def test_filter_gradcheck():
    config = HyenaConfig(name="hyena", l_max=8, filter_order=4, filter_emb_dim=3, filter_inner_layers=1)
    filt = make_hyena(config, d_model=2).filter
    names = [n for n, _ in filt.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in filt.parameters())

    def filters(*values: torch.Tensor) -> torch.Tensor:
        return functional_call(filt, dict(zip(names, values, strict=True)), (8,))

    assert torch.autograd.gradcheck(filters, values)


def test_filter_cache_follows_parameter_changes():
    mixer = make_hyena(CONFIGS["order2"])
    filt = mixer.filter
    with torch.no_grad():
        cached = filt(10)
        torch.testing.assert_close(cached, filt.compute(10), rtol=1e-12, atol=0)
        assert filt(12).shape[-1] == 12
        filt.mlp[0].weight.add_(0.1)  # what an optimiser step does
        updated = filt(10)
        assert not torch.allclose(updated, cached)
        torch.testing.assert_close(updated, filt.compute(10), rtol=1e-12, atol=0)
        mixer.float()
        assert filt(10).dtype == torch.float32


def test_filter_optimiser_settings():
    mixer = make_hyena(dataclasses.replace(CONFIGS["order2"], filter_lr=1e-3))
    filt = mixer.filter
    assert all(p._optim == {"lr": 1e-3, "weight_decay": 0.0} for p in filt.mlp.parameters())
    assert filt.mlp[1].freq in set(filt.mlp.parameters())
    assert filt.z._optim == {"weight_decay": 0.0}
    for p in (mixer.in_proj.weight, mixer.out_proj.weight, mixer.short_conv.weight, mixer.filter_bias):
        assert not hasattr(p, "_optim")
    frozen = make_hyena(dataclasses.replace(CONFIGS["order2"], pos_emb_lr=0.0))
    assert "z" in dict(frozen.filter.named_buffers()) and "z" not in dict(frozen.filter.named_parameters())


# ---- the mixer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixer_matches_the_equations(name):
    mixer = make_hyena(CONFIGS[name])
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    with torch.no_grad():
        y, _ = mixer(x, return_state=False)
        assert rel_err(y, naive_hyena(mixer, x)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_fft(name, dtype):
    mixer = make_hyena(CONFIGS[name], dtype=dtype)
    x = torch.randn(2, 48, 16, dtype=dtype)
    full, _ = mixer(x)  # gradients on: the filters are computed, not cached
    with torch.no_grad():
        steps, state = [], None
        for t in range(x.shape[1]):
            y, state = mixer(x[:, t : t + 1], state)
            steps.append(y)
        assert rel_err(torch.cat(steps, dim=1), full) < TOL[dtype]
        pieces, state = [], None
        for lo, hi in [(0, 2), (2, 3), (3, 30), (30, 48)]:
            y, state = mixer(x[:, lo:hi], state)
            pieces.append(y)
        assert rel_err(torch.cat(pieces, dim=1), full) < TOL[dtype]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal(name):
    mixer = make_hyena(CONFIGS[name])
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 12:] = torch.randn_like(x2[:, 12:])
    with torch.no_grad():
        y, _ = mixer(x, return_state=False)
        y2, _ = mixer(x2, return_state=False)
    assert rel_err(y2[:, :12], y[:, :12]) < 1e-12
    assert rel_err(y2[:, 12:], y[:, 12:]) > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_grows_and_state_size_counts_it(name):
    mixer = make_hyena(CONFIGS[name])
    with torch.no_grad():
        _, state = mixer(torch.randn(1, 9, 16, dtype=torch.float64))
        numbers = state["short"].numel() + sum(h.numel() for h in state["long"])
        assert mixer.state_size(9) == numbers
        _, state = mixer(torch.randn(1, 1, 16, dtype=torch.float64), state)
        assert mixer.state_size(10) == state["short"].numel() + sum(h.numel() for h in state["long"]) > numbers


def test_sequences_longer_than_l_max_are_refused():
    mixer = make_hyena(CONFIGS["order2"])
    with pytest.raises(ConfigError, match="l_max"):
        mixer(torch.randn(1, 65, 16, dtype=torch.float64))
    with torch.no_grad():
        _, state = mixer(torch.randn(1, 64, 16, dtype=torch.float64))
        with pytest.raises(ConfigError, match="l_max"):
            mixer(torch.randn(1, 1, 16, dtype=torch.float64), state)


@pytest.mark.parametrize(
    "change, message", [({"order": 1}, "order"), ({"filter_emb_dim": 4}, "odd"), ({"l_max": 0}, "l_max")]
)
def test_config_errors_name_the_fix(change, message):
    with pytest.raises(ConfigError, match=message):
        build_mixer(dataclasses.replace(CONFIGS["order2"], **change), 16)


def test_fft_conv_is_what_the_mixer_uses_for_training():
    # the long convolution of the training form is the shared FFT convolution with the filter bias as its skip
    mixer = make_hyena(CONFIGS["order2"])
    v = torch.randn(1, 16, 12, dtype=torch.float64)
    h = mixer.filter.compute(12)
    expected = naive_causal_conv(v, h) + mixer.filter_bias[:, None] * v
    with torch.no_grad():
        assert rel_err(fft_causal_conv(v, h, mixer.filter_bias), expected) < 1e-12


def test_the_short_conv_compiles_to_the_eager_values_and_gradients():
    """Compiled, the short convolution runs as shifted products (one fused kernel) instead of PyTorch's depthwise
    kernels: the same values and gradients, from a fresh start and from a history."""
    torch.manual_seed(0)
    conv = ShortCausalConv(6, 3)
    x = torch.randn(2, 17, 6).transpose(1, 2).requires_grad_()  # the mixer's [B, C, T] view of [B, T, C]
    history = torch.randn(2, 6, 2)
    dy = torch.randn(2, 6, 17)
    results = []
    for fn in (conv, torch.compile(conv, fullgraph=True)):
        for h in (None, history):
            y, new_history = fn(x, h)
            results.append((y, new_history, *torch.autograd.grad(y, (x, conv.weight, conv.bias), dy)))
    for compiled, eager in zip(results[2:], results[:2]):
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):  # float32 inputs come out in autocast's dtype, as from F.conv1d
        dtypes = [fn(x)[0].dtype for fn in (conv, torch.compile(conv, fullgraph=True))]
    assert dtypes == [torch.bfloat16, torch.bfloat16]
