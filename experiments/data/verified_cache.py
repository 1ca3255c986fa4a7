"""Token files that are checked before they are trusted, in a time that does not grow with the corpus.

Each split's file is recorded in the cache's ``meta.json`` with its length, its SHA-256, the largest token id it holds
(the vocabulary bound) and a stamp of the file as written (size, modification time, inode). A start compares stamps
only; a file whose stamp differs (rewritten, truncated, replaced, or copied elsewhere) is hashed in full, and either
matches its checksum (the stamp is renewed) or is rebuilt with a one-line notice, instead of raising a traceback that
never names the cache, or loading silently (ids beyond the vocabulary shift every metric). The cache is built and
checked under a lock beside it, so parallel first runs tokenise once and never see a half-written cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock

log = logging.getLogger("arch_zoo")
CHUNK = 1 << 20
META = "meta.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def stamp(path: Path) -> list[int]:
    """What changes whenever a file is written, replaced or copied: size, modification time (ns), inode."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def write_meta(folder: Path, meta: dict) -> None:
    """Replace ``meta.json`` atomically: a reader sees the old record or the new one, never half of one."""
    tmp = folder / "meta.tmp.json"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / META)


def problem(folder: Path) -> str | None:
    """Why the cache in ``folder`` cannot be trusted, or None when every file matches its record."""
    meta_path = folder / META
    if not meta_path.exists():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
        splits, vocab = meta["splits"], int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as err:
        return f"meta.json is unreadable ({err})"
    renewed = False
    for name, record in splits.items():
        if "sha256" not in record or "file" not in record:
            return f"{name} has no checksum (written by an older version)"
        path = folder / record["file"]
        if not path.is_file():
            return f"{path.name} is missing"
        try:
            max_id, expected_size = record["max_id"], record["n_tokens"] * np.dtype(record["dtype"]).itemsize
        except (KeyError, TypeError) as err:
            return f"meta.json is unreadable ({name}: {err!r})"
        if not 0 <= max_id < vocab:
            return f"{path.name} holds token ids up to {max_id} with a vocabulary of {vocab}"
        if record.get("stamp") == stamp(path):
            continue
        if path.stat().st_size != expected_size or sha256_of(path) != record["sha256"]:
            return f"{path.name} does not match its checksum (truncated or changed)"
        record["stamp"], renewed = stamp(path), True
    if renewed:  # intact but touched (copied, restored from a backup): hashed once, trusted by its stamp again
        write_meta(folder, meta)
    return None


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        yield


def ensure(folder: Path, build: Callable[[Path], None]) -> None:
    """Check the cache in ``folder``; (re)build it with ``build`` when it is missing or fails the check. ``build``
    writes the split files and a ``meta.json`` whose records carry each file's :func:`stamp`."""
    with locked(folder):
        found = problem(folder)
        if found is None:
            return
        if found != "missing":
            log.warning("data cache %s: %s; rebuilding it", folder, found)
        (folder / META).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        build(folder)
        if (after := problem(folder)) is not None:
            raise RuntimeError(f"data cache {folder} fails its check right after being built: {after}")
