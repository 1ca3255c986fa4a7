"""The trial-packing benchmark (``experiments/bench/packing.py``) on tiny CPU runs: every run of a group is counted,
and the steady rate leaves out each run's first window (its warm-up, and a compiled run's compile)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

from experiments.bench import packing
from tests.test_train import TINY


def test_the_steady_rate_is_the_median_window_after_the_first():
    windows = [SimpleNamespace(step=s, value=v) for s, v in [(30, 98.0), (10, 5.0), (20, 100.0), (40, 103.0)]]
    assert packing.steady_rate(windows) == 100.0  # the 5.0 of the first window (the compile) is left out
    assert math.isnan(packing.steady_rate(windows[1:2]))  # one window: nothing after the warm-up


def test_a_group_of_runs_is_summed_and_its_steady_rate_reported(tmp_path: Path, data_cache, monkeypatch):
    monkeypatch.setenv("ARCH_ZOO_CACHE", str(data_cache))
    out = tmp_path / "packing"
    runs = [*TINY, "model/mixer=transformer", "trainer.max_steps=6", "trainer.val_check_interval=6"]
    runs += ["final_validate=false", "logger.log_model=false", "callbacks.throughput.window=2"]
    packing.main(["--jobs", "1,2", "--out", str(out), "--timeout", "300", "--", *runs])
    rows = json.loads((out / "packing.json").read_text())["rows"]
    assert [(r["jobs"], r["finished"], r["failed"]) for r in rows] == [(1, 1, 0), (2, 2, 0)]
    for r in rows:
        # windows at steps 2, 4, 6: the steady rate is each run's median of the last two, summed over the group
        assert 0 < r["steady_tokens_per_s"] < math.inf and 0 < r["train_tokens_per_s"] < math.inf
    assert len(list((out / "jobs2").glob("mlflow*.db"))) == 2  # each run's store is kept, for its windows
    assert "steady tokens/s (sum)" in (out / "packing.md").read_text()
