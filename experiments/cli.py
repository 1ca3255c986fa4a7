"""``zoo-mixers``: list every registered mixer (plugins included) with its config fields and decoding state, and
every plugin that failed to import with its error."""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

from arch_zoo import available_mixers, build_mixer
from arch_zoo.registry import broken_plugins


def list_mixers() -> None:
    table = Table(title="registered token mixers")
    for column in ("name", "source", "state @T=2048, d=64", "config fields (defaults)"):
        table.add_column(column, overflow="fold")
    for name, spec in available_mixers().items():
        if spec.alias_of is not None:
            table.add_row(name, f"alias of {spec.alias_of}", "", "")
            continue
        small = dataclasses.replace(spec.config_class.small(), name=name)
        try:
            state = f"{build_mixer(small, 64).state_size(2048):,}"
        except Exception as err:  # a mixer that cannot build here (e.g. needs a GPU) is still listed
            state = f"unavailable: {err}"
        fields = ", ".join(
            f"{f.name}={getattr(spec.config_class(), f.name)!r}"
            for f in dataclasses.fields(spec.config_class)
            if f.name != "name"
        )
        table.add_row(name, spec.source, state, fields)
    for name, error in broken_plugins().items():  # listed, so that a missing name is explained
        table.add_row(name, "broken plugin", "unavailable", error)
    Console().print(table)
