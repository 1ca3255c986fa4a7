"""The documents of ``zoo_mc``, read from the JSON lines beside this file (no network, no dataset cache)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DOCS = Path(__file__).with_name("zoo_mc.jsonl")


def load(**_: object) -> datasets.DatasetDict:
    """lm-eval's ``custom_dataset`` hook: one ``test`` split (few-shot examples are drawn from it as well)."""
    rows = [json.loads(line) for line in DOCS.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
