"""Command-line checks that must run before Hydra composes the config, because composing is where they would fail
with Hydra's own report: ``model/mixer=retnett`` names a config file that does not exist, and Hydra answers with a
list of files and its search path (24 lines) instead of the registry's "did you mean". Here the registry answers,
in one line, for the mixers it knows (plugins included)."""

from __future__ import annotations

import re
import sys

from arch_zoo.contract import ConfigError
from arch_zoo.registry import get_mixer

MIXER_GROUPS = ("model/mixer", "model/hybrid_mixer")
# NAME, or a multirun list NAME,NAME; sweep functions (choice(...), glob(...)) are left to Hydra
PLAIN_NAMES = re.compile(r"^[\w.-]+(,[\w.-]+)*$")


def unknown_mixer(overrides: list[str]) -> str | None:
    """The registry's message for the first mixer an override selects that is not registered (None: all are)."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") not in MIXER_GROUPS or not PLAIN_NAMES.match(value):
            continue
        for name in value.split(","):
            try:
                get_mixer(name)
            except ConfigError as error:
                return str(error)
    return None


def refuse_unknown_mixers(argv: list[str], program: str) -> None:
    """Exit with code 2 and one line when the command line selects an unregistered mixer."""
    problem = unknown_mixer(argv)
    if problem is not None:
        print(f"{program}: error: {problem}", file=sys.stderr)
        sys.exit(2)
