"""The Table 5 configs build every architecture at (near) equal size, in the paper's shape and in miniature."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from arch_zoo import LanguageModel
from experiments.train import model_config

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"
ARCHITECTURES = ["retnet", "rwkv", "h3", "hyena", "linear_attention", "transformer"]


def count(experiment: str, mixer: str) -> int:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"model/mixer={mixer}"])
    with torch.device("meta"):  # 200M parameters, six times: count without allocating
        model = LanguageModel(model_config(cfg, vocab_size=257))
    return model.size()["counted"]


@pytest.mark.parametrize("experiment,target", [("table5", 201_326_592), ("table5_small", 786_432)])
def test_all_six_architectures_have_equal_size(experiment, target):
    counts = {name: count(experiment, name) for name in ARCHITECTURES}
    print(experiment, {k: f"{v:,}" for k, v in counts.items()})
    for name, n in counts.items():
        assert abs(n - target) / target < 0.01, f"{name}: {n:,} parameters vs {target:,}"
