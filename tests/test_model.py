"""The language model: decoding through states, hybrids, FFN kinds, and the optimiser's parameter groups."""

import dataclasses

import pytest
import torch

from arch_zoo import ConfigError, FFNConfig, LanguageModel, ModelConfig, available_mixers, make_config, set_optim
from arch_zoo.layers import ffn_kinds
from arch_zoo.mixers.hyena import HyenaConfig
from experiments.lit_module import fused_adamw, lr_multiplier, parameter_groups
from tests.conftest import mixer_params


def small(name: str):
    return dataclasses.replace(available_mixers()[name].config_class.small(), name=name)


def tiny_model(mixer, **kw) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=50, d_model=64, n_layers=2, mixer=mixer, **kw)).double().eval()


@pytest.mark.parametrize("name", mixer_params())
def test_greedy_generation_through_states_matches_reforwarding_the_prefix(name):
    model = tiny_model(small(name))
    prompt = torch.randint(0, 50, (2, 5))
    generated = model.generate(prompt, max_new_tokens=8)
    tokens = prompt
    for _ in range(8):  # the slow way: the full forward over the growing prefix
        logits, _ = model(tokens)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_hybrid_places_the_second_mixer_in_the_chosen_layers():
    model = LanguageModel(
        ModelConfig(
            vocab_size=50,
            d_model=64,
            n_layers=6,
            mixer=small("retnet"),
            hybrid_mixer=small("transformer"),
            hybrid_layers=[0],
            hybrid_every=3,
        )
    )
    kinds = [block.mixer.config.name for block in model.blocks]
    assert kinds == ["transformer", "retnet", "transformer", "retnet", "retnet", "transformer"]


def test_hybrid_layer_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="outside 0..1"):
        LanguageModel(
            ModelConfig(d_model=64, n_layers=2, mixer="transformer", hybrid_mixer="transformer", hybrid_layers=[5])
        )


@pytest.mark.parametrize("kind", ffn_kinds() + ["none"])
def test_every_ffn_kind_trains(kind):
    model = tiny_model(small("transformer"), ffn=FFNConfig(kind=kind)).float().train()
    tokens = torch.randint(0, 50, (2, 17))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)


def test_unknown_ffn_kind_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="registered kinds: .*gelu"):
        LanguageModel(ModelConfig(d_model=64, mixer="transformer", ffn=FFNConfig(kind="gelo")))


def test_parameter_groups_honour_per_parameter_settings():
    model = tiny_model(small("transformer"))
    special = model.blocks[0].mixer.qkv.weight
    set_optim(special, lr=1e-4, weight_decay=0.0)
    groups = parameter_groups(model, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(special)]["lr"] == 1e-4 and by_param[id(special)]["weight_decay"] == 0.0
    assert by_param[id(model.blocks[1].mixer.qkv.weight)]["weight_decay"] == 0.1
    assert by_param[id(model.norm.weight)]["weight_decay"] == 0.0  # norms are not decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_relative_learning_rates_follow_the_run_lr():
    model = tiny_model(small("transformer"))
    scaled, capped = model.blocks[0].mixer.qkv.weight, model.blocks[1].mixer.qkv.weight
    set_optim(scaled, lr_scale=2.0)
    set_optim(capped, lr_max=1e-3)
    for lr, cap in [(3e-3, 1e-3), (5e-4, 5e-4)]:
        by_param = {id(p): g for g in parameter_groups(model, weight_decay=0.1, lr=lr) for p in g["params"]}
        assert by_param[id(scaled)]["lr"] == pytest.approx(2 * lr)
        assert by_param[id(capped)]["lr"] == pytest.approx(cap)  # min(lr_max, lr), as H3's reference config
    with pytest.raises(ValueError, match="need the run's lr"):
        parameter_groups(model, weight_decay=0.1)
    with pytest.raises(ValueError, match="unknown setting"):
        set_optim(scaled, lr_mult=2.0)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    values = [lr_multiplier(s, warmup=10, total=100, min_ratio=0.1) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[100] == pytest.approx(0.1)


def test_linear_schedule_decays_in_equal_steps_to_the_floor():
    """The RetNet paper's schedule (its §3.1: linear decay after 375 warmup steps), here to a floor of 0."""
    values = [lr_multiplier(s, warmup=10, total=110, min_ratio=0.0, schedule="linear") for s in range(111)]
    assert values[9] == pytest.approx(1.0) and values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.5) and values[110] == pytest.approx(0.0)
    steps = [a - b for a, b in zip(values[10:], values[11:])]
    assert steps == pytest.approx([0.01] * 100)
    with pytest.raises(ValueError, match="choose one of cosine, linear"):
        lr_multiplier(20, warmup=10, total=110, min_ratio=0.0, schedule="step")


def test_adamw_is_fused_on_cuda_unless_a_loss_scaler_unscales():
    """The trainer's step is the benchmark's (one fused AdamW kernel on a GPU); float16's scaler would unscale the
    gradients inside the fused step, after Lightning has clipped them, so it keeps the unfused loop."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused_adamw(cuda, "bf16-mixed") and fused_adamw(cuda, "32-true") and fused_adamw(cuda, "bf16-true")
    assert not fused_adamw(cuda, "16-mixed") and fused_adamw(cuda, "16-true")
    assert not fused_adamw(cpu, "bf16-mixed") and not fused_adamw(cpu, "32-true")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "loop"])
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_bf16_mixed_clips_the_fused_adamw_as_it_clips_the_loop(tmp_path, monkeypatch, fused, algorithm):
    """``trainer=gpu`` (bf16-mixed, clipping on) with the fused AdamW: Lightning's mixed-precision plugin refuses to
    clip for an optimizer that unscales in its step, though bf16 has no scale, so every GPU run stopped at its first
    step. Adam's first moment after one step is (1 - beta1) x the clipped gradient, whichever loop ran."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from experiments import lit_module

    monkeypatch.setattr(lit_module, "fused_adamw", lambda device, precision: fused)  # the CPU runs both loops
    torch.manual_seed(0)
    task = lit_module.LanguageModelTask(
        ModelConfig(vocab_size=61, d_model=32, n_layers=2, mixer=make_config("transformer")),
        lit_module.OptimConfig(lr=1e-2, warmup_steps=1, betas=(0.9, 0.98)),
        1,
        [],
        {},
    )
    tokens = torch.randint(61, (4, 17))
    trainer = L.Trainer(
        max_steps=1, precision="bf16-mixed", gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4))
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["fused"] is (True if fused else None)
    moments = [optimizer.state[p]["exp_avg"] for p in task.parameters()]
    if algorithm == "norm":
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in moments]))
        assert total.item() == pytest.approx(0.1 * 1e-3, rel=1e-4)
    else:
        assert max(m.abs().max().item() for m in moments) == pytest.approx(0.1 * 1e-3, rel=1e-4)


def test_state_size_sums_the_layers():
    model = tiny_model(small("transformer"))
    assert model.state_size(100) == sum(b.mixer.state_size(100) for b in model.blocks)
    assert model.state_size(200) == 2 * model.state_size(100)  # a KV cache grows linearly


def test_target_params_picks_the_ffn_width_that_matches_the_budget():
    target = 12 * 64 * 64 * 3
    for name in ("transformer", "retnet"):
        model = LanguageModel(
            ModelConfig(vocab_size=50, d_model=64, n_layers=3, mixer=small(name), target_params=target)
        )
        assert abs(model.num_parameters(non_embedding=True) - target) <= 3 * 64  # one hidden unit per layer
    with pytest.raises(ConfigError, match="below what the mixers alone need"):
        LanguageModel(ModelConfig(vocab_size=50, d_model=64, n_layers=3, mixer="transformer", target_params=1000))


def test_the_budget_follows_the_shape_and_positional_tables_are_not_counted():
    for d, L in [(64, 2), (96, 3)]:
        config = ModelConfig(vocab_size=50, d_model=d, n_layers=L, mixer=HyenaConfig(name="hyena", l_max=32))
        model = LanguageModel(dataclasses.replace(config, budget_per_layer=12))
        size = model.size()
        assert abs(size["counted"] - 12 * d * d * L) <= L * 2 * d  # one hidden unit per layer
        tables = sum(b.mixer.filter.z.numel() for b in model.blocks)
        assert size["not_counted"] == 2 * 50 * d + tables and sum(size.values()) == model.num_parameters()
    with pytest.raises(ConfigError, match="both set the equal-size budget"):
        LanguageModel(ModelConfig(vocab_size=50, d_model=64, mixer="transformer", budget_per_layer=12, target_params=1))


def test_the_matched_ffn_width_rounds_to_the_multiple_asked_for():
    """Table 5's equal-size rule leaves the FFN 2 units under 2d (RetNet) and 4d (the Transformer) at d 1024: the
    norms take their share of the budget. A bf16 row of 2046 is 4092 bytes, which cuBLAS's aligned kernels cannot
    take (docs/results/mfu.md, session 22); ``ffn_multiple_of=64`` gives back the paper's widths."""
    shape = dict(vocab_size=100, d_model=1024, n_layers=16, budget_per_layer=12)
    widths = {}
    for mixer in ("retnet", "transformer", "rwkv", "h3"):
        for step in (1, 64):
            with torch.device("meta"):
                model = LanguageModel(ModelConfig(mixer=mixer, ffn_multiple_of=step, **shape))
            hidden = model.blocks[0].ffn.fc1.out_features
            widths[mixer, step] = hidden
            assert hidden % step == 0
            # the nearest multiple: at most half a step of FFN units per layer from the unrounded width
            slope = 2 * 1024  # counted parameters per FFN unit: a column of fc1 and a row of fc2, no biases
            assert abs(model.size()["counted"] - 12 * 1024**2 * 16) <= 16 * slope * max(step / 2, 1)
    assert (widths["retnet", 1], widths["retnet", 64]) == (2046, 2048)
    assert (widths["transformer", 1], widths["transformer", 64]) == (4094, 4096)
    # a budget whose nearest multiple would be no FFN at all gets one multiple
    with torch.device("meta"):
        small = LanguageModel(ModelConfig(vocab_size=50, d_model=64, n_layers=2, mixer="retnet", budget_per_layer=8.1,
                                          ffn_multiple_of=64))  # fmt: skip
    assert small.blocks[0].ffn.fc1.out_features == 64
    with pytest.raises(ConfigError, match="ffn_multiple_of must be 1 or more"):
        LanguageModel(ModelConfig(vocab_size=50, d_model=64, mixer="retnet", budget_per_layer=12, ffn_multiple_of=0))


def test_cached_rotary_tables_match_a_fresh_computation_and_grow():
    from arch_zoo.layers import _ROTARY_TABLES, cached_rotary_cos_sin, rotary_cos_sin

    inv_freq = 10000.0 ** -torch.linspace(0, 1, 8, dtype=torch.float64)
    name = ("test-rotary", 10000.0, 16)
    for start, length in [(0, 5), (3, 20), (40, 100)]:  # the last one outgrows the first table
        cos, sin = cached_rotary_cos_sin(name, inv_freq, start, length, torch.bfloat16)
        ref_cos, ref_sin = rotary_cos_sin(inv_freq, start, length, torch.bfloat16)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert _ROTARY_TABLES[(repr(name), inv_freq.device, torch.bfloat16)][0].shape[0] == 256
    # the registered operator behind it (opaque to a compiler): its shape function and schema against the real thing
    torch.library.opcheck(torch.ops.arch_zoo.rotary_slice.default, (repr(name), inv_freq, 3, 20, torch.float32))
    # a position held in a tensor (a captured decoding step) is not cached: it must follow the tensor's value
    position = torch.tensor(7)
    assert torch.equal(
        cached_rotary_cos_sin(name, inv_freq, position, 1, torch.float32)[0],
        rotary_cos_sin(inv_freq, 7, 1, torch.float32)[0],
    )


def test_gradient_clipping_by_norm_under_fsdp_goes_through_the_sharded_module():
    """Lightning's FSDP precision refuses norm clipping (the norm spans the shards): the task asks the sharded
    module, which knows the global norm; under any other strategy it clips as Lightning does."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    from arch_zoo.mixers.retnet import RetNetConfig
    from experiments.lit_module import LanguageModelTask, OptimConfig

    config = ModelConfig(vocab_size=11, d_model=16, n_layers=1, mixer=RetNetConfig(name="retnet", head_dim=8))
    task = LanguageModelTask(config, OptimConfig(), total_steps=1, eval_splits=["val"], bytes_per_token={"val": 1.0})
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    sharded, lightning = [], []
    task.clip_gradients = lambda *args: lightning.append(args[1:])
    fsdp = FSDPStrategy()
    fsdp.model = SimpleNamespace(clip_grad_norm_=sharded.append)
    task._trainer = SimpleNamespace(strategy=fsdp, precision_plugin=Precision())
    task.configure_gradient_clipping(optimizer, 0.5, "norm")
    task.configure_gradient_clipping(optimizer, 0.5, "value")  # clipping by value needs no global view
    assert sharded == [0.5] and lightning == [(0.5, "value")]

    task._trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision_plugin=Precision())
    task.configure_gradient_clipping(optimizer, 0.5, "norm")
    assert sharded == [0.5] and lightning == [(0.5, "value"), (0.5, "norm")]


def test_compiling_block_by_block_keeps_the_function_and_the_parameter_names():
    """compile_scope=blocks: each block compiled in place (identical blocks share one graph, so a deep model compiles
    about as fast as one block); the loss and gradients are the eager model's, and checkpoints keep their keys."""
    from arch_zoo.mixers.retnet import RetNetConfig
    from arch_zoo.model import compile_model

    config = ModelConfig(vocab_size=50, d_model=32, n_layers=3, mixer=RetNetConfig(name="retnet", head_dim=16))
    torch.manual_seed(0)
    eager = LanguageModel(config)
    compiled = LanguageModel(config)
    compiled.load_state_dict(eager.state_dict())
    names = list(compiled.state_dict())
    assert compile_model(compiled, "blocks") is compiled and list(compiled.state_dict()) == names
    tokens = torch.randint(50, (2, 40), generator=torch.Generator().manual_seed(1))
    losses = [m.loss(tokens[:, :-1], tokens[:, 1:]) for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    with pytest.raises(ConfigError, match="choose one of model, blocks"):
        compile_model(compiled, "layers")
    with pytest.raises(ConfigError, match="compile mode 'fast' is unknown; choose one of default, max-autotune"):
        compile_model(compiled, "blocks", "fast")


@pytest.mark.parametrize("mixer", ["retnet", "transformer"])
def test_a_compiled_model_compiles_once(mixer):
    """The caches a model fills on its first call (rotary tables, RetNet's decays) must not become guards that the
    filling itself breaks: that compiled the whole model a second time at its second step."""
    from torch._dynamo.utils import counters

    from arch_zoo.model import compile_model

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=50, d_model=32, n_layers=2, mixer=make_config({"name": mixer})))
    compile_model(model, "model")
    tokens = torch.randint(50, (1, 33))
    torch._dynamo.reset()
    counters.clear()
    for _ in range(3):
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()  # the training step's call: it must be compiled
    assert counters["stats"]["unique_graphs"] == 2  # the model's forward and the loss


def counting_checks(monkeypatch, config_class) -> list[int]:
    """Each call of ``config_class.check`` appends its width to the returned list (and still checks)."""
    calls: list[int] = []
    original = config_class.check

    def check(self, d_model: int) -> None:
        calls.append(d_model)
        original(self, d_model)

    monkeypatch.setattr(config_class, "check", check)
    return calls


def test_a_model_checks_its_mixer_config_once_and_a_mixer_built_alone_checks_its_own(monkeypatch):
    """The model checks a layer's mixer config once for all its layers (and its hybrid layers' once); a mixer built
    outside a model still checks its config, so a bad one fails there with the same message."""
    retnet, attention = available_mixers()["retnet"], available_mixers()["attention"]
    retnet_checks = counting_checks(monkeypatch, retnet.config_class)
    attention_checks = counting_checks(monkeypatch, attention.config_class)
    config = ModelConfig(vocab_size=97, d_model=64, n_layers=4, mixer=retnet.config_class.small())
    LanguageModel(dataclasses.replace(config, hybrid_mixer=attention.config_class.small(), hybrid_layers=[1, 3]))
    assert retnet_checks == [64] and attention_checks == [64]
    retnet.mixer_class(64, retnet.config_class.small())
    assert retnet_checks == [64, 64]
    with pytest.raises(ConfigError, match="n_heads"):
        attention.mixer_class(64, dataclasses.replace(attention.config_class.small(), n_heads=3))
