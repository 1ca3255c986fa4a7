"""The mixer contract as a test suite that ships with the package, for mixer authors outside this repository.

One line checks a mixer (a built-in, or a plugin registered through the ``arch_zoo.mixers`` entry points)::

    zoo-check-mixer my_mixer            # or several names; none: every registered mixer
    zoo-check-mixer my_mixer -- -x -v   # anything after -- goes to pytest

It runs ``arch_zoo/testing/test_contract.py`` (shape, causality, continuation from a state, an allocated state,
state size, a training step, declared FLOPs) on the named mixers with pytest, which must be installed
(``pip install "arch-zoo[test]"``). The same selection works under pytest directly: ``ARCH_ZOO_MIXERS=my_mixer
pytest --pyargs arch_zoo.testing.test_contract``. A name that is not registered is an error that lists the registered
ones, never an empty, passing run.
"""

from __future__ import annotations

import os

import pytest

from arch_zoo.registry import available_mixers, get_mixer, mixer_origin

SELECTION_ENV = "ARCH_ZOO_MIXERS"


def selected_mixers() -> list[str] | None:
    """The mixers ``ARCH_ZOO_MIXERS`` names (comma-separated), each checked against the registry; None: all."""
    text = os.environ.get(SELECTION_ENV, "").strip()
    if not text:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get_mixer(name)  # an unknown name raises, listing the registered ones
    return names


def mixer_params(names: list[str] | None = None) -> list:
    """The mixers as pytest params: ``names``, or every registered one (an alias is not checked again under its old
    name). One that cannot build on this machine (e.g. needs a GPU) is skipped with the reason."""
    mixers = available_mixers()
    chosen = names if names is not None else [n for n, spec in mixers.items() if spec.alias_of is None]
    params = []
    for name in chosen:
        reason = mixers[name].mixer_class.unavailable()
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def describe(names: list[str]) -> list[str]:
    """One line per mixer: its name and where it comes from (a plugin's distribution, version and entry point)."""
    lines = []
    for name in names:
        origin = mixer_origin(name)
        if origin["distribution"] == "built-in":
            lines.append(f"{name}: built-in")
        else:
            lines.append(f"{name}: {origin['distribution']} {origin['version']} ({origin['entry_point']})")
    return lines
