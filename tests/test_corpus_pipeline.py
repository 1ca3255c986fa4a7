"""The corpus pipeline: bounded memory, the same windows as in-memory packing, a cache found without reading text,
damaged files caught, one build among concurrent starts, and datasets' streaming path (local files, no network)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sysconfig
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from experiments.data import corpus as corpus_module
from experiments.data import shards
from experiments.data.corpus import ContentHash, CorpusConfig
from experiments.data.datamodule import Blocks, DataConfig, TextDataModule
from experiments.data.tokenizer import ByteTokenizer

WORDS = "the of retention decay chunk state token mixer window parallel recurrent gate norm head".split()


def write_corpus(folder: Path, n_files: int, words_per_file: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        words = np.asarray(WORDS)[rng.integers(0, len(WORDS), words_per_file)]
        path = folder / f"doc{i:04d}.txt"
        path.write_text("".join(" ".join(line) + ".\n" for line in np.array_split(words, 10)))
        paths.append(path)
    return paths


def module(cache: Path, corpus: CorpusConfig, **kwargs) -> TextDataModule:
    data = TextDataModule(DataConfig(corpus=corpus, cache_dir=str(cache), block_size=16, **kwargs))
    data.prepare_data()
    return data


def in_memory_packing(texts: list[str]) -> np.ndarray:
    """What earlier versions held in memory: every document's bytes, then the end-of-document token."""
    pieces = [np.frombuffer(t.encode("utf-8", errors="replace"), np.uint8).astype(np.uint16) for t in texts]
    return np.concatenate([np.append(p, np.uint16(256)) for p in pieces])


def peak_traced_bytes(docs, buffer_bytes: int, path: Path) -> int:
    tracemalloc.start()
    try:
        shards.write_split(path, docs, ByteTokenizer(), ContentHash(), buffer_bytes=buffer_bytes)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tokenising_keeps_memory_bounded_by_the_buffer_not_the_corpus(tmp_path):
    def docs(n: int):  # generated on the fly: only the pipeline holds text
        return ((f"d{i}", f"document {i}: " + "retention decays the state " * 400) for i in range(n))

    buffer = 64 << 10
    small = peak_traced_bytes(docs(300), buffer, tmp_path / "small.bin")  # ~3 MB of text
    large = peak_traced_bytes(docs(1200), buffer, tmp_path / "large.bin")  # ~13 MB of text
    corpus_bytes = (tmp_path / "large.bin").stat().st_size // 2
    assert corpus_bytes > 12e6
    assert large < 1.5 * small + (64 << 10), (small, large)  # does not grow with the corpus
    assert large < 20 * buffer < corpus_bytes / 8, (large, buffer)


def test_windows_equal_in_memory_packing_of_the_default_corpus(data_cache):
    data = module(data_cache, CorpusConfig(source="stdlib", ood={"pydoc": ["pydoc_topics"]}))
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    keys = [p.relative_to(root).as_posix() for p in paths]
    bucket = [int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], "big") % 10000 for k in keys]
    texts = {p: p.read_text(encoding="utf-8", errors="replace") for p in paths}
    train = [texts[p] for p, b in zip(paths, bucket, strict=True) if b >= 200]
    val = [texts[p] for p, b in zip(paths, bucket, strict=True) if b < 200]
    expected = in_memory_packing(train)

    tokens = data.splits["train"].tokens
    assert isinstance(tokens, np.memmap) and np.array_equal(np.asarray(tokens), expected)
    ours, theirs = Blocks(tokens, 256), Blocks(expected, 256)
    assert len(ours) == len(theirs)
    for i in (0, 1, len(ours) // 2, len(ours) - 1):
        assert all(a.equal(b) for a, b in zip(ours[i], theirs[i], strict=True))
    from pydoc_data.topics import topics

    content = hashlib.sha256()  # the meaning the logged data.content_hash has always had
    for split in (train, val, [text for _, text in sorted(topics.items())]):
        for text in split:
            content.update(hashlib.sha256(text.encode("utf-8", errors="replace")).digest())
        content.update(b"|split|")
    assert data.summary()["data.content_hash"] == content.hexdigest()


def test_a_cached_corpus_starts_without_reading_its_text(tmp_path, monkeypatch):
    write_corpus(tmp_path / "text", 30, 300)
    config = CorpusConfig(source="files", files=[str(tmp_path / "text" / "*.txt")])
    cold = module(tmp_path / "cache", config)

    def no_reading(*args, **kwargs):
        raise AssertionError("the text was read on a warm start")

    with monkeypatch.context() as patch:
        patch.setattr(corpus_module, "_read_text", no_reading)
        patch.setattr(shards, "encode", no_reading)
        warm = module(tmp_path / "cache", config)
    assert warm.summary() == cold.summary() and len(warm.summary()["data.content_hash"]) == 64
    assert np.array_equal(warm.splits["train"].tokens, cold.splits["train"].tokens)

    (tmp_path / "text" / "doc0003.txt").write_text("an edited document\n")  # a new size and mtime: a new cache
    edited = module(tmp_path / "cache", config)
    assert edited.meta["cache"] != cold.meta["cache"]
    assert edited.summary()["data.content_hash"] != cold.summary()["data.content_hash"]


def test_a_copied_cache_is_hashed_once_and_a_damaged_file_is_rebuilt(tmp_path, caplog):
    write_corpus(tmp_path / "text", 20, 200)
    config = CorpusConfig(source="files", files=[str(tmp_path / "text" / "*.txt")])
    first = module(tmp_path / "cache", config)
    folder = Path(first.meta["cache"])
    val = folder / "val.bin"
    expected = np.array(first.splits["val"].tokens)

    val.write_bytes(val.read_bytes())  # intact, but rewritten: a new stamp, the same checksum
    with caplog.at_level("WARNING", logger="arch_zoo"):
        module(tmp_path / "cache", config)
    assert not [r for r in caplog.records if "data cache" in r.getMessage()]
    stamp = json.loads((folder / "meta.json").read_text())["splits"]["val"]["stamp"]
    assert stamp == [val.stat().st_size, val.stat().st_mtime_ns, val.stat().st_ino]  # renewed: trusted again

    damaged = bytearray(val.read_bytes())
    damaged[10:12] = b"\x00\x7f"  # one id far beyond the vocabulary, the size unchanged
    val.write_bytes(bytes(damaged))
    with caplog.at_level("WARNING", logger="arch_zoo"):
        rebuilt = module(tmp_path / "cache", config)
    notices = [r.getMessage() for r in caplog.records if "data cache" in r.getMessage()]
    assert len(notices) == 1 and "val.bin does not match its checksum" in notices[0]
    assert np.array_equal(np.asarray(rebuilt.splits["val"].tokens), expected)


def _start(cache: str, pattern: str, builds: str, barrier) -> str:
    """One run's start-up in its own process; every file it tokenises is noted in ``builds``."""
    write_split = shards.write_split

    def noted(path, *args, **kwargs):
        with open(builds, "a") as f:
            f.write(f"{path.name}\n")
        return write_split(path, *args, **kwargs)

    import experiments.data.datamodule as datamodule

    datamodule.write_split = noted
    barrier.wait()
    data = module(Path(cache), CorpusConfig(source="files", files=[pattern]))
    return data.summary()["data.content_hash"] + hashlib.sha256(np.asarray(data.splits["train"].tokens)).hexdigest()


def test_concurrent_first_starts_build_the_cache_once(tmp_path):
    write_corpus(tmp_path / "text", 40, 2000)
    context = multiprocessing.get_context("fork")
    builds = tmp_path / "builds.txt"
    with context.Manager() as manager:
        barrier = manager.Barrier(3)
        args = (str(tmp_path / "cache"), str(tmp_path / "text" / "*.txt"), str(builds), barrier)
        with context.Pool(3) as pool:
            results = pool.starmap(_start, [args] * 3)
    assert len(set(results)) == 1
    assert sorted(builds.read_text().split()) == ["train.bin", "val.bin"]  # one build, not three


def test_several_processes_tokenise_exactly_what_one_does(tmp_path):
    docs = [(f"d{i}", f"document {i} " + "é token " * (i % 50)) for i in range(400)]
    one = shards.write_split(tmp_path / "one.bin", iter(docs), ByteTokenizer(), (h1 := ContentHash()), 2000, 1)
    two = shards.write_split(tmp_path / "two.bin", iter(docs), ByteTokenizer(), (h2 := ContentHash()), 2000, 2)
    assert one[0] | {"file": ""} == two[0] | {"file": ""} and np.array_equal(one[1], two[1])
    assert h1.hexdigest() == h2.hexdigest()
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert np.array_equal(np.fromfile(tmp_path / "one.bin", np.uint16), in_memory_packing([t for _, t in docs]))


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """datasets' ``text`` builder over local files, with its cache in the test's folder (no network)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    (tmp_path / "train.txt").write_text("".join(f"line {i}: the state decays\n" for i in range(300)))
    (tmp_path / "val.txt").write_text("".join(f"held out {i}\n" for i in range(40)))
    return {"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "val.txt")}


def test_a_streamed_dataset_packs_what_the_loaded_one_does(tmp_path, local_hub):
    def hub(streaming: bool) -> TextDataModule:
        corpus = CorpusConfig(source="hub", name="text", data_files=local_hub, streaming=streaming)
        return module(tmp_path / "cache", corpus)

    streamed, loaded = hub(True), hub(False)
    assert streamed.meta["cache"] != loaded.meta["cache"]
    assert streamed.summary() == loaded.summary()
    lines = Path(local_hub["train"]).read_text().splitlines()
    assert np.array_equal(np.asarray(streamed.splits["train"].tokens), in_memory_packing(lines))
    assert np.array_equal(np.asarray(streamed.splits["val"].tokens), np.asarray(loaded.splits["val"].tokens))
