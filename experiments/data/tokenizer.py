"""Tokenisers: raw bytes by default (so bits per byte compare across every run), or a byte-level BPE trained
locally with ``tokenizers`` on the training split and cached beside the packed data."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from arch_zoo.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    identity: str  # enters the cache key of packed data

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus an end-of-document token 256."""

    vocab_size = 257
    eos_id = 256
    identity = "bytes-v1"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` library; trained once per corpus and vocabulary size."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = self._tok.token_to_id("<eos>")
        self.identity = f"bpe-{path.stem}"

    @classmethod
    def train(cls, texts, vocab_size: int, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not path.exists():
            tok = HFTokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=["<eos>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            tok.train_from_iterator(texts, trainer=trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tok.save(str(tmp))
            tmp.replace(path)
        return cls(path)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def make_tokenizer(kind: str, train_texts, vocab_size: int, cache_dir: Path, corpus_hash: str) -> Tokenizer:
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_texts, vocab_size, cache_dir / f"bpe{vocab_size}-{corpus_hash[:16]}.json")
    raise ConfigError(f"data.tokenizer={kind!r} is unknown; choose bytes or bpe")
