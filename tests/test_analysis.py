"""The analysis layer on a throwaway MLflow store written through MLflow's client: the numbers in the table, the
runs that must not vanish from it (failed, diverged, unfinished), its files and plots, the summary run, and that
reading runs never imports the training code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param

from analysis.cli import main
from analysis.paper import TABLE5, TABLE6, get_table
from analysis.runs import load_runs, trials
from analysis.table import build_table, latex_cell, variant_labels

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# variant -> (seed -> final val/ppl, or an outcome to fake)
ABLATION = {
    "Full RetNet": {0: 20.0, 1: 21.0, 2: 22.0},
    "- swish gate": {0: 23.0, 1: 24.0, 2: 25.0},
    "- GroupNorm": {0: 20.0, 1: 20.5, 2: "failed"},
    "- γ decay": {0: 22.0, 1: 22.0, 2: "nan"},
    "- multi-scale decay": {0: "failed", 1: "failed", 2: "failed"},
    "reduce head dimension": {0: "running", 1: 21.5, 2: 21.5},
}
_clock = [1_700_000_000_000]


def tick() -> int:
    _clock[0] += 1000
    return _clock[0]


def fake_run(
    client: mlflow.MlflowClient,
    experiment_id: str,
    overrides: str,
    seed: int,
    result: float | str,
    tags: dict[str, str] | None = None,
) -> str:
    """A run as the training entry point records one: params, tags, loss curves, final metrics, a status."""
    run = client.create_run(experiment_id, start_time=tick(), tags={"overrides": overrides, **(tags or {})})
    run_id = run.info.run_id
    params = [Param("seed", str(seed)), Param("data.block_size", "64"), Param("model.mixer.name", "retnet")]
    metrics = []
    if result == "nan" or isinstance(result, float):
        final = math.log(result) if isinstance(result, float) else float("nan")
        start = math.log(30.0) if math.isnan(final) else final  # a diverging run is fine until its last step
        for step in range(5):
            value = start + 0.1 * (4 - step) if step < 4 else final
            metrics += [Metric("train/loss", value + 0.05, tick(), step), Metric("val/loss", value, tick(), step)]
        ppl = math.exp(final) if isinstance(result, float) else float("inf")
        metrics += [
            Metric("val/ppl", ppl, tick(), 4),
            Metric("ood/pydoc/ppl", 2 * ppl, tick(), 4),
            Metric("val_len128/ppl", 1.1 * ppl, tick(), 4),
            Metric("val_len256/ppl", 1.3 * ppl, tick(), 4),
        ]
    client.log_batch(run_id, metrics=metrics, params=params)
    if result == "failed":
        client.set_tag(run_id, "failure_reason", "RuntimeError: injected failure")
        client.set_terminated(run_id, status="FAILED", end_time=tick())
    elif result != "running":
        client.set_terminated(run_id, status="FINISHED", end_time=tick())
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Two experiments: a sweep with a parent run and variant tags, and loose runs told apart only by overrides."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    sweep = client.create_experiment("retnet_ablation", artifact_location=str(root / "artifacts"))
    parent = client.create_run(sweep, start_time=tick(), tags={"sweep": "retnet_ablation", "sweep_parent": "true"})
    for variant, seeds in ABLATION.items():
        for seed, result in seeds.items():
            tags = {"variant": variant, "sweep": "retnet_ablation", "mlflow.parentRunId": parent.info.run_id}
            tags["paper_table"] = "table6"  # what the sweep's YAML declares and zoo-train logs
            fake_run(client, sweep, f"+sweep=retnet_ablation +ablation=x seed={seed}", seed, result, tags)
    client.set_terminated(parent.info.run_id, status="FINISHED")

    loose = client.create_experiment("loose", artifact_location=str(root / "artifacts_loose"))
    for seed in range(3):
        fake_run(client, loose, f"model/mixer=retnet trainer=debug seed={seed}", seed, 30.0 + seed)
        off = f"model/mixer=retnet model.mixer.swish_gate=false trainer=debug seed={seed}"
        fake_run(client, loose, off, seed, 29.0 + seed)
    return uri


def test_paper_tables_hold_the_reported_numbers_and_directions():
    assert TABLE6.value("−swish gate", "in-domain") == 27.84
    assert TABLE6.value("reduce head dimension", "SummScreen") == 23.41
    assert TABLE5.value("Linear Transformer", "PG22") == 63.86
    assert TABLE6.row("RetNet").values == TABLE5.row("RetNet").values  # Table 6's first row is Table 5's RetNet
    assert TABLE6.effect("−GroupNorm", "in-domain") == pytest.approx(27.54 - 26.05)
    # every ablation and every other architecture is worse than RetNet in every column, as the paper reports
    for table in (TABLE5, TABLE6):
        for row in table.rows[1:]:
            assert all(table.direction(row.label, c) == 1 and table.hurts(row.label, c) for c in table.columns)
        assert table.direction("RetNet", "in-domain") == 0
    assert TABLE6.column_of_metric("val/ppl") == "in-domain"
    assert TABLE6.column_of_metric("ood/PG22/ppl") == "PG22"
    assert TABLE6.column_of_metric("ood/pydoc/ppl") is None
    assert get_table("none") is None and get_table("Table6") is TABLE6
    with pytest.raises(ValueError, match="table5"):
        get_table("table7")


@pytest.mark.parametrize(
    ("table", "label", "row"),
    [
        (TABLE6, "Full RetNet", "RetNet"),
        (TABLE6, "- swish gate", "−swish gate"),
        (TABLE6, "-GroupNorm", "−GroupNorm"),
        (TABLE6, "- gamma decay", "−γ decay"),
        (TABLE6, "- multi-scale decay", "−multi-scale decay"),
        (TABLE6, "model/mixer=retnet model.mixer.decay=false", "−γ decay"),
        (TABLE6, "model.mixer.multiscale_decay=false", "−multi-scale decay"),
        (TABLE6, "model.mixer.head_dim=8", "reduce head dimension"),
        (TABLE6, "baseline", "RetNet"),
        (TABLE5, "model/mixer=linear_attention", "Linear Transformer"),
        (TABLE5, "H3", "H3"),
        (TABLE5, "Transformer", None),
        (TABLE6, "model.mixer.dropout=0.1", None),
    ],
)
def test_variant_labels_find_their_paper_row(table, label, row):
    match = table.match(label)
    assert (match.label if match else None) == row


def test_runs_frame_marks_parents_and_outcomes(store):
    frame = load_runs("retnet_ablation", store)
    assert len(frame) == 19 and frame["is_parent"].sum() == 1
    runs = trials(frame)
    assert len(runs) == 18 and not runs["is_parent"].any()
    counts = runs["outcome"].value_counts().to_dict()
    assert counts == {"ok": 12, "failed": 4, "diverged": 1, "unfinished": 1}
    diverged = runs[runs["outcome"] == "diverged"].iloc[0]
    assert diverged["status"] == "FINISHED"  # diverged is read from the non-finite loss, not only from a tag
    assert "val/ppl" in diverged["non_finite_metrics"] and "val/loss" in diverged["non_finite_metrics"]
    assert set(runs["seed"]) == {0, 1, 2}


def test_table_means_deltas_and_paper_columns(store):
    table = build_table(trials(load_runs("retnet_ablation", store)), paper=TABLE6, experiment="retnet_ablation")
    rows = table.rows.set_index("variant")
    assert table.reference == "Full RetNet" and table.variants[0] == "Full RetNet"
    assert table.variants == list(ABLATION)  # the paper's order
    assert table.metrics == ["val/ppl", "ood/pydoc/ppl", "val_len128/ppl", "val_len256/ppl"]
    full, swish = rows.loc["Full RetNet"], rows.loc["- swish gate"]
    assert full["val/ppl mean"] == pytest.approx(21.0) and full["val/ppl std"] == pytest.approx(1.0)
    assert full["seeds"] == 3 and full["seed_list"] == "0 1 2" and full["status"] == "ok"
    assert swish["val/ppl delta"] == pytest.approx(3.0)
    assert swish["ood/pydoc/ppl delta"] == pytest.approx(6.0)
    assert swish["paper in-domain"] == 27.84 and swish["paper in-domain delta"] == pytest.approx(27.84 - 26.05)
    assert swish["val/ppl same_direction"] is True and swish["val/ppl within_noise"] is False
    norm = rows.loc["- GroupNorm"]
    assert norm["val/ppl mean"] == pytest.approx(20.25) and norm["seeds"] == 2 and norm["failed"] == 1
    assert norm["val/ppl same_direction"] is False  # our GroupNorm ablation "helps": the opposite of the paper
    assert norm["val/ppl within_noise"] is True  # -0.75 < 2 * sqrt(1/3 + 0.354**2/2) = 1.26
    assert norm["status"] == "2 ok, 1 failed"
    decay = rows.loc["- γ decay"]
    assert decay["seeds"] == 2 and decay["diverged"] == 1 and decay["val/ppl std"] == 0.0
    assert decay["val/ppl mean"] == pytest.approx(22.0)  # the diverged seed's inf is not averaged in
    gone = rows.loc["- multi-scale decay"]  # every seed failed: the row stays, with nothing to average
    assert gone["runs"] == 3 and gone["seeds"] == 0 and gone["failed"] == 3 and math.isnan(gone["val/ppl mean"])
    assert gone["status"] == "0 ok, 3 failed"
    head = rows.loc["reduce head dimension"]
    assert head["unfinished"] == 1 and head["seeds"] == 2 and head["status"] == "2 ok, 1 unfinished"
    assert "ood/pydoc/ppl same_direction" not in rows  # the paper has no pydoc column

    markdown = table.to_markdown()
    lines = markdown.splitlines()
    assert any(line.startswith("| Full RetNet | 3 | 21.00 ± 1.00 | ref |") for line in lines)
    assert any(line.startswith("| - swish gate | 3 | 24.00 ± 1.00 | +3.00 | ") for line in lines)
    swish_line = next(line for line in lines if line.startswith("| - swish gate"))
    assert "| 27.84 | +1.79 | ✓ |" in swish_line
    norm_line = next(line for line in lines if line.startswith("| - GroupNorm | 2 of 3 |"))
    assert "| 20.25 ± 0.35 | -0.75 | 27.54 | +1.49 | ✗ (n.s.) |" in norm_line
    assert "| - multi-scale decay | 0 of 3 | — | — |" in markdown
    assert "- `- GroupNorm`, seed 2: FAILED — RuntimeError: injected failure" in markdown
    assert "- `- γ decay`, seed 2: DIVERGED — non-finite" in markdown
    assert "- `reduce head dimension`, seed 0: UNFINISHED — status RUNNING" in markdown
    assert sum(line.startswith("- ") for line in lines) == 6  # every run left out of a mean is named


def test_explicit_reference_and_metric(store):
    runs = trials(load_runs("retnet_ablation", store))
    table = build_table(runs, metrics=["val/ppl"], reference="- swish gate", paper=None)
    rows = table.rows.set_index("variant")
    assert table.variants[0] == "- swish gate" and table.metrics == ["val/ppl"]
    assert rows.loc["Full RetNet", "val/ppl delta"] == pytest.approx(-3.0)
    assert not any(c.startswith("paper ") for c in table.rows.columns)
    with pytest.raises(ValueError, match="not a variant"):
        build_table(runs, reference="no such row")
    with pytest.raises(ValueError, match="no run logged metric 'val/ppx'"):
        build_table(runs, metrics=["val/ppx"])


def test_runs_without_variant_tags_are_grouped_by_their_differing_overrides(store):
    runs = trials(load_runs("loose", store))
    labels = variant_labels(runs)
    assert sorted(set(labels)) == ["baseline", "model.mixer.swish_gate=false"]
    table = build_table(runs, paper=TABLE6)
    rows = table.rows.set_index("variant")
    assert table.reference == "baseline"
    assert rows.loc["model.mixer.swish_gate=false", "paper_row"] == "−swish gate"
    assert rows.loc["model.mixer.swish_gate=false", "val/ppl delta"] == pytest.approx(-1.0)
    assert rows.loc["model.mixer.swish_gate=false", "val/ppl same_direction"] is False
    # a single group is named by its overrides, not called a baseline of nothing
    alone = runs[runs["tags.overrides"].str.contains("swish") == False]  # noqa: E712
    assert set(variant_labels(alone)) == {"model/mixer=retnet trainer=debug"}


def test_cli_writes_files_and_plots_logs_a_summary_run_and_imports_no_training_code(store, tmp_path):
    out = tmp_path / "tables"
    script = f"""
import json, sys
from analysis.cli import main
code = main(["--experiment", "retnet_ablation", "--tracking-uri", {store!r}, "--out", {str(out)!r}])
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"experiments", "lightning", "pytorch_lightning",
    "arch_zoo", "torch"}})
print(json.dumps({{"code": code, "loaded": loaded}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": []}
    assert "| Full RetNet | 3 | 21.00 ± 1.00 | ref |" in proc.stdout  # the table is printed

    pngs = ["curves_val_loss.png", "curves_train_loss.png", "bars_val_ppl.png", "ppl_vs_length.png"]
    for name in ["table.md", "table.tex", "table.csv", *pngs]:
        assert (out / name).is_file(), name
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    tex = (out / "table.tex").read_text()
    assert "\\toprule" in tex and "$\\gamma$ decay" in tex and "$\\pm$" in tex and "γ" not in tex
    csv = pd.read_csv(out / "table.csv")
    assert list(csv["variant"]) == list(ABLATION)
    assert list(csv["seeds"]) == [3, 3, 2, 2, 0, 2] and list(csv["failed"]) == [0, 0, 1, 0, 3, 0]

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("retnet_ablation").experiment_id
    summaries = client.search_runs([experiment], "tags.summary = 'true'")
    assert len(summaries) == 1 and summaries[0].info.status == "FINISHED"
    assert summaries[0].data.params["paper"] == "table6"  # from the trials' paper_table tag
    logged = {a.path for a in client.list_artifacts(summaries[0].info.run_id)}
    assert {"table.md", "table.tex", "table.csv", *pngs} <= logged

    # a second pass counts the same runs: the summary run is not a row of the table
    again = tmp_path / "again"
    assert main(["--experiment", "retnet_ablation", "--tracking-uri", store, "--out", str(again), "--no-log"]) == 0
    assert (again / "table.csv").read_text() == (out / "table.csv").read_text()
    assert len(client.search_runs([experiment], "tags.summary = 'true'")) == 1


def test_latex_cells_escape_specials_and_spell_symbols_for_pdflatex():
    text = "a_b 50% {x} \\ |Δ| < 2 — γ"
    assert latex_cell(text) == "a\\_b 50\\% \\{x\\} \\textbackslash{} $|$$\\Delta$$|$ $<$ 2 -- $\\gamma$"


def test_cli_names_the_experiments_when_one_is_missing(store, tmp_path, capsys):
    code = main(["--experiment", "nope", "--tracking-uri", store, "--out", str(tmp_path), "--no-log"])
    assert code == 2
    assert "retnet_ablation" in capsys.readouterr().err
    assert not (tmp_path / "table.md").exists()


def test_analysis_reads_records_only():
    """``analysis`` turns MLflow records into tables: it imports no model, training, kernel or sweep code (the
    producers, benchmarks included, live in ``experiments``), so it works on a store copied from anywhere."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "analysis"
    producers = {"arch_zoo", "experiments", "kernels", "sweeps"}
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in producers]
    assert not found, found


def test_the_paper_table_comes_from_the_runs_tag_that_the_sweep_yaml_declares(store):
    """A sweep's YAML names the paper table it reproduces; zoo-train logs it as the tag ``paper_table`` and zoo-table
    reads it from the records (runs without it, such as loose runs, get no paper columns unless --paper says)."""
    from hydra import compose, initialize_config_module

    import experiments.train  # noqa: F401  (registers the config schemas)
    from analysis.cli import guess_paper

    with initialize_config_module("experiments.conf", version_base="1.3"):
        declared = {sweep: compose("train", [f"+sweep={sweep}"]).paper_table for sweep in ("retnet_ablation", "table5")}
        assert compose("train", ["+sweep=mqar"]).paper_table is None
    assert declared == {"retnet_ablation": "table6", "table5": "table5"}
    assert guess_paper(trials(load_runs("retnet_ablation", store))) is TABLE6
    assert guess_paper(trials(load_runs("loose", store))) is None


def test_paper_rows_come_from_the_params_runs_recorded(tmp_path):
    """A run is a paper row by what it recorded (the resolved config zoo-train logs as params), whatever its label:
    here the labels are opaque names, and the swish-gate switch and the head-dimension divisor are only in params."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("relabelled", artifact_location=str(tmp_path / "artifacts"))
    recorded = {
        "run A": {"model.mixer.swish_gate": "True", "model.mixer.head_dim_divisor": "1"},
        "run B": {"model.mixer.swish_gate": "False", "model.mixer.head_dim_divisor": "1"},
        "run C": {"model.mixer.swish_gate": "True", "model.mixer.head_dim_divisor": "4"},
    }
    for variant, params in recorded.items():
        run_id = fake_run(client, experiment, "+sweep=x", 0, 20.0, {"variant": variant})
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    table = build_table(trials(load_runs("relabelled", uri)), paper=TABLE6)
    rows = table.rows.set_index("variant")
    assert rows["paper_row"].to_dict() == {"run A": "RetNet", "run B": "−swish gate", "run C": "reduce head dimension"}
    assert TABLE6.match_params({"model.mixer.name": "retnet", "model.mixer.decay": "False"}).label == "−γ decay"
    assert TABLE5.match_params({"model.mixer.name": "hyena"}).label == "Hyena"
    assert TABLE5.match_params({"model.mixer.name": "transformer"}) is None


def test_a_row_that_averages_different_settings_says_so(tmp_path):
    """Runs of one variant tag launched with other overrides (seed 2 retrained longer, stores merged from two
    machines) are averaged as if they were seeds; the table names the settings in which they differ, and stays quiet
    where they differ only in the seed, where and how they ran, or a setting older runs did not record."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("pooled", artifact_location=str(tmp_path / "artifacts"))
    recorded = {
        ("RetNet", 0): {"trainer.max_steps": "600", "trainer.devices": "1", "logger.tracking_uri": "sqlite:///a.db"},
        ("RetNet", 1): {"trainer.max_steps": "600", "trainer.devices": "2", "logger.tracking_uri": "sqlite:///b.db"},
        ("RetNet", 2): {"trainer.max_steps": "4883", "trainer.devices": "1", "optim.schedule": "cosine"},
        ("RWKV", 0): {"trainer.max_steps": "600", "optim.schedule": "cosine"},
        ("RWKV", 1): {"trainer.max_steps": "600", "compile": "True"},
    }
    for (variant, seed), params in recorded.items():
        run_id = fake_run(client, experiment, f"+sweep=x seed={seed}", seed, 20.0 + seed, {"variant": variant})
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    table = build_table(trials(load_runs("pooled", uri)))
    assert table.rows.set_index("variant")["pooled_settings"].to_dict() == {
        "RetNet": "trainer.max_steps = 4883 / 600",
        "RWKV": "",
    }
    text = table.to_markdown()
    assert "Warning: these rows average runs whose settings differ beyond the seed" in text
    assert "`RetNet`: trainer.max_steps = 4883 / 600" in text and "`RWKV`" not in text.split("Warning")[1]


def test_the_table_states_the_training_budget_its_runs_share(tmp_path):
    """Steps x tokens per step, from what the runs logged, is the scale a reader sets against the paper's; it is left
    out where runs differ or older runs did not record it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("budget", artifact_location=str(tmp_path / "artifacts"))
    for variant in ("RetNet", "RWKV"):
        for seed in (0, 1):
            run_id = fake_run(client, experiment, f"+sweep=x seed={seed}", seed, 20.0 + seed, {"variant": variant})
            params = {"trainer.max_steps": "4883", "train.tokens_per_step": "4096"}
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    table = build_table(trials(load_runs("budget", uri)))
    assert "Every run trained 4,883 steps of 4,096 tokens (20.0M tokens)." in table.to_markdown()

    run_id = fake_run(client, experiment, "+sweep=x seed=2", 2, 22.0, {"variant": "RWKV"})  # an older run
    client.log_batch(run_id, params=[Param("trainer.max_steps", "4883")])
    assert "Every run trained" not in build_table(trials(load_runs("budget", uri))).to_markdown()
