"""Does a trained model decode the function it was trained as? Any mixer, measured on the run's own tokens.

The training form runs a whole sequence at once (parallel or chunkwise); generation runs a prompt, then one token per
call from the states ``LanguageModel.allocate_states`` gives (a recurrent state, a KV cache, a convolution history).
Both must compute the same logits; a mixer whose recurrent step drifts from its parallel form generates text the
validation loss never saw. ``zoo-eval`` logs this comparison for every run, and, with ``decoding.state_dtypes``,
what keeping the state in a reduced precision costs, for every mixer with a ``state_dtype`` setting (RetNet's);
``experiments.state_precision`` prints the same comparison as a table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from arch_zoo import LanguageModel
from arch_zoo.contract import ConfigError


@torch.no_grad()
def reference_logits(model: LanguageModel, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of one whole-sequence forward per sequence (the training form; one at a time bounds the memory of a
    parallel form at long lengths)."""
    return torch.cat([model(row[None])[0].float() for row in inputs])


@torch.no_grad()
def decode_logits(model: LanguageModel, inputs: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of positions ``prompt..T-1``: the prompt in one call from the states the model allocates (in-place
    decoding, as ``generate`` does), then one token per call, each the true token at that position."""
    _, states = model(inputs[:, :prompt], model.allocate_states(*inputs.shape), return_states=True)
    out = []
    for t in range(prompt, inputs.shape[1]):
        logits, states = model(inputs[:, t : t + 1], states, return_states=True)
        out.append(logits[:, -1].float())
    return torch.stack(out, dim=1)


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood in nats (float64 accumulation: deltas of 1e-7 must survive the mean)."""
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return float(per_token.double().mean())


def compare(logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Decoded ``logits`` against the ``reference`` on the same positions (``[B, n, vocab]`` both)."""
    value, ref_value = nll(logits, targets), nll(reference, targets)
    diff = (logits.double() - reference.double()).nan_to_num(nan=math.inf)
    return {
        "positions": targets.numel(),
        "nll": value,
        "bits": value / math.log(2),
        "reference_nll": ref_value,
        "delta_nll": value - ref_value,
        "rel_delta_nll": (value - ref_value) / ref_value,
        "max_logit_diff": float(diff.abs().max()),
        "rel_logit_error": float(diff.norm() / reference.double().norm()),
        "greedy_agreement": 100.0 * float((logits.argmax(-1) == reference.argmax(-1)).double().mean()),
        "nonfinite_logits": int((~torch.isfinite(logits)).sum()),
    }


def check_prompt(prompt: int, length: int) -> None:
    if not 1 <= prompt < length:
        raise ConfigError(f"the prompt of {prompt} tokens must lie in 1..{length - 1} (below the sequence length)")


def decoding_agreement(model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor, prompt: int) -> dict:
    """Stepped decoding against the whole-sequence forward on positions ``prompt..T-1`` of every sequence: max abs
    logit difference, relative logit error, greedy (argmax) agreement in percent and the NLL of both forms."""
    check_prompt(prompt, inputs.shape[1])
    reference = reference_logits(model, inputs)[:, prompt:]
    return compare(decode_logits(model, inputs, prompt), reference, targets[:, prompt:])


def state_dtype_mixers(model: LanguageModel) -> list[torch.nn.Module]:
    """The mixers whose config has a ``state_dtype`` setting (the precision their decoding state is kept in)."""
    return [b.mixer for b in model.blocks if any(f.name == "state_dtype" for f in dataclasses.fields(b.mixer.config))]


@contextmanager
def state_dtype(model: LanguageModel, name: str) -> Iterator[None]:
    """Every mixer with a ``state_dtype`` setting keeps its state in ``name`` inside the block (the mixer's own
    config check judges the name); their configs are restored on exit."""
    mixers = state_dtype_mixers(model)
    if not mixers:
        names = sorted({type(b.mixer).__name__ for b in model.blocks})
        raise ConfigError(f"no mixer of this model ({', '.join(names)}) has a state_dtype setting to vary")
    saved = [m.config for m in mixers]
    try:
        for mixer in mixers:
            config = dataclasses.replace(mixer.config, state_dtype=name)
            config.check(model.config.d_model)
            mixer.config = config
        yield
    finally:
        for mixer, config in zip(mixers, saved):
            mixer.config = config


def reduced_state_costs(
    model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor, prompt: int, dtypes: list[str]
) -> dict[str, dict[str, Any]]:
    """Per state dtype, the stepped decoding with the state kept in it against the whole-sequence forward."""
    check_prompt(prompt, inputs.shape[1])
    reference = reference_logits(model, inputs)[:, prompt:]
    costs = {}
    for name in dtypes:
        with state_dtype(model, name):
            costs[name] = compare(decode_logits(model, inputs, prompt), reference, targets[:, prompt:])
    return costs
