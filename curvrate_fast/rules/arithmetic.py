"""Taylor rules for arithmetic: add, sub, mul, div, neg, pow, and the selection ops
(where, maximum, minimum, clamp, masked_fill, abs). SPEC.md §2: linear maps act coefficient-wise
(a constant goes to coefficient 0 only); products are Cauchy products; division and powers use
their recurrences; piecewise-linear ops select coefficients by the primal (like ReLU)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import series as S
from ..jets.registry import register
from ._common import JetError, aliases, is_jet, make_jet, order_of, primal, series_of


def _num(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _series(x):
    if is_jet(x) or isinstance(x, Tensor):
        return series_of(x)
    return [torch.as_tensor(x)]


def _as_const(x, like: Tensor):
    """A constant operand as a tensor of the jet's dtype (python numbers keep weak typing)."""
    return x if _num(x) else torch.as_tensor(x, device=like.device)


@register(*aliases("add"), torch.Tensor.__add__, torch.Tensor.__radd__)
def add(input, other, *, alpha=1, out=None):
    K = order_of(input, other)
    a = series_of(input) if is_jet(input) else [input if isinstance(input, Tensor) else torch.as_tensor(input)]
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
    return make_jet(jet._coeffs * const, K)


@register(*aliases("div"), *aliases("divide"), *aliases("true_divide"), torch.Tensor.__truediv__,
          torch.Tensor.__div__ if hasattr(torch.Tensor, "__div__") else None)
def div(input, other, *, rounding_mode=None, out=None):
    K = order_of(input, other)
    if rounding_mode is not None:  # floor/trunc division is piecewise constant along the path
        return torch.div(primal(input), primal(other), rounding_mode=rounding_mode)
    if not is_jet(other):
        return make_jet(input._coeffs / other, K)
    return make_jet(S.div(_series(input), other.series(), K), K)


@register(torch.Tensor.__rdiv__, torch.Tensor.__rtruediv__)
def rdiv(input, other):
    return div(other, input)


@register(*aliases("reciprocal"))
def reciprocal(input):
    return make_jet(S.reciprocal(input.series(), input._order), input._order)


@register(*aliases("pow"), torch.Tensor.__pow__, *aliases("float_power"))
def pow(input, exponent, *, out=None):
    K = order_of(input, exponent)
    if not is_jet(exponent):
        if isinstance(exponent, Tensor):
            if exponent.numel() != 1:
                return _exp_log_pow(input, exponent, K)
            exponent = exponent.item()
        return make_jet(S.pow_scalar(input.series(), float(exponent), K), K)
    return _exp_log_pow(input, exponent, K)


def _exp_log_pow(base, exponent, K):
    """a^b = exp(b · log a) for a jet exponent (or a tensor exponent), a > 0."""
    b0 = primal(base)
    if isinstance(b0, Tensor) and bool((b0 <= 0).any()) and is_jet(exponent):
        raise JetError("pow with a jet exponent needs a positive base (a^b = exp(b log a))")
    log_a = S.log(_series(base), K) if is_jet(base) else [torch.log(torch.as_tensor(base, dtype=exponent.dtype, device=exponent.device))]
    prod = S.mul(log_a, _series(exponent), K)
    return make_jet(S.exp(prod, K), K)


@register(torch.Tensor.__rpow__)
def rpow(input, other):
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
def exp2(input):
    import math
    K = input._order
    return make_jet(S.exp(S.scale(input.series(), math.log(2.0), K), K), K)


def _log_base(base):
    import math

    def rule(input):
        K = input._order
        return make_jet(S.scale(S.log(input.series(), K), 1.0 / math.log(base), K), K)
    return rule


register(*aliases("log2"))(_log_base(2.0))
register(*aliases("log10"))(_log_base(10.0))


@register(*aliases("tan"))
def tan(input):
    K = input._order
    s, c = S.sin_cos(input.series(), K)
    return make_jet(S.div(s, c, K), K)


@register(*aliases("sinh"))
def sinh(input):
    K = input._order
    e, em = S.exp(input.series(), K), S.exp(S.neg(input.series(), K), K)
    return make_jet(S.scale(S.sub(e, em, K), 0.5, K), K)


@register(*aliases("cosh"))
def cosh(input):
    K = input._order
    e, em = S.exp(input.series(), K), S.exp(S.neg(input.series(), K), K)
    return make_jet(S.scale(S.add(e, em, K), 0.5, K), K)


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
        lo = input if min is None else maximum(input, min if is_jet(min) or isinstance(min, Tensor) else torch.as_tensor(min, dtype=input.dtype, device=input.device))
        return lo if max is None else minimum(lo, max if is_jet(max) or isinstance(max, Tensor) else torch.as_tensor(max, dtype=input.dtype, device=input.device))
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
    """|u|: y_0 = |u_0|, y_k = sign(u_0)·u_k (derivative 0 at u_0 = 0, as autograd)."""
    x0 = input._coeffs[0]
    sg = torch.sign(x0)
    return make_jet([x0.abs()] + [c * sg for c in input.series()[1:]], input._order)


@register(*aliases("masked_fill"))
def masked_fill(input, mask, value):
    K = order_of(input, value)
    m = primal(mask)
    if is_jet(value):
        return _select(m, value, input, K)
    c = input._coeffs
    first = c[0].masked_fill(m, value)
    rest = c[1:].masked_fill(m.unsqueeze(0).expand_as(c[1:]) if c.shape[0] > 1 else m, 0.0) \
        if c.shape[0] > 1 else c[1:]
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
