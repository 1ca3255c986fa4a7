"""RWKV-4 time mixing and channel mixing, against the paper's equations written naively (a loop over t).

Tolerances: the chunkwise and recurrent WKV forms add the same terms in different orders, so float32 agrees with a
float64 reference to ~1e-7 relative (asserted: 1e-5) and float64 to ~1e-15 (asserted: 1e-12). With large keys the
exponents themselves are large: rounding ``(t-1-i) w + k_i`` of size ~100 in float32 perturbs each weight by
~100 * 6e-8 relative, so that test asserts 5e-5 against float64.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from arch_zoo import ConfigError, FFNConfig, LanguageModel, ModelConfig, build_mixer
from arch_zoo.layers import build_ffn
from arch_zoo.mixers import rwkv
from arch_zoo.mixers.rwkv import RWKVConfig, wkv_chunkwise, wkv_recurrent

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def naive_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state=None) -> torch.Tensor:
    """wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (the same with v = 1), exponentials as
    written (so it overflows where e^k does); ``state = (num, den)`` adds ``e^{t w} num`` / ``e^{t w} den``."""
    B, T, C = k.shape
    out = torch.empty_like(v)
    for t in range(T):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            weight = torch.exp((t - 1 - i) * w + k[:, i])
            num, den = num + weight * v[:, i], den + weight
        if state is not None:
            num, den = num + torch.exp(t * w) * state[0], den + torch.exp(t * w) * state[1]
        out[:, t] = num / den
    return out


def random_wkv_inputs(B=2, T=50, C=8, key_scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.rand(C, generator=g, dtype=torch.float64) * 8 - 5  # RWKV-4's initial range
    w = -time_decay.exp()
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * key_scale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (w, u, k, v)]


def true_sums(state) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, denominator) = (a e^p, b e^p) of a WKV state, in float64."""
    a, b, p = (s.double() for s in state)
    return a * p.exp(), b * p.exp()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_wkv_forms_match_the_equation(dtype, chunk_size):
    w, u, k, v = random_wkv_inputs(dtype=dtype)
    reference = naive_wkv(*(t.double() for t in (w, u, k, v)))
    chunked, _ = wkv_chunkwise(w, u, k, v, chunk_size=chunk_size)
    recurrent, _ = wkv_recurrent(w, u, k, v)
    assert chunked.dtype == recurrent.dtype == dtype
    assert rel_err(chunked, reference) < TOL[dtype]
    assert rel_err(recurrent, reference) < TOL[dtype]
    assert rel_err(chunked, recurrent) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wkv_continues_from_a_state(dtype):
    w, u, k, v = random_wkv_inputs(T=41, dtype=dtype)
    split = 23
    _, state = wkv_recurrent(w, u, k[:, :split], v[:, :split])
    reference = naive_wkv(*(t.double() for t in (w, u, k[:, split:], v[:, split:])), state=true_sums(state))
    chunked, chunked_state = wkv_chunkwise(w, u, k[:, split:], v[:, split:], state, chunk_size=5)
    recurrent, recurrent_state = wkv_recurrent(w, u, k[:, split:], v[:, split:], state)
    assert rel_err(chunked, reference) < TOL[dtype]
    assert rel_err(recurrent, reference) < TOL[dtype]
    # the final states hold the same sums (a padded last chunk included: 18 tokens in chunks of 5)
    for x, y in zip(true_sums(chunked_state), true_sums(recurrent_state)):
        assert rel_err(x, y) < TOL[dtype]
    full, _ = wkv_chunkwise(w, u, k, v, chunk_size=5)
    assert rel_err(torch.cat((wkv_recurrent(w, u, k[:, :split], v[:, :split])[0], chunked), 1), full) < TOL[dtype]


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_wkv_is_stable_with_large_keys(chunk_size):
    """Keys of size ~60 (up to ~250): e^k overflows float32, so the equation as written gives inf/nan there."""
    w, u, k, v = random_wkv_inputs(T=40, key_scale=60.0, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.isfinite(naive_wkv(w, u, k, v)).all(), "the keys are not large enough to test anything"
    reference = naive_wkv(*(t.double() for t in (w, u, k, v)))
    assert torch.isfinite(reference).all()
    for y, state in (wkv_chunkwise(w, u, k, v, chunk_size=chunk_size), wkv_recurrent(w, u, k, v)):
        assert all(torch.isfinite(t).all() for t in (y, *state))
        assert rel_err(y, reference) < 5e-5


def test_factored_and_direct_chunk_sums_agree(monkeypatch):
    """The fast factored chunk sums and the exact per-row fallback compute the same numbers."""
    w, u, k, v = random_wkv_inputs(T=45, key_scale=3.0)
    fast, fast_state = wkv_chunkwise(w, u, k, v, chunk_size=16)
    monkeypatch.setattr(rwkv, "_underflow_threshold", lambda dtype: math.inf)  # every row takes the fallback
    direct, direct_state = wkv_chunkwise(w, u, k, v, chunk_size=16)
    assert rel_err(fast, direct) < 1e-13
    for x, y in zip(fast_state, direct_state):
        assert rel_err(x, y) < 1e-13


@pytest.mark.parametrize("fallback", [False, True])
def test_wkv_gradcheck(monkeypatch, fallback):
    """Gradients through the detached max exponents, the padding and the state are exact (float64)."""
    if fallback:
        monkeypatch.setattr(rwkv, "_underflow_threshold", lambda dtype: math.inf)
    w, u, k, v = random_wkv_inputs(B=1, T=7, C=3, seed=1)
    _, (a, b, p) = wkv_recurrent(w, u, k[:, :3], v[:, :3])
    inputs = [t.clone().requires_grad_() for t in (w, u, k[:, 3:], v[:, 3:], a, b)]

    def chunked(w, u, k, v, a, b):
        y, (a1, b1, p1) = wkv_chunkwise(w, u, k, v, (a, b, p), chunk_size=3)  # 4 tokens: one padded chunk
        return y, a1 * p1.exp(), b1 * p1.exp()

    def recurrent(w, u, k, v, a, b):
        y, (a1, b1, p1) = wkv_recurrent(w, u, k, v, (a, b, p))
        return y, a1 * p1.exp(), b1 * p1.exp()

    assert torch.autograd.gradcheck(chunked, inputs)
    assert torch.autograd.gradcheck(recurrent, inputs)


def make_rwkv(config: RWKVConfig, d_model: int = 16, dtype=torch.float64, layer_idx: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    return build_mixer(dataclasses.replace(config, name="rwkv"), d_model, layer_idx).to(dtype).eval()


def naive_time_mix(m, x: torch.Tensor) -> torch.Tensor:
    """The time-mixing block of the paper, token by token from the module's parameters."""
    B, T, C = x.shape
    prev = torch.zeros(B, C, dtype=x.dtype)
    k, v, r = [], [], []
    for t in range(T):
        xt = x[:, t]
        k.append(m.key(m.time_mix_k * xt + (1 - m.time_mix_k) * prev))
        v.append(m.value(m.time_mix_v * xt + (1 - m.time_mix_v) * prev))
        r.append(m.receptance(m.time_mix_r * xt + (1 - m.time_mix_r) * prev))
        prev = xt
    k, v, r = torch.stack(k, 1), torch.stack(v, 1), torch.stack(r, 1)
    wkv = naive_wkv(-torch.exp(m.time_decay), m.time_first, k, v)
    return m.output(torch.sigmoid(r) * wkv)


@pytest.mark.parametrize("mode", ["chunkwise", "recurrent"])
def test_time_mix_matches_the_paper(mode):
    m = make_rwkv(RWKVConfig(mode=mode, chunk_size=8, zero_init=False))
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        assert rel_err(y, naive_time_mix(m, x)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunkwise_and_recurrent_modes_agree(dtype):
    chunked = make_rwkv(RWKVConfig(chunk_size=8, zero_init=False), dtype=dtype)
    recurrent = make_rwkv(RWKVConfig(mode="recurrent", zero_init=False), dtype=dtype)
    recurrent.load_state_dict(chunked.state_dict())
    x = torch.randn(3, 37, 16, dtype=dtype)
    with torch.no_grad():
        y1, s1 = chunked(x)
        y2, s2 = recurrent(x)
        assert rel_err(y1, y2) < TOL[dtype]
        # and decoding continues identically from either state
        nxt = torch.randn(3, 1, 16, dtype=dtype)
        assert rel_err(chunked(nxt, s1)[0], recurrent(nxt, s2)[0]) < TOL[dtype]


def test_float32_state_continuation():
    m = make_rwkv(RWKVConfig(chunk_size=8, zero_init=False), dtype=torch.float32)
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        full, _ = m(x)
        pieces, state = [], None
        for lo, hi in [(0, 13), (13, 14), (14, 15), (15, 40)]:
            y, state = m(x[:, lo:hi], state)
            pieces.append(y)
    assert rel_err(torch.cat(pieces, 1), full) < 1e-5


def test_rwkv4_initialisation():
    """RWKV-4's layer-dependent init: decays spread from -5 to 3 over channels, the bonus zigzags around log 0.3,
    shift mixing falls with depth, and the layer starts silent (W_k, W_r, W_o zero)."""
    C, n = 8, 4
    first = make_rwkv(RWKVConfig(init_n_layers=n), d_model=C, dtype=torch.float32, layer_idx=0)
    last = make_rwkv(RWKVConfig(init_n_layers=n), d_model=C, dtype=torch.float32, layer_idx=n - 1)
    for m in (first, last):
        assert m.time_decay[0].item() == pytest.approx(-5) and m.time_decay[-1].item() == pytest.approx(3)
        assert torch.all(m.time_decay.diff() > 0)
        zigzag = torch.tensor([0.0, 0.5, -0.5] * 3)[:C]
        torch.testing.assert_close(m.time_first, math.log(0.3) + zigzag)
    ramp = torch.arange(C) / C
    torch.testing.assert_close(first.time_mix_k, ramp)  # r1 = 1 at layer 0
    torch.testing.assert_close(last.time_mix_k, ramp ** (1 / n))  # r1 = 1 - (n-1)/n
    torch.testing.assert_close(last.time_mix_v, ramp ** (1 / n) + 0.3)  # r0 = 1 at the last layer
    torch.testing.assert_close(first.time_mix_r, ramp**0.5)
    # deeper layers remember longer on the same channel (exponent 0.7 -> 2.0: smaller time_decay, smaller |w|)
    assert torch.all(last.time_decay[1:-1] < first.time_decay[1:-1])
    for proj in (first.key, first.receptance, first.output):
        assert torch.count_nonzero(proj.weight) == 0
    w = first.value.weight
    torch.testing.assert_close(w @ w.T, torch.eye(C), atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.count_nonzero(first(torch.randn(2, 5, C))[0]) == 0
    # RWKV-LM v4 trains the decay at 2x and the bonus at 3x the run's learning rate, both without weight decay
    assert first.time_decay._optim == {"weight_decay": 0.0, "lr_scale": 2.0}
    assert first.time_first._optim == {"weight_decay": 0.0, "lr_scale": 3.0}


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="mode"):
        make_rwkv(RWKVConfig(mode="parallel"))
    with pytest.raises(ConfigError, match="chunk_size"):
        make_rwkv(RWKVConfig(chunk_size=0))
    with pytest.raises(ConfigError, match="init_n_layers"):
        make_rwkv(RWKVConfig(init_n_layers=0))


# ----------------------------------------------------------------------------------------------------------------
# Channel mixing (FFN kind rwkv_channel)
# ----------------------------------------------------------------------------------------------------------------


def make_channel_mix(d_model=16, mult=4.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ffn = build_ffn(FFNConfig(kind="rwkv_channel", mult=mult), d_model, layer_idx=1).to(dtype).eval()
    with torch.no_grad():  # RWKV starts W_r and W_v at zero; a random layer tests more
        for p in ffn.parameters():
            p.normal_(0, 0.5)
    return ffn


def test_channel_mix_matches_the_paper():
    ffn = make_channel_mix()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    prev = torch.zeros(2, 16, dtype=torch.float64)
    expected = []
    for t in range(9):
        xk = ffn.time_mix_k * x[:, t] + (1 - ffn.time_mix_k) * prev
        xr = ffn.time_mix_r * x[:, t] + (1 - ffn.time_mix_r) * prev
        expected.append(torch.sigmoid(ffn.receptance(xr)) * ffn.value(torch.relu(ffn.key(xk)) ** 2))
        prev = x[:, t]
    with torch.no_grad():
        y, _ = ffn(x)
    assert rel_err(y, torch.stack(expected, 1)) < 1e-12
    assert ffn.key.out_features == 64 and ffn.state_size(10) == ffn.state_size(1000) == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_mix_state_continuation(dtype):
    ffn = make_channel_mix(dtype=dtype)
    x = torch.randn(2, 20, 16, dtype=dtype)
    with torch.no_grad():
        full, _ = ffn(x)
        pieces, state = [], None
        for lo, hi in [(0, 7), (7, 8), (8, 20)]:
            y, state = ffn(x[:, lo:hi], state)
            pieces.append(y)
        none = ffn(x, return_state=False)[1]
    assert none is None
    assert rel_err(torch.cat(pieces, 1), full) < TOL[dtype]


def test_channel_mix_keeps_rwkv_init_inside_the_model():
    model = LanguageModel(
        ModelConfig(vocab_size=32, d_model=16, n_layers=2, mixer="rwkv", ffn=FFNConfig("rwkv_channel"))
    )
    for block in model.blocks:
        assert torch.count_nonzero(block.ffn.value.weight) == 0  # not redrawn by the model's generic FFN init
        assert torch.count_nonzero(block.ffn.receptance.weight) == 0


def test_full_rwkv_language_model_trains_and_decodes():
    """A "full RWKV" (time mix + channel mix) is one config: it learns, and decoding token by token through the
    states reproduces the full forward pass."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=32,
        d_model=32,
        n_layers=2,
        mixer=RWKVConfig(name="rwkv", chunk_size=8, init_n_layers=2),
        ffn=FFNConfig(kind="rwkv_channel", mult=4.0),
    )
    model = LanguageModel(config)
    tokens = torch.randint(0, 32, (4, 25))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = model.loss(inputs, targets)
    before.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    with torch.no_grad():
        after = model.loss(inputs, targets)
        assert after < before
        # after one step every RWKV matrix is non-zero, so this compares a real computation
        full, _ = model(inputs)
        logits, states = model(inputs[:, :10], return_states=True)
        steps = [logits]
        for t in range(10, inputs.shape[1]):
            logits, states = model(inputs[:, t : t + 1], states, return_states=True)
            steps.append(logits)
    assert rel_err(torch.cat(steps, 1), full) < 1e-5
    assert model.state_size(100) == 2 * (4 * 32 + 32)  # per layer: time mix x, a, b, p; channel mix x
