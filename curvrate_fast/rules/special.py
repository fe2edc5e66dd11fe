"""Taylor rules for special functions and elementwise math: the inverse trigonometric and
hyperbolic functions, the two-argument functions (atan2, hypot, logaddexp, xlogy...), the error,
gamma, zeta and incomplete-gamma families, the Bessel functions, sinc, the orthogonal polynomials
of ``torch.special``, and the piecewise-smooth ops (fmod, remainder, copysign, frac, frexp...).

Every rule is exact (docs/math.md §2); its coefficients come in one of three ways:

1. a recurrence on the input series (``curvrate_fast.series``): y′ = g·x′ with the series g known
   one order lower (asin, erfc, igamma, log_ndtr...), or interleaved with y itself when g depends on
   y (erfinv, ndtri, erfcx): y_k = (1/k) Σ_{j=1..k} j·x_j·g_{k−j};
2. the normalized Taylor coefficients a_j = φ⁽ʲ⁾(x_0)/j! of φ at the primal, composed with the input
   series by Horner's scheme (:func:`_compose`). For the gamma and zeta families they are values of
   torch functions (ψ⁽ⁿ⁾, ζ); for the functions torch only evaluates (Bessel functions, sinc, the
   orthogonal polynomials) they come from the function's differential equation or three-term
   recurrence, and :class:`_Table` makes them differentiable in x_0 (da_k/dx_0 = (k+1)·a_{k+1}).
   J0, J1, Y0, Y1 are the exception: torch's values are off by up to ~3e−7, so their rules run
   torch's own algorithm (its Cephes transcription) on the series, the jet of what torch evaluates;
3. piecewise-smooth ops: the smooth piece selected by the primal (fmod(a, b) = a − q·b with the
   integer q fixed along the path, copysign(a, b) = ±a...), like ReLU.

Where the result is finite but has no Taylor expansion along the path (xlogy(0, y) with y ≤ 0 and
x not identically zero, entr at 0, a power with a jet exponent and a base ≤ 0), the rule raises a
``JetError``. Complex jets are refused by these rules (real functions).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, List, Sequence

import torch
from torch import Tensor

from .. import series as S
from ..jets.registry import record, register
from ._common import JetError, aliases, is_jet, make_jet, order_of, primal

_SPECIAL = torch.special
_SQRT_PI = math.sqrt(math.pi)
_SQRT2 = math.sqrt(2.0)
_LN2 = math.log(2.0)


# -- helpers ------------------------------------------------------------------------------------

def _real_only(name: str, *args: Any) -> None:
    for a in args:
        if is_jet(a) and a._coeffs.is_complex():
            raise JetError(f"{name}: complex jets are not supported by this rule (it implements "
                           "the real function)")


def _like(*args: Any) -> Tensor:
    return next(a._coeffs[0] for a in args if is_jet(a))


def _ser(v: Any, like: Tensor) -> List[Tensor]:
    """The coefficient list of a jet; a tensor or a number is a constant (one coefficient)."""
    if is_jet(v):
        return v.series()
    if isinstance(v, Tensor):
        return [v]
    return [torch.as_tensor(v, dtype=like.dtype, device=like.device)]


def _t(v: Any, like: Tensor) -> Tensor:
    """The primal of v as a tensor (numbers take the jet's dtype and device)."""
    v = primal(v)
    return v if isinstance(v, Tensor) else torch.as_tensor(v, dtype=like.dtype, device=like.device)


def _only_value(x) -> bool:
    return x._order == 0 or x._coeffs.shape[0] == 1


def _zeros_after(series: Sequence[Tensor], n: int) -> List[Tensor]:
    out = list(series[:n])
    while len(out) < n:
        out.append(torch.zeros_like(out[0]))
    return out


def _compose(x, a: Sequence[Tensor]):
    """The jet of φ(x(t)) from φ's normalized Taylor coefficients a_j = φ⁽ʲ⁾(x_0)/j! at the primal:
    φ(x(t)) = Σ_j a_j δ(t)^j with δ(t) = x(t) − x_0, by Horner's scheme
    y = a_0 + δ(a_1 + δ(a_2 + … + δ·a_K)). δ has no constant term, so the bracket of depth j is
    needed to order K − j only (O(K²·n) products for an input storing n + 1 coefficients)."""
    K = x._order
    c = x._coeffs
    n = min(c.shape[0] - 1, K)
    if n <= 0:
        return make_jet([a[0]], K)
    d = list(c[1:n + 1].unbind(0))
    acc = [a[K]]
    for j in range(K - 1, -1, -1):
        new = [a[j]]
        for k in range(1, K - j + 1):
            s = d[0] * acc[k - 1]
            for i in range(2, min(k, n) + 1):
                s = torch.addcmul(s, d[i - 1], acc[k - i])
            new.append(s)
        acc = new
    return make_jet(acc, K)


class _Table(torch.autograd.Function):
    """The normalized Taylor coefficients [a_0, …, a_K] of φ at x_0, from a routine ``fn(x0, K,
    *params)`` that autograd cannot differentiate (torch's Bessel functions and orthogonal
    polynomials have no derivative formula: their outputs carry no graph). This makes them
    differentiable in x_0: da_k/dx_0 = (k+1)·a_{k+1}, read off the same table one order higher,
    which is itself a ``_Table`` (so backward of any order works). The params are constants."""

    @staticmethod
    def forward(ctx, x0, fn, K, *params):
        ctx.fn, ctx.K, ctx.params = fn, K, params
        ctx.save_for_backward(x0)
        return torch.stack(torch.broadcast_tensors(*fn(x0, K, *params)))

    @staticmethod
    def backward(ctx, grad):
        x0, = ctx.saved_tensors
        up = _Table.apply(x0, ctx.fn, ctx.K + 1, *ctx.params)
        k = torch.arange(1, ctx.K + 2, dtype=grad.dtype, device=grad.device)
        k = k.reshape((-1,) + (1,) * (grad.dim() - 1))
        gx = (grad * up[1:] * k).sum(0)
        return (gx.sum_to_size(x0.shape), None, None) + (None,) * len(ctx.params)


def _table_jet(x, fn: Callable, *params):
    """φ(x) for a jet x from a table routine (see :class:`_Table`); ``fn`` also gives
    a_0 = φ(x_0)."""
    K = 0 if _only_value(x) else x._order
    a = _Table.apply(x._coeffs[0], fn, K, *params)
    if K == 0:
        return make_jet(a[:1], x._order)
    return _compose(x, list(a.unbind(0)))


# -- inverse trigonometric and hyperbolic functions --------------------------------------------

def _one_minus_sq(x: List[Tensor], K: int, sign: float = 1.0) -> List[Tensor]:
    """sign·(1 − x)(1 + x), i.e. 1 − x² (or x² − 1 with sign = −1), as a product: no cancellation
    in the constant term near |x_0| = 1."""
    one = torch.ones_like(x[0])
    a = [one - x[0]] + [-c for c in x[1:]]
    b = [one + x[0]] + list(x[1:])
    p = S.mul(a, b, K)
    return p if sign == 1.0 else [-c for c in p]


def _by_derivative(name: str, fn: Callable, g_series: Callable, *funcs: Any) -> Callable:
    """Register an elementwise φ with y′ = g(x)·x′, ``g_series(x, K−1)`` the series of φ′(x):
    y_0 = φ(x_0), y_k = (1/k) Σ_{j=1..k} j·x_j·g_{k−j} (``series.integrate``)."""
    @register(*funcs)
    def rule(input, *, out=None):
        _real_only(name, input)
        K = input._order
        y0 = fn(input._coeffs[0])
        if _only_value(input):
            return make_jet([y0], K)
        x = input.series()
        return make_jet(S.integrate(x, g_series(x, K - 1), K, y0), K)
    rule.__name__ = name
    return rule


_by_derivative("asin", torch.asin, lambda x, K: S.rsqrt(_one_minus_sq(x, K), K),
               *aliases("asin"), *aliases("arcsin")).__doc__ = "asin: y′ = x′/√(1 − x²)."
_by_derivative("acos", torch.acos, lambda x, K: S.neg(S.rsqrt(_one_minus_sq(x, K), K), K),
               *aliases("acos"), *aliases("arccos")).__doc__ = "acos: y′ = −x′/√(1 − x²)."
_by_derivative("asinh", torch.asinh,
               lambda x, K: S.rsqrt(S.add([torch.ones_like(x[0])], S.square(x, K), K), K),
               *aliases("asinh"), *aliases("arcsinh")).__doc__ = "asinh: y′ = x′/√(1 + x²)."
_by_derivative("acosh", torch.acosh, lambda x, K: S.rsqrt(_one_minus_sq(x, K, -1.0), K),
               *aliases("acosh"), *aliases("arccosh")).__doc__ = \
    "acosh: y′ = x′/√((x − 1)(x + 1))."
_by_derivative("atanh", torch.atanh, lambda x, K: S.reciprocal(_one_minus_sq(x, K), K),
               *aliases("atanh"), *aliases("arctanh")).__doc__ = "atanh: y′ = x′/((1 − x)(1 + x))."


# -- two-argument functions ---------------------------------------------------------------------

@register(*aliases("atan2"), *aliases("arctan2"))
def atan2(input, other, *, out=None):
    """θ = atan2(y, x) (y = input, x = other, either a jet): θ′ = (x·y′ − y·x′)/(x² + y²), so with
    w = 1/(x² + y²) to order K − 1, θ_k = (1/k) Σ_j j·(y_j·(x⋆w)_{k−j} − x_j·(y⋆w)_{k−j}).
    At x_0 = y_0 = 0 there is no expansion (the coefficients are not finite, as autograd's)."""
    _real_only("atan2", input, other)
    K = order_of(input, other)
    like = _like(input, other)
    y, x = _ser(input, like), _ser(other, like)
    t0 = torch.atan2(y[0], x[0])
    if K == 0:
        return make_jet([t0], K)
    w = S.reciprocal(S.add(S.square(x, K - 1), S.square(y, K - 1), K - 1), K - 1)
    a = S.integrate(y, S.mul(x, w, K - 1), K, t0)
    b = S.integrate(x, S.mul(y, w, K - 1), K, torch.zeros_like(t0))
    return make_jet([t0] + [p - q for p, q in zip(a[1:], b[1:])], K)


@register(*aliases("hypot"))
def hypot(input, other, *, out=None):
    """h = √(a² + b²) from h² = q = a² + b²: h_k = (q_k − Σ_{j=1..k−1} h_j h_{k−j}) / (2h_0), with
    h_0 = torch.hypot (no overflow in h_0). At a_0 = b_0 = 0 (a cone) the coefficients are not
    finite, as autograd's derivative there."""
    _real_only("hypot", input, other)
    K = order_of(input, other)
    like = _like(input, other)
    a, b = _ser(input, like), _ser(other, like)
    h0 = torch.hypot(a[0], b[0])
    q = S.add(S.square(a, K), S.square(b, K), K)
    h = [h0]
    inv = 0.5 / h0
    for k in range(1, K + 1):
        acc = q[k] if k < len(q) else torch.zeros_like(h0)
        part = None
        for j in range(1, k):
            p = h[j] * h[k - j]
            part = p if part is None else part + p
        h.append((acc if part is None else acc - part) * inv)
    return make_jet(h, K)


def _logaddexp_series(a: List[Tensor], b: List[Tensor], K: int) -> List[Tensor]:
    """log(e^a + e^b) = m + log(e^{a−m} + e^{b−m}) with the shift m = max(a_0, b_0) a constant of
    the primal (the coefficients k ≥ 1 do not depend on m, so it carries no gradient)."""
    m = torch.maximum(a[0], b[0]).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    ea = S.exp([a[0] - m] + a[1:], K)
    eb = S.exp([b[0] - m] + b[1:], K)
    return S.log(S.add(ea, eb, K), K)


@register(*aliases("logaddexp"))
def logaddexp(input, other, *, out=None):
    """y = log(e^a + e^b): the log recurrence of the sum of the exp series, shifted by the constant
    max(a_0, b_0) so that no exponential overflows; y_0 = torch.logaddexp."""
    _real_only("logaddexp", input, other)
    K = order_of(input, other)
    like = _like(input, other)
    a, b = _ser(input, like), _ser(other, like)
    y = _logaddexp_series(a, b, K)
    y[0] = torch.logaddexp(a[0], b[0])
    return make_jet(y, K)


@register(*aliases("logaddexp2"))
def logaddexp2(input, other, *, out=None):
    """y = log₂(2^a + 2^b) = logaddexp(a·ln2, b·ln2)/ln2."""
    _real_only("logaddexp2", input, other)
    K = order_of(input, other)
    like = _like(input, other)
    a, b = _ser(input, like), _ser(other, like)
    y = _logaddexp_series(S.scale(a, _LN2, K), S.scale(b, _LN2, K), K)
    y = S.scale(y, 1.0 / _LN2, K)
    y[0] = torch.logaddexp2(a[0], b[0])
    return make_jet(y, K)


def _xlog(name: str, op: Callable, log_series: Callable, pole: float) -> Callable:
    """x·log(y) (xlogy) or x·log1p(y) (xlog1py), defined as 0 where x = 0.

    - y constant: linear in x with that convention, y_k = op(x_k, y);
    - y a jet: the Cauchy product x⋆log(y); where x is identically zero along the path (a constant
      0, or a jet whose stored coefficients are all 0) every coefficient is 0; where x_0 = 0 but
      x is not identically zero and y_0 ≤ pole (the log is −∞ or undefined) the value is 0 but
      the function has no Taylor expansion along the path: refused.
    """
    def rule(input, other, *, out=None):
        _real_only(name, input, other)
        K = order_of(input, other)
        like = _like(input, other)
        x, y = _ser(input, like), _ser(other, like)
        c0 = op(x[0], y[0])
        if not is_jet(other):
            return make_jet([c0] + [op(c, y[0]) for c in x[1:]], K)
        zero = x[0] == 0
        for c in x[1:]:
            zero = zero & (c == 0)
        bad = (x[0] == 0) & ~zero & (y[0] <= pole)
        if bool(bad.any()):
            raise JetError(
                f"{name}: at x_0 = 0 with y_0 ≤ {pole:g} the value is 0 but "
                f"x·log{'1p' if pole else ''}(y) has no Taylor expansion along the path (the log "
                "is −∞ or undefined there while x varies); move the point off that boundary")
        safe = 0.0 if pole else 1.0  # a y_0 where the log series is finite (masked elements only)
        ys = [torch.where(zero, torch.full_like(y[0], safe), y[0])] + \
            [torch.where(zero, torch.zeros_like(c), c) for c in y[1:]]
        p = S.mul(x, log_series(ys, K), K)
        return make_jet([c0] + [torch.where(zero, torch.zeros_like(c), c) for c in p[1:]], K)
    rule.__name__ = name
    return rule


register(*aliases("xlogy"), _SPECIAL.xlogy)(_xlog("xlogy", torch.xlogy, S.log, 0.0))
register(_SPECIAL.xlog1py)(_xlog("xlog1py", _SPECIAL.xlog1py, S.log1p, -1.0))


@register(_SPECIAL.entr)
def entr(input, *, out=None):
    """entr(x) = −x·log x (0 at x = 0, −∞ for x < 0): −(x⋆log x). Where x is identically zero along
    the path the coefficients are 0; at x_0 = 0 with x varying, −x log x has no Taylor expansion
    (infinite slope): refused."""
    _real_only("entr", input)
    K = input._order
    x = input.series()
    c0 = _SPECIAL.entr(x[0])
    if _only_value(input):
        return make_jet([c0], K)
    zero = x[0] == 0
    for c in x[1:]:
        zero = zero & (c == 0)
    if bool(((x[0] == 0) & ~zero).any()):
        raise JetError("torch.special.entr: at x_0 = 0 the value is 0 but −x·log x has no Taylor "
                       "expansion along the path (infinite slope); move the point off 0")
    xs = [torch.where(zero, torch.ones_like(x[0]), x[0])] + \
        [torch.where(zero, torch.zeros_like(c), c) for c in x[1:]]
    p = S.mul(xs, S.log(xs, K), K)
    return make_jet([c0] + [torch.where(zero, torch.zeros_like(c), -c) for c in p[1:]], K)


# -- the error-function family ------------------------------------------------------------------

def _erfcx_series(u: List[Tensor], K: int) -> List[Tensor]:
    """y = erfcx(u) = e^{u²} erfc(u): y′ = (2u·y − 2/√π)·u′, interleaved with y
    (g_k = 2(u⋆y)_k − [k = 0]·2/√π needs y_0..y_k only)."""
    nu = len(u)

    def g_of(y, k):
        acc = None
        for j in range(max(0, k - len(y) + 1), min(k, nu - 1) + 1):
            p = u[j] * y[k - j]
            acc = p if acc is None else acc + p
        g = 2 * acc
        return g - 2.0 / _SQRT_PI if k == 0 else g
    return S._self_integrate(u, K, _SPECIAL.erfcx(u[0]), g_of)


def _exp_square_ode(u: List[Tensor], K: int, y0: Tensor, c: float, h: float) -> List[Tensor]:
    """y with y′ = c·exp(h·y²)·u′ (the inverse functions erfinv, ndtri): the series z = h·y² and
    e = exp(z) are carried along, z_k from y_0..y_k and e_k = (1/k) Σ_{j=1..k} j z_j e_{k−j}."""
    z: List[Tensor] = []
    e: List[Tensor] = []

    def g_of(y, k):
        z.append(h * S.square_coefficient(y, k))
        if k == 0:
            e.append(torch.exp(z[0]))
        else:
            acc = None
            for j in range(1, k + 1):
                p = (j * z[j]) * e[k - j]
                acc = p if acc is None else acc + p
            e.append(acc / k)
        return c * e[k]
    return S._self_integrate(u, K, y0, g_of)


@register(*aliases("erfc"), _SPECIAL.erfc)
def erfc(input, *, out=None):
    """erfc = 1 − erf: y_0 = erfc(x_0) (no cancellation), y_k = −erf(x)_k for k ≥ 1."""
    _real_only("erfc", input)
    K = input._order
    e = S.erf(input.series(), K)
    return make_jet([torch.erfc(input._coeffs[0])] + [-c for c in e[1:]], K)


@register(_SPECIAL.erfcx)
def erfcx(input, *, out=None):
    """erfcx(x) = e^{x²} erfc(x): y′ = (2x·y − 2/√π)·x′, interleaved with y. (For large x the
    derivative is a difference of nearly equal terms, as in autograd's formula.)"""
    _real_only("erfcx", input)
    return make_jet(_erfcx_series(input.series(), input._order), input._order)


@register(*aliases("erfinv"), _SPECIAL.erfinv)
def erfinv(input, *, out=None):
    """y = erfinv(x): y′ = (√π/2)·exp(y²)·x′, interleaved with y."""
    _real_only("erfinv", input)
    K = input._order
    return make_jet(_exp_square_ode(input.series(), K, torch.erfinv(input._coeffs[0]),
                                    _SQRT_PI / 2, 1.0), K)


@register(_SPECIAL.ndtri)
def ndtri(input, *, out=None):
    """y = Φ⁻¹(x): y′ = √(2π)·exp(y²/2)·x′, interleaved with y."""
    _real_only("ndtri", input)
    K = input._order
    return make_jet(_exp_square_ode(input.series(), K, _SPECIAL.ndtri(input._coeffs[0]),
                                    math.sqrt(2 * math.pi), 0.5), K)


@register(_SPECIAL.ndtr)
def ndtr(input, *, out=None):
    """Φ(x) = ½(1 + erf(x/√2)): y_0 = ndtr(x_0), y_k = ½·erf(x/√2)_k."""
    _real_only("ndtr", input)
    K = input._order
    e = S.erf(S.scale(input.series(), 1.0 / _SQRT2, K), K)
    return make_jet([_SPECIAL.ndtr(input._coeffs[0])] + [0.5 * c for c in e[1:]], K)


@register(_SPECIAL.log_ndtr)
def log_ndtr(input, *, out=None):
    """log Φ(x): y′ = φ(x)/Φ(x)·x′ = √(2/π)/erfcx(−x/√2)·x′ (the form that neither underflows for
    x → −∞ nor overflows), with the erfcx series to order K − 1."""
    _real_only("log_ndtr", input)
    K = input._order
    x = input.series()
    y0 = _SPECIAL.log_ndtr(x[0])
    if _only_value(input):
        return make_jet([y0], K)
    e = _erfcx_series(S.scale(x, -1.0 / _SQRT2, K - 1), K - 1)
    g = S.scale(S.reciprocal(e, K - 1), math.sqrt(2.0 / math.pi), K - 1)
    return make_jet(S.integrate(x, g, K, y0), K)


@register(*aliases("logit"), _SPECIAL.logit)
def logit(input, eps=None, *, out=None):
    """logit(x) = log(z/(1 − z)) with z = clamp(x, eps, 1 − eps) when eps ≥ 0 is given:
    y′ = z′/(z(1 − z)); outside [eps, 1 − eps] z is constant (its coefficients k ≥ 1 are 0; the
    boundary counts as inside, as torch's derivative)."""
    _real_only("logit", input)
    K = input._order
    x = input.series()
    y0 = torch.logit(x[0], eps)
    if _only_value(input):
        return make_jet([y0], K)
    z = x
    if eps is not None and eps >= 0:
        inside = (x[0] >= eps) & (x[0] <= 1 - eps)
        z = [torch.clamp(x[0], eps, 1 - eps)] + [torch.where(inside, c, torch.zeros_like(c))
                                                  for c in x[1:]]
    one = torch.ones_like(z[0])
    g = S.reciprocal(S.mul(z, [one - z[0]] + [-c for c in z[1:]], K - 1), K - 1)
    return make_jet(S.integrate(z, g, K, y0), K)


# -- incomplete gamma, zeta ---------------------------------------------------------------------

def _igamma(name: str, op: Callable, sign: float) -> Callable:
    def rule(input, other, *, out=None):
        if is_jet(input):
            raise JetError(
                f"{name}: the derivative in a (the first argument) has no closed form in torch ops "
                "(it needs derivatives of the incomplete gamma function in its parameter), so its "
                "Taylor coefficients cannot be computed exactly; only x (the second argument) may "
                "be a jet")
        _real_only(name, other)
        K = other._order
        x = other.series()
        a = _t(input, x[0])
        y0 = op(a, x[0])
        if _only_value(other):
            return make_jet([y0], K)
        # ∂/∂x P(a, x) = x^{a−1} e^{−x} / Γ(a) = exp((a − 1) log x − x − lgamma(a))  (a > 0)
        e = S.sub(S.scale(S.log(x, K - 1), a - 1, K - 1), x, K - 1)
        e[0] = e[0] - torch.lgamma(a)
        g = S.exp(e, K - 1)
        if sign < 0:
            g = S.neg(g, K - 1)
        return make_jet(S.integrate(x, g, K, y0), K)
    rule.__name__ = name
    rule.__doc__ = (f"{name}(a, x) in x: y′ = {'−' if sign < 0 else ''}x^(a−1)·e^(−x)/Γ(a)·x′, the "
                    "density as exp((a − 1)·log x − x − lgamma(a)) on the series; a constant.")
    return rule


register(*aliases("igamma"), _SPECIAL.gammainc)(_igamma("igamma", torch.igamma, 1.0))
register(*aliases("igammac"), _SPECIAL.gammaincc)(_igamma("igammac", torch.igammac, -1.0))


@register(_SPECIAL.zeta)
def zeta(input, other, *, out=None):
    """Hurwitz ζ(s, q) in q: ∂ζ/∂q = −s·ζ(s+1, q), so a_k = (−1)^k (s)_k/k!·ζ(s+k, q_0) with the
    rising factorial (s)_k, composed with the q series."""
    if is_jet(input):
        raise JetError(
            "torch.special.zeta: the derivative in s (the first argument) is not available in "
            "torch (no ∂ζ/∂s), so the Taylor coefficients in s cannot be computed exactly; only q "
            "(the second argument) may be a jet")
    _real_only("zeta", other)
    K = other._order
    q0 = other._coeffs[0]
    s = input
    a = [_SPECIAL.zeta(s, q0)]
    coef = 1.0
    for k in range(1, 0 if _only_value(other) else K + 1):
        coef = coef * (-(s + (k - 1))) / k
        a.append(coef * _SPECIAL.zeta(s + k, q0))
    if len(a) == 1:
        return make_jet(a, K)
    return _compose(other, a)


# -- gamma family: values of torch's polygamma -------------------------------------------------

def _polygamma_coeffs(x0: Tensor, K: int, first: int) -> List[Tensor]:
    """[ψ⁽ᶠⁱʳˢᵗ⁾(x_0)/0!, ψ⁽ᶠⁱʳˢᵗ⁺¹⁾(x_0)/1!, …] (normalized Taylor coefficients of ψ⁽ᶠⁱʳˢᵗ⁾)."""
    return [torch.polygamma(first + k, x0) / math.factorial(k) for k in range(K + 1)]


@register(*aliases("lgamma"), _SPECIAL.gammaln)
def lgamma(input, *, out=None):
    """log|Γ(x)|: a_0 = lgamma(x_0), a_k = ψ⁽ᵏ⁻¹⁾(x_0)/k! (d/dx log|Γ| = ψ also for x < 0)."""
    _real_only("lgamma", input)
    x0 = input._coeffs[0]
    if _only_value(input):
        return make_jet([torch.lgamma(x0)], input._order)
    K = input._order
    a = [torch.lgamma(x0)] + [c / (k + 1) for k, c in enumerate(_polygamma_coeffs(x0, K - 1, 0))]
    return _compose(input, a)


@register(*aliases("digamma"), _SPECIAL.digamma, _SPECIAL.psi)
def digamma(input, *, out=None):
    """ψ(x): a_k = ψ⁽ᵏ⁾(x_0)/k!."""
    _real_only("digamma", input)
    if _only_value(input):
        return make_jet([torch.digamma(input._coeffs[0])], input._order)
    a = _polygamma_coeffs(input._coeffs[0], input._order, 0)
    a[0] = torch.digamma(input._coeffs[0])
    return _compose(input, a)


def _polygamma(n: int, input):
    _real_only("polygamma", input)
    n = int(n)
    if _only_value(input):
        return make_jet([torch.polygamma(n, input._coeffs[0])], input._order)
    return _compose(input, _polygamma_coeffs(input._coeffs[0], input._order, n))


@register(torch.polygamma, _SPECIAL.polygamma)
def polygamma(n, input, *, out=None):
    """ψ⁽ⁿ⁾(x): a_k = ψ⁽ⁿ⁺ᵏ⁾(x_0)/k!."""
    if is_jet(n):
        raise JetError("polygamma: the order n is an integer, not a jet")
    return _polygamma(n, input)


@register(torch.Tensor.polygamma)
def polygamma_method(input, n):
    """x.polygamma(n) = ψ⁽ⁿ⁾(x): a_k = ψ⁽ⁿ⁺ᵏ⁾(x_0)/k!."""
    return _polygamma(n, input)


@register(*aliases("mvlgamma"), _SPECIAL.multigammaln)
def mvlgamma(input, p, *, out=None):
    """log Γ_p(x) = c_p + Σ_{j<p} lgamma(x − j/2): a_k = Σ_j ψ⁽ᵏ⁻¹⁾(x_0 − j/2)/k! (k ≥ 1)."""
    _real_only("mvlgamma", input)
    x0 = input._coeffs[0]
    y0 = torch.mvlgamma(x0, p)
    if _only_value(input):
        return make_jet([y0], input._order)
    K = input._order
    a = [y0]
    for k in range(1, K + 1):
        a.append(sum(torch.polygamma(k - 1, x0 - j / 2) for j in range(p)) / math.factorial(k))
    return _compose(input, a)


# -- Bessel functions ---------------------------------------------------------------------------
#
# The order-0/1 pairs satisfy f0′ = α·f1, f1′ = β·f0 − f1/x:
#   J, Y: α = −1, β = 1;   I: α = 1, β = 1;   K: α = −1, β = −1.
# In δ = x − x_0, with a, b the Taylor coefficients of f0, f1 at x_0, x·f1′ = β·x·f0 − f1 gives
#   a_{k+1} = α·b_k/(k+1),   b_{k+1} = (β(x_0 a_k + a_{k−1}) − (k+1)·b_k) / ((k+1)·x_0).
# Near x_0 = 0 that divides by x_0 (J1′ = J0 − J1/x has a removable singularity there), so for
# |x_0| ≤ 2 the J and I pairs use their Maclaurin series instead (entire functions):
#   f0 = Σ_m σ^m w^m/(m!)²,  f1 = (x/2) Σ_m σ^m w^m/(m!(m+1)!),  w = x²/4,  σ = −1 (J), +1 (I),
# evaluated on the series of x in δ by Horner's scheme, 18 terms: the first neglected term is below
# 1/(18!)² ≈ 4e−32 of the leading one for |x_0| ≤ 2 (below rounding in float64, also for the
# derivative coefficients, whose neglected terms carry at most a factor C(2m, k) ≤ 2^(2m)).

_BESSEL_R = 2.0
_BESSEL_M = 18
_BESSEL = {
    "J": (_SPECIAL.bessel_j0, _SPECIAL.bessel_j1, -1.0, 1.0, -1.0),
    "Y": (_SPECIAL.bessel_y0, _SPECIAL.bessel_y1, -1.0, 1.0, None),
    "I": (_SPECIAL.modified_bessel_i0, _SPECIAL.modified_bessel_i1, 1.0, 1.0, 1.0),
    "K": (_SPECIAL.modified_bessel_k0, _SPECIAL.modified_bessel_k1, -1.0, -1.0, None),
    "Ie": (_SPECIAL.i0e, _SPECIAL.i1e, 1.0, 1.0, 1.0),
    "Ke": (_SPECIAL.scaled_modified_bessel_k0, _SPECIAL.scaled_modified_bessel_k1, -1.0, -1.0,
           None),
}


def _bessel_recurrence(x0: Tensor, K: int, v0: Tensor, v1: Tensor, alpha: float, beta: float):
    a, b = [v0], [v1]
    for k in range(K):
        a.append(alpha * b[k] / (k + 1))
        s = x0 * a[k]
        if k >= 1:
            s = s + a[k - 1]
        b.append((beta * s - (k + 1) * b[k]) / ((k + 1) * x0))
    return a, b


def _bessel_maclaurin(x0: Tensor, K: int, sigma: float):
    w = [x0 * x0 / 4, x0 / 2, torch.full_like(x0, 0.25)]
    d0 = [sigma ** m / math.factorial(m) ** 2 for m in range(_BESSEL_M)]
    d1 = [sigma ** m / (math.factorial(m) * math.factorial(m + 1)) for m in range(_BESSEL_M)]
    p0 = [torch.full_like(x0, d0[-1])]
    p1 = [torch.full_like(x0, d1[-1])]
    for m in range(_BESSEL_M - 2, -1, -1):
        p0 = S.mul(p0, w, K)
        p0[0] = p0[0] + d0[m]
        p1 = S.mul(p1, w, K)
        p1[0] = p1[0] + d1[m]
    f1 = S.mul([x0 / 2, torch.full_like(x0, 0.5)], p1, K)
    return _zeros_after(p0, K + 1), _zeros_after(f1, K + 1)


def _bessel_pair(x0: Tensor, K: int, kind: str):
    """Taylor coefficients (a, b) at x_0 of the pair (f0, f1) of ``kind``; for the scaled kinds
    (Ie: e^{−|x|}·I, Ke: e^{x}·K) of the scaled pair, by the same linear recurrence started from the
    scaled values, times the series of the scale factor: e^{−s(x_0+δ)} = e^{−s x_0}·Σ_j (−sδ)^j/j!
    with s = sign(x_0) (Ie; s = 0 at x_0 = 0: autograd's convention at the kink of |x|) or s = −1
    (Ke)."""
    f0, f1, alpha, beta, sigma = _BESSEL[kind]
    if sigma is None:
        a, b = _bessel_recurrence(x0, K, f0(x0), f1(x0), alpha, beta)
    else:
        small = x0.abs() <= _BESSEL_R
        xl = torch.where(small, torch.full_like(x0, 2 * _BESSEL_R), x0)
        xs = torch.where(small, x0, torch.zeros_like(x0))
        la, lb = _bessel_recurrence(xl, K, f0(xl), f1(xl), alpha, beta)
        sa, sb = _bessel_maclaurin(xs, K, sigma)
        if kind == "Ie":
            scale = torch.exp(-xs.abs())
            sa, sb = [c * scale for c in sa], [c * scale for c in sb]
        a = [torch.where(small, p, q) for p, q in zip(sa, la)]
        b = [torch.where(small, p, q) for p, q in zip(sb, lb)]
    if kind in ("Ie", "Ke"):
        s = -torch.sign(x0) if kind == "Ie" else torch.ones_like(x0)   # the rate of e^{+…δ}
        e = [torch.ones_like(x0)]
        for j in range(1, K + 1):
            e.append(e[-1] * s / j)
        a, b = S.mul(a, e, K), S.mul(b, e, K)
    return a, b


def _bessel_table(x0: Tensor, K: int, kind: str, which: int, op: Callable) -> List[Tensor]:
    a, b = _bessel_pair(x0, K, kind)
    c = list(a if which == 0 else b)
    c[0] = op(x0)
    return c


# torch evaluates J0, J1, Y0, Y1 (ATen/native/Math.h) by a transcription of Cephes' j0.c/j1.c in
# which the denominators RQ, QQ, YQ are summed without Cephes' implicit leading coefficient 1
# (p1evl read as polevl): its values differ from the Bessel functions by a smooth error of up to
# ~3e−7 for x in (4, 12) (and a jump of that size at x = 5, where it switches branch). The jet of
# such an op is that of the function torch evaluates: the same algorithm, run on the input series
# (rational functions, sin/cos, log, x^(−1/2) all have exact series rules), so that every
# coefficient agrees with torch's values. Whether torch still evaluates exactly this is checked on
# first use against torch's own values (``_cephes_matches``); if not (a later torch), the rules
# fall back to the identities of the Bessel functions (``_bessel_pair``).

_CEPHES_J0 = dict(
    PP=[7.96936729297347051624e-04, 8.28352392107440799803e-02, 1.23953371646414299388e+00,
        5.44725003058768775090e+00, 8.74716500199817011941e+00, 5.30324038235394892183e+00,
        9.99999999999999997821e-01],
    PQ=[9.24408810558863637013e-04, 8.56288474354474431428e-02, 1.25352743901058953537e+00,
        5.47097740330417105182e+00, 8.76190883237069594232e+00, 5.30605288235394617618e+00,
        1.00000000000000000218e+00],
    QP=[-1.13663838898469149931e-02, -1.28252718670509318512e+00, -1.95539544257735972385e+01,
        -9.32060152123768231369e+01, -1.77681167980488050595e+02, -1.47077505154951170175e+02,
        -5.14105326766599330220e+01, -6.05014350600728481186e+00],
    QQ=[6.43178256118178023184e+01, 8.56430025976980587198e+02, 3.88240183605401609683e+03,
        7.24046774195652478189e+03, 5.93072701187316984827e+03, 2.06209331660327847417e+03,
        2.42005740240291393179e+02],
    RP=[-4.79443220978201773821e+09, 1.95617491946556577543e+12, -2.49248344360967716204e+14,
        9.70862251047306323952e+15],
    RQ=[4.99563147152651017219e+02, 1.73785401676374683123e+05, 4.84409658339962045305e+07,
        1.11855537045356834862e+10, 2.11277520115489217587e+12, 3.10518229857422583814e+14,
        3.18121955943204943306e+16, 1.71086294081043136091e+18],
    ROOTS=(5.78318596294678452118e+00, 3.04712623436620863991e+01),
    YP=[1.55924367855235737965e+04, -1.46639295903971606143e+07, 5.43526477051876500413e+09,
        -9.82136065717911466409e+11, 8.75906394395366999549e+13, -3.46628303384729719441e+15,
        4.42733268572569800351e+16, -1.84950800436986690637e+16],
    YQ=[1.04128353664259848412e+03, 6.26107330137134956842e+05, 2.68919633393814121987e+08,
        8.64002487103935000337e+10, 2.02979612750105546709e+13, 3.17157752842975028269e+15,
        2.50596256172653059228e+17],
    PHASE=0.785398163397448309615660845819875721,
)
_CEPHES_J1 = dict(
    PP=[7.62125616208173112003e-04, 7.31397056940917570436e-02, 1.12719608129684925192e+00,
        5.11207951146807644818e+00, 8.42404590141772420927e+00, 5.21451598682361504063e+00,
        1.00000000000000000254e+00],
    PQ=[5.71323128072548699714e-04, 6.88455908754495404082e-02, 1.10514232634061696926e+00,
        5.07386386128601488557e+00, 8.39985554327604159757e+00, 5.20982848682361821619e+00,
        9.99999999999999997461e-01],
    QP=[5.10862594750176621635e-02, 4.98213872951233449420e+00, 7.58238284132545283818e+01,
        3.66779609360150777800e+02, 7.10856304998926107277e+02, 5.97489612400613639965e+02,
        2.11688757100572135698e+02, 2.52070205858023719784e+01],
    QQ=[7.42373277035675149943e+01, 1.05644886038262816351e+03, 4.98641058337653607651e+03,
        9.56231892404756170795e+03, 7.99704160447350683650e+03, 2.82619278517639096600e+03,
        3.36093607810698293419e+02],
    RP=[-8.99971225705559398224e+08, 4.52228297998194034323e+11, -7.27494245221818276015e+13,
        3.68295732863852883286e+15],
    RQ=[6.20836478118054335476e+02, 2.56987256757748830383e+05, 8.35146791431949253037e+07,
        2.21511595479792499675e+10, 4.74914122079991414898e+12, 7.84369607876235854894e+14,
        8.95222336184627338078e+16, 5.32278620332680085395e+18],
    ROOTS=(1.46819706421238932572e+01, 4.92184563216946036703e+01),
    YP=[1.26320474790178026440e+09, -6.47355876379160291031e+11, 1.14509511541823727583e+14,
        -8.12770255501325109621e+15, 2.02439475713594898196e+17, -7.78877196265950026825e+17],
    YQ=[5.94301592346128195359e+02, 2.35564092943068577943e+05, 7.34811944459721705660e+07,
        1.87601316108706159478e+10, 3.88231277496238566008e+12, 6.20557727146953693363e+14,
        6.87141087355300489866e+16, 3.97270608116560655612e+18],
    PHASE=2.356194490192344928846982537459627163,
)
_SQRT_2_OVER_PI = 0.797884560802865355879892119868763737
_TWO_OVER_PI = 0.636619772367581343075535053490057448


def _polevl(z: List[Tensor], coeffs: Sequence[float], K: int) -> List[Tensor]:
    """Σ_i c_i z^(n−1−i) by Horner's scheme on the series z (torch's loop r = r·z + c_i)."""
    p = [torch.full_like(z[0], coeffs[0])]
    for c in coeffs[1:]:
        p = S.mul(p, z, K)
        p[0] = p[0] + c
    return p


def _cephes_small(x: List[Tensor], K: int, which: str) -> List[Tensor]:
    """torch's branch x ≤ 5 on the series x (j0, j1: any sign; y0, y1: x > 0)."""
    c = _CEPHES_J0 if which in ("j0", "y0") else _CEPHES_J1
    w = S.square(x, K)
    if which in ("j0", "j1"):
        r1, r2 = c["ROOTS"]
        roots = S.mul([w[0] - r1] + w[1:], [w[0] - r2] + w[1:], K)
        y = S.div(S.mul(roots, _polevl(w, c["RP"], K), K), _polevl(w, c["RQ"], K), K)
        return y if which == "j0" else S.mul(y, x, K)
    ratio = S.div(_polevl(w, c["YP"], K), _polevl(w, c["YQ"], K), K)
    if which == "y0":
        j0_log = S.mul(S.log(x, K), _cephes_small(x, K, "j0"), K)
        return S.add(ratio, S.scale(j0_log, _TWO_OVER_PI, K), K)
    t = S.sub(S.mul(_cephes_small(x, K, "j1"), S.log(x, K), K), S.reciprocal(x, K), K)
    return S.add(S.mul(x, ratio, K), S.scale(t, _TWO_OVER_PI, K), K)


def _cephes_large(x: List[Tensor], K: int, which: str) -> List[Tensor]:
    """torch's branch x > 5 on the series x > 0: with z = 25/x², θ = x − phase,
    (P(z)·cos θ − (5/x)·Q(z)·sin θ)·√(2/π)/√x (J; Y: sin θ, +cos θ), P = PP/PQ, Q = QP/QQ."""
    c = _CEPHES_J0 if which in ("j0", "y0") else _CEPHES_J1
    five_r = S.scale(S.reciprocal(x, K), 5.0, K)
    z = S.square(five_r, K)
    p = S.div(_polevl(z, c["PP"], K), _polevl(z, c["PQ"], K), K)
    q = S.mul(five_r, S.div(_polevl(z, c["QP"], K), _polevl(z, c["QQ"], K), K), K)
    sin, cos = S.sin_cos([x[0] - c["PHASE"]] + x[1:], K)
    if which in ("j0", "j1"):
        v = S.sub(S.mul(p, cos, K), S.mul(q, sin, K), K)
    else:
        v = S.add(S.mul(p, sin, K), S.mul(q, cos, K), K)
    return S.scale(S.mul(v, S.rsqrt(x, K), K), _SQRT_2_OVER_PI, K)


def _cephes_series(x: List[Tensor], K: int, which: str) -> List[Tensor]:
    """torch's J0/J1/Y0/Y1 on the series x, branch by the primal; the branches run on safe
    primals elsewhere so that no infinity reaches the graph (it would poison the backward)."""
    x0 = x[0]
    one = torch.ones_like(x0)
    if which in ("j0", "j1"):
        big = x0.abs() > 5
        sgn = torch.where(x0 < 0, -one, one)
        xs = [torch.where(big, one, x0)] + x[1:]
    else:
        big = x0 > 5
        sgn = one
        xs = [torch.where(big | (x0 <= 0), one, x0)] + x[1:]
    xl = [torch.where(big, x0.abs(), 10 * one)] + [c * sgn for c in x[1:]]
    small = _zeros_after(_cephes_small(xs, K, which), K + 1)
    large = _zeros_after(_cephes_large(xl, K, which), K + 1)
    if which == "j1":  # odd: J1(x) = −J1(−x)
        large = [c * sgn for c in large]
    out = [torch.where(big, a, b) for a, b in zip(large, small)]
    if which in ("y0", "y1"):  # no expansion at x ≤ 0 (−∞ at 0, NaN below)
        out = [torch.where(x0 <= 0, torch.full_like(c, math.nan), c) for c in out]
    return out


@functools.lru_cache(maxsize=None)
def _cephes_matches(which: str) -> bool:
    """Whether the transcription above reproduces torch's values (to rounding) on a grid."""
    op = getattr(_SPECIAL, "bessel_" + which)
    x = torch.cat([torch.linspace(-40.0, 40.0, 641, dtype=torch.float64),
                   torch.tensor([4.999, 5.0, 5.001, 1e-3, 2e-5], dtype=torch.float64)])
    if which in ("y0", "y1"):
        x = x[x > 0]
    ours = _cephes_series([x], 0, which)[0]
    ref = op(x)
    return bool(torch.allclose(ours, ref, rtol=1e-12, atol=1e-14))


def _bessel(name: str, op: Callable, kind: str, which: int, *funcs: Any,
            cephes: str = "") -> None:
    fn = functools.partial(_bessel_table, kind=kind, which=which, op=op)

    @register(*funcs)
    def rule(input, *, out=None):
        _real_only(name, input)
        if cephes and _cephes_matches(cephes):
            K = input._order
            y = _cephes_series(input.series(), K, cephes)
            # torch's value, with the gradient of the transcription (equal to it to rounding)
            y[0] = op(input._coeffs[0]) + (y[0] - y[0].detach())
            return make_jet(y, K)
        return _table_jet(input, fn)
    rule.__name__ = name
    f0, f1, alpha, beta, _ = _BESSEL[kind]
    rule.__doc__ = (f"{name}: the Taylor coefficients at x_0 of the pair ({f0.__name__}, "
                    f"{f1.__name__}) from f0′ = {alpha:+g}·f1, f1′ = {beta:+g}·f0 − f1/x (see the "
                    "comment above _bessel_pair), composed with the input series.")
    if kind in ("Ie", "Ke"):
        rule.__doc__ += (" The pair is the scaled one: the same linear recurrence from the scaled "
                         "values, times the series of the scale factor (e^(−|x|) or e^x).")
    if cephes:
        rule.__doc__ = (f"{name}: torch's own algorithm (Cephes, as transcribed in ATen) run on "
                        "the input series, so that the coefficients are those of the function "
                        "torch evaluates (see the comment above _CEPHES_J0); if torch's values no "
                        "longer match it, " + rule.__doc__[len(name) + 2:])


_bessel("bessel_j0", _SPECIAL.bessel_j0, "J", 0, _SPECIAL.bessel_j0, cephes="j0")
_bessel("bessel_j1", _SPECIAL.bessel_j1, "J", 1, _SPECIAL.bessel_j1, cephes="j1")
_bessel("bessel_y0", _SPECIAL.bessel_y0, "Y", 0, _SPECIAL.bessel_y0, cephes="y0")
_bessel("bessel_y1", _SPECIAL.bessel_y1, "Y", 1, _SPECIAL.bessel_y1, cephes="y1")
_bessel("modified_bessel_i0", _SPECIAL.modified_bessel_i0, "I", 0, _SPECIAL.modified_bessel_i0)
_bessel("modified_bessel_i1", _SPECIAL.modified_bessel_i1, "I", 1, _SPECIAL.modified_bessel_i1)
_bessel("i0", torch.i0, "I", 0, *aliases("i0"), _SPECIAL.i0)
_bessel("i1", _SPECIAL.i1, "I", 1, _SPECIAL.i1)
_bessel("i0e", _SPECIAL.i0e, "Ie", 0, _SPECIAL.i0e)
_bessel("i1e", _SPECIAL.i1e, "Ie", 1, _SPECIAL.i1e)
_bessel("modified_bessel_k0", _SPECIAL.modified_bessel_k0, "K", 0, _SPECIAL.modified_bessel_k0)
_bessel("modified_bessel_k1", _SPECIAL.modified_bessel_k1, "K", 1, _SPECIAL.modified_bessel_k1)
_bessel("scaled_modified_bessel_k0", _SPECIAL.scaled_modified_bessel_k0, "Ke", 0,
        _SPECIAL.scaled_modified_bessel_k0)
_bessel("scaled_modified_bessel_k1", _SPECIAL.scaled_modified_bessel_k1, "Ke", 1,
        _SPECIAL.scaled_modified_bessel_k1)


# sin(z)/z (sinc with z = πx, spherical_bessel_j0 with z = x) is entire; z·f = sin z gives
#   f_k = (s_k − f_{k−1}) / z_0,   s_k = sin(z_0 + kπ/2)/k!   (the Taylor coefficients of sin),
# which divides by z_0, so for |z_0| ≤ 2 the Maclaurin series Σ_m (−1)^m z^{2m}/(2m+1)! is used
# (18 terms: the first neglected one is below 4^18/37! ≈ 5e−33).

def _sinc_table(x0: Tensor, K: int, scale: float, op: Callable) -> List[Tensor]:
    z0 = scale * x0
    small = z0.abs() <= _BESSEL_R
    zl = torch.where(small, torch.full_like(z0, 2 * _BESSEL_R), z0)
    zs = torch.where(small, z0, torch.zeros_like(z0))
    sv, cv = torch.sin(zl), torch.cos(zl)
    cyc = [sv, cv, -sv, -cv]
    f = [sv / zl]
    for k in range(1, K + 1):
        f.append((cyc[k % 4] / math.factorial(k) - f[k - 1]) / zl)
    w = [zs * zs, 2 * zs, torch.ones_like(zs)]
    p = [torch.full_like(zs, (-1) ** (_BESSEL_M - 1) / math.factorial(2 * _BESSEL_M - 1))]
    for m in range(_BESSEL_M - 2, -1, -1):
        p = S.mul(p, w, K)
        p[0] = p[0] + (-1) ** m / math.factorial(2 * m + 1)
    p = _zeros_after(p, K + 1)
    out = [op(x0)]
    for k in range(1, K + 1):
        out.append(torch.where(small, p[k], f[k]) * scale ** k)
    return out


_SINC = functools.partial(_sinc_table, scale=math.pi, op=torch.sinc)
_SJ0 = functools.partial(_sinc_table, scale=1.0, op=_SPECIAL.spherical_bessel_j0)


@register(*aliases("sinc"), _SPECIAL.sinc)
def sinc(input, *, out=None):
    """sinc(x) = sin(πx)/(πx): Taylor coefficients at x_0 of sin(z)/z (the recurrence z·f = sin z,
    or the Maclaurin series near 0: exact also at x = 0), times π^k, composed with the input."""
    _real_only("sinc", input)
    return _table_jet(input, _SINC)


@register(_SPECIAL.spherical_bessel_j0)
def spherical_bessel_j0(input, *, out=None):
    """j0(x) = sin(x)/x: as sinc (the same table with z = x; exact also at x = 0)."""
    _real_only("spherical_bessel_j0", input)
    return _table_jet(input, _SJ0)


@register(_SPECIAL.airy_ai)
def airy_ai(input, *, out=None):
    """Ai(x): refused for a jet that moves (or whose value needs a gradient). Ai′ (needed for every
    derivative, since Ai″ = x·Ai) is not available from torch (no Ai′, Bi, or Bessel functions of
    order 1/3, 2/3), and torch's airy_ai has no autograd formula either."""
    _real_only("airy_ai", input)
    x0 = input._coeffs[0]
    if _only_value(input) and not x0.requires_grad:  # a constant along the path
        return make_jet([_SPECIAL.airy_ai(x0)], input._order)
    raise JetError(
        "torch.special.airy_ai: its derivatives need Ai′(x) (Ai″ = x·Ai), which torch does not "
        "provide (no Ai′, Bi, or Bessel functions of order ±1/3, ±2/3), so its Taylor coefficients "
        "cannot be computed exactly; .detach() the input if Ai should be a constant")


# -- orthogonal polynomials ---------------------------------------------------------------------
#
# P_{m+1} = (A_m z + B_m)·P_m − C_m·P_{m−1} run on the Taylor coefficients in δ of z = z_0 + δ
# ((z·P)_k = z_0 P_k + P_{k−1}): the exact Taylor coefficients of the polynomial at z_0, for each
# element its own degree n (torch truncates n to an integer; n < 0 gives 0). n is piecewise
# constant, so a jet n is a constant along the path. Shifted Chebyshev: z = 2x − 1 (coefficient k
# times 2^k).

_MAX_DEGREE = 1 << 20


def _poly_step(kind: str, m: int):
    if kind in ("T", "U", "V", "W"):
        return 2.0, 0.0, 1.0
    if kind == "H":
        return 2.0, 0.0, 2.0 * m
    if kind == "He":
        return 1.0, 0.0, float(m)
    if kind == "L":
        return -1.0 / (m + 1), (2 * m + 1) / (m + 1), m / (m + 1)
    return (2 * m + 1) / (m + 1), 0.0, m / (m + 1)  # Legendre


def _poly_table(x0: Tensor, K: int, n: Tensor, n_arg: Any, kind: str, shifted: bool,
                op: Callable) -> List[Tensor]:
    xb, nb = torch.broadcast_tensors(x0, n)
    z0 = 2 * xb - 1 if shifted else xb
    shape = (K + 1,) + tuple(z0.shape)
    e0 = torch.zeros(shape, dtype=z0.dtype, device=z0.device)
    e0[0] = 1
    Z = torch.zeros_like(e0)
    Z[0] = z0
    if K >= 1:
        Z[1] = 1
    p1 = {"T": Z, "U": 2 * Z, "V": 2 * Z - e0, "W": 2 * Z + e0, "H": 2 * Z, "He": Z,
          "L": e0 - Z, "P": Z}[kind]
    out = torch.where(nb == 0, e0, torch.zeros_like(e0))
    out = torch.where(nb == 1, p1, out)
    p0 = e0
    nmax = int(nb.max()) if nb.numel() else 0
    for m in range(1, nmax):
        A, B, C = _poly_step(kind, m)
        zp = z0 * p1
        zp[1:] += p1[:-1]
        p2 = A * zp - C * p0
        if B:
            p2 = p2 + B * p1
        out = torch.where(nb == m + 1, p2, out)
        p0, p1 = p1, p2
    if shifted:
        out = out * torch.tensor([2.0 ** k for k in range(K + 1)], dtype=out.dtype,
                                 device=out.device).reshape((-1,) + (1,) * z0.dim())
    res = list(out.unbind(0))
    res[0] = op(x0, n_arg)
    return res


def _polynomial(name: str, op: Callable, kind: str, shifted: bool = False) -> None:
    @register(op)
    def rule(x, n, *, out=None):   # torch's names: special.*_polynomial_*(x, n)
        input = x
        if not is_jet(input):  # only the degree is a jet: piecewise constant in n
            record("constants", op)
            return op(input, primal(n))
        _real_only(name, input)
        n_arg = primal(n)
        x0 = input._coeffs[0]
        nt = n_arg if isinstance(n_arg, Tensor) else torch.tensor(n_arg)
        nt = (torch.trunc(nt) if nt.is_floating_point() else nt).to(torch.int64).to(x0.device)
        if nt.numel() and int(nt.max()) > _MAX_DEGREE:
            raise JetError(f"torch.special.{name}: degree {int(nt.max())} is above {_MAX_DEGREE}; "
                           "the jet's three-term recurrence costs O(n) tensor operations")
        fn = functools.partial(_poly_table, kind=kind, shifted=shifted, op=op)
        return _table_jet(input, fn, nt, n_arg)
    rule.__name__ = name
    rule.__doc__ = (f"torch.special.{name}(x, n): the three-term recurrence of the "
                    f"{'shifted ' if shifted else ''}polynomials run on the Taylor coefficients at "
                    "x_0 (per element degree n, a constant), composed with the input series.")


for _kind in ("t", "u", "v", "w"):
    _polynomial(f"chebyshev_polynomial_{_kind}", getattr(_SPECIAL, f"chebyshev_polynomial_{_kind}"),
                _kind.upper())
    _polynomial(f"shifted_chebyshev_polynomial_{_kind}",
                getattr(_SPECIAL, f"shifted_chebyshev_polynomial_{_kind}"), _kind.upper(), True)
_polynomial("hermite_polynomial_h", _SPECIAL.hermite_polynomial_h, "H")
_polynomial("hermite_polynomial_he", _SPECIAL.hermite_polynomial_he, "He")
_polynomial("laguerre_polynomial_l", _SPECIAL.laguerre_polynomial_l, "L")
_polynomial("legendre_polynomial_p", _SPECIAL.legendre_polynomial_p, "P")


# -- piecewise-smooth ops -----------------------------------------------------------------------

def _mod(name: str, op: Callable) -> Callable:
    def rule(input, other, *, out=None):
        _real_only(name, input, other)
        K = order_of(input, other)
        like = _like(input, other)
        a, b = _ser(input, like), _ser(other, like)
        r0 = op(a[0], b[0])
        # the integer quotient q = (a − r)/b, constant between the jumps of the op
        q = torch.round((a[0] - r0) / b[0])
        n = max(len(a), len(b))
        out = [r0]
        for k in range(1, n):
            ak = a[k] if k < len(a) else None
            bk = b[k] if k < len(b) else None
            if bk is None:
                out.append(ak * torch.ones_like(q))
            elif ak is None:
                out.append(-q * bk)
            else:
                out.append(ak - q * bk)
        return make_jet(out, K)
    rule.__name__ = name
    rule.__doc__ = (f"{name}(a, b) = a − q·b with the integer quotient q = (a_0 − r_0)/b_0 fixed "
                    "along the path (the op is smooth between its jumps): y_k = a_k − q·b_k.")
    return rule


register(*aliases("fmod"))(_mod("fmod", torch.fmod))
remainder = register(*aliases("remainder"), torch.Tensor.__mod__)(
    _mod("remainder", torch.remainder))


@register(torch.Tensor.__rmod__)
def rmod(input, other):
    """other % input = remainder(other, input)."""
    return remainder(other, input)


@register(*aliases("frac"))
def frac(input, *, out=None):
    """frac(x) = x − trunc(x): y_0 = frac(x_0), y_k = x_k (trunc is piecewise constant)."""
    _real_only("frac", input)
    c = input._coeffs
    return make_jet(torch.cat([torch.frac(c[:1]), c[1:]]), input._order)


@register(*aliases("copysign"))
def copysign(input, other, *, out=None):
    """copysign(a, b) = |a|·sgn(b) (the sign bit of b): ±a, the sign fixed by the primals:
    y_k = sign(a_0)·copysign(1, b_0)·a_k; b enters only through its sign (piecewise constant). At
    a_0 = 0 (the kink of |a|) the coefficients k ≥ 1 are 0, as the abs rule and autograd."""
    _real_only("copysign", input, other)
    if not is_jet(input):
        record("constants", torch.copysign)
        return torch.copysign(input, primal(other))
    a = input.series()
    b0 = _t(other, a[0])
    m = torch.sign(a[0]) * torch.copysign(torch.ones_like(a[0]), b0)
    return make_jet([torch.copysign(a[0], b0)] + [c * m for c in a[1:]], input._order)


@register(*aliases("nextafter"))
def nextafter(input, other, *, out=None):
    """nextafter(a, b) = a plus one unit in the last place towards b: the derivative of the identity
    in a (autograd's), none in b: y_k = a_k."""
    _real_only("nextafter", input, other)
    if not is_jet(input):
        record("constants", torch.nextafter)
        return torch.nextafter(input, primal(other))
    a = input.series()
    y0 = torch.nextafter(a[0], _t(other, a[0]))
    return make_jet([y0] + a[1:], input._order)


@register(*aliases("ldexp"))
def ldexp(input, other, *, out=None):
    """ldexp(x, e) = x·2^e: the Cauchy product of x with the series of 2^e = exp(e·ln2) (exactly
    2^{e_0} in coefficient 0); e may be a (floating) jet."""
    _real_only("ldexp", input, other)
    K = order_of(input, other)
    like = _like(input, other)
    x = _ser(input, like)
    e0 = _t(other, like)
    two = torch.tensor(2.0, dtype=like.dtype, device=like.device)
    p0 = torch.pow(two, e0)
    if is_jet(other):
        p = S.exp(S.scale(other.series(), _LN2, K), K)
        p = [p0] + p[1:]
    else:
        p = [p0]
    y = S.mul(x, p, K)
    y[0] = torch.ldexp(x[0], e0)
    return make_jet(y, K)


@register(*aliases("frexp"))
def frexp(input, *, out=None):
    """frexp(x) = (m, e) with x = m·2^e: the integer exponent e is piecewise constant, so
    m_k = x_k·2^{−e} (k ≥ 1) and e is returned as a constant."""
    _real_only("frexp", input)
    c = input._coeffs
    m0, e = torch.frexp(c[0])
    scale = torch.pow(torch.tensor(2.0, dtype=c.dtype, device=c.device), -e.to(c.dtype))
    m = make_jet(torch.cat([m0.unsqueeze(0), c[1:] * scale]), input._order)
    return torch.return_types.frexp((m, e))


def _angle_scale(name: str, op: Callable, factor: float) -> Callable:
    def rule(input, *, out=None):
        _real_only(name, input)
        c = input._coeffs
        return make_jet(torch.cat([op(c[:1]), c[1:] * factor]), input._order)
    rule.__name__ = name
    rule.__doc__ = f"{name}: linear, y_k = {factor!r}·x_k (y_0 = {name}(x_0))."
    return rule


register(*aliases("deg2rad"))(_angle_scale("deg2rad", torch.deg2rad, math.pi / 180.0))
register(*aliases("rad2deg"))(_angle_scale("rad2deg", torch.rad2deg, 180.0 / math.pi))


@register(*aliases("nan_to_num"))
def nan_to_num(input, nan=0.0, posinf=None, neginf=None, *, out=None):
    """nan_to_num: the identity where x_0 is finite; where x_0 is NaN or ±∞ the value is replaced by
    a constant, so the coefficients k ≥ 1 are 0 there."""
    c = input._coeffs
    y0 = torch.nan_to_num(c[0], nan=nan, posinf=posinf, neginf=neginf)
    zero = torch.zeros((), dtype=c.dtype, device=c.device)
    if c.is_complex():  # the real and imaginary parts are replaced separately
        re, im = c.real, c.imag
        rest = torch.complex(torch.where(torch.isfinite(re[0]), re[1:], zero.real),
                             torch.where(torch.isfinite(im[0]), im[1:], zero.real))
    else:
        rest = torch.where(torch.isfinite(c[0]), c[1:], zero)
    return make_jet(torch.cat([y0.unsqueeze(0), rest]), input._order)


@register(_SPECIAL.round)
def special_round(input, *, decimals=0, out=None):
    """torch.special.round: piecewise constant, evaluated on the primal."""
    record("constants", _SPECIAL.round)
    return _SPECIAL.round(primal(input), decimals=decimals)
