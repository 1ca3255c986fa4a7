"""``zoo-bench``: what registered mixers cost to decode and to train, on this machine.

    zoo-bench decode --models retnet,transformer --set retnet.head_dim=256 --set transformer.n_heads=16 \\
        --set transformer.ffn.mult=4 --lengths 1024,2048,4096,8192,16384 --batches 1,8,32,64 --reference transformer
    zoo-bench train --models retnet,transformer --lengths 2048,8192 --tokens-per-step 16384

Each model is built by composing zoo-train's config tree with its own override list (``model/mixer=NAME`` and the
shape flags first). ``--set MODEL.FIELD=VALUE`` overrides a field of that model's mixer config, ``--set
MODEL.ffn.FIELD=VALUE`` one of its FFN (the paper compares RetNet with FFN width 2d against a Transformer with 4d, at
equal size), and ``--set MODEL:OVERRIDE`` hands it any Hydra override of the tree (``--set retnet:model.norm=rmsnorm``).
Outputs go to ``--out`` (Markdown, CSV, JSON, PNG) and to an MLflow run in the experiment ``bench``; the table is
printed last.
"""

from __future__ import annotations

import argparse
import platform
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from arch_zoo.errors import ConfigError
from arch_zoo.model import COMPILE_SCOPES, TRAINING_COMPILE_MODES
from experiments.bench import device_label, parse_models, resolve_device, resolve_dtype
from experiments.bench.decode import DecodeSettings, run_decode
from experiments.bench.report import finish, log, log_run, write_outputs
from experiments.bench.train import TrainSettings, run_train
from experiments.hardware import MATMUL_PRECISIONS, float32_matmul_precision


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# Defaults by machine: on a GPU the paper's scale (1.3B-class models to 16k tokens); on a CPU a size that finishes in
# minutes. A command's own value (decode vs train) where they differ.
SIZES: dict[str, dict[str, Any]] = {
    "d_model": {"gpu": 2048, "cpu": 256},
    "layers": {"gpu": 24, "cpu": 4},
    "lengths": {
        "gpu": {"decode": [1024, 2048, 4096, 8192, 16384], "train": [2048, 8192]},
        "cpu": {"decode": [256, 512, 1024], "train": [256, 512]},
    },
    "batches": {"gpu": [1, 8, 32, 64], "cpu": [1, 4]},
    "steps": {"gpu": {"decode": 32, "train": 5}, "cpu": {"decode": 8, "train": 3}},
    "warmup": {"gpu": {"decode": 5, "train": 2}, "cpu": {"decode": 2, "train": 1}},
}


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in ``--help``, except where there is none or the help already gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def _sized(field: str) -> str:
    def text(value: Any) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k} {text(v)}" for k, v in value.items())
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return f"default on a GPU: {text(SIZES[field]['gpu'])}; on a CPU: {text(SIZES[field]['cpu'])}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--models",
        default="retnet,transformer",
        help="registered mixer names, comma-separated; LABEL=MIXER adds a variant (its overrides: --set LABEL.FIELD=V)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="MODEL.FIELD=VALUE|MODEL:HYDRA_OVERRIDE|*:HYDRA_OVERRIDE",
    )
    common.add_argument("--mode", default="chunkwise", help="form of a whole sequence, for mixers with a mode field")
    common.add_argument("--d-model", type=int, default=None, help=_sized("d_model"))
    common.add_argument("--layers", type=int, default=None, help=_sized("layers"))
    common.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    common.add_argument(
        "--lengths", type=_ints, default=None, help="context lengths, comma-separated; " + _sized("lengths")
    )
    common.add_argument(
        "--steps", type=int, default=None, help="timed steps (the median is reported); " + _sized("steps")
    )
    common.add_argument("--warmup", type=int, default=None, help="untimed steps before them; " + _sized("warmup"))
    common.add_argument("--device", default="auto", help="auto (cuda if there is one), cuda, cuda:1, cpu")
    common.add_argument("--reference", default=None, help="model the others are compared with, cell by cell")
    common.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    common.add_argument("--out", type=Path, default=None, help="output folder (default: outputs/bench/<command>)")
    common.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own default)")
    common.add_argument("--experiment", default="bench", help="MLflow experiment")
    common.add_argument("--no-log", action="store_true", help="write files only; no MLflow run")
    common.add_argument(
        "--profile",
        action="store_true",
        help="profile one more step per cell: profile_<cell>.txt (GPU kernels by kind against the wall time, top ops)",
    )

    parser = argparse.ArgumentParser(prog="zoo-bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shown = {"formatter_class": _Defaults}
    decode = commands.add_parser("decode", parents=[common], help="prefill, decode latency/throughput, memory", **shown)
    decode.add_argument("--batches", type=_ints, default=None, help=_sized("batches"))
    decode.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16", "fp64"], default="auto")
    decode.add_argument("--prefill-chunk", type=int, default=0, help="prefill in pieces of this many tokens (0: whole)")
    decode.add_argument("--no-graphs", action="store_true", help="never capture the decode step in a CUDA graph")
    decode.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (the prefill stays eager)"
    )
    train = commands.add_parser("train", parents=[common], help="training step tokens/s and peak memory", **shown)
    train.add_argument("--tokens-per-step", type=int, default=16384, help="batch = this // length (at least 1)")
    train.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto", help="auto: bf16 on CUDA")
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument(
        "--float32-matmul-precision",
        choices=list(MATMUL_PRECISIONS),
        default="highest",
        help="float32 products (what autocast leaves float32), as zoo-train's float32_matmul_precision",
    )
    train.add_argument("--compile", action="store_true", help="torch.compile the loss (the first steps compile)")
    train.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        default="model",
        help="with --compile: one graph for the model and loss, or each block in place (a shorter compile)",
    )
    train.add_argument(
        "--compile-mode",
        choices=TRAINING_COMPILE_MODES,
        default="default",
        help="with --compile: torch.compile's mode (max-autotune-no-cudagraphs: products tuned; a longer compile; the "
        "modes that capture CUDA graphs are not offered: a training step keeps its loss past the next step's graph)",
    )
    train.add_argument(
        "--kernel-tiles",
        action="append",
        default=[],
        metavar="MODEL:NAME=INT,...",
        help="pin the retention kernels' tiles while MODEL trains (kernels/retention_triton.py's _Plan fields): "
        "--models retnet,hopper=retnet --kernel-tiles hopper:hopper=2 times the Hopper output kernel beside ours",
    )
    args = parser.parse_args(argv)
    machine = (
        "gpu" if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    for field, values in SIZES.items():
        if getattr(args, field, 0) is None:
            setattr(
                args, field, values[machine][args.command] if isinstance(values[machine], dict) else values[machine]
            )
    return args


def parse_kernel_tiles(items: list[str], labels: list[str]) -> dict[str, dict[str, int]]:
    """``["hopper:hopper=1"]`` -> ``{"hopper": {"hopper": 1}}``, each label one of the models'."""
    pinned = {}
    for item in items:
        label, sep, text = item.partition(":")
        if not sep or label not in labels:
            raise ConfigError(
                f"--kernel-tiles {item!r}: expected MODEL:NAME=INT,... with MODEL one of {', '.join(labels)}"
            )
        from arch_zoo.kernels.benchmark import parse_tiles

        try:
            pinned[label] = parse_tiles(text)
        except ValueError as error:
            raise ConfigError(f"--kernel-tiles {item!r}: {str(error).removeprefix('--tiles: ')}") from None
    return pinned


def _params(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"out", "tracking_uri", "no_log", "experiment"}
    params = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in vars(args).items() if k not in skip}
    params["torch"] = torch.__version__
    params["python"] = platform.python_version()
    if torch.cuda.is_available():
        params["cuda"] = torch.version.cuda
    return params


def _shared_settings(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The fields of :class:`~experiments.bench.BenchSettings`, from the flags both commands take."""
    return {
        "d_model": args.d_model,
        "n_layers": args.layers,
        "vocab_size": args.vocab,
        "lengths": args.lengths,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "compile": args.compile,
        "profile_dir": out if args.profile else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        specs = parse_models(args.models, args.overrides, args.mode)
        kernel_tiles = parse_kernel_tiles(getattr(args, "kernel_tiles", []), [spec.name for spec in specs])
    except ConfigError as error:
        print(f"zoo-bench: {error}", file=sys.stderr)
        return 2

    shape = f"d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}"
    out = args.out or Path("outputs") / "bench" / args.command
    shared = _shared_settings(args, out)
    if args.command == "decode":
        dtype = resolve_dtype(args.dtype, device)
        settings = DecodeSettings(
            **shared, batches=args.batches, prefill_chunk=args.prefill_chunk, graphs=not args.no_graphs
        )
        rows = [r.as_dict() for r in run_decode(specs, settings, device, dtype, log)]
        summary = (
            f"{shape}, {str(dtype).removeprefix('torch.')} weights, random prompt then greedy decoding; latency = "
            f"median of {args.steps} steps after {args.warmup}; states (KV caches too) preallocated by the mixers; "
            f"prefill chunk {args.prefill_chunk or 'whole prompt'}" + ("; step torch.compile'd" if args.compile else "")
        )
    else:
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}.get(args.amp)
        if args.amp == "auto":
            amp = torch.bfloat16 if device.type == "cuda" else None
        settings = TrainSettings(
            **shared,
            tokens_per_step=args.tokens_per_step,
            amp=amp,
            lr=args.lr,
            compile_scope=args.compile_scope,
            compile_mode=args.compile_mode,
            kernel_tiles=kernel_tiles,
        )
        with float32_matmul_precision(args.float32_matmul_precision):
            rows = [r.as_dict() for r in run_train(specs, settings, device, log)]
        summary = (
            f"{shape}, fp32 weights, autocast {str(amp).removeprefix('torch.') if amp else 'off'}, AdamW; "
            f"{args.tokens_per_step} tokens per step; median of {args.steps} steps after {args.warmup}"
            + (f"; torch.compile ({args.compile_scope}, mode {args.compile_mode})" if args.compile else "")
            + f"; float32 matmul precision {args.float32_matmul_precision}"
        )
    n_params = {r["model"]: r["n_params"] for r in rows}
    meta = {"device": device_label(device), "summary": summary, "n_params": n_params, "params": _params(args)}
    table, files = write_outputs(args.command, rows, meta, out, args.reference)
    if args.profile:
        files += sorted(out.glob("profile_*.txt"))
    record = partial(log_run, args.command, rows, meta, files, table, args.tracking_uri, args.experiment)
    return finish(table, files, None if args.no_log else record, args.experiment)


if __name__ == "__main__":
    sys.exit(main())
