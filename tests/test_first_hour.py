"""What a new user meets in the first hour: params that MLflow filters find, learning-rate curves named by group,
and one-line refusals of an unknown mixer and of a GPU trainer on a machine without one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from arch_zoo import LanguageModel, ModelConfig
from arch_zoo.contract import ConfigError
from experiments.checks import check_accelerator
from experiments.lit_module import parameter_groups
from experiments.preflight import unknown_mixer
from experiments.tracking import config_params

ZOO_TRAIN = str(Path(sys.executable).with_name("zoo-train"))


def test_booleans_are_logged_as_the_config_spells_them():
    params = config_params(OmegaConf.create({"model": {"tie_embeddings": False}, "compile": True, "seed": 0}))
    assert params == {"model.tie_embeddings": "false", "compile": "true", "seed": "0"}


def test_parameter_groups_are_named_by_what_sets_them_apart():
    model = LanguageModel(ModelConfig(vocab_size=50, d_model=32, n_layers=2, mixer="rwkv"))
    names = [g["name"] for g in parameter_groups(model, 0.1, 3e-3)]
    assert names == ["decay", "no_decay", "no_decay-lr_x2", "no_decay-lr_x3"]  # RWKV-4's 2x and 3x decay rates


def test_an_unknown_mixer_is_answered_by_the_registry_in_one_line():
    assert unknown_mixer(["model/mixer=retnet", "seed=1"]) is None
    assert "Did you mean 'hyena'?" in unknown_mixer(["model/mixer=retnet,hyenna"])
    assert unknown_mixer(["model/hybrid_mixer=choice(retnet,hyena)"]) is None  # Hydra's sweep grammar: Hydra's
    done = subprocess.run([ZOO_TRAIN, "model/mixer=retnett"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "Did you mean 'retnet'?" in done.stderr


def test_a_gpu_trainer_without_a_gpu_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU and this machine has none"):
        check_accelerator(OmegaConf.create({"accelerator": "gpu", "devices": 1}))
    check_accelerator(OmegaConf.create({"accelerator": "cpu", "devices": 1}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="trainer.devices=2 but this machine has 1 CUDA GPU"):
        check_accelerator(OmegaConf.create({"accelerator": "gpu", "devices": 2}))
    monkeypatch.undo()
    if torch.cuda.is_available():
        return  # the command's own check below needs a machine without a GPU
    command = [ZOO_TRAIN, "trainer=ddp", "logger=none", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "trainer=default" in done.stderr


def test_a_hub_dataset_offline_fails_at_once_from_the_cache(monkeypatch):
    """``data=wikitext103`` on a machine without network: one reachability check, then the local cache only (no
    retried requests: no connection is attempted), and one line saying what to do."""
    import socket

    import datasets
    import huggingface_hub.constants

    from experiments.data import corpus

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # restored after the test
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(corpus, "hub_unreachable", lambda: "huggingface.co:443 is unreachable (test)")
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    config = corpus.CorpusConfig(source="hub", name="arch-zoo-tests/no-such-dataset")
    with pytest.raises(ConfigError) as error:
        corpus._hub_identity(config)
    assert attempts == []
    message = str(error.value)
    assert "hub is unreachable" in message and "not in the local datasets cache" in message and "data=stdlib" in message
