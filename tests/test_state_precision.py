"""``python -m experiments.state_precision`` on tiny CPU models: a float32 state decodes the training form's own
function, a bfloat16 state costs more than a float16 one, the command rebuilds a run from its checkpoint and saved
config and writes the table, the CSV and an MLflow run, and a model without RetNet says so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from arch_zoo import LanguageModel, ModelConfig
from arch_zoo.contract import ConfigError
from experiments.state_precision import find_config, main, measure, retnet_mixers, state_dtype

VOCAB = 61
RETNET = {"name": "retnet", "head_dim": 8, "mode": "parallel"}


def tiny_model(mixer: dict | None = None, seed: int = 0) -> LanguageModel:
    """Two layers at width 32; a wide init spreads the logits, so argmax ties do not decide greedy agreement."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, mixer=mixer or RETNET, init_std=0.5)
    return LanguageModel(config).eval()


def by_dtype(rows: list[dict]) -> dict[str, dict]:
    return {r["state_dtype"]: r for r in rows}


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    model = tiny_model()
    tokens = torch.randint(VOCAB, (3, 97), generator=torch.Generator().manual_seed(1))
    return by_dtype(measure(model, tokens[:, :-1], tokens[:, 1:], 16, ["auto", "bfloat16", "float16"]))


def test_float32_state_decodes_the_training_forms_function(rows):
    auto, reference = rows["auto"], rows["reference"]
    assert auto["positions"] == reference["positions"] == 3 * 80  # positions 16..95 of each sequence
    assert auto["reference_nll"] == reference["nll"]
    assert abs(auto["nll"] - reference["nll"]) <= 1e-5 * reference["nll"]
    assert abs(auto["rel_delta_nll"]) <= 1e-5
    assert auto["greedy_agreement"] == 100.0
    assert auto["max_logit_diff"] < 1e-4 and auto["nonfinite_logits"] == 0


def test_bfloat16_state_deviates_more_than_float16(rows):
    auto, f16, bf16 = rows["auto"], rows["float16"], rows["bfloat16"]
    for quantity in ("max_logit_diff", "rel_logit_error"):
        assert auto[quantity] < f16[quantity] < bf16[quantity]
    assert abs(f16["delta_nll"]) < abs(bf16["delta_nll"])
    assert bf16["bits"] == pytest.approx(bf16["nll"] / 0.6931471805599453)


def test_state_dtype_is_set_on_every_retnet_mixer_and_restored():
    model = tiny_model({**RETNET, "state_dtype": "float16"})
    with state_dtype(model, "bfloat16"):
        assert [m.config.state_dtype for m in retnet_mixers(model)] == ["bfloat16", "bfloat16"]
    assert [m.config.state_dtype for m in retnet_mixers(model)] == ["float16", "float16"]


def test_a_model_without_retnet_is_refused_by_name():
    model = tiny_model({"name": "transformer", "n_heads": 4})
    tokens = torch.randint(VOCAB, (1, 9))
    with pytest.raises(ConfigError, match="no RetNet mixer.*Attention"):
        measure(model, tokens[:, :-1], tokens[:, 1:], 4, ["float16"])


# --- the command, end to end, on a tiny run directory laid out as zoo-train leaves it ---------------------------


def write_run(tmp: Path, mixer: dict, config_name: str = "config_resolved.yaml") -> Path:
    """A run directory: text files as the corpus, the config as zoo-train saves it, and a Lightning-style checkpoint
    (weights under ``model.``). Returns the checkpoint's path."""
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
    (tmp / "train.txt").write_text(text)
    (tmp / "val.txt").write_text(text[::-1])
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    model = ModelConfig(vocab_size=None, d_model=32, n_layers=2, mixer=mixer)
    config = {
        "model": dataclasses.asdict(model),
        "data": {
            "_target_": "experiments.data.datamodule.TextDataModule",
            "corpus": {"source": "files", "files": [str(tmp / "train.txt")], "val_files": [str(tmp / "val.txt")]},
            "block_size": 32,
            "max_val_tokens": 4096,
            "cache_dir": str(tmp / "cache"),
        },
        "seed": 0,
    }
    OmegaConf.save(OmegaConf.create(config), run / config_name)
    weights = LanguageModel(dataclasses.replace(model, vocab_size=257))  # bytes: 256 values and end of document
    torch.save(
        {"global_step": 7, "state_dict": {f"model.{k}": v for k, v in weights.state_dict().items()}},
        run / "checkpoints" / "last.ckpt",
    )
    return run / "checkpoints" / "last.ckpt"


def test_command_writes_table_csv_and_an_mlflow_run(tmp_path: Path, capsys):
    checkpoint = write_run(tmp_path, RETNET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--length", "64", "--prompt", "16", "--sequences", "3", "--device", "cpu"]
    assert main([*args, "--out", str(out), "--tracking-uri", uri, "--experiment", "sp"]) == 0

    table = capsys.readouterr().out
    assert "| state dtype |" in table and "| bfloat16 |" in table and "step 7" in table
    assert (out / "state_precision.md").read_text() == table
    frame = pd.read_csv(out / "state_precision.csv")
    assert list(frame["state_dtype"]) == ["reference", "auto", "float16", "bfloat16"]
    assert (frame["positions"] == 3 * 48).all()
    auto = frame.set_index("state_dtype").loc["auto"]
    assert auto["greedy_agreement"] == 100.0 and abs(auto["rel_delta_nll"]) <= 1e-5

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert metrics["reference/nll"] == pytest.approx(frame["nll"][0])
    for dtype in ("auto", "bfloat16", "float16"):
        assert {f"{dtype}/{q}" for q in ("nll", "bits", "delta_nll", "greedy_agreement", "rel_logit_error")} <= set(
            metrics
        )
    assert runs[0].data.params["length"] == "64" and runs[0].data.params["step"] == "7"
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert artifacts == {"state_precision.md", "state_precision.csv"}


def test_command_finds_the_hydra_config_and_refuses_a_model_without_retnet(tmp_path: Path, capsys):
    checkpoint = write_run(tmp_path, {"name": "transformer", "n_heads": 4}, config_name=".hydra/config.yaml")
    assert find_config(checkpoint) == checkpoint.resolve().parent.parent / ".hydra" / "config.yaml"
    args = ["--checkpoint", str(checkpoint.parent.parent), "--length", "64", "--prompt", "16", "--sequences", "2"]
    assert main([*args, "--device", "cpu", "--no-log", "--out", str(tmp_path / "out")]) == 2
    assert "no RetNet mixer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_explains_settings_it_cannot_measure(tmp_path: Path, capsys):
    checkpoint = write_run(tmp_path, RETNET)
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--no-log", "--out", str(tmp_path / "out")]
    assert main([*common, "--length", "64", "--prompt", "64"]) == 2
    assert "--prompt 64 must lie in 1..63" in capsys.readouterr().err
    assert main([*common, "--length", "64", "--sequences", "1000"]) == 2
    assert "lower --sequences or --length" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--dtypes", "float8"])
