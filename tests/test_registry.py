"""The registry: names, errors that list the registered mixers, and third-party plugins by entry point."""

import importlib.metadata

import pytest

from arch_zoo import ConfigError, available_mixers, build_mixer, get_mixer, make_config, register_mixer
from arch_zoo.contract import MixerConfig, TokenMixer
from arch_zoo.registry import ENTRY_POINT_GROUP


def test_builtins_registered():
    names = set(available_mixers())
    assert {"transformer", "retnet"} <= names


def test_unknown_name_lists_registered_mixers():
    with pytest.raises(ConfigError) as err:
        get_mixer("retnat")
    message = str(err.value)
    assert "Did you mean 'retnet'" in message
    for name in available_mixers():
        assert name in message


def test_misspelt_field_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match="has no field.*n_haeds.*its fields are:.*n_heads"):
        make_config({"name": "transformer", "n_haeds": 4})


def test_config_check_names_the_fix():
    with pytest.raises(ConfigError, match="not divisible by n_heads=3"):
        build_mixer({"name": "transformer", "n_heads": 3}, d_model=64)


def test_duplicate_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_mixer("transformer")
        class Other(TokenMixer):
            config_class = MixerConfig


def test_plugin_is_discovered_through_its_entry_point():
    eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == "tiny_ema"]
    assert eps, "the test plugin's metadata (tests/plugin_fixture) is not on sys.path"
    spec = get_mixer("tiny_ema")
    assert spec.source.startswith("plugin")
    mixer = build_mixer("tiny_ema", d_model=16)
    assert type(mixer).__module__ == "tiny_mixer_plugin"


def test_zoo_mixers_lists_what_builds_here_first(capsys, monkeypatch):
    """The mixers a user can train on this machine come before those it cannot build (CUDA-only ones on a CPU)."""
    from arch_zoo import available_mixers
    from experiments.cli import list_mixers

    monkeypatch.setenv("COLUMNS", "200")
    list_mixers()
    rows = [line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("│ ")]
    names = [n for n in rows if n in available_mixers()]
    unavailable = [available_mixers()[n].mixer_class.unavailable() is not None for n in names]
    assert unavailable == sorted(unavailable) and "retnet" in names
