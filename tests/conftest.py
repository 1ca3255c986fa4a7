import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
# A third-party mixer package, found through its entry point like an installed plugin (see test_registry.py).
PLUGIN_PATH = TESTS / "plugin_fixture"
sys.path.insert(0, str(PLUGIN_PATH))

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One packed-data cache for the whole session (tokenising the default corpus takes seconds)."""
    return Path(os.environ.get("ARCH_ZOO_TEST_CACHE") or tmp_path_factory.mktemp("arch_zoo_cache"))


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, data_cache) -> dict[str, float]:
    """The final metrics of ``RESUMABLE`` run through uninterrupted: what each stopped and relaunched run must end
    with (one run for all of them: each is ten seconds of subprocess on the CI machine)."""
    from tests.test_train import RESUMABLE, only_run, run_train

    tmp = tmp_path_factory.mktemp("straight")
    proc = run_train(tmp, data_cache, *RESUMABLE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run(tmp)[1].data.metrics


def mixer_params() -> list:
    """Every registered mixer as a pytest param (once: not again under an alias); those that cannot build on this
    machine are skipped with why."""
    from arch_zoo.testing import mixer_params as params

    return params()
