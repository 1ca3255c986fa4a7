"""The Transformer's attention mixer: its KV caches (functional and preallocated) against the whole-sequence pass."""

from __future__ import annotations

import pytest
import torch

from arch_zoo import ConfigError, LanguageModel, ModelConfig, build_mixer
from arch_zoo.mixers.attention import AttentionConfig


def make(**fields) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mixer(AttentionConfig(name="transformer", n_heads=4, **fields), 64).double().eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kv_attention", ["sdpa", "matmul"])
@pytest.mark.parametrize("rotary", [True, False])
def test_preallocated_cache_continues_as_the_whole_sequence(kv_attention, rotary):
    """A prompt, then single tokens and a chunk, written in place into an allocated cache: the training pass."""
    mixer = make(kv_attention=kv_attention, rotary=rotary)
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    full, _ = mixer(x)
    with torch.no_grad():
        state = mixer.allocate_state(2, 30, x.device, x.dtype)
        k = state["k"]
        pieces = []
        for lo, hi in [(0, 11), (11, 12), (12, 13), (13, 30)]:
            y, state = mixer(x[:, lo:hi], state)
            pieces.append(y)
    assert rel_err(torch.cat(pieces, 1), full) < 1e-12
    assert state["k"] is k and int(state["pos"]) == 30  # written in place, the position on the device
    assert k.shape == (2, 4, 32, 16)  # capacity 30 rounded up to a multiple of 16


def test_functional_cache_grows_and_leaves_its_input_alone():
    mixer = make()
    x = torch.randn(1, 9, 64, dtype=torch.float64)
    with torch.no_grad():
        _, state = mixer(x[:, :5])
        before = state["k"].clone()
        _, after = mixer(x[:, 5:6], state)
    assert after["k"].shape[2] == 6 and torch.equal(state["k"], before)


def test_generate_decodes_from_the_allocated_cache_as_the_forward_would():
    """Greedy generation (allocated states) picks, at each step, the argmax of the whole-sequence forward."""
    torch.manual_seed(0)
    mixer = AttentionConfig(name="transformer", n_heads=4)
    model = LanguageModel(ModelConfig(vocab_size=50, d_model=64, n_layers=2, mixer=mixer)).double().eval()
    prompt = torch.randint(50, (2, 7))
    out = model.generate(prompt, max_new_tokens=5)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(out[:, 7:], logits[:, 6:].argmax(-1))


def test_bad_settings_name_the_fix():
    with pytest.raises(ConfigError, match="kv_attention='flash' is not one of sdpa, matmul"):
        make(kv_attention="flash")
    with pytest.raises(ConfigError, match="not divisible by n_heads=5"):
        build_mixer(AttentionConfig(name="transformer", n_heads=5), 64)


def test_registered_as_attention_and_still_selected_as_transformer():
    """The registry name matches the file and class; "transformer", the name older configs and recorded runs use,
    selects the same mixer and keeps its name in the config (so a run is labelled as it was asked for)."""
    from arch_zoo import available_mixers, get_mixer, make_config
    from arch_zoo.mixers.attention import Attention

    assert get_mixer("attention").mixer_class is Attention and get_mixer("attention").alias_of is None
    assert get_mixer("transformer").mixer_class is Attention and get_mixer("transformer").alias_of == "attention"
    assert make_config("transformer").name == "transformer"
    assert make_config(AttentionConfig()).name == "attention"
    assert isinstance(build_mixer("transformer", 64), Attention)
    assert {"attention", "transformer"} <= set(available_mixers())
