"""``zoo-mixers``: list every registered mixer (plugins included) with its config fields and decoding state, and
every plugin that failed to import with its error."""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

from arch_zoo import available_mixers, build_mixer
from arch_zoo.registry import broken_plugins, mixer_origin


def list_mixers() -> None:
    table = Table(title="registered token mixers")
    # the state column: numbers per layer at d_model 64 with each mixer's small config (the contract tests' size),
    # not the README's table, which is at the paper's width
    for column in ("name", "source", "state per layer @T=2048, d_model=64 (small config)", "config fields (defaults)"):
        table.add_column(column, overflow="fold")
    mixers = available_mixers()
    # the mixers this machine can build first, then those it cannot (e.g. CUDA-only), each group by name
    for name, spec in sorted(mixers.items(), key=lambda item: (item[1].mixer_class.unavailable() is not None, item[0])):
        if spec.alias_of is not None:
            table.add_row(name, f"alias of {spec.alias_of}", "", "")
            continue
        small = dataclasses.replace(spec.config_class.small(), name=name)
        origin = mixer_origin(name)
        source = "built-in" if origin["distribution"] == "built-in" else f"{origin['distribution']} {origin['version']}"
        reason = spec.mixer_class.unavailable()
        try:
            state = f"unavailable here: {reason}" if reason else f"{build_mixer(small, 64).state_size(2048):,}"
        except Exception as err:  # a mixer that cannot build here is still listed
            state = f"unavailable: {err}"
        fields = ", ".join(
            f"{f.name}={getattr(spec.config_class(), f.name)!r}"
            for f in dataclasses.fields(spec.config_class)
            if f.name != "name"
        )
        table.add_row(name, source, state, fields)
    for name, error in broken_plugins().items():  # listed, so that a missing name is explained
        table.add_row(name, "broken plugin", "unavailable", error)
    Console().print(table)
