"""``zoo-generate``: text from a trained run, streamed as it is decoded through the mixers' states.

    zoo-generate checkpoint=outputs/2026-12-06/10-00-00 'prompt="def main("' max_new_tokens=200
    zoo-generate run_id=<MLflow run id> 'prompt="import os"' temperature=0.8 top_p=0.95 seed=1

The model, its tokeniser and its data are rebuilt from the run's saved config (``experiments.trained_run``); the
prompt is run as one call and every further token is one step from the mixers' states (O(1) per token for RetNet).
The text goes to stdout as it comes; the decoding speed goes to stderr at the end.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from arch_zoo.errors import ConfigError
from experiments.bench import resolve_device
from experiments.compose import run_typed
from experiments.trained_run import load_text_model, resolve_checkpoint


@dataclass
class GenerateConfig:
    """What to decode, from which run. ``checkpoint`` (a ``last.ckpt`` or the run directory) or ``run_id``."""

    prompt: str = ""
    checkpoint: str | None = None
    run_id: str | None = None
    tracking_uri: str | None = None  # where run_id is looked up (default: MLflow's own default)
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    device: str = "auto"  # auto (cuda if there is one), cuda, cpu

    def check(self) -> None:
        if not self.prompt:
            raise ConfigError("prompt= is empty; give the text to continue, e.g. 'prompt=\"def main(\"'")
        if self.max_new_tokens < 1 or self.temperature < 0:
            raise ConfigError("max_new_tokens must be >= 1 and temperature >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be >= 1 (or null: no limit)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must lie in (0, 1] (or null: no limit)")


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def encode_prompt(tokenizer, prompt: str, vocab_size: int) -> list[int]:
    """The prompt's token ids; a prompt the run's tokeniser cannot encode exactly is refused, not garbled."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(
            f"the prompt is not valid Unicode text ({err.reason} at {err.start}); fix the prompt"
        ) from None
    (ids,) = tokenizer.encode_batch([prompt])
    ids = [int(i) for i in ids]
    if not ids or max(ids) >= vocab_size:
        raise ConfigError(f"the prompt encodes to ids outside the model's vocabulary of {vocab_size}")
    if tokenizer.decode(ids) != prompt:
        raise ConfigError(f"the run's tokeniser ({tokenizer.identity}) cannot encode the prompt exactly")
    return ids


def run(cfg: GenerateConfig, out=sys.stdout) -> dict[str, float]:
    """Decode and stream; returns the measured speed."""
    cfg.check()
    device = resolve_device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.run_id, cfg.tracking_uri)
    model, tokenizer, vocab_size, _ = load_text_model(checkpoint, device)
    prompt = torch.tensor([encode_prompt(tokenizer, cfg.prompt, vocab_size)], device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out.write(cfg.prompt)
    ids: list[int] = []
    shown = ""
    start = time.perf_counter()
    stream = model.stream(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator)
    for token in stream:
        ids.append(int(token))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete waits for its next byte
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    seconds = time.perf_counter() - start
    out.write(tokenizer.decode(ids)[len(shown) :] + "\n")
    speed = {"tokens": len(ids), "seconds": seconds, "tokens_per_s": len(ids) / seconds}
    print(
        f"[{len(ids)} tokens in {seconds:.2f} s: {speed['tokens_per_s']:.1f} tokens/s on {device}, "
        f"prompt {prompt.shape[1]} tokens]",
        file=sys.stderr,
    )
    return speed


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    run_typed("zoo-generate", run, cfg)


if __name__ == "__main__":
    main()
