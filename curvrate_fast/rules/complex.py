"""Taylor rules for complex jets and Fourier transforms.

A jet of a complex tensor has complex coefficients: along the real path t ↦ x + t·u, the value
z(t) = Σ_k z_k t^k with z_k ∈ ℂ. Since t is real, every map that is linear over ℝ acts on each
coefficient on its own (docs/math.md §2, linear maps):

- ``real``, ``imag``, ``conj``, ``view_as_real``, ``view_as_complex``, ``complex``, the complex
  casts and the copies that resolve the conjugate/negative bits;
- every ``torch.fft`` transform (fft, ifft, rfft, irfft, hfft, ihfft, their 2-D and n-D forms,
  fftshift, ifftshift: linear over ℂ, and the real-output ones, which drop imaginary parts of
  self-conjugate bins, still linear over ℝ);
- ``stft`` for a constant window, ``istft`` for a constant window; a jet window makes ``stft``
  bilinear in (signal, window), a Cauchy product.

Holomorphic ops (mul, div, exp, log, sqrt, pow, sin, tanh, matmul...) keep their recurrences,
which are plain arithmetic and hold over ℂ. The non-holomorphic ones are composed from the real
and imaginary parts:

- |z| = sqrt(Re z² + Im z²) (the sqrt recurrence on the real series q = Re² + Im²), so that
  d|z| = Re(conj(z) z′)/|z|;
- sgn z = z/|z|;
- angle z = Im log z: for k ≥ 1 the coefficients of angle(z(t)) are the imaginary parts of those
  of log z(t) (the recurrence y_k = (z_k − (1/k) Σ_{j<k} j y_j z_{k−j}) / z_0), which does not
  see the 2π branch of ``angle``.

At z_0 = 0 these three are not differentiable; as autograd (whose derivative there is 0), their
higher coefficients are 0 at such elements.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import series as S
from ..jets.registry import record, register
from ._common import JetError, aliases, is_jet, make_jet, order_of, per_coefficient, primal

__all__ = ["abs_complex", "sgn", "angle"]


# -- real and imaginary parts, conjugation ------------------------------------------------------

@register(*aliases("real"), torch.Tensor.real.__get__)
def real(input):
    """Re z: linear over ℝ, (Re z)_k = Re z_k. A real tensor is its own real part (torch returns
    the tensor itself)."""
    if not input.is_complex():
        return input
    return make_jet(torch.real(input._coeffs), input._order, is_view=True)


@register(*aliases("imag"), torch.Tensor.imag.__get__)
def imag(input):
    """Im z: linear over ℝ, (Im z)_k = Im z_k (torch refuses real tensors, and so does this)."""
    if not input.is_complex():
        torch.imag(primal(input))  # raises torch's own error for a real tensor
    return make_jet(torch.imag(input._coeffs), input._order, is_view=True)


def _coefficientwise(fn, doc: str, view: bool = False):
    def rule(input, *args, **kwargs):
        if view and not input.is_complex():  # torch.conj of a real tensor is the tensor itself
            return input
        return make_jet(fn(input._coeffs, *args, **kwargs), input._order, is_view=view)
    rule.__doc__ = doc
    return rule


for _name, _view in (("conj", True), ("_conj", True), ("conj_physical", False),
                     ("_conj_physical", False), ("resolve_conj", False), ("resolve_neg", False),
                     ("_conj_copy", False)):
    _fn = getattr(torch, _name)
    for _f in aliases(_name):
        register(_f)(_coefficientwise(
            _fn, f"{_name}: linear over ℝ (the path parameter is real), so applied to every "
                 "coefficient: conj(z)_k = conj(z_k); the conjugate/negative bits resolve the same way.",
            view=_view))


def _conj_transpose(func, input):
    """Check the call on the primal's metadata (torch's own errors and warnings), then conjugate
    and transpose the last two axes of every coefficient; a 0-D ``.H`` is the conjugate."""
    func(torch.empty(input.shape, dtype=input.dtype, device="meta"))
    c = input._coeffs
    if input.dim() >= 2:
        c = c.transpose(-2, -1)
    return make_jet(c.conj(), input._order, is_view=True)


@register(torch.Tensor.mH.__get__)
def mH(input):
    """Conjugate transpose of the last two axes: linear over ℝ, every coefficient."""
    return _conj_transpose(lambda t: t.mH, input)


@register(torch.Tensor.H.__get__)
def H(input):
    """Conjugate transpose of a matrix (conjugate of a 0-D tensor): every coefficient."""
    return _conj_transpose(lambda t: t.H, input)


@register(*aliases("adjoint"))
def adjoint(input):
    """torch.adjoint = mH: every coefficient."""
    return _conj_transpose(torch.adjoint, input)


# -- real <-> complex views, construction -------------------------------------------------------

@register(torch.view_as_real)
def view_as_real(input, *, _view: bool = True):
    """(...) complex → (..., 2) real: linear over ℝ, every coefficient."""
    c = input._coeffs
    if c.is_conj():
        raise JetError("torch.view_as_real on a jet whose value is a conjugate view: as torch, it "
                       "refuses unresolved conjugated tensors; call .resolve_conj() first")
    out = torch.view_as_real(c)
    return make_jet(out if _view else out.clone(), input._order, is_view=_view)


@register(torch.view_as_real_copy)
def view_as_real_copy(input, *, out=None):
    """view_as_real as a copy: every coefficient."""
    return view_as_real(input.resolve_conj(), _view=False)


@register(torch.view_as_complex)
def view_as_complex(input, *, _view: bool = True):
    """(..., 2) real → (...) complex: linear over ℝ, every coefficient. The jet's coefficient
    layout is the engine's own (the jet itself looks contiguous), so a stack that cannot be viewed
    as complex is made contiguous first."""
    torch.view_as_complex(torch.empty(input.shape, dtype=input.dtype, device="meta"))  # torch's checks
    c = input._coeffs
    try:
        out = torch.view_as_complex(c)
    except RuntimeError:
        out = torch.view_as_complex(c.contiguous())
    return make_jet(out if _view else out.clone(), input._order, is_view=_view)


@register(torch.view_as_complex_copy)
def view_as_complex_copy(input, *, out=None):
    """view_as_complex as a copy: every coefficient."""
    return view_as_complex(input, _view=False)


@register(torch.complex)
def complex_(real, imag, *, out=None):
    """real + i·imag: jointly linear over ℝ in (real, imag), every coefficient (a constant part
    joins coefficient 0 only)."""
    return per_coefficient(torch.complex, (real, imag), {})


@register(torch.polar)
def polar(abs, angle, *, out=None):
    """abs·e^{i·angle} = complex(abs·cos(angle), abs·sin(angle)), through the rules of mul, sin,
    cos and complex."""
    return torch.complex(abs * torch.cos(angle), abs * torch.sin(angle))


def _complex_cast(dtype):
    def rule(input, *args, **kwargs):
        torch.empty(input.shape, dtype=input.dtype, device="meta").to(dtype)  # torch's checks
        if input.dtype == dtype:
            return input
        return make_jet(input._coeffs.to(dtype), input._order)
    rule.__doc__ = (f"cast to {dtype}: linear over ℝ, every coefficient (a real coefficient becomes "
                    "the real part).")
    return rule


for _name, _dtype in (("cdouble", torch.complex128), ("cfloat", torch.complex64),
                      ("chalf", torch.complex32)):
    register(getattr(torch.Tensor, _name))(_complex_cast(_dtype))


# -- the non-holomorphic elementwise maps: |z|, sgn z, angle z ----------------------------------

def _parts(x):
    """(zero mask of z_0, the real series q = |z(t)|², the series of |z(t)| with a safe value
    where z_0 = 0). The masked elements get coefficient 1 in q_0 and y_0 so that no division by
    zero reaches the graph (a NaN there would poison the backward even where it is masked)."""
    K = x._order
    c = x._coeffs
    z0 = c[0]
    zero = z0 == 0
    re, im = list(c.real.unbind(0)), list(c.imag.unbind(0))
    q = S.add(S.square(re, K), S.square(im, K), K)
    one = torch.ones_like(q[0])
    q = [torch.where(zero, one, q[0])] + q[1:]
    y = S.pow_scalar(q, 0.5, K, y0=torch.where(zero, one, torch.abs(z0)))
    return zero, y


def _masked(zero: Tensor, first: Tensor, rest, K: int):
    out = [first] + [torch.where(zero, torch.zeros_like(r), r) for r in rest[1:]]
    return make_jet(out, K)


def abs_complex(input):
    """|z| of a complex jet: y = sqrt(q), q = (Re z)² + (Im z)² (real series); the sqrt recurrence
    y_k = (q_k − Σ_{j=1..k−1} y_j y_{k−j}) / (2 y_0) in its pow form. At z_0 = 0: y_k = 0 (k ≥ 1),
    autograd's derivative there."""
    zero, y = _parts(input)
    return _masked(zero, torch.abs(input._coeffs[0]), y, input._order)


@register(*aliases("sgn"))
def sgn(input, *, out=None):
    """sgn z = z/|z| for complex z (the division recurrence with the |z| series; 0 at z_0 = 0 with
    zero higher coefficients, as autograd); for a real tensor it is the sign, a constant."""
    if not input.is_complex():
        record("constants", torch.sgn)
        return torch.sgn(primal(input))
    K = input._order
    zero, y = _parts(input)
    s = S.div(input.series(), y, K)
    return _masked(zero, torch.sgn(input._coeffs[0]), s, K)


@register(*aliases("angle"))
def angle(input, *, out=None):
    """angle z = atan2(Im z, Re z): for a real tensor 0 or π, a constant along the path. For complex
    z, log z = log|z| + i·angle z up to a constant multiple of 2πi, so the coefficients k ≥ 1 are
    Im (log z)_k, from the log recurrence (S.log); at z_0 = 0 they are 0 (autograd's value)."""
    if not input.is_complex():
        record("constants", torch.angle)
        return torch.angle(primal(input))
    K = input._order
    c = input._coeffs
    z0 = c[0]
    zero = z0 == 0
    safe = [torch.where(zero, torch.ones_like(z0), z0)] + list(c[1:].unbind(0))
    L = S.log(safe, K)
    return _masked(zero, torch.angle(z0), [x.imag for x in L], K)


# -- Fourier transforms -------------------------------------------------------------------------

_FFT_NAMES = ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft", "fft2", "ifft2", "rfft2", "irfft2",
              "hfft2", "ihfft2", "fftn", "ifftn", "rfftn", "irfftn", "hfftn", "ihfftn", "fftshift",
              "ifftshift")


def _fft_rule(func):
    def rule(*args, **kwargs):
        with warnings.catch_warnings():
            # ihfft2/ihfftn have no vmap batching rule: torch loops over the coefficients, exactly
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            return per_coefficient(func, args, kwargs)
    rule.__doc__ = (f"torch.fft.{func.__name__.replace('fft_', '', 1)}: linear over ℝ, so every "
                    "coefficient goes through the transform (batched with vmap, which keeps the "
                    "dim/s/norm arguments of the call relative to the value, not the coefficient stack).")
    return rule


for _name in _FFT_NAMES:
    _f = getattr(torch.fft, _name)
    register(_f)(_fft_rule(_f))


# -- short-time Fourier transforms ----------------------------------------------------------------

def _fold(c: Tensor, signal_dims: int):
    """Fold the coefficient axis of a stack (n+1, *batch, *signal) into the batch axis that
    stft/istft accept: (n+1) rows for an unbatched signal, (n+1)·B rows for a batched one."""
    if c.dim() - 1 > signal_dims:
        return c.reshape((c.shape[0] * c.shape[1],) + tuple(c.shape[2:])), c.shape[:2]
    return c, c.shape[:1]


def _signal_and_window(args, kwargs):
    """The signal and the window of a stft/istft call (the signal is argument 0, named input or
    self; the window argument 4, named window, in every overload), and a function that repeats
    the call with other values in their places."""
    args, kwargs = list(args), dict(kwargs)
    if "self" in kwargs:  # the Tensor methods name the signal self, the torch functions input
        kwargs["input"] = kwargs.pop("self")
    x_at = 0 if args else "input"
    w_at = 4 if len(args) > 4 else "window"

    def get(at):
        return args[at] if isinstance(at, int) else kwargs.get(at)

    def call(func, x, w):
        a, k = list(args), dict(kwargs)
        for at, v in ((x_at, x), (w_at, w)):
            if isinstance(at, int):
                a[at] = v
            else:
                k[at] = v
        return func(*a, **k)
    return get(x_at), get(w_at), call


def _stft_rule(func):
    def rule(*args, **kwargs):
        x, w, call = _signal_and_window(args, kwargs)
        K = order_of(x, w)

        def run(xc: Tensor, wt) -> Tensor:
            flat, lead = _fold(xc, 1)
            out = call(func, flat, wt)
            return out.reshape(tuple(lead) + tuple(out.shape[1:]))

        xs = x._coeffs if is_jet(x) else x.unsqueeze(0)
        if not is_jet(w):
            return make_jet(run(xs, w), K)
        rows = [run(xs, wi) for wi in w._coeffs.unbind(0)]  # rows[i][j] = stft(x_j, window=w_i)
        n = min(K + 1, xs.shape[0] + len(rows) - 1)
        out = []
        for k in range(n):
            terms = [rows[i][k - i] for i in range(len(rows)) if 0 <= k - i < xs.shape[0]]
            acc = terms[0]
            for t in terms[1:]:
                acc = acc + t
            out.append(acc)
        return make_jet(out, K)
    rule.__doc__ = """stft(x, window=w) is linear in the signal x for a fixed window: every coefficient of
    x goes through one call (the coefficient axis folded into stft's batch axis). A jet window
    makes it bilinear in (x, w): the Cauchy product Σ_j stft(x_j, window=w_{k−j}), one folded
    call per window coefficient."""
    return rule


# torch.stft (a Python function: its centre padding, then _VF.stft) and Tensor.stft are met when
# the signal is a jet; _VF.stft (both overloads) when only the window is
register(torch.stft, torch.Tensor.stft)(_stft_rule(torch.stft))
register(torch._VF.stft)(_stft_rule(torch._VF.stft))


@register(torch.istft, torch.Tensor.istft)
def istft(*args, **kwargs):
    """istft(X, window=w) is linear in the spectrogram X for a fixed window (overlap-add of the
    inverse FFTs divided by the window envelope Σ w², which does not depend on X): every
    coefficient of X through one call, the coefficient axis folded into the batch axis. A jet
    window is refused: the envelope normalization is not linear in w."""
    x, w, call = _signal_and_window(args, kwargs)
    if is_jet(w):
        raise JetError("torch.istft with a jet window: the result is divided by the window's "
                       "overlap-added square (not linear in the window), which this rule does not "
                       "expand; pass the window as a constant (.detach()) or write the inverse "
                       "transform with torch.fft.irfft and explicit overlap-add")
    flat, lead = _fold(x._coeffs, 2)
    out = call(torch.istft, flat, w)
    return make_jet(out.reshape(tuple(lead) + tuple(out.shape[1:])), x._order)
