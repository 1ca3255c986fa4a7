"""Pure-PyTorch references for the retention core: the ground truth every fast kernel is tested against.

The core (RetNet's multi-scale retention before its per-row normalisers), per batch row and head ``h`` with decay
``gamma_h = exp(log_gamma[h])``:

    S_n = gamma S_{n-1} + k_n^T v_n,    o_n = scale * q_n S_n,    S_{-1} = initial state (zero if absent)

so ``o_n = scale * (sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m + gamma^(n+1) q_n S_{-1})`` and the final state is
``S_{T-1} = sum_m gamma^(T-1-m) k_m^T v_m + gamma^T S_{-1}``: the convention of fla's ``chunk_simple_gla`` with
``g_gamma=log_gamma``, so a final state can be passed on as the next call's initial state.

Layout (fla's): q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, states ``[B, H, K, V]``. Everything runs in the input
dtype promoted to at least float32, so float64 inputs give a float64 reference.

The parallel reference also takes a decay per token, ``log_gamma`` ``[B, T, H]`` (``S_n = gamma_n S_{n-1} + ...``:
a selective or trained decay, fla's ``g``), where ``gamma^(n-m)`` becomes ``exp(A_n - A_m)`` with ``A`` the running
sum of the log decays.
"""

from __future__ import annotations

import torch


def _promote(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = torch.promote_types(xs[0].dtype, torch.float32)
    return tuple(x.to(dtype) for x in xs)


def retention_parallel_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The masked-matrix form: O(T^2) memory, obviously right, the oracle for short sequences."""
    if log_gamma.dim() == 3:
        return _per_token_parallel(q, k, v, log_gamma, scale, initial_state, output_final_state)
    out_dtype = v.dtype
    q, k, v = _promote(q, k, v)
    T = q.shape[1]
    a = log_gamma.to(q.dtype).view(-1, 1, 1)  # [H, 1, 1]
    t = torch.arange(T, device=q.device, dtype=q.dtype)
    gap = t[:, None] - t[None, :]  # n - m
    decay = torch.where(gap >= 0, torch.exp(a * gap.clamp(min=0)), torch.zeros((), dtype=q.dtype, device=q.device))
    scores = torch.einsum("bnhk,bmhk->bhnm", q, k) * decay  # [B, H, T, T]
    o = torch.einsum("bhnm,bmhv->bnhv", scores, v)
    if initial_state is not None:
        s0 = initial_state.to(q.dtype)
        q_decay = torch.exp(a.view(1, 1, -1) * (t + 1)[:, None]).view(1, T, -1, 1)  # gamma^(n+1), [1, T, H, 1]
        o = o + torch.einsum("bnhk,bhkv->bnhv", q * q_decay, s0)
    final = None
    if output_final_state:
        k_decay = torch.exp(a.view(1, 1, -1) * (T - 1 - t)[:, None]).view(1, T, -1, 1)  # gamma^(T-1-m)
        final = torch.einsum("bmhk,bmhv->bhkv", k * k_decay, v)
        if initial_state is not None:
            final = final + torch.exp(a.view(1, -1, 1, 1) * T) * initial_state.to(q.dtype)
    return (scale * o).to(out_dtype), final


def _per_token_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    out_dtype = v.dtype
    q, k, v = _promote(q, k, v)
    T = q.shape[1]
    A = log_gamma.to(q.dtype).cumsum(1)  # [B, T, H]: log of the decay from the start through token n
    t = torch.arange(T, device=q.device)
    causal = (t[:, None] >= t[None, :])[None, :, :, None]  # [1, n, m, 1]
    gap = (A[:, :, None, :] - A[:, None, :, :]).masked_fill(~causal, 0.0)  # A_n - A_m, [B, n, m, H]
    decay = torch.exp(gap) * causal
    scores = torch.einsum("bnhk,bmhk->bhnm", q, k) * decay.permute(0, 3, 1, 2)
    o = torch.einsum("bhnm,bmhv->bnhv", scores, v)
    if initial_state is not None:
        o = o + torch.einsum("bnhk,bhkv->bnhv", q * torch.exp(A)[..., None], initial_state.to(q.dtype))
    final = None
    if output_final_state:
        final = torch.einsum("bmhk,bmhv->bhkv", k * torch.exp(A[:, -1:] - A)[..., None], v)
        if initial_state is not None:
            final = final + torch.exp(A[:, -1])[..., None, None] * initial_state.to(q.dtype)
    return (scale * o).to(out_dtype), final


def retention_chunkwise_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunkwise form the kernels implement: parallel inside a chunk, the state carried across chunks.

    Each chunk (the last one may be partial) reads the state left by the previous ones, adds its own masked
    intra-chunk term, and hands on ``gamma^L S + sum_j gamma^(L-1-j) k_j^T v_j`` for its length ``L``.
    """
    out_dtype = v.dtype
    q, k, v = _promote(q, k, v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    a = log_gamma.to(q.dtype)
    state = initial_state.to(q.dtype) if initial_state is not None else q.new_zeros(B, H, K, V)  # S before the chunk
    outputs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (x[:, start : start + chunk_size] for x in (q, k, v))
        L = qc.shape[1]
        i = torch.arange(L, device=q.device, dtype=q.dtype)
        o, _ = retention_parallel_reference(qc, kc, vc, log_gamma, 1.0)  # intra-chunk term, unscaled
        q_decay = torch.exp(a[None, :] * (i + 1)[:, None])[None, :, :, None]  # gamma^(i+1), [1, L, H, 1]
        o = o + torch.einsum("bihk,bhkv->bihv", qc * q_decay, state)
        outputs.append(scale * o)
        k_decay = torch.exp(a[None, :] * (L - 1 - i)[:, None])[None, :, :, None]
        state = torch.exp(a * L).view(1, H, 1, 1) * state + torch.einsum("bjhk,bjhv->bhkv", kc * k_decay, vc)
    o = torch.cat(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (state if output_final_state else None)
