"""Cost benchmarks: what a registered mixer costs to decode (the RetNet paper's Figure 6) and to train (Table 4).

``decode`` and ``train`` measure, ``report`` turns the rows into a Markdown table, Figure-6-style PNGs and an MLflow
run, and ``cli`` is the ``zoo-bench`` command. Models are built from the registry with random weights: cost does
not depend on the values. What both benchmarks share lives here: device, dtype, a model from a mixer name plus
overrides composed into zoo-train's config tree, the common settings and leading row columns, and one cell's run
with its out-of-memory handling.
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException

from arch_zoo.errors import ConfigError
from arch_zoo.model import LanguageModel, ModelConfig
from arch_zoo.registry import get_mixer
from experiments import compose

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class ModelSpec:
    """One benchmarked model: a registered mixer, changes to its config and its FFN's, and any other override of
    the model's part of zoo-train's config tree; built by composing that tree (:func:`model_config`).

    ``name`` labels the model in tables and overrides; ``mixer_name`` is the registered mixer (the same unless the
    model was listed as ``label=mixer``, which lets variants of one mixer run side by side). ``mixer`` and ``ffn``
    are the shorthand ``--set LABEL.FIELD=VALUE`` / ``--set LABEL.ffn.FIELD=VALUE``; ``overrides`` take Hydra's
    grammar as written (``--set LABEL:model.norm=rmsnorm``).
    """

    name: str
    mixer: dict[str, Any] = field(default_factory=dict)
    ffn: dict[str, Any] = field(default_factory=dict)
    mixer_name: str = ""
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mixer_name = self.mixer_name or self.name

    def hydra_overrides(self, d_model: int, n_layers: int, vocab_size: int) -> list[str]:
        """This model as overrides of zoo-train's config tree."""
        shape = [f"model.d_model={d_model}", f"model.n_layers={n_layers}", f"model.vocab_size={vocab_size}"]
        fields = [f"model.mixer.{k}={_text(v)}" for k, v in self.mixer.items()]
        fields += [f"model.ffn.{k}={_text(v)}" for k, v in self.ffn.items()]
        return [f"model/mixer={self.mixer_name}", *shape, *fields, *self.overrides]


def _value(text: str) -> Any:
    """``"256"`` -> 256, ``"true"`` -> True, ``"chunkwise"`` -> "chunkwise": override values as typed as Hydra's."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _text(value: Any) -> str:
    """A shorthand value back in Hydra's grammar."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value) if isinstance(value, str) else repr(value)


def parse_models(names: str, overrides: list[str] | None, mode: str | None = None) -> list[ModelSpec]:
    """``"retnet,transformer"`` and ``["retnet.head_dim=256", "transformer.ffn.mult=4"]`` -> specs.

    An entry ``label=mixer`` (``"retnet,retnet-f16=retnet"``) adds a model of a registered mixer under its own
    label, which its overrides then name (``retnet-f16.state_dtype=float16``). ``LABEL:OVERRIDE`` hands any Hydra
    override of the model's tree to that model (``retnet:model.norm=rmsnorm``).

    ``mode`` (e.g. ``chunkwise``) is given to every mixer whose config has a ``mode`` field and accepts it, unless an
    override sets it: the benchmarks need the memory-bounded form of a long prompt, whatever a config defaults to.
    """
    specs: dict[str, ModelSpec] = {}
    for entry in (n.strip() for n in names.split(",")):
        if not entry:
            continue
        label, _, mixer_name = entry.rpartition("=")
        label, mixer_name = label.strip() or mixer_name.strip(), mixer_name.strip()
        if label in specs:
            raise ConfigError(f"--models lists {label!r} twice; give a variant its own label: LABEL={mixer_name}")
        specs[label] = ModelSpec(label, mixer_name=mixer_name)
    if not specs:
        raise ConfigError("--models names no mixer")
    for item in overrides or []:
        label, colon, hydra_override = item.partition(":")
        if colon and label == "*":
            for spec in specs.values():
                spec.overrides.append(hydra_override)
            continue
        if colon and label in specs and "=" not in label:
            specs[label].overrides.append(hydra_override)
            continue
        key, sep, text = item.partition("=")
        name, dot, path = key.partition(".")
        if not sep or not dot or name not in specs:
            raise ConfigError(
                f"override {item!r}: write MODEL.FIELD=VALUE, MODEL.ffn.FIELD=VALUE, MODEL:HYDRA_OVERRIDE or "
                "*:HYDRA_OVERRIDE (every model), MODEL in --models"
            )
        if path.startswith("ffn."):
            specs[name].ffn[path.removeprefix("ffn.")] = _value(text)
        else:
            specs[name].mixer[path] = _value(text)
    for spec in specs.values():
        fields = {f.name for f in dataclasses.fields(get_mixer(spec.mixer_name).config_class)}
        if mode and "mode" in fields and "mode" not in spec.mixer:
            spec.mixer["mode"] = mode
    return list(specs.values())


def model_config(spec: ModelSpec, d_model: int, n_layers: int, vocab_size: int) -> ModelConfig:
    """The model's typed config, composed from zoo-train's tree with the spec's overrides (a field its schema lacks
    fails here, naming the model)."""
    overrides = spec.hydra_overrides(d_model, n_layers, vocab_size)
    try:
        config = compose.model_config(compose.compose_train(overrides), vocab_size)
    except HydraException as error:
        raise ConfigError(
            f"model {spec.name!r}: {error} (a mixer or FFN with no field of that name, or a value of the wrong type; "
            f"its overrides: {' '.join(overrides)})"
        ) from None
    if "mode" in spec.mixer:
        try:
            config.mixer.check(d_model)
        except ConfigError:  # the mode came from --mode and this mixer has no such form: keep its default
            defaults = get_mixer(spec.mixer_name).config_class()
            config = dataclasses.replace(config, mixer=dataclasses.replace(config.mixer, mode=defaults.mode))
    return config


def build_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> LanguageModel:
    """Random weights, allocated and initialised on ``device`` (a 1B model's initialisation on the CPU takes long)."""
    with torch.device(device):
        model = LanguageModel(config)
    return model.to(dtype=dtype)


@dataclass
class BenchSettings:
    """What both benchmarks take (``decode`` and ``train`` add their own fields, by keyword): the models' shape, the
    context lengths, the timed and untimed steps, the seed of weights and inputs, and the optional extras."""

    d_model: int
    n_layers: int
    vocab_size: int
    lengths: list[int]
    steps: int
    warmup: int
    seed: int = 0
    compile: bool = False  # torch.compile what is timed (each benchmark says what that is)
    profile_dir: Path | None = None  # profile one more step per cell and write where its time went here


@dataclass
class CellRow:
    """The leading columns of every benchmark row: which cell it is, and how it ended (``status``; numbers are None
    where the cell did not get that far)."""

    model: str
    length: int
    batch: int
    status: str = "ok"
    shared_gpu: int | None = None  # other processes seen holding the GPU while the cell ran (None: not visible)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def spec_model(spec: ModelSpec, settings: BenchSettings, device: torch.device, dtype: torch.dtype) -> LanguageModel:
    """The model ``spec`` names at the settings' shape, random weights on ``device``: each benchmark's model."""
    return build_model(model_config(spec, settings.d_model, settings.n_layers, settings.vocab_size), device, dtype)


def run_cell(row: CellRow, measure: Callable[[], None], device: torch.device) -> None:
    """Measure one cell into ``row``; a failure becomes the row's status instead of losing the other cells (an OOM
    keeps the status the measurement set: where it ran out), and the memory is freed for the next cell. Other
    processes holding the GPU before or after the measurement are counted into ``row.shared_gpu``."""
    before = other_gpu_processes(device)
    try:
        measure()
    except Exception as error:  # one failed cell must not lose the others
        if not is_oom(error):
            row.status = f"error: {error_line(error)}"
    seen = [n for n in (before, other_gpu_processes(device)) if n is not None]
    row.shared_gpu = max(seen) if seen else None
    if row.shared_gpu:
        print(
            f"warning: {row.shared_gpu} other process(es) held the GPU while {row.model} at length {row.length} ran: "
            "its timing includes that sharing",
            file=sys.stderr,
        )
    free_memory(device)


def other_gpu_processes(device: torch.device) -> int | None:
    """How many processes other than this one hold a context on ``device``'s GPU; None where that cannot be seen (a
    CPU, no ``nvidia-smi``, or a container that shows no process at all, not even this one).

    Why: a benchmark that shares its GPU measures the sharing, and nothing in its numbers says so (a test suite
    compiling beside ``zoo-bench train`` made one table's Transformer step 446 ms and the next table's 253 ms)."""
    if device.type != "cuda":
        return None
    return count_other_processes(compute_apps(), smi_gpu_id(device) or "", torch.cuda.is_initialized())


def smi_gpu_id(device: torch.device) -> str | None:
    """The id ``nvidia-smi`` knows ``device`` by: its UUID (indices differ under ``CUDA_VISIBLE_DEVICES``); None
    off CUDA or where the driver gives none."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
    if not uuid:
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def compute_apps() -> list[str] | None:
    """``nvidia-smi``'s list of processes holding a GPU context, one ``gpu_uuid, pid`` line each (None: no tool)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run(
            [tool, "--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line for line in out.splitlines() if line.strip()]


def count_other_processes(apps: list[str] | None, gpu_uuid: str, ours: bool) -> int | None:
    """The processes of ``apps`` on the GPU ``gpu_uuid`` (all GPUs when unknown) less this one when it holds a context.

    Counted, not matched by PID: inside a container ``nvidia-smi`` may list the host's PIDs, so this process is the
    one context it holds, not a number it knows."""
    if apps is None:
        return None
    mine = [a for a in apps if not gpu_uuid or gpu_uuid.removeprefix("GPU-") in a.split(",")[0]]
    if ours and not mine:
        return None  # not even this process is listed: processes are hidden from here
    return max(0, len(mine) - int(ours))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU (what is deployed), fp32 on the CPU (where bf16 matmuls are slow and unlike a GPU's)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def device_label(device: torch.device) -> str:
    """The machine, named honestly in every table: the GPU's name, or the CPU's and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device: torch.device) -> None:
    """Drop what an out-of-memory cell left behind so the next cell starts from the same baseline."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset, MiB; None on the CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def error_line(error: BaseException, width: int = 160) -> str:
    """``"Type: first line of the message"`` for a table cell; a bare ``Type`` when the message is empty."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:width]}" if lines else type(error).__name__
