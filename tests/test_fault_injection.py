"""Faults a user meets, injected for real (kill -9, SIGTERM, parallel starts, damaged files, broken plugins), and what
must hold after each: nothing a user ran is lost, nothing is counted twice, and the exit code tells what happened."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from analysis.cli import main as zoo_table
from tests.test_train import RESUMABLE, TINY, ZOO_TRAIN, finished

SWEEP = [
    *TINY,
    "model/mixer=transformer",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "checkpoint_every=2",
    "logger.log_checkpoint=false",
    "logger.experiment_name=faults",
    "sweep_name=faults",
    "seed=0,1,2",
]
# one run of 8 steps, checkpointed every 2
SHORT = [*TINY, *RESUMABLE, "logger.experiment_name=faults"]


def environment(cache: Path) -> dict[str, str]:
    env = {**os.environ, "ARCH_ZOO_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start(tmp: Path, cache: Path, args: list[str], multirun: bool = True) -> subprocess.Popen:
    command = [ZOO_TRAIN, *(["-m"] if multirun else []), f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", *args]
    return subprocess.Popen(
        command, cwd=tmp, env=environment(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until ``path`` exists (the process is then mid-trial), failing if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ended before {path} appeared:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def runs_of(tmp: Path, experiment: str = "faults") -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def trials_and_parents(tmp: Path) -> tuple[list, list]:
    runs = runs_of(tmp)
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    return [r for r in runs if r not in parents], parents


@pytest.mark.slow
def test_killed_sweep_relaunched_skips_finished_trials_and_the_table_counts_each_seed_once(
    tmp_path, data_cache, capsys
):
    first = start(tmp_path, data_cache, [*SWEEP, f"hydra.sweep.dir={tmp_path}/sweep_a"])
    wait_for(tmp_path / "sweep_a" / "1" / "checkpoints" / "last.ckpt", first)  # trial 1 is training
    first.kill()  # kill -9
    first.wait()
    trials, parents = trials_and_parents(tmp_path)
    assert sorted(r.info.status for r in trials) == ["FINISHED", "RUNNING"]

    again = start(tmp_path, data_cache, [*SWEEP, f"hydra.sweep.dir={tmp_path}/sweep_b"])
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert output.count("trial already finished") == 1  # trial 0 is not trained again
    assert output.count("resuming MLflow run") == 1  # trial 1 goes on from its checkpoint
    trials, parents = trials_and_parents(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the old parent, reused and closed
    assert sorted(int(r.data.params["seed"]) for r in trials) == [0, 1, 2]  # nothing lost, nothing twice
    assert all(r.info.status == "FINISHED" for r in trials)
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}

    assert zoo_table(["--experiment", "faults", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--no-log",
                      "--out", str(tmp_path / "table")]) == 0  # fmt: skip
    assert ",3,3,0 1 2," in (tmp_path / "table" / "table.csv").read_text()  # runs 3, seeds 3: 0 1 2
    assert "more run(s)" not in capsys.readouterr().err


def test_table_counts_a_config_and_seed_once_and_says_so(tmp_path, capsys):
    """A store written by an older version holds the same trial twice (a relaunch retrained it)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("old")
    ids = []
    for seed, loss in [(0, 1.0), (0, 3.0), (1, 2.0), (2, 2.5)]:
        run = client.create_run(experiment, tags={"run_key": f"key-seed{seed}", "overrides": f"seed={seed}"})
        client.log_param(run.info.run_id, "seed", str(seed))
        client.log_metric(run.info.run_id, "val/ppl", loss)
        client.set_terminated(run.info.run_id, "FINISHED")
        ids.append(run.info.run_id)
        time.sleep(0.01)
    out = tmp_path / "table"
    assert zoo_table(["--experiment", "old", "--tracking-uri", uri, "--no-log", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 more run(s) of a (config, seed) already counted" in captured.err
    assert ids[0] in captured.err  # the older duplicate is the one left out
    csv = (out / "table.csv").read_text()
    assert ",3,3,0 1 2," in csv  # runs 3, seeds 3, seed list 0 1 2 (not 0 0 1 2)
    assert ",2.5,0.5," in csv  # mean and std of 3.0 (the newer seed-0 run), 2.0, 2.5


def checkpoint_step(path: Path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_sigint_checkpoints_marks_killed_exits_130_and_the_relaunch_matches_a_straight_run(
    tmp_path, data_cache, straight_run
):
    single, stopped = SHORT, tmp_path
    # Ctrl+C as the 6th step starts: the step finishes, is checkpointed, and the process stops
    ctrl_c = "inject_failure={at_step: 5, kind: sigint}"
    proc = start(stopped, data_cache, [*single, ctrl_c, f"hydra.run.dir={stopped}/run"], multirun=False)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 130, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("error: interrupted by SIGINT at step 6")
    (run,) = runs_of(stopped)
    assert run.info.status == "KILLED"
    reason = run.data.tags["failure_reason"]
    assert reason.startswith("interrupted by SIGINT at step 6; checkpoint of step 6 saved"), reason
    assert "relaunch the same command" in reason
    assert checkpoint_step(stopped / "run" / "checkpoints" / "last.ckpt") == 6

    again = start(stopped, data_cache, [*single, f"hydra.run.dir={stopped}/run2"], multirun=False)
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    (run,) = runs_of(stopped)  # the same run, finished
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val/loss"] == straight_run["val/loss"]


@pytest.mark.slow
def test_sigterm_mid_sweep_exits_143_marks_trial_and_parent_and_the_relaunch_runs_the_rest(tmp_path, data_cache):
    # three trials; the second is sent SIGTERM as its 4th step starts (the third's injection never fires)
    faults = "inject_failure=null,{at_step: 3, kind: sigterm},{at_step: 100, kind: raise}"
    args = [*SHORT, "sweep_name=faults", faults]
    proc = start(tmp_path, data_cache, [*args, f"hydra.sweep.dir={tmp_path}/sweep_a"])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 143, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("error: interrupted by SIGTERM at step 4")
    trials, (parent,) = trials_and_parents(tmp_path)
    assert sorted(r.info.status for r in trials) == ["FINISHED", "KILLED"]  # the third never started
    assert parent.info.status == "KILLED"
    assert parent.data.tags["failure_reason"].startswith("interrupted by SIGTERM at step 4")
    assert "in trial 1" in parent.data.tags["failure_reason"]

    again = start(tmp_path, data_cache, [*args, f"hydra.sweep.dir={tmp_path}/sweep_b"])
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert output.count("trial already finished") == 1 and output.count("resuming MLflow run") == 1
    trials, (parent,) = trials_and_parents(tmp_path)
    assert parent.info.status == "FINISHED" and "failure_reason" not in parent.data.tags
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    assert len({r.data.tags["config_key"] for r in trials}) == 3


def broken_plugin(root: Path) -> Path:
    """A third-party package whose ``arch_zoo.mixers`` entry point raises on import."""
    (root / "broken_mixer_plugin-0.1.dist-info").mkdir(parents=True)
    (root / "broken_mixer_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-mixer-plugin\nVersion: 0.1\n"
    )
    (root / "broken_mixer_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[arch_zoo.mixers]\nbroken_mixer = broken_mixer_plugin:Mixer\n"
    )
    (root / "broken_mixer_plugin.py").write_text("raise ImportError('needs libfoo 2.0')\n")
    return root


def test_a_broken_plugin_is_listed_with_its_error_and_everything_else_works(tmp_path, data_cache):
    env = environment(data_cache)
    env["PYTHONPATH"] = os.pathsep.join([str(broken_plugin(tmp_path / "site")), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "300"
    commands = [  # the listing, a run of another mixer, a run of the broken one: side by side (two CI cores)
        [str(Path(ZOO_TRAIN).with_name("zoo-mixers"))],
        [ZOO_TRAIN, *TINY, "logger=none", "trainer.max_steps=1", f"hydra.run.dir={tmp_path}/run"],
        [ZOO_TRAIN, *TINY, "logger=none", "model/mixer=broken_mixer"],
    ]
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        for c in commands
    ]
    listing, trained, asked = (finished(p, timeout=300) for p in procs)
    assert listing.returncode == 0, listing.stderr[-3000:]
    assert "retnet" in listing.stdout and "transformer" in listing.stdout
    assert "broken_mixer" in listing.stdout and "needs libfoo 2.0" in listing.stdout
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert asked.returncode != 0
    assert "broken_mixer" in asked.stderr and "needs libfoo 2.0" in asked.stderr


@pytest.mark.slow
def test_parallel_first_runs_on_a_new_store_all_succeed_and_are_all_recorded(tmp_path, data_cache):
    """Two runs and two Optuna searches start at once against an MLflow store and an Optuna storage that do not
    exist yet, as from a shell loop or a job array."""
    common = [*TINY, "model/mixer=transformer", "logger.log_checkpoint=false", "logger.experiment_name=parallel"]
    procs = [
        start(tmp_path, data_cache, [*common, f"seed={i}", f"hydra.run.dir={tmp_path}/run{i}"], multirun=False)
        for i in range(2)
    ]
    procs += [
        start(
            tmp_path,
            data_cache,
            [
                "+sweep=mixer_search",
                "hydra/sweeper=optuna",
                *common,
                "hydra.sweeper.n_trials=1",
                f"hydra.sweeper.study_name=search{i}",
                f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
                f"hydra.sweep.dir={tmp_path}/sweep{i}",
            ],
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    runs = runs_of(tmp_path, "parallel")
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    assert len(runs) == 2 + 2 + 2 and len(parents) == 2  # 2 runs, 2 searches of one trial each, 2 parents
    assert all(r.info.status == "FINISHED" for r in runs)
    import optuna

    for i in range(2):
        study = optuna.load_study(study_name=f"search{i}", storage=f"sqlite:///{tmp_path}/optuna.db")
        assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]


def packed_module(cache: Path):
    from experiments.data.corpus import CorpusConfig
    from experiments.data.datamodule import DataConfig, TextDataModule

    corpus = CorpusConfig(source="stdlib", ood={"pydoc": ["pydoc_topics"]})
    module = TextDataModule(DataConfig(corpus=corpus, cache_dir=str(cache)))
    module.prepare_data()
    return module


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_token_cache_is_detected_and_rebuilt_with_a_notice(tmp_path, data_cache, caplog, damage):
    import shutil

    import numpy as np

    packed_module(data_cache)  # built once per session; copied, so that damaging it spares the other tests
    cache = tmp_path / "cache"
    shutil.copytree(data_cache, cache, ignore=shutil.ignore_patterns("*.lock"))
    clean = packed_module(cache)
    train = Path(clean.meta["cache"]) / "train.bin"
    expected = np.array(clean.splits["train"].tokens)
    data = bytearray(train.read_bytes())
    if damage == "truncate":  # a disk filled up mid-write
        data = data[: len(data) // 2]
    else:  # ids far beyond the 257-symbol vocabulary, as random bytes make them
        data[-4000:-2000] = b"\xff" * 2000
    train.write_bytes(bytes(data))

    with caplog.at_level("WARNING", logger="arch_zoo"):
        rebuilt = packed_module(cache)
    notices = [r.getMessage() for r in caplog.records if "data cache" in r.getMessage()]
    assert len(notices) == 1 and "train.bin does not match its checksum" in notices[0] and "rebuilding" in notices[0]
    assert np.array_equal(np.array(rebuilt.splits["train"].tokens), expected)
    assert int(np.array(rebuilt.splits["train"].tokens).max()) < rebuilt.vocab_size


def run_once(tmp: Path, cache: Path, *args: str) -> tuple[int, str]:
    proc = start(tmp, cache, [*SHORT, *args], multirun=False)
    output = proc.communicate(timeout=600)[0]
    return proc.returncode, output


@pytest.fixture(scope="module")
def killed_once(tmp_path_factory, data_cache) -> tuple[Path, Path]:
    """One ``SHORT`` run killed (-9) as its 6th step starts, and a copy of the folder it left: store, checkpoints."""
    base = tmp_path_factory.mktemp("killed")
    work, kept = base / "work", base / "kept"
    work.mkdir()
    code, output = run_once(work, data_cache, "inject_failure={at_step: 5, kind: kill}", f"hydra.run.dir={work}/r")
    assert code == -signal.SIGKILL, output[-3000:]
    shutil.copytree(work, kept)
    return work, kept


@pytest.fixture
def killed(killed_once) -> Path:
    """The folder of the killed run, as it left it, for a test to damage and relaunch: restored from the copy into
    the same place, since the MLflow store records the run's output folder by its absolute path; the store is
    written over in place, as this process's MLflow client may hold it open from an earlier test."""
    work, kept = killed_once
    for path in work.iterdir():
        if path.name != "mlflow.db":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.copytree(kept, work, dirs_exist_ok=True)
    return work


def test_checkpoints_are_written_beside_the_target_and_the_previous_is_kept(tmp_path, monkeypatch):
    import torch

    from experiments.checkpoints import AtomicCheckpointIO, damage, previous_of

    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    io.save_checkpoint({"step": 2}, path)
    assert torch.load(path)["step"] == 2 and torch.load(previous_of(path))["step"] == 1
    assert damage(path) is None

    def disk_full(obj, f, *args, **kwargs):  # the disk fills up half-way through the write
        f.write(b"PK\x03\x04" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 3}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 2  # the last good checkpoint is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no debris


@pytest.mark.slow
def test_a_truncated_checkpoint_is_reported_and_the_previous_one_resumes(killed, data_cache):
    tmp_path = killed
    newest = tmp_path / "r" / "checkpoints" / "last.ckpt"
    assert checkpoint_step(newest) == 4 and checkpoint_step(newest.with_name("last.prev.ckpt")) == 2
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # the disk filled up mid-write

    code, output = run_once(tmp_path, data_cache, f"hydra.run.dir={tmp_path}/r2")
    assert code == 0, output[-3000:]
    assert f"checkpoint {newest} is damaged" in output
    assert "resuming from the previous checkpoint" in output
    (run,) = runs_of(tmp_path)  # resumed into the same run, which finished
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == 7


@pytest.mark.slow
def test_with_every_checkpoint_damaged_the_fresh_start_command_is_given_and_never_undone(killed, data_cache):
    tmp_path, run_dir = killed, f"hydra.run.dir={killed}/r"
    for name in ("last.ckpt", "last.prev.ckpt"):
        (tmp_path / "r" / "checkpoints" / name).write_bytes(b"PK\x03\x04 garbage")

    code, output = run_once(tmp_path, data_cache, run_dir)
    assert code == 2, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume MLflow run") and "is damaged" in last
    command = last.split("Start afresh with: ")[1]
    assert command.startswith("zoo-train ") and command.endswith(" resume=false")

    fresh = subprocess.run(
        [ZOO_TRAIN, *command.split()[1:]], cwd=tmp_path, env=environment(data_cache), capture_output=True, text=True
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    code, output = run_once(tmp_path, data_cache, run_dir)  # the same command again: trains, resumes nothing
    assert code == 0, output[-3000:]
    assert "resuming" not in output and "damaged" not in output
    runs = runs_of(tmp_path)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"]
    (old,) = [r for r in runs if r.info.status == "KILLED"]
    assert old.data.tags["superseded_by"] in {r.info.run_id for r in runs}


@pytest.mark.slow
def test_a_run_stopped_under_other_defaults_is_not_resumed_under_the_new_ones_and_the_error_says_which(
    killed, data_cache
):
    """An upgrade between a stop and its relaunch can change a default (``experiment=table5``'s FFN width went from
    2046 to 2048): the same command then resolves to another model, whose checkpoint would not load or, worse, would
    load and mix two configurations in one run. The relaunch is refused, naming each changed setting and the
    fresh-start command; with the recorded settings back, the same command resumes the run."""
    import sqlite3

    tmp_path, run_dir = killed, f"hydra.run.dir={killed}/r2"
    (run,) = runs_of(tmp_path)

    def record(value: str) -> None:  # the run as a version whose default was ``value`` recorded it
        with sqlite3.connect(tmp_path / "mlflow.db") as db:
            db.execute(
                "UPDATE params SET value = ? WHERE run_uuid = ? AND key = 'model.ffn_multiple_of'",
                (value, run.info.run_id),
            )

    record("64")
    code, output = run_once(tmp_path, data_cache, run_dir)
    assert code == 2, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow run {run.info.run_id} of this command stopped before it finished")
    assert "other settings (model.ffn_multiple_of 64 then, 1 now: a default or the data changed since" in last
    assert f"it stays in {tmp_path / 'r' / 'checkpoints'}" in last and last.endswith(" resume=false")
    assert "resuming" not in output
    assert runs_of(tmp_path)[0].info.status == "RUNNING"  # untouched: still the killed run, resumable as it was

    record("1")
    code, output = run_once(tmp_path, data_cache, run_dir)
    assert code == 0, output[-3000:]
    assert f"resuming MLflow run {run.info.run_id}" in output
    assert [r.info.status for r in runs_of(tmp_path)] == ["FINISHED"]


def test_changed_settings_count_what_a_run_computes_with_absent_settings_at_their_neutral_value():
    """Only settings that change what a run computes count: not how it logs or shows itself, not the injected failure
    that a killed run's relaunch drops, not params a run logs beyond its config. A setting one side lacks is
    compared at its neutral value (a run recorded before the setting existed computed that)."""
    from experiments.tracking import changed_settings

    recorded = {"seed": "0", "model.d_model": "64", "logger.log_model": "true", "inject_failure": "{'at_step': 5}",
                "model.n_params": "1000", "compile_mode": "default"}  # fmt: skip
    same = {"seed": "0", "model.d_model": "64", "logger.log_model": "false", "inject_failure": "None"}
    assert changed_settings(recorded, same) == {}
    assert changed_settings(recorded, {**same, "model.d_model": "128"}) == {"model.d_model": ("64", "128")}
    # recorded before model.ffn_multiple_of existed: its neutral 1 is what that run computed
    assert changed_settings(recorded, {**same, "model.ffn_multiple_of": "1"}) == {}
    assert changed_settings(recorded, {**same, "model.ffn_multiple_of": "64"}) == {"model.ffn_multiple_of": ("1", "64")}
    assert changed_settings({**recorded, "compile_mode": "max-autotune-no-cudagraphs"}, same) == {
        "compile_mode": ("max-autotune-no-cudagraphs", "default")
    }
    assert changed_settings({**recorded, "brand_new.setting": "3"}, same) == {}  # no neutral value: not comparable


SECRET_URL = "postgresql://alice:hunter2@db.example:5432/mlflow"


@pytest.mark.parametrize(
    "text, masked",
    [
        (SECRET_URL, "postgresql://alice:***@db.example:5432/mlflow"),
        ("mysql+pymysql://bob:p%40ss@h/db x=1", "mysql+pymysql://bob:***@h/db x=1"),
        ("https://:tok3n@mlflow.example/", "https://:***@mlflow.example/"),
        ("postgresql://h/db?user=u&password=hunter2&sslmode=require", "postgresql://h/db?user=u&password=***&sslmode=require"),
        ("sqlite:////abs/mlflow.db http://host:5000", "sqlite:////abs/mlflow.db http://host:5000"),  # nothing to hide
    ],
)  # fmt: skip
def test_credentials_in_urls_are_masked(text, masked):
    from experiments.store import mask_secrets

    assert mask_secrets(text) == masked


def test_a_store_password_reaches_no_param_tag_name_or_artifact(tmp_path):
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir

    import experiments.train  # noqa: F401  (registers the config schemas)
    from experiments.tracking import config_params, log_hydra_artifacts, make_logger, run_name

    overrides = [f"logger.tracking_uri={SECRET_URL}", f"+callbacks.pruning.storage={SECRET_URL}"]
    conf = Path(__file__).resolve().parents[1] / "experiments" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    recorded = [*config_params(cfg).values(), run_name("retnet", overrides)]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides))
    logged: list[str] = []
    client = SimpleNamespace(log_artifact=lambda run_id, path, folder: logged.append(Path(path).read_text()))
    log_hydra_artifacts(SimpleNamespace(experiment=client, run_id="r"), tmp_path, cfg)
    captured = {}

    class Logger:  # what make_logger hands to MLflow
        def __init__(self, **kwargs):
            captured.update(kwargs)

    import experiments.tracking as tracking

    original, tracking.MLFlowLogger = tracking.MLFlowLogger, Logger
    try:
        make_logger(cfg, run_name("retnet", overrides), {"command": "zoo-train " + " ".join(overrides)})
    finally:
        tracking.MLFlowLogger = original
    recorded += [*logged, captured["run_name"], *captured["tags"].values()]
    assert len(logged) == 2 and any("alice:***@db.example" in text for text in recorded)
    assert not [text for text in recorded if "hunter2" in text]
    assert captured["tracking_uri"] == SECRET_URL  # the client itself still gets the real URL


def test_artifacts_of_a_sqlite_store_stay_beside_it_whatever_the_working_directory(tmp_path, monkeypatch):
    """MLflow puts a database store's artifacts in ``./mlruns`` of whichever directory made the experiment, so the
    runs of ``sqlite:////data/mlflow.db`` left their files wherever the first one started. Every way the project
    makes an experiment (a measurement's record, a training run's store lookup, its logger) puts them beside the
    database."""
    from hydra import compose, initialize_config_dir

    import experiments.train  # noqa: F401  (registers the config schemas)
    from experiments.bench.report import record_run
    from experiments.store import open_experiment
    from experiments.tracking import make_logger

    store = tmp_path / "store"
    uri = f"sqlite:///{store / 'mlflow.db'}"  # an absolute path: sqlite:////...
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    note = tmp_path / "note.txt"
    note.write_text("measured")
    record_run(uri, "bench", "one measurement", {}, {}, [], [note])
    assert [p.read_text() for p in store.glob("mlruns/bench/*/artifacts/note.txt")] == ["measured"]
    client, experiment_id = open_experiment(uri, "table5/gpu")
    assert client.get_experiment(experiment_id).artifact_location == (store / "mlruns" / "table5_gpu").as_uri()
    conf = Path(__file__).resolve().parents[1] / "experiments" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[f"logger.tracking_uri={uri}", "logger.experiment_name=fresh"])
    logger = make_logger(cfg, "a run", {})
    logger.experiment.log_text(logger.run_id, "text", "file.txt")
    assert len(list(store.glob("mlruns/fresh/*/artifacts/file.txt"))) == 1
    assert not (elsewhere / "mlruns").exists()


@pytest.mark.slow
def test_resume_reads_no_checkpoint_outside_the_output_root(killed, data_cache):
    tmp_path = killed
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    shutil.copytree(tmp_path / "r", elsewhere)
    (run,) = runs_of(tmp_path)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.set_tag(run.info.run_id, "output_dir", str(elsewhere))  # whoever can write tags on a shared server

    code, output = run_once(tmp_path, data_cache, f"hydra.run.dir={tmp_path}/r2")
    assert code == 2, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert f"records its outputs in {elsewhere}, outside {tmp_path}" in last and "resume_root=DIR" in last
    assert "resuming" not in output


def composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    import experiments.train  # noqa: F401  (registers the config schemas)

    conf = Path(__file__).resolve().parents[1] / "experiments" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(
    "override, message",
    [
        ("+foo=bar", "unknown setting 'foo': nothing reads it"),
        ("+sed=1", "did you mean seed=...?"),
        ("data.eval_batch_size=0", "data.eval_batch_size=0: set it to 1 or more"),
        ("optim.lr=nan", "optim.lr=nan must be a finite positive number, e.g. optim.lr=0.003"),
        ("optim.lr=-1", "optim.lr=-1.0 must be a finite positive number"),
        ("optim.warmup_steps=-5", "optim.warmup_steps=-5: set 0 or more steps"),
        ("optim.schedule=step", "optim.schedule=step is unknown; choose one of cosine, linear"),
        ("tokens_per_step=1000", "tokens_per_step=1000 is not a whole number of micro-batches of"),
        ("tokens_per_step=0", "tokens_per_step=0 must be a positive whole number of tokens"),
        ("logger.tracking_uri=sqlite://mlflow.db", "names no file: sqlite URIs start sqlite:///"),
        ("logger.tracking_uri=postgres1://u:pw@h/db", "has an unknown scheme 'postgres1'"),
        ("logger.tracking_uri=http://", "names no host"),
    ],
)
def test_bad_settings_fail_in_the_check_before_anything_is_built(override, message):
    from arch_zoo import ConfigError
    from experiments.train import check

    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        check(composed(override))
    assert "\n" not in str(err.value) and ":pw@" not in str(err.value)


def test_tokens_per_step_is_one_way_to_set_the_batch_and_must_divide():
    from arch_zoo import ConfigError
    from experiments.checks import micro_batches_per_step
    from experiments.train import check

    with pytest.raises(ConfigError, match="both set the optimiser's batch; set one"):
        check(composed("tokens_per_step=8192", "+trainer.accumulate_grad_batches=2"))
    assert micro_batches_per_step(524_288, 16, 2048) == 16 and micro_batches_per_step(524_288, 16, 2048, 8) == 2
    message = (
        "tokens_per_step=524288 is not a whole number of micro-batches of 786,432 tokens (data.batch_size=24 x "
        "data.block_size=2048 x 16 device(s)); set data.batch_size to one of 1, 2, 4, 8, 16"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        micro_batches_per_step(524_288, 24, 2048, 16)
    with pytest.raises(ConfigError, match="change tokens_per_step"):
        micro_batches_per_step(1000, 4, 64)


def test_warmup_beyond_the_run_is_warned_about(caplog):
    from experiments.train import check

    with caplog.at_level("WARNING", logger="arch_zoo"):
        check(composed("trainer.max_steps=100", "optim.warmup_steps=100"))
    assert (
        "optim.warmup_steps=100 >= trainer.max_steps=100" in caplog.text and "lower optim.warmup_steps" in caplog.text
    )


@pytest.mark.parametrize("content, message", [
    ("a directory", "matches only directories"),
    (b"caf\xe9 au lait\n", "is not UTF-8 text (byte 3); convert it, or set data.corpus.lossy_decode=true"),
    (b"\x7fELF\x02\x01\x00\x00binary", "looks binary (it holds NUL bytes)"),
])  # fmt: skip
def test_files_that_are_not_text_are_refused_by_name(tmp_path, content, message):
    from arch_zoo import ConfigError
    from experiments.data.corpus import CorpusConfig, load_corpus

    target = tmp_path / "corpus" / "doc.txt"
    if isinstance(content, bytes):
        target.parent.mkdir()
        target.write_bytes(content)
        pattern = str(target)
    else:
        target.mkdir(parents=True)
        pattern = str(tmp_path / "corpus" / "*")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_corpus(CorpusConfig(source="files", files=[pattern]))
    if isinstance(content, bytes) and b"\x00" not in content:  # the user's way out works
        text = load_corpus.__globals__["_read_text"](str(target), lossy=True)
        assert text.startswith("caf\ufffd")


def test_a_bad_learning_rate_exits_2_in_seconds_with_nothing_recorded(tmp_path, data_cache):
    started = time.monotonic()
    proc = start(tmp_path, data_cache, [*TINY, "optim.lr=nan", f"hydra.run.dir={tmp_path}/r"], multirun=False)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2
    assert output.strip().splitlines()[-1].startswith("error: optim.lr=nan must be a finite positive number")
    assert not (tmp_path / "mlflow.db").exists() and time.monotonic() - started < 60


def test_a_single_text_file_gives_training_and_validation_text(tmp_path):
    from experiments.data.corpus import CorpusConfig, load_corpus

    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"line {i} of my notes\n" for i in range(100)))
    corpus = load_corpus(CorpusConfig(source="files", files=[str(notes)], val_percent=2.0))
    assert corpus.train["text"][0].splitlines()[-1] == "line 97 of my notes"
    assert corpus.val["text"] == ["line 98 of my notes\nline 99 of my notes\n"]
