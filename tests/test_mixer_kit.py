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


def _plugin(tmp_path: Path, name: str, source: str) -> dict[str, str]:
    """A one-module plugin package registered as ``name`` (``Mixer`` in ``source``); the environment that finds it."""
    root = tmp_path / name
    (root / f"{name}_mixer").mkdir(parents=True)
    (root / f"{name}_mixer" / "__init__.py").write_text(source)
    info = root / f"{name}_mixer-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-mixer\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[arch_zoo.mixers]\n{name} = {name}_mixer:Mixer\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(PLUGIN_PATH)])}


def test_a_contract_failure_fails_the_check(tmp_path):
    """A plugin that breaks causality is caught: the kit is a real check, not a smoke run."""
    env = _plugin(
        tmp_path,
        "leaky",
        "from arch_zoo import MixerConfig, TokenMixer\n\n"
        "class Mixer(TokenMixer):\n"
        "    config_class = MixerConfig\n\n"
        "    def forward(self, x, state=None, return_state=True):\n"
        "        return x + x.flip(1), None\n\n"
        "    def state_size(self, seq_len):\n"
        "        return 1\n",
    )
    out = subprocess.run([CHECK, "leaky", "--", "-q"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 1
    assert "test_causal[leaky]" in out.stdout and "failed" in out.stdout


def test_a_zero_initialised_output_projection_passes(tmp_path):
    """A mixer whose output projection starts at zero (RWKV-7's official init, fla's RWKV-7 too) outputs 0 at
    initialisation: the contract checks it with that matrix made random, instead of failing "output ignores its
    inputs" on a mixer that is correct."""
    env = _plugin(
        tmp_path,
        "zeroout",
        "from torch import nn\n"
        "from tiny_mixer_plugin import EMAMixer\n\n"
        "class Mixer(EMAMixer):\n"
        "    def __init__(self, d_model, config, layer_idx=0):\n"
        "        super().__init__(d_model, config, layer_idx)\n"
        "        nn.init.zeros_(self.out.weight)\n"
        "        nn.init.zeros_(self.out.bias)\n",
    )
    out = subprocess.run([CHECK, "zeroout", "--", "-q"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
