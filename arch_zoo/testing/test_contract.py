"""The token-mixer contract, checked for every registered mixer (plugins included), or for those ``ARCH_ZOO_MIXERS``
names (``zoo-check-mixer NAME``). Shipped with the package so that a plugin's own repository can run it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from arch_zoo import LanguageModel, ModelConfig, available_mixers, build_mixer
from arch_zoo.flops import measured_flops_per_token
from arch_zoo.testing import mixer_params as _params
from arch_zoo.testing import selected_mixers

D_MODEL = 64


def mixer_params() -> list:
    return _params(selected_mixers())


def small_config(name: str):
    spec = available_mixers()[name]
    return dataclasses.replace(spec.config_class.small(), name=name)


def setting(name: str) -> tuple[torch.device, torch.dtype]:
    """Where a mixer is checked: the CPU in float64 when it can, else its own device, in float32 without float64."""
    cls = available_mixers()[name].mixer_class
    device = torch.device("cpu" if "cpu" in cls.devices else cls.devices[0])
    return device, torch.float64 if cls.supports_float64 else torch.float32


# (causality, continuation) relative-error bounds; float32 kernels may take tf32 products
TOLERANCE = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-2)}


def make_mixer(name: str, dtype=None, seed: int = 0):
    torch.manual_seed(seed)
    device, default = setting(name)
    return _randomise_zero_weights(build_mixer(small_config(name), D_MODEL)).to(device, dtype or default).eval()


def _randomise_zero_weights(mixer: torch.nn.Module) -> torch.nn.Module:
    """Give weight matrices that start at zero small random values.

    Why: some mixers zero-initialise their output projection, as RWKV-7's official code does (and fla's port of it).
    Its output is then 0 whatever the input, so every check below would compare zeros: causality could not fail, and
    "the output depends on its inputs" always would. Biases and vectors keep their initial values."""
    with torch.no_grad():
        for weight in mixer.parameters():
            if weight.dim() >= 2 and not weight.any():
                weight.normal_(0.0, weight.shape[-1] ** -0.5)
    return mixer


def randn(name: str, *shape: int) -> torch.Tensor:
    device, dtype = setting(name)
    return torch.randn(*shape, dtype=torch.float64).to(device, dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_pieces_match(mixer, x: torch.Tensor, full: torch.Tensor, state) -> None:
    """``x`` run from ``state`` as a prompt, two single tokens, then a chunk, each continuing the last, equals
    ``full``, the whole-sequence output."""
    pieces = []
    for lo, hi in [(0, 17), (17, 18), (18, 19), (19, 45)]:
        y, state = mixer(x[:, lo:hi], state)
        pieces.append(y)
    err, bound = rel_err(torch.cat(pieces, dim=1), full), TOLERANCE[x.dtype][1]
    assert err < bound, f"continuing from a state differs from the whole sequence by {err:.3g} (bound {bound:g})"


@pytest.mark.parametrize("name", mixer_params())
def test_shape_and_finite(name):
    mixer = make_mixer(name, torch.float32)
    x = randn(name, 2, 37, D_MODEL).float()
    y, state = mixer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y2, none = mixer(x, return_state=False)
    assert none is None
    torch.testing.assert_close(y2, y)


@pytest.mark.parametrize("name", mixer_params())
def test_causal(name):
    mixer = make_mixer(name)
    x = randn(name, 2, 40, D_MODEL)
    y, _ = mixer(x, return_state=False)
    t = 23
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
    y2, _ = mixer(x2, return_state=False)
    bound = TOLERANCE[x.dtype][0]
    before, after = rel_err(y2[:, : t + 1], y[:, : t + 1]), rel_err(y2[:, t + 1 :], y[:, t + 1 :])
    assert before < bound, f"output before t changed by {before:.3g} (bound {bound:g}) when only inputs after t did"
    assert after > 1e-6, f"output ignores its inputs (changed by {after:.3g})"


@pytest.mark.parametrize("name", mixer_params())
def test_state_continuation_matches_full_sequence(name):
    mixer = make_mixer(name)
    x = randn(name, 2, 45, D_MODEL)
    full, _ = mixer(x)
    assert_pieces_match(mixer, x, full, None)


@pytest.mark.parametrize("name", mixer_params())
def test_an_allocated_state_computes_the_same_function(name):
    """``allocate_state`` (what generate and the benchmarks start from): the prompt, then single tokens and a chunk
    continuing from it, equal the whole-sequence forward, whether the mixer preallocates (and updates in place) or
    returns None (a fresh sequence)."""
    mixer = make_mixer(name)
    x = randn(name, 2, 45, D_MODEL)
    full, _ = mixer(x)
    with torch.no_grad():
        assert_pieces_match(mixer, x, full, mixer.allocate_state(2, 45, x.device, x.dtype))


@pytest.mark.parametrize("name", mixer_params())
def test_state_size(name):
    mixer = make_mixer(name)
    sizes = [mixer.state_size(n) for n in (1, 128, 4096)]
    assert all(isinstance(s, int) and s > 0 for s in sizes)
    assert sizes == sorted(sizes), "a state never shrinks as the sequence grows"


@pytest.mark.parametrize("name", mixer_params())
def test_one_step_lowers_loss(name):
    torch.manual_seed(0)
    device, _ = setting(name)
    model = LanguageModel(ModelConfig(vocab_size=32, d_model=D_MODEL, n_layers=2, mixer=small_config(name)))
    model = model.to(device)
    tokens = torch.randint(0, 32, (4, 33)).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = model.loss(inputs, targets)
    before.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    with torch.no_grad():
        after = model.loss(inputs, targets)
    assert after < before


@pytest.mark.parametrize("length", [16, 45])
@pytest.mark.parametrize("name", mixer_params())
def test_declared_flops_match_the_counter(name, length):
    """Each mixer declares its forward FLOPs per token (what runs turn into MFU); torch's counter must agree,
    at a length that is whole chunks and at one that leaves a partial chunk."""
    reason = available_mixers()[name].mixer_class.flops_uncountable
    if reason:
        pytest.skip(f"{name}: {reason}")
    mixer = make_mixer(name)
    declared = mixer.flops_per_token(length)
    assert declared is not None, f"{name}: declare flops_per_token(seq_len) (see arch_zoo.flops)"
    measured = measured_flops_per_token(
        lambda x: mixer(x, return_state=False), [randn(name, 1, length, D_MODEL), randn(name, 2, length, D_MODEL)]
    )
    assert declared == pytest.approx(measured, rel=1e-12), f"{name}: declared {declared}, counted {measured}"
