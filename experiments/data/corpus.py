"""Text corpora as Hugging Face ``datasets``: the offline default, any hub dataset, or local text files.

The offline default needs no download: the source of the Python standard library that ships with the interpreter
(about 30 MB of real text on every machine) is the in-domain corpus, split by a hash of each file's path, and the
English prose of ``pydoc_data``'s topic pages is the out-of-domain set (an offline analogue of the paper's
in-domain / out-of-domain columns).
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from arch_zoo.errors import ConfigError


@dataclass
class CorpusConfig:
    """Where text comes from. ``source``: stdlib | hub | files."""

    source: str = "stdlib"
    # hub: load_dataset(name, config_name); the validation split falls back to a slice of train when absent
    name: str | None = None
    config_name: str | None = None
    train_split: str = "train"
    val_split: str | None = "validation"
    text_field: str = "text"
    # files: local text files or globs (one document per file); validation is a hashed share of them, or, when that
    # leaves a split empty (one or a few files), the last val_percent of every file's lines
    files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    val_percent: float = 2.0
    # out-of-domain sets: name -> list of files/globs, or the built-in "pydoc_topics"
    ood: dict[str, list[str]] = field(default_factory=dict)
    max_train_docs: int | None = None
    # files that are not UTF-8 text are refused; true decodes them anyway, undecodable bytes replaced
    lossy_decode: bool = False


@dataclass
class Corpus:
    train: datasets.Dataset
    val: datasets.Dataset
    ood: dict[str, datasets.Dataset]
    content_hash: str  # sha256 over every split's text, so two runs on different text never look alike


def _in_val(key: str, percent: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 10000
    return bucket < percent * 100


def _split_within(docs: list[tuple[str, str]], percent: float) -> tuple[list, list]:
    """The last ``percent`` of each document's lines as validation, the rest as training (for one or a few files)."""
    train, val = [], []
    for key, text in docs:
        lines = text.splitlines(keepends=True)
        cut = len(lines) - max(1, round(len(lines) * percent / 100)) if len(lines) > 1 else len(lines)
        if lines[:cut]:
            train.append((key, "".join(lines[:cut])))
        if lines[cut:]:
            val.append((f"{key}#val", "".join(lines[cut:])))
    return train, val


def _stdlib_documents() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        docs.append((path.relative_to(root).as_posix(), path.read_text(encoding="utf-8", errors="replace")))
    return docs


def _pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _expand(patterns: list[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise ConfigError(f"data: no file matches {pattern!r}; fix the path in data.corpus.files / val_files / ood")
        files = [p for p in matched if os.path.isfile(p)]
        if not files:
            raise ConfigError(
                f"data: {pattern!r} matches only directories; match the files in them, "
                f"e.g. '{pattern.rstrip('/')}/**/*.txt'"
            )
        paths += files
    return paths


def _read_text(path: str, lossy: bool) -> str:
    """A file's text; one that is binary or not UTF-8 is refused, unless ``lossy`` (replacement characters)."""
    data = Path(path).read_bytes()
    if lossy:
        return data.decode("utf-8", errors="replace")
    if b"\0" in data:
        raise ConfigError(f"data: {path} looks binary (it holds NUL bytes); leave it out of data.corpus.files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"data: {path} is not UTF-8 text (byte {err.start}); convert it, or set data.corpus.lossy_decode=true "
            "to replace what does not decode"
        ) from None


def _file_documents(patterns: list[str], lossy: bool = False) -> list[tuple[str, str]]:
    return [(p, _read_text(p, lossy)) for p in _expand(patterns)]


def _to_dataset(docs: list[tuple[str, str]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"id": [d[0] for d in docs], "text": [d[1] for d in docs]})


def _hash(*splits: datasets.Dataset) -> str:
    digest = hashlib.sha256()
    for split in splits:
        for text in split["text"]:
            digest.update(hashlib.sha256(text.encode("utf-8", errors="replace")).digest())
        digest.update(b"|split|")
    return digest.hexdigest()


def check_corpus(config: CorpusConfig) -> None:
    """Cheap checks that fail before anything heavy is built."""
    if config.source not in ("stdlib", "hub", "files"):
        raise ConfigError(f"data.corpus.source={config.source!r} is unknown; choose stdlib, hub or files")
    if config.source == "hub" and not config.name:
        raise ConfigError("data.corpus.source=hub needs data.corpus.name=<dataset on the Hugging Face hub>")
    if config.source == "files":
        if not config.files:
            raise ConfigError("data.corpus.source=files needs data.corpus.files=[path/or/glob, ...]")
        _expand(config.files + config.val_files)
    for paths in config.ood.values():
        if paths != ["pydoc_topics"]:
            _expand(list(paths))


def load_corpus(config: CorpusConfig) -> Corpus:
    check_corpus(config)
    if config.source == "stdlib":
        docs = _stdlib_documents()
        train = _to_dataset([d for d in docs if not _in_val(d[0], config.val_percent)])
        val = _to_dataset([d for d in docs if _in_val(d[0], config.val_percent)])
    elif config.source == "files":
        docs = _file_documents(config.files, config.lossy_decode)
        if config.val_files:
            train, val = _to_dataset(docs), _to_dataset(_file_documents(config.val_files, config.lossy_decode))
        else:
            held_out = [d for d in docs if _in_val(d[0], config.val_percent)]
            kept = [d for d in docs if not _in_val(d[0], config.val_percent)]
            if not held_out or not kept:  # too few files for a share of them: hold out the end of every file
                kept, held_out = _split_within(docs, config.val_percent)
            train, val = _to_dataset(kept), _to_dataset(held_out)
    else:
        try:
            full = datasets.load_dataset(config.name, config.config_name)
        except Exception as err:
            raise ConfigError(
                f"data: could not load {config.name!r} ({config.config_name}) from the hub: {err}. "
                "Check the name, or use the offline default data=stdlib"
            ) from err
        columns = {split: ds.column_names for split, ds in full.items()}
        if config.text_field not in columns.get(config.train_split, []):
            raise ConfigError(f"data: no column {config.text_field!r} in {columns}; set data.corpus.text_field")
        train = full[config.train_split].select_columns([config.text_field]).rename_column(config.text_field, "text")
        if config.val_split and config.val_split in full:
            val = full[config.val_split].select_columns([config.text_field]).rename_column(config.text_field, "text")
        else:
            parts = train.train_test_split(test_size=config.val_percent / 100, seed=0)
            train, val = parts["train"], parts["test"]
    if config.max_train_docs is not None:
        train = train.select(range(min(config.max_train_docs, len(train))))
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(
            "data: the corpus gave an empty train or validation split; name validation text with "
            "data.corpus.val_files=[...], or add text"
        )
    ood = {}
    for name, paths in config.ood.items():
        ood[name] = _to_dataset(
            _pydoc_topics() if list(paths) == ["pydoc_topics"] else _file_documents(list(paths), config.lossy_decode)
        )
    return Corpus(train, val, ood, _hash(train, val, *ood.values()))
