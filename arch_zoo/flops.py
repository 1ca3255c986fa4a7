"""Forward FLOPs: what a mixer declares (analytic) and what a counter measures, under one convention.

The convention is the one model-FLOPs utilisation (MFU) is quoted in (PaLM, appendix B): the multiply-adds of matrix
products and convolutions, 2 FLOPs each (``2 m n k`` for an ``[m, k] @ [k, n]`` product), in the form the module
runs. Element-wise work (activations, norms, gates, decays), FFTs and softmax are not counted; neither is a causal
mask's saving (attention's ``Q K^T`` counts all ``T^2`` scores, as the counter sees them). Work shared by every
sequence of a batch (Hyena's implicit filters, H3's SSM kernel: computed once per call from the parameters) is not
per token either, so it is left out. Chunked linear-attention cores (retention, linear attention) are counted at the
kernels' 64-token chunks whatever chunk the PyTorch form uses (``arch_zoo.kernels.core.model_flops``), and a core on
the kernels as chunkwise whatever its mode (the kernels are chunkwise; declare under the run's autocast, whose dtype
decides whether they run). A training step is counted as three forwards (the backward is two).

``measured_flops_per_token`` is the check: torch's own FLOP counter, batch 2 minus batch 1 (which removes exactly
the batch-shared work), divided by the length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def linear_flops(*linears: nn.Linear | None) -> int:
    """FLOPs per token of the given linear layers (``None`` entries, absent optional layers, count nothing)."""
    return sum(2 * layer.in_features * layer.out_features for layer in linears if layer is not None)


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs torch's counter sees while ``fn`` runs (matrix products, convolutions, attention). Attention runs in
    its math form, whose products the counter sees on every device (it has no formula for the CPU's fused kernel)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measured_flops_per_token(forward: Callable[[torch.Tensor], object], inputs: Iterable[torch.Tensor]) -> float:
    """Per-token forward FLOPs of ``forward`` measured on two batches of the same length, one sequence and two: the
    difference is one sequence's own work (see the module docstring), divided by its length."""
    one, two = inputs
    if two.shape[0] != 2 * one.shape[0] or two.shape[1] != one.shape[1]:
        raise ValueError("measured_flops_per_token: give a batch and a batch twice its size, of the same length")
    per_batch = count_flops(lambda: forward(two)) - count_flops(lambda: forward(one))
    return per_batch / (one.shape[0] * one.shape[1])
