"""``zoo-generate`` and the sampling under it, on a tiny run directory laid out as ``zoo-train`` leaves it."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from arch_zoo.contract import ConfigError
from arch_zoo.model import sample_next
from experiments.generate import GenerateConfig, run
from experiments.trained_run import build_data_module, find_config, load_model
from tests.test_state_precision import RETNET, write_run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("generate"), RETNET)


def test_greedy_text_is_the_models_own_greedy_continuation(checkpoint):
    out = io.StringIO()
    speed = run(GenerateConfig(checkpoint=str(checkpoint), prompt="def f1(x):", max_new_tokens=12, temperature=0), out)
    assert speed["tokens"] == 12 and speed["tokens_per_s"] > 0
    cfg = OmegaConf.load(find_config(checkpoint))
    data = build_data_module(cfg)
    model, _ = load_model(cfg, checkpoint, data.vocab_size, torch.device("cpu"))
    prompt = torch.tensor([list(b"def f1(x):")])
    expected = data.tokenizer.decode(model.generate(prompt, 12)[0].tolist())
    assert out.getvalue() == expected + "\n"


def test_the_run_directory_and_an_mlflow_run_id_find_the_checkpoint(checkpoint, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("g")).info.run_id
    client.set_tag(run_id, "output_dir", str(checkpoint.parent.parent))
    texts = []
    for where in ({"checkpoint": str(checkpoint.parent.parent)}, {"run_id": run_id, "tracking_uri": uri}):
        out = io.StringIO()
        run(GenerateConfig(prompt="x", max_new_tokens=5, temperature=1.0, seed=3, **where), out)
        texts.append(out.getvalue())
    assert texts[0] == texts[1] and texts[0].startswith("x")  # the same seed samples the same text
    with pytest.raises(ConfigError, match="has no checkpoint on this machine"):
        other = client.create_run(client.get_experiment_by_name("g").experiment_id).info.run_id
        run(GenerateConfig(prompt="x", run_id=other, tracking_uri=uri))


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"prompt": "x"}, "checkpoint=PATH or run_id=ID"),
        ({"prompt": "", "checkpoint": "RUN"}, "prompt= is empty"),
        ({"prompt": "bad \ud800 text", "checkpoint": "RUN"}, "not valid Unicode"),
        ({"prompt": "x", "checkpoint": "RUN", "top_p": 1.5}, "top_p=1.5 must lie in"),
        ({"prompt": "x", "checkpoint": "/nonexistent/last.ckpt"}, "no checkpoint at"),
    ],
)
def test_bad_requests_are_refused_with_the_fix(checkpoint, fields, message):
    if fields.get("checkpoint") == "RUN":
        fields = {**fields, "checkpoint": str(checkpoint)}
    with pytest.raises(ConfigError, match=message):
        run(GenerateConfig(**fields), io.StringIO())


def test_the_command_streams_text_and_refuses_a_misspelt_field(checkpoint):
    command = [sys.executable, "-m", "experiments.generate", f"checkpoint={checkpoint}", "prompt=def", "device=cpu"]
    # the misspelt field's run alongside, as it stops at the config (the CI machine has two cores)
    typo = subprocess.Popen([*command, "max_new_token=4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run([*command, "max_new_tokens=4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("def") and "4 tokens in" in done.stderr
    typo_stderr = typo.communicate(timeout=300)[1]
    assert typo.returncode != 0 and "max_new_token" in typo_stderr


def test_sampling_limits():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    gen = torch.Generator().manual_seed(0)
    assert int(sample_next(logits)) == 0  # greedy
    assert all(int(sample_next(logits, 1.0, top_k=1, generator=gen)) == 0 for _ in range(20))
    assert all(int(sample_next(logits, 1.0, top_p=0.5, generator=gen)) == 0 for _ in range(20))  # p(0) = 0.61
    seen = {int(sample_next(logits, 1.0, top_p=0.9, generator=gen)) for _ in range(300)}
    assert seen == {0, 1, 2}  # 0.61 + 0.22 < 0.9: the third joins; the fourth (cumulative 0.96 before it) never
