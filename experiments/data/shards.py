"""Token shards: a stream of documents tokenised in bounded memory into a flat file that training memory-maps.

A split is written as one raw ``<split>.bin`` (uint16 up to 65,536 symbols, uint32 beyond), every document followed
by the end-of-document token: the stream earlier versions concatenated in memory, token for token, so the windows a
run reads are unchanged. Documents are tokenised in batches of about ``buffer_bytes`` of text, by ``num_proc``
processes when that pays (a BPE over a large corpus), with at most two batches per process in flight: memory is
bounded by the buffer (and the largest document), never by the corpus. The content hash, the file's checksum and the
unigram counts are computed on the way, so a cached corpus never has to be read again to start a run.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult
from pathlib import Path

import numpy as np

from experiments.data.corpus import ContentHash, Document, document_digest
from experiments.data.tokenizer import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass
class Encoded:
    """One batch of documents, tokenised: the tokens with end-of-document markers, and what is summed over them."""

    tokens: np.ndarray
    n_bytes: int
    n_docs: int
    digests: list[bytes]


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no thread pool inside each
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str], dtype: np.dtype) -> Encoded:
    assert _worker_tokenizer is not None
    return encode(_worker_tokenizer, texts, dtype)


def encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> Encoded:
    eos = np.asarray([tokenizer.eos_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    for ids in tokenizer.encode_batch(texts):
        pieces += [np.asarray(ids).astype(dtype, copy=False), eos]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    n_bytes = sum(len(t.encode("utf-8", errors="replace")) for t in texts)
    return Encoded(tokens, n_bytes, len(texts), [document_digest(t) for t in texts])


def batches(docs: Iterable[Document], buffer_bytes: int) -> Iterator[list[str]]:
    """Texts in groups of about ``buffer_bytes`` characters (a document larger than that is a group of its own)."""
    group: list[str] = []
    size = 0
    for _, text in docs:
        group.append(text)
        size += len(text)
        if size >= buffer_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def encoded_batches(
    docs: Iterable[Document], tokenizer: Tokenizer, dtype: np.dtype, buffer_bytes: int, num_proc: int
) -> Iterator[Encoded]:
    """Tokenised batches in document order; with ``num_proc > 1`` a pool encodes them, at most two per process
    queued (``Pool.imap`` would read ahead without bound and hold the corpus in memory)."""
    if num_proc <= 1:
        for texts in batches(docs, buffer_bytes):
            yield encode(tokenizer, texts, dtype)
        return
    context = multiprocessing.get_context("spawn")  # the parent may hold threads (torch, tokenizers): no fork
    with context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque[AsyncResult] = deque()
        for texts in batches(docs, buffer_bytes):
            pending.append(pool.apply_async(_encode_in_worker, (texts, dtype)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_split(
    path: Path,
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    content: ContentHash,
    buffer_bytes: int = 8 << 20,
    num_proc: int = 1,
) -> tuple[dict[str, object], np.ndarray]:
    """Tokenise ``docs`` into ``path``; return its record (length, checksum, largest id, bytes of text, documents) and
    the split's unigram counts. ``content`` receives every document's digest, in order."""
    dtype = token_dtype(tokenizer.vocab_size)
    checksum = hashlib.sha256()
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    n_tokens = n_bytes = n_docs = max_id = 0
    tmp = path.with_name(f"{path.name}.tmp")  # renamed when complete: a run reading the old file keeps its inode
    with open(tmp, "wb") as out:
        for batch in encoded_batches(docs, tokenizer, dtype, buffer_bytes, num_proc):
            data = batch.tokens.tobytes()
            out.write(data)
            checksum.update(data)
            max_id = max(max_id, int(batch.tokens.max(initial=0)))
            if max_id >= tokenizer.vocab_size:
                raise RuntimeError(f"{tokenizer.identity} gave id {max_id} beyond its {tokenizer.vocab_size} symbols")
            counts += np.bincount(batch.tokens, minlength=tokenizer.vocab_size)
            n_tokens += len(batch.tokens)
            n_bytes += batch.n_bytes
            n_docs += batch.n_docs
            content.add_document_digests(batch.digests)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    content.end_split()
    record = {
        "file": path.name,
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "sha256": checksum.hexdigest(),
        "max_id": max_id,
        "n_bytes": n_bytes,
        "n_docs": n_docs,
    }
    return record, counts


def open_tokens(folder: Path, record: dict) -> np.ndarray:
    """A split's tokens, memory-mapped (read lazily, shared between processes through the page cache)."""
    if record["n_tokens"] == 0:
        return np.zeros(0, dtype=record["dtype"])
    return np.memmap(folder / record["file"], dtype=record["dtype"], mode="r", shape=(record["n_tokens"],))
