"""Linear attention, the "Linear Transformer" (Katharopoulos, Vyas, Pappas, Fleuret; ICML 2020, arXiv 2006.16236).

Softmax attention weighs value ``v_j`` by ``exp(q_i . k_j)``; linear attention replaces the exponential by a dot
product of feature maps, ``phi(q_i) . phi(k_j)``, so that the sum over the past factors through a matrix that does
not depend on ``i``. Per head (``dk = dv = d_model / n_heads``)::

    q, k, v = W_q x, W_k x, W_v x;     Q = phi(q),  K = phi(k)
    S_i = S_{i-1} + K_i^T v_i   [dk, dv],      z_i = z_{i-1} + K_i   [dk]
    y_i = Q_i S_i / (Q_i . z_i + eps);         out = W_o concat_heads(y)

The paper's ``phi(x) = elu(x) + 1`` keeps features positive, so the normaliser ``Q_i . z_i`` is positive and the
layer is an average of values like softmax attention (without the ``1/sqrt(dk)`` scaling: the feature map replaces
the exponential, not the logits).

Training forms (``mode``): ``parallel``, the masked quadratic form ``((Q K^T) * M) v``: ``O(T^2 d)`` time,
``O(T^2)`` memory per head; ``chunkwise``, quadratic inside chunks of ``chunk_size`` tokens with ``(S, z)`` carried
across them: ``O(T L d + T d^2 / H)``. The normaliser is computed beside the core, in float32: a running sum of
the keys and one dot product per token. Decoding form (``recurrent``): the recurrence above,
``O(d^2 / H)`` per token. State per sequence: ``S`` and ``z``, ``H dk dv + H dk = d^2 / H + d`` numbers, constant in
``T``. All forms continue from a state and compute the same function.

Config (defaults: the paper):
    n_heads: number of heads (8, as in the reference implementation's examples); each has ``d_model / n_heads``
        channels.
    feature_map: ``elu`` (``elu(x) + 1``, the paper), ``relu`` (``max(x, 0)``) or ``identity`` (``x``: plain
        linear attention, only without the normaliser, since ``Q . z`` then has no sign and can vanish).
    normalize: divide by ``Q_i . z_i + eps`` (true, the paper); false leaves the raw numerator ``Q_i S_i``.
    eps: added to the normaliser (1e-6, the reference implementation); with ``relu`` it decides the output when
        every feature is zero.
    mode: ``chunkwise`` (default), ``parallel`` or ``recurrent``: the form of a call. A continued call of one token
        always steps recurrently; a continued call of several tokens runs chunkwise unless ``mode`` is recurrent.
    chunk_size: tokens per chunk of the chunkwise form (64).
    kernel: ``auto`` (default), ``torch``, ``triton`` or ``fla``: the core is retention's with no decay
        (``arch_zoo.kernels``), so it has their backends. ``auto``: our Triton kernels in bf16 (``half_core``) where
        the layer runs in bf16 on CUDA, else the PyTorch forms in float32 (its sums need the range), never our
        float32 tiles, which are slow: 358.6 against 50.7 ms per training step at d_model 1024, 4 layers, 8 x 2048
        tokens on an H100 (``zoo-bench train --models linear_attention,la_torch=linear_attention --set
        la_torch.kernel=torch``; the PyTorch forms' products then ran in bf16 under autocast, see below).
    half_core: on our kernels (``kernel=triton``, or ``auto`` on CUDA), run the core in the layer's bf16 instead of
        float32 (true). The kernels accumulate in float32 (the bf16 numerics of fla's chunk kernels and of
        FlashAttention: scores and state rounded to bf16 before their products); the normaliser is float32 either
        way. Why it is the default: GPU Table 5's setting trained to validation perplexity 3.656 on it against 3.847
        on the PyTorch forms as they then ran (three seeds each, every seed lower at 256 and 512 tokens, higher at 4x
        the training length; ``docs/results/table5_gpu``). Those forms ran under the run's bf16 autocast, which made
        their products and their carried state bf16 (fixed since: the forms now run outside autocast, truly
        float32); the true-float32 forms have not been trained on a GPU yet. Both runs had the normaliser inside
        the core (a column of ones after the values, in the core's precision).
        On an H100 (one layer, d_model 1024, 8 heads, 8 x 2048 tokens, autocast bf16, forward + backward, a
        do_bench of the layer alone): 4.15 ms against 6.87 ms for the PyTorch forms (bf16 products under autocast
        then). At the Table 5 shape (zoo-bench, batch 32, H100): 38.5% MFU against 33.2% (``docs/results/mfu.md``;
        both with the normaliser inside the core).
        The price: the query projection's gradient, in which the core's and the normaliser's parts nearly cancel,
        takes the core's part from bf16 products: 6.6e-2 relative error against float64 under the loss |y|^2 (same
        bf16 weights; d_model 512, 4 heads, T = 1100; measured with the normaliser in the core too), where our
        float32 tiles give 6.3e-3 (other outputs and gradients: 4e-3 to 7e-3 on both; the GPU test
        ``test_linear_attention_gpu_on_the_kernels`` repeats this). How much the parts cancel depends on the
        upstream gradient (|y|^2's runs along y) and on the values: emulated in float64 with the normaliser exact
        (``tests/test_linear_attention.py``), that layer's query gradient is off by 5.4e-3 under a random upstream
        gradient, but a second layer at initialisation under the model's own loss by 3.9e-2 (its values share a
        component across tokens). ``half_core=false`` keeps the float32 core (on ``auto``: the PyTorch forms).
    bias: biases on the four projections (false: the paper's equations ``Q = x W_Q``; its code has them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo.contract import ConfigError, MixerConfig, TokenMixer
from arch_zoo.flops import linear_flops
from arch_zoo.kernels import core, dispatch
from arch_zoo.kernels.core import FORMS, at_least_float32
from arch_zoo.layers import shared_input_projections
from arch_zoo.registry import register_mixer

MODES = tuple(FORMS)


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``, as ``x + 1`` / ``exp(x)``: written as a sum, ``(exp(x) - 1) + 1`` cancels to 0 in float32 for
    x below about -17, and a query whose features all vanish reads 0 / eps instead of its average."""
    # clamp: the branch not taken must stay finite, or its gradient (0 * inf) would be nan
    return torch.where(x > 0, x + 1, torch.exp(x.clamp(max=0)))


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": _elu_plus_one,
    "relu": F.relu,
    "identity": lambda x: x,
}


def _normalized(
    numerator: torch.Tensor, q: torch.Tensor, k: torch.Tensor, z0: torch.Tensor | None, eps: float, final: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``numerator_i / (q_i . z_i + eps)`` with ``z_i = z0 + sum_{j <= i} k_j``, in float32 at least, and the last
    ``z`` (when ``final``).

    Why not the core: the normaliser is a running sum of keys and one dot product per token, element-wise work. As
    a column of ones after the values it widened the core's value dim from 128 to 144 (padded to a tile), which our
    kernels run as 256: a third value block in the forward, a key dim of 256 in the backward's dq and dk, and the
    fused dk/dv kernel out of reach. Here it is also exact to float32 whatever the core's precision."""
    dtype = torch.promote_types(numerator.dtype, torch.float32)
    z = torch.cumsum(k.to(dtype), dim=-2)
    if z0 is not None:
        z = z + z0.to(dtype)[..., None, :]
    denominator = (q.to(dtype) * z).sum(-1, keepdim=True) + eps
    return numerator.to(dtype) / denominator, (z[..., -1, :].clone() if final else None)


@dataclass
class LinearAttentionConfig(MixerConfig):
    """Katharopoulos et al.'s causal linear attention; the module docstring describes every field."""

    n_heads: int = 8
    feature_map: str = "elu"  # elu (elu + 1) | relu | identity
    normalize: bool = True  # divide by phi(q) . sum phi(k) + eps
    eps: float = 1e-6
    mode: str = "chunkwise"  # parallel | chunkwise | recurrent
    chunk_size: int = 64
    kernel: str = "auto"  # auto | torch | triton | fla: the shared core's backend (auto: see above)
    half_core: bool = True  # on our kernels, the core in bf16 with float32 sums (trained better on the GPU: see above)
    bias: bool = False

    def check(self, d_model: int) -> None:
        if self.n_heads <= 0 or d_model % self.n_heads:
            raise ConfigError(
                f"linear_attention: d_model={d_model} is not divisible by n_heads={self.n_heads}; "
                f"set model.mixer.n_heads to a divisor of {d_model}"
            )
        if self.feature_map not in FEATURE_MAPS:
            raise ConfigError(
                f"linear_attention: feature_map={self.feature_map!r} is not one of {', '.join(FEATURE_MAPS)}"
            )
        if self.mode not in MODES:
            raise ConfigError(f"linear_attention: mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.kernel not in dispatch.BACKENDS:
            raise ConfigError(f"linear_attention: kernel={self.kernel!r} is not one of {', '.join(dispatch.BACKENDS)}")
        if self.chunk_size < 1:
            raise ConfigError(f"linear_attention: chunk_size={self.chunk_size} must be at least 1")
        if self.eps < 0:
            raise ConfigError(f"linear_attention: eps={self.eps} must be >= 0")
        if self.normalize and self.feature_map == "identity":
            raise ConfigError(
                "linear_attention: feature_map=identity gives a normaliser q . sum(k) of either sign, which can "
                "vanish; set model.mixer.normalize=false, or choose feature_map=elu or relu"
            )

    @classmethod
    def small(cls) -> LinearAttentionConfig:
        return cls(n_heads=4, chunk_size=16)


@register_mixer("linear_attention")
class LinearAttention(TokenMixer):
    config_class = LinearAttentionConfig

    def __init__(self, d_model: int, config: LinearAttentionConfig, layer_idx: int = 0) -> None:
        super().__init__(d_model, config, layer_idx)
        self.n_heads = config.n_heads
        self.head_dim = d_model // config.n_heads
        self.feature_map = FEATURE_MAPS[config.feature_map]
        self.q_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = True) -> tuple[torch.Tensor, Any]:
        c = self.config
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q, k, v = shared_input_projections(x, (self.q_proj, self.k_proj, self.v_proj))
        q = self.feature_map(q.view(B, T, H, d).transpose(1, 2))
        k = self.feature_map(k.view(B, T, H, d).transpose(1, 2))
        v = v.view(B, T, H, d).transpose(1, 2)
        form = self.form(T, continued=state is not None)
        backend = self._backend(form, x.device, v.dtype)
        if not (backend == "triton" and c.half_core and v.dtype == torch.bfloat16):  # a bfloat16 core on our kernels
            q, k, v = at_least_float32(q, k, v)  # and the division below: in half precision the sums overflow
        o, s = dispatch.decayed_linear_attention(
            q,
            k,
            v,
            None,
            backend=backend,
            form=form,
            initial_state=None if state is None else state["S"],
            output_final_state=return_state,
            chunk_size=c.chunk_size,
        )
        z = None
        if c.normalize:
            o, z = _normalized(o, q, k, None if state is None else state["z"], c.eps, return_state)
        y = self.out_proj(o.to(x.dtype).transpose(1, 2).reshape(B, T, self.d_model))
        return y, ({"S": s, "z": z} if return_state else None)

    def form(self, n_tokens: int, continued: bool) -> str:
        """The form of a call: a continued single token steps recurrently; a continued prompt runs chunkwise (memory
        bounded by the chunk) unless ``mode`` is recurrent; a fresh sequence runs in ``mode``."""
        mode = self.config.mode
        if mode == "recurrent" or (continued and n_tokens == 1):
            return "recurrent"
        return "parallel" if mode == "parallel" and not continued else "chunkwise"

    def _backend(self, form: str, device: torch.device, dtype: torch.dtype) -> str:
        """The core's backend for a call. ``auto`` takes our kernels only for a bfloat16 core (``half_core``: they
        accumulate in float32), never our float32 tiles; ``triton`` and ``fla`` insist."""
        c = self.config
        if c.kernel != "auto":
            return c.kernel
        half = c.half_core and dtype == torch.bfloat16
        dims = (self.head_dim, self.head_dim)
        return (
            "triton"
            if half and dispatch.choose_backend("auto", device, form=form, dtype=dtype, dims=dims) == "triton"
            else "torch"
        )

    def flops_per_token(self, seq_len: int) -> float:
        """The four projections plus the core in the form it runs (the configured one; chunkwise on the kernels,
        whatever the mode; chunks counted at most ``core.MODEL_CHUNK`` long, the kernels' chunk). The normaliser, a
        running sum and a dot product per token, is element-wise work: not counted, as element-wise work is not
        anywhere. On a GPU, call it in the forward's autocast: the dtype decides whether the kernels run."""
        c = self.config
        weight = self.q_proj.weight
        form = self.form(seq_len, False)
        if form != "recurrent":  # on the kernels, chunkwise whatever the mode
            form = dispatch.computed_form(form, self._backend(form, weight.device, dispatch.run_dtype(weight)))
        heads = core.model_flops(form, seq_len, self.head_dim, self.head_dim, c.chunk_size)
        return linear_flops(self.q_proj, self.k_proj, self.v_proj, self.out_proj) + self.n_heads * heads / seq_len

    def state_size(self, seq_len: int) -> int:
        H, d = self.n_heads, self.head_dim
        return H * d * d + (H * d if self.config.normalize else 0)  # S, and z for the normaliser
