"""What RetNet's ``state_dtype`` costs in model quality, measured on a trained checkpoint.

    python -m experiments.state_precision --checkpoint RUN_DIR/checkpoints/last.ckpt --length 1024 --prompt 128

Storing the recurrent state in bfloat16 or float16 halves a decoding step's memory traffic, but every step rounds
the state once, and the rounding accumulates over a long continuation. This command takes validation sequences of
the run's own data, computes the reference logits with one whole-sequence forward (the training form), then for each
state dtype runs the prompt as one call and decodes the rest one token per call (teacher forcing: the true next
token goes in), and compares: NLL of the decoded positions, its difference from the reference on the same
positions, logit error and greedy agreement. The table is printed, written as Markdown and CSV, and logged to MLflow.

The model and the data are rebuilt from the config the run saved beside its checkpoints (``config_resolved.yaml``,
else ``.hydra/config.yaml``), through the same functions ``zoo-train`` uses, so the validation windows are the ones
the run reports as ``val_len<N>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf

from arch_zoo import LanguageModel
from arch_zoo.contract import ConfigError
from arch_zoo.mixers.retnet import STATE_DTYPES
from experiments import decoding_check
from experiments.bench import device_label, resolve_device
from experiments.bench.report import (
    finish,
    format_cell,
    log,
    markdown,
    record_measurement,
    row_metrics,
    write_table,
)
from experiments.decoding_check import decode_logits, nll, reference_logits
from experiments.trained_run import build_data_module, data_config, find_config, load_model

EXPERIMENT = "state_precision"
REFERENCE = "reference"

# (field, header, format) of the table; the CSV keeps every field of a row
COLUMNS = [
    ("state_dtype", "state dtype", "{}"),
    ("nll", "NLL (nats/token)", "{:.5f}"),
    ("bits", "bits/token", "{:.5f}"),
    ("delta_nll", "ΔNLL vs reference (nats)", "{:+.2e}"),
    ("rel_delta_nll", "ΔNLL relative", "{:+.2e}"),
    ("max_logit_diff", "max abs Δlogit", "{:.2e}"),
    ("rel_logit_error", "relative logit error", "{:.2e}"),
    ("greedy_agreement", "greedy agreement (%)", "{:.2f}"),
]
DEFAULT_DTYPES = ["auto", "float16", "bfloat16"]  # in the order of their cost
METRICS = ("nll", "bits", "delta_nll", "rel_delta_nll", "max_logit_diff", "rel_logit_error", "greedy_agreement")


# ----------------------------------------------------------------------------------------------------------------
# The run: config, data and weights, rebuilt with the training entry point's own code
# ----------------------------------------------------------------------------------------------------------------


def build_data(cfg: DictConfig, length: int) -> Any:
    """The run's data module, with ``length`` among its evaluation lengths (the ``val_len<N>`` windows)."""
    config = data_config(cfg)
    if not hasattr(config, "eval_lengths"):
        raise ConfigError(
            f"{type(config).__name__}: state_precision scores continuations of a text validation split; this run's "
            "data has none (use a run trained on text, e.g. data=stdlib)"
        )
    if length != config.block_size and length not in config.eval_lengths:
        config = dataclasses.replace(config, eval_lengths=[*config.eval_lengths, length])
    return build_data_module(cfg, config)


def validation_sequences(data: Any, length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` validation windows of ``length`` tokens, spread evenly over the split (deterministic):
    ``(inputs, targets)``, each ``[count, length]``."""
    split = "val" if length == data.config.block_size else f"val_len{length}"
    dataset = data.val_dataloader()[data.eval_split_names.index(split)].dataset
    if count > len(dataset):
        raise ConfigError(
            f"the validation split holds {len(dataset)} windows of {length} tokens, fewer than --sequences {count}; "
            "lower --sequences or --length"
        )
    indices = [round(i * (len(dataset) - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]
    inputs, targets = zip(*(dataset[i] for i in indices))
    return torch.stack(inputs), torch.stack(targets)


# ----------------------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------------------


def retnet_mixers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every mixer of ``model`` with a ``state_dtype`` setting (RetNet's; chosen by the setting, not the class); an
    error naming the mixers it has when there is none."""
    mixers = decoding_check.state_dtype_mixers(model) if hasattr(model, "blocks") else []
    if not mixers:
        names = sorted({type(b.mixer).__name__ for b in getattr(model, "blocks", [])}) or ["none"]
        raise ConfigError(
            f"the model has no RetNet mixer (its mixers: {', '.join(names)}); state_dtype is a setting of RetNet's "
            "recurrent state, so there is nothing to measure"
        )
    return mixers


@contextmanager
def state_dtype(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Every RetNet mixer keeps its state in ``name`` inside the block (``decoding_check.state_dtype``, after the
    checks that name this command's options); their configs are restored on exit."""
    if name not in STATE_DTYPES:
        raise ConfigError(f"state dtype {name!r} is not one of {', '.join(STATE_DTYPES)}")
    retnet_mixers(model)
    with decoding_check.state_dtype(model, name):
        yield


def compare(name: str, logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """One row: ``logits`` against ``reference`` on the same positions (``[B, n, vocab]`` both)."""
    return {"state_dtype": name, **decoding_check.compare(logits, reference, targets)}


def reference_row(reference: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """The training form's own row, on the decoded positions: the NLL every delta is taken from."""
    value = nll(reference, targets)
    return {"state_dtype": REFERENCE, "positions": targets.numel(), "nll": value, "bits": value / math.log(2)}


def measure(
    model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor, prompt: int, dtypes: Sequence[str]
) -> list[dict[str, Any]]:
    """The reference row, then one row per state dtype; scored positions are ``prompt..T-1`` of every sequence
    (those whose logits came from a decoding step)."""
    if not 1 <= prompt < inputs.shape[1]:
        raise ConfigError(f"--prompt {prompt} must lie in 1..{inputs.shape[1] - 1} (below --length)")
    retnet_mixers(model)  # fail before the reference forward
    reference = reference_logits(model, inputs)[:, prompt:]
    scored = targets[:, prompt:]
    rows = [reference_row(reference, scored)]
    for name in dtypes:
        start = time.perf_counter()
        with state_dtype(model, name):
            logits = decode_logits(model, inputs, prompt)
        rows.append({**compare(name, logits, reference, scored), "decode_s": time.perf_counter() - start})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Outputs: Markdown table, CSV, MLflow run
# ----------------------------------------------------------------------------------------------------------------


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table, headed by what was measured where (a number means nothing without its settings)."""
    body = [[format_cell(r.get(field), fmt) for field, _, fmt in COLUMNS] for r in rows]
    return f"**state precision** {meta['summary']}\n\n" + markdown([header for _, header, _ in COLUMNS], body)


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> tuple[str, list[Path]]:
    """``state_precision.md`` and ``state_precision.csv`` under ``out``."""
    text = to_markdown(rows, meta)
    return text, write_table(out, "state_precision", text, rows)


def run_metrics(rows: list[dict[str, Any]]) -> list[mlflow.entities.Metric]:
    """A metric ``<dtype>/<quantity>`` per number of the table (``reference/nll`` is the training form's)."""
    return row_metrics(rows, METRICS, lambda r: r["state_dtype"], lambda r: 0)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _dtypes(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in STATE_DTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(STATE_DTYPES)}, got {text!r}"
        )
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.state_precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a zoo-train checkpoint, or its run directory")
    parser.add_argument("--config", type=Path, default=None, help="the run's config (default: found beside it)")
    parser.add_argument("--length", type=_positive, default=1024, help="tokens per validation sequence")
    parser.add_argument("--prompt", type=_positive, default=128, help="tokens run as one call before decoding")
    parser.add_argument("--sequences", type=_positive, default=8, help="validation sequences (decoded as one batch)")
    parser.add_argument("--dtypes", type=_dtypes, default=DEFAULT_DTYPES, help="state dtypes, comma-separated")
    parser.add_argument("--device", default="auto", help="auto (cuda if there is one), cuda, cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "state_precision", help="output folder")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own default)")
    parser.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment")
    parser.add_argument("--no-log", action="store_true", help="write files only; no MLflow run")
    args = parser.parse_args(argv)
    if args.checkpoint.is_dir():
        args.checkpoint = args.checkpoint / "checkpoints" / "last.ckpt"
    return args


def _meta(args: argparse.Namespace, model: LanguageModel, step: int, device: torch.device, seconds: float) -> dict:
    c = model.config
    mixer = c.mixer.name if hasattr(c.mixer, "name") else str(c.mixer)
    decoded = args.length - args.prompt
    summary = (
        f"of `{args.checkpoint}` (step {step}; {mixer}, d_model {c.d_model}, {c.n_layers} layers, "
        f"{model.num_parameters() / 1e6:.2f}M parameters) on {device_label(device)}, float32 weights and arithmetic. "
        f"{args.sequences} validation sequences of {args.length} tokens: the first {args.prompt} in one call, the "
        f"other {decoded} decoded one token per call (teacher forcing); {args.sequences * decoded:,} scored "
        f"positions. Reference: one whole-sequence forward (mode {getattr(c.mixer, 'mode', '?')}), same positions. "
        f"Wall time {seconds:.0f} s."
    )
    params = {
        "checkpoint": str(args.checkpoint),
        "step": step,
        "length": args.length,
        "prompt": args.prompt,
        "sequences": args.sequences,
        "dtypes": ",".join(args.dtypes),
        "mixer": mixer,
        "d_model": c.d_model,
        "n_layers": c.n_layers,
        "n_params": model.num_parameters(),
        "device_name": device_label(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return {"device": device_label(device), "summary": summary, "params": params}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        device = resolve_device(args.device)
        if not args.checkpoint.is_file():
            raise ConfigError(f"no checkpoint at {args.checkpoint}")
        cfg = OmegaConf.load(args.config or find_config(args.checkpoint))
        data = build_data(cfg, args.length)
        inputs, targets = validation_sequences(data, args.length, args.sequences)
        model, step = load_model(cfg, args.checkpoint, data.vocab_size, device)
        log(f"{args.sequences} x {args.length} tokens, prompt {args.prompt}, state dtypes {', '.join(args.dtypes)}")
        rows = measure(model, inputs.to(device), targets.to(device), args.prompt, args.dtypes)
    except ConfigError as error:
        print(f"state_precision: {error}", file=sys.stderr)
        return 2
    meta = _meta(args, model, step, device, time.perf_counter() - start)
    table, files = write_outputs(rows, meta, args.out)
    run_name = f"state precision: {args.checkpoint}"
    metrics = run_metrics(rows)
    record = partial(record_measurement, args.tracking_uri, args.experiment, run_name, table, meta, metrics, files)
    return finish(table, files, None if args.no_log else record, args.experiment)


if __name__ == "__main__":
    sys.exit(main())
