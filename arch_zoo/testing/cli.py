"""``zoo-check-mixer``: run the shipped mixer-contract tests on named mixers (see :mod:`arch_zoo.testing`)."""

from __future__ import annotations

import argparse
import os
import sys

from arch_zoo.errors import ConfigError
from arch_zoo.registry import available_mixers, get_mixer
from arch_zoo.testing import SELECTION_ENV, describe


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="zoo-check-mixer", description=__doc__)
    parser.add_argument("names", nargs="*", help="registered mixer names (default: all of them)")
    args = parser.parse_args(argv[:split])
    try:
        import pytest
    except ImportError:
        print('zoo-check-mixer needs pytest: pip install "arch-zoo[test]"', file=sys.stderr)
        return 2
    try:
        for name in args.names:
            get_mixer(name)
    except ConfigError as err:
        print(f"zoo-check-mixer: {err}", file=sys.stderr)
        return 2
    names = args.names or [n for n, spec in available_mixers().items() if spec.alias_of is None]
    print("checking the mixer contract for:\n  " + "\n  ".join(describe(names)), flush=True)
    os.environ[SELECTION_ENV] = ",".join(names)
    return int(
        pytest.main(["--pyargs", "arch_zoo.testing.test_contract", "-p", "no:cacheprovider", *argv[split + 1 :]])
    )


if __name__ == "__main__":
    sys.exit(main())
