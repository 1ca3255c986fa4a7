"""Tokenise once, pack into one token stream per split, cache to disk, and serve fixed-length blocks.

The cache key is the corpus content hash plus the tokeniser's identity, so every run on the same text reuses the
packed arrays and a changed corpus never hits a stale one. Each array carries a checksum and its vocabulary bound,
and is built and checked under a lock (``experiments/data/verified_cache.py``), so parallel runs share the cache
and a damaged one is rebuilt.
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
from experiments.data.corpus import CorpusConfig, check_corpus, load_corpus
from experiments.data.tokenizer import Tokenizer, make_tokenizer


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
    cache_dir: str = "~/.cache/arch_zoo"

    def check(self) -> None:
        if self.block_size < 2 or self.batch_size < 1:
            raise ConfigError("data.block_size must be >= 2 and data.batch_size >= 1")
        if self.eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size={self.eval_batch_size}: set it to 1 or more")
        if any(n < 2 for n in self.eval_lengths):
            raise ConfigError(f"data.eval_lengths={self.eval_lengths}: every length must be >= 2")
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
        corpus = load_corpus(self.config.corpus)
        cfg = self.config
        self.tokenizer = make_tokenizer(
            cfg.tokenizer, corpus.train["text"], cfg.bpe_vocab_size, self.cache_dir, corpus.content_hash
        )
        key = hashlib.sha256(f"{corpus.content_hash}|{self.tokenizer.identity}".encode()).hexdigest()[:20]
        folder = self.cache_dir / "packed" / key
        meta_path = folder / "meta.json"
        verified_cache.ensure(folder, lambda folder: self._pack(corpus, folder))
        self.meta = json.loads(meta_path.read_text())
        for name in self.meta["splits"]:
            tokens = np.load(folder / f"{name}.npy", mmap_mode="r")
            self.splits[name] = PackedSplit(tokens, self.meta["splits"][name]["n_bytes"])
        self.meta["cache"] = str(folder)

    def _pack(self, corpus, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tok = self.tokenizer
        assert tok is not None
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
        splits = {"train": corpus.train, "val": corpus.val} | {f"ood_{k}": v for k, v in corpus.ood.items()}
        meta: dict = {
            "content_hash": corpus.content_hash,
            "tokenizer": tok.identity,
            "vocab_size": tok.vocab_size,
            "splits": {},
        }
        for name, ds in splits.items():
            encoded = ds.map(
                lambda batch: {
                    "ids": tok.encode_batch(batch["text"]),
                    "n_bytes": [len(t.encode()) for t in batch["text"]],
                },
                batched=True,
                remove_columns=ds.column_names,
                desc=f"tokenising {name}",
            )
            pieces = []
            for ids in encoded["ids"]:
                pieces += [np.asarray(ids, dtype=dtype), np.asarray([tok.eos_id], dtype=dtype)]
            tokens = np.concatenate(pieces)
            meta["splits"][name] = {
                **verified_cache.save_array(folder, name, tokens),
                "n_bytes": int(sum(encoded["n_bytes"])),
                "n_docs": len(ds),
            }
        tmp = folder / "meta.tmp.json"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(folder / "meta.json")

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
        counts = np.bincount(np.asarray(self.splits["train"].tokens), minlength=self.vocab_size) + 1.0
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
