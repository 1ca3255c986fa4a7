"""The RetNet paper's reported numbers (Sun et al. 2023, arXiv 2307.08621, Tables 5 and 6) as data.

Kept as data rather than prose so that a table of our runs can print the paper's numbers beside ours and check,
column by column, whether an effect points the same way. All values are perplexities at 200M parameters after
about 5B tokens, so only the *direction* of an effect is comparable with a reduced-scale run, never the level.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# The paper's evaluation columns, and the metric our runs log for each one. An out-of-domain set is named by its key
# in the data config (``ood/<name>/ppl``); names are compared case-insensitively.
COLUMNS: tuple[str, ...] = ("in-domain", "PG22", "QMSum", "GovReport", "SummScreen")
METRIC_OF_COLUMN: dict[str, str] = {
    "in-domain": "val/ppl",
    "PG22": "ood/pg22/ppl",
    "QMSum": "ood/qmsum/ppl",
    "GovReport": "ood/govreport/ppl",
    "SummScreen": "ood/summscreen/ppl",
}


def normalise_label(label: str) -> str:
    """``"- γ decay"``, ``"−gamma decay"`` and ``"-γ Decay"`` -> ``"γdecay"``: labels are typed by hand, differently."""
    text = label.lower().replace("gamma", "γ")
    return re.sub(r"[^0-9a-zγ=]", "", text)


@dataclass(frozen=True)
class PaperRow:
    """One reported row: its label in the paper, what it changes, its numbers, the names our runs may give it, and
    the recorded params that make a run this row.

    ``params`` are what zoo-train logs (the resolved config, ``str`` of each value): a run whose params hold all of
    them is this row, the row naming most of them winning (an ablation names the mixer and its switch, so it wins
    over the full model). A label that is a list of overrides (runs without a ``variant`` tag) is matched against the
    same params by the last dotted part of each key; an alias ending in ``=`` matches any value of that key (the
    paper's head dimension is not ours, so any head-dimension override names that row).
    """

    label: str
    values: tuple[float, ...]
    change: str = ""
    aliases: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()

    def matched_params(self, params: dict[str, str]) -> int:
        """How many of this row's params the recorded ``params`` hold; 0 when one differs (or the row has none)."""
        if not self.params or any(str(params.get(key, "")).lower() != value.lower() for key, value in self.params):
            return 0
        return len(self.params)

    def override_names(self) -> set[str]:
        """This row's switches written as overrides (``swish_gate=false``), normalised, plus any ``key=`` alias."""
        switches = {f"{key.split('.')[-1]}={value}" for key, value in self.params if not key.endswith(".name")}
        return {normalise_label(a) for a in (*switches, *self.aliases) if "=" in a}

    def match_strength(self, label: str) -> int:
        """How specifically ``label`` names this row: 3 by name, 2 by an override, 1 by the mixer alone, 0 not.

        Ranked so that ``model/mixer=retnet model.mixer.swish_gate=false`` is the swish-gate ablation, not RetNet.
        """
        names = {normalise_label(a) for a in (self.label, *self.aliases) if "=" not in a}
        if normalise_label(label) in names:
            return 3
        overrides = []
        for token in label.split():
            key, sep, value = token.partition("=")
            if sep:
                overrides.append(normalise_label(key.split(".")[-1].split("/")[-1] + "=" + value))
        for alias in self.override_names():
            if any(o == alias or (alias.endswith("=") and o.startswith(alias)) for o in overrides):
                return 2
        if any(o.startswith("mixer=") and o.removeprefix("mixer=") in names for o in overrides):
            return 1
        return 0


@dataclass(frozen=True)
class PaperTable:
    """A reported table: its rows, its columns, and the row every effect is measured against."""

    name: str
    caption: str
    reference: str
    rows: tuple[PaperRow, ...]
    columns: tuple[str, ...] = COLUMNS
    metric_of_column: dict[str, str] = field(default_factory=lambda: dict(METRIC_OF_COLUMN))
    higher_is_better: bool = False  # perplexity

    def row(self, label: str) -> PaperRow:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"{self.name} has no row {label!r}; rows: {[r.label for r in self.rows]}")

    def match(self, label: str) -> PaperRow | None:
        """The paper's row for one of our variant labels, or None when the paper has no such row."""
        strengths = [row.match_strength(label) for row in self.rows]
        best = max(strengths)
        return self.rows[strengths.index(best)] if best else None

    def match_params(self, params: dict[str, str]) -> PaperRow | None:
        """The paper's row that a run's recorded params make it, or None (no row, or two rows equally)."""
        counts = [row.matched_params(params) for row in self.rows]
        best = max(counts)
        return self.rows[counts.index(best)] if best and counts.count(best) == 1 else None

    def match_run(self, label: str, params: dict[str, str]) -> PaperRow | None:
        """A group of runs' row: by what the runs recorded when that says more than the mixer alone (an ablation's
        switch), else by its label (a sweep's ``variant`` tag; the overrides of loose runs), else by the mixer."""
        by_params = self.match_params(params)
        if by_params is not None and len(by_params.params) > 1:
            return by_params
        return self.match(label) or by_params

    def value(self, row: str, column: str) -> float:
        return self.row(row).values[self.columns.index(column)]

    def effect(self, row: str, column: str) -> float:
        """The paper's Δ: this row minus the reference row, in the column's units."""
        return self.value(row, column) - self.value(self.reference, column)

    def direction(self, row: str, column: str) -> int:
        """+1 where the row raises the number, -1 where it lowers it, 0 for the reference itself."""
        effect = self.effect(row, column)
        return 0 if effect == 0 else int(math.copysign(1, effect))

    def hurts(self, row: str, column: str) -> bool:
        """Whether the paper reports this row as worse than the reference in this column."""
        direction = self.direction(row, column)
        return direction > 0 if not self.higher_is_better else direction < 0

    def column_of_metric(self, metric: str) -> str | None:
        for column, key in self.metric_of_column.items():
            if key.lower() == metric.lower():
                return column
        return None


def mixer(name: str) -> tuple[tuple[str, str], ...]:
    """The recorded params of a row that is a whole architecture: its mixer's registry name."""
    return (("model.mixer.name", name),)


def retnet_switch(field: str, value: str) -> tuple[tuple[str, str], ...]:
    """The recorded params of an ablation row: RetNet with one of its config fields at ``value``."""
    return (*mixer("retnet"), (f"model.mixer.{field}", value))


RETNET = PaperRow(
    "RetNet",
    (26.05, 45.27, 21.33, 16.52, 22.48),
    "the full model",
    aliases=("Full RetNet", "full", "baseline", "retnet"),
    params=(("model.mixer.name", "retnet"),),
)

TABLE5 = PaperTable(
    name="table5",
    caption="Table 5: perplexity of 200M-parameter models trained on 5B tokens (lower is better).",
    reference="RetNet",
    rows=(
        RETNET,
        PaperRow("RWKV", (30.92, 51.41, 28.17, 19.80, 25.78), "TimeMix replaces attention", ("rwkv",), mixer("rwkv")),
        PaperRow("H3", (29.97, 49.17, 24.29, 19.19, 25.11), "head dimension 8", ("h3",), mixer("h3")),
        PaperRow("Hyena", (32.08, 52.75, 28.18, 20.55, 26.51), "", ("hyena",), mixer("hyena")),
        PaperRow(
            "Linear Transformer",
            (40.24, 63.86, 28.45, 25.33, 32.02),
            "",
            ("linear attention", "linear_attention"),
            mixer("linear_attention"),
        ),
    ),
)

TABLE6 = PaperTable(
    name="table6",
    caption="Table 6: ablations of RetNet at 200M parameters, 5B tokens (lower is better).",
    reference="RetNet",
    rows=(
        RETNET,
        PaperRow(
            "−swish gate",
            (27.84, 49.44, 22.52, 17.45, 23.72),
            "gate removed, same parameter allocation as Transformers",
            ("no swish gate", "no_swish_gate"),
            retnet_switch("swish_gate", "False"),
        ),
        PaperRow(
            "−GroupNorm",
            (27.54, 46.95, 22.61, 17.59, 23.73),
            "per-head normalisation removed",
            ("no group norm", "no_group_norm"),
            retnet_switch("group_norm", "False"),
        ),
        PaperRow(
            "−γ decay",
            (27.86, 47.85, 21.99, 17.49, 23.70),
            "γ = 1",
            ("no decay", "no_decay"),
            retnet_switch("decay", "False"),
        ),
        PaperRow(
            "−multi-scale decay",
            (27.02, 47.18, 22.08, 17.17, 23.38),
            "γ = 127/128 in every head",
            ("no multiscale decay", "no_multiscale_decay"),
            retnet_switch("multiscale_decay", "False"),
        ),
        PaperRow(
            "reduce head dimension",
            (27.68, 47.72, 23.09, 17.46, 23.41),
            "head dimension 256 -> 64, d_model unchanged",
            ("head dim small", "head_dim_small", "head_dim="),
            retnet_switch("head_dim_divisor", "4"),  # the paper's 256 -> 64
        ),
    ),
)

TABLES: dict[str, PaperTable] = {TABLE5.name: TABLE5, TABLE6.name: TABLE6}


def get_table(name: str | None) -> PaperTable | None:
    """``"table5"``, ``"table6"``, or ``None``/``"none"`` for no paper columns."""
    if name is None or name.lower() == "none":
        return None
    try:
        return TABLES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown paper table {name!r}; known: {sorted(TABLES)} or 'none'") from None
