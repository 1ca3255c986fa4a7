"""The fla wrappers' plumbing, on any machine: what reaches fla's constructors and how they refuse without a GPU.

Their behaviour (the contract) is checked on a GPU by tests/test_mixer_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from arch_zoo import available_mixers, build_mixer
from arch_zoo.contract import ConfigError
from arch_zoo.fla_mixers import HGRN2, RWKV7, FLAConfig, FLAMixer, Mamba2

FLA_NAMES = [name for name, spec in available_mixers().items() if issubclass(spec.mixer_class, FLAMixer)]


def test_every_fla_mixer_is_registered_and_declares_where_it_runs():
    assert len(FLA_NAMES) == 8
    for name in FLA_NAMES:
        cls = available_mixers()[name].mixer_class
        assert cls.devices == ("cuda",) and not cls.supports_float64


def test_constructor_arguments_keep_the_head_count():
    """fla defaults that would override num_heads are neutralised; a user's options still win."""
    assert HGRN2.defaults == {"expand_ratio": None}  # else hidden // 128 heads: zero at small widths
    assert RWKV7.defaults["head_dim"] is None  # else head_dim=64 decides the heads
    assert Mamba2.derived_args(None, 64, FLAConfig(num_heads=4)) == {"head_dim": 32}  # expand 2 * 64 / 4
    assert Mamba2.derived_args(None, 64, FLAConfig(num_heads=4, options={"expand": 1})) == {"head_dim": 16}
    assert Mamba2.derived_args(None, 64, FLAConfig(num_heads=3, options={"head_dim": 8})) == {}
    with pytest.raises(ConfigError, match="options.head_dim"):
        Mamba2.derived_args(None, 64, FLAConfig(num_heads=3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_they_refuse_to_build_and_say_why():
    config = FLAConfig(name="fla_gla")
    with pytest.raises(ConfigError, match="CUDA GPU"):
        build_mixer(config, 64)


def test_mamba2_steps_a_multi_token_continuation_one_token_at_a_time(monkeypatch):
    """fla's Mamba-2 raises on a cached continuation longer than one token (seen on an H100); the wrapper steps it."""

    class Cache(list):
        pass

    def fla_like(self, x, state=None, return_state=True):  # a causal running sum with fla's restriction
        if state is not None and len(state) and x.shape[1] != 1:
            raise ValueError("Mamba2 cached decoding only supports a single new token per step.")
        start = state[-1] if state is not None and len(state) else torch.zeros_like(x[:, :1])
        y = start + x.cumsum(dim=1)
        state = state if state is not None else Cache()
        state.append(y[:, -1:])
        return y, state

    monkeypatch.setattr(FLAMixer, "forward", fla_like)
    mixer = Mamba2.__new__(Mamba2)
    torch.nn.Module.__init__(mixer)
    x = torch.randn(2, 9, 4)
    full, _ = mixer(x, Cache())
    head, state = mixer(x[:, :3], Cache())  # a prompt runs whole
    tail, state = mixer(x[:, 3:], state)  # a chunk continues it, token by token
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full)
    _, none = mixer(x[:, :2], state, return_state=False)
    assert none is None


@pytest.mark.parametrize(
    ("capability", "triton_version", "tilelang", "refused"),
    [
        ((9, 0), "3.6.0", False, True),
        ((9, 0), "3.7.1", False, False),
        ((8, 0), "3.6.0", False, False),
        ((9, 0), "3.6.0", True, False),
    ],
)
def test_gated_deltanet_is_unavailable_where_flas_gated_backward_is_wrong(
    monkeypatch, capability, triton_version, tilelang, refused
):
    """fla refuses the gated backward on Hopper with Triton >= 3.4, < 3.7.1 (its issue #640): the mixer says so before
    a run starts instead of failing at the first backward (seen on an H100 with Triton 3.6)."""
    import importlib.util
    import types

    from arch_zoo import fla_mixers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setitem(__import__("sys").modules, "triton", types.SimpleNamespace(__version__=triton_version))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if tilelang else None) if name == "tilelang" else real_find_spec(name, *a),
    )
    reason = fla_mixers.gated_backward_broken()
    assert (reason is not None) == refused
    if refused:
        assert "#640" in reason and "tilelang" in reason
        assert available_mixers()["fla_gated_deltanet"].mixer_class.unavailable() == reason
