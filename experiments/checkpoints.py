"""Checkpoints that a crash, a full disk or a bad copy cannot turn into a run that never resumes.

Lightning writes a checkpoint through fsspec's transaction, which stages it in ``$TMPDIR`` and moves it into place:
atomic only when ``$TMPDIR`` and the run directory share a filesystem, else a copy that a full disk leaves
truncated. :class:`AtomicCheckpointIO` writes beside the target instead (temporary file, fsync, rename), and keeps
the previous checkpoint as ``<name>.prev.ckpt``. :func:`usable_checkpoint` checks a checkpoint before a resume
trusts it (a checkpoint is a zip archive with a CRC per record, so truncation and garbled bytes both show) and falls
back to the previous one.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger("arch_zoo")


def previous_of(path: Path) -> Path:
    """``last.ckpt`` -> ``last.prev.ckpt``: the checkpoint before the newest, kept as a fallback."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, keep the old target as ``.prev``, rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            if path.is_file():
                keep = path.with_name(f".{previous_of(path).name}.{os.getpid()}.tmp")
                try:
                    os.link(path, keep)  # no copy: the old file stays whole under a second name
                except OSError:
                    shutil.copyfile(path, keep)
                os.replace(keep, previous_of(path))
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


def damage(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when every record of it reads back intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return f"record {bad} fails its CRC check" if bad else None


def usable_checkpoint(newest: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint of ``newest`` and its ``.prev`` fallback, and a line per damaged one."""
    problems = []
    for candidate in (newest, previous_of(newest)):
        if not candidate.is_file():
            continue
        found = damage(candidate)
        if found is None:
            return candidate, problems
        problems.append(f"checkpoint {candidate} is damaged ({found})")
    return None, problems
