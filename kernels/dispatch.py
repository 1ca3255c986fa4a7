"""Where decayed linear attention runs: the one place a backend is chosen.

Backends: ``torch`` (``core.py``'s forms, any device, any decay), ``triton`` (ours, CUDA, a fixed decay per head)
and ``fla`` (flash-linear-attention's ``chunk_simple_gla``, CUDA, also a decay per token with its gradient); ``auto``
takes ours on CUDA where their tiles take the dtype and head dims, and the PyTorch forms otherwise. fla with
``g_gamma=log_gamma`` uses the same state convention as ours, which is why it is the comparison point.

Two entry points: :func:`decayed_linear_attention` in the mixers' head-first layout (what RetNet and linear
attention call), and :func:`retention` in the kernels' ``[B, T, H, D]`` layout with a scale (fla's signature, for
the benchmark); plus :func:`retention_step`, the decoding step, and :func:`key_sum_read`, RetNet's score
normaliser on the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arch_zoo.kernels import core

BACKENDS = ("auto", "torch", "triton", "fla")
VALUE_BLOCK = 16  # value widths the Triton kernels tile; a width past whole tiles is run as a second, narrow call


def choose_backend(
    backend: str,
    device: torch.device,
    *,
    form: str = "chunkwise",
    dtype: torch.dtype | None = None,
    dims: tuple[int, int] = (0, 0),
    trained_decay: bool = False,
) -> str:
    """``torch``, ``triton`` or ``fla`` for a call. ``auto`` takes the PyTorch forms off CUDA, for the recurrent form,
    for a trained decay (ours carry no gradient to it) and where our tiles do not take the dtype and head ``dims``
    (float32 stops at 128); ``triton`` and ``fla`` insist. Raises ``ValueError`` naming the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cuda" or form == "recurrent" or trained_decay:
            return "torch"
        from arch_zoo.kernels.retention_triton import supported

        return "triton" if dtype is None or supported(dtype, *dims) else "torch"
    if backend == "triton" and trained_decay:
        raise ValueError(
            "kernel=triton takes a fixed decay per head (no gradient to it); a selective or learnable decay needs "
            "kernel=fla or kernel=torch"
        )
    if backend in ("triton", "fla") and device.type != "cuda":
        raise RuntimeError(f"kernel {backend!r} needs CUDA tensors (got {device}); use 'torch' or 'auto' on the CPU")
    return backend


def run_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of a layer's activations in a forward pass: autocast's where it is on for the weight's device, else
    the weight's own (which backend a call takes depends on it)."""
    kind = weight.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def computed_form(form: str, backend: str) -> str:
    """The form whose work a call does: the kernels are chunkwise whatever form was asked for, so a run in
    ``mode=parallel`` on them does a chunkwise run's FLOPs, not the parallel form's T^2 ones."""
    return form if backend == "torch" else "chunkwise"


def decayed_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    *,
    backend: str = "auto",
    form: str = "chunkwise",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    chunk_size: int = 64,
    recompute_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``o, final_state`` of ``S_t = gamma_t S_{t-1} + k_t^T v_t, o_t = q_t S_t`` (see ``core.py``), head-first.

    ``backend`` is a :data:`BACKENDS` name (``auto`` resolved here) and ``form`` the PyTorch form
    (parallel | chunkwise | recurrent); the kernels are chunkwise whatever the form, and every form is the same
    function. ``recompute_states``: our kernels keep no block states for the backward pass and sweep again for them.
    """
    trained = log_decay is not None and (log_decay.dim() == 3 or log_decay.requires_grad)
    width = v.shape[-1]
    dims = (q.shape[-1], width - width % VALUE_BLOCK or width)  # the wide call's (a narrow rest is padded to a tile)
    chosen = choose_backend(backend, q.device, form=form, dtype=v.dtype, dims=dims, trained_decay=trained)
    if chosen == "torch":
        run = core.FORMS[form]
        if form == "chunkwise":
            return run(q, k, v, log_decay, initial_state, output_final_state, chunk_size)
        return run(q, k, v, log_decay, initial_state, output_final_state)
    return on_kernels(q, k, v, log_decay, chosen, initial_state, output_final_state, recompute_states)


def key_sum_read(
    q: torch.Tensor,
    k: torch.Tensor,
    log_decay: torch.Tensor,
    backend: str,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RetNet's score-normaliser read ``q_t . z_t`` (``z_t = gamma z_{t-1} + k_t``: the core with v = 1), head-first,
    without gradients: ``([B, H, T, 1], final z [B, H, K] | None)``. ``backend`` is a resolved kernel backend (not
    ``torch``): ``triton`` with a fixed decay per head runs ``key_sum_triton``, which splits the key dim, where the
    core's kernels would pad the value width of one to a whole tile; otherwise the core runs on a column of ones."""
    if backend == "triton" and log_decay.dim() == 1 and not log_decay.requires_grad:
        s, z = _triton_key_sum(q.transpose(1, 2), k.transpose(1, 2), log_decay, initial_state, output_final_state)
        return s[..., None], z
    B, H, T, _ = q.shape
    z0 = None if initial_state is None else initial_state[..., None]
    s, z = on_kernels(q, k, q.new_ones(B, H, T, 1), log_decay, backend, z0, output_final_state)
    return s, None if z is None else z[..., 0]


def on_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    backend: str,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    recompute_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head-first call adapted to the kernels' layout (``[B, T, H, D]`` views, no copies) and tiles.

    A trained or per-token decay goes over per token (fla's ``g``: a learnable one is spread over the tokens so
    that its gradient flows back); no decay is a decay of zero. Value widths are padded to the kernels' tile. A width
    past a whole number of tiles (say 128 + 1) is padded into the last tile of one call where our kernels take the
    padded width (half precision: up to 512); otherwise (float32 past 128, fla) the rest is split off and run as a
    second, narrow call."""
    B, H, T, _ = q.shape
    if log_decay is None:
        log_decay = torch.zeros(H, device=q.device, dtype=torch.float32)
    elif log_decay.dim() != 1 or log_decay.requires_grad:
        log_decay = log_decay.transpose(1, 2) if log_decay.dim() == 3 else log_decay.expand(B, T, H)
    if not q.dtype == k.dtype == v.dtype:  # autocast can leave them mixed; the kernels take one dtype
        q, k = q.to(v.dtype), k.to(v.dtype)
    width = v.shape[-1]
    main = width - width % VALUE_BLOCK
    parts = [(0, main), (main, width)] if 0 < main < width else [(0, width)]
    if len(parts) > 1 and backend == "triton":
        from arch_zoo.kernels.retention_triton import supported

        if supported(v.dtype, q.shape[-1], main + VALUE_BLOCK, q.is_cuda):
            parts = [(0, width)]
    outputs, states = [], []
    for lo, hi in parts:
        pad = (-(hi - lo)) % VALUE_BLOCK
        vp = F.pad(v[..., lo:hi], (0, pad)) if pad or len(parts) > 1 else v
        s0 = initial_state
        if initial_state is not None and (pad or len(parts) > 1):
            s0 = F.pad(initial_state[..., lo:hi], (0, pad))
        o, s = retention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            vp.transpose(1, 2),
            log_decay,
            scale=1.0,
            initial_state=s0,
            output_final_state=output_final_state,
            backend=backend,
            recompute_states=recompute_states,
        )
        # slice only what was padded: a no-op slice still costs a zero-filled copy of the gradient in backward
        o = o.transpose(1, 2)
        outputs.append(o[..., : hi - lo] if pad else o)
        states.append(s[..., : hi - lo] if s is not None and pad else s)
    if len(parts) == 1:
        return outputs[0], states[0] if output_final_state else None
    state = torch.cat(states, dim=-1) if output_final_state else None
    return torch.cat(outputs, dim=-1), state


def _fla(name: str):
    try:
        if name == "chunk":
            from fla.ops.simple_gla import chunk_simple_gla as fn
        else:
            from fla.ops.simple_gla import fused_recurrent_simple_gla as fn
    except ImportError as err:  # fla-core is an optional comparison point
        raise RuntimeError(f"kernel 'fla' needs flash-linear-attention installed ({err})") from err
    return fn


def _triton_chunkwise(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our kernels behind registered operators: a compiled model keeps them in its graph as opaque calls (no graph
    break, no re-compilation of the hand-tiled kernels) and fuses the elementwise work around them."""
    from arch_zoo.kernels.retention_triton import retention_triton  # imported late: Triton is for CUDA only

    return retention_triton(*args, **kwargs)


def _triton_key_sum(*args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our key-sum read kernel, behind its registered operator."""
    from arch_zoo.kernels.key_sum_triton import key_sum_triton  # imported late: Triton is for CUDA only

    return key_sum_triton(*args)


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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The retention core ``o, final_state`` in the kernels' layout: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
    log_gamma ``[H]``, or ``[B, T, H]`` for a decay per token (selective, or trained: the gradient reaches it).

    ``scale`` multiplies q (default ``K ** -0.5``); states are ``[B, H, K, V]``. ``backend`` as in
    :func:`choose_backend`, where a decay per token takes fla under ``auto`` on CUDA (ours refuse it). The PyTorch
    backend is ``core.chunkwise`` on head-first views. ``recompute_states``: see :func:`decayed_linear_attention`.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    per_token = log_gamma.dim() == 3
    if per_token and log_gamma.shape != q.shape[:3]:
        shape = tuple(log_gamma.shape)
        raise ValueError(f"retention: a per-token decay is [B, T, H] = {tuple(q.shape[:3])}; got {shape}")
    if per_token and backend == "auto" and q.device.type == "cuda":
        chosen = "fla"
    else:
        dims = (q.shape[-1], v.shape[-1])
        chosen = choose_backend(backend, q.device, dtype=q.dtype, dims=dims, trained_decay=per_token)
    if chosen == "triton":
        return _triton_chunkwise(
            q, k, v, log_gamma, scale, initial_state, output_final_state, recompute_states=recompute_states
        )
    if chosen == "fla":
        if per_token:  # its g: the decay per token, with a gradient
            g = log_gamma.float().contiguous()
            return _fla_chunk(q, k, v, scale, initial_state, output_final_state, g=g)
        lg = log_gamma.to(device=q.device, dtype=torch.float32)
        return _fla_chunk(q, k, v, scale, initial_state, output_final_state, g_gamma=lg)
    decay = log_gamma.transpose(1, 2) if per_token else log_gamma
    qh, kh, vh = (x.transpose(1, 2) for x in (q * scale, k, v))
    o, state = core.chunkwise(qh, kh, vh, decay, initial_state, output_final_state, chunk_size)
    return o.transpose(1, 2), state


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
    (``[B, H]``): on CUDA in the same launch as the state. ``auto`` takes our step kernel on CUDA.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = choose_backend(backend, q.device)
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
        if key_sum is not None:  # fla has no key-sum read: the PyTorch step's one-line update
            key_sum.mul_(log_gamma.exp().to(key_sum.dtype)[None, :, None]).add_(k3.to(key_sum.dtype))
            zq = scale * (q3.to(key_sum.dtype) * key_sum).sum(-1)
    else:
        out = core.step(q3, k3, v3, state, log_gamma, scale, key_sum)
        o, zq = out if key_sum is not None else (out, None)
    o = o[:, None] if timed else o
    return o if zq is None else (o, zq)
