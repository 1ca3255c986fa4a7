"""Declared FLOPs (what runs turn into TFLOP/s and MFU) against torch's FLOP counter, for every form and option that
changes the arithmetic, and for whole models; the contract suite checks each mixer's default small config."""

from __future__ import annotations

import pytest
import torch

from arch_zoo import LanguageModel, ModelConfig, build_mixer
from arch_zoo.flops import count_flops, measured_flops_per_token
from arch_zoo.layers import FFNConfig

D = 64


def _measured_mixer(mixer, length: int) -> float:
    one, two = torch.randn(1, length, D, dtype=torch.float64), torch.randn(2, length, D, dtype=torch.float64)
    return measured_flops_per_token(lambda x: mixer(x, return_state=False), [one, two])


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "retnet", "head_dim": 16, "mode": "parallel"},
        {"name": "retnet", "head_dim": 16, "mode": "chunkwise", "chunk_size": 8},
        {"name": "retnet", "head_dim": 16, "mode": "recurrent"},
        {"name": "retnet", "head_dim": 16, "mode": "chunkwise", "chunk_size": 8, "score_norm": False},
        {"name": "retnet", "head_dim": 16, "swish_gate": False, "gate_realloc": "none"},
        {"name": "retnet", "head_dim": 16, "mode": "chunkwise", "chunk_size": 8, "selective_decay": True},
        {"name": "linear_attention", "n_heads": 4, "mode": "parallel"},
        {"name": "linear_attention", "n_heads": 4, "mode": "recurrent"},
        {"name": "linear_attention", "n_heads": 4, "chunk_size": 8, "normalize": False, "feature_map": "relu"},
        {"name": "rwkv", "mode": "recurrent"},
        {"name": "rwkv", "chunk_size": 7},
        {"name": "transformer", "n_heads": 2},
        {"name": "h3", "head_dim": 8},
        {"name": "hyena", "order": 3, "l_max": 64},
    ],
    ids=lambda spec: "-".join(f"{v}" for v in spec.values()),
)
@pytest.mark.parametrize("length", [8, 21])
def test_every_form_declares_what_it_computes(spec, length):
    torch.manual_seed(0)
    mixer = build_mixer(spec, D).double()
    assert mixer.flops_per_token(length) == pytest.approx(_measured_mixer(mixer, length), rel=1e-12)


@pytest.mark.parametrize(
    "mixer, ffn",
    [("retnet", "gelu"), ("transformer", "swiglu"), ("rwkv", "rwkv_channel"), ("hyena", "relu2")],
)
def test_model_flops_are_its_blocks_and_head(mixer, ffn):
    """The model's declaration (the run's MFU numerator) adds every mixer, FFN and the head; a hybrid too."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=96,
        d_model=D,
        n_layers=2,
        mixer=mixer,
        ffn=FFNConfig(kind=ffn),
        hybrid_mixer="linear_attention",
        hybrid_layers=[1],
    )
    model = LanguageModel(config).double()
    length = 24
    tokens = torch.randint(0, 96, (2, length))
    measured = measured_flops_per_token(lambda t: model(t), [tokens[:1], tokens])
    assert model.flops_per_token(length) == pytest.approx(measured, rel=1e-12)


def test_a_core_on_the_kernels_declares_the_chunkwise_flops_whatever_its_mode(monkeypatch):
    """The kernels are chunkwise whatever the mode, so a ``mode=parallel`` run on them does a chunkwise run's FLOPs.
    Counted as the parallel form's T^2 products, a bf16 RetNet at Table 5's shape on an H100 logged ``perf/mfu``
    50% where it did 38.5% (docs/results/mfu.md, session 23). Linear attention takes its kernels only for a bfloat16
    core, so the forward's autocast decides; the kernels' choice is stood in for on the CPU."""
    from arch_zoo.kernels import dispatch

    def flops(mixer: str, mode: str) -> float:
        model = LanguageModel(ModelConfig(vocab_size=32, d_model=D, n_layers=1, mixer={"name": mixer, "mode": mode}))
        return model.flops_per_token(256)

    for mixer in ("retnet", "linear_attention"):
        assert flops(mixer, "parallel") > flops(mixer, "chunkwise")  # the PyTorch forms: as configured
    on_kernels = lambda backend, device, **kw: "triton"  # noqa: E731  what auto picks on a GPU
    monkeypatch.setattr(dispatch, "choose_backend", on_kernels)
    assert flops("retnet", "parallel") == flops("retnet", "chunkwise")
    assert flops("linear_attention", "parallel") > flops("linear_attention", "chunkwise")  # float32: not ours
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dispatch.run_dtype(torch.zeros(1)) == torch.bfloat16
        assert flops("linear_attention", "parallel") == flops("linear_attention", "chunkwise")
    assert dispatch.run_dtype(torch.zeros(1)) == torch.float32


def test_a_mixer_that_declares_nothing_leaves_the_model_undeclared():
    """Runs report no MFU rather than a number that leaves a mixer's work out."""
    model = LanguageModel(ModelConfig(vocab_size=32, d_model=D, n_layers=2, mixer="retnet"))
    model.blocks[1].mixer.flops_per_token = lambda seq_len: None
    assert model.flops_per_token(16) is None


def test_peak_lookup_by_device_name_and_precision(monkeypatch):
    from experiments import hardware

    monkeypatch.setattr(hardware.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert hardware.peak_tflops(cuda, hardware.matmul_precision("bf16-mixed")) == 989.4
    assert hardware.peak_tflops(cuda, hardware.matmul_precision("16-mixed")) == 989.4
    assert hardware.peak_tflops(cuda, hardware.matmul_precision("64-true")) is None
    monkeypatch.setattr(hardware.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert hardware.peak_tflops(cuda, "bf16") == 756.0
    monkeypatch.setattr(hardware.torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert hardware.peak_tflops(cuda, "bf16") is None  # unknown: no MFU unless peak_tflops is given
    assert hardware.peak_tflops(torch.device("cpu"), "fp32") is None
    assert hardware.matmul_precision(torch.bfloat16) == "bf16" and hardware.matmul_precision(torch.float64) is None
    for setting, precision in (("highest", "fp32"), ("high", "tf32"), ("medium", "bf16")):  # float32_matmul_precision
        monkeypatch.setattr(hardware.torch, "get_float32_matmul_precision", lambda setting=setting: setting)
        assert hardware.matmul_precision("32-true") == precision


def test_a_gpu_run_in_half_precision_warns_of_an_ffn_width_its_products_cannot_take_aligned(caplog):
    """Table 5's matched RetNet FFN is 2046 wide: a bf16 GPU run says what it costs and names the setting that rounds
    it; the rounded width, float32 products and the CPU stay quiet, and an unmatched width is told another fix."""
    from types import SimpleNamespace

    from experiments.callbacks import Throughput

    def warnings(device: str, precision: str, **config) -> list[str]:
        shape = dict(vocab_size=100, d_model=1024, n_layers=16, mixer="retnet", **config)
        with torch.device("meta"):
            model = LanguageModel(ModelConfig(**shape))
        module = SimpleNamespace(device=torch.device(device), model=model)
        caplog.clear()
        Throughput(peak_tflops=1.0).on_fit_start(SimpleNamespace(precision=precision, is_global_zero=True), module)
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    (note,) = warnings("cuda", "bf16-mixed", budget_per_layer=12)
    assert note.startswith("the FFN width 2046 is not a multiple of 8: in bf16") and "model.ffn_multiple_of=64" in note
    assert warnings("cuda", "16-mixed", budget_per_layer=12)[0].startswith(
        "the FFN width 2046 is not a multiple of 8: in fp16"
    )
    assert warnings("cuda", "bf16-mixed", budget_per_layer=12, ffn_multiple_of=64) == []
    assert warnings("cuda", "32-true", budget_per_layer=12) == []
    assert warnings("cpu", "bf16-mixed", budget_per_layer=12) == []
    (unmatched,) = warnings("cuda", "bf16-true", ffn=FFNConfig(hidden_size=1000 + 2))
    assert "model.ffn.hidden_size" in unmatched and "ffn_multiple_of" not in unmatched


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("length, chunk", [(8, 8), (21, 8), (200, 64), (130, 512)])
def test_each_core_form_counts_what_it_computes(form, length, chunk):
    """``core.flops`` per form and chunk, whatever chunk: the count a run declares (``model_flops``) is it at chunks
    of at most 64, the kernels' chunk."""
    from arch_zoo.kernels import core

    q, k = torch.randn(2, 3, length, 8, dtype=torch.float64), torch.randn(2, 3, length, 8, dtype=torch.float64)
    v = torch.randn(2, 3, length, 5, dtype=torch.float64)
    log_decay = torch.full((3,), -0.1, dtype=torch.float64)
    kwargs = {"chunk_size": chunk} if form == "chunkwise" else {}
    counted = count_flops(lambda: core.FORMS[form](q, k, v, log_decay, output_final_state=False, **kwargs))
    assert counted == 2 * 3 * core.flops(form, length, 8, 5, chunk)
    assert core.model_flops(form, length, 8, 5, chunk) == core.flops(form, length, 8, 5, min(chunk, 64))


def test_the_counted_chunk_is_the_kernels():
    from arch_zoo.kernels import core

    triton_kernels = pytest.importorskip("arch_zoo.kernels.retention_triton")
    assert core.MODEL_CHUNK == triton_kernels.CHUNK
