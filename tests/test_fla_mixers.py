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
