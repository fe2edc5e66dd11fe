"""The rule-authoring kit: most Taylor rules in one definition.

A rule receives the op's arguments (jets among them) and returns jets. Most ops fall into a few
shapes, each a one-liner here (JAX's ``jet`` has ``def_deriv``/``def_comp`` for the same reason):

- :func:`def_comp`: the op is a composition of ops that already have rules (write it in torch);
- :func:`def_deriv`: an elementwise op φ given by its derivative, y' = φ'(x)·x', with φ' written
  in torch ops (evaluated on jets one order lower, so it may use φ itself: tan' = 1 + tan²);
- :func:`def_taylor`: an elementwise op given by its derivatives at the primal point,
  φ(x_0), φ'(x_0), …, φ⁽ᴷ⁾(x_0) (polygamma: ψ⁽ⁿ⁺ᵏ⁾(x_0)), composed with the input series;
- :func:`def_linear`: an op linear in its jet operands (every coefficient through the op once);
- :func:`def_constant`: the result does not depend differentiably on the input.

Example::

    >>> from curvrate_fast.jets import kit
    >>> kit.def_deriv(torch.special.erfcx, deriv=lambda x, y: 2 * x * y - 2 / math.sqrt(math.pi))
    >>> kit.def_comp(torch.nn.functional.softsign)(lambda x: x / (1 + x.abs()))

Registering a second rule for the same callable raises (``registry.register``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Sequence

import torch
from torch import Tensor

from .. import series as S
from .registry import record, register
from .tensor import JetTensor, is_jet, make_jet, primals

__all__ = ["def_comp", "def_deriv", "def_taylor", "def_linear", "def_constant", "truncate",
           "compose_taylor"]


def def_comp(*funcs: Any, override: bool = False) -> Callable[[Callable], Callable]:
    """Register a rule written as a composition of torch ops that have rules (a decorator).

    Example::

        >>> @kit.def_comp(torch.nn.functional.hardswish)
        ... def hardswish(x, inplace=False):
        ...     return x * torch.nn.functional.hardsigmoid(x)
    """
    return register(*funcs, override=override)


def truncate(x: JetTensor, order: int) -> JetTensor:
    """The same jet seen at a lower order (coefficients above ``order`` dropped)."""
    return JetTensor(x._coeffs[: order + 1], order)


def _series(v: Any, n: int, like: Tensor) -> List[Tensor]:
    """n coefficients of a jet, a constant tensor or a number (missing ones zero)."""
    if is_jet(v):
        c = v._coeffs
        out = list(c.unbind(0))[:n]
    else:
        out = [torch.as_tensor(v, dtype=like.dtype, device=like.device)]
    while len(out) < n:
        out.append(torch.zeros_like(out[0]))
    return out


def def_deriv(*funcs: Any, deriv: Callable[..., Any], override: bool = False) -> Callable:
    """Register the rule of an elementwise op φ(x, *params) from its derivative.

    ``deriv(x, y, *params)`` returns φ′(x) written in torch ops that have rules; ``y`` is φ(x), so
    derivatives that use the function itself are cheap (tan′ = 1 + y²). With the output series y(t)
    satisfying y′(t) = φ′(x(t))·x′(t), the coefficients follow from the jet g of φ′(x(t)) to order
    K − 1 (docs/math.md §2's pattern of exp, tanh, erf):

        y_0 = φ(x_0),   y_k = (1/k) Σ_{j=1..k} j·x_j·g_{k−j}.

    g needs x and y to order K − 1 only, so the rule evaluates itself one order lower first (a
    recursion of depth K, cheap next to a model's linear layers). Only the first argument may be
    a jet; the others are parameters (constants along the path).

    Example::

        >>> kit.def_deriv(torch.special.i0e,   # d/dx e^{-|x|} I0(x) = e^{-|x|}(I1 − sign(x) I0)
        ...               deriv=lambda x, y: torch.special.i1e(x) - torch.sign(x) * y)
    """
    def rule(input, *args, **kwargs):
        if any(is_jet(a) for a in args) or any(is_jet(v) for v in kwargs.values()):
            from .tensor import JetError
            raise JetError(f"{getattr(funcs[0], '__name__', funcs[0])}: only the first argument may "
                           "be a jet (the others are parameters of the function)")
        return _deriv_jet(funcs[0], deriv, input, args, kwargs)
    rule.__doc__ = f"{getattr(funcs[0], '__name__', funcs[0])} from its derivative (kit.def_deriv)."
    return register(*funcs, override=override)(rule)


def _deriv_jet(func, deriv, x: JetTensor, args, kwargs) -> JetTensor:
    K = x._order
    x0 = x._coeffs[0]
    y0 = func(x0, *args, **kwargs)
    if K == 0 or x._coeffs.shape[0] == 1:
        return make_jet(y0.unsqueeze(0), K)
    low = truncate(x, K - 1)
    y_low = make_jet(y0.unsqueeze(0), 0) if K == 1 else _deriv_jet(func, deriv, low, args, kwargs)
    if K == 1:
        low = truncate(x, 0)
    g = deriv(low, y_low, *args, **kwargs)
    gs = _series(g, K, y0)
    return make_jet(S.integrate(x.series(), gs, K, y0), K)


def compose_taylor(x: JetTensor, derivs: Sequence[Tensor]) -> JetTensor:
    """The jet of φ(x(t)) from φ's derivatives at the primal, ``derivs[j]`` = φ⁽ʲ⁾(x_0):
    φ(x(t)) = Σ_j φ⁽ʲ⁾(x_0)/j! · δ(t)^j with δ(t) = x(t) − x_0 (no constant term), so δ^j starts at
    t^j and orders up to K need j ≤ K (Faà di Bruno by Cauchy products, O(K³))."""
    K = x._order
    c = x.series()
    zero = torch.zeros_like(derivs[0])
    delta = [zero] + c[1:K + 1]
    out = [derivs[0]] + [zero] * K
    power = [torch.ones_like(derivs[0])]
    for j in range(1, K + 1):
        power = S.mul(power, delta, K)           # δ^j: coefficients below t^j are zero
        coef = derivs[j] / math.factorial(j)
        for k in range(j, len(power)):
            out[k] = out[k] + coef * power[k]
    return make_jet(out, K)


def def_taylor(*funcs: Any, derivatives: Callable[..., Sequence[Tensor]],
               override: bool = False) -> Callable:
    """Register an elementwise op from its derivatives at the primal point:
    ``derivatives(x0, K, *params)`` returns [φ(x0), φ′(x0), …, φ⁽ᴷ⁾(x0)] (plain tensors), composed
    with the input series by :func:`compose_taylor`. Only the first argument may be a jet.

    Example::

        >>> kit.def_taylor(torch.digamma,
        ...                derivatives=lambda x0, K: [torch.digamma(x0)] +
        ...                    [torch.polygamma(n, x0) for n in range(1, K + 1)])
    """
    def rule(input, *args, **kwargs):
        if any(is_jet(a) for a in args) or any(is_jet(v) for v in kwargs.values()):
            from .tensor import JetError
            raise JetError(f"{getattr(funcs[0], '__name__', funcs[0])}: only the first argument may "
                           "be a jet (the others are parameters of the function)")
        K = input._order
        derivs = derivatives(input._coeffs[0], K, *args, **kwargs)
        return compose_taylor(input, derivs)
    rule.__doc__ = f"{getattr(funcs[0], '__name__', funcs[0])} from its derivatives (kit.def_taylor)."
    return register(*funcs, override=override)(rule)


def def_linear(*funcs: Any, override: bool = False, promote_constants: bool = True) -> Callable:
    """Register an op that is linear jointly in its floating tensor operands (cat, stack, fft,
    index_add...): every stored coefficient goes through the op once, batched with ``torch.vmap``;
    a floating operand that is not a jet is a constant (coefficient 0 only). With
    ``promote_constants=False`` the op is linear in its jet operands only, and constant floating
    operands are passed to every coefficient unchanged (a matrix in ``A @ x``)."""
    from ..rules._common import per_coefficient

    def make(f):
        def rule(*args, **kwargs):
            return per_coefficient(f, args, kwargs, promote_constants=promote_constants)
        rule.__doc__ = f"{getattr(f, '__name__', f)}: linear, applied to every coefficient."
        return rule
    for f in funcs:
        register(f, override=override)(make(f))
    return make(funcs[0]) if funcs else None


def def_constant(*funcs: Any, override: bool = False) -> Callable:
    """Register an op whose result does not depend differentiably on its inputs (an integer or
    piecewise-constant result): it runs on the primal values once."""
    def make(f):
        def rule(*args, **kwargs):
            record("constants", f)
            return f(*primals(args), **primals(kwargs))
        rule.__doc__ = f"{getattr(f, '__name__', f)}: a constant along the path."
        return rule
    for f in funcs:
        register(f, override=override)(make(f))
    return make(funcs[0]) if funcs else None
