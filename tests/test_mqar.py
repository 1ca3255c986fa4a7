"""MQAR data: seeded and cached generation, the task's structure, disjoint splits, per-slice evaluation, checks that
name the fix, and the end-to-end claim that matters (a small attention model learns to recall in a few seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from arch_zoo import ConfigError, LanguageModel, ModelConfig
from experiments.config_store import register_configs
from experiments.data.mqar import IGNORE, MQARConfig, MQARDataModule, MQARSlice, generate_mqar, register_mqar_config

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"


def small_config(cache: Path, **overrides) -> MQARConfig:
    values = dict(
        vocab_size=64,
        seq_len=32,
        num_kv_pairs=4,
        train_examples=2000,
        val_examples=200,
        slices=[MQARSlice(2, 32), MQARSlice(4, 32), MQARSlice(8, 64)],
        batch_size=64,
        eval_batch_size=64,
        cache_dir=str(cache),
    )
    return MQARConfig(**(values | overrides))


def loaded(config: MQARConfig, seed: int = 0, total_steps: int = 10) -> MQARDataModule:
    data = MQARDataModule(config, seed=seed, total_steps=total_steps)
    data.prepare_data()
    return data


def assert_structure(inputs: np.ndarray, targets: np.ndarray, vocab_size: int, num_kv_pairs: int) -> None:
    """Keys in the first half, values in the second, every key asked once after the context, answered with the
    value bound to it in the context, and nothing scored anywhere else."""
    half, context = vocab_size // 2, 2 * num_kv_pairs
    keys, values = inputs[:, 0:context:2], inputs[:, 1:context:2]
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < vocab_size)).all()
    assert all(len(set(row)) == num_kv_pairs for row in keys)  # distinct keys: every query has one answer
    assert (targets[:, :context] == IGNORE).all()
    scored = targets != IGNORE
    assert (scored.sum(1) == num_kv_pairs).all()
    for x, y, k, v, mask in zip(inputs, targets, keys, values, scored):
        bound = dict(zip(k.tolist(), v.tolist()))
        asked = x[mask].tolist()
        assert sorted(asked) == sorted(bound)  # each key asked exactly once
        assert y[mask].tolist() == [bound[key] for key in asked]


def test_generation_is_deterministic_per_seed_and_differs_across_seeds():
    a = generate_mqar(np.random.default_rng(3), 50, 64, 32, 4, 0.01, True)
    b = generate_mqar(np.random.default_rng(3), 50, 64, 32, 4, 0.01, True)
    c = generate_mqar(np.random.default_rng(4), 50, 64, 32, 4, 0.01, True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_structure_of_every_example(random_non_queries):
    inputs, targets = generate_mqar(np.random.default_rng(0), 300, 64, 40, 6, 0.01, random_non_queries)
    assert inputs.shape == targets.shape == (300, 40)
    assert_structure(inputs, targets, 64, 6)
    if not random_non_queries:  # everything but pairs and queries is the filler 0
        assert ((inputs == 0) == ((np.arange(40) >= 12) & (targets == IGNORE))).all()


def test_query_order_is_independent_of_the_context_order():
    """Queries asked in the order the pairs were given would let a model answer by counting instead of recalling."""
    inputs, targets = generate_mqar(np.random.default_rng(0), 4000, 64, 32, 3, 0.01, True)
    keys = inputs[:, 0:6:2]
    asked = np.stack([x[y != IGNORE] for x, y in zip(inputs, targets)])
    in_order = (asked == keys).all(axis=1).mean()
    assert abs(in_order - 1 / 6) < 0.03  # one of the 3! orders


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_query_gaps_follow_the_power_law(power_a):
    """With one pair the query's slot g (position 2 + 2g) is drawn with probability proportional to (g+1)^(a-1)."""
    _, targets = generate_mqar(np.random.default_rng(0), 20_000, 64, 128, 1, power_a, True)
    slots = (np.nonzero(targets != IGNORE)[1] - 2) // 2
    expected = np.arange(1, 64, dtype=float) ** (power_a - 1)
    expected /= expected.sum()
    observed = np.bincount(slots, minlength=63) / len(slots)
    assert np.abs(observed - expected).max() < 0.015
    # with several pairs, small power_a still crowds the queries right after the context
    mean_position = [
        np.nonzero(generate_mqar(np.random.default_rng(0), 2000, 64, 128, 4, a, True)[1] != IGNORE)[1].mean()
        for a in (0.01, 1.0)
    ]
    assert mean_position[0] < 40 and abs(mean_position[1] - 67) < 3  # uniform slots 8, 10 .. 126 average 67


def test_cached_by_config_hash_and_seed(tmp_path):
    first = loaded(small_config(tmp_path))
    assert first.generation_seconds is not None
    files = sorted((tmp_path / "mqar").iterdir())
    assert [f.name for f in files] == [f"{first.config.content_hash()}-seed0.npz"]
    assert not list((tmp_path / "mqar").glob("*.tmp"))  # written atomically: no partial file left behind

    again = loaded(small_config(tmp_path))
    assert again.generation_seconds is None  # read from the cache, not generated
    for key, array in first.arrays.items():
        assert np.array_equal(array, again.arrays[key])

    loaded(small_config(tmp_path), seed=1)
    loaded(small_config(tmp_path, power_a=0.5))
    assert len(list((tmp_path / "mqar").iterdir())) == 3  # a new seed or a new knob is a new entry
    # batch sizes do not change the examples, so they share the entry
    assert small_config(tmp_path, batch_size=3).content_hash() == first.config.content_hash()


def test_seeds_change_training_data_but_not_the_evaluation_sets(tmp_path):
    a, b = loaded(small_config(tmp_path), seed=0), loaded(small_config(tmp_path), seed=1)
    assert not np.array_equal(a.arrays["train/inputs"], b.arrays["train/inputs"])
    for name in a.slice_names:
        assert np.array_equal(a.arrays[f"{name}/inputs"], b.arrays[f"{name}/inputs"])


def test_training_and_evaluation_examples_are_disjoint(tmp_path):
    data = loaded(small_config(tmp_path))
    train = {row.tobytes() for row in data.arrays["train/inputs"]}
    for name in data.slice_names:
        assert not train & {row.tobytes() for row in data.arrays[f"{name}/inputs"]}
    # a task space so small that seeds collide: the collisions are dropped from training, and counted
    tiny = loaded(
        MQARConfig(
            vocab_size=10,
            seq_len=6,
            num_kv_pairs=1,
            train_examples=500,
            val_examples=20,
            random_non_queries=False,
            cache_dir=str(tmp_path),
        )
    )
    dropped = tiny.summary()["data.train_duplicates_dropped"]
    assert dropped > 0 and tiny.summary()["data.train_examples_used"] == 500 - dropped
    evaluated = {row.tobytes() for row in tiny.arrays["slice_kv1-len6/inputs"]}
    assert not evaluated & {row.tobytes() for row in tiny.arrays["train/inputs"]}


def test_slices_are_evaluated_separately_and_together(tmp_path):
    data = loaded(small_config(tmp_path), total_steps=7)
    assert data.eval_split_names == ["val", "slice_kv2-len32", "slice_kv4-len32", "slice_kv8-len64"]
    overall, *slices = data.val_dataloader()
    for name, loader in zip(data.slice_names, slices):
        kv, length = (int(part) for part in name.removeprefix("slice_kv").split("-len"))
        batches = list(loader)
        assert sum(len(x) for x, _ in batches) == 200
        for x, y in batches:
            assert x.dtype == y.dtype == torch.int64 and x.shape[1] == length
            assert_structure(x.numpy(), y.numpy(), 64, kv)
    # `val` holds every slice's examples, each batch from a single slice
    lengths = [x.shape[1] for x, _ in overall]
    assert sum(len(x) for x, _ in overall) == 600 and sorted(set(lengths)) == [32, 64]

    train = list(data.train_dataloader())
    assert len(train) == 7 and all(x.shape == (64, 32) for x, _ in train)  # exactly total_steps batches
    assert [x.tolist() for x, _ in train] == [
        x.tolist() for x, _ in loaded(small_config(tmp_path), total_steps=7).train_dataloader()
    ]

    baselines = data.baselines()
    assert baselines["chance_acc.slice_kv2-len32"] == 0.5 and baselines["chance_acc.slice_kv8-len64"] == 0.125
    assert baselines["chance_acc.val"] == pytest.approx(3 / (2 + 4 + 8))  # one answer in n, over all answers
    assert data.bytes_per_token("val") is None and data.vocab_size == 64
    summary = data.summary()
    assert summary["data.content_hash"] == data.config.content_hash() and summary["data.eval_examples"] == 600


def test_empty_slices_evaluate_the_training_setting(tmp_path):
    data = loaded(small_config(tmp_path, slices=[]))
    assert data.eval_split_names == ["val", "slice_kv4-len32"]


@pytest.mark.parametrize(
    "overrides,fix",
    [
        (dict(num_kv_pairs=16, seq_len=32), "seq_len >= 64"),
        (dict(slices=[MQARSlice(num_kv_pairs=20, seq_len=64)]), r"data.slices\[0\].*seq_len >= 80"),
        (dict(vocab_size=16, num_kv_pairs=8), "vocab_size >= 18"),
        (dict(power_a=0.0), "power_a"),
        (dict(slices=[MQARSlice(2, 32), MQARSlice(2, 32)]), "remove the duplicate"),
        (dict(train_examples=0), "train_examples"),
    ],
)
def test_bad_settings_fail_early_naming_the_fix(tmp_path, overrides, fix):
    with pytest.raises(ConfigError, match=fix):
        small_config(tmp_path, **overrides).check()
    with pytest.raises(ConfigError):
        MQARDataModule(small_config(tmp_path, **overrides))
    assert not (tmp_path / "mqar").exists()  # nothing generated


def test_data_option_composes_to_the_typed_schema(tmp_path):
    register_configs()
    register_mqar_config()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data=mqar", f"data.cache_dir={tmp_path}", "data.num_kv_pairs=4"])
        with pytest.raises(Exception, match="num_kv_pair"):  # a misspelt knob fails at compose time
            compose("train", overrides=["data=mqar", "data.num_kv_pair=4"])
    assert get_class(cfg.data._target_) is MQARDataModule
    config = OmegaConf.to_object(cfg.data)
    assert isinstance(config, MQARConfig) and config.num_kv_pairs == 4
    assert config.slices and all(isinstance(s, MQARSlice) for s in config.slices)
    config.check()


def test_a_small_transformer_learns_to_recall(tmp_path):
    """The task is learnable and scored right: 200 steps of a 2-layer attention model lift accuracy far above the
    1-in-4 chance (it reaches ~1.0 on most seeds; the bound leaves room for slower ones)."""
    torch.manual_seed(0)
    config = small_config(tmp_path, vocab_size=16, seq_len=16, num_kv_pairs=4, train_examples=4000, slices=[])
    data = loaded(config, total_steps=200)
    model = LanguageModel(ModelConfig(vocab_size=16, d_model=64, n_layers=2, mixer="transformer"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread, and loses a lot on a busy CPU
    try:
        for inputs, targets in data.train_dataloader():
            loss = model.loss(inputs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in data.val_dataloader()[0]:
            scored = targets != IGNORE
            correct += (model(inputs)[0].argmax(-1)[scored] == targets[scored]).sum().item()
            total += scored.sum().item()
    chance = data.baselines()["chance_acc.val"]
    assert chance == 0.25 and total == 200 * 4
    assert correct / total > 0.6, f"accuracy {correct / total:.3f} after 200 steps (chance {chance})"
