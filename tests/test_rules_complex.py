"""Complex jets and Fourier transforms (rules/complex.py, and the complex paths of the arithmetic
rules) against oracles that share no code with the engine: the finite-difference Chebyshev fit of
the plain op along the path (``fd_jet``, complex outputs through view_as_real), float64 nested
autograd (``baseline.jet``) on real-valued end results, and closed forms."""

import pytest
import torch
import torch.nn.functional as F
from _oracle import assert_matches_fd, rel_err

import curvrate_fast as cf
from curvrate_fast import baseline
from curvrate_fast.jets.tensor import JetError, make_jet

D64 = torch.float64
C128 = torch.complex128


def _g(seed):
    return torch.Generator().manual_seed(seed)


def crand(*shape, seed, scale=1.0):
    g = _g(seed)
    return torch.complex(torch.randn(shape, generator=g, dtype=D64),
                         torch.randn(shape, generator=g, dtype=D64)) * scale


def rrand(*shape, seed, scale=1.0):
    return torch.randn(shape, generator=_g(seed), dtype=D64) * scale


def ours(fn, inputs, directions, order):
    """fn on jets (x, u) of every input; the full coefficient stack (order + 1, *shape)."""
    out = fn(*[make_jet([x, u], order) for x, u in zip(inputs, directions)])
    return out.full_coeffs().resolve_conj()


def check_fd(fn, inputs, directions, order=4):
    c = ours(fn, inputs, directions, order)
    plain = fn(*inputs)
    assert c.dtype == plain.dtype and c.shape[1:] == plain.shape
    assert_matches_fd(c, lambda *a: fn(*a).resolve_conj(), inputs, directions, order)


# -- holomorphic elementwise rules and linear maps meet complex jets -----------------------------

_W = crand(3, 5, seed=7)            # a complex constant
_WR = rrand(4, 3, 5, seed=8)        # a real constant of higher rank (broadcasting)

HOLOMORPHIC = {
    "mul_jets": lambda z: z * torch.sin(z),
    "mul_const_complex_higher_rank": lambda z: z * (_WR * (1 + 2j)),
    "mul_python_complex": lambda z: (0.5 - 1.5j) * z,
    "div": lambda z: torch.exp(z) / (z + 3),
    "rdiv_complex_scalar": lambda z: (1 + 1j) / (z + 3),
    "exp": torch.exp,
    "log": lambda z: torch.log(z + 3),
    "sqrt": lambda z: torch.sqrt(z + 3),
    "rsqrt": lambda z: torch.rsqrt(z + 3),
    "pow_real_scalar": lambda z: (z + 3) ** 2.5,
    "pow_int": lambda z: z ** 3,
    "pow_complex_scalar": lambda z: (z + 3) ** (0.7 - 0.4j),
    "pow_complex_tensor": lambda z: torch.pow(z + 3, _W),
    "pow_jet_jet": lambda z: (z + 3) ** torch.sin(z),
    "rpow": lambda z: 2.0 ** z,
    "sin_cos": lambda z: torch.sin(z) + torch.cos(2 * z),
    "tan": lambda z: torch.tan(0.3 * z),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "reciprocal": lambda z: torch.reciprocal(z + 3),
    "square": torch.square,
    "matmul_jets": lambda z: z @ z.mT,
    "matmul_const": lambda z: z @ _W.mT,
    "einsum": lambda z: torch.einsum("ij,kj->ik", z, _W),
    "linear": lambda z: F.linear(z, _W),
    "sum_mean": lambda z: z.sum(0) + z.mean(),
    "cumsum": lambda z: z.cumsum(1),
    "reshape_permute": lambda z: z.reshape(5, 3).permute(1, 0) * z,
    "cat_complex_const": lambda z: torch.cat([z, _W], 0),
    "stack_complex_const": lambda z: torch.stack([z, _W]),
    "index": lambda z: z[[0, 2], 1:4] * z[1:, :3].sum(),
    "where": lambda z: torch.where(_W.real > 0, z, _W),
    "add_real_const": lambda z: z + _WR,
    "neg_sub": lambda z: 2 - (-z),
}


@pytest.mark.parametrize("name", sorted(HOLOMORPHIC))
def test_holomorphic_rules_on_complex_jets(name):
    z, u = crand(3, 5, seed=11, scale=0.7), crand(3, 5, seed=12, scale=0.7)
    check_fd(HOLOMORPHIC[name], [z], [u], order=4)


def test_both_operands_complex_jets():
    a, da = crand(4, 3, seed=1), crand(4, 3, seed=2)
    b, db = crand(3, seed=3) + 3, crand(3, seed=4)
    for f in (lambda x, y: x * y, lambda x, y: x / y, lambda x, y: x @ y,
              lambda x, y: torch.complex(x.real, y.imag) * x, lambda x, y: torch.cat([x, y[None]])):
        check_fd(f, [a, b], [da, db], order=3)


# -- the non-holomorphic maps and the real <-> complex boundary ---------------------------------

NON_HOLOMORPHIC = {
    "abs": torch.abs,
    "abs_method": lambda z: z.abs() * z,
    "sgn": torch.sgn,
    "angle": torch.angle,
    "real": torch.real,
    "imag": torch.imag,
    "real_prop": lambda z: z.real * z.imag,
    "conj": lambda z: torch.conj(z) * z,
    "conj_method": lambda z: z.conj() + 1j * z,
    "conj_physical": torch.conj_physical,
    "resolve_conj": lambda z: z.conj().resolve_conj(),
    "resolve_neg": lambda z: torch.resolve_neg(-z),
    "mH": lambda z: z.mH,
    "adjoint": lambda z: torch.adjoint(z) @ z,
    "H": lambda z: z.H,
    "view_as_real": lambda z: torch.view_as_real(torch.exp(z)),
    "view_as_real_of_real_part": lambda z: torch.view_as_real(z) * torch.view_as_real(z).flip(-1),
    "abs_squared_via_conj": lambda z: (z * z.conj()).real,
}


@pytest.mark.parametrize("name", sorted(NON_HOLOMORPHIC))
def test_non_holomorphic_rules(name):
    z, u = crand(3, 4, seed=21), crand(3, 4, seed=22)
    check_fd(NON_HOLOMORPHIC[name], [z], [u], order=4)


def test_abs_sgn_angle_of_a_longer_jet_0d_and_odd_shapes():
    for shape in [(), (7,), (2, 3, 5)]:
        z, u = crand(*shape, seed=31), crand(*shape, seed=32)
        for f in (lambda w: torch.abs(torch.exp(w) + w), lambda w: torch.sgn(w * w + 1),
                  lambda w: torch.angle(torch.sin(w) + 2j)):
            check_fd(f, [z], [u], order=5)


def test_abs_sgn_angle_at_zero_follow_autograd_and_stay_finite():
    """At z_0 = 0 |z|, sgn z and angle z have no derivative; like autograd (whose derivative there
    is 0) the higher coefficients are 0, and the backward stays finite."""
    z = torch.tensor([0j, 1 + 1j, 0j], dtype=C128)
    w = torch.tensor([0.3, -0.2, 1.1], dtype=D64, requires_grad=True)
    for op, first in ((torch.abs, torch.abs(z)), (torch.sgn, torch.sgn(z)), (torch.angle, torch.angle(z))):
        u = torch.complex(w, 2 * w)
        c = op(make_jet([z, u], 3)).full_coeffs()
        assert torch.equal(c[0], first)
        assert bool((c[1:, [0, 2]] == 0).all())
        assert bool((c[1:, 1] != 0).any())
        (g,) = torch.autograd.grad(torch.view_as_real(c.resolve_conj()).sum() if c.is_complex()
                                   else c.sum(), w)
        assert bool(torch.isfinite(g).all())
    # first order: autograd's d|z| = Re(conj(sgn z) z′) on every element, zero included
    zz = z.clone().requires_grad_(False)
    t = torch.zeros((), dtype=D64, requires_grad=True)
    u = torch.complex(w, 2 * w).detach()
    (d,) = torch.autograd.grad(torch.abs(zz + t * u).sum(), t)
    assert torch.allclose(torch.abs(make_jet([z, u], 1)).full_coeffs()[1].sum(), d)


def test_abs_of_real_jet_unchanged():
    x, u = rrand(6, seed=41), rrand(6, seed=42)
    c = torch.abs(make_jet([x, u], 3)).full_coeffs()
    assert torch.equal(c[1], torch.sign(x) * u)
    assert torch.equal(c[0], x.abs())


def test_angle_and_sgn_of_real_jets_are_constants():
    x, u = rrand(5, seed=43), rrand(5, seed=44)
    for op in (torch.angle, torch.sgn):
        with cf.track_ops() as report:
            out = op(make_jet([x, u], 3))
        assert not isinstance(out, cf.JetTensor) and torch.equal(out, op(x))
        assert report.constants


REAL_TO_COMPLEX = {
    "complex_both": lambda a, b: torch.complex(a, b),
    "complex_const_imag": lambda a, b: torch.complex(a, _WR[0, 0]),
    "polar": lambda a, b: torch.polar(a.abs() + 1, b),
    "polar_const_angle": lambda a, b: torch.polar(a * a + 1, _WR[0, 0]),
    "view_as_complex": lambda a, b: torch.view_as_complex(torch.stack([a, b], -1)),
    "view_as_complex_after_permute": lambda a, b: torch.view_as_complex(
        torch.stack([a, b], 0).permute(1, 2, 0).contiguous()),
    "cdouble": lambda a, b: a.cdouble() * b,
    "to_complex": lambda a, b: a.to(C128) + b.to(torch.complex128) * 1j,
    "type_complex": lambda a, b: a.type(C128),
    "real_base_complex_exponent": lambda a, b: a ** (0.5 + 0.5j) + (b + 4) ** torch.complex(a, b),
}


@pytest.mark.parametrize("name", sorted(REAL_TO_COMPLEX))
def test_real_to_complex(name):
    a, da = rrand(3, 5, seed=51), rrand(3, 5, seed=52)
    b, db = rrand(3, 5, seed=53), rrand(3, 5, seed=54)
    check_fd(REAL_TO_COMPLEX[name], [a, b], [da, db], order=4)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_cfloat_chalf_casts():
    a, da = rrand(3, 4, seed=55), rrand(3, 4, seed=56)
    for m, dt in (("cfloat", torch.complex64), ("chalf", torch.complex32)):
        c = getattr(make_jet([a, da], 2), m)().full_coeffs()
        assert c.dtype == dt
        c = c.to(C128)
        assert torch.equal(c[0], getattr(a, m)().to(C128)) and torch.equal(c[1], getattr(da, m)().to(C128))
        assert bool((c[2] == 0).all())


def test_view_as_complex_of_a_permuted_jet():
    """The jet's coefficient layout is the engine's own (the jet looks contiguous to the model):
    a permuted stack is viewed as complex through a contiguous copy, with the same coefficients."""
    a, da = rrand(3, 5, seed=57), rrand(3, 5, seed=58)
    b, db = rrand(3, 5, seed=59), rrand(3, 5, seed=60)
    ja, jb = make_jet([a, da], 2), make_jet([b, db], 2)
    got = torch.view_as_complex(torch.stack([ja, jb], 0).permute(1, 2, 0)).full_coeffs()
    assert torch.equal(got, torch.complex(ja, jb).full_coeffs())


# -- Fourier transforms -------------------------------------------------------------------------

FFT_REAL_IN = {
    "fft": lambda x: torch.fft.fft(x),
    "fft_dim0_n": lambda x: torch.fft.fft(x, n=7, dim=0),
    "ifft": lambda x: torch.fft.ifft(x, dim=1, norm="ortho"),
    "rfft": lambda x: torch.fft.rfft(x),
    "rfft_n": lambda x: torch.fft.rfft(x, n=9, dim=-2, norm="forward"),
    "ihfft": lambda x: torch.fft.ihfft(x),
    "hfft": lambda x: torch.fft.hfft(x, n=6),
    "irfft": lambda x: torch.fft.irfft(x, dim=0),
    "fft2": lambda x: torch.fft.fft2(x),
    "ifft2_s": lambda x: torch.fft.ifft2(x, s=(3, 4), dim=(0, 2)),
    "rfft2": lambda x: torch.fft.rfft2(x),
    "irfft2": lambda x: torch.fft.irfft2(x),
    "hfft2": lambda x: torch.fft.hfft2(x),
    "ihfft2": lambda x: torch.fft.ihfft2(x),
    "fftn_all": lambda x: torch.fft.fftn(x),
    "fftn_s": lambda x: torch.fft.fftn(x, s=(4, 6)),
    "ifftn_dim": lambda x: torch.fft.ifftn(x, dim=(0, -1)),
    "rfftn": lambda x: torch.fft.rfftn(x, dim=(1, 2)),
    "irfftn": lambda x: torch.fft.irfftn(x),
    "hfftn": lambda x: torch.fft.hfftn(x, dim=(0, 1)),
    "ihfftn": lambda x: torch.fft.ihfftn(x),
    "fftshift": lambda x: torch.fft.fftshift(x),
    "ifftshift_dim": lambda x: torch.fft.ifftshift(x, dim=(0, 2)),
}


@pytest.mark.parametrize("name", sorted(FFT_REAL_IN))
def test_fft_of_real_jets(name):
    # a nonlinear map first, so that every coefficient of the jet entering the transform is non-zero
    f = FFT_REAL_IN[name]
    x, u = rrand(3, 5, 4, seed=61), rrand(3, 5, 4, seed=62)
    check_fd(lambda v: f(torch.sin(v)), [x], [u], order=3)


FFT_COMPLEX_IN = {
    "fft": lambda z: torch.fft.fft(z, dim=0),
    "ifft": lambda z: torch.fft.ifft(z),
    "irfft": lambda z: torch.fft.irfft(z, n=8),
    "hfft": lambda z: torch.fft.hfft(z),
    "fft2": lambda z: torch.fft.fft2(z, norm="ortho"),
    "ifftn": lambda z: torch.fft.ifftn(z, s=(4, 3)),
    "irfft2": lambda z: torch.fft.irfft2(z),
    "irfftn": lambda z: torch.fft.irfftn(z, dim=(0,)),
    "hfft2": lambda z: torch.fft.hfft2(z),
    "hfftn": lambda z: torch.fft.hfftn(z, s=(3, 6)),
    "fftshift": lambda z: torch.fft.fftshift(z, dim=1),
}


@pytest.mark.parametrize("name", sorted(FFT_COMPLEX_IN))
def test_fft_of_complex_jets(name):
    f = FFT_COMPLEX_IN[name]
    z, u = crand(3, 5, seed=63, scale=0.5), crand(3, 5, seed=64, scale=0.5)
    check_fd(lambda v: f(torch.exp(v)), [z], [u], order=3)


def test_fft_of_an_input_jet_is_exactly_linear():
    """A linear map of the input jet (x, u): coefficients f(x), f(u), 0, …, 0 exactly."""
    x, u = rrand(2, 6, seed=65), rrand(2, 6, seed=66)
    c = torch.fft.rfft(make_jet([x, u], 4), dim=-1).full_coeffs()
    assert torch.allclose(c[0], torch.fft.rfft(x)) and torch.allclose(c[1], torch.fft.rfft(u))
    assert bool((c[2:] == 0).all())
    assert bool((torch.fft.fft(make_jet([x, u], 0), dim=0).full_coeffs()[0] == torch.fft.fft(x, dim=0)).all())


def test_fft_dim_errors_like_torch():
    x = make_jet([rrand(3, 4, seed=1), rrand(3, 4, seed=2)], 2)
    with pytest.raises(IndexError):
        torch.fft.fft(x, dim=2)        # would be a valid dim of the coefficient stack
    with pytest.raises(IndexError):
        torch.fft.fft(x, dim=-3)
    with pytest.raises(RuntimeError):
        torch.fft.fftn(x, s=(2, 2, 2))


# -- real-valued end results against nested autograd; parameter gradients -----------------------

def test_power_spectrum_against_nested_autograd():
    x, u = rrand(4, 16, seed=71), rrand(4, 16, seed=72)
    f = lambda v: (torch.fft.rfft(torch.tanh(v), norm="ortho").abs() ** 2).sum(-1)
    g = lambda v: torch.abs(torch.fft.fft(v * v, dim=0)).sum() + torch.angle(torch.fft.fft(v)[:, 1:4]).sum()
    for fn in (f, g):
        ref = baseline.jet(fn, x, u, 5)
        got = cf.jet(fn, x, u, 5)
        assert rel_err(got, ref) < 1e-10


class SpectralConv1d(torch.nn.Module):
    """An FNO-style layer: rfft → complex weight on the lowest modes → irfft, then a pointwise map."""

    def __init__(self, channels: int, modes: int, seed: int):
        super().__init__()
        g = _g(seed)
        w = torch.randn(channels, channels, modes, 2, generator=g, dtype=D64) / channels
        self.weight = torch.nn.Parameter(torch.view_as_complex(w))
        self.bias = torch.nn.Parameter(torch.randn(channels, 1, generator=g, dtype=D64) * 0.1)
        self.modes = modes

    def forward(self, x):
        n = x.shape[-1]
        X = torch.fft.rfft(x)
        Y = torch.einsum("bix,iox->box", X[..., :self.modes], self.weight)
        Y = torch.cat([Y, torch.zeros(Y.shape[:-1] + (n // 2 + 1 - self.modes,), dtype=Y.dtype)], -1)
        return torch.tanh(torch.fft.irfft(Y, n=n) + self.bias + x)


def test_spectral_conv_layer_and_its_parameter_gradients():
    layer = SpectralConv1d(3, 4, seed=73)
    x, u = rrand(2, 3, 12, seed=74), rrand(2, 3, 12, seed=75)
    loss = lambda v: (layer(v) ** 2).mean(dim=(1, 2))
    K = 4
    ref = baseline.jet(loss, x, u, K)
    got = cf.jet(loss, x, u, K)
    assert rel_err(got, ref) < 1e-10
    params = [layer.weight, layer.bias]
    g_ref = torch.autograd.grad(ref[1:].sum() + (ref[2:] ** 2).sum(), params)
    g_got = torch.autograd.grad(got[1:].sum() + (got[2:] ** 2).sum(), params)
    for a, b in zip(g_got, g_ref):
        assert a.dtype == b.dtype and rel_err(a, b) < 1e-9


def test_parameter_gradient_through_abs_sgn_angle_polar():
    """A real parameter enters complex intermediates through the non-holomorphic maps; the gradient
    of the (real) coefficients equals nested autograd's."""
    w = torch.nn.Parameter(rrand(6, seed=81))
    x, u = rrand(6, seed=82), rrand(6, seed=83)

    def fn(v):
        z = torch.polar(v * v + 1, w * v) + torch.complex(w, v)
        return torch.abs(z) + torch.angle(z * (1 + 2j)) + torch.view_as_real(torch.sgn(z)).sum(-1) \
            + torch.fft.irfft(torch.fft.rfft(z.real * w), n=6)

    K = 4
    ref = baseline.jet(fn, x, u, K)
    got = cf.jet(fn, x, u, K)
    assert rel_err(got, ref) < 1e-10
    (g_ref,) = torch.autograd.grad((ref[1:] ** 2).sum(), w)
    (g_got,) = torch.autograd.grad((got[1:] ** 2).sum(), w)
    assert rel_err(g_got, g_ref) < 1e-9


def test_complex_parameter_gradient_through_holomorphic_rules():
    """A complex parameter: torch's convention (the conjugate Wirtinger gradient of a real loss)
    through mul, exp, log, div and the FFTs, against nested autograd."""
    w = torch.nn.Parameter(crand(5, seed=84, scale=0.5))
    x, u = rrand(5, seed=85), rrand(5, seed=86)

    def fn(v):
        z = torch.exp(w * v) / (torch.log(v * v + 2) + w) + torch.fft.ifft(w * v.cfloat().cdouble())
        return (z * z.conj()).real + torch.sqrt(z + 4).imag

    ref = baseline.jet(fn, x, u, 3)
    got = cf.jet(fn, x, u, 3)
    assert rel_err(got, ref) < 1e-10
    (g_ref,) = torch.autograd.grad(ref.sum(), w)
    (g_got,) = torch.autograd.grad(got.sum(), w)
    assert rel_err(g_got, g_ref) < 1e-9


# -- short-time Fourier transforms --------------------------------------------------------------

def test_stft_linear_in_signal_batched_and_unbatched():
    win = torch.hann_window(8, dtype=D64)
    for shape in [(40,), (2, 33)]:
        x, u = rrand(*shape, seed=91), rrand(*shape, seed=92)
        for kw in (dict(center=True, pad_mode="reflect"), dict(center=False, normalized=True),
                   dict(onesided=False)):
            f = lambda v: torch.stft(torch.sin(v), 8, hop_length=3, window=win, return_complex=True, **kw)
            check_fd(f, [x], [u], order=3)
        check_fd(lambda v: torch.sin(v).stft(8, 4, window=win, return_complex=True), [x], [u], order=3)


def test_stft_jet_window_is_bilinear():
    x, u = rrand(30, seed=93), rrand(30, seed=94)
    w, dw = rrand(6, seed=95), rrand(6, seed=96)
    both = lambda v, win: torch.stft(torch.sin(v), 6, hop_length=2, window=torch.exp(win),
                                     return_complex=True)
    check_fd(both, [x, w], [u, dw], order=4)
    only_window = lambda win: torch.stft(x, 6, hop_length=2, window=win * win, return_complex=True)
    check_fd(only_window, [w], [dw], order=3)


def test_istft_linear_in_the_spectrogram():
    win = torch.hann_window(8, dtype=D64)
    sig = rrand(2, 40, seed=97)
    X = torch.stft(sig, 8, hop_length=2, window=win, return_complex=True)
    dX = crand(*X.shape, seed=98)
    for Z, dZ in ((X, dX), (X[0], dX[0])):
        f = lambda v: torch.istft(torch.exp(0.1 * v) * v, 8, hop_length=2, window=win, length=40)
        check_fd(f, [Z], [dZ], order=3)
        g = lambda v: v.istft(8, 2, window=win)
        check_fd(g, [Z], [dZ], order=2)


def test_istft_jet_window_refused():
    win = torch.hann_window(8, dtype=D64)
    X = torch.stft(rrand(40, seed=99), 8, hop_length=2, window=win, return_complex=True)
    wj = make_jet([win, rrand(8, seed=100)], 2)
    with pytest.raises(JetError, match="istft"):
        torch.istft(X, 8, hop_length=2, window=wj)


# -- what cannot be right raises -------------------------------------------------------------------

def test_errors():
    z = make_jet([crand(3, seed=101), crand(3, seed=102)], 2)
    with pytest.raises(JetError, match="zero base"):
        torch.pow(z * 0, 0.5 + 1j)
    with pytest.raises(JetError, match="view_as_real"):
        torch.view_as_real(z.conj())
    with pytest.raises(RuntimeError, match="imag"):
        torch.imag(make_jet([rrand(3, seed=1), rrand(3, seed=2)], 2))
    # ops that torch does not define for complex values refuse complex jets as torch does
    for op in (torch.relu, lambda v: torch.clamp(v, 0, 1), lambda v: torch.maximum(v, v),
               lambda v: v.max(), lambda v: torch.where(v > 0, v, v)):
        with pytest.raises((RuntimeError, NotImplementedError)):
            op(z)


def test_real_jet_real_and_conj_are_the_jet():
    x = make_jet([rrand(3, seed=1), rrand(3, seed=2)], 2)
    assert torch.real(x) is x and x.real is x and torch.conj(x) is x and x.conj() is x
    assert torch.equal(torch.conj_physical(x).full_coeffs(), x.full_coeffs())


def test_view_as_real_and_complex_copies():
    z, u = crand(3, 4, seed=121), crand(3, 4, seed=122)
    check_fd(lambda v: torch.view_as_real_copy(v.conj()), [z], [u], order=2)
    check_fd(lambda v: torch.view_as_complex_copy(torch.view_as_real(v) * 2), [z], [u], order=2)
    out = torch.view_as_real_copy(make_jet([z, u], 2))
    out.mul_(2)  # a copy, not a view: in-place is allowed
    assert torch.equal(out.full_coeffs()[1], 2 * torch.view_as_real(u))


def test_parameter_gradient_helper_passes_on_a_correct_rule():
    _grad_through(torch.exp)
    _grad_through(lambda z: torch.sin(z) * z)


# -- complex jets in rules outside this family (activations, reductions) ------------------------

def _grad_through(op):
    w = torch.nn.Parameter(rrand(5, seed=111))
    z, u = crand(5, seed=112), crand(5, seed=113)
    got = op(make_jet([z * w, u * w], 3)).full_coeffs()
    ref = baseline.jet(lambda t: op(z * w + t * (u * w)), torch.zeros(5, dtype=D64),
                       torch.ones(5, dtype=D64), 3)
    assert rel_err(got, ref) < 1e-10
    (g_got,) = torch.autograd.grad(torch.view_as_real(got).square().sum(), w)
    (g_ref,) = torch.autograd.grad(torch.view_as_real(ref).square().sum(), w)
    assert rel_err(g_got, g_ref) < 1e-9


@pytest.mark.parametrize("op", [torch.tanh, torch.sigmoid], ids=["tanh", "sigmoid"])
def test_activation_parameter_gradient_through_complex_jets(op):
    """The activation jets' Toeplitz backward conjugates the derivative series for complex
    coefficients (torch's convention: grad_in = grad_out · conj(∂out/∂in))."""
    _grad_through(op)


@pytest.mark.parametrize("case", ["vector_norm", "var", "vdot"])
def test_complex_jets_in_reductions(case):
    """|z|² (not z²) in the 2-norm and the variance; vdot conjugates its first argument."""
    if case == "vector_norm":
        check_fd(lambda z: torch.linalg.vector_norm(z), [crand(4, seed=114)], [crand(4, seed=115)], order=3)
    elif case == "var":
        check_fd(lambda z: torch.var(z), [crand(4, seed=116)], [crand(4, seed=117)], order=3)
    else:
        check_fd(lambda z: torch.vdot(z, _W[0]), [crand(5, seed=118)], [crand(5, seed=119)], order=3)
