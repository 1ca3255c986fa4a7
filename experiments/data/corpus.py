"""Text corpora as streams of documents: the offline default, any Hugging Face dataset, or local text files.

The offline default needs no download: the source of the Python standard library that ships with the interpreter
(about 30 MB of real text on every machine) is the in-domain corpus, split by a hash of each file's path, and the
English prose of ``pydoc_data``'s topic pages is the out-of-domain set (an offline analogue of the paper's
in-domain / out-of-domain columns).

A corpus is read one document at a time (``document_streams``), so tokenising it needs memory for a buffer, not for
the corpus. ``source_fingerprint`` names the text without reading it (file paths, sizes and modification times, or
datasets' builder identity), which is what a cached corpus is found by.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import socket
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets

from arch_zoo.errors import ConfigError

Document = tuple[str, str]  # (id, text)
DocumentStream = Callable[[], Iterator[Document]]


@dataclass
class CorpusConfig:
    """Where text comes from. ``source``: stdlib | hub | files."""

    source: str = "stdlib"
    # hub: load_dataset(name, config_name, data_files=..., revision=..., streaming=...); the validation split falls
    # back to a share of train when absent
    name: str | None = None
    config_name: str | None = None
    data_files: Any = None  # for packaged builders (name=text / json / parquet) over local or remote files
    revision: str | None = None
    # true reads the dataset as it is tokenised (datasets' IterableDataset): nothing is downloaded or converted first
    streaming: bool = False
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
    """A corpus held in memory (small corpora, inspection and tests); training streams it instead."""

    train: datasets.Dataset
    val: datasets.Dataset
    ood: dict[str, datasets.Dataset]
    content_hash: str  # sha256 over every split's text, so two runs on different text never look alike


class ContentHash:
    """sha256 over every split's documents in order: each document's own sha256, then a split separator."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add_document_digests(self, digests: Iterable[bytes]) -> None:
        for d in digests:
            self._digest.update(d)

    def end_split(self) -> None:
        self._digest.update(b"|split|")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def document_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", errors="replace")).digest()


def _in_val(key: str, percent: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 10000
    return bucket < percent * 100


def _split_lines(text: str, percent: float) -> tuple[str, str]:
    """The last ``percent`` of a document's lines as validation, the rest as training (for one or a few files)."""
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, round(len(lines) * percent / 100)) if len(lines) > 1 else len(lines)
    return "".join(lines[:cut]), "".join(lines[cut:])


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_paths() -> list[Path]:
    root = _stdlib_root()
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts and "dist-packages" not in p.parts]


def _pydoc_topics_path() -> str:
    import pydoc_data.topics

    return pydoc_data.topics.__file__


def _pydoc_topics() -> Iterator[Document]:
    from pydoc_data.topics import topics

    yield from sorted(topics.items())


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


def _files(paths: list[str], lossy: bool) -> DocumentStream:
    return lambda: ((p, _read_text(p, lossy)) for p in paths)


def _lines_share(paths: list[str], percent: float, lossy: bool, val: bool) -> DocumentStream:
    def stream() -> Iterator[Document]:
        for p in paths:
            kept, held_out = _split_lines(_read_text(p, lossy), percent)
            if val and held_out:
                yield f"{p}#val", held_out
            elif not val and kept:
                yield p, kept

    return stream


def _ood_streams(config: CorpusConfig) -> dict[str, DocumentStream]:
    streams: dict[str, DocumentStream] = {}
    for name, paths in config.ood.items():
        if list(paths) == ["pydoc_topics"]:
            streams[f"ood_{name}"] = _pydoc_topics
        else:
            streams[f"ood_{name}"] = _files(_expand(list(paths)), config.lossy_decode)
    return streams


def _files_split(config: CorpusConfig) -> tuple[DocumentStream, DocumentStream]:
    """Train and validation of ``source=files``, decided from the paths alone (no file is read)."""
    paths = _expand(config.files)
    if config.val_files:
        return _files(paths, config.lossy_decode), _files(_expand(config.val_files), config.lossy_decode)
    held_out = [p for p in paths if _in_val(p, config.val_percent)]
    kept = [p for p in paths if not _in_val(p, config.val_percent)]
    if held_out and kept:
        return _files(kept, config.lossy_decode), _files(held_out, config.lossy_decode)
    # too few files for a share of them: hold out the end of every file
    return (
        _lines_share(paths, config.val_percent, config.lossy_decode, val=False),
        _lines_share(paths, config.val_percent, config.lossy_decode, val=True),
    )


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (one connection attempt), or None when it can be, or when
    offline mode was asked for already (``HF_HUB_OFFLINE``: the cache is all that is read then)."""
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return None
    url = urlparse(huggingface_hub.constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port} is unreachable ({type(err).__name__}: {err})"
    return None


def _hub_call(config: CorpusConfig, call: Callable[[], Any], what: str) -> Any:
    """``call`` (a datasets hub function), offline from the cache when the hub cannot be reached: without this, an
    offline machine retries each request for about 25 s before it fails."""
    import huggingface_hub.constants

    unreachable = hub_unreachable()
    if unreachable is not None:  # the cache only, as HF_HUB_OFFLINE=1 would have it
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return call()
    except Exception as err:
        if unreachable is not None:
            raise ConfigError(
                f"data: the Hugging Face hub is unreachable ({unreachable}) and {config.name!r} "
                f"({config.config_name}) is not in the local datasets cache; run once with network access (it is "
                "cached then), or use the offline default data=stdlib or local files with data=files"
            ) from err
        raise ConfigError(
            f"data: could not {what} {config.name!r} ({config.config_name}) on the hub: {err}. "
            "Check the name, or use the offline default data=stdlib"
        ) from err


def _load_hub(config: CorpusConfig) -> Any:
    return _hub_call(
        config,
        lambda: datasets.load_dataset(
            config.name,
            config.config_name,
            data_files=config.data_files,
            revision=config.revision,
            streaming=config.streaming,
        ),
        "load",
    )


def _texts(split: Any, field_name: str, prefix: str) -> Iterator[Document]:
    """Documents of a datasets split, read in batches (a memory-mapped table or a stream, never all at once)."""
    index = 0
    for batch in split.iter(batch_size=1000):
        for text in batch[field_name]:
            yield f"{prefix}{index}", text
            index += 1


def _hub_split(config: CorpusConfig) -> tuple[DocumentStream, DocumentStream]:
    full = _load_hub(config)
    field_name = config.text_field
    if config.train_split not in full:
        raise ConfigError(f"data: no split {config.train_split!r} in {list(full)}; set data.corpus.train_split")
    train = full[config.train_split]
    columns = train.column_names
    if columns is not None and field_name not in columns:
        raise ConfigError(f"data: no column {field_name!r} in {columns}; set data.corpus.text_field")
    if config.val_split and config.val_split in full:
        val = full[config.val_split]
        return (lambda: _texts(train, field_name, "train/"), lambda: _texts(val, field_name, "val/"))
    if not config.streaming:  # the split earlier versions made, so results on such datasets stay comparable
        parts = train.train_test_split(test_size=config.val_percent / 100, seed=0)
        return (lambda: _texts(parts["train"], field_name, "train/"), lambda: _texts(parts["test"], field_name, "val/"))
    # a stream cannot be shuffled into a split: hold out a hashed share of the documents by position
    held = lambda: (d for d in _texts(train, field_name, "train/") if _in_val(d[0], config.val_percent))  # noqa: E731
    kept = lambda: (d for d in _texts(train, field_name, "train/") if not _in_val(d[0], config.val_percent))  # noqa: E731
    return kept, held


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


def document_streams(config: CorpusConfig) -> dict[str, DocumentStream]:
    """``train``, ``val`` and ``ood_<name>`` as re-startable streams of documents, in the order they are packed
    (and hashed). Opening them reads nothing but directory listings; text is read as the streams are consumed."""
    check_corpus(config)
    if config.source == "stdlib":
        root = _stdlib_root()
        keyed = [(p.relative_to(root).as_posix(), p) for p in _stdlib_paths()]

        def stdlib(val: bool) -> DocumentStream:
            return lambda: (
                (key, path.read_text(encoding="utf-8", errors="replace"))
                for key, path in keyed
                if _in_val(key, config.val_percent) == val
            )

        train, val = stdlib(False), stdlib(True)
    elif config.source == "files":
        train, val = _files_split(config)
    else:
        train, val = _hub_split(config)
    if config.max_train_docs is not None:
        unlimited, limit = train, config.max_train_docs
        train = lambda: itertools.islice(unlimited(), limit)  # noqa: E731
    return {"train": train, "val": val} | _ood_streams(config)


def _stat(path: str | Path) -> list:
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def source_fingerprint(config: CorpusConfig) -> dict[str, Any]:
    """What the corpus's text is, without reading it: every setting, and every file's path, size and modification
    time (local files, the standard library) or datasets' identity of the builder and its data files (the hub).
    A changed file, a new file matching a glob or a new revision gives a new fingerprint."""
    check_corpus(config)
    files: list[str | Path] = []
    if config.source == "stdlib":
        files += _stdlib_paths()
    elif config.source == "files":
        files += _expand(config.files) + _expand(config.val_files)
    for paths in config.ood.values():
        files += [_pydoc_topics_path()] if list(paths) == ["pydoc_topics"] else _expand(list(paths))
    found: dict[str, Any] = {"config": asdict(config), "files": [_stat(p) for p in files]}
    if config.source == "hub":
        found["builder"] = _hub_identity(config)
    return found


def _hub_identity(config: CorpusConfig) -> list[str]:
    """datasets' own identity of a dataset: its builder's config id (which covers the data files, their revision and,
    for local files, their modification times) and the hash of the builder's code."""
    builder = _hub_call(
        config,
        lambda: datasets.load_dataset_builder(
            config.name, config.config_name, data_files=config.data_files, revision=config.revision
        ),
        "find",
    )
    return [builder.config_id, str(builder.hash)]


def _to_dataset(docs: list[Document]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"id": [d[0] for d in docs], "text": [d[1] for d in docs]})


def load_corpus(config: CorpusConfig) -> Corpus:
    """The whole corpus in memory, with its content hash: for small corpora and inspection (training streams it)."""
    streams = document_streams(config)
    content = ContentHash()
    splits: dict[str, datasets.Dataset] = {}
    for name, stream in streams.items():
        docs = list(stream())
        content.add_document_digests(document_digest(text) for _, text in docs)
        content.end_split()
        splits[name] = _to_dataset(docs)
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise empty_split_error()
    ood = {name.removeprefix("ood_"): ds for name, ds in splits.items() if name.startswith("ood_")}
    return Corpus(splits["train"], splits["val"], ood, content.hexdigest())


def empty_split_error() -> ConfigError:
    return ConfigError(
        "data: the corpus gave an empty train or validation split; name validation text with "
        "data.corpus.val_files=[...], or add text"
    )
