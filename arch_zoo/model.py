"""A language model assembled from registered token mixers.

embedding -> N x [x + mixer(norm(x)), x + ffn(norm(x))] -> norm -> head. The mixer of each layer comes from the
registry (so plugins work everywhere); a hybrid model replaces the mixer of chosen layers with another one.
``step``/``generate`` decode through the mixers' states, so recurrent mixers decode in O(1) per token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo.contract import MixerConfig, checked_configs, counts_towards_size
from arch_zoo.errors import ConfigError
from arch_zoo.flops import linear_flops
from arch_zoo.layers import FFNConfig, build_ffn, make_norm
from arch_zoo.registry import make_config, mixer_class


@dataclass
class ModelConfig:
    """Shape of the network. ``mixer`` is a mixer name, a dict with a ``name`` field, or a config instance."""

    vocab_size: int | None = 256  # None: set from the data's tokeniser by the training entry point
    d_model: int = 256
    n_layers: int = 4
    mixer: Any = "retnet"
    ffn: FFNConfig = field(default_factory=FFNConfig)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # hybrid models: these layers (0-based) use ``hybrid_mixer`` instead of ``mixer``; ``hybrid_every=k`` adds
    # every k-th layer (k-1, 2k-1, ...), so ``hybrid_every=2`` alternates.
    hybrid_mixer: Any = None
    hybrid_layers: list[int] = field(default_factory=list)
    hybrid_every: int = 0
    # equal-size comparisons (the paper's Table 5): choose the FFN width so that the counted parameters (see
    # counted_parameters) come as close as possible to a budget, whatever the mixer costs. The budget is either
    # budget_per_layer * d_model^2 * n_layers (the paper's rule: 12, RetNet's 8 d^2 mixer plus a 4 d^2 FFN), which
    # follows the model's shape, or a literal target_params; not both.
    budget_per_layer: float | None = None
    target_params: int | None = None
    # the matched FFN width rounded to a multiple of this. 1 (the published tables): the width nearest the budget,
    # e.g. 2046 for RetNet at Table 5's shape, whose bf16 rows (4092 bytes) are not 16-byte aligned, so some of the
    # FFN's products run on slow cuBLAS kernels or are padded on every call (docs/results/mfu.md, session 22).
    # 64: 2048, the paper's 2d, at 0.03% more counted parameters
    ffn_multiple_of: int = 1

    def size_budget(self) -> int | None:
        """The equal-size budget in counted parameters, or None when the FFN width is not matched."""
        if self.budget_per_layer is not None:
            return round(self.budget_per_layer * self.d_model**2 * self.n_layers)
        return self.target_params

    def hybrid_layer_set(self) -> set[int]:
        layers = set(self.hybrid_layers)
        if self.hybrid_every > 0:
            layers |= set(range(self.hybrid_every - 1, self.n_layers, self.hybrid_every))
        return layers

    def check(self) -> tuple[MixerConfig, MixerConfig | None]:
        """Fail early, with the fix in the message, before any weight is allocated. Returns the mixer configs as the
        layers get them (typed, placed at this depth), each checked once: the model builds its layers from these."""
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is not set; set it, or let the training entry point take the data's")
        if self.d_model <= 0 or self.n_layers <= 0 or self.vocab_size <= 0:
            raise ConfigError("model.d_model, model.n_layers and model.vocab_size must be positive")
        if self.budget_per_layer is not None and self.target_params is not None:
            raise ConfigError(
                "model.budget_per_layer and model.target_params both set the equal-size budget; set one "
                "(e.g. model.target_params=null)"
            )
        if self.ffn_multiple_of < 1:
            raise ConfigError(f"model.ffn_multiple_of must be 1 or more (1: no rounding), not {self.ffn_multiple_of}")
        mixer = make_config(self.mixer).for_depth(self.n_layers)
        mixer.check(self.d_model)
        hybrid_mixer = None if self.hybrid_mixer is None else make_config(self.hybrid_mixer).for_depth(self.n_layers)
        hybrid = self.hybrid_layer_set()
        if hybrid:
            if hybrid_mixer is None:
                raise ConfigError("model.hybrid_layers/hybrid_every is set but model.hybrid_mixer is not")
            bad = sorted(i for i in hybrid if not 0 <= i < self.n_layers)
            if bad:
                raise ConfigError(f"model.hybrid_layers {bad} are outside 0..{self.n_layers - 1}")
            hybrid_mixer.check(self.d_model)
        return mixer, hybrid_mixer


def counted_parameters(module: nn.Module | None) -> int:
    """Parameters that count towards a model's size in equal-size comparisons, for every mixer and FFN alike:
    trainable, and not a positional table (:func:`arch_zoo.contract.exclude_from_size`). A tied weight counts once."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if counts_towards_size(p))


def matched_ffn(config: ModelConfig, mixers: list[nn.Module]) -> FFNConfig:
    """The FFN config whose width (a multiple of ``model.ffn_multiple_of``) brings the counted parameters of the blocks
    and final norm nearest the budget (:meth:`ModelConfig.size_budget`).

    An FFN's size is affine in its width, so two probe builds give the slope and intercept."""
    target = config.size_budget()
    if target is None or config.ffn.kind == "none":
        return config.ffn
    d, L = config.d_model, config.n_layers
    with torch.device("meta"):
        f1 = counted_parameters(build_ffn(dataclasses.replace(config.ffn, hidden_size=1), d))
        f2 = counted_parameters(build_ffn(dataclasses.replace(config.ffn, hidden_size=2), d))
        norms = counted_parameters(make_norm(config.norm, d, config.norm_eps))
    slope, intercept = f2 - f1, f1 - (f2 - f1)
    fixed = sum(counted_parameters(m) for m in mixers) + L * (2 * norms + intercept) + norms
    width = (target - fixed) / (L * slope)
    if round(width) < 1:
        raise ConfigError(
            f"the size budget {target:,} (model.budget_per_layer or model.target_params) is below what the "
            f"mixers alone need ({fixed:,}); raise it or shrink d_model / n_layers"
        )
    step = config.ffn_multiple_of
    return dataclasses.replace(config.ffn, hidden_size=max(step, step * round(width / step)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, mixer: nn.Module, layer_idx: int) -> None:
        super().__init__()
        self.mixer_norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.mixer = mixer
        self.ffn = build_ffn(config.ffn, config.d_model, layer_idx)
        self.ffn_norm = make_norm(config.norm, config.d_model, config.norm_eps) if self.ffn is not None else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = False) -> tuple[torch.Tensor, Any]:
        mixer_state, ffn_state = state if state is not None else (None, None)
        y, mixer_state = self.mixer(self.mixer_norm(x), mixer_state, return_state=return_state)
        x = x + self.dropout(y)
        if self.ffn is not None:
            y, ffn_state = self.ffn(self.ffn_norm(x), ffn_state, return_state=return_state)
            x = x + self.dropout(y)
        return x, (mixer_state, ffn_state) if return_state else None


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token ``[B, 1]`` from the last position's ``logits [B, vocab]``: the argmax at temperature 0, else a
    draw from the softmax at ``temperature``, restricted to the ``top_k`` most likely tokens and to the smallest set
    whose probability reaches ``top_p`` (nucleus sampling; the most likely token always stays)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= top_p  # the more likely tokens already hold top_p
        logits = logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in float32 (``logits [B, T, V]``, ``targets [B, T]``; -100 is ignored)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


class LanguageModel(nn.Module):
    """``layer_mixers``: what ``config.check()`` returned, when the caller checked the config already (zoo-train does,
    before the data loads); the model then builds from them without checking again. Otherwise it checks ``config``."""

    def __init__(self, config: ModelConfig, layer_mixers: tuple[MixerConfig, MixerConfig | None] | None = None) -> None:
        super().__init__()
        mixer, hybrid_mixer = config.check() if layer_mixers is None else layer_mixers  # each checked once
        hybrid = config.hybrid_layer_set()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        layer_configs = [hybrid_mixer if i in hybrid else mixer for i in range(config.n_layers)]
        with checked_configs(mixer, hybrid_mixer):  # so no layer checks its config again
            mixers = [mixer_class(c.name)(config.d_model, c, i) for i, c in enumerate(layer_configs)]
        ffn = dataclasses.replace(config.ffn, n_layers=config.n_layers)
        config = dataclasses.replace(config, mixer=mixer, hybrid_mixer=hybrid_mixer, ffn=ffn)
        config = dataclasses.replace(config, ffn=matched_ffn(config, mixers))
        self.config = config
        self.blocks = nn.ModuleList(Block(config, mixer, i) for i, mixer in enumerate(mixers))
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        # Mixers initialise themselves (their papers differ); the model owns embedding, FFNs and head.
        std = self.config.init_std
        nn.init.normal_(self.embedding.weight, std=std)
        nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            if block.ffn is None:
                continue
            for name, module in block.ffn.named_modules():
                if isinstance(module, nn.Linear) and getattr(module, "_keep_init", False) is False:
                    # output projections scaled down with depth (GPT-2 style) keep the residual stream stable
                    scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith("fc2") else 1.0
                    nn.init.normal_(module.weight, std=std * scale)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def forward(
        self, tokens: torch.Tensor, states: list[Any] | None = None, return_states: bool = False
    ) -> tuple[torch.Tensor, list[Any] | None]:
        """``tokens: [B, T]`` -> logits ``[B, T, vocab]``; with ``states`` it continues those sequences."""
        x = self.embedding(tokens)
        new_states: list[Any] = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, states[i] if states is not None else None, return_state=return_states)
            new_states.append(s)
        return self.head(self.norm(x)), (new_states if return_states else None)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, _ = self(tokens)
        return self._cross_entropy(logits, targets)

    _cross_entropy = staticmethod(token_cross_entropy)  # compile_model puts a compiled one on the instance

    @torch.no_grad()
    def stream(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the tokens ``[B, 1]`` that follow ``prompt: [B, T]``, one per step, decoding through the mixers'
        states (allocated for the whole length: a recurrent mixer steps in O(1), attention writes its cache in
        place). Sampling as :func:`sample_next`."""
        states = self.allocate_states(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits, states = self(prompt, states, return_states=True)
        for i in range(max_new_tokens):
            token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            yield token
            if i + 1 < max_new_tokens:
                logits, states = self(token, states, return_states=True)

    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``prompt`` and ``max_new_tokens`` decoded tokens after it, ``[B, T + max_new_tokens]`` (see :meth:`stream`;
        greedy at temperature 0)."""
        tokens = self.stream(prompt, max_new_tokens, temperature, top_k, top_p, generator)
        return torch.cat([prompt, *tokens], dim=1)

    def allocate_states(self, batch: int, capacity: int) -> list[Any]:
        """Every block's decoding state for ``batch`` sequences of up to ``capacity`` tokens, owned by the caller
        (see :meth:`TokenMixer.allocate_state`): start the prompt from it, and the steps after it may update it in
        place (a preallocated KV cache for attention, fixed buffers for a CUDA graph)."""
        param = next(self.parameters())
        return [(block.mixer.allocate_state(batch, capacity, param.device, param.dtype), None) for block in self.blocks]

    def num_parameters(self, non_embedding: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            params.pop(id(self.embedding.weight), None)
            params.pop(id(self.head.weight), None)
        return sum(p.numel() for p in params.values())

    def size(self) -> dict[str, int]:
        """The model's size as equal-size comparisons see it: ``counted`` (trainable block and final-norm
        parameters, positional tables excepted; what the budget matches) and ``not_counted`` (embedding, head,
        positional tables, frozen parameters). The two add up to every parameter."""
        counted = counted_parameters(self.blocks) + counted_parameters(self.norm)
        return {"counted": counted, "not_counted": self.num_parameters() - counted}

    @property
    def max_length(self) -> int | None:
        """The longest sequence every mixer is defined on (None: any length)."""
        limits = [block.mixer.max_length for block in self.blocks if block.mixer.max_length is not None]
        return min(limits) if limits else None

    def flops_per_token(self, seq_len: int) -> float | None:
        """Forward FLOPs per token over ``seq_len``-token sequences (:mod:`arch_zoo.flops`): every block's mixer and
        FFN, and the head (the embedding is a lookup). ``None`` when some mixer or FFN does not declare its own."""
        total = float(linear_flops(self.head))
        for block in self.blocks:
            for part in (block.mixer, block.ffn):
                if part is None:
                    continue
                declared = getattr(part, "flops_per_token", None)
                flops = declared(seq_len) if declared is not None else None
                if flops is None:
                    return None
                total += flops
        return total

    def state_size(self, seq_len: int) -> int:
        """Numbers in one sequence's decoding state after ``seq_len`` tokens, summed over layers (mixers and any FFN
        with a state of its own, such as RWKV's channel mix)."""
        total = 0
        for block in self.blocks:
            total += block.mixer.state_size(seq_len)
            if block.ffn is not None and hasattr(block.ffn, "state_size"):
                total += block.ffn.state_size(seq_len)
        return total


COMPILE_SCOPES = ("model", "blocks")
# torch.compile's modes. max-autotune-no-cudagraphs: Inductor times Triton templates against the vendor libraries for
# each matrix product (with the element-wise work after it fused in) and keeps the fastest, at the cost of a longer
# compile (each product shape is timed); max-autotune and reduce-overhead also capture CUDA graphs, whose static
# buffers the training step's fresh tensors must be copied into
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
CUDA_GRAPH_MODES = ("max-autotune", "reduce-overhead")  # the modes whose graphs run as captured CUDA graphs
# what a training step can compile with: a step keeps its loss past the next step's graph, which a captured graph's
# memory pool does not allow (reduce-overhead failed on an H100 at a run's first steps: docs/results/packing.md)
TRAINING_COMPILE_MODES = tuple(mode for mode in COMPILE_MODES if mode not in CUDA_GRAPH_MODES)


def compile_model(model: LanguageModel, scope: str = "model", mode: str = "default") -> LanguageModel:
    """``torch.compile`` a language model in place, at one of two scopes; returns the model.

    In place (``nn.Module.compile``), not wrapped: ``model.loss`` calls the model itself, which a wrapper's
    attribute lookup would hand to the uncompiled original (training was never compiled that way), and parameter
    names stay those of an uncompiled model, so checkpoints move between the two. ``model``: one graph for the
    forward pass, fusing across blocks; the longest compile, growing with depth. ``blocks``: every block compiled on
    its own; identical blocks share one compiled graph, so a deep model compiles about as fast as one block, at the
    cost of the fusions across block boundaries. Either way the loss is compiled on its own, so the float32 logits
    and their log-softmax are fused rather than written out (a [tokens, vocab] float32 tensor each). ``mode``: one of
    :data:`COMPILE_MODES`, for every graph."""
    if scope not in COMPILE_SCOPES:
        raise ConfigError(f"compile scope {scope!r} is unknown; choose one of {', '.join(COMPILE_SCOPES)}")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile mode {mode!r} is unknown; choose one of {', '.join(COMPILE_MODES)}")
    model._cross_entropy = torch.compile(token_cross_entropy, mode=mode)
    for module in [model] if scope == "model" else model.blocks:
        module.compile(mode=mode)
    return model
