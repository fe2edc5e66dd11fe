"""Helpers shared by the Taylor rules."""
from __future__ import annotations

import warnings
from typing import Any, Callable, List, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..jets.registry import tracing
from ..jets.tensor import JetError, JetTensor, is_jet, lift, make_jet, order_of, pad_coeffs, primal, series_of, stored

__all__ = ["JetError", "JetTensor", "is_jet", "lift", "make_jet", "order_of", "pad_coeffs", "primal",
           "series_of", "stored", "aliases", "per_coefficient", "cauchy_op"]


def aliases(name: str, *, torch_fn: bool = True, method: bool = True, functional: bool = False,
            special: Sequence[Any] = ()) -> List[Any]:
    """All the callables under which an op reaches ``__torch_function__``."""
    out: List[Any] = []
    if torch_fn and hasattr(torch, name):
        out.append(getattr(torch, name))
    if method and hasattr(torch.Tensor, name):
        out.append(getattr(torch.Tensor, name))
    if functional and hasattr(torch.nn.functional, name):
        out.append(getattr(torch.nn.functional, name))
    out.extend(special)
    return out


def _wrap(out: Any, K: int, is_view: bool) -> Any:
    if isinstance(out, Tensor):
        if out.is_floating_point() or out.is_complex():
            return JetTensor(out, K, is_view)
        return out[0]  # integer results (indices) are the same for every coefficient
    if isinstance(out, (tuple, list)):
        items = [_wrap(o, K, is_view) for o in out]
        return type(out)(items) if not hasattr(out, "_fields") else type(out)(*items)
    return out


def per_coefficient(func: Callable, args: tuple, kwargs: dict, *, is_view: bool = False,
                    promote_constants: bool = True) -> Any:
    """Apply an op that is linear jointly in all its floating tensor arguments to every coefficient,
    batched over the coefficient axis with ``torch.vmap`` (one call for all coefficients).

    A floating or complex tensor that is not a jet is a constant: coefficient 0 is itself, the
    others zero.
    """
    K = order_of(args, kwargs)
    flat, spec = tree_flatten((args, kwargs))
    # complex constants too: a complex tensor is as much a value on the path as a real one
    pos = [i for i, a in enumerate(flat)
           if is_jet(a) or (promote_constants and isinstance(a, Tensor)
                            and (a.is_floating_point() or a.is_complex()))]
    n = max(stored(flat[i]) for i in pos)
    stacks = [pad_coeffs(flat[i]._coeffs if is_jet(flat[i]) else flat[i].unsqueeze(0), n)
              for i in pos]

    def apply(*cs):
        vals = list(flat)
        for i, c in zip(pos, cs):
            vals[i] = c
        a, kw = tree_unflatten(vals, spec)
        return func(*a, **kw)

    with warnings.catch_warnings():
        # vmap's note that an op has no batching rule and runs in a loop: a speed remark about
        # rare ops (the *_copy variants), not something a user of the engine can act on
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        out = torch.vmap(apply)(*stacks)
    return _wrap(out, K, is_view)


#: above this many elements of all products together, cauchy_op sums order by order (memory-bound
#: sizes: fewer, larger tensors cost more traffic than they save dispatch)
CAUCHY_BATCH_ELEMENTS = 1 << 21


def sizes_arg(args: tuple, keyword: Any = None) -> tuple:
    """A size or dims argument in any of torch's spellings: varargs (``x.permute(1, 0)``), one
    sequence (``x.permute((1, 0))``) or by keyword (``torch.permute(x, dims=(1, 0))``)."""
    if keyword is not None:
        if args:
            raise TypeError("the sizes were given both positionally and by keyword")
        args = (keyword,)
    if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size)):
        return tuple(args[0])
    return tuple(args)


def require(ok: Tensor, error: type, message: str) -> None:
    """Raise ``error(message)`` unless the boolean tensor ``ok`` holds everywhere (a rule's check
    of the values it is given: a domain, a tie, a zero). Inside a capture the values cannot be
    read while the graph is recorded, so the check becomes an op of the graph
    (``torch._assert_async``), which raises at every replay where it fails (a RuntimeError with
    the message) instead of being skipped."""
    if tracing():
        torch._assert_async(ok.all(), f"{error.__name__}: {message}")
    elif not bool(ok.all()):
        raise error(message)


def beta_input_plus_alpha_prod(input, prod, beta, alpha):
    """β·input + α·prod for the add-a-product ops (addmm, baddbmm, addbmm, addmv, addr): input is
    ignored when β = 0 (as torch: its NaN or Inf do not propagate), broadcast to input's shape either
    way."""
    prod = prod if alpha == 1 else alpha * prod
    if beta == 0:
        return prod + torch.zeros_like(primal(input))
    return (input if beta == 1 else beta * input) + prod


def cauchy_op(op: Callable[[Tensor, Tensor], Tensor], a: Any, b: Any, K: int) -> Tensor:
    """(a ⋆ b)_k = Σ_j op(a_j, b_{k−j}) for an op bilinear in (a, b) (docs/math.md §2, bilinear),
    stacked: shape (n, ...), n ≤ K + 1 the stored coefficients.

    Small products (the dispatch-bound case, e.g. attention's q kᵀ and weights·v on short
    sequences) run as ONE batched call over all the pairs (j, k − j), at most (K+1)(K+2)/2 of
    them, summed into their orders by one ``index_add``: three ops per rule whatever K. Large
    ones (more than ``CAUCHY_BATCH_ELEMENTS`` elements of products in all) run one batched call
    per order, whose sum reads each product once while it is hot.
    """
    A, B = series_of(a), series_of(b)
    na, nb = len(A), len(B)
    n = min(K + 1, na + nb - 1)
    pairs = [(j, k - j, k) for k in range(n) for j in range(max(0, k - nb + 1), min(k, na - 1) + 1)]
    first = op(A[0], B[0])                       # order 0 is the one pair (0, 0)
    if len(pairs) == n:  # one product per order (a constant on one side): no sum needed
        return torch.stack([first] + [op(A[j], B[i]) for j, i, _ in pairs[1:]])
    Ac = torch.stack(A) if na > 1 else A[0].unsqueeze(0)
    Bc = torch.stack(B) if nb > 1 else B[0].unsqueeze(0)
    dev = Ac.device
    bop = torch.vmap(op)
    rest = pairs[1:]
    if first.numel() * len(pairs) <= CAUCHY_BATCH_ELEMENTS:
        ia = torch.tensor([p[0] for p in rest], device=dev)
        ib = torch.tensor([p[1] for p in rest], device=dev)
        ko = torch.tensor([p[2] - 1 for p in rest], device=dev)
        prods = bop(Ac.index_select(0, ia), Bc.index_select(0, ib))
        higher = prods.new_zeros((n - 1,) + tuple(prods.shape[1:])).index_add_(0, ko, prods)
        return torch.cat([first.unsqueeze(0), higher])
    out = [first]
    for k in range(1, n):
        js = [p[0] for p in rest if p[2] == k]
        if len(js) == 1:
            out.append(op(A[js[0]], B[k - js[0]]))
            continue
        ia = torch.tensor(js, device=dev)
        ib = torch.tensor([k - j for j in js], device=dev)
        out.append(bop(Ac.index_select(0, ia), Bc.index_select(0, ib)).sum(0))
    return torch.stack(out)
