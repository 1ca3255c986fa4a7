"""Pick a backend for the retention core: ours (Triton) on CUDA, the PyTorch reference on the CPU, fla on request.

Every backend computes the same function (see ``kernels/reference.py``); fla's ``chunk_simple_gla`` with
``g_gamma=log_gamma`` uses the same state convention, which is why it is the comparison point.
"""

from __future__ import annotations

import torch

from arch_zoo.kernels.reference import (
    retention_chunkwise_reference,
    retention_parallel_reference,
    retention_step_reference,
)

BACKENDS = ("auto", "triton", "fla", "torch")


def _resolve(
    backend: str, device: torch.device, dtype: torch.dtype | None = None, dims: tuple[int, int] = (0, 0)
) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"retention: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        from arch_zoo.kernels.retention_triton import supported

        # float32 with head dims over 128 does not fit the kernels' tiles: the reference is exact there
        return "triton" if dtype is None or supported(dtype, *dims) else "torch"
    if backend in ("triton", "fla") and device.type != "cuda":
        raise RuntimeError(f"retention: backend {backend!r} needs CUDA tensors (got {device}); use 'torch' on the CPU")
    return backend


def _fla(name: str):
    try:
        if name == "chunk":
            from fla.ops.simple_gla import chunk_simple_gla as fn
        else:
            from fla.ops.simple_gla import fused_recurrent_simple_gla as fn
    except ImportError as err:  # fla-core is an optional comparison point
        raise RuntimeError(f"retention: backend 'fla' needs flash-linear-attention installed ({err})") from err
    return fn


def _triton_chunkwise(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our kernels behind registered operators: a compiled model keeps them in its graph as opaque calls (no graph
    break, no re-compilation of the hand-tiled kernels) and fuses the elementwise work around them."""
    from arch_zoo.kernels.retention_triton import retention_triton  # imported late: Triton is for CUDA only

    return retention_triton(*args, **kwargs)


def _fla_chunk(q, k, v, scale, initial_state, output_final_state, **decay) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_simple_gla`` with the decay as ``g_gamma=`` (per head) or ``g=`` (per token)."""
    fla = _fla("chunk")
    return fla(q, k, v, **decay, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def _triton_step(*args) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Our step kernel behind a registered operator that updates the state in place: a compiled decoding step keeps
    it inside its one graph."""
    from arch_zoo.kernels.retention_triton import retention_step_triton

    return retention_step_triton(*args)


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    recompute_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The retention core ``o, final_state``: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, log_gamma ``[H]``, or
    ``[B, T, H]`` for a decay per token (selective, or trained: the gradient reaches it).

    ``scale`` multiplies q (default ``K ** -0.5``); states are ``[B, H, K, V]``. ``backend``: auto (triton on CUDA
    where the kernels take the dtype and head dims, else torch), triton, fla (``chunk_simple_gla``) or torch (the
    chunkwise reference). A decay per token runs on fla (its ``g``; auto on CUDA) or torch (the parallel
    reference, O(T^2) memory: for tests); our kernels take a fixed decay per head only. ``recompute_states``: our
    kernels keep no block states for the backward pass and sweep again for them (less memory; the others ignore it).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if log_gamma.dim() == 3:
        return _per_token(q, k, v, log_gamma, scale, initial_state, output_final_state, backend)
    chosen = _resolve(backend, q.device, q.dtype, (q.shape[-1], v.shape[-1]))
    if chosen == "triton":
        return _triton_chunkwise(
            q, k, v, log_gamma, scale, initial_state, output_final_state, recompute_states=recompute_states
        )
    if chosen == "fla":
        lg = log_gamma.to(device=q.device, dtype=torch.float32)
        return _fla_chunk(q, k, v, scale, initial_state, output_final_state, g_gamma=lg)
    return retention_chunkwise_reference(q, k, v, log_gamma, scale, initial_state, output_final_state)


def _per_token(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if log_gamma.shape != q.shape[:3]:
        shape = tuple(log_gamma.shape)
        raise ValueError(f"retention: a per-token decay is [B, T, H] = {tuple(q.shape[:3])}; got {shape}")
    chosen = _resolve(backend, q.device)
    if chosen == "triton":
        if backend == "triton":
            raise ValueError("retention: the Triton kernels take a fixed decay per head; use backend 'fla' or 'torch'")
        chosen = "fla"  # auto on CUDA
    if chosen == "fla":  # its g: the decay per token, with a gradient
        return _fla_chunk(q, k, v, scale, initial_state, output_final_state, g=log_gamma.float().contiguous())
    return retention_parallel_reference(q, k, v, log_gamma, scale, initial_state, output_final_state)


def retention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    key_sum: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decoding step for all heads; ``state`` ``[B, H, K, V]`` is updated in place and ``o`` returned.

    q, k ``[B, H, K]``, v ``[B, H, V]`` (or with a length-1 time axis ``[B, 1, H, *]``, kept in the output). With
    ``key_sum`` ``[B, H, K]`` the decayed key sum steps in place as well and ``(o, scale * q . key_sum)`` comes back
    (``[B, H]``): on CUDA in the same launch as the state.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = _resolve(backend, q.device)
    if chosen == "triton":
        return _triton_step(q, k, v, state, log_gamma, scale, key_sum)
    timed = q.dim() == 4
    q3, k3, v3 = (x[:, 0] if timed else x for x in (q, k, v))
    if chosen == "fla":
        lg = log_gamma.to(device=q.device, dtype=torch.float32)
        o, new_state = _fla("recurrent")(
            q3[:, None], k3[:, None], v3[:, None], g_gamma=lg, scale=scale, initial_state=state, output_final_state=True
        )
        state.copy_(new_state)
        o = o[:, 0]
        zq = None
        if key_sum is not None:  # fla has no key-sum read: the reference's one-line update
            key_sum.mul_(log_gamma.exp().to(key_sum.dtype)[None, :, None]).add_(k3.to(key_sum.dtype))
            zq = scale * (q3.to(key_sum.dtype) * key_sum).sum(-1)
    else:
        out = retention_step_reference(q3, k3, v3, state, log_gamma, scale, key_sum)
        o, zq = out if key_sum is not None else (out, None)
    o = o[:, None] if timed else o
    return o if zq is None else (o, zq)
