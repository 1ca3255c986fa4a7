"""The real entry point, end to end in a subprocess, on tiny settings: what a user sees and what MLflow records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import PLUGIN_PATH

TINY = [
    "model=tiny",
    "trainer=debug",
    "trainer.enable_progress_bar=false",
    "data.block_size=64",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.max_val_tokens=2048",
    "data.max_ood_tokens=2048",
]


def run_train(tmp: Path, cache: Path, *overrides: str, plugin: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "ARCH_ZOO_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if plugin:
        env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_PATH), env.get("PYTHONPATH", "")])
    args = [*TINY, f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={tmp}/run", *overrides]
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
        env=env,
    )


def only_run(tmp: Path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("arch-zoo").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def artifacts(client, run_id: str, path: str = "") -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


@pytest.mark.slow
def test_default_entry_point_trains_and_logs_everything(tmp_path, data_cache):
    proc = run_train(tmp_path, data_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unigram baseline" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.mixer.name"] == "retnet"
    assert params["trainer.max_steps"] == "4" and params["seed"] == "0"
    assert len(params["data.content_hash"]) == 64
    assert int(params["model.n_params"]) > 0
    assert int(params["model.state_size.T512"]) == int(params["model.state_size.T8192"])  # O(1) decoding state
    assert run.data.tags["mlflow.source.git.commit"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2, 3]
    for key in (
        "val/loss",
        "val/ppl",
        "val/bpb",
        "ood/pydoc/bpb",
        "perf/tokens_per_sec",
        "perf/peak_mem_mb",
        "baseline/unigram_bpb.val",
    ):
        assert key in run.data.metrics, key
    files = artifacts(client, run.info.run_id)
    assert {"hydra/config.yaml", "hydra/overrides.yaml", "hydra/config_resolved.yaml"} <= set(files)
    assert any(f.endswith(".ckpt") for f in files)


@pytest.mark.slow
def test_same_seed_reproduces_the_run(tmp_path, data_cache):
    losses = []
    for i in range(2):
        folder = tmp_path / str(i)
        folder.mkdir()
        proc = run_train(folder, data_cache, "model/mixer=transformer", "seed=7", "logger.log_checkpoint=false")
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses.append(only_run(folder)[1].data.metrics["val/loss"])
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_plugin_mixer_trains_by_name_from_an_override(tmp_path, data_cache):
    proc = run_train(
        tmp_path,
        data_cache,
        "model/mixer=tiny_ema",
        "model.mixer.decay=0.5",
        "trainer.max_steps=1",
        "logger.log_checkpoint=false",
        plugin=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run = only_run(tmp_path)
    assert run.data.params["model.mixer.name"] == "tiny_ema"
    assert run.data.params["model.mixer.decay"] == "0.5"
    assert "train/loss" in run.data.metrics


def test_config_error_is_one_line_naming_the_fix(tmp_path, data_cache):
    proc = run_train(tmp_path, data_cache, "model/mixer=transformer", "model.mixer.n_heads=3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: transformer: d_model=64 is not divisible")
    assert not (tmp_path / "mlflow.db").exists()  # nothing was built or logged
