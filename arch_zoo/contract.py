"""The token-mixer contract every mixer (built-in or plugin) follows.

A mixer maps ``x: [batch, time, d_model]`` to ``y`` of the same shape, causally:

* ``forward(x, state=None, return_state=True) -> (y, state)``. With ``state=None`` the whole sequence is
  processed in the mixer's training form (parallel, chunkwise, FFT...). With a state returned by an earlier call
  it *continues* that sequence (one token or many), so that running a sequence in pieces gives the same output
  as running it whole. ``return_state=False`` lets training skip building the state; the second element is then
  ``None``.
* ``state_size(seq_len) -> int``: how many numbers one sequence's decoding state holds after ``seq_len`` tokens
  (constant for recurrent mixers, growing for attention's KV cache). It is logged with every run.
* ``flops_per_token(seq_len) -> float | None``: forward FLOPs per token of a fresh ``seq_len``-token sequence in the
  training form, analytic, under :mod:`arch_zoo.flops`'s convention; runs turn it into achieved TFLOP/s and MFU. The
  contract tests check the declaration against torch's FLOP counter.

Parameters that need their own optimiser settings (SSM and filter parameters in H3/Hyena, decays) carry them as
an attribute ``param._optim`` (see :func:`set_optim`); the training loop turns these into parameter groups.
Tables indexed by position (Hyena's positional features) are marked with :func:`exclude_from_size`: they train, but
their size follows the sequence length, not the width, so equal-size comparisons do not count them.
A mixer whose initialisation depends on the model's depth says so in :meth:`MixerConfig.for_depth`; a mixer that
cannot read sequences past some length says so in :attr:`TokenMixer.max_length`.
Nothing outside a mixer's own file branches on the mixer's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from arch_zoo.errors import ConfigError as ConfigError  # re-exported: a mixer's check() raises it


@dataclass
class MixerConfig:
    """Base of every mixer config. ``name`` is the registry name; the registry fills it in."""

    name: str = ""

    def check(self, d_model: int) -> None:
        """Raise :class:`ConfigError` when this config cannot be built at width ``d_model``."""

    def for_depth(self, n_layers: int) -> MixerConfig:
        """This config inside a model of ``n_layers`` layers (the model calls it before building). The default
        is unchanged; a mixer whose reference initialisation depends on the depth fills in its own field."""
        return self

    @classmethod
    def small(cls) -> MixerConfig:
        """A config that builds at ``d_model=64`` (contract tests, tiny CPU runs); the defaults unless overridden."""
        return cls()


# the config instances that mixers being built now take as checked (see checked_configs)
_CHECKED_CONFIGS: ContextVar[frozenset[int]] = ContextVar("arch_zoo_checked_mixer_configs", default=frozenset())


@contextmanager
def checked_configs(*configs: MixerConfig | None) -> Iterator[None]:
    """Mixers constructed inside take these config instances as checked already and do not check them again: a
    model checks each layer config once for all its layers (:meth:`arch_zoo.model.ModelConfig.check`), while a mixer
    constructed on its own, outside this block, still checks its config."""
    token = _CHECKED_CONFIGS.set(frozenset(id(c) for c in configs if c is not None))
    try:
        yield
    finally:
        _CHECKED_CONFIGS.reset(token)


OPTIM_KEYS = ("lr", "lr_scale", "lr_max", "weight_decay")


def set_optim(param: nn.Parameter, **settings: float) -> nn.Parameter:
    """Attach per-parameter optimiser settings to ``param``: ``lr`` (a peak learning rate of its own),
    ``lr_scale`` (a multiple of the run's learning rate), ``lr_max`` (the run's learning rate, capped here) and
    ``weight_decay``. The relative forms exist because reference codes state them so (RWKV-4's 2x and 3x decay
    rates, H3's ``min(1e-3, lr)``), and a fixed number would stop meaning the same once the run's rate changes."""
    unknown = sorted(set(settings) - set(OPTIM_KEYS))
    if unknown:
        raise ValueError(f"set_optim: unknown setting(s) {unknown}; known: {', '.join(OPTIM_KEYS)}")
    param._optim = dict(settings)  # type: ignore[attr-defined]
    return param


def exclude_from_size(param: nn.Parameter) -> nn.Parameter:
    """Mark ``param`` as a positional table: trained, but not counted when models are matched for size."""
    param._excluded_from_size = True  # type: ignore[attr-defined]
    return param


def counts_towards_size(param: nn.Parameter) -> bool:
    """The one definition of size in equal-size comparisons: a trainable parameter that is not a positional
    table (see :func:`exclude_from_size`)."""
    return param.requires_grad and not getattr(param, "_excluded_from_size", False)


class TokenMixer(nn.Module):
    """Base class of token mixers. Subclasses set ``config_class`` and implement ``forward``/``state_size``."""

    config_class: ClassVar[type[MixerConfig]] = MixerConfig
    # where the mixer computes: a CUDA-only kernel library says ("cuda",); one without float64 kernels says False,
    # and the contract tests then check it in float32 with float32 tolerances
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    supports_float64: ClassVar[bool] = True
    # why torch's FLOP counter cannot check this mixer's declaration (its work runs in kernels the counter does not
    # see, e.g. a Triton-only library); the contract test then skips that one check and says this
    flops_uncountable: ClassVar[str | None] = None

    def __init__(self, d_model: int, config: MixerConfig, layer_idx: int = 0) -> None:
        super().__init__()
        if id(config) not in _CHECKED_CONFIGS.get():  # inside a model, its check has run once for every layer
            config.check(d_model)
        self.d_model = d_model
        self.config = config
        self.layer_idx = layer_idx

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this mixer cannot be built on this machine (e.g. it needs a GPU), or None. Such a mixer is still
        listed; building it raises :class:`ConfigError` with this reason."""
        return None

    def forward(
        self, x: torch.Tensor, state: Any = None, return_state: bool = True
    ) -> tuple[torch.Tensor, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_size(self, seq_len: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float | None:
        """Forward FLOPs per token over a fresh sequence of ``seq_len`` tokens, in the form a training call runs
        (the convention of :mod:`arch_zoo.flops`: matrix products and convolutions, 2 per multiply-add). ``None``,
        the default, means undeclared: the mixer trains, but its runs report no FLOPs or MFU, and the contract tests
        ask for the declaration."""
        return None

    @property
    def max_length(self) -> int | None:
        """The longest sequence this mixer is defined on (None: any length)."""
        return None

    def allocate_state(self, batch: int, capacity: int, device: torch.device, dtype: torch.dtype) -> Any:
        """A decoding state for ``batch`` sequences of up to ``capacity`` tokens, owned by the caller: calls that
        continue from it may update its tensors in place (a decoding loop, or a CUDA graph that must keep its
        buffers, starts the prompt from it). It computes the same function as a fresh sequence (``state=None``).
        ``None``, the default, is a fresh sequence: the first call builds the state, and states stay functional
        (every call returns new tensors and leaves its input alone)."""
        return None


def config_fields(cls: type[MixerConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
