"""A trained arch-zoo model as an lm-evaluation-harness model, for any registered mixer.

lm-eval 0.4 finds third-party models through its registry (``register_model``); it has no plugin entry point for
them, so importing this module registers ``arch_zoo``. ``zoo-eval`` passes an instance to ``lm_eval.simple_evaluate``;
from Python, ``simple_evaluate(model="arch_zoo", model_args={"checkpoint": RUN_DIR}, ...)`` works once this module is
imported.

Scoring (``loglikelihood``, ``loglikelihood_rolling``) runs whole sequences through the training form, longest
first in batches padded on the right (causal mixers never see the padding of a row). Generation (``generate_until``)
decodes through the mixers' states with ``LanguageModel.stream``: O(1) per token for recurrent mixers. Prompts of equal
token length share a batch; a state must not absorb left padding, so unequal prompts are never mixed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from arch_zoo import LanguageModel

DEFAULT_MAX_LENGTH = 2048  # context kept for mixers defined on any length; lm-eval truncates prompts to it
DEFAULT_MAX_GEN_TOKS = 256


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@register_model("arch_zoo")
class ArchZooLM(LM):
    """``model`` (eval mode) with the run's tokeniser; the end-of-document token stands before an empty context."""

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.max_length or DEFAULT_MAX_LENGTH)
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "auto", **kwargs: Any) -> ArchZooLM:
        """A ``zoo-train`` run's model and tokeniser (``checkpoint``: its ``last.ckpt`` or run directory)."""
        from experiments.bench import resolve_device
        from experiments.trained_run import load_text_model, resolve_checkpoint

        path = resolve_checkpoint(str(checkpoint), None)
        model, tokenizer, _, _ = load_text_model(path, resolve_device(device))
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> ArchZooLM:
        """lm-eval's ``model_args`` (``checkpoint=...,batch_size=...``): the model comes from a checkpoint."""
        args = {**{k: v for k, v in (additional_config or {}).items() if v is not None}, **arg_dict}
        args.pop("max_batch_size", None)
        return cls.from_checkpoint(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ArchZooLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    def encode(self, text: str) -> list[int]:
        (ids,) = self.tokenizer.encode_batch([text])
        return [int(i) for i in ids]

    # -- scoring ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), whether greedy decoding gives the continuation)`` per
        ``(context, continuation)`` of token ids; the context is cut from the left to fit ``max_length``."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for batch in chunks(order, self.batch_size):
            rows = []
            for i in batch:
                context, continuation = pairs[i]
                if not continuation:
                    raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
                tokens = (list(context) + list(continuation))[-(self.max_length + 1) :]
                rows.append((tokens[:-1], tokens[-len(continuation) :]))
            width = max(len(inputs) for inputs, _ in rows)
            padded = torch.zeros(len(rows), width, dtype=torch.long)
            for r, (inputs, _) in enumerate(rows):
                padded[r, : len(inputs)] = torch.tensor(inputs)
            logprobs = self.model(padded.to(self._device))[0].float().log_softmax(-1)
            for r, (i, (inputs, targets)) in enumerate(zip(batch, rows)):
                scored = logprobs[r, len(inputs) - len(targets) : len(inputs)]
                target = torch.tensor(targets, device=scored.device)
                total = float(scored.gather(-1, target[:, None]).sum())
                results[i] = (total, bool((scored.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append((self.encode(context) if context else [self.eot_token_id], self.encode(continuation)))
        return self.score_tokens(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Every token of each text predicted exactly once, in windows of ``max_length`` with the most context."""
        windows, owner = [], []
        for n, request in enumerate(requests):
            tokens = self.encode(request.args[0])
            for window in get_rolling_token_windows(tokens, self.eot_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (value, _) in zip(owner, self.score_tokens(windows)):
            totals[n] += value
        return totals

    # -- generation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        prompts = []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            prompt = self.encode(context) if context else [self.eot_token_id]
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = prompt[-max(1, self.max_length - limit) :]
            prompts.append(prompt)
            groups.setdefault((len(prompt), repr(sorted(kwargs.items()))), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1] or {})
            for batch in chunks(indices, self.batch_size):
                texts = self._generate([prompts[i] for i in batch], kwargs)
                for i, text in zip(batch, texts):
                    results[i] = text
        return results  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], kwargs: dict[str, Any]) -> list[str]:
        """Equal-length prompts decoded together until every row has met a stop string or the token limit."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
        generator = torch.Generator(device=self._device).manual_seed(int(kwargs.get("seed", 0)))
        prompt = torch.tensor(prompts, device=self._device)
        ids: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for token in self.model.stream(prompt, limit, temperature, None, None, generator):
            for r, value in enumerate(token[:, 0].tolist()):
                if done[r]:
                    continue
                if value == self.eot_token_id:
                    done[r] = True
                    continue
                ids[r].append(value)
                done[r] = any(stop in self.tokenizer.decode(ids[r]) for stop in until)
            if all(done):
                break
        texts = []
        for row in ids:
            text = self.tokenizer.decode(row)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts
