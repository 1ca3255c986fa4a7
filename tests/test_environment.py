"""Our top-level ``kernels`` package must not break libraries that probe for the PyPI ``kernels`` distribution."""

import importlib.metadata
import subprocess
import sys


def test_transformers_and_fla_import_beside_our_kernels_package():
    code = (
        "import kernels, transformers, fla, fla.layers\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available(), 'transformers mistakes our kernels package for the hub one'\n"
        "print(kernels.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "site-packages/kernels" not in out.stdout  # ours, not the unrelated distribution


def test_unrelated_kernels_distribution_is_not_installed():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    raise AssertionError(f"the PyPI 'kernels' distribution {dist.version} would shadow ours")
