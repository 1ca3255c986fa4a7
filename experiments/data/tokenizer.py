"""Tokenisers: raw bytes by default (so bits per byte compare across every run), or a byte-level BPE trained
locally with ``tokenizers`` on the training split (streamed) and cached beside the packed data."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
from filelock import FileLock

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
    def train(cls, texts: Callable[[], Iterable[str]], vocab_size: int, path: Path) -> BPETokenizer:
        """Load the BPE at ``path``, training it first on ``texts()`` (once, under a lock: parallel first runs
        train one)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            if not path.exists():
                cls._train(texts(), vocab_size, path)
        return cls(path)

    @staticmethod
    def _train(texts: Iterable[str], vocab_size: int, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)  # an iterator: the trainer keeps counts, not the text
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(path)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def make_tokenizer(
    kind: str, train_texts: Callable[[], Iterable[str]], vocab_size: int, cache_dir: Path, corpus_key: str
) -> Tokenizer:
    """The tokeniser of a run; a BPE is named by the corpus it is trained on (``corpus_key``), and ``train_texts``
    is called only when it has not been trained yet."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_texts, vocab_size, cache_dir / f"bpe{vocab_size}-{corpus_key[:16]}.json")
    raise ConfigError(f"data.tokenizer={kind!r} is unknown; choose bytes or bpe")
