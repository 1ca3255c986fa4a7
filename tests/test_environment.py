"""The installed environment: our kernels beside the Hugging Face ``kernels`` distribution, and the locked set.

Our ``kernels/`` folder is imported as ``arch_zoo.kernels``; it has no ``__init__.py``, so from the repository root
(where ``python -m pytest`` puts it on ``sys.path``) it is at most a namespace portion, which loses to an installed
``kernels`` package. transformers requires that distribution and probes for it; fla imports transformers.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"

# Run in a fresh interpreter: the hub package and ours import side by side, each under its own name, with fla's
# layers (which import transformers, which probes for the hub package) and every registered mixer.
SIDE_BY_SIDE = """
import json, kernels, transformers, fla, fla.layers
from transformers.utils.import_utils import is_kernels_available
from arch_zoo import available_mixers
import arch_zoo, arch_zoo.kernels.dispatch as dispatch, torch
q = torch.randn(1, 5, 2, 4, dtype=torch.float64)
o, _ = dispatch.retention(q, q, q, torch.log(torch.tensor([0.9, 0.5], dtype=torch.float64)))
print(json.dumps({"hub": kernels.__file__, "hub_available": is_kernels_available(),
                  "hub_api": hasattr(kernels, "get_kernel"), "arch_zoo": arch_zoo.__file__,
                  "dispatch": dispatch.__file__, "mixers": sorted(available_mixers()),
                  "finite": bool(o.isfinite().all())}))
"""


def run_side_by_side(python: Path | str, cwd: Path) -> dict:
    out = subprocess.run([str(python), "-c", SIDE_BY_SIDE], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def hub_distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the test environment lacks the 'kernels' distribution (pyproject.toml's test extra installs it)")


def test_the_hub_kernels_package_and_ours_import_side_by_side_from_the_repository_root():
    hub = hub_distribution()
    seen = run_side_by_side(sys.executable, ROOT)
    assert Path(seen["hub"]).parent == Path(hub.locate_file("kernels")), seen  # theirs, not our folder
    assert seen["hub_available"] and seen["hub_api"] and seen["finite"]
    assert Path(seen["dispatch"]).resolve() == ROOT / "kernels" / "dispatch.py"
    assert {"retnet", "transformer", "fla_retention"} <= set(seen["mixers"])


def test_our_kernels_folder_is_not_a_top_level_package():
    """A ``kernels/__init__.py`` would make the folder shadow the hub package wherever the root is on sys.path."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "arch_zoo" / "kernels").resolve() == ROOT / "kernels"


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> dict[str, Path]:
    """Our wheel installed (not editable) by pip into a fresh venv's site-packages beside the hub ``kernels``
    package's files; the rest (torch, transformers, fla) is reached through the test environment's site-packages,
    appended after the venv's own, so nothing has to be downloaded."""
    tmp = tmp_path_factory.mktemp("wheel_env")
    src = tmp / "src"  # a copy, so that the build leaves nothing in the working tree
    junk = shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "mlruns", "*.db", "build", "*.egg-info")
    shutil.copytree(ROOT, src, ignore=junk, symlinks=True)
    dist = tmp / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src]
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("arch_zoo-*.whl")

    env = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    hub = hub_distribution()
    for file in hub.files or []:  # the hub package as its own wheel installs it
        if not str(file).startswith(".."):
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(hub.locate_file(file), target)
    (site / "zz_test_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    hub_init = (site / "kernels" / "__init__.py").read_bytes()

    install = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel]
    subprocess.run(install, check=True, capture_output=True, timeout=600)
    assert (site / "kernels" / "__init__.py").read_bytes() == hub_init, "our wheel wrote over the hub package"
    return {"python": python, "site": site, "wheel": wheel, "elsewhere": tmp}


def test_the_wheel_ships_the_kernels_inside_arch_zoo_only(wheel_env):
    names = zipfile.ZipFile(wheel_env["wheel"]).namelist()
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ would overwrite the hub package"
    for module in ("dispatch", "reference", "retention_triton", "benchmark"):
        assert f"arch_zoo/kernels/{module}.py" in names
    assert "arch_zoo/kernels/README.md" in names


def test_the_installed_wheel_imports_beside_the_hub_package_from_elsewhere(wheel_env):
    seen = run_side_by_side(wheel_env["python"], wheel_env["elsewhere"])
    site = wheel_env["site"]
    assert Path(seen["hub"]).parent == site / "kernels"
    assert Path(seen["arch_zoo"]).parent == site / "arch_zoo"
    assert Path(seen["dispatch"]) == site / "arch_zoo" / "kernels" / "dispatch.py"
    assert seen["hub_available"] and seen["hub_api"] and seen["finite"]
    assert {"retnet", "transformer", "fla_retention", "fla_gla"} <= set(seen["mixers"])  # entry points in the wheel


def test_the_installed_wheel_imports_beside_the_hub_package_from_the_repository_root(wheel_env):
    """From the root ``arch_zoo`` is the source folder (Python puts the working directory first); the hub package
    still wins over our folder of the same name."""
    seen = run_side_by_side(wheel_env["python"], ROOT)
    assert Path(seen["hub"]).parent == wheel_env["site"] / "kernels"
    assert Path(seen["dispatch"]).resolve() == ROOT / "kernels" / "dispatch.py"
    assert seen["hub_available"] and seen["hub_api"] and seen["finite"]


HYDRA_PLUGIN_PROBE = """
import json, hydra_plugins.arch_zoo_optuna as plugin
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
print(json.dumps({"found": [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)],
                  "file": plugin.__file__}))
"""


def test_the_wheel_ships_the_optuna_sweeper_where_hydra_finds_plugins(wheel_env):
    """The sweeper's source lives in ``sweeps/hydra_plugins``; the wheel puts it in the top-level ``hydra_plugins``
    namespace (beside other plugins' portions), and Hydra's scan finds it there, from outside the repository."""
    names = zipfile.ZipFile(wheel_env["wheel"]).namelist()
    assert "hydra_plugins/arch_zoo_optuna/__init__.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace: other distributions' plugins share it
    assert not [n for n in names if n.startswith("sweeps/hydra_plugins/")]
    python = wheel_env["python"]
    out = subprocess.run(
        [str(python), "-c", HYDRA_PLUGIN_PROBE], cwd=wheel_env["elsewhere"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "hydra_plugins.arch_zoo_optuna.OptunaSweeper" in seen["found"]
    assert Path(seen["file"]) == wheel_env["site"] / "hydra_plugins" / "arch_zoo_optuna" / "__init__.py"


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_lock_pins_everything_the_suite_needs():
    pins = lock_pins()
    for name in ("torch", "lightning", "hydra-core", "mlflow", "flash-linear-attention", "transformers", "kernels"):
        assert name in pins, name
    for name in ("pytest", "pytest-timeout", "ruff", "torchscale", "pip", "setuptools"):  # tools and the oracle
        assert name in pins, name
    assert "arch-zoo" not in pins


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(), reason="checks the environment that make builds"
)
def test_the_environment_make_built_is_exactly_the_lock():
    pins = lock_pins()
    # the venv's own site-packages only: setuptools puts its vendored packages on sys.path, and conftest the plugin
    site = sysconfig.get_path("purelib")
    installed = {
        re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
        for d in importlib.metadata.distributions(path=[site])
    }
    installed.pop("arch-zoo", None)
    differs = {n: (v, pins.get(n)) for n, v in installed.items() if v.split("+")[0] != pins.get(n)}
    assert not differs, f"installed vs requirements.lock (run `make clean test`, or `make lock` to refresh): {differs}"
