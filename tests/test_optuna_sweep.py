"""The Optuna sweeper through the real entry point (``zoo-train -m +sweep=mixer_search``) on tiny settings: a search
that completes, resumes, survives failed trials, prunes, runs in parallel, submits to SLURM, and shows in MLflow as
one parent run with its trials as children; plus the pruning callback and the search-space parsing in-process."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from wsgiref.util import setup_testing_defaults

import mlflow
import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from sweeps.optuna_sweeper import OptunaPruning, hydra_literal, search_space

ZOO_TRAIN = str(Path(sys.executable).with_name("zoo-train"))
STUDY = "mixer_search_transformer"  # mixer_search names its study after the mixer
TINY = [
    "model=tiny",
    "trainer=debug",  # 4 steps, validation at steps 2 and 4
    "trainer.enable_progress_bar=false",
    "data.block_size=64",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.max_val_tokens=2048",
    "data.max_ood_tokens=2048",
    "model/mixer=transformer",
    "logger.log_checkpoint=false",
]
LR = FloatDistribution(1e-4, 3e-2, log=True)  # mixer_search's space
SPACE = {
    "optim.lr": LR,
    "optim.warmup_steps": IntDistribution(0, 200),
    "optim.weight_decay": FloatDistribution(1e-3, 0.3, log=True),
}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def search_args(tmp: Path, *overrides: str) -> list[str]:
    return [
        "-m",
        "+sweep=mixer_search",
        "hydra/sweeper=optuna",
        *TINY,
        f"logger.tracking_uri={mlflow_uri(tmp)}",
        f"hydra.sweep.dir={tmp}/sweep",
        f"hydra.sweeper.storage={storage(tmp)}",
        *overrides,
    ]


def search(tmp: Path, cache: Path, *overrides: str, env_extra: dict[str, str] | None = None):
    env = {**os.environ, "ARCH_ZOO_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = search_args(tmp, *overrides)
    return subprocess.run([ZOO_TRAIN, *args], capture_output=True, text=True, timeout=600, cwd=tmp, env=env)


def storage(tmp: Path) -> str:
    return f"sqlite:///{tmp}/optuna.db"


def mlflow_uri(tmp: Path) -> str:
    return f"sqlite:///{tmp}/mlflow.db"


def study_of(tmp: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=storage(tmp))


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def sweep_runs(tmp: Path) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    """The one parent run of the sweep and its child runs."""
    client = mlflow.MlflowClient(mlflow_uri(tmp))
    runs = client.search_runs([client.get_experiment_by_name("mixer_search").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1  # no trial outside the sweep's row
    return parents[0], children


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, data_cache) -> Path:
    """One three-trial search with the default (sequential) launcher, shared by the tests that read it."""
    tmp = tmp_path_factory.mktemp("sequential_search")
    proc = search(tmp, data_cache, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_search_completes_n_trials_as_child_runs_of_one_parent(sequential):
    study = study_of(sequential)
    trials = study.get_trials()
    assert states(study) == ["COMPLETE"] * 3
    assert len({t.params["optim.lr"] for t in trials}) == 3
    for trial in trials:
        assert set(trial.params) == set(SPACE)
        assert all(SPACE[k]._contains(SPACE[k].to_internal_repr(v)) for k, v in trial.params.items())
        assert sorted(trial.intermediate_values) == [2, 4]  # the callback reported both validations

    parent, children = sweep_runs(sequential)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "mixer_search"
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    by_id = {r.info.run_id: r for r in children}
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == set(by_id)  # from the dashboard to MLflow
    for trial in trials:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["sweep"] == "mixer_search"
        assert float(run.data.params["optim.lr"]) == trial.params["optim.lr"]
        assert int(run.data.params["optim.warmup_steps"]) == trial.params["optim.warmup_steps"]
        assert run.data.metrics["val/loss"] == pytest.approx(trial.value)
        assert run.info.run_name.startswith(f"trial {trial.number} lr=")
    # the parent row says which trial won, and the dashboard names the objective
    best = min(trials, key=lambda t: t.value)
    assert parent.data.tags["best_trial_run_id"] == best.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["sweep/best_val/loss"] == pytest.approx(best.value)
    assert study.metric_names == ["val/loss"]
    summary = (sequential / "sweep" / "optuna_study.yaml").read_text()
    assert f"number: {study.best_trial.number}" in summary


@pytest.mark.slow
def test_the_study_is_readable_by_optuna_dashboard(sequential):
    from optuna_dashboard import wsgi

    app = wsgi(storage(sequential))

    def get(path: str) -> dict:
        environ = {"PATH_INFO": path, "wsgi.input": io.BytesIO()}
        setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
        assert status[0].startswith("200"), status
        return json.loads(body)

    (summary,) = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == STUDY
    detail = get(f"/api/studies/{summary['study_id']}")
    assert len(detail["trials"]) == 3 and detail["has_intermediate_values"]


@pytest.mark.slow
def test_killed_search_resumes_and_retries_the_trial_it_was_running(tmp_path, data_cache):
    longer = ["hydra.sweeper.n_trials=2", "trainer.max_steps=20", "trainer.val_check_interval=2"]
    env = {**os.environ, "ARCH_ZOO_CACHE": str(data_cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    output = tmp_path / "first.log"
    with output.open("w") as log:
        first = subprocess.Popen(
            [ZOO_TRAIN, *search_args(tmp_path, *longer)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:  # kill the search once its second trial has reported a validation: a trial is in flight
        deadline = time.monotonic() + 300
        while not in_second_trial(tmp_path):
            assert first.poll() is None, "the search ended before it was killed:\n" + output.read_text()[-3000:]
            assert time.monotonic() < deadline, "the second trial never reported"
            time.sleep(0.1)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert states(study_of(tmp_path)) == ["COMPLETE", "RUNNING"]

    proc = search(tmp_path, data_cache, *longer)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 interrupted trial(s) enqueued again" in proc.stderr + proc.stdout
    trials = study_of(tmp_path).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]  # exactly n_trials finished
    killed, retry = trials[1], trials[2]
    assert killed.user_attrs["failure"].startswith("interrupted")
    assert retry.params == killed.params and retry.user_attrs["retry_of"] == killed.number
    assert sorted(retry.intermediate_values) == list(range(2, 21, 2))


def in_second_trial(tmp: Path) -> bool:
    if not (tmp / "sweep" / "1").is_dir():  # not launched yet; and the storage is the search's to create first
        return False
    trials = study_of(tmp).get_trials()
    return len(trials) == 2 and trials[1].state == TrialState.RUNNING and bool(trials[1].intermediate_values)


@pytest.mark.slow
def test_failed_trials_are_told_fail_and_pruned_trials_pruned(tmp_path, data_cache):
    study = optuna.create_study(study_name=STUDY, storage=storage(tmp_path))
    at_step = CategoricalDistribution([1, 1000])  # 1: the injected failure fires; 1000: never reached
    # a finished trial so good that the median pruner stops every later trial at its first validation
    study.add_trial(
        optuna.trial.create_trial(
            params={"optim.lr": 1e-3, "inject_failure.at_step": 1000},
            distributions={"optim.lr": LR, "inject_failure.at_step": at_step},
            value=0.0,
            intermediate_values={2: 0.0, 4: 0.0},
        )
    )
    study.enqueue_trial({"inject_failure.at_step": 1})  # the next trial fails for sure
    proc = search(
        tmp_path,
        data_cache,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner.n_startup_trials=1",
        "hydra.sweeper.pruner.n_warmup_steps=0",
        "hydra.sweeper.sampler.seed=3",
        "hydra.sweeper.max_failures=10",
        "inject_failure={at_step: 1000, kind: raise}",
        "inject_failure.at_step=choice(1, 1000)",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = study_of(tmp_path).get_trials()
    assert [t.state for t in trials].count(TrialState.PRUNED) == 1  # the second finished trial ends the search
    assert trials[0].state == TrialState.COMPLETE and trials[-1].state == TrialState.PRUNED
    failed = trials[1:-1]
    assert failed and all(t.state == TrialState.FAIL for t in failed)  # the search went on after each failure
    assert all(t.params["inject_failure.at_step"] == 1 for t in failed)
    pruned = trials[-1]
    assert pruned.params["inject_failure.at_step"] == 1000 and pruned.user_attrs["pruned"] is True
    assert list(pruned.intermediate_values) == [2]  # stopped at its first validation

    _, children = sweep_runs(tmp_path)
    status = sorted(r.info.status for r in children)
    assert status == sorted(["FAILED"] * len(failed) + ["KILLED"])
    (killed,) = [r for r in children if r.info.status == "KILLED"]
    assert killed.data.tags["pruned"] == "true"
    assert all("injected failure" in r.data.tags["failure_reason"] for r in children if r.info.status == "FAILED")


@pytest.mark.slow
def test_parallel_trials_share_the_mlflow_store_and_lose_nothing(tmp_path, data_cache, sequential):
    # trials long enough to overlap although the two workers start apart: 30 steps took 0.6 s on an idle 2-core
    # machine, and the second worker started 0.3 s after the first trial had ended
    longer = ["trainer.max_steps=200", "trainer.val_check_interval=100"]
    proc = search(tmp_path, data_cache, "hydra/launcher=local_parallel", "hydra.sweeper.n_trials=2", *longer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is launching 2 jobs" in proc.stderr + proc.stdout  # one batch of two, in two worker processes
    assert states(study_of(tmp_path)) == ["COMPLETE", "COMPLETE"]
    _, parallel = sweep_runs(tmp_path)
    assert len(parallel) == 2 and all(r.info.status == "FINISHED" for r in parallel)
    a, b = parallel
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time, "they did not overlap"
    reference = sweep_runs(sequential)[1][0]
    client = mlflow.MlflowClient(mlflow_uri(tmp_path))
    reference_client = mlflow.MlflowClient(mlflow_uri(sequential))
    reference_artifacts = {a.path for a in reference_client.list_artifacts(reference.info.run_id, "hydra")}
    for run in parallel:
        assert len(run.data.params) == len(reference.data.params)
        assert set(run.data.metrics) == set(reference.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(200))
        # validations at steps 100 and 200; the final one reuses the pass at the last step instead of repeating it
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [100, 200]
        assert {a.path for a in client.list_artifacts(run.info.run_id, "hydra")} == reference_artifacts


@pytest.mark.slow
def test_slurm_launcher_writes_the_documented_sbatch_request(tmp_path, data_cache):
    # no cluster here: a stand-in sbatch keeps the submission script and refuses the job
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho refused >&2\nexit 1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = search(tmp_path, data_cache, "hydra/launcher=slurm", "hydra.launcher.partition=gpu", env_extra=env)
    assert proc.returncode != 0 and "refused" in proc.stderr
    script = (tmp_path / "submitted.sh").read_text()
    for flag in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=64GB", "--time=240"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert f"{tmp_path}/sweep/.submitit/" in script
    assert states(study_of(tmp_path)) == ["FAIL"]  # the trial that could not be launched is not left RUNNING


# ----------------------------------------------------------------------------------------- in-process, fast
class FakeTrainer(SimpleNamespace):
    """What OptunaPruning reads of a Lightning Trainer, on one process."""

    def __init__(self, step: int, loss: float, fn: str = "fit") -> None:
        super().__init__(
            global_step=step,
            callback_metrics={"val/loss": loss},
            sanity_checking=False,
            state=SimpleNamespace(fn=fn),
            is_global_zero=True,
            strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
            logger=SimpleNamespace(run_id="run-123"),
        )


def study_with_a_good_trial(tmp_path: Path) -> optuna.Study:
    study = optuna.create_study(study_name="unit", storage=storage(tmp_path))
    good = study.ask()
    for step in (2, 4):
        good.report(1.0, step)
    study.tell(good, 1.0)
    return study


def callback(tmp_path: Path, number: int) -> OptunaPruning:
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=3)
    return OptunaPruning(storage(tmp_path), "unit", number, pruner=pruner)


def test_pruning_callback_reports_and_prunes_a_worse_trial_after_warmup(tmp_path):
    study = study_with_a_good_trial(tmp_path)
    trial = study.ask()
    pruning = callback(tmp_path, trial.number)
    pruning.on_validation_end(FakeTrainer(step=2, loss=9.0), None)  # within warmup: reported, not pruned
    with pytest.raises(optuna.TrialPruned):
        pruning.on_validation_end(FakeTrainer(step=4, loss=9.0), None)
    stored = study.get_trials()[trial.number]
    assert stored.intermediate_values == {2: 9.0, 4: 9.0}
    assert stored.user_attrs == {"pruned": True, "mlflow_run_id": "run-123"}


def test_pruning_callback_lets_a_better_trial_run_and_ignores_final_validate(tmp_path):
    study = study_with_a_good_trial(tmp_path)
    trial = study.ask()
    pruning = callback(tmp_path, trial.number)
    pruning.on_validation_end(FakeTrainer(step=4, loss=0.5), None)
    pruning.on_validation_end(FakeTrainer(step=4, loss=9.0, fn="validate"), None)  # the run's final validate
    stored = study.get_trials()[trial.number]
    assert stored.intermediate_values == {4: 0.5} and "pruned" not in stored.user_attrs


def test_pruning_callback_leaves_a_finished_trial_alone(tmp_path):
    study = study_with_a_good_trial(tmp_path)  # trial 0 is COMPLETE: a trial's overrides rerun by hand
    pruning = callback(tmp_path, 0)
    pruning.on_validation_end(FakeTrainer(step=4, loss=9.0), None)
    assert study.get_trials()[0].intermediate_values == {2: 1.0, 4: 1.0}


def test_search_space_from_config_and_command_line():
    params = {
        "optim.lr": "tag(log, interval(1e-4, 1e-2))",
        "optim.warmup_steps": "int(interval(0, 200))",
        "model.n_layers": "range(2, 9, 2)",
        "seed": 1,
        "optim.weight_decay": "choice(0.0, 0.1)",
    }
    arguments = ["+sweep=mixer_search", "optim.weight_decay=0.05", "model/mixer=choice(retnet, hyena)"]
    fixed, dims = search_space(params, arguments)
    assert fixed == ["seed=1", "+sweep=mixer_search", "optim.weight_decay=0.05"]  # the command line pins a key
    got = {d.name: d.distribution for d in dims}
    assert got == {
        "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "optim.warmup_steps": IntDistribution(0, 200),
        "model.n_layers": IntDistribution(2, 8, step=2),
        "model/mixer": CategoricalDistribution(["retnet", "hyena"]),
    }
    mixer = next(d for d in dims if d.name == "model/mixer")
    assert mixer.override("hyena") == "model/mixer=hyena"


def test_values_travel_to_a_trial_as_one_override():
    """What the sweeper writes into a trial's override comes out of the trial's config unchanged."""
    path = "C:\\it's ${x}\\"
    value = {"_target_": "a.B", "storage": path, "n": 3, "f": 1e-05, "on": True, "p": None, "l": [1, "a,b"]}
    (override,) = OverridesParser.create().parse_overrides([f"+callbacks.pruning={hydra_literal(value)}"])
    assert OmegaConf.to_container(OmegaConf.create(override.value()), resolve=True) == value
