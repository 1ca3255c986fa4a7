"""Exporting a trained model: safetensors + config that load back bit for bit, and an MLflow Model that generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from arch_zoo import LanguageModel, ModelConfig
from arch_zoo.contract import ConfigError
from arch_zoo.export import load_pretrained, save_pretrained
from experiments.export import ExportConfig, run
from tests.test_state_precision import RETNET, write_run


@pytest.mark.parametrize(
    "shape",
    [
        {"mixer": RETNET, "target_params": 30_000},  # the budget's FFN width is kept, not recomputed
        {"mixer": {"name": "transformer", "n_heads": 4}, "tie_embeddings": True},
        {"mixer": RETNET, "hybrid_mixer": "linear_attention", "hybrid_layers": [1]},
    ],
    ids=["retnet-budget", "transformer-tied", "hybrid"],
)
def test_save_and_load_are_bit_identical(tmp_path, shape):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=61, d_model=32, n_layers=2, **shape)).eval()
    save_pretrained(model, tmp_path / "m", extra={"note": "kept"})
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config.ffn == model.config.ffn
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randint(61, (2, 17))
    assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    if shape.get("tie_embeddings"):
        assert loaded.head.weight is loaded.embedding.weight


def test_a_directory_that_is_not_an_export_says_so(tmp_path):
    with pytest.raises(ConfigError, match="not an exported model"):
        load_pretrained(tmp_path)


def test_a_run_exports_and_logs_an_mlflow_model_that_generates(tmp_path):
    checkpoint = write_run(tmp_path, RETNET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "art"))).info.run_id
    client.set_tag(run_id, "output_dir", str(checkpoint.parent.parent))
    out, model_uri = run(ExportConfig(run_id=run_id, tracking_uri=uri, out=str(tmp_path / "exported"), log_model=True))
    assert (out / "model.safetensors").is_file() and model_uri
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    texts = pyfunc.predict(["def f1(x):", "ret"], params={"max_new_tokens": 6})
    exported = load_pretrained(out)
    greedy = exported.generate(torch.tensor([list(b"ret")]), 6)[0, 3:].tolist()
    assert len(texts) == 2 and texts[1] == bytes(greedy).decode("utf-8", errors="replace")
    with pytest.raises(ConfigError, match="checkpoint=PATH or run_id=ID"):
        run(ExportConfig())


def test_the_command_exports_a_run_directory(tmp_path):
    checkpoint = write_run(tmp_path, RETNET)
    command = [sys.executable, "-m", "experiments.export", f"checkpoint={checkpoint.parent.parent}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.split("exported to ")[1].strip()).joinpath("config.json").is_file()
