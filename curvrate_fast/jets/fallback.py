"""The exact generic fallback for ops without a Taylor rule (SPEC.md §2, last paragraph).

For an op ``y = op(a, b, ...)`` whose jet arguments are series a(t) = Σ_k a_k t^k, the output jet is
the Taylor expansion of t ↦ op(a(t), b(t), ...) at t = 0: y_k = (1/k!) dᵏ/dtᵏ op(...)|_{t=0}. It is
computed by nesting forward-mode differentiation along the scalar t (``torch.func.jvp``) K times:
exact to rounding, differentiable with respect to the model's parameters (the coefficients a_k
carry their autograd history), and about 2^K times the cost of the op, so a rule is always better.
Only builtin ops reach it: ops with rules never do, so it never differentiates through LayerNorm or
attention, whose higher derivatives PyTorch gets wrong (SPEC.md §2).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .tensor import JetError, JetTensor, make_jet, order_of

__all__ = ["generic_jet", "taylor_coefficients"]


def taylor_coefficients(fn: Callable[[Tensor], List[Tensor]], t0: Tensor, K: int) -> List[List[Tensor]]:
    """[[out_i^(k)(t0)/k! for each output i] for k = 0..K] for ``fn: t ↦ list of tensors``."""
    def derivatives(f: Callable, m: int) -> Callable:
        if m == 0:
            return lambda t: [f(t)]
        inner = derivatives(f, m - 1)

        def g(t):
            prim, tang = torch.func.jvp(inner, (t,), (torch.ones_like(t),))
            return [prim[0]] + list(tang)
        return g

    ders = derivatives(fn, K)(t0)
    return [[d / math.factorial(k) for d in level] for k, level in enumerate(ders)]


def generic_jet(func: Any, args: Tuple, kwargs: Dict) -> Any:
    K = order_of(args, kwargs)
    flat, spec = tree_flatten((args, kwargs))
    jet_pos = [i for i, a in enumerate(flat) if isinstance(a, JetTensor)]
    jets = [flat[i] for i in jet_pos]
    dtype = jets[0].dtype
    device = jets[0].device

    def evaluate(vals: List[Any]) -> Any:
        full = list(flat)
        for i, v in zip(jet_pos, vals):
            full[i] = v
        a, kw = tree_unflatten(full, spec)
        return func(*a, **kw)

    primal_out = evaluate([j._coeffs[0] for j in jets])
    out_flat, out_spec = tree_flatten(primal_out)
    float_pos = [i for i, o in enumerate(out_flat) if isinstance(o, Tensor) and o.is_floating_point()]
    if not float_pos:
        return primal_out

    def along_path(t: Tensor) -> List[Tensor]:
        vals = []
        for j in jets:
            c = j._coeffs
            powers = t ** torch.arange(c.shape[0], device=c.device, dtype=c.dtype)
            vals.append(torch.tensordot(powers, c, dims=1))
        out = tree_flatten(evaluate(vals))[0]
        return [out[i] for i in float_pos]

    t0 = torch.zeros((), dtype=dtype, device=device)
    try:
        levels = taylor_coefficients(along_path, t0, K)
    except Exception as e:  # noqa: BLE001 - name the op in the error
        raise JetError(
            f"the generic Taylor fallback failed for {getattr(func, '__name__', func)}: {e}. "
            "This op needs a Taylor rule (curvrate_fast.jets.register).") from e
    result = list(out_flat)
    for n, i in enumerate(float_pos):
        result[i] = make_jet([levels[k][n] for k in range(K + 1)], K)
    return tree_unflatten(result, out_spec)
