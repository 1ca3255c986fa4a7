"""zoo-merge-runs: seeds run in separate stores make one table, and merging twice (or after an interrupted copy)
never loses or double-counts a trial; searches of a store read every page of its runs."""

from __future__ import annotations

import mlflow
import pytest

from analysis.runs import deduplicate, load_runs, trials
from experiments import merge_runs
from experiments.merge_runs import COPIED_FROM, main


def make_store(path, seed: int) -> str:
    """A sweep parent with two finished trials (a metric history each), as zoo-train -m leaves them."""
    uri = f"sqlite:///{path}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("table5")
    parent = client.create_run(exp, tags={"sweep_parent": "true"}, run_name="table5 (sweep)").info.run_id
    for arch in ("retnet", "rwkv"):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent}, run_name=f"{arch} seed={seed}").info.run_id
        client.log_param(run, "seed", str(seed))
        client.log_param(run, "model.mixer.name", arch)
        for step in range(3):
            client.log_metric(run, "val/loss", 2.0 - 0.1 * step + seed, step=step * 10)
        client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return uri


def finished_trials(uri: str):
    frame, _ = deduplicate(trials(load_runs("table5", uri)))
    return frame[frame["outcome"] == "ok"]


def test_two_stores_make_one_table_and_a_second_merge_copies_nothing(tmp_path, capsys):
    dest = make_store(tmp_path / "a.db", seed=0)
    source = make_store(tmp_path / "b.db", seed=1)
    assert main([source, dest, "--experiment", "table5"]) == 0
    assert "copied 3 runs" in capsys.readouterr().out
    runs = finished_trials(dest)
    assert sorted(runs["params.seed"]) == ["0", "0", "1", "1"]
    client = mlflow.MlflowClient(dest)
    copied = [
        r
        for r in client.search_runs([client.get_experiment_by_name("table5").experiment_id])
        if COPIED_FROM in r.data.tags
    ]
    parents = {r.info.run_id for r in copied if "mlflow.parentRunId" not in r.data.tags}
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in copied if r.info.run_id not in parents)
    child = next(r for r in copied if r.info.run_id not in parents)
    history = client.get_metric_history(child.info.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (10, 2.9), (20, 2.8)]

    assert main([source, dest, "--experiment", "table5"]) == 0
    assert "copied 0 runs" in capsys.readouterr().out
    assert len(finished_trials(dest)) == 4


def test_an_interrupted_merge_is_completed_by_running_it_again(tmp_path, monkeypatch):
    """Killed inside a copy (its params and metrics written, not yet marked as copied): the next merge copies that
    run again, and the half-written one stays unfinished, which tables leave out."""
    dest = make_store(tmp_path / "a.db", seed=0)
    source = make_store(tmp_path / "b.db", seed=1)
    real = mlflow.MlflowClient.log_batch
    marks = {"n": 0}

    def dies_marking_the_second_copy(self, run_id, *args, **kwargs):
        if kwargs.get("tags"):
            marks["n"] += 1
            if marks["n"] == 2:
                raise KeyboardInterrupt  # killed part-way through the merge
        return real(self, run_id, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", dies_marking_the_second_copy)
    with pytest.raises(KeyboardInterrupt):
        merge_runs.merge_runs(source, dest, "table5")
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real)
    copied, there = merge_runs.merge_runs(source, dest, "table5")
    assert (copied, there) == (2, 1)
    assert sorted(finished_trials(dest)["params.seed"]) == ["0", "0", "1", "1"]


def test_an_unknown_experiment_names_the_ones_there(tmp_path):
    source = make_store(tmp_path / "b.db", seed=1)
    with pytest.raises(SystemExit, match="it has: .*table5"):
        main([source, f"sqlite:///{tmp_path / 'a.db'}", "--experiment", "table6"])


def test_stores_larger_than_one_search_page_are_merged_whole(tmp_path, monkeypatch):
    """A store hands a search back a page at a time (a tracking server caps each page below what was asked): every
    page is read, so a large store is copied whole and a second merge finds every copy (none made twice)."""
    real = mlflow.MlflowClient.search_runs

    def two_a_page(self, experiment_ids, filter_string="", *args, max_results=1000, **kwargs):
        return real(self, experiment_ids, filter_string, *args, max_results=min(max_results, 2), **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "search_runs", two_a_page)  # three runs a store: two pages each way
    dest = make_store(tmp_path / "a.db", seed=0)
    source = make_store(tmp_path / "b.db", seed=1)
    assert merge_runs.merge_runs(source, dest, "table5") == (3, 0)
    assert merge_runs.merge_runs(source, dest, "table5") == (0, 3)
    assert sorted(finished_trials(dest)["params.seed"]) == ["0", "0", "1", "1"]


def test_a_sweep_parent_counts_children_past_one_search_page(tmp_path, monkeypatch):
    """The sweep parent's trial count and best trial read every page of its children, not the first."""
    from omegaconf import OmegaConf

    from experiments.sweep_callback import MlflowSweepParent

    uri = make_store(tmp_path / "a.db", seed=0)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("table5").experiment_id
    parent = next(r for r in client.search_runs([exp]) if "mlflow.parentRunId" not in r.data.tags).info.run_id
    extra = client.create_run(exp, tags={"mlflow.parentRunId": parent}, run_name="h3 seed=0").info.run_id
    client.log_metric(extra, "val/loss", 0.5)
    client.set_terminated(extra, "FINISHED")
    real = mlflow.MlflowClient.search_runs

    def two_a_page(self, experiment_ids, filter_string="", *args, max_results=1000, **kwargs):
        return real(self, experiment_ids, filter_string, *args, max_results=min(max_results, 2), **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "search_runs", two_a_page)
    callback = MlflowSweepParent()
    callback.run_id, callback.uri = parent, uri
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweeper": {"monitor": "val/loss"}}}))
    finished = client.get_run(parent).data
    assert finished.metrics["sweep/trials"] == 3
    assert finished.tags["best_trial"] == "h3 seed=0"


def test_merging_back_the_other_way_copies_no_run_into_the_store_it_came_from(tmp_path):
    """A into B, then B into A: A gets B's own runs and none of its own back (copies are keyed by where a run was
    first recorded), so neither store holds a trial twice."""
    a = make_store(tmp_path / "a.db", seed=0)
    b = make_store(tmp_path / "b.db", seed=1)
    assert merge_runs.merge_runs(a, b, "table5") == (3, 0)
    assert merge_runs.merge_runs(b, a, "table5") == (3, 3)
    client = mlflow.MlflowClient(a)
    runs = client.search_runs([client.get_experiment_by_name("table5").experiment_id])
    assert len(runs) == 6 and sorted(finished_trials(a)["params.seed"]) == ["0", "0", "1", "1"]
    ids = {r.info.run_id for r in runs}
    assert all(r.data.tags["mlflow.parentRunId"] in ids for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert merge_runs.merge_runs(a, b, "table5") == (0, 6)  # and B, in turn, already holds all of A's
