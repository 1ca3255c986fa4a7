"""Multi-query associative recall (MQAR, from the Zoology paper): the fastest test of whether a mixer can recall.

Each example is ``num_kv_pairs`` key-value pairs followed by a query region in which every key of the context
comes back once, at a gap drawn from a power law; the model must emit the value bound to the key at the key's
position. Keys come from the first half of the vocabulary (token 0 is kept as filler) and values from the second,
so a mixer cannot answer from the token alone. Targets are -100 everywhere except at the answers, so loss and
accuracy measure recall only.

Generation is seeded, vectorised numpy, cached on disk under the hash of the generation config (written
atomically, so parallel runs of a sweep share the cache). The evaluation sets are one per *slice*
(``num_kv_pairs``, ``seq_len``) and come from a random stream of their own that no training seed can reach, so
every run of a sweep is scored on the same examples; training examples that happen to equal an evaluation example
are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from arch_zoo.errors import ConfigError
from experiments.data.base import CachedDataModule

IGNORE = -100  # target of every position that is not an answer
# Bump when the generator changes what it produces for a given config, so that old caches are not reused.
GENERATOR_VERSION = 1
# Entropy prefixes of the random streams: training data is drawn from [TRAIN_STREAM, seed], evaluation data from
# [EVAL_STREAM, test_seed, num_kv_pairs, seq_len]; no seed can make one stream equal to the other.
TRAIN_STREAM, EVAL_STREAM = 0, 1
CHUNK_DRAWS = 1 << 22  # random numbers drawn per chunk of rows (bounds memory for large vocabularies)


@dataclass
class MQARSlice:
    """One evaluation setting, scored separately (``slice/kv<num_kv_pairs>-len<seq_len>/acc``)."""

    num_kv_pairs: int = 8
    seq_len: int = 64

    @property
    def split_name(self) -> str:
        return f"slice_kv{self.num_kv_pairs}-len{self.seq_len}"


@dataclass
class MQARConfig:
    """Difficulty knobs of the task (pairs, length, vocabulary, query gaps) and the size of each split."""

    _target_: str = "experiments.data.mqar.MQARDataModule"
    vocab_size: int = 256
    seq_len: int = 64  # training length
    num_kv_pairs: int = 8  # training pairs per example
    train_examples: int = 20_000  # the training loader cycles through these in a seeded order
    val_examples: int = 500  # per slice
    # evaluated separately; empty: the training setting only
    slices: list[MQARSlice] = field(default_factory=list)
    # query gap g (in query slots) has probability proportional to g^(power_a - 1): 1.0 is uniform, small values
    # put most queries right after the context (the power law of repeated bigrams in text)
    power_a: float = 0.01
    random_non_queries: bool = True  # fill non-query slots with random tokens rather than the filler 0
    test_seed: int = 0  # seed of the evaluation sets; the same for every training seed
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    cache_dir: str = "~/.cache/arch_zoo"

    def eval_slices(self) -> list[MQARSlice]:
        return list(self.slices) or [MQARSlice(self.num_kv_pairs, self.seq_len)]

    def check(self) -> None:
        """Raise :class:`ConfigError`, naming the fix, for a setting the generator cannot produce."""
        if self.power_a <= 0:
            raise ConfigError(f"data.power_a={self.power_a} must be > 0 (1.0 gives uniform query gaps)")
        for name in ("train_examples", "val_examples", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.test_seed < 0:
            raise ConfigError(f"data.test_seed={self.test_seed} must be >= 0")
        check_setting(self.vocab_size, self.num_kv_pairs, self.seq_len, "data")
        names = [s.split_name for s in self.eval_slices()]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.slices lists a setting twice ({names}); remove the duplicate")
        for i, s in enumerate(self.eval_slices()):
            check_setting(self.vocab_size, s.num_kv_pairs, s.seq_len, f"data.slices[{i}]")

    def generation_key(self) -> dict[str, object]:
        """Everything that decides the generated examples (not batch sizes, workers or where the cache is)."""
        return {
            "version": GENERATOR_VERSION,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "num_kv_pairs": self.num_kv_pairs,
            "train_examples": self.train_examples,
            "val_examples": self.val_examples,
            "slices": [asdict(s) for s in self.eval_slices()],
            "power_a": self.power_a,
            "random_non_queries": self.random_non_queries,
            "test_seed": self.test_seed,
        }

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.generation_key(), sort_keys=True).encode()).hexdigest()


def check_setting(vocab_size: int, num_kv_pairs: int, seq_len: int, where: str) -> None:
    if num_kv_pairs < 1:
        raise ConfigError(f"{where}.num_kv_pairs={num_kv_pairs} must be >= 1")
    # keys are distinct tokens in 1 .. vocab/2 - 1, values distinct tokens in vocab/2 .. vocab - 1
    need_vocab = 2 * num_kv_pairs + 2
    if vocab_size < need_vocab:
        raise ConfigError(
            f"{where}: {num_kv_pairs} key-value pairs need data.vocab_size >= {need_vocab} (distinct keys from the "
            f"first half of the vocabulary, distinct values from the second); raise vocab_size or lower num_kv_pairs"
        )
    # 2 tokens per pair, then one query slot in every two positions of the rest, one slot per key
    if seq_len < 4 * num_kv_pairs:
        raise ConfigError(
            f"{where}: seq_len={seq_len} is too short for {num_kv_pairs} key-value pairs and their queries; "
            f"set seq_len >= {4 * num_kv_pairs} (4 x num_kv_pairs) or num_kv_pairs <= {seq_len // 4}"
        )


def _distinct(rng: np.random.Generator, rows: int, low: int, high: int, k: int) -> np.ndarray:
    """``k`` distinct integers from ``[low, high)`` per row, in random order: the ``k`` smallest of ``high - low``
    uniform draws, sorted by draw (one vectorised pass instead of a Python loop of ``rng.choice``)."""
    u = rng.random((rows, high - low), dtype=np.float32)
    idx = np.argpartition(u, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(u, idx, axis=1).argsort(axis=1)
    return low + np.take_along_axis(idx, order, axis=1)


def _power_law_gaps(rng: np.random.Generator, rows: int, slots: int, k: int, power_a: float) -> np.ndarray:
    """``k`` distinct query slots of ``slots`` per row, drawn without replacement with probability proportional to
    ``(slot + 1)^(power_a - 1)``: the top ``k`` of log-probability plus Gumbel noise (the Gumbel-top-k trick,
    equivalent to drawing one slot at a time), returned in increasing order."""
    log_p = (power_a - 1) * np.log(np.arange(1, slots + 1, dtype=np.float64))
    scores = log_p - np.log(-np.log(rng.random((rows, slots)) + np.finfo(np.float64).tiny))
    return np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)


def generate_mqar(
    rng: np.random.Generator,
    n_examples: int,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float,
    random_non_queries: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``, both ``[n_examples, seq_len]``: pairs ``k1 v1 .. kn vn``, then each key once more at a
    power-law gap (in random order), with ``targets`` holding its value at that position and -100 elsewhere."""
    check_setting(vocab_size, num_kv_pairs, seq_len, "generate_mqar")
    dtype = np.int16 if vocab_size <= np.iinfo(np.int16).max else np.int32
    half, n, context = vocab_size // 2, num_kv_pairs, 2 * num_kv_pairs
    slots = (seq_len - context) // 2  # a query may sit at every other position after the context
    inputs = np.zeros((n_examples, seq_len), dtype=dtype)
    targets = np.full((n_examples, seq_len), IGNORE, dtype=dtype)
    chunk = max(1, CHUNK_DRAWS // max(half, slots))
    for lo in range(0, n_examples, chunk):
        rows = min(chunk, n_examples - lo)
        x, y = inputs[lo : lo + rows], targets[lo : lo + rows]
        if random_non_queries:
            x[:] = rng.integers(0, vocab_size, size=(rows, seq_len))
        keys = _distinct(rng, rows, 1, half, n)
        values = _distinct(rng, rows, half, vocab_size, n)
        x[:, 0:context:2], x[:, 1:context:2] = keys, values
        positions = context + 2 * _power_law_gaps(rng, rows, slots, n, power_a)
        # which key is asked at each query position: a random permutation, so query order says nothing
        asked = rng.random((rows, n)).argsort(axis=1)
        np.put_along_axis(x, positions, np.take_along_axis(keys, asked, axis=1), axis=1)
        np.put_along_axis(y, positions, np.take_along_axis(values, asked, axis=1), axis=1)
    return inputs, targets


class Examples(Dataset):
    """Rows of ``(inputs, targets)`` as int64 tensors."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.inputs[i].astype(np.int64)), torch.from_numpy(self.targets[i].astype(np.int64))


class PerSliceBatches:
    """Batches of the overall ``val`` split that never mix two slices (their lengths may differ)."""

    def __init__(self, sizes: list[int], batch_size: int) -> None:
        self.batches: list[list[int]] = []
        start = 0
        for size in sizes:
            self.batches += [
                list(range(i, min(i + batch_size, start + size))) for i in range(start, start + size, batch_size)
            ]
            start += size

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class MQARDataModule(CachedDataModule):
    """Training examples at one setting; evaluation on every slice (``slice_kv<n>-len<T>``) and on all of them
    together (``val``, accuracy over every answer of every slice)."""

    def __init__(self, config: MQARConfig, seed: int = 0, total_steps: int = 1) -> None:
        super().__init__(config, seed, total_steps)
        if seed < 0:
            raise ConfigError(f"seed={seed} must be >= 0 for MQAR data")
        self.arrays: dict[str, np.ndarray] = {}
        self.cache_path: Path | None = None
        self.generation_seconds: float | None = None  # None when read from the cache

    def _load(self) -> None:
        if self.arrays:
            return
        path = self.cache_dir / "mqar" / f"{self.config.content_hash()}-seed{self.seed}.npz"
        if not path.exists():
            start = time.perf_counter()
            arrays = self._generate()
            self.generation_seconds = time.perf_counter() - start
            path.parent.mkdir(parents=True, exist_ok=True)
            # write under a unique name, then rename: a reader never sees a partial file, even with parallel runs
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
                try:
                    np.savez(tmp, **arrays)
                except BaseException:
                    os.unlink(tmp.name)
                    raise
            os.replace(tmp.name, path)
        with np.load(path) as stored:
            self.arrays = {k: stored[k] for k in stored.files}
        self.cache_path = path

    def _generate(self) -> dict[str, np.ndarray]:
        cfg = self.config
        arrays: dict[str, np.ndarray] = {}
        seen: set[bytes] = set()  # evaluation inputs of the training length, which training must not contain
        for s in cfg.eval_slices():
            rng = np.random.default_rng([EVAL_STREAM, cfg.test_seed, s.num_kv_pairs, s.seq_len])
            x, y = generate_mqar(
                rng, cfg.val_examples, cfg.vocab_size, s.seq_len, s.num_kv_pairs, cfg.power_a, cfg.random_non_queries
            )
            arrays[f"{s.split_name}/inputs"], arrays[f"{s.split_name}/targets"] = x, y
            if s.seq_len == cfg.seq_len:
                seen.update(row.tobytes() for row in x)
        rng = np.random.default_rng([TRAIN_STREAM, self.seed])
        x, y = generate_mqar(
            rng, cfg.train_examples, cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs, cfg.power_a, cfg.random_non_queries
        )
        keep = np.fromiter((row.tobytes() not in seen for row in x), dtype=bool, count=len(x))
        if not keep.any():
            raise ConfigError(
                "data: every training example also occurs in the evaluation sets (the task space is tiny); "
                "raise data.vocab_size, data.seq_len or data.num_kv_pairs"
            )
        arrays["train/inputs"], arrays["train/targets"] = x[keep], y[keep]
        arrays["train/duplicates_dropped"] = np.asarray(int((~keep).sum()))
        return arrays

    def _examples(self, split: str) -> Examples:
        self._load()
        return Examples(self.arrays[f"{split}/inputs"], self.arrays[f"{split}/targets"])

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def slice_names(self) -> list[str]:
        return [s.split_name for s in self.config.eval_slices()]

    @property
    def eval_split_names(self) -> list[str]:
        """``val`` (every slice together) first, then each slice."""
        return ["val", *self.slice_names]

    def bytes_per_token(self, split: str) -> float | None:
        return None  # synthetic tokens have no bytes: no bits-per-byte

    def baselines(self) -> dict[str, float]:
        """Chance accuracy of each split: a model that knows which values are in the context but cannot bind them
        to their keys is right on one answer in ``num_kv_pairs``. ``val`` averages over all answers, as its
        accuracy does."""
        chance = {s.split_name: 1 / s.num_kv_pairs for s in self.config.eval_slices()}
        answers = {s.split_name: self.config.val_examples * s.num_kv_pairs for s in self.config.eval_slices()}
        overall = sum(chance[k] * answers[k] for k in chance) / sum(answers.values())
        return {"chance_acc.val": overall, **{f"chance_acc.{k}": v for k, v in chance.items()}}

    def summary(self) -> dict[str, object]:
        """Facts about the generated data, logged beside the config (so no key repeats a config field's name)."""
        self._load()
        return {
            "data.task": "mqar",
            "data.content_hash": self.config.content_hash(),
            "data.vocab_size": self.vocab_size,
            "data.train_examples_used": len(self.arrays["train/inputs"]),
            "data.train_duplicates_dropped": int(self.arrays["train/duplicates_dropped"]),
            "data.eval_examples": self.config.val_examples * len(self.slice_names),
        }

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self._examples("train"))

    def val_dataloader(self) -> list[DataLoader]:
        slices = [self._examples(name) for name in self.slice_names]
        bs = self.config.eval_batch_size
        overall = DataLoader(
            ConcatDataset(slices),
            batch_sampler=PerSliceBatches([len(s) for s in slices], bs),
            num_workers=self.config.num_workers,
        )
        return [overall] + [DataLoader(s, batch_size=bs, num_workers=self.config.num_workers) for s in slices]


def register_mqar_config() -> None:
    """Store the schema as ``data/mqar_base``, so ``data=mqar`` is type-checked like every other data option."""
    ConfigStore.instance().store(group="data", name="mqar_base", node=MQARConfig)
