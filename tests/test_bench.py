"""``zoo-bench`` on tiny CPU models: decoding from the states the model allocates (a preallocated KV cache for
attention) computes the model's own function (float64), the graph-capture rule refuses states it could not replay,
and both subcommands write a table with a row per cell, positive numbers, PNGs and an MLflow run with the metrics
and artifacts."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import mlflow
import pytest
import torch

from arch_zoo.contract import ConfigError
from arch_zoo.mixers.attention import Attention
from arch_zoo.model import LanguageModel
from experiments.bench import ModelSpec, build_model, model_config, parse_models
from experiments.bench.cli import main
from experiments.bench.decode import (
    Stepper,
    _tensor_leaves,
    decode_step,
    prefill,
    state_mib,
    structure_change,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_RETNET = ["--d-model", "64", "--layers", "2", "--vocab", "97", "--lengths", "32,64", "--steps", "3"]
TINY_RETNET += ["--warmup", "1", "--set", "retnet.head_dim=16", "--device", "cpu"]
TINY = [*TINY_RETNET, "--set", "transformer.n_heads=4"]


@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """zoo-bench collects garbage before each cell (``free_memory``); in a test session holding every test module's
    imports and leftovers, each collection walks all of them, seconds per command. What is alive before these tests
    is set aside from those collections (``gc.freeze``); what a cell leaves is still collected."""
    gc.freeze()
    yield
    gc.unfreeze()


def tiny_model(name: str, dtype: torch.dtype = torch.float64, **mixer):
    spec = ModelSpec(name, mixer={"n_heads": 4, **mixer} if name == "transformer" else {"head_dim": 16, **mixer})
    return build_model(model_config(spec, 64, 2, 97), torch.device("cpu"), dtype).eval()


@pytest.mark.parametrize("kv_attention", ["sdpa", "matmul"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_preallocated_kv_cache_decodes_the_models_own_function(kv_attention, chunk):
    torch.manual_seed(0)
    model = tiny_model("transformer", kv_attention=kv_attention)
    tokens = torch.randint(97, (2, 19))
    prompt, continuation = tokens[:, :12], tokens[:, 12:]
    with torch.no_grad():
        reference, _ = model(tokens)  # one causal pass over the whole sequence, the training path
    states = model.allocate_states(2, 40)
    last, states = prefill(model, prompt, states, chunk)
    torch.testing.assert_close(last, reference[:, 11], rtol=1e-10, atol=1e-10)
    for t in range(continuation.shape[1]):
        step_tokens = continuation[:, t : t + 1].clone()
        logits, states = decode_step(model, step_tokens, states)
        torch.testing.assert_close(logits, reference[:, 12 + t], rtol=1e-10, atol=1e-10)
        assert torch.equal(step_tokens[:, 0], logits.argmax(-1))  # the greedy token becomes the next input
    assert int(states[0][0]["pos"]) == 19


def test_preallocated_cache_is_the_same_size_every_step_and_capacity_is_aligned():
    model = tiny_model("transformer")
    states = model.allocate_states(1, 20)
    assert states[0][0]["k"].shape == (1, 4, 32, 16)  # 20 rounded up to a multiple of 16
    _, states = prefill(model, torch.randint(97, (1, 8)), states)
    before = [(s[0]["k"].data_ptr(), s[0]["k"].shape) for s in states]
    _, after = decode_step(model, torch.zeros(1, 1, dtype=torch.long), states)
    assert structure_change(states, after) is None
    assert [(s[0]["k"].data_ptr(), s[0]["k"].shape) for s in after] == before  # written in place
    kv, rotary_tables, positions = 2 * 2 * 32 * 64 * 8, 2 * 2 * 32 * 8 * 8, 2 * 8  # bytes, two layers, float64
    assert state_mib(after) == pytest.approx((kv + rotary_tables + positions) / 2**20)


def test_graph_rule_refuses_growing_states_and_changing_host_values():
    """The model's own KV cache grows (replays would be wrong); RetNet's state keeps its buffers and holds its
    position on the device, so its step is capturable; a position held as a Python int would be frozen."""
    prompt = torch.randint(97, (1, 6))
    for name, why in [("transformer", "the state grows"), ("retnet", None)]:
        model = tiny_model(name)
        with torch.no_grad():  # the model's own functional states, the path training and plain forward calls take
            _, states = model(prompt, None if why else model.allocate_states(1, 16), return_states=True)
        _, after = decode_step(model, torch.zeros(1, 1, dtype=torch.long), states)
        change = structure_change(states, after)
        assert change is None if why is None else why in change
    host = structure_change([{"kv": torch.zeros(2), "offset": 6}], [{"kv": torch.zeros(2), "offset": 7}])
    assert "host value that changes every step" in host


def test_retnet_decodes_from_its_constant_state():
    """The benchmark's prefill + steps equal the model's forward for a recurrent mixer too (chunked prefill)."""
    torch.manual_seed(1)
    model = tiny_model("retnet", mode="chunkwise", chunk_size=4)
    tokens = torch.randint(97, (2, 15))
    with torch.no_grad():
        reference, _ = model(tokens)
    last, states = prefill(model, tokens[:, :11], model.allocate_states(2, 20), chunk=3)
    torch.testing.assert_close(last, reference[:, 10], rtol=1e-9, atol=1e-9)
    sizes = state_mib(states)
    for t in range(11, 15):
        logits, states = decode_step(model, tokens[:, t : t + 1].clone(), states)
        torch.testing.assert_close(logits, reference[:, t], rtol=1e-9, atol=1e-9)
    assert state_mib(states) == sizes


def test_overrides_reach_the_mixer_and_the_ffn_and_typos_fail():
    specs = parse_models("retnet,transformer", ["retnet.head_dim=16", "transformer.ffn.mult=4"], mode="chunkwise")
    retnet, transformer = specs
    assert retnet.mixer == {"head_dim": 16, "mode": "chunkwise"} and transformer.ffn == {"mult": 4}
    assert "mode" not in transformer.mixer  # attention has no mode field
    config = model_config(transformer, 64, 2, 97)
    assert config.ffn.mult == 4
    with pytest.raises(ConfigError, match="MODEL.FIELD=VALUE"):
        parse_models("retnet", ["rwkv.n_heads=2"])
    with pytest.raises(ConfigError, match="no field"):
        model_config(ModelSpec("retnet", mixer={"head_dimm": 16}), 64, 2, 97)


def test_labelled_variants_of_one_mixer_run_side_by_side():
    specs = parse_models("retnet,retnet-f16=retnet", ["retnet-f16.state_dtype=float16", "retnet.head_dim=16"])
    assert [(s.name, s.mixer_name) for s in specs] == [("retnet", "retnet"), ("retnet-f16", "retnet")]
    variant = model_config(specs[1], 64, 2, 97)
    assert variant.mixer.name == "retnet" and variant.mixer.state_dtype == "float16"
    assert model_config(specs[0], 64, 2, 97).mixer.state_dtype == "auto"
    with pytest.raises(ConfigError, match="twice"):
        parse_models("retnet,retnet", None)


def _run(tracking_uri: str, experiment: str):
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_decode_command_writes_a_row_per_cell_plots_and_an_mlflow_run(tmp_path: Path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "decode"
    args = ["decode", "--models", "retnet,transformer", "--batches", "1,2", *TINY, "--reference", "transformer"]
    assert main([*args, "--out", str(out), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "| retnet | 64 | 2 |" in printed and "Relative to transformer" in printed and "CPU" in printed

    rows = json.loads((out / "decode.json").read_text())["rows"]
    assert sorted((r["model"], r["length"], r["batch"]) for r in rows) == sorted(
        (m, L, B) for m in ("retnet", "transformer") for L in (32, 64) for B in (1, 2)
    )
    for r in rows:
        assert r["status"] == "ok", r
        assert min(r["prefill_ms"], r["latency_ms"], r["tokens_per_s"], r["state_mib"]) > 0
        assert r["peak_mib"] is None and "need a GPU" in r["graph"]  # CPU: no peak statistics, no graphs
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["latency_ms"] / 1e3))
    by = {(r["model"], r["length"], r["batch"]): r for r in rows}
    assert by["retnet", 64, 2]["state_mib"] == by["retnet", 32, 2]["state_mib"]  # constant in length
    assert by["transformer", 64, 2]["state_mib"] > by["transformer", 32, 2]["state_mib"]  # a KV cache grows
    for png in ("decode_vs_length.png", "decode_vs_batch.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC

    client, run = _run(uri, "bench")
    assert run.info.status == "FINISHED" and run.data.tags["bench"] == "decode"
    assert run.data.params["models"] == "retnet,transformer" and run.data.params["device_name"].startswith("CPU")
    history = client.get_metric_history(run.info.run_id, "retnet/B2/tokens_per_s")
    assert sorted(m.step for m in history) == [32, 64] and all(m.value > 0 for m in history)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"decode.md", "decode.csv", "decode_vs_length.png", "decode_vs_batch.png"} <= artifacts


def test_train_command_measures_a_full_step_per_length(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "train"
    args = ["train", "--models", "retnet,transformer", "--tokens-per-step", "128", *TINY, "--experiment", "costs"]
    args += ["--float32-matmul-precision", "high"]
    assert main([*args, "--out", str(out), "--tracking-uri", uri]) == 0
    assert torch.get_float32_matmul_precision() == "highest"  # set for the measurement, then given back
    assert "float32 matmul precision high" in (out / "train.md").read_text()
    rows = json.loads((out / "train.json").read_text())["rows"]
    assert [(r["model"], r["length"], r["batch"]) for r in rows] == [
        ("retnet", 32, 4),
        ("retnet", 64, 2),
        ("transformer", 32, 4),
        ("transformer", 64, 2),
    ]
    for r in rows:
        assert r["status"] == "ok", r
        assert min(r["step_ms"], r["tokens_per_s"]) > 0 and 3.0 < r["loss"] < 6.0  # near log(97) = 4.57: it ran
        assert r["back_to_back_ms"] > 0  # steps queued as a run queues them, beside the one-by-one median
    assert (out / "train.png").read_bytes()[:8] == PNG_MAGIC
    client, run = _run(uri, "costs")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "transformer/tokens_per_s")] == [32, 64]
    assert {"train.md", "train.png", "train.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "retnet/back_to_back_ms" in run.data.metrics


def test_train_compile_mode_reaches_the_compiled_model_and_the_table(tmp_path: Path, monkeypatch):
    """``--compile --compile-mode max-autotune-no-cudagraphs``: each model is compiled in that mode (torch.compile
    itself is stubbed out: a compile on the CPU is minutes), and the table's summary says so."""
    from experiments.bench import train as bench_train

    seen = []
    monkeypatch.setattr(bench_train, "compile_model", lambda model, scope, mode: seen.append((scope, mode)) or model)
    out = tmp_path / "train"
    args = ["train", "--models", "retnet", "--tokens-per-step", "128", *TINY_RETNET, "--no-log", "--out", str(out)]
    args += ["--compile", "--compile-scope", "blocks", "--compile-mode", "max-autotune-no-cudagraphs"]
    assert main(args) == 0
    assert seen == [("blocks", "max-autotune-no-cudagraphs")] * 2  # a call per cell (the second finds it compiled)
    assert "torch.compile (blocks, mode max-autotune-no-cudagraphs)" in (out / "train.md").read_text()
    for mode in ("fast", "reduce-overhead", "max-autotune"):  # unknown, or capturing CUDA graphs (as zoo-train)
        with pytest.raises(ValueError, match=f"compile mode '{mode}' is not one a training step can run; choose"):
            bench_train.TrainSettings(
                d_model=8, n_layers=1, vocab_size=8, lengths=[8], steps=1, warmup=0, compile_mode=mode
            )


def test_kernel_tiles_are_pinned_for_their_model_alone_and_bad_ones_are_refused(tmp_path: Path, monkeypatch, capsys):
    """``--kernel-tiles hopper:hopper=1``: the retention kernels' tiles are pinned while that model is built and
    timed (its compile included), not while the other is, and restored after; a label or tile name that does not
    exist is refused before anything runs, naming the choices."""
    pytest.importorskip("triton")
    from arch_zoo.kernels import retention_triton as rt
    from experiments.bench import train as bench_train

    seen = {}
    measure = bench_train._measure

    def watched(model, optimizer, row, settings):
        seen.setdefault(row.model, dict(rt.TILE_OVERRIDES))
        measure(model, optimizer, row, settings)

    monkeypatch.setattr(bench_train, "_measure", watched)
    args = ["train", "--models", "retnet,hopper=retnet", "--tokens-per-step", "128", *TINY_RETNET, "--no-log"]
    args += ["--set", "hopper.head_dim=16", "--out", str(tmp_path / "train")]
    assert main([*args, "--kernel-tiles", "hopper:hopper=1,stages=2"]) == 0
    assert seen == {"retnet": {}, "hopper": {"hopper": 1, "stages": 2}}
    assert rt.TILE_OVERRIDES == {}
    assert main([*args, "--kernel-tiles", "hoper:hopper=1"]) == 2
    assert "MODEL one of retnet, hopper" in capsys.readouterr().err
    assert main([*args, "--kernel-tiles", "hopper:hoper=1"]) == 2
    assert "'hoper=1' is not NAME=INT with NAME one of chunk" in capsys.readouterr().err


def test_train_profile_writes_where_a_step_went_and_logs_it(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "train"
    args = ["train", "--models", "retnet,transformer", "--tokens-per-step", "64", "--profile", *TINY]
    args += ["--experiment", "prof"]
    assert main([*args, "--out", str(out), "--tracking-uri", uri]) == 0
    for name in ("retnet_T32", "retnet_T64", "transformer_T32", "transformer_T64"):
        text = (out / f"profile_{name}.txt").read_text()
        assert text.startswith("one training step under the profiler:") and "Self CPU" in text
    row = json.loads((out / "train.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["busy_pct"] is None  # the CPU has no separate kernel time
    assert "GPU busy" not in (out / "train.md").read_text()  # a column only where there is a number
    client, run = _run(uri, "prof")
    assert "profile_retnet_T32.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_decode_profile_writes_each_cell(tmp_path: Path):
    out = tmp_path / "decode"
    args = ["decode", "--models", "retnet", "--batches", "1", "--profile", *TINY_RETNET, "--no-log", "--out", str(out)]
    assert main(args) == 0
    for length in (32, 64):
        text = (out / f"profile_retnet_T{length}_B1.txt").read_text()
        assert text.startswith("one decoding step (eager: CUDA graphs need a GPU) under the profiler:")
    assert all(r["busy_pct"] is None for r in json.loads((out / "decode.json").read_text())["rows"])


def test_profiled_kernel_time_counts_kernels_not_the_annotations_around_them():
    """An optimizer step's GPU-side range spans its kernels: counted too, it put the optimizer in twice."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from experiments.bench.profiling import kernel_time_by_kind

    def event(name, start, end, device=DeviceType.CUDA, annotation=False):
        return FunctionEvent(0, name, 0, start, end, device_type=device, is_user_annotation=annotation)

    events = [
        event("Optimizer.step#AdamW.step", 0, 900, annotation=True),
        event("void at::native::multi_tensor_apply_kernel<...>", 0, 400),
        event("void at::native::multi_tensor_apply_kernel<...>", 400, 900),
        event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 1000, 3000),
        event("aten::mm", 1000, 3000, device=DeviceType.CPU),
    ]
    by_kind, launches = kernel_time_by_kind(events)
    assert by_kind == {"optimizer": 0.9, "matmul": 2.0} and launches == 3


def test_profiled_idle_time_is_the_gaps_between_kernels_with_overlaps_merged():
    """Idle time inside a step's kernel span: overlapping kernels (two streams) leave no gap, annotations and host
    ops are not kernels, and gaps over 20 us (a host sync, a graph break) are counted apart."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from experiments.bench.profiling import kernel_idle

    def event(name, start, end, device=DeviceType.CUDA, annotation=False):
        return FunctionEvent(0, name, 0, start, end, device_type=device, is_user_annotation=annotation)

    events = [
        event("a", 100, 400),
        event("b", 150, 200),  # inside a (another stream): no gap after it
        event("c", 404, 500),  # 4 us after a
        event("step#annotation", 0, 5000, annotation=True),
        event("aten::item", 500, 1500, device=DeviceType.CPU),
        event("d", 1500, 1600),  # 1000 us after c: a host sync
        event("e", 1610, 1700),  # 10 us
    ]
    idle = kernel_idle(events)
    assert idle == pytest.approx({"span_ms": 1.6, "idle_ms": 1.014, "gaps": 3, "big_ms": 1.0, "big_gaps": 1})
    assert kernel_idle([event("aten::mm", 0, 10, device=DeviceType.CPU)])["gaps"] == 0


def test_a_profile_calls_out_misaligned_and_older_architecture_matrix_products():
    """Kernel names from a profiled RetNet step on an H100 (docs/results/mfu.md, session 22): the FFN products of a
    2046-wide FFN ran on Ampere kernels for 2-element alignment, and the summary says so with the fix; aligned
    Hopper products, aligned Ampere ones and kernels of other kinds are not misaligned."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from experiments.bench.profiling import kernel_arch, slow_matmul_lines, slow_matmuls

    def event(name, start, end, device=DeviceType.CUDA):
        return FunctionEvent(0, name, 0, start, end, device_type=device)

    nn2 = "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_64x3_nn_align2>(cutlass_80...)"
    nt2 = "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_64x3_nt_align2>(cutlass_80...)"
    relu8 = "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_128x256_64x3_nt_align8>(cutla..."
    events = [
        event(nn2, 0, 1187),
        event(nn2, 2000, 3187),
        event(nt2, 4000, 5066),
        event(relu8, 6000, 6614),
        event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 7000, 7400),
        event("triton_poi_fused_align2_view_3", 8000, 8100),  # not a matrix product, whatever its name says
        event(nn2, 0, 5000, device=DeviceType.CPU),
    ]
    names = (nn2, "sm80_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_nn")
    assert [kernel_arch(n) for n in (*names, "nvjet_sm90_tst_256x128", "triton_poi_fused_add_0")] == [
        80,
        80,
        80,
        90,
        None,
    ]
    slow = slow_matmuls(events, 90)
    assert slow["misaligned"] == pytest.approx((3.44, 3)) and slow["older_arch"] == pytest.approx((4.054, 4))
    lines = slow_matmul_lines(slow, 90)
    assert len(lines) == 2 and "3.4 ms in 3 launches" in lines[0] and "model.ffn_multiple_of=64" in lines[0]
    assert "older GPU than this one (sm90): 4.1 ms in 4 launches" in lines[1]
    on_ampere = slow_matmuls(events, 80)
    assert on_ampere["older_arch"] == (0.0, 0) and slow_matmul_lines(on_ampere, 80) == lines[:1]
    aligned = [e for e in events if "align2" not in e.name]
    assert slow_matmul_lines(slow_matmuls(aligned, 80), 80) == []


def fake_smi(folder: Path, body: str) -> Path:
    """An ``nvidia-smi`` on PATH that records its arguments and runs ``body`` (a shell snippet)."""
    folder.mkdir(exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text(f'#!/usr/bin/env bash\necho "$@" > "{folder}/args"\n{body}\n')
    tool.chmod(0o755)
    return folder


def test_gpu_clock_and_power_are_the_means_of_the_samples_taken_while_the_steps_ran(tmp_path, monkeypatch):
    """The sampler asks for the GPU by its UUID and averages what ``nvidia-smi`` prints while the block runs,
    leaving out fields it cannot read; a tool that is missing or fails leaves the fields empty, and nothing raises."""
    import os
    import time

    from experiments.bench.telemetry import parse_samples, sampled

    lines = ["1755, 690.10, 700.00", "1980, [N/A], 700.00", "[Not Supported]", "1845, 650.30, 700.00"]
    parsed = parse_samples(lines)
    assert parsed.samples == 3 and parsed.sm_clock_mhz == pytest.approx(1860.0)
    assert parsed.power_w == pytest.approx(670.2) and parsed.power_limit_w == 700.0
    body = 'while true; do echo "1500, 650.5, 700.00"; echo "[N/A], [N/A], [N/A]"; sleep 0.02; done'
    folder = fake_smi(tmp_path / "ok", body)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    with sampled("GPU-1234") as gpu:
        time.sleep(1.0)
    assert gpu.samples >= 2 and (gpu.sm_clock_mhz, gpu.power_w, gpu.power_limit_w) == (1500.0, 650.5, 700.0)
    args = (folder / "args").read_text().split()
    assert args[:2] == ["-i", "GPU-1234"] and "--query-gpu=clocks.sm,power.draw,power.limit" in args
    failing = fake_smi(tmp_path / "failing", 'echo "Field is not a valid field to query." >&2; exit 2')
    monkeypatch.setenv("PATH", f"{failing}{os.pathsep}{os.environ['PATH']}")
    with sampled("GPU-1234") as gpu:
        time.sleep(0.1)
    assert (gpu.sm_clock_mhz, gpu.power_w, gpu.samples) == (None, None, 0)
    with sampled(None) as gpu:  # the CPU
        pass
    assert gpu.samples == 0


def test_profiled_kernels_are_grouped_by_kind():
    from experiments.bench.profiling import kernel_kind

    assert kernel_kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kernel_kind("_chunk_output_kernel") == "retention kernels"
    assert kernel_kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>") == "optimizer"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kernel_kind("triton_poi_fused__to_copy_add_view_5") == "other"
    assert kernel_kind("triton_poi_fused__chunk_cat_0") == "other"  # a compiler's kernel named after an op
    assert kernel_kind("_decode_step_kernel") == "retention kernels"


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["decode", "--models", "retnett", "--device", "cpu", "--no-log"]) == 2
    assert "Did you mean 'retnet'" in capsys.readouterr().err


def test_a_cache_too_large_to_allocate_is_recorded_as_oom(tmp_path: Path, monkeypatch):
    """The KV cache of a long, wide cell can be what runs out of memory, before any prefill number exists."""
    allocate = Attention.allocate_state

    def allocate_state(self, batch, capacity, device, dtype):
        if capacity > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return allocate(self, batch, capacity, device, dtype)

    monkeypatch.setattr(Attention, "allocate_state", allocate_state)
    out = tmp_path / "decode"
    tiny_transformer = [*TINY[:-6], *TINY[-4:]]  # without the retnet override
    assert (
        main(["decode", "--models", "transformer", "--batches", "1", *tiny_transformer, "--out", str(out), "--no-log"])
        == 0
    )
    rows = {r["length"]: r for r in json.loads((out / "decode.json").read_text())["rows"]}
    assert rows[32]["status"] == "ok" and rows[64]["status"] == "OOM (prefill)" and rows[64]["prefill_ms"] is None
    assert "OOM (prefill)" in (out / "decode.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["retnet", "transformer"])
def test_compiled_decode_steps_equal_eager_steps(name):
    """``--compile``: the compiled step (RetNet's in-place state update included) continues exactly as the eager
    step does from the same prefill, and leaves the same state behind."""
    torch.manual_seed(0)
    model = tiny_model(name, dtype=torch.float32)
    prompt = torch.randint(97, (2, 9))
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        _, states = prefill(model, prompt, model.allocate_states(2, 32))
        stepper = Stepper(model, prompt[:, -1:].clone(), states, runner=torch.compile(model) if compiled else None)
        logits = []
        for _ in range(4):
            out, stepper.states = decode_step(stepper.step_model, stepper.tokens, stepper.states)
            logits.append(out.clone())
        runs[compiled] = (torch.stack(logits), [t.clone() for t in _tensor_leaves(stepper.states)])
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-4)
    for got, want in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_an_error_without_a_message_still_makes_a_status_line():
    from experiments.bench import error_line

    assert error_line(AssertionError()) == "AssertionError"
    assert error_line(ValueError("bad\nmore")) == "ValueError: bad"


def test_a_labelled_model_is_composed_from_the_training_config_tree():
    """Each labelled model is zoo-train's tree composed with its own override list: the shorthand and any Hydra
    override of the model (``LABEL:OVERRIDE``) reach the same typed config training would build."""
    specs = parse_models("r=retnet,t=transformer", ["r.head_dim=16", "r:model.norm=rmsnorm", "t:model.mixer.n_heads=8"])
    retnet, attention = (model_config(s, 64, 2, 97) for s in specs)
    assert specs[0].hydra_overrides(64, 2, 97)[:2] == ["model/mixer=retnet", "model.d_model=64"]
    assert retnet.norm == "rmsnorm" and retnet.mixer.head_dim == 16 and retnet.vocab_size == 97
    assert attention.mixer.n_heads == 8 and attention.mixer.name == "transformer" and attention.norm == "layernorm"
    with pytest.raises(ConfigError, match="model 't'"):
        model_config(parse_models("t=transformer", ["t:model.mixer.n_heads=many"])[0], 64, 2, 97)


def test_an_override_for_every_model_builds_them_at_one_size():
    """``*:OVERRIDE`` reaches every model: with the paper's per-layer budget each mixer's FFN width is chosen so that
    all have the same parameter count (without it the Transformer is a third smaller than RetNet at d 1024)."""
    specs = parse_models("retnet,transformer,la=linear_attention", ["*:model.budget_per_layer=12"])
    sizes = set()
    for spec in specs:
        with torch.device("meta"):
            model = LanguageModel(model_config(spec, 1024, 16, 32000))
        sizes.add(round(sum(p.numel() for p in model.parameters()), -6))
    assert sizes == {267_000_000}
    plain = model_config(parse_models("transformer", None)[0], 1024, 16, 32000)
    with torch.device("meta"):
        assert sum(p.numel() for p in LanguageModel(plain).parameters()) < 210e6


def test_defaults_are_sized_for_the_machine_and_shown_in_help(capsys):
    """On a CPU the defaults finish in minutes (the GPU ones are 1.3B-class models to 16k tokens); --help says both."""
    from experiments.bench.cli import parse_args

    cpu = parse_args(["decode", "--device", "cpu"])
    assert (cpu.d_model, cpu.layers, cpu.batches, cpu.lengths) == (256, 4, [1, 4], [256, 512, 1024])
    gpu = parse_args(["train", "--device", "cuda"])
    assert (gpu.d_model, gpu.layers, gpu.lengths, gpu.steps) == (2048, 24, [2048, 8192], 5)
    assert parse_args(["train", "--device", "cpu", "--d-model", "64"]).d_model == 64  # a given value wins
    with pytest.raises(SystemExit):
        parse_args(["decode", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default on a GPU: 2048; on a CPU: 256" in text and "(default: 32000)" in text


def test_another_process_on_the_gpu_is_counted_and_warned_about(tmp_path: Path, monkeypatch, capsys):
    """A cell measured while another process held the GPU (a test suite compiling beside the benchmark once made one
    table's step 1.8x the next one's) is marked in its row, the table's column and a warning under it; a GPU held by
    this process alone shows no column."""
    import experiments.bench as bench

    seen = iter([0, 1, 0, 0])  # before and after each of two cells: another process appears during the first
    monkeypatch.setattr(bench, "other_gpu_processes", lambda device: next(seen))
    out = tmp_path / "train"
    args = ["train", "--models", "transformer", "--tokens-per-step", "128", *TINY[:-6], *TINY[-4:], "--no-log"]
    assert main([*args, "--out", str(out)]) == 0
    rows = json.loads((out / "train.json").read_text())["rows"]
    assert [r["shared_gpu"] for r in rows] == [1, 0]
    table = (out / "train.md").read_text()
    assert "| other GPU processes |" in table
    assert "**Warning:** 1 of 2 cells ran while other processes held this GPU" in table
    assert "warning: 1 other process(es) held the GPU while transformer at length 32 ran" in capsys.readouterr().err

    monkeypatch.setattr(bench, "other_gpu_processes", lambda device: 0)
    assert main([*args, "--out", str(tmp_path / "alone")]) == 0
    table = (tmp_path / "alone" / "train.md").read_text()
    assert "other GPU processes" not in table and "Warning" not in table


def test_gpu_processes_are_counted_on_this_gpu_less_this_process():
    from experiments.bench import count_other_processes

    apps = ["GPU-aaaa-1111, 4242", "GPU-aaaa-1111, 5151", "GPU-bbbb-2222, 6060"]
    assert count_other_processes(apps, "aaaa-1111", ours=True) == 1  # this process and one other on this GPU
    assert count_other_processes(apps, "GPU-bbbb-2222", ours=False) == 1  # before this process holds a context
    assert count_other_processes(apps, "", ours=True) == 2  # GPU unknown: every GPU counts
    assert count_other_processes([], "aaaa-1111", ours=True) is None  # not even this process listed: hidden
    assert count_other_processes(None, "aaaa-1111", ours=True) is None  # no nvidia-smi
    assert count_other_processes(["GPU-aaaa-1111, 4242"], "aaaa-1111", ours=True) == 0
