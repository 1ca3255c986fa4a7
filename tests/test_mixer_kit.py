"""The mixer author's kit: ``zoo-check-mixer`` runs the contract that ships inside the package, from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PLUGIN_PATH

CHECK = str(Path(sys.executable).with_name("zoo-check-mixer"))


def check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PLUGIN_PATH)}  # the plugin, as if installed; not this repository
    return subprocess.run([CHECK, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_an_outside_plugin_runs_the_shipped_contract_by_name(tmp_path):
    out = check("tiny_ema", "--", "-q", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "tiny_ema: tiny-mixer-plugin 0.1 (tiny_mixer_plugin:EMAMixer)" in out.stdout
    assert " passed" in out.stdout and "failed" not in out.stdout
    assert "retnet" not in out.stdout.split("passed")[0].lower()  # only the named mixer ran


def test_a_name_that_is_not_registered_is_an_error_not_an_empty_run(tmp_path):
    out = check("tiny_emma", cwd=tmp_path)
    assert out.returncode == 2
    assert "Did you mean 'tiny_ema'?" in out.stderr and "passed" not in out.stdout


def test_a_contract_failure_fails_the_check(tmp_path):
    """A plugin that breaks causality is caught: the kit is a real check, not a smoke run."""
    plugin = tmp_path / "leaky"
    (plugin / "leaky_mixer").mkdir(parents=True)
    (plugin / "leaky_mixer" / "__init__.py").write_text(
        "import torch\n"
        "from arch_zoo import MixerConfig, TokenMixer\n\n"
        "class Leaky(TokenMixer):\n"
        "    config_class = MixerConfig\n\n"
        "    def forward(self, x, state=None, return_state=True):\n"
        "        return x + x.flip(1), None\n\n"
        "    def state_size(self, seq_len):\n"
        "        return 1\n"
    )
    info = plugin / "leaky_mixer-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: leaky-mixer\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[arch_zoo.mixers]\nleaky = leaky_mixer:Leaky\n")
    env = {**os.environ, "PYTHONPATH": str(plugin)}
    out = subprocess.run([CHECK, "leaky", "--", "-q"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 1
    assert "test_causal[leaky]" in out.stdout and "failed" in out.stdout
