"""The real entry point, end to end in a subprocess, on tiny settings: what a user sees and what MLflow records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import PLUGIN_PATH

# the installed console script, exactly as a user runs it
ZOO_TRAIN = str(Path(sys.executable).with_name("zoo-train"))

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

# 8 steps, checkpointed every 2: the run that the resume tests (here and in test_fault_injection.py) stop and relaunch
RESUMABLE = [
    "model/mixer=transformer",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "checkpoint_every=2",
    "logger.log_checkpoint=false",
]


def start_train(tmp: Path, cache: Path, *overrides: str, plugin: bool = False) -> subprocess.Popen:
    """zoo-train started in ``tmp`` (its own MLflow store and run folder), not waited for: runs that do not depend
    on each other run side by side, as a run is mostly single-threaded imports and the CI machine has two cores."""
    env = {**os.environ, "ARCH_ZOO_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if plugin:
        env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_PATH), env.get("PYTHONPATH", "")])
    args = [*TINY, f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={tmp}/run", *overrides]
    return subprocess.Popen(
        [ZOO_TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp, env=env
    )


def finished(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_train(tmp: Path, cache: Path, *overrides: str, plugin: bool = False) -> subprocess.CompletedProcess:
    return finished(start_train(tmp, cache, *overrides, plugin=plugin))


def train_side_by_side(tmp: Path, cache: Path, runs: dict[str, list[str]]) -> dict[str, tuple]:
    """Each named run started in its own folder under ``tmp``, all at once, then waited for: name -> (MLflow client,
    its one run), each having exited cleanly."""
    procs = {}
    for name, overrides in runs.items():
        (tmp / name).mkdir()
        procs[name] = start_train(tmp / name, cache, *overrides)
    for proc in procs.values():
        proc = finished(proc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: only_run(tmp / name) for name in runs}


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


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, data_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """One run of the default entry point (its folder and process), which the tests below only read or start from: a
    run is ten seconds of imports and store set-up on the CI machine, whatever its few steps."""
    tmp = tmp_path_factory.mktemp("default_run")
    return tmp, run_train(tmp, data_cache, "data.eval_lengths=[128]", "peak_tflops=0.002")


@pytest.mark.slow
def test_default_entry_point_trains_and_logs_everything(default_run):
    tmp_path, proc = default_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unigram baseline" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.mixer.name"] == "retnet"
    assert params["trainer.max_steps"] == "4" and params["seed"] == "0"
    assert params["model.vocab_size"] == "257"  # bytes and end of document, not the config's null
    assert params["trainer.enable_progress_bar"] == "false" and params["model.tie_embeddings"] == "false"
    assert {"lr-AdamW/decay", "lr-AdamW/no_decay"} <= set(run.data.metrics)  # groups by name, not pg1/pg2
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
        "perf/tflops",
        "perf/mfu",
        "perf/peak_mem_mb",
        "baseline/unigram_bpb.val",
    ):
        assert key in run.data.metrics, key
    # model FLOPs: a training step is three forwards of the declared per-token count, MFU that against the given peak
    metrics, flops = run.data.metrics, float(params["model.flops_per_token"])
    assert flops > 0 and params["perf.peak_tflops"] == "0.002"
    assert metrics["perf/train_tflops"] * 1e12 == pytest.approx(3 * flops * metrics["perf/train_tokens_per_sec"])
    assert metrics["perf/train_mfu"] == pytest.approx(metrics["perf/train_tflops"] / 0.002)
    files = artifacts(client, run.info.run_id)
    assert {"hydra/config.yaml", "hydra/overrides.yaml", "hydra/config_resolved.yaml"} <= set(files)
    assert not any(f.endswith(".ckpt") for f in files)  # the store holds the weights once, not the checkpoint too
    # the trained model as an MLflow Model: loaded by pyfunc, and predict generates from a prompt
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    generator = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    (text,) = generator.predict(["def main("], params={"max_new_tokens": 8})
    assert isinstance(text, str) and len(text.encode()) >= 1
    from experiments.lit_module import LanguageModelTask

    task = LanguageModelTask.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert task.model.config.mixer.name == "retnet" and task.eval_splits[0] == "val"


@pytest.mark.slow
def test_same_seed_reproduces_the_run(tmp_path, data_cache, straight_run):
    """Another process with the same settings and seed as the straight run ends with its loss exactly."""
    proc = run_train(tmp_path, data_cache, *RESUMABLE, "seed=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run = only_run(tmp_path)
    assert run.data.params["seed"] == "0" and run.data.metrics["val/loss"] == straight_run["val/loss"]


@pytest.mark.slow
def test_tokens_per_step_accumulates_to_the_batch_it_names(tmp_path, data_cache):
    """``tokens_per_step=512`` at 4 windows of 64 tokens is an accumulation of 2: the same training as setting that
    accumulation by hand, logged with the effective accumulation and the tokens per optimiser step."""
    common = ["model/mixer=transformer", "seed=3", "trainer.max_steps=4", "trainer.val_check_interval=8"]
    ways = {"tokens": "tokens_per_step=512", "by_hand": "+trainer.accumulate_grad_batches=2"}
    runs = train_side_by_side(
        tmp_path, data_cache, {name: [*common, how, "logger.log_checkpoint=false"] for name, how in ways.items()}
    )
    results = {name: run.data for name, (_, run) in runs.items()}
    for data in results.values():
        assert data.params["trainer.accumulate_grad_batches"] == "2"
        assert data.params["train.tokens_per_step"] == "512"
    assert results["tokens"].metrics["val/loss"] == results["by_hand"].metrics["val/loss"]


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
    # which release of the plugin made the run, and the whole environment beside it
    assert run.data.params["model.mixer.origin.distribution"] == "tiny-mixer-plugin"
    assert run.data.params["model.mixer.origin.version"] == "0.1"
    assert run.data.params["model.mixer.origin.entry_point"] == "tiny_mixer_plugin:EMAMixer"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    packages = Path(client.download_artifacts(run.info.run_id, "environment/packages.txt", str(tmp_path))).read_text()
    assert "tiny-mixer-plugin==0.1" in packages and f"torch=={torch.__version__}" in packages


def test_config_error_is_one_line_naming_the_fix(tmp_path, data_cache):
    proc = run_train(tmp_path, data_cache, "model/mixer=transformer", "model.mixer.n_heads=3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: transformer: d_model=64 is not divisible")
    assert not (tmp_path / "mlflow.db").exists()  # nothing was built or logged


def test_unknown_compile_scope_is_refused_before_anything_is_built(tmp_path, data_cache):
    proc = run_train(tmp_path, data_cache, "compile_scope=layers")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: compile_scope=layers is unknown; choose one of model, blocks"
    assert not (tmp_path / "mlflow.db").exists()


def metric(client, run_id: str, key: str) -> float:
    return client.get_run(run_id).data.metrics[key]


@pytest.mark.slow
def test_killed_run_resumes_into_the_same_mlflow_run_with_the_same_result(tmp_path, data_cache, straight_run):
    killed = run_train(tmp_path, data_cache, *RESUMABLE, "inject_failure={at_step: 5, kind: kill}")
    assert killed.returncode != 0
    client, run = only_run(tmp_path)
    assert run.info.status == "RUNNING"  # killed: nobody closed it
    resumed = run_train(tmp_path, data_cache, *RESUMABLE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming MLflow run" in resumed.stderr + resumed.stdout
    client, run = only_run(tmp_path)  # still one run
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert max(steps) == 7
    assert run.data.metrics["val/loss"] == straight_run["val/loss"]
    assert run.data.metrics["ood/pydoc/loss"] == straight_run["ood/pydoc/loss"]


@pytest.mark.slow
def test_failed_trials_are_marked_and_the_sweep_goes_on(tmp_path, data_cache):
    env = {**os.environ, "ARCH_ZOO_CACHE": str(data_cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        *TINY,
        "model/mixer=transformer",
        "trainer.max_steps=3",
        "logger.log_checkpoint=false",
        f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "sweep_name=reliability",
        "inject_failure=null,{at_step: 1, kind: raise},{at_step: 1, kind: diverge},{at_step: 1, kind: bogus}",
    ]
    proc = subprocess.run(
        [ZOO_TRAIN, "-m", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("arch-zoo").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4
    assert all(r.data.tags["sweep"] == "reliability" for r in children)
    assert sum(r.info.status == "FINISHED" for r in children) == 1
    failed = [r for r in children if r.info.status == "FAILED"]
    reasons = {r.data.tags["failure_reason"].split(":")[0] for r in failed}
    assert reasons == {"RuntimeError", "DivergedError", "ValueError"}  # a bad trial config is recorded too
    assert all(r.data.tags.get("diverged") == "true" for r in failed if "Diverged" in r.data.tags["failure_reason"])
    assert parents[0].data.metrics["sweep/failed_trials"] == 3
    assert parents[0].info.run_name == "reliability (sweep)"
    # a trial is named by what sets it apart in its sweep, not by the settings every trial shares
    names = [r.info.run_name for r in children]
    assert all(n.removeprefix("failed: ").startswith("transformer inject_failure=") for n in names), names
    assert not any("max_steps" in r.info.run_name or "tracking_uri" in r.info.run_name for r in children)
    assert parents[0].data.tags["best_trial_run_id"] == next(
        r.info.run_id for r in children if r.info.status == "FINISHED"
    )


def test_a_plain_multiruns_parent_is_named_by_what_it_sweeps():
    from experiments.sweep_callback import parent_name

    overrides = ["model/mixer=retnet,transformer", "seed=0", "optim.lr=range(1,3)"]
    assert parent_name(None, overrides) == "sweep model/mixer=retnet,transformer optim.lr=range(1,3)"
    assert parent_name("table5", overrides) == "table5 (sweep)"


@pytest.mark.slow
def test_ablation_sweep_runs_from_one_override(tmp_path, data_cache):
    env = {**os.environ, "ARCH_ZOO_CACHE": str(data_cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        "+sweep=retnet_ablation",
        *TINY,
        "seed=0",
        "trainer.max_steps=2",
        "logger.log_checkpoint=false",
        "final_validate=false",
        f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    proc = subprocess.run([ZOO_TRAIN, "-m", *args], capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("retnet_ablation").experiment_id])
    trials = {r.data.tags["variant"]: r for r in runs if "variant" in r.data.tags}
    assert set(trials) == {
        "Full RetNet",
        "- swish gate",
        "- GroupNorm",
        "- γ decay",
        "- multi-scale decay",
        "reduce head dimension",
    }
    assert all(r.info.status == "FINISHED" for r in trials.values())
    assert trials["- swish gate"].data.params["model.mixer.swish_gate"] == "false"
    assert trials["- γ decay"].data.params["model.mixer.decay"] == "false"
    assert trials["reduce head dimension"].data.params["model.mixer.head_dim_divisor"] == "4"  # relative, not a literal


@pytest.mark.slow
def test_local_text_files_with_a_locally_trained_bpe(tmp_path, data_cache):
    corpus = tmp_path / "corpus"
    (corpus / "val").mkdir(parents=True)
    for i in range(12):  # one document per file
        (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + "the quick brown fox jumps over the lazy dog. " * 60)
    (corpus / "val" / "doc.txt").write_text("The lazy dog sleeps; the quick brown fox runs. " * 60)
    proc = run_train(
        tmp_path,
        data_cache,
        "data=files",
        f"data.corpus.files=[{corpus}/*.txt]",
        f"data.corpus.val_files=[{corpus}/val/*.txt]",
        "data.tokenizer=bpe",
        "data.bpe_vocab_size=300",
        "data.block_size=32",
        "model/mixer=transformer",
        "logger.log_checkpoint=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run = only_run(tmp_path)
    assert run.data.params["data.vocab_size"] == "300"
    assert run.data.params["data.tokenizer"] == "bpe"
    assert 0 < run.data.metrics["val/bpb"] < 8
    assert list((data_cache).glob("bpe300-*.json")), "the trained tokeniser is cached for the next run"


def loss_curves(tmp_path, data_cache, accelerator: str, parallel: list[str]) -> dict[str, list[float]]:
    """train/loss per step of one device at batch 4 and of ``parallel`` at batch 2 per rank (two ranks)."""
    common = [
        f"trainer.accelerator={accelerator}",
        "trainer.precision=32-true",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "logger.log_checkpoint=false",
    ]
    runs = {"one": [*common, "data.batch_size=4"], "parallel": [*common, *parallel, "data.batch_size=2"]}
    curves = {}
    for name, (client, run) in train_side_by_side(tmp_path, data_cache, runs).items():
        assert run.info.status == "FINISHED"
        history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
        curves[name] = [m.value for m in history]
        world = 1 if name == "one" else 2  # the per-device rate is what the scaling efficiency compares
        per_device = run.data.metrics["perf/train_tokens_per_sec_per_device"]
        assert per_device == pytest.approx(run.data.metrics["perf/train_tokens_per_sec"] / world)
    assert len(curves["one"]) == len(curves["parallel"]) >= 3
    return curves


@pytest.mark.slow
def test_ddp_on_two_processes_follows_the_single_device_loss_curve(tmp_path, data_cache):
    """trainer=ddp (2 CPU processes, gloo) at batch 2 per rank logs one MLflow run whose loss curve is that of one
    process at batch 4: each rank reads its slice of the same global batches and gradients are averaged."""
    curves = loss_curves(tmp_path, data_cache, "cpu", ["trainer=ddp"])
    assert curves["parallel"] == pytest.approx(curves["one"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_follow_the_single_gpu_loss_curve(tmp_path, data_cache, strategy):
    """The same on two GPUs (NCCL), for DDP and FSDP (float32, so the curves agree to reduction order)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    curves = loss_curves(tmp_path, data_cache, "gpu", [f"trainer={strategy}"])
    assert curves["parallel"] == pytest.approx(curves["one"], rel=1e-3)


@pytest.mark.gpu
def test_a_gpu_run_trains_in_bf16_with_clipping_and_logs_its_mfu(tmp_path, data_cache):
    """``trainer=gpu`` as users run it: bf16-mixed, gradients clipped, the fused AdamW. Its first step once failed
    on every GPU (Lightning refused to clip for the fused AdamW); the run must finish and report its MFU."""
    proc = run_train(
        tmp_path, data_cache, "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "logger.log_checkpoint=false"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["trainer.gradient_clip_val"] == "1.0"
    assert 0 < run.data.metrics["perf/mfu"] < 1 and run.data.metrics["val/loss"] < 10


def test_under_fsdp_the_final_metrics_are_the_last_validations():
    """Lightning cannot run a second loop on an FSDP-sharded model (issue #19015): zoo-train reports the fit's last
    validation instead of failing after the whole run."""
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.strategies import FSDPStrategy

    from experiments.train import final_validation

    metrics = {"train/loss": torch.tensor(3.0), "val/loss": torch.tensor(2.5), "ood/pydoc/bpb": torch.tensor(1.25)}
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callback_metrics=metrics, global_step=6)
    task = SimpleNamespace(eval_splits=["val", "ood_pydoc"])
    assert final_validation(trainer, task, data=None) == {"val/loss": 2.5, "ood/pydoc/bpb": 1.25}


def built_run(tmp: Path, cache: Path, monkeypatch, *overrides: str):
    """``build_run`` in this process, as another entry point would call it: a run built and not fitted."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from experiments.train import build_run

    monkeypatch.setenv("ARCH_ZOO_CACHE", str(cache))
    with initialize_config_module("experiments.conf", version_base="1.3"):
        cfg = compose("train", [*TINY, "logger=none", *overrides], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return build_run(cfg)


def test_build_run_makes_a_run_without_fitting_it_with_the_configured_callbacks(tmp_path, data_cache, monkeypatch):
    """The default callbacks group gives today's callbacks (the progress bar left out where the trainer has none, the
    learning-rate monitor where there is no logger); a callback is removed or added by override."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    from experiments.callbacks import Throughput
    from experiments.interrupts import CheckpointOnSignal

    run = built_run(tmp_path, data_cache, monkeypatch)
    kinds = {type(c) for c in run.trainer.callbacks}
    assert {Throughput, ModelCheckpoint, CheckpointOnSignal} <= kinds
    assert not any(issubclass(k, (RichProgressBar, LearningRateMonitor)) for k in kinds)
    assert run.trainer.global_step == 0 and run.logger is None and run.task.model.config.mixer.name == "retnet"
    assert not (tmp_path / "checkpoints").exists()  # built, not trained

    run = built_run(tmp_path, data_cache, monkeypatch, "trainer.enable_progress_bar=true", "~callbacks.throughput")
    assert any(isinstance(c, RichProgressBar) for c in run.trainer.callbacks)
    assert not any(isinstance(c, Throughput) for c in run.trainer.callbacks)


def test_model_summary_prints_the_declared_flops_of_a_training_sequence(tmp_path, data_cache, monkeypatch, capsys):
    """Lightning's summary printed "Total FLOPs: 0" on every run (it counts only an example input, which the model
    does not set); the run's summary gives the model's declared forward FLOPs of one training window instead, and
    ``+trainer.enable_model_summary=false`` still turns the summary off."""
    from lightning.pytorch.utilities.model_summary import get_human_readable_count

    from experiments.callbacks import DeclaredFlopsSummary

    run = built_run(tmp_path, data_cache, monkeypatch)
    (summary,) = [c for c in run.trainer.callbacks if isinstance(c, DeclaredFlopsSummary)]
    T = run.cfg.data.block_size
    assert summary.length == T
    capsys.readouterr()
    summary.on_fit_start(run.trainer, run.task)
    printed = capsys.readouterr().out
    declared = get_human_readable_count(round(run.task.model.flops_per_token(T) * T))
    assert f"Total FLOPs: {declared}" in printed and declared != "0", printed

    run = built_run(tmp_path, data_cache, monkeypatch, "+trainer.enable_model_summary=false")
    assert not any(isinstance(c, DeclaredFlopsSummary) for c in run.trainer.callbacks)


def host_reads_by_step(trainer) -> tuple[object, dict[int, list[str]]]:
    """A mode that records, by training step, every read of a tensor's value on the host (``item``, ``bool``,
    ``float``, ``tolist``, ...) and the code that made it; outside validation, and leaving out the reads of tensors
    that live on the host by design (the optimiser's step counters, the sampler's indices)."""
    import traceback

    from torch.overrides import TorchFunctionMode

    reads: dict[int, list[str]] = {}
    names = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}
    host_side = ("torch/optim/", "torch/utils/data/")

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in names and trainer.training:
                stack = traceback.format_stack(limit=12)
                if not any(part in line for line in stack for part in host_side):
                    reads.setdefault(trainer.global_step, []).append("".join(stack[-4:-1]))
            return func(*args, **(kwargs or {}))

    return Reads(), reads


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_training_step_reads_nothing_back_from_the_device_between_logging_steps(
    tmp_path, data_cache, monkeypatch, micro_batches
):
    """On a GPU, reading a tensor's value waits for every kernel queued before it, so the host cannot queue the next
    step while this one runs. Two such reads came with every step: the loss's finiteness check and Lightning's
    conversion of a value logged to the progress bar (after every batch). Now the progress bar and the logger read
    the loss on logging steps only, and the losses are checked together there, once a step however many
    micro-batches it accumulates; on the CPU the reads are counted."""
    run = built_run(
        tmp_path, data_cache, monkeypatch, "trainer.enable_progress_bar=true", "trainer.max_steps=12",
        "trainer.log_every_n_steps=5", "trainer.val_check_interval=12", "optim.warmup_steps=2",
        f"tokens_per_step={micro_batches * 4 * 64}",  # TINY's batch 4 of 64 tokens, accumulated
    )  # fmt: skip
    assert run.trainer.accumulate_grad_batches == micro_batches
    mode, reads = host_reads_by_step(run.trainer)
    with mode:
        run.trainer.fit(run.task, datamodule=run.data)
    quiet = {2, 3, 4, 6, 7, 8, 9, 11}  # not the first step, not a logging step, not the end of training
    assert not quiet & reads.keys(), {step: reads[step][:1] for step in quiet & reads.keys()}
    assert {5, 10} <= reads.keys()  # the logging steps read the loss (the mode sees reads)
    for module in ("lit_module.py", "callbacks.py"):  # the check and the progress bar: one read a logging step
        assert sum(module in where for where in reads[5]) == 1, reads[5]


def test_training_batches_are_pinned_for_a_gpu(tmp_path, data_cache, monkeypatch):
    """A batch in pageable memory may make the driver wait for the GPU's stream to stage its copy; pinned, it goes
    over without. Only a run on a GPU pins (pinning needs one)."""
    run = built_run(tmp_path, data_cache, monkeypatch)
    run.data.trainer = run.trainer
    run.data.setup("fit")
    assert run.data.train_dataloader().pin_memory is False
    monkeypatch.setattr(run.trainer.strategy, "_root_device", torch.device("cuda", 0))
    assert run.data.train_dataloader().pin_memory is True


def test_a_diverged_run_fails_at_its_first_bad_step_and_saves_no_checkpoint_after_it(tmp_path, data_cache, monkeypatch):
    """The losses are checked a few steps late (above), but before any checkpoint is written: the run fails naming
    the step whose loss was NaN, and the checkpoint it would resume from holds the weights before it."""
    from experiments.lit_module import DivergedError

    run = built_run(
        tmp_path, data_cache, monkeypatch, "trainer.max_steps=12", "trainer.log_every_n_steps=5",
        "trainer.val_check_interval=12", "optim.warmup_steps=2", "checkpoint_every=2",
        "inject_failure={at_step: 2, kind: diverge}",
    )  # fmt: skip
    with pytest.raises(DivergedError, match="training loss is nan at step 2"):
        run.trainer.fit(run.task, datamodule=run.data)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    assert all(v.isfinite().all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert run.trainer.global_step == 4  # it stopped at the next checkpoint, not at the end


def test_build_run_checks_the_mixer_config_once(tmp_path, data_cache, monkeypatch):
    """zoo-train checks the model's config before the data loads (a stand-in vocabulary), and the build takes the
    checked layer configs from that check instead of checking again, in the model or in each layer."""
    from arch_zoo.mixers.retnet import RetNetConfig
    from tests.test_model import counting_checks

    checks = counting_checks(monkeypatch, RetNetConfig)
    run = built_run(tmp_path, data_cache, monkeypatch)
    assert len(run.task.model.blocks) > 1 and checks == [run.task.model.config.d_model]


def test_a_sweep_logs_the_paper_table_it_reproduces(tmp_path, data_cache):
    """The sweep's YAML declares ``paper_table``; every trial records it as a tag, which zoo-table reads."""
    proc = run_train(tmp_path, data_cache, "+sweep=retnet_ablation", "+ablation=no_swish_gate", "model=tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("retnet_ablation").experiment_id])
    assert run.data.tags["paper_table"] == "table6" and run.data.tags["sweep"] == "retnet_ablation"
    assert run.data.params["model.mixer.swish_gate"] == "false"  # what analysis matches the paper's row by


def test_a_validation_at_the_last_step_is_not_repeated(tmp_path, data_cache, default_run):
    """The final weights' metrics come from the fit's own last validation when it ran at the last step: one point
    at the end of each curve, not a second pass over the validation data; otherwise one more validation runs. (The
    default run validates every 2 of its 4 steps.)"""
    every_3 = run_train(tmp_path, data_cache, "trainer.max_steps=4", "trainer.val_check_interval=3")
    for (folder, proc), expected in ((default_run, [2, 4]), ((tmp_path, every_3), [3, 4])):
        assert proc.returncode == 0, proc.stderr[-3000:]
        client, run = only_run(folder)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        assert steps == expected  # at the optimiser step the weights have taken, as a sweeper reports it
        assert "val/bpb" in run.data.metrics and "bits/byte" in proc.stdout


@pytest.mark.slow
def test_a_run_warm_starts_from_another_run(data_cache, default_run):
    """``init_from=<run id>``: the new run starts from that run's final weights (at a learning rate of 1e-30 it ends
    with exactly them), is tagged with where it came from, and a model of another shape is refused naming what
    differs."""
    tmp_path, first = default_run  # seed 0; the new run's own initialisation (seed 2) differs
    assert first.returncode == 0, first.stderr[-3000:]
    client, source = only_run(tmp_path)
    folder, wider_folder = tmp_path / "second", tmp_path / "wider"
    folder.mkdir(), wider_folder.mkdir()
    args = [f"init_from={source.info.run_id}", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    second = start_train(folder, data_cache, *args, "optim.lr=1e-30", "seed=2", "logger.experiment_name=warm")
    wider = start_train(wider_folder, data_cache, *args, "model.d_model=32", "logger.experiment_name=wider")
    second, wider = finished(second), finished(wider)
    assert second.returncode == 0, second.stderr[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("warm").experiment_id])
    assert run.data.tags["init_from_run_id"] == source.info.run_id and run.data.tags["init_from_step"] == "4"
    before = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    after = torch.load(folder / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert wider.returncode == 2
    assert "its model differs from this run's" in wider.stderr.strip().splitlines()[-1]


def test_the_progress_bar_counts_steps_not_a_negative_epoch():
    from types import SimpleNamespace

    from experiments.callbacks import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=600, max_epochs=-1)  # a run sized by steps, as every run here is
    assert bar._get_train_description(0).strip() == "train (600 steps)"


def test_compile_mode_reaches_every_compiled_graph_and_an_unknown_one_is_refused(tmp_path, data_cache, monkeypatch):
    """``compile=true compile_mode=max-autotune-no-cudagraphs``: the run compiles its model in that mode (the blocks and
    the loss, :func:`arch_zoo.model.compile_model`); a mode torch.compile does not have is refused with the choices
    before anything is built."""
    from hydra import compose, initialize_config_module
    from torch import nn

    from arch_zoo.errors import ConfigError
    from experiments import train as train_module

    seen = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    monkeypatch.setattr("torch.compile", lambda fn, **kw: seen.append((fn.__name__, kw)) or fn)
    mode = "max-autotune-no-cudagraphs"
    run = built_run(tmp_path, data_cache, monkeypatch, "compile=true", "compile_scope=blocks", f"compile_mode={mode}")
    blocks = run.task.model.config.n_layers
    assert seen == [("token_cross_entropy", {"mode": mode})] + [("Block", {"mode": mode})] * blocks
    with initialize_config_module("experiments.conf", version_base="1.3"):
        bad = compose("train", [*TINY, "logger=none", "compile=true", "compile_mode=fast"])
    with pytest.raises(ConfigError, match="compile_mode=fast is unknown; choose one of default, max-autotune-no-cud"):
        train_module.check(bad)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_a_compile_mode_that_captures_cuda_graphs_is_refused_for_training_before_anything_is_built(tmp_path, mode):
    """On an H100, ``compile=true compile_mode=reduce-overhead`` compiled a table5_small run and then failed at its
    first steps ("tensors in the cudagraph pool not tracked as outputs": the step keeps its loss past the next
    step's graph). The run is refused at once, naming the modes that work; without ``compile=true`` the mode is
    unused and nothing is refused."""
    from hydra import compose, initialize_config_module

    from arch_zoo.errors import ConfigError
    from experiments import train as train_module

    with initialize_config_module("experiments.conf", version_base="1.3"):
        graphs = compose("train", [*TINY, "logger=none", "compile=true", f"compile_mode={mode}"])
        uncompiled = compose("train", [*TINY, "logger=none", f"compile_mode={mode}"])
    refusal = f"compile_mode={mode} runs the model as captured CUDA graphs.*use compile_mode=default or compile_mode"
    with pytest.raises(ConfigError, match=refusal):
        train_module.check(graphs)
    train_module.check(uncompiled)


def test_float32_matmul_precision_is_set_for_the_run_and_restored(tmp_path, data_cache, monkeypatch):
    """``float32_matmul_precision=high`` runs the fit with TF32 float32 products (what stays float32 under autocast),
    the process's setting comes back afterwards, and a value torch does not know is refused with the choices."""
    import torch
    from hydra import compose, initialize_config_module

    from arch_zoo.errors import ConfigError
    from experiments import train as train_module

    monkeypatch.setenv("ARCH_ZOO_CACHE", str(data_cache))
    with initialize_config_module("experiments.conf", version_base="1.3"):
        cfg = compose("train", [*TINY, "logger=none", "float32_matmul_precision=high"])
        bad = compose("train", [*TINY, "logger=none", "float32_matmul_precision=tf32"])
    seen = []
    monkeypatch.setattr(train_module, "build_run", lambda cfg, settings: None)
    monkeypatch.setattr(train_module, "fit", lambda run: seen.append(torch.get_float32_matmul_precision()) or {})
    before = torch.get_float32_matmul_precision()
    train_module.train(cfg)
    assert seen == ["high"] and torch.get_float32_matmul_precision() == before == "highest"
    with pytest.raises(ConfigError, match="float32_matmul_precision=tf32 is unknown; choose one of highest, high"):
        train_module.check(bad)
