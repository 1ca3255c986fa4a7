"""H3 and the FFT long convolution, against the paper's equations written naively (loops, explicit recurrences).

Tolerances. The FFT computes every output from all inputs through O(log T) butterfly stages, so its rounding error
is ~eps * log T relative to the signal, not to each output: float64 agrees with direct evaluation to ~1e-15
(we assert 1e-12), float32 to ~1e-6 (we assert 1e-5; about 3e-6 is measured at T = 2048). The recurrent decoding
form accumulates its own rounding, also ~1e-6 relative in float32.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import functional_call

from arch_zoo import ConfigError, build_mixer
from arch_zoo.convolutions import fft_causal_conv, fft_size
from arch_zoo.mixers.h3 import H3Config

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
CONFIGS = {
    "default": H3Config(name="h3"),
    "multihead": H3Config(name="h3", head_dim=4, d_state=8),
    "real": H3Config(name="h3", complex_ssm=False, d_state=6),
    "bilinear": H3Config(name="h3", discretization="bilinear", d_state=8, head_dim=2),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def naive_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s<=t} k_{t-s} u_s, one output at a time."""
    y = torch.zeros_like(u)
    for t in range(u.shape[-1]):
        for s in range(max(0, t - k.shape[-1] + 1), t + 1):
            y[..., t] += k[..., t - s] * u[..., s]
    return y


def make_h3(config: H3Config, d_model: int = 16, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    return build_mixer(config, d_model).to(dtype).eval()


def discretised(ssm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A_bar, B_bar, C from the continuous parameters, in the textbook forms of the two discretisations."""
    dt = ssm.log_dt.exp()[:, None]
    A = -ssm.log_A_real.exp()
    B, C = ssm.B, ssm.C
    if ssm.complex:
        A = A + 1j * ssm.A_imag
        B, C = torch.view_as_complex(B), torch.view_as_complex(C)
    if ssm.discretization == "zoh":  # (dt A)^-1 (exp(dt A) - I) dt B
        return torch.exp(dt * A), (torch.exp(dt * A) - 1) / (dt * A) * dt * B, C
    inv = 1 / (1 - dt * A / 2)  # (I - dt/2 A)^-1
    return inv * (1 + dt * A / 2), inv * dt * B, C


def naive_ssm(ssm, u: torch.Tensor) -> torch.Tensor:
    """x_t = A_bar x_{t-1} + B_bar u_t, y_t = C x_t (2 Re for conjugate pairs); u: [B, H, channels, T]."""
    Ab, Bb, C = discretised(ssm)
    x = torch.zeros(*u.shape[:-1], Ab.shape[-1], dtype=Bb.dtype)
    ys = []
    for t in range(u.shape[-1]):
        x = Ab[:, None] * x + Bb[:, None] * u[..., t, None]
        y = (C[:, None] * x).sum(-1)
        ys.append(2 * y.real if ssm.complex else y)
    return torch.stack(ys, dim=-1)


def naive_h3(mixer, x: torch.Tensor) -> torch.Tensor:
    """The H3 layer step by step from the paper: projections, shift SSM, k v^T per head, diagonal SSM, q."""
    B, T, D = x.shape
    H, d = mixer.n_heads, mixer.head_dim
    q, k, v = mixer.in_proj(x).view(B, T, 3, D).unbind(2)  # [B, T, D]
    k = naive_causal_conv(k.transpose(1, 2), mixer.shift_kernel).transpose(1, 2) + mixer.shift_skip * k
    q, k, v = (z.reshape(B, T, H, d) for z in (q, k, v))
    kv = torch.einsum("bthi,bthj->bhijt", k, v)
    s = naive_ssm(mixer.ssm, kv.reshape(B, H, d * d, T)).view(B, H, d, d, T)
    s = s + mixer.ssm_skip[:, None, None, None] * kv
    y = torch.einsum("bthi,bhijt->bthj", q, s)
    return mixer.out_proj(y.reshape(B, T, D))


# ---- the FFT long convolution -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel_len", [37, 5, 50])  # full length, a short FIR, longer than the input
def test_fft_conv_matches_direct_convolution(dtype, kernel_len):
    torch.manual_seed(0)
    u = torch.randn(2, 3, 37, dtype=dtype)
    k = torch.randn(3, kernel_len, dtype=dtype)
    skip = torch.randn(3, dtype=dtype)
    expected = naive_causal_conv(u.double(), k.double()) + skip.double()[:, None] * u.double()
    y = fft_causal_conv(u, k, skip)
    assert y.dtype == dtype
    assert rel_err(y.double(), expected) < TOL[dtype]


def test_fft_size_is_smooth_and_large_enough():
    for n in [1, 7, 74, 97, 2 * 1031]:
        size = fft_size(n)
        assert size >= n and size - n < max(8, n // 4)
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1


def test_fft_conv_gradcheck():
    torch.manual_seed(0)
    u = torch.randn(2, 2, 7, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_causal_conv, (u, k, skip))


@pytest.mark.parametrize("kernel_len", [9, 3, 12])  # full length, a short filter, taps past the input (dropped)
def test_fft_conv_gradients_with_a_broadcast_filter_and_a_strided_input(kernel_len):
    """The hand-written backward (two correlations) against gradcheck, where the filter broadcasts over batch and a
    channel dim (H3's SSM: ``u [B, H, d*d, T]``, ``k [H, 1, T]``) and ``u`` is a time-strided view, as the mixers
    pass it."""
    torch.manual_seed(0)
    u = torch.randn(2, 9, 3, 2, dtype=torch.float64).permute(0, 2, 3, 1).requires_grad_()  # [B, H, C, T], T strided
    k = torch.randn(3, 1, kernel_len, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_causal_conv, (u, k))


def test_the_fft_convolution_backward_runs_real_transforms_on_contiguous_rows():
    """Autograd's gradient of ``rfft`` ran a complex-to-complex transform over a zero-filled full spectrum (on an H100,
    H3's copies and transforms were a third of its step). The hand-written backward runs real transforms only, each
    on contiguous rows, even where the mixer hands over a time-strided view."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Transforms(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, bool]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = "aten::_fft_r2c" if func.name() == "arch_zoo::rfft_rows" else func.name()  # the op around r2c
            if name.startswith("aten::_fft"):
                self.calls.append((name, args[0].is_contiguous()))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    u = torch.randn(2, 37, 3, dtype=torch.float64).transpose(1, 2).requires_grad_()  # [B, C, T], T strided
    k = torch.randn(3, 37, dtype=torch.float64, requires_grad=True)
    y = fft_causal_conv(u, k, torch.randn(3, dtype=torch.float64))
    with Transforms() as backward:
        y.backward(torch.randn_like(y))
    names = [name for name, _ in backward.calls]
    assert "aten::_fft_c2c" not in names, names
    assert names.count("aten::_fft_r2c") == 3 and names.count("aten::_fft_c2r") == 2, names  # dy, u, k; du, dk
    assert all(contiguous for _, contiguous in backward.calls), backward.calls
    op = torch.ops.arch_zoo.rfft_rows.default
    assert torch.Tag.needs_contiguous_strides in op.tags  # a compiled graph hands the transform contiguous rows
    torch.library.opcheck(op, (torch.randn(2, 3, 40), 64))


def test_the_fft_convolution_compiles_to_the_eager_values_and_gradients():
    """Traced whole (the Function and the transform operator's shape function), it gives eager's values and
    gradients."""
    torch.manual_seed(0)
    u = torch.randn(2, 33, 4).transpose(1, 2).requires_grad_()
    k = torch.randn(4, 33, requires_grad=True)
    skip = torch.randn(4)
    dy = torch.randn(2, 4, 33)
    grads = []
    for fn in (fft_causal_conv, torch.compile(fft_causal_conv, fullgraph=True)):
        y = fn(u, k, skip)
        grads.append((y, *torch.autograd.grad(y, (u, k), dy)))
    for compiled, eager in zip(grads[1], grads[0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_fft_conv_gradients_of_half_inputs_come_back_in_their_dtype():
    """bf16 inputs are transformed in float32 and their gradients returned in bf16, at bf16's precision."""
    torch.manual_seed(0)
    u64 = torch.randn(2, 4, 50, dtype=torch.float64, requires_grad=True)
    k64 = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    u, k = (x.detach().bfloat16().requires_grad_() for x in (u64, k64))
    dy = torch.randn(2, 4, 50, dtype=torch.float64)
    fft_causal_conv(u, k).backward(dy.bfloat16())
    naive_causal_conv(u64, k64).backward(dy)
    assert u.grad.dtype == k.grad.dtype == torch.bfloat16
    assert rel_err(u.grad.double(), u64.grad) < 2e-2
    assert rel_err(k.grad.double(), k64.grad) < 2e-2


# ---- the diagonal SSM -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "real", "bilinear"])
def test_ssm_kernel_and_forms_match_the_recurrence(name):
    ssm = make_h3(CONFIGS[name]).ssm
    torch.manual_seed(1)
    u = torch.randn(2, ssm.log_dt.shape[0], 3, 30, dtype=torch.float64)
    with torch.no_grad():
        expected = naive_ssm(ssm, u)
        for length in (1, 16, 30):  # the kernel is the impulse response (lengths around the sqrt split)
            impulse = torch.zeros(1, ssm.log_dt.shape[0], 1, length, dtype=torch.float64)
            impulse[..., 0] = 1
            assert rel_err(ssm.kernel(length), naive_ssm(ssm, impulse)[0, :, 0]) < 1e-12
        y, _ = ssm(u, return_state=False)
        assert rel_err(y, expected) < 1e-12
        pieces, state = [], None  # chunk, single tokens (the recurrence), chunk
        for lo, hi in [(0, 11), (11, 12), (12, 13), (13, 30)]:
            y, state = ssm(u[..., lo:hi], state) if state is not None else ssm(u[..., lo:hi])
            pieces.append(y)
        assert rel_err(torch.cat(pieces, dim=-1), expected) < 1e-12


@pytest.mark.parametrize("name", ["default", "real", "bilinear"])
def test_ssm_kernel_gradcheck(name):
    ssm = make_h3(dataclasses.replace(CONFIGS[name], d_state=4), d_model=4).ssm

    class Kernel(torch.nn.Module):  # functional_call runs forward; the kernel is a function of the parameters
        def __init__(self) -> None:
            super().__init__()
            self.ssm = ssm

        def forward(self, length: int) -> torch.Tensor:
            return self.ssm.kernel(length)

    names = [f"ssm.{n}" for n, _ in ssm.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in ssm.parameters())

    def kernel(*values: torch.Tensor) -> torch.Tensor:
        return functional_call(Kernel(), dict(zip(names, values, strict=True)), (6,), strict=True)

    assert torch.autograd.gradcheck(kernel, values)


def test_ssm_init_and_optimiser_settings():
    mixer = make_h3(CONFIGS["default"], d_model=32, dtype=torch.float32)
    ssm = mixer.ssm
    dt = ssm.log_dt.exp()
    assert ((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6))).all()
    assert torch.allclose(-ssm.log_A_real.exp(), torch.full_like(ssm.log_A_real, -0.5))
    assert torch.allclose(ssm.A_imag[0], torch.pi * torch.arange(32.0))  # S4D-Lin, d_state/2 modes
    for p in (ssm.log_dt, ssm.log_A_real, ssm.A_imag, ssm.B):
        assert p._optim == {"lr_max": 1e-3, "weight_decay": 0.0}  # min(1e-3, run lr), as the reference config
    for p in (ssm.C, mixer.shift_kernel, mixer.in_proj.weight, mixer.out_proj.weight):
        assert not hasattr(p, "_optim")
    no_lr = make_h3(dataclasses.replace(CONFIGS["default"], ssm_lr=None), d_model=8)
    assert no_lr.ssm.log_dt._optim == {"weight_decay": 0.0}
    real = make_h3(CONFIGS["real"], d_model=8)
    assert torch.allclose(-real.ssm.log_A_real.exp()[0], -torch.arange(1.0, 7.0, dtype=torch.float64))  # S4D-Real


# ---- the mixer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixer_matches_the_equations(name):
    mixer = make_h3(CONFIGS[name])
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    with torch.no_grad():
        y, _ = mixer(x, return_state=False)
        assert rel_err(y, naive_h3(mixer, x)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_recurrent_decoding_matches_fft(name, dtype):
    mixer = make_h3(CONFIGS[name], dtype=dtype)
    x = torch.randn(2, 48, 16, dtype=dtype)
    with torch.no_grad():
        full, _ = mixer(x)
        steps, state = [], None
        for t in range(x.shape[1]):  # state=None on the first token: the SSMs start from zero
            y, state = mixer(x[:, t : t + 1], state)
            steps.append(y)
        assert rel_err(torch.cat(steps, dim=1), full) < TOL[dtype]
        pieces, state = [], None
        for lo, hi in [(0, 5), (5, 6), (6, 30), (30, 48)]:  # a prompt shorter than the shift register, then more
            y, state = mixer(x[:, lo:hi], state)
            pieces.append(y)
        assert rel_err(torch.cat(pieces, dim=1), full) < TOL[dtype]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal(name):
    mixer = make_h3(CONFIGS[name])
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 12:] = torch.randn_like(x2[:, 12:])
    with torch.no_grad():
        y, _ = mixer(x, return_state=False)
        y2, _ = mixer(x2, return_state=False)
    assert rel_err(y2[:, :12], y[:, :12]) < 1e-12
    assert rel_err(y2[:, 12:], y[:, 12:]) > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_size_counts_the_state(name):
    mixer = make_h3(CONFIGS[name])
    with torch.no_grad():
        _, state = mixer(torch.randn(1, 9, 16, dtype=torch.float64))
    numbers = sum(s.numel() * (2 if s.is_complex() else 1) for s in state.values())
    assert mixer.state_size(9) == mixer.state_size(10_000) == numbers


@pytest.mark.parametrize(
    "change, message",
    [
        ({"head_dim": 3}, "head_dim"),
        ({"d_state": 7}, "complex_ssm=false"),
        ({"discretization": "euler"}, "zoh or bilinear"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
    ],
)
def test_config_errors_name_the_fix(change, message):
    with pytest.raises(ConfigError, match=message):
        build_mixer(dataclasses.replace(CONFIGS["default"], **change), 16)
