"""Decoding cost (the RetNet paper's Figure 6): prefill time, per-token latency, throughput and memory, against
context length and batch size, for any registered mixers at one size.

Each cell (model, prompt length L, batch B) prefills a random prompt, then decodes greedily one token at a time from
the states the model allocates for L plus the decoded tokens (``LanguageModel.allocate_states``, the path
``generate`` takes): recurrent mixers from their O(1) state, attention from its KV cache *preallocated* and written in
place at a position held on the device (a functional cache grows by ``torch.cat``: a copy of the whole cache per
token and a new shape each step, which no CUDA graph can replay).

The decode step (model call + greedy argmax into the next input) is captured in a CUDA graph whenever that is
sound: the state must keep its structure, shapes and host values from one step to the next, and the replay must
give the eager step's logits. Otherwise the cell runs eagerly and the table says why. Latency is the median over
``steps`` timed steps after ``warmup`` ones; throughput is ``batch / latency``. Peak memory is measured separately
for the prefill and for decoding (weights + state + one step), out-of-memory cells are recorded as such.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.utils._pytree as pytree

from arch_zoo.model import LanguageModel
from experiments.bench import (
    BenchSettings,
    CellRow,
    ModelSpec,
    error_line,
    free_memory,
    is_oom,
    peak_mib,
    run_cell,
    spec_model,
    synchronize,
)
from experiments.bench.profiling import profile_step

CHECK_GRAPH_MAX_MIB = 1024.0  # graph replay is compared with the eager step when the state is this small


@torch.no_grad()
def prefill(
    model: LanguageModel, prompt: torch.Tensor, states: list[Any], chunk: int = 0
) -> tuple[torch.Tensor, list[Any]]:
    """Run the prompt through the blocks (in pieces of ``chunk`` tokens when > 0) -> last position's logits, states.

    Only the last position goes through the head: the model's own forward would return ``[B, L, vocab]`` logits
    (33 GB in bf16 at B=64, L=8k, vocab 32k), which no server computes for a prompt it is about to continue.
    """
    pieces = prompt.split(chunk, dim=1) if chunk > 0 else (prompt,)
    for piece in pieces:
        x = model.embedding(piece)
        new_states = []
        for block, state in zip(model.blocks, states):
            x, state = block(x, state, return_state=True)
            new_states.append(state)
        states = new_states
    return model.head(model.norm(x[:, -1:]))[:, 0], states


@torch.no_grad()
def decode_step(model: LanguageModel, tokens: torch.Tensor, states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
    """One greedy step: ``tokens [B, 1]`` -> logits ``[B, vocab]``; the argmax is written back into ``tokens``."""
    logits, states = model(tokens, states, return_states=True)
    logits = logits[:, -1]
    tokens.copy_(logits.argmax(-1, keepdim=True))
    return logits, states


def _tensor_leaves(states: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(states) if isinstance(leaf, torch.Tensor)]


def state_mib(states: Any) -> float:
    """Bytes of every tensor in the decoding state (a preallocated cache counts its full capacity), MiB."""
    return sum(t.numel() * t.element_size() for t in _tensor_leaves(states)) / 2**20


def structure_change(before: Any, after: Any) -> str | None:
    """Why a graph of the step ``before -> after`` could not be replayed, or None when it can.

    A replay reuses the captured buffers and host values: the state must keep its tree, the shape and dtype of every
    tensor, and every non-tensor value (a length held as a Python int would be frozen at its captured value).
    """
    paths_before, spec_before = pytree.tree_flatten_with_path(before)
    paths_after, spec_after = pytree.tree_flatten_with_path(after)
    if spec_before != spec_after:
        return "the state changes its structure between steps"
    for (path, a), (_, b) in zip(paths_before, paths_after):
        where = pytree.keystr(path)
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"state{where} changes type between steps"
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                return f"the state grows: state{where} {tuple(a.shape)} -> {tuple(b.shape)}"
        elif a is not b and a != b:
            return f"state{where} is a host value that changes every step ({a!r} -> {b!r})"
    return None


def _copy_into(static: Any, new: Any) -> None:
    for dst, src in zip(_tensor_leaves(static), _tensor_leaves(new)):
        if dst is not src:
            dst.copy_(src)


CHECKED_NOTE = "graph (checked against eager)"  # a step whose replay was compared (run_decode: once per model)


@dataclass
class Stepper:
    """The decode step of one cell: ``run()`` advances ``states`` by one token, replaying a graph when captured."""

    model: LanguageModel
    tokens: torch.Tensor
    states: list[Any]
    graph: torch.cuda.CUDAGraph | None = None
    note: str = "eager"
    logits: torch.Tensor | None = None  # the captured step's output buffer
    runner: Callable[..., Any] | None = None  # what a step calls (a compiled model); ``model`` when None

    @property
    def step_model(self) -> Callable[..., Any]:
        return self.runner if self.runner is not None else self.model

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            _, new = decode_step(self.step_model, self.tokens, self.states)
            self.states = new

    def try_capture(self, warmup: int = 3) -> None:
        """Capture the step in a CUDA graph if the state allows it (see :func:`structure_change`)."""
        _, after = decode_step(self.step_model, self.tokens, self.states)
        reason = structure_change(self.states, after)
        self.states = after
        if reason is not None:
            self.note = f"eager: {reason}"
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # graph warmup belongs on a side stream
            for _ in range(warmup):
                _, new = decode_step(self.step_model, self.tokens, self.states)
                _copy_into(self.states, new)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits, new = decode_step(self.step_model, self.tokens, self.states)
                _copy_into(self.states, new)
        except RuntimeError as error:
            if is_oom(error):
                raise
            self.note = f"eager: capture failed ({error_line(error, 120)})"
            return
        self.graph = graph
        self.note = "graph"

    def check_capture(self) -> None:
        """Replay once and compare with the same step run uncaptured from the same state; drop the graph if they
        differ. Against the same step, not the eager model: a compiled step rounds differently in half precision
        (one bf16 RetNet of 24 layers: 0.125 of logits up to about 5), which says nothing about the capture; the
        compiled step's agreement with the eager one is tested in float32."""
        saved = [t.clone() for t in _tensor_leaves(self.states)]
        saved_tokens = self.tokens.clone()
        self.graph.replay()
        replayed = self.logits.float().clone()
        for dst, src in zip(_tensor_leaves(self.states), saved):
            dst.copy_(src)
        self.tokens.copy_(saved_tokens)
        uncaptured, new = decode_step(self.step_model, self.tokens, self.states)
        _copy_into(self.states, new)
        uncaptured = uncaptured.float()
        error = (replayed - uncaptured).abs().max().item()
        scale = uncaptured.abs().max().item()
        if not error <= 1e-2 * max(scale, 1.0):
            self.graph = None
            self.note = f"eager: graph replay differs from the eager step (max error {error:.3g})"
        else:
            self.note = CHECKED_NOTE


def time_steps(fn: Callable[[], None], n: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``n`` calls: CUDA events on a GPU (the device's timeline), wall clock on the CPU."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@dataclass
class DecodeRow(CellRow):
    """One cell (model, prompt length, batch)."""

    prefill_ms: float | None = None
    latency_ms: float | None = None
    tokens_per_s: float | None = None
    peak_mib: float | None = None  # decoding: weights + state + one step
    prefill_peak_mib: float | None = None
    state_mib: float | None = None
    graph: str = ""
    n_params: int = 0
    busy_pct: float | None = None  # --profile on a GPU: kernel time / wall time of a profiled step


@dataclass(kw_only=True)
class DecodeSettings(BenchSettings):
    """``compile``: torch.compile the decode step, which fuses the mixers' small elementwise kernels."""

    batches: list[int]
    prefill_chunk: int = 0
    graphs: bool = True


def _cell(
    model: LanguageModel,
    row: DecodeRow,
    settings: DecodeSettings,
    device: torch.device,
    check_graph: bool,
    runner: Callable[..., Any] | None = None,
) -> None:
    """Fill ``row`` in place (so that an OOM keeps what was measured before it); ``runner`` (a compiled model) makes
    the decode steps, the prefill stays eager."""
    L, B = row.length, row.batch
    row.status = "OOM (prefill)"  # until the prefill is through: the cache's allocation can be what fails
    extra = settings.warmup + settings.steps + 8  # eager probe, graph warmup and check steps write into the cache
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    prompt = torch.randint(settings.vocab_size, (B, L), device=device, generator=generator)
    states = model.allocate_states(B, L + extra)
    free_memory(device)  # resets the peak: the prefill peak counts weights, the empty cache and the prompt's pass
    synchronize(device)
    t0 = time.perf_counter()
    logits, states = prefill(model, prompt, states, settings.prefill_chunk)
    synchronize(device)
    row.prefill_ms = (time.perf_counter() - t0) * 1e3
    row.prefill_peak_mib = peak_mib(device)
    tokens = logits.argmax(-1, keepdim=True)
    del logits, prompt
    row.state_mib = state_mib(states)

    row.status = "OOM (decode)"
    free_memory(device)
    stepper = Stepper(model, tokens, states, runner=runner)
    if device.type == "cuda" and settings.graphs:
        stepper.try_capture()
        if stepper.graph is not None and check_graph and row.state_mib <= CHECK_GRAPH_MAX_MIB:
            stepper.check_capture()
    elif device.type == "cuda":
        stepper.note = "eager: graphs off (--no-graphs)"
    else:
        stepper.note = "eager: CUDA graphs need a GPU"
    time_steps(stepper.run, settings.warmup, device)
    times = time_steps(stepper.run, settings.steps, device)
    row.latency_ms = statistics.median(times)
    row.tokens_per_s = B / (row.latency_ms / 1e3)
    row.peak_mib = peak_mib(device)
    row.graph = stepper.note + (", compiled" if runner is not None else "")
    if settings.profile_dir is not None:
        path = settings.profile_dir / f"profile_{row.model}_T{L}_B{B}.txt"
        row.busy_pct = profile_step(
            stepper.run, device, path, f"one decoding step ({row.graph})", row.latency_ms
        ).busy_pct
    row.status = "ok"


def run_decode(
    specs: list[ModelSpec],
    settings: DecodeSettings,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
) -> list[DecodeRow]:
    """Every (model, length, batch) cell, models one after the other (only one set of weights on the device)."""
    rows = []
    for spec in specs:
        model = spec_model(spec, settings, device, dtype).eval()
        n_params = model.num_parameters()
        runner = torch.compile(model) if settings.compile else None
        # a throwaway cell first: kernel selection, cuBLAS handles and the allocator's first growth
        warm = replace(settings, steps=2, warmup=1)
        try:
            _cell(model, DecodeRow(spec.name, min(settings.lengths), 1), warm, device, False, runner)
        except Exception as error:  # the same failure shows again, and is recorded, in the first cell
            log(f"{spec.name}: warm-up cell failed: {type(error).__name__}")
        free_memory(device)
        checked = False  # graph replay compared with eager once per model, in its first small cell
        for L in settings.lengths:
            for B in settings.batches:
                row = DecodeRow(spec.name, L, B, n_params=n_params)
                run_cell(row, partial(_cell, model, row, settings, device, not checked, runner), device)
                checked = checked or row.graph.startswith(CHECKED_NOTE)  # ", compiled" may follow
                rows.append(row)
                log(_progress(row))
        del model
        free_memory(device)
    return rows


def _progress(row: DecodeRow) -> str:
    if row.status != "ok":
        return f"{row.model:>14} L={row.length:<6} B={row.batch:<4} {row.status}"
    return (
        f"{row.model:>14} L={row.length:<6} B={row.batch:<4} prefill {row.prefill_ms:9.1f} ms  "
        f"decode {row.latency_ms:8.3f} ms/token  {row.tokens_per_s:10.1f} tok/s  [{row.graph}]"
    )
