"""Decayed linear attention in PyTorch: the one implementation that retention and linear attention share.

Per batch row and head, with queries ``q_t``, keys ``k_t``, values ``v_t`` and a decay ``gamma_t``::

    S_t = gamma_t S_{t-1} + k_t^T v_t,        o_t = q_t S_t        (= sum_{s<=t} (q_t . k_s) D[t, s] v_s)

with ``D[t, s] = gamma_{s+1} ... gamma_t``. ``log_decay`` is log(gamma): ``None`` (gamma = 1: Katharopoulos et al.'s
linear attention), ``[H]`` (one decay per head: RetNet's retention) or ``[B, H, T]`` (one per token and head: a
selective or trained decay). Token t applies its own decay before writing. Outputs are unnormalised and unscaled
(the caller scales q or k); states carry from one call to the next.

Three forms compute the same function: ``parallel`` ``(Q K^T * D) V`` (O(T^2), the training form), ``chunkwise``
(parallel inside chunks, the state carried across them: memory bounded by the chunk) and ``recurrent`` (one token
at a time), plus ``step``, the in-place decoding step. Layout: head-first, q, k ``[B, H, T, K]``, v ``[B, H, T, V]``,
states ``[B, H, K, V]`` (the mixers' layout; ``dispatch`` adapts it for the Triton kernels and fla, which take
``[B, T, H, D]``). Half-precision inputs run in float32 and come back in their dtype.

The oracle these are tested against is ``reference.py``, written independently; the fast backends are chosen in
``dispatch.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def at_least_float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Half-precision tensors as float32, others unchanged: recurrent sums and decays need float32's range and digits
    (a decay such as 1 - 1/512 rounds to 1 in bfloat16; running sums and exponentials overflow in float16)."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def outside_autocast(form: Callable) -> Callable:
    """Run ``form`` with autocast off. Under autocast (``bf16-mixed``) every product below would run in bf16 and
    return bf16, float32 inputs or not: the forms' float32 sums, state included, became bf16 ones."""

    @functools.wraps(form)
    def run(q: torch.Tensor, *args, **kwargs):
        device = q.device.type
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return form(q, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return form(q, *args, **kwargs)

    return run


def _decay_factors(
    log_decay: torch.Tensor | None, length: int, per_token: bool, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Decay weights of one block of ``length`` tokens that continues from a state.

    ``log_decay`` is ``[..., length]`` when ``per_token``, else ``[...]`` (one value per head), or None (no decay).
    Returns ``mask [..., L, L]`` (D[i, j], token i reading token j), ``q_decay [..., L]`` (decay of the incoming
    state when token i reads it), ``k_decay [..., L]`` (decay of token i's write at the block end) and ``total
    [...]``; without a decay the mask is causal ones and the other three are None (factors of one).
    """
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if log_decay is None:
        return causal.to(dtype), None, None, None
    if per_token:
        # float64: in float32 a long cumulative sum loses the small differences that the mask is made of
        cum = log_decay.double().cumsum(-1)
        diff = cum[..., :, None] - cum[..., None, :]
        q_log, k_log, total_log = cum, cum[..., -1:] - cum, cum[..., -1]
    else:
        # integer distances times log(gamma): exact up to one rounding, however long the block
        idx = torch.arange(length, device=device, dtype=log_decay.dtype)
        a = log_decay[..., None]
        diff = (idx[:, None] - idx[None, :]) * a[..., None]
        q_log, k_log, total_log = (idx + 1) * a, (length - 1 - idx) * a, length * log_decay
    mask = diff.masked_fill(~causal, float("-inf")).exp()  # -inf before exp keeps the backward free of inf * 0
    return mask.to(dtype), q_log.exp().to(dtype), k_log.exp().to(dtype), total_log.exp().to(dtype)


def _scaled(x: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return x if factor is None else x * factor[..., None]


@outside_autocast
def parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``O = (Q K^T * D) V`` (+ the decayed read of ``initial_state``); O(T^2) time, the training form."""
    out_dtype = v.dtype
    q, k, v = at_least_float32(q, k, v)
    T = q.shape[-2]
    per_token = log_decay is not None and log_decay.dim() == 3
    a = log_decay if per_token or log_decay is None else log_decay.view(1, -1)
    mask, q_decay, k_decay, total = _decay_factors(a, T, per_token, q.dtype, q.device)
    o = (q @ k.transpose(-1, -2) * mask) @ v
    if initial_state is not None:
        o = o + _scaled(q, q_decay) @ initial_state
    state = None
    if output_final_state:
        state = _scaled(k, k_decay).transpose(-1, -2) @ v
        if initial_state is not None:
            state = state + (initial_state if total is None else total[..., None, None] * initial_state)
    return o.to(out_dtype), state


@outside_autocast
def chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Parallel inside chunks of ``chunk_size`` tokens, the state carried across them; any length.

    Full chunks are processed together (only the [K, V] state update loops over chunks; without a decay it is a
    prefix sum); a last partial chunk is one more parallel block continuing from that state, so nothing is padded
    and the final state is exact.
    """
    out_dtype = v.dtype
    q, k, v = at_least_float32(q, k, v)
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    per_token = log_decay is not None and log_decay.dim() == 3
    C = max(1, min(chunk_size, T))
    N = T // C
    full = N * C
    state = initial_state
    outputs = []
    if N:
        qc, kc = q[..., :full, :].reshape(B, H, N, C, dk), k[..., :full, :].reshape(B, H, N, C, dk)
        vc = v[..., :full, :].reshape(B, H, N, C, dv)
        if per_token:
            a = log_decay[..., :full].reshape(B, H, N, C)
        else:
            a = None if log_decay is None else log_decay.view(1, -1, 1)
        mask, q_decay, k_decay, total = _decay_factors(a, C, per_token, q.dtype, q.device)
        o = (qc @ kc.transpose(-1, -2) * mask) @ vc
        summaries = _scaled(kc, k_decay).transpose(-1, -2) @ vc  # each chunk's write, decayed to its end
        if total is None:  # gamma = 1: the state before each chunk is a prefix sum of the writes
            after = summaries.cumsum(2)
            before = after - summaries
            if state is not None:
                before = before + state[:, :, None]
            state = after[:, :, -1] + (state if state is not None else 0)
        else:
            total = total.expand(B, H, N)
            if state is None:
                state = q.new_zeros(B, H, dk, dv)
            kept = []
            for n in range(N):
                kept.append(state)
                state = total[:, :, n, None, None] * state + summaries[:, :, n]
            before = torch.stack(kept, dim=2)
        o = o + _scaled(qc, q_decay) @ before
        outputs.append(o.reshape(B, H, full, dv))
    if full < T:
        tail_decay = log_decay[..., full:] if per_token else log_decay
        o, state = parallel(q[..., full:, :], k[..., full:, :], v[..., full:, :], tail_decay, state)
        outputs.append(o)
    return torch.cat(outputs, dim=2).to(out_dtype), (state if output_final_state else None)


@outside_autocast
def recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``S_t = gamma_t S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``, one token at a time: O(1) memory per step."""
    out_dtype = v.dtype
    q, k, v = at_least_float32(q, k, v)
    B, H, T, dk = q.shape
    per_token = log_decay is not None and log_decay.dim() == 3
    gamma = None if log_decay is None else log_decay.exp().to(q.dtype)
    state = initial_state if initial_state is not None else q.new_zeros(B, H, dk, v.shape[-1])
    outputs = []
    for t in range(T):
        write = k[:, :, t, :, None] * v[:, :, t, None, :]
        if gamma is None:
            state = state + write
        else:
            g = gamma[:, :, t, None, None] if per_token else gamma.view(1, -1, 1, 1)
            state = g * state + write
        outputs.append((q[:, :, t, None, :] @ state).squeeze(-2))
    return torch.stack(outputs, dim=2).to(out_dtype), (state if output_final_state else None)


Form = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
FORMS: dict[str, Form] = {"parallel": parallel, "chunkwise": chunkwise, "recurrent": recurrent}


@outside_autocast
def step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    key_sum: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decoding step for all heads, updating ``state`` ``[B, H, K, V]`` in place (per-head decay).

    q, k are ``[B, H, K]``, v ``[B, H, V]``. Returns ``o = scale * q S_new`` ``[B, H, V]`` in v's dtype; the state
    keeps its own dtype (float32 is usual; a half one is stepped in float32 and rounded once). With ``key_sum``
    ``[B, H, K]`` (RetNet's score normaliser) it is stepped in place too, ``z <- gamma z + k``, and
    ``(o, scale * q . z)`` is returned, the read in z's dtype.
    """
    work = torch.promote_types(state.dtype, torch.float32)  # a half-precision state is stepped in float32
    gamma = torch.exp(log_gamma.to(work)).view(1, -1, 1, 1)
    update = k.to(work)[..., :, None] * v.to(work)[..., None, :]
    if state.dtype == work:
        new = state.mul_(gamma).add_(update)
    else:  # as the kernel does: float32 arithmetic, one rounding into the state, the output read before it
        new = state.to(work) * gamma + update
        state.copy_(new)
    o = (scale * torch.einsum("bhk,bhkv->bhv", q.to(work), new)).to(v.dtype)
    if key_sum is None:
        return o
    key_sum.mul_(gamma[..., 0].to(key_sum.dtype)).add_(k.to(key_sum.dtype))
    return o, scale * (q.to(key_sum.dtype) * key_sum).sum(-1)


# Chunked cores are counted at the kernels' sub-chunk (retention_triton.CHUNK), whatever chunk the PyTorch form is
# configured with: a longer chunk does more score work for fewer sequential steps, work the function does not need,
# just as attention is counted the same whichever kernel runs it.
MODEL_CHUNK = 64


def model_flops(form: str, length: int, key_dim: int, value_dim: int, chunk_size: int) -> int:
    """One head's FLOPs over a ``length``-token sequence as runs count them: :func:`flops` of the form, chunks at
    most :data:`MODEL_CHUNK` long (equal to what the PyTorch form computes whenever ``chunk_size <= MODEL_CHUNK``)."""
    return flops(form, length, key_dim, value_dim, min(chunk_size, MODEL_CHUNK))


def flops(
    form: str,
    length: int,
    key_dim: int,
    value_dim: int,
    chunk_size: int = 64,
    initial_state: bool = False,
    final_state: bool = False,
) -> int:
    """Matrix-product FLOPs of one head over one sequence of ``length`` tokens in ``form``, as the functions above
    compute it (see ``arch_zoo.flops`` for the convention): the score and output products of each block, the state
    reads and writes. The recurrent form's state write is an outer product (element-wise): only its reads count."""
    K, V = key_dim, value_dim
    if form == "recurrent":
        return 2 * length * K * V
    if form == "parallel":
        return 2 * length * length * (K + V) + 2 * length * K * V * (int(initial_state) + int(final_state))
    if form != "chunkwise":
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    C = max(1, min(chunk_size, length))
    full_chunks, tail = divmod(length, C)
    # each full chunk: scores and outputs, its write into the state, and its read of the state before it
    total = full_chunks * (2 * C * C * (K + V) + 4 * C * K * V)
    if tail:  # one parallel block from the carried state, always returning its final state
        total += flops("parallel", tail, K, V, initial_state=bool(full_chunks) or initial_state, final_state=True)
    return total
