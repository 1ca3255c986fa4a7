"""``LanguageModelTask.load_from_checkpoint(path)``: a Lightning checkpoint rebuilds the task with its weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from arch_zoo import ModelConfig, make_config
from experiments.lit_module import LanguageModelTask, OptimConfig


@pytest.mark.parametrize(
    "shape",
    [
        {"mixer": make_config({"name": "retnet", "head_dim": 8}), "target_params": 20_000},
        {"mixer": make_config("transformer"), "hybrid_mixer": make_config("linear_attention"), "hybrid_layers": [1]},
    ],
    ids=["retnet-budget", "hybrid"],
)
def test_a_trained_task_loads_back_from_its_checkpoint(tmp_path, shape):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=2, **shape)
    task = LanguageModelTask(config, OptimConfig(lr=1e-2, warmup_steps=1), 2, ["val"], {"val": 1.0})
    tokens = torch.randint(61, (8, 17))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(task, train_dataloaders=loader)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # plain values only: loads without unpickling classes

    loaded = LanguageModelTask.load_from_checkpoint(path)
    assert loaded.model.config == task.model.config and loaded.optim == task.optim
    assert loaded.eval_splits == ["val"] and loaded.total_steps == 2
    for (name, a), (_, b) in zip(task.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    task.eval(), loaded.eval()
    assert torch.equal(loaded(tokens), task(tokens))
