"""Tokenise once, streamed, into one memory-mapped token file per split, and serve fixed-length blocks from it.

The cache key is the corpus's fingerprint (file paths, sizes and modification times, or datasets' identity of a hub
dataset, plus every corpus setting) and the tokeniser's identity, so a run on cached text reads a small index and
nothing of the text, and a changed corpus never hits a stale cache. The content hash of the text is computed once,
while tokenising, and kept in the index. Each file carries a checksum and its vocabulary bound, and is built and
checked under a lock (``experiments/data/verified_cache.py``), so parallel runs share the cache and a damaged one is
rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from arch_zoo.errors import ConfigError
from experiments.data import verified_cache
from experiments.data.base import CachedDataModule
from experiments.data.corpus import (
    ContentHash,
    CorpusConfig,
    check_corpus,
    document_streams,
    empty_split_error,
    source_fingerprint,
)
from experiments.data.shards import open_tokens, write_split
from experiments.data.tokenizer import Tokenizer, make_tokenizer

CACHE_FORMAT = "token-files-v2"  # enters the cache key: a change of layout never reads an older cache


@dataclass
class DataConfig:
    _target_: str = "experiments.data.datamodule.TextDataModule"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: str = "bytes"  # bytes | bpe
    bpe_vocab_size: int = 4096
    block_size: int = 256
    batch_size: int = 16
    eval_batch_size: int = 32
    max_val_tokens: int | None = 131072
    max_ood_tokens: int | None = 131072
    # extra evaluations of the validation text in windows of these lengths (length extrapolation: beyond
    # block_size), logged as val_len<N>/loss|ppl|bpb|acc
    eval_lengths: list[int] = field(default_factory=list)
    num_workers: int = 0
    # tokenising a new corpus: processes (more pays for a BPE over a large corpus; bytes are cheap), and the text
    # each batch holds (peak memory is about 2 x num_proc batches, whatever the corpus's size)
    tokenize_num_proc: int = 1
    tokenize_buffer_mb: float = 8.0
    cache_dir: str = "~/.cache/arch_zoo"

    def check(self) -> None:
        if self.block_size < 2 or self.batch_size < 1:
            raise ConfigError("data.block_size must be >= 2 and data.batch_size >= 1")
        if self.eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size={self.eval_batch_size}: set it to 1 or more")
        if any(n < 2 for n in self.eval_lengths):
            raise ConfigError(f"data.eval_lengths={self.eval_lengths}: every length must be >= 2")
        if self.tokenize_num_proc < 1 or self.tokenize_buffer_mb <= 0:
            raise ConfigError("data.tokenize_num_proc must be >= 1 and data.tokenize_buffer_mb > 0")
        check_corpus(self.corpus)


@dataclass
class PackedSplit:
    tokens: np.ndarray
    n_bytes: int  # UTF-8 bytes of the text behind ``tokens`` (for bits per byte)

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, len(self.tokens))


class Blocks(Dataset):
    """Non-overlapping windows of ``block_size + 1`` tokens (inputs and shifted targets)."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_tokens: int | None = None) -> None:
        if max_tokens is not None:
            tokens = tokens[: max_tokens + 1]
        self.tokens, self.block_size = tokens, block_size
        self.n = (len(tokens) - 1) // block_size
        if self.n == 0:
            raise ConfigError(f"data: a split has {len(tokens)} tokens, fewer than one block of {block_size}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = i * self.block_size
        window = torch.from_numpy(self.tokens[lo : lo + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


class TextDataModule(CachedDataModule):
    def __init__(self, config: DataConfig, seed: int = 0, total_steps: int = 1) -> None:
        super().__init__(config, seed, total_steps)
        self.splits: dict[str, PackedSplit] = {}
        self.meta: dict = {}
        self.tokenizer: Tokenizer | None = None

    def _load(self) -> None:
        if self.splits:
            return
        cfg = self.config
        fingerprint = json.dumps(source_fingerprint(cfg.corpus), sort_keys=True, default=str)
        corpus_key = hashlib.sha256(f"{CACHE_FORMAT}|{fingerprint}".encode()).hexdigest()
        self.tokenizer = make_tokenizer(
            cfg.tokenizer,
            lambda: (text for _, text in document_streams(cfg.corpus)["train"]()),
            cfg.bpe_vocab_size,
            self.cache_dir,
            corpus_key,
        )
        key = hashlib.sha256(f"{corpus_key}|{self.tokenizer.identity}".encode()).hexdigest()[:20]
        folder = self.cache_dir / "packed" / key
        verified_cache.ensure(folder, self._pack)
        self.meta = json.loads((folder / verified_cache.META).read_text())
        for name, record in self.meta["splits"].items():
            self.splits[name] = PackedSplit(open_tokens(folder, record), record["n_bytes"])
        self.meta["cache"] = str(folder)

    def _pack(self, folder: Path) -> None:
        """Stream every split through the tokeniser into ``<split>.bin``; the index (``meta.json``) is written last."""
        tok = self.tokenizer
        assert tok is not None
        content = ContentHash()
        meta: dict = {"tokenizer": tok.identity, "vocab_size": tok.vocab_size, "splits": {}}
        for name, stream in document_streams(self.config.corpus).items():
            record, counts = write_split(
                folder / f"{name}.bin",
                stream(),
                tok,
                content,
                buffer_bytes=int(self.config.tokenize_buffer_mb * 2**20),
                num_proc=self.config.tokenize_num_proc,
            )
            if name in ("train", "val") and record["n_docs"] == 0:
                raise empty_split_error()
            if name == "train":
                meta["train_unigram_counts"] = counts.tolist()
            meta["splits"][name] = record | {"stamp": verified_cache.stamp(folder / f"{name}.bin")}
        meta["content_hash"] = content.hexdigest()
        verified_cache.write_meta(folder, meta)

    @property
    def vocab_size(self) -> int:
        self._load()
        return int(self.meta["vocab_size"])

    @property
    def eval_split_names(self) -> list[str]:
        """Validation first (dataloader 0), then every out-of-domain set."""
        self._load()
        lengths = [f"val_len{n}" for n in self.config.eval_lengths]
        return ["val"] + sorted(k for k in self.splits if k.startswith("ood_")) + lengths

    def _source_split(self, split: str) -> tuple[str, int]:
        """The packed split behind an evaluation split, and its window length."""
        if split.startswith("val_len"):
            return "val", int(split.removeprefix("val_len"))
        return split, self.config.block_size

    def bytes_per_token(self, split: str) -> float | None:
        self._load()
        return self.splits[self._source_split(split)[0]].bytes_per_token

    def baselines(self) -> dict[str, float]:
        return {f"unigram_bpb.{s}": self.unigram_bits_per_byte(s) for s in self.eval_split_names if s in self.splits}

    def summary(self) -> dict[str, object]:
        self._load()
        return {
            "data.content_hash": self.meta["content_hash"],
            "data.vocab_size": self.vocab_size,
            "data.train_tokens": int(len(self.splits["train"].tokens)),
        }

    def unigram_bits_per_byte(self, split: str = "val") -> float:
        """Cross-entropy of ``split`` under the training split's add-one-smoothed unigram distribution."""
        self._load()
        counts = np.asarray(self.meta["train_unigram_counts"], dtype=np.int64) + 1.0
        logp = np.log(counts / counts.sum())
        target = self.splits[split]
        limit = self.config.max_val_tokens if split == "val" else self.config.max_ood_tokens
        tokens = np.asarray(target.tokens[1 : (limit + 1) if limit else None])
        nats_per_token = -logp[tokens].mean()
        return float(nats_per_token / math.log(2) / target.bytes_per_token)

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(Blocks(self.splits["train"].tokens, self.config.block_size))

    def _eval_loader(self, split: str) -> DataLoader:
        source, length = self._source_split(split)
        limit = self.config.max_val_tokens if source == "val" else self.config.max_ood_tokens
        # the same number of tokens per batch at every window length
        batch = max(1, self.config.eval_batch_size * self.config.block_size // length)
        return DataLoader(
            Blocks(self.splits[source].tokens, length, limit),
            batch_size=batch,
            shuffle=False,
            num_workers=self.config.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(name) for name in self.eval_split_names]
