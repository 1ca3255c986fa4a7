"""Causal convolutions shared by the convolutional mixers (H3, Hyena).

All functions work channels-first, time last: ``u: [..., channels, time]`` and a filter ``k: [..., kernel_len]``
that broadcasts against ``u`` (one filter per channel), and compute ``y_t = sum_{s <= t} k_{t-s} u_s`` (tap 0
weighs the current input).

* :func:`fft_causal_conv` is the training form of a long convolution: both signals are zero-padded to
  ``L + kernel_len`` (``2L`` for a full-length filter, as in H3/Hyena) so that the FFT's circular convolution
  equals the linear one on the first ``L`` outputs: ``O(L log L)`` instead of ``O(L^2)``. Its backward is written
  out (two correlations through real transforms) rather than left to autograd's gradient of ``rfft``.
* :func:`causal_conv_tail` continues a convolution from the inputs seen so far (a cached history): one new output
  is a dot product with the reversed filter (``O(history)``, no FFT), several go through the FFT.
* :class:`ShortCausalConv` is a depthwise ``nn.Conv1d`` (same parameters and init) that pads on the left only and
  carries its last ``kernel_size - 1`` inputs as a decoding state, so a sequence can be fed in pieces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fft_size(n: int) -> int:
    """The smallest 5-smooth integer >= ``n``: pocketfft is fast on these, slow on large prime lengths."""
    size = max(1, n)
    while True:
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return size
        size += 1


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # FFTs of half precision are unsupported on the CPU and lossy on GPUs: compute in at least float32.
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _CausalFFTConv(torch.autograd.Function):
    """``y = (k * u)[..., :L]`` through FFTs of length ``n``, in ``dtype``, with a backward of real transforms.

    Why a Function: autograd's gradient of ``rfft`` zero-fills a full complex spectrum and runs a complex-to-complex
    transform over it, and the transforms received time-strided inputs (the mixers hand over ``[B, C, T]`` views of
    ``[B, T, C]`` products), which the GPU path copies. Here every transform reads a contiguous, time-last input, and
    the gradients are the two correlations (``n >= L + Lk - 1``, so neither wraps around):
    ``du = irfft(rfft(dy) * conj(rfft(k)))[:L]`` and ``dk = irfft(sum_batch rfft(dy) * conj(rfft(u)))[:Lk]``.
    ``u`` is kept as it came (no float32 copy) and its spectrum is recomputed in the backward. On an H100 at the
    Table 5 shape (batch 32, compiled per block) this took H3's training step from 511.6 to 385.4 ms and Hyena's from
    459.7 to 395.8 ms (docs/results/mfu.md, session 18).
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(u, k)
        ctx.n, ctx.dtype = n, dtype
        spectrum = _spectrum(u, n, dtype) * _spectrum(k, n, dtype)
        return torch.fft.irfft(spectrum, n=n)[..., : u.shape[-1]]

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        u, k = ctx.saved_tensors
        n, dtype = ctx.n, ctx.dtype
        dy_spectrum = _spectrum(dy, n, dtype)
        du = dk = None
        if ctx.needs_input_grad[0]:
            du = torch.fft.irfft(dy_spectrum * _spectrum(k, n, dtype).conj(), n=n)[..., : u.shape[-1]].to(u.dtype)
        if ctx.needs_input_grad[1]:
            cross = (dy_spectrum * _spectrum(u, n, dtype).conj()).sum_to_size(*k.shape[:-1], n // 2 + 1)
            dk = torch.fft.irfft(cross, n=n)[..., : k.shape[-1]].to(k.dtype)
        return du, dk, None, None


@torch.library.custom_op("arch_zoo::rfft_rows", mutates_args=(), tags=(torch.Tag.needs_contiguous_strides,))
def _rfft_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``rfft`` along the last dim of a contiguous ``x``.

    An operator of its own only for its layout tag. A compiled graph may lay a padded copy out time-strided,
    following ``x``'s ``[B, T, C]`` storage, and the transform would then copy it again to batch its rows. With the
    tag, the cast, the padding and the transposition are one fused kernel that writes the contiguous rows the
    transform reads.
    """
    return torch.fft.rfft(x, n=n)


@_rfft_rows.register_fake
def _(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n // 2 + 1, dtype=torch.promote_types(x.dtype, torch.complex64))


def _spectrum(x: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``rfft`` of ``x`` in ``dtype``, zero-padded to ``n``."""
    return _rfft_rows(F.pad(x.to(dtype), (0, n - x.shape[-1])), n)


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Causal convolution of ``u: [..., C, L]`` with ``k: [..., Lk]`` along time, plus ``skip[c] * u`` if given.

    Filter taps beyond ``L`` cannot reach any output and are dropped. The result has ``u``'s dtype.
    """
    L = u.shape[-1]
    k = k[..., :L]
    n = fft_size(L + k.shape[-1] - 1)
    dtype = _compute_dtype(u, k)
    y = _CausalFFTConv.apply(u, k, n, dtype)
    if skip is not None:
        y = y + skip.to(dtype)[:, None] * u
    return y.to(u.dtype)


def causal_conv_tail(u: torch.Tensor, k: torch.Tensor, n_out: int, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The last ``n_out`` outputs of ``fft_causal_conv(u, k, skip)``, where ``u`` is history plus new inputs.

    A single new output costs one dot product over ``min(L, Lk)`` past inputs; this is how a long convolution
    decodes token by token without recomputing the outputs it already produced.
    """
    if n_out != 1:
        return fft_causal_conv(u, k, skip)[..., -n_out:]
    L = u.shape[-1]
    k = k[..., :L]
    dtype = _compute_dtype(u, k)
    window = u[..., L - k.shape[-1] :].to(dtype)  # u_{t-Lk+1} .. u_t, oldest first
    y = (window * k.flip(-1).to(dtype)).sum(-1, keepdim=True)
    if skip is not None:
        y = y + skip.to(dtype)[:, None] * u[..., -1:]
    return y.to(u.dtype)


def keep_last(u: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` time steps of ``u: [..., T]``, zero-padded on the left when ``T < n`` (a fresh history)."""
    if n == 0:
        return u[..., :0]
    return F.pad(u, (max(0, n - u.shape[-1]), 0))[..., -n:]


class ShortCausalConv(nn.Conv1d):
    """Depthwise causal convolution over ``x: [B, C, T]`` whose state is its last ``kernel_size - 1`` inputs.

    ``nn.Conv1d(padding=K-1)`` followed by cropping to the first ``T`` outputs (the usual causal trick) gives the
    same result when there is no history; padding only on the left avoids computing the discarded outputs.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, history: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: [B, C, T]`` (and the history a previous call returned) -> ``(y: [B, C, T], new history)``."""
        K = self.kernel_size[0]
        if history is None:
            padded = F.pad(x, (K - 1, 0))
        else:
            padded = torch.cat((history.to(x.dtype), x), dim=-1)
        if torch.compiler.is_compiling():
            y = self._shifted_sum(padded, x.shape[-1])
        else:
            y = F.conv1d(padded, self.weight, self.bias, groups=self.groups)
        return y, padded[..., padded.shape[-1] - (K - 1) :]

    def _shifted_sum(self, padded: torch.Tensor, T: int) -> torch.Tensor:
        """The same convolution as ``K`` shifted products, which a compiler fuses into one element-wise kernel
        (forward and backward). PyTorch's depthwise kernels, which ``F.conv1d`` runs on a GPU, took 75 ms of Hyena's
        396 ms step at the Table 5 shape on an H100 (docs/results/mfu.md, session 18). In half precision under
        autocast the operands are cast as autocast casts ``F.conv1d``'s, so the output dtype is the same."""
        device = padded.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else padded.dtype
        padded, weight = padded.to(dtype), self.weight[:, 0].to(dtype)  # tap j meets padded[t + j]: a correlation
        y = sum(weight[:, j, None] * padded[..., j : j + T] for j in range(self.kernel_size[0]))
        return y if self.bias is None else y + self.bias.to(dtype)[:, None]
