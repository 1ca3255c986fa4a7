"""Accuracy against decoding-state size, the MQAR sweep's plot: its points are the table's rows (mean ± std over
the seeds the table averages), one line per architecture across widths, and zoo-table draws it only for runs that
logged both a state size and an accuracy."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from test_analysis import PNG_MAGIC, fake_run, tick

from analysis.cli import main
from analysis.plots import architecture_labels, plot_state_size, state_size_length, state_size_points
from analysis.runs import load_runs, state_size_lengths, trials
from analysis.table import build_table

# architecture -> (mixer tag, width -> (state size after 64 tokens, after 128, accuracy of seed 0))
MQAR = {
    "RetNet": ("retnet", {64: (8192, 8192, 0.50), 128: (32768, 32768, 0.80)}),
    "Transformer": ("attention", {64: (16384, 32768, 0.90), 128: (32768, 65536, 0.97)}),
}
SEEDS = (0, 1, 2)  # seed s scores accuracy + 0.01 s: mean = accuracy + 0.01, std = 0.01
SLICES = ("slice/kv16-len64/acc", "slice/kv8-len128/acc", "slice/kv4-len64/acc")  # logged out of order


def mqar_run(
    client: mlflow.MlflowClient,
    experiment: str,
    arch: str,
    width: int,
    seed: int,
    accuracy: float,
    sizes: tuple[int, int] | None,
    failed: bool = False,
) -> str:
    """A trial of the MQAR sweep: ``fake_run``'s records plus what ``zoo-train +sweep=mqar`` adds."""
    mixer = MQAR.get(arch, ("retnet", {}))[0]
    tags = {"variant": f"{arch} d={width}", "sweep": "mqar", "mixer": mixer}
    overrides = f"+sweep=mqar +arch={mixer} model.d_model={width} seed={seed}"
    run_id = fake_run(client, experiment, overrides, seed, "failed" if failed else 20.0, tags)
    params = [Param("variant", arch), Param("variant_detail", f"d={width}"), Param("model.d_model", str(width))]
    if sizes is not None:
        params += [Param(f"model.state_size.T{n}", str(size)) for n, size in zip((64, 128), sizes)]
    metrics = [Metric("val/acc", accuracy, tick(), 4), Metric("baseline/chance_acc.val", 0.125, tick(), 0)]
    metrics += [Metric(name, accuracy - 0.1 * i, tick(), 4) for i, name in enumerate(SLICES)]
    client.log_batch(run_id, metrics=metrics, params=params)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """``mqar``: two architectures at two widths, three seeds each, and a failed trial whose accuracy must not count;
    ``no_state``: accuracy logged but no state size, as a run from before state sizes were logged."""
    root = tmp_path_factory.mktemp("mlflow_state_size")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    mqar = client.create_experiment("mqar", artifact_location=str(root / "artifacts"))
    for arch, (_, widths) in MQAR.items():
        for width, (t64, t128, accuracy) in widths.items():
            for seed in SEEDS:
                mqar_run(client, mqar, arch, width, seed, accuracy + 0.01 * seed, (t64, t128))
    mqar_run(client, mqar, "RetNet", 64, 3, 0.0, (8192, 8192), failed=True)
    no_state = client.create_experiment("no_state", artifact_location=str(root / "artifacts_no_state"))
    for seed in SEEDS:
        mqar_run(client, no_state, "RetNet", 64, seed, 0.5, None)
    return uri


def test_points_are_the_table_rows_mean_and_std_per_architecture_and_width(store):
    runs = trials(load_runs("mqar", store))
    table = build_table(runs, experiment="mqar")
    assert state_size_lengths(runs) == [64, 128] and state_size_length(runs) == 128
    points = state_size_points(table, "val/acc", 128)
    got = [(p.architecture, p.width, p.state_size, p.seeds) for p in points.itertuples()]
    assert got == [
        ("RetNet", 64, 8192, 3),  # the failed fourth seed is not averaged, as in the table
        ("RetNet", 128, 32768, 3),
        ("Transformer", 64, 32768, 3),
        ("Transformer", 128, 65536, 3),
    ]
    assert list(points["mean"]) == pytest.approx([0.51, 0.81, 0.91, 0.98])
    assert list(points["std"]) == pytest.approx([0.01] * 4)
    rows = table.rows.set_index("variant")
    assert rows.loc["RetNet d=64", "val/acc mean"] == pytest.approx(points["mean"][0])  # plot and table agree
    assert rows.loc["RetNet d=64", "status"] == "3 ok, 1 failed"
    shorter = state_size_points(table, "val/acc", 64)  # attention's cache halves; RetNet's state does not change
    assert list(shorter["state_size"]) == [8192, 32768, 16384, 32768]
    assert state_size_points(table, "val/acc", 4096).empty and state_size_points(table, "val/nope", 128).empty


def test_the_table_shows_overall_then_per_slice_accuracy_before_perplexity(store):
    table = build_table(trials(load_runs("mqar", store)), experiment="mqar")
    assert table.metrics[:5] == [
        "val/acc",
        "slice/kv4-len64/acc",
        "slice/kv16-len64/acc",
        "slice/kv8-len128/acc",
        "val/ppl",
    ]
    line = next(line for line in table.to_markdown().splitlines() if line.startswith("| Transformer d=128 |"))
    assert line.startswith("| Transformer d=128 | 3 | 0.980 ± 0.010 | +0.470 | 0.780 ± 0.010 |")


def test_architecture_falls_back_to_the_mixer_when_the_sweep_set_no_variant():
    runs = pd.DataFrame(
        {
            "params.variant": ["H3", "None", None],
            "tags.mixer": ["h3", "hyena", None],
            "params.model.mixer.name": ["h3", "hyena", "rwkv"],
        }
    )
    assert list(architecture_labels(runs)) == ["H3", "hyena", "rwkv"]


def test_zoo_table_writes_and_logs_the_state_size_plot(store, tmp_path):
    out = tmp_path / "mqar"
    assert main(["--experiment", "mqar", "--tracking-uri", store, "--out", str(out)]) == 0
    plot = out / "state_size_val_acc.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("mqar").experiment_id
    (summary,) = client.search_runs([experiment], "tags.summary = 'true'")
    assert plot.name in {a.path for a in client.list_artifacts(summary.info.run_id)}

    shorter = tmp_path / "t64"
    args = ["--experiment", "mqar", "--tracking-uri", store, "--no-log"]
    assert main([*args, "--out", str(shorter), "--state-size-length", "64"]) == 0
    assert (shorter / plot.name).is_file()
    assert main([*args, "--out", str(tmp_path / "bad"), "--state-size-length", "100"]) == 2


def test_the_plot_is_skipped_without_a_state_size_param(store, tmp_path):
    runs = trials(load_runs("no_state", store))
    table = build_table(runs, experiment="no_state")
    assert "metrics.val/acc" in runs and not state_size_lengths(runs) and state_size_length(runs) is None
    assert plot_state_size(table, "val/acc", tmp_path / "direct.png") is None
    out = tmp_path / "no_state"
    assert main(["--experiment", "no_state", "--tracking-uri", store, "--out", str(out), "--no-log"]) == 0
    assert (out / "table.md").is_file() and not list(out.glob("state_size_*.png"))
    assert not math.isnan(table.rows["val/acc mean"].iloc[0])  # the accuracy is still tabulated
