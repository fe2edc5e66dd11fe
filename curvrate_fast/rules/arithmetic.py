"""Taylor rules for arithmetic: add, sub, mul, div, neg, pow, and the selection ops
(where, maximum, minimum, clamp, masked_fill, abs). docs/math.md §2: linear maps act coefficient-wise
(a constant goes to coefficient 0 only); products are Cauchy products; division and powers use
their recurrences; piecewise-linear ops select coefficients by the primal (like ReLU)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import series as S
from ..jets.registry import register
from ._common import JetError, aliases, is_jet, lift, make_jet, order_of, primal, series_of


def _ndim(x) -> int:
    return x.dim() if isinstance(x, Tensor) else 0


def _num(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _series(x):
    """A jet's coefficients, or a constant as a one-term series. A Python number stays a number:
    it then combines with the jet's coefficients in their dtype (as torch's weak typing of
    scalars does), where a tensor made from it would be float32 and round it."""
    if is_jet(x) or isinstance(x, Tensor):
        return series_of(x)
    return [x]


def _as_const(x, like: Tensor):
    """A constant operand as a tensor of the jet's dtype (python numbers keep weak typing)."""
    return x if _num(x) else torch.as_tensor(x, device=like.device)


@register(*aliases("add"), torch.Tensor.__add__, torch.Tensor.__radd__)
def add(input, other, *, alpha=1, out=None):
    K = order_of(input, other)
    a = series_of(input) if is_jet(input) else [input]  # a number keeps weak typing
    if is_jet(other) or isinstance(other, Tensor):
        b = series_of(other)
    else:
        b = [other]
    if not is_jet(input):  # constant + jet: the constant joins coefficient 0
        res = [a[0] + alpha * b[0]] + [alpha * x if alpha != 1 else x for x in b[1:K + 1]]
    elif not is_jet(other):
        res = [a[0] + alpha * b[0]] + a[1:]
    else:
        res = S.add(a, b, K, alpha=alpha)
    return make_jet(res, K)


@register(*aliases("sub"), torch.Tensor.__sub__, *aliases("subtract"))
def sub(input, other, *, alpha=1, out=None):
    return add(input, other, alpha=-alpha)


@register(torch.Tensor.__rsub__, torch.rsub)
def rsub(input, other, *, alpha=1):
    return sub(other, input, alpha=alpha)


@register(*aliases("neg"), *aliases("negative"), torch.Tensor.__neg__)
def neg(input):
    return make_jet(-input._coeffs, input._order)


@register(*aliases("positive"), torch.Tensor.__pos__)
def positive(input):
    return input


@register(*aliases("mul"), *aliases("multiply"), torch.Tensor.__mul__, torch.Tensor.__rmul__)
def mul(input, other, *, out=None):
    K = order_of(input, other)
    if is_jet(input) and is_jet(other):
        return make_jet(S.mul(input.series(), other.series(), K), K)
    jet, const = (input, other) if is_jet(input) else (other, input)
    return make_jet(lift(jet._coeffs, _ndim(const)) * const, K)


@register(*aliases("div"), *aliases("divide"), *aliases("true_divide"), torch.Tensor.__truediv__,
          torch.Tensor.__div__ if hasattr(torch.Tensor, "__div__") else None)
def div(input, other, *, rounding_mode=None, out=None):
    K = order_of(input, other)
    if rounding_mode is not None:  # floor/trunc division is piecewise constant along the path
        return torch.div(primal(input), primal(other), rounding_mode=rounding_mode)
    if not is_jet(other):
        return make_jet(lift(input._coeffs, _ndim(other)) / other, K)
    return make_jet(S.div(_series(input), other.series(), K), K)


@register(torch.Tensor.__rdiv__, torch.Tensor.__rtruediv__)
def rdiv(input, other):
    return div(other, input)


@register(*aliases("reciprocal"))
def reciprocal(input):
    return make_jet(S.reciprocal(input.series(), input._order), input._order)


@register(*aliases("pow"), torch.Tensor.__pow__)
def pow(input, exponent, *, out=None):
    """x^r. A jet base with a constant real exponent uses the power recurrence (docs/math.md §2),
    elementwise when r is a tensor; a jet exponent (or a complex one) uses exp(r·log x)."""
    K = order_of(input, exponent)
    if not is_jet(exponent):
        if isinstance(exponent, Tensor):
            if exponent.is_complex():
                return _exp_log_pow(input, exponent, K)
            if exponent.numel() == 1 and exponent.dim() <= input.dim():
                exponent = exponent.item()
            else:
                return _tensor_exponent_pow(input, exponent, K)
        if isinstance(exponent, complex):
            return _exp_log_pow(input, exponent, K)
        return make_jet(S.pow_scalar(input.series(), float(exponent), K), K)
    return _exp_log_pow(input, exponent, K)


@register(*aliases("float_power"))
def float_power(input, exponent, *, out=None):
    """torch.float_power: the power computed in double precision (complex128 for complex input)."""
    def up(v):
        if is_jet(v) or isinstance(v, Tensor):
            return v.to(torch.complex128 if v.is_complex() else torch.float64)
        return v
    return pow(up(input), up(exponent))


def _tensor_exponent_pow(base, r: Tensor, K: int):
    """x^r for a jet x and a constant tensor r: y_0 = x_0^r and, where x_0 ≠ 0,
    y_k = (1/(k·x_0)) Σ_{j=0..k−1} (r(k−j) − j)·x_{k−j}·y_j elementwise. Where x_0 = 0 the power is
    smooth only for a non-negative integer r, where it is the polynomial x^r (repeated Cauchy
    products); any other r there has no Taylor expansion and is refused."""
    u = base.series()
    shape = torch.broadcast_shapes(base.shape, r.shape)
    u = [c.expand(shape) for c in u]
    rr = r.to(torch.result_type(u[0], r)).expand(shape)
    x0 = u[0]
    zero = x0 == 0
    safe = [torch.where(zero, torch.ones_like(x0), u[0])] + u[1:]
    y = S.pow_tensor(safe, rr, K)
    y[0] = torch.pow(x0, rr)
    if bool(zero.any()):
        rz = rr[zero]
        if not bool(((rz >= 0) & (rz == torch.round(rz)) & (rz <= 64)).all()):
            raise JetError("pow: a zero base with an exponent that is not a non-negative integer has "
                           "no Taylor expansion (the derivatives are infinite or undefined there)")
        for e in torch.unique(rz).tolist():
            sel = zero & (rr == e)
            poly = S.pow_int(u, int(e), K)
            for k in range(len(y)):
                pk = poly[k] if k < len(poly) else torch.zeros_like(x0)
                y[k] = torch.where(sel, pk.expand(shape), y[k])
    return make_jet(y, K)


def _is_complex(x) -> bool:
    return isinstance(x, complex) or (isinstance(x, Tensor) and x.is_complex())


def _complex_exp_log_pow(base, exponent, K):
    """z^w = exp(w · log z) with the principal log: torch's definition of a complex power, and
    holomorphic wherever z ≠ 0 (the recurrences of exp, log and mul hold over ℂ). A real base is
    cast to complex first (log of a negative real is log|a| + iπ, as torch). At z = 0 the power has
    no Taylor expansion in general, so it is refused."""
    b0 = primal(base)
    dt = torch.result_type(b0, primal(exponent))
    if bool((torch.as_tensor(b0) == 0).any()):
        raise JetError("pow with a complex base or exponent at a zero base: z^w = exp(w log z) has "
                       "no Taylor expansion at z = 0")
    log_a = S.log([torch.as_tensor(s).to(dt) for s in _series(base)], K)
    return make_jet(S.exp(S.mul(log_a, _series(exponent), K), K), K)


def _exp_log_pow(base, exponent, K):
    """a^b = exp(b · log a) for a jet exponent (or a tensor exponent), a > 0; a base identically 0
    along the path with b_0 > 0 gives 0; any other base ≤ 0 has no real expansion and is refused."""
    if _is_complex(primal(base)) or _is_complex(primal(exponent)):
        return _complex_exp_log_pow(base, exponent, K)
    b0 = primal(base)
    zero = None
    if is_jet(exponent):
        # a^b(t) is real-analytic in b only for a > 0; a base identically 0 along the path with
        # b_0 > 0 gives 0^b(t) = 0 (all coefficients 0); any other base ≤ 0 is refused
        a0 = torch.as_tensor(b0, dtype=exponent.dtype, device=exponent.device)
        if bool((a0 <= 0).any()):
            zero = a0 == 0
            for c in (base._coeffs[1:] if is_jet(base) else ()):
                zero = zero & (c == 0)
            zero = zero & (primal(exponent) > 0)
            if bool(((a0 <= 0) & ~zero).any()):
                raise JetError(
                    "pow (a ** b, torch.pow, Tensor.__rpow__, float_power) with a jet exponent b: "
                    "a^b = exp(b·log a) has a real Taylor expansion in b only for a base a > 0 (or a "
                    "base identically 0 with b > 0); the base is ≤ 0 at some elements")
            base = [torch.where(zero, torch.ones_like(a0), a0)] + \
                [torch.where(zero, torch.zeros_like(c), c) for c in _series(base)[1:]]
    if zero is not None:
        log_a = S.log(base, K)
    elif is_jet(base):
        log_a = S.log(_series(base), K)
    else:
        log_a = [torch.log(torch.as_tensor(base, dtype=exponent.dtype, device=exponent.device))]
    prod = S.mul(log_a, _series(exponent), K)
    y = S.exp(prod, K)
    if zero is not None:
        y = [torch.where(zero, torch.zeros_like(c), c) for c in y]
    return make_jet(y, K)


@register(torch.Tensor.__rpow__)
def rpow(input, other):
    """other ** input (a constant base, the jet as exponent): pow(other, input)."""
    return pow(other, input)


@register(*aliases("square"))
def square(input):
    return make_jet(S.square(input.series(), input._order), input._order)


def _unary(series_fn, *funcs):
    @register(*funcs)
    def rule(input, *, out=None):
        K = input._order
        return make_jet(series_fn(input.series(), K), K)
    rule.__doc__ = series_fn.__doc__
    return rule


sqrt = _unary(S.sqrt, *aliases("sqrt"))
rsqrt = _unary(S.rsqrt, *aliases("rsqrt"))
exp = _unary(S.exp, *aliases("exp"))
expm1 = _unary(S.expm1, *aliases("expm1"), torch.special.expm1)
log = _unary(S.log, *aliases("log"))
log1p = _unary(S.log1p, *aliases("log1p"), torch.special.log1p)
sin = _unary(S.sin, *aliases("sin"))
cos = _unary(S.cos, *aliases("cos"))
erf = _unary(S.erf, *aliases("erf"), torch.special.erf)
atan = _unary(S.atan, *aliases("atan"), *aliases("arctan"))


@register(*aliases("exp2"), torch.special.exp2)
def exp2(input, *, out=None):
    """2^u = exp(u·ln2), y_0 = exp2(u_0) (exact for integer u_0)."""
    import math
    K = input._order
    y = S.exp(S.scale(input.series(), math.log(2.0), K), K)
    y[0] = torch.exp2(input._coeffs[0])
    return make_jet(y, K)


def _log_base(base):
    import math

    def rule(input):
        K = input._order
        return make_jet(S.scale(S.log(input.series(), K), 1.0 / math.log(base), K), K)
    return rule


register(*aliases("log2"))(_log_base(2.0))
register(*aliases("log10"))(_log_base(10.0))


@register(*aliases("tan"))
def tan(input, *, out=None):
    """tan: y′ = (1 + y²)·u′ (series.tan), y_0 = tan(u_0)."""
    K = input._order
    return make_jet(S.tan(input.series(), K), K)


@register(*aliases("sinh"))
def sinh(input, *, out=None):
    """sinh: the coupled recurrence of (sinh, cosh) (series.sinh_cosh)."""
    K = input._order
    return make_jet(S.sinh_cosh(input.series(), K)[0], K)


@register(*aliases("cosh"))
def cosh(input, *, out=None):
    """cosh: the coupled recurrence of (sinh, cosh) (series.sinh_cosh)."""
    K = input._order
    return make_jet(S.sinh_cosh(input.series(), K)[1], K)


# -- selection ops ------------------------------------------------------------------------------

def _select(cond: Tensor, a, b, K: int):
    """where(cond, a, b) coefficient-wise; cond comes from primals, so it is constant on the path."""
    A, B = _series(a), _series(b)
    n = max(len(A), len(B))
    out = []
    for k in range(min(n, K + 1)):
        x = A[k] if k < len(A) else None
        y = B[k] if k < len(B) else None
        if x is None:
            x = torch.zeros_like(y)
        if y is None:
            y = torch.zeros_like(x)
        out.append(torch.where(cond, x, y))
    return make_jet(out, K)


@register(*aliases("where"))
def where(condition, input=None, other=None, *, out=None):
    if input is None:
        return torch.where(primal(condition))
    K = order_of(input, other)
    return _select(primal(condition), input, other, K)


@register(*aliases("maximum"), *aliases("fmax"))
def maximum(input, other, *, out=None):
    K = order_of(input, other)
    return _select(primal(input) >= primal(other), input, other, K)


@register(*aliases("minimum"), *aliases("fmin"))
def minimum(input, other, *, out=None):
    K = order_of(input, other)
    return _select(primal(input) <= primal(other), input, other, K)


@register(*aliases("clamp"), *aliases("clip"))
def clamp(input, min=None, max=None, *, out=None):
    if is_jet(min) or is_jet(max):
        def bound(b):
            if is_jet(b) or isinstance(b, Tensor):
                return b
            return torch.as_tensor(b, dtype=input.dtype, device=input.device)
        lo = input if min is None else maximum(input, bound(min))
        return lo if max is None else minimum(lo, bound(max))
    x0 = input._coeffs[0]
    inside = torch.ones_like(x0, dtype=torch.bool)
    if min is not None:
        inside = inside & (x0 >= min)
    if max is not None:
        inside = inside & (x0 <= max)
    y0 = torch.clamp(x0, min, max)
    m = inside.to(x0.dtype)
    return make_jet([y0] + [c * m for c in input.series()[1:]], input._order)


@register(*aliases("clamp_min"))
def clamp_min(input, min):
    return clamp(input, min=min)


@register(*aliases("clamp_max"))
def clamp_max(input, max):
    return clamp(input, max=max)


@register(*aliases("abs"), *aliases("absolute"), torch.Tensor.__abs__)
def abs(input, *, out=None):
    """|u|: y_0 = |u_0|, y_k = sign(u_0)·u_k (derivative 0 at u_0 = 0, as autograd). A complex jet
    is not holomorphic under |·|: |z| = sqrt(Re² + Im²) (rules/complex.py, abs_complex)."""
    if input.is_complex():
        from .complex import abs_complex
        return abs_complex(input)
    x0 = input._coeffs[0]
    sg = torch.sign(x0)
    return make_jet([x0.abs()] + [c * sg for c in input.series()[1:]], input._order)


@register(*aliases("masked_fill"))
def masked_fill(input, mask, value):
    """Coefficient 0 filled with the value where the (primal) mask is set; the higher coefficients
    are zero there (a constant fill) or the value's (a jet fill). The mask may broadcast the
    result beyond the input's shape, as in torch."""
    K = order_of(input, value)
    m = primal(mask)
    if is_jet(value):
        return _select(m, value, input, K)
    c = input._coeffs
    first = c[0].masked_fill(m, value)
    if c.shape[0] == 1:
        return make_jet(first.unsqueeze(0), K)
    rest = lift(c[1:], m.dim()).masked_fill(m, 0.0)
    rest = rest.expand((rest.shape[0],) + tuple(first.shape))
    return make_jet(torch.cat([first.unsqueeze(0), rest]), K)


@register(*aliases("lerp"))
def lerp(input, end, weight):
    return input + weight * (end - input)


@register(*aliases("addcmul"))
def addcmul(input, tensor1, tensor2, *, value=1):
    return input + value * (tensor1 * tensor2)


@register(*aliases("addcdiv"))
def addcdiv(input, tensor1, tensor2, *, value=1):
    return input + value * (tensor1 / tensor2)
