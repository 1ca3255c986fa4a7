"""The layering the code holds to (README, "Architecture"): who may import whom, how the Optuna sweeper reaches
Hydra, and that a mixer's class is named only in its own file."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("arch_zoo", "experiments", "sweeps", "analysis", "kernels")


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_experiments_does_not_import_sweeps_and_arch_zoo_no_training_code():
    """Sweeps are configs and a Hydra plugin on top of the training entry point, never below it; the model package
    is pure PyTorch."""
    upward = {"experiments": {"sweeps", "analysis"}, "arch_zoo": {"experiments", "sweeps", "analysis"}}
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for package, banned in upward.items()
        for path in sources(package)
        for name in imported_modules(path)
        if name.split(".")[0] in banned
    ]
    assert not found, found


def test_nothing_fabricates_modules_at_import_time():
    """Plugins are packaged, not patched in: no source assigns into ``sys.modules``."""
    found = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in sources(package)
        if re.search(r"sys\.modules\[[^\]]+\]\s*=", path.read_text())
    ]
    assert not found, found


def test_the_optuna_sweeper_is_found_by_hydras_plugin_discovery():
    """In a fresh interpreter that imports nothing of ours first, Hydra's own scan of the ``hydra_plugins``
    namespace finds the sweeper (shipped there from ``sweeps/hydra_plugins``), and ``hydra/sweeper=optuna`` names it."""
    probe = (
        "import json, sys\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "found = [f'{c.__module__}.{c.__name__}' for c in Plugins.instance().discover(Sweeper)]\n"
        "import hydra_plugins.arch_zoo_optuna as plugin\n"
        "print(json.dumps({'found': found, 'file': plugin.__file__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert "hydra_plugins.arch_zoo_optuna.OptunaSweeper" in seen["found"]
    assert Path(seen["file"]).resolve() == ROOT / "sweeps" / "hydra_plugins" / "arch_zoo_optuna" / "__init__.py"
    target = (ROOT / "sweeps" / "configs" / "hydra" / "sweeper" / "optuna.yaml").read_text()
    assert "_target_: hydra_plugins.arch_zoo_optuna.OptunaSweeper" in target


def test_no_module_outside_a_mixers_file_names_its_class():
    from arch_zoo import available_mixers

    found = []
    for spec in available_mixers().values():
        if spec.source != "builtin" or spec.alias_of is not None:
            continue
        own = Path(sys.modules[spec.mixer_class.__module__].__file__).resolve()
        pattern = re.compile(rf"\b{spec.mixer_class.__name__}\b")
        for package in PACKAGES:
            for path in sources(package):
                relative = str(path.relative_to(ROOT))
                if path.resolve() == own:
                    continue
                code = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Name, ast.alias))]
                names = {getattr(n, "id", None) or n.name.split(".")[-1] for n in code}
                if any(pattern.fullmatch(n) for n in names):
                    found.append(f"{relative}: {spec.mixer_class.__name__}")
    assert not found, found
