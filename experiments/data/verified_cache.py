"""Packed token arrays that are checked before they are trusted.

Each array is recorded in the cache's ``meta.json`` with its length, its SHA-256 and the largest token id it may
hold (the vocabulary bound). A truncated, garbled or foreign file fails the check, and the cache is rebuilt with a
one-line notice, instead of raising a traceback that never names the cache, or loading silently (ids beyond the
vocabulary shift every metric). The cache is built and checked under a lock beside it, so parallel first runs
tokenise once and never see a half-written cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock

log = logging.getLogger("arch_zoo")
CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def save_array(folder: Path, name: str, tokens: np.ndarray) -> dict[str, object]:
    """Write ``<name>.npy`` atomically; return what :func:`problem` checks it against."""
    tmp = folder / f"{name}.tmp.npy"
    np.save(tmp, tokens)
    record = {"n_tokens": int(len(tokens)), "sha256": sha256_of(tmp), "max_id": int(tokens.max(initial=0))}
    tmp.replace(folder / f"{name}.npy")
    return record


def problem(folder: Path) -> str | None:
    """Why the cache in ``folder`` cannot be trusted, or None when every array matches its record."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
        splits, vocab = meta["splits"], int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as err:
        return f"meta.json is unreadable ({err})"
    for name, record in splits.items():
        path = folder / f"{name}.npy"
        if "sha256" not in record:
            return f"{path.name} has no checksum (written by an older version)"
        if not path.is_file():
            return f"{path.name} is missing"
        if sha256_of(path) != record["sha256"]:
            return f"{path.name} does not match its checksum (truncated or changed)"
        if not 0 <= record["max_id"] < vocab:
            return f"{path.name} holds token ids up to {record['max_id']} with a vocabulary of {vocab}"
        if len(np.load(path, mmap_mode="r")) != record["n_tokens"]:
            return f"{path.name} does not hold its {record['n_tokens']} tokens"
    return None


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        yield


def ensure(folder: Path, build: Callable[[Path], None]) -> None:
    """Check the cache in ``folder``; (re)build it with ``build`` when it is missing or fails the check."""
    with locked(folder):
        found = problem(folder)
        if found is None:
            return
        if found != "missing":
            log.warning("data cache %s: %s; rebuilding it", folder, found)
        (folder / "meta.json").unlink(missing_ok=True)
        build(folder)
        if (after := problem(folder)) is not None:
            raise RuntimeError(f"data cache {folder} fails its check right after being built: {after}")
