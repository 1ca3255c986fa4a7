"""Every config in the tree composes through Hydra and passes the same checks the entry point runs."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from arch_zoo import ConfigError, LanguageModel, available_mixers
from experiments.train import check, model_config
from tests.conftest import mixer_params

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"
GROUPS = ["model", "data", "trainer", "optim", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_option_composes_and_checks(group, option, monkeypatch):
    # the settings, not this machine's hardware (trainer=gpu on a CPU machine is refused: tests/test_first_hour.py)
    monkeypatch.setattr("experiments.checks.check_accelerator", lambda trainer: None)
    overrides = [f"{group}={option}"]
    if group == "data" and option == "files":
        overrides.append(f"data.corpus.files=[{__file__}]")
    cfg = compose_with(overrides)
    check(cfg)


@pytest.mark.parametrize("name", mixer_params())
def test_every_mixer_selects_by_name_and_builds(name):
    small = available_mixers()[name].config_class.small()  # builds at the tiny model's d_model=64
    fields = [f"model.mixer.{k}={'null' if v is None else v}" for k, v in vars(small).items() if k != "name"]
    cfg = compose_with([f"model/mixer={name}", "model=tiny", *fields])
    model_cfg = model_config(cfg, vocab_size=257)
    assert model_cfg.mixer.name == name
    assert isinstance(LanguageModel(model_cfg), LanguageModel)


def test_misspelt_mixer_field_fails_at_compose():
    with pytest.raises(Exception, match="swish_gaet"):
        compose_with(["model/mixer=retnet", "model.mixer.swish_gaet=false"])


def test_unknown_mixer_lists_the_registered_ones():
    with pytest.raises(Exception) as err:
        compose_with(["model/mixer=retnat"])
    for name in available_mixers():
        assert name in str(err.value)


def test_wrong_type_fails_at_compose():
    with pytest.raises(Exception, match="n_heads"):
        compose_with(["model/mixer=transformer", "model.mixer.n_heads=many"])


def test_indivisible_heads_fail_the_check_with_the_fix():
    cfg = compose_with(["model/mixer=transformer", "model.mixer.n_heads=3"])
    with pytest.raises(ConfigError, match="set model.mixer.n_heads to a divisor of 128"):
        check(cfg)


def test_missing_data_file_fails_the_check():
    cfg = compose_with(["data=files", "data.corpus.files=[/nonexistent/*.txt]"])
    with pytest.raises(ConfigError, match="no file matches"):
        check(cfg)


def test_a_plugin_mixer_joins_a_sweep_as_an_arch_of_its_own():
    """``+arch=NAME`` works for any registered mixer: one without a paper YAML (the test plugin's) runs at its own
    defaults and is labelled by its own name, so it becomes a row of ``+sweep=table5``."""
    assert "tiny_ema" in available_mixers()
    cfg = compose_with(["+sweep=table5", "+arch=tiny_ema"])
    assert cfg.model.mixer.name == "tiny_ema" and cfg.variant == "tiny_ema"
    assert cfg.model.budget_per_layer == 12  # the sweep's equal-size rule still applies
    retnet = compose_with(["+sweep=table5", "+arch=retnet"])
    assert retnet.variant == "RetNet"  # a paper YAML wins over the generic entry


def test_help_names_every_sweep_arch_and_ablation():
    """``zoo-train --help`` lists the sweep-side groups, which Hydra's own listing leaves out: every file there."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    root = Path(__file__).resolve().parents[1] / "sweeps" / "configs"
    for group in ("sweep", "arch", "ablation"):
        line = next(x for x in out.splitlines() if x.startswith(f"+{group}:"))
        for path in (root / group).glob("*.yaml"):
            assert path.stem in line, f"+{group}={path.stem} is missing from zoo-train --help"
