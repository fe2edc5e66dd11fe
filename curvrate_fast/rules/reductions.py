"""Taylor rules for reductions: sum, mean (linear), var/std (centring, square, mean), logsumexp
(shift by the constant primal max, exp jet, sum, log jet), max/min (coefficients at the primal's
argmax), vector norms (docs/math.md §2)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import series as S
from ..activation_jet import toeplitz_backward
from ..first_order import first_order_backward
from ..jets.registry import register, tracing
from ._common import JetError, aliases, is_jet, make_jet, primal, require


def _dims(input, dim):
    nd = input.dim()
    if dim is None:
        return tuple(range(1, nd + 1))
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        return tuple(range(1, nd + 1))
    return tuple((d % nd if nd else 0) + 1 for d in dims)


def _linear_reduce(fn):
    def rule(input, dim=None, keepdim=False, *, dtype=None, out=None):
        if isinstance(dim, torch.dtype):  # torch.sum(x, torch.float64)
            dim, dtype = None, dim
        c = input._coeffs if dtype is None else input._coeffs.to(dtype)
        if input.dim() == 0:
            return make_jet(c, input._order)
        return make_jet(fn(c, dim=_dims(input, dim), keepdim=keepdim), input._order)
    return rule


register(*aliases("sum"))(_linear_reduce(torch.sum))
register(*aliases("mean"))(_linear_reduce(torch.mean))


@register(*aliases("nansum"))
def nansum(input, dim=None, keepdim=False, *, dtype=None, out=None):
    """Σ over the entries whose primal is not NaN: which entries are NaN is decided by the primal
    (constant along the path), so the sum of the others' coefficients is exact."""
    x = torch.where(torch.isnan(input._coeffs[0]), 0.0, input)
    return torch.sum(x, dim=dim, keepdim=keepdim, dtype=dtype)


@register(*aliases("nanmean"))
def nanmean(input, dim=None, keepdim=False, *, dtype=None, out=None):
    """nansum / (number of non-NaN primal entries): the count is a constant."""
    dims = [d - 1 for d in _dims(input, dim)] if input.dim() else []
    count = (~torch.isnan(input._coeffs[0])).sum(dim=dims, keepdim=keepdim)
    total = nansum(input, dim, keepdim, dtype=dtype)
    return total / count.to(total.dtype)


def _count(input, dim) -> int:
    dims = _dims(input, dim)
    return math.prod(input.shape[d - 1] for d in dims) if input.dim() else 1


@register(*aliases("var"))
def var(input, dim=None, unbiased=None, keepdim=False, *, correction=None, out=None):
    """var = Σ (x − mean)² / (N − correction), through the rules for mean, sub and square."""
    if isinstance(dim, bool):  # var(x, unbiased)
        unbiased, dim = dim, None
    if correction is None:
        correction = 1 if unbiased is None or unbiased else 0
    N = _count(input, dim)
    dims = [d - 1 for d in _dims(input, dim)] if input.dim() else None
    mu = input.mean(dim=dims, keepdim=True) if dims is not None else input
    sq = _abs2(input - mu)
    total = sq.sum(dim=dims, keepdim=keepdim) if dims is not None else sq
    return total / max(N - correction, 0)


@register(*aliases("std"))
def std(input, dim=None, unbiased=None, keepdim=False, *, correction=None, out=None):
    return torch.sqrt(var(input, dim, unbiased, keepdim, correction=correction))


def _lse_and_softmax(c: Tensor, dims, K: int):
    """The logsumexp jet over ``dims`` (keepdim) and the softmax jet p = e / Σe, both to order K.
    m = max of the primal is a constant shift, so exact (docs/math.md §2, cross-entropy)."""
    m = c[0].detach().amax(dim=dims, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = S.exp([c[0] - m] + list(c[1:].unbind(0)), K)
    s = [x.sum(dim=dims, keepdim=True) for x in e]
    y = S.log(s, K)
    y[0] = y[0] + m
    return y, S.div(e, s, K)


#: elements (all stored coefficients together) of one row block of a large logsumexp jet on the CPU:
#: 1 MiB of float32, so that the ~40 passes of its exp/sum/log/div recurrences run on data in L2
#: instead of streaming the whole tensor from memory ~40 times. Measured on one core, a language
#: model's vocabulary (K = 4, 2048 rows × 8192 classes): forward 1158 → 122 ms, bitwise equal;
#: backward (recomputing the softmax jet block by block instead of keeping it) 400 → 278 ms.
LSE_BLOCK_ELEMENTS = 1 << 18


def _row_blocks(c: Tensor, dims) -> Optional[Tuple[Tensor, int]]:
    """``c`` viewed as (n, rows, classes) and the rows of one block, when the logsumexp jet is
    run block by block: on the CPU, outside a trace (a captured graph is fused by its compiler
    instead), over the trailing axes of a contiguous tensor of more than one block."""
    if c.device.type != "cpu" or not c.is_contiguous() or tracing():
        return None
    nd = c.dim() - 1
    ds = sorted(set(dims))
    if nd < 2 or ds != list(range(nd - len(ds), nd)) or len(ds) == nd:
        return None
    n = c.shape[0]
    C = math.prod(c.shape[1 + nd - len(ds):])
    R = c.numel() // max(n * C, 1)
    rows = max(1, LSE_BLOCK_ELEMENTS // max(n * C, 1))
    if rows >= R:
        return None
    return c.view(n, R, C), rows


def _lse_blocks(c: Tensor, dims, view: Tensor, rows: int, K: int) -> Tensor:
    """The logsumexp jet of ``c`` over ``dims`` (keepdim, stacked: (K + 1, ...)) from its
    (n, R, C) ``view``, block by block (each row's arithmetic is the one-block arithmetic: the
    same numbers)."""
    R = view.shape[1]
    out = view.new_empty((K + 1, R, 1))
    for s in range(0, R, rows):
        y, _ = _lse_and_softmax(view[:, s:s + rows], (1,), K)
        torch.stack(y, out=out[:, s:s + rows])
    return out.view((K + 1,) + tuple(1 if i in dims else d for i, d in enumerate(c.shape[1:])))


class _LogSumExpJet(torch.autograd.Function):
    """logsumexp jet with the Toeplitz backward: since ∂lse/∂z_c = softmax_c(z), along the path
    ∂lse_k/∂z_{c,j} = p_{c,k−j} with p the softmax jet, so ḡz_{c,j} = Σ_{k≥j} ḡlse_k · p_{c,k−j}
    (the same structure as ``curvrate_fast.activation_jet``); only p is kept for the backward.
    A large jet on the CPU (``_row_blocks``) runs block by block and keeps its input instead of p
    (the same memory), recomputing p block by block in the backward."""

    @staticmethod
    def forward(ctx, c: Tensor, dims: tuple, K: int) -> Tensor:
        ctx.n_in = c.shape[0]
        blocks = _row_blocks(c, dims)
        with torch.no_grad():
            if blocks is not None:
                view, rows = blocks
                ctx.rows = rows
                ctx.save_for_backward(c)
                return _lse_blocks(c, dims, view, rows, K)
            y, p = _lse_and_softmax(c, dims, K)
        ctx.rows = None
        ctx.save_for_backward(*p)
        return torch.stack(y)

    @staticmethod
    @first_order_backward("logsumexp jet (cross-entropy, logsumexp, log_softmax)")
    def backward(ctx, gy: Tensor):
        K = gy.shape[0] - 1
        if ctx.rows is None:
            return torch.stack(toeplitz_backward(gy, ctx.saved_tensors, ctx.n_in)), None, None
        (c,) = ctx.saved_tensors
        n = ctx.n_in
        R = gy[0].numel()                      # the rows: gy has 1 on the reduced axes
        view = c.view(n, R, c.numel() // (n * R))
        g = gy.reshape(K + 1, R, 1)
        rows = ctx.rows
        out = torch.empty_like(view)
        for s in range(0, view.shape[1], rows):
            _, p = _lse_and_softmax(view[:, s:s + rows], (1,), K)
            torch.stack(toeplitz_backward(g[:, s:s + rows], p, n), out=out[:, s:s + rows])
        return out.view(c.shape), None, None


def logsumexp_coeffs(input, dim, keepdim: bool = False):
    """logsumexp jet along ``dim`` as a list of coefficients (see _lse_and_softmax)."""
    K = input._order
    c = input._coeffs
    dims = tuple(x - 1 for x in _dims(input, dim))
    if c.requires_grad and torch.is_grad_enabled():
        y = list(_LogSumExpJet.apply(c, dims, K).unbind(0))
    else:
        blocks = _row_blocks(c, dims)
        if blocks is None:
            y = _lse_and_softmax(c, dims, K)[0]
        else:
            y = list(_lse_blocks(c, dims, *blocks, K).unbind(0))
    if not keepdim:
        y = [x.squeeze(dims) for x in y]
    return y


@register(*aliases("logsumexp"), torch.special.logsumexp)
def logsumexp(input, dim, keepdim=False, *, out=None):
    return make_jet(logsumexp_coeffs(input, dim, keepdim), input._order)


def _gather_at(input, idx: Tensor, dim: int, keepdim: bool):
    """The coefficients at integer positions ``idx`` (keepdim layout) along ``dim``."""
    c = input._coeffs
    if c.dim() == 1:  # a 0-dim input: its only element, whatever dim (0 or -1) was asked
        return make_jet(c, input._order)
    index = idx.unsqueeze(0).expand((c.shape[0],) + tuple(idx.shape))
    out = torch.gather(c, dim + 1, index)
    return make_jet(out if keepdim else out.squeeze(dim + 1), input._order)


def _extreme(kind):
    arg = torch.argmax if kind == "max" else torch.argmin

    def rule(input, dim=None, keepdim=False, *, other=None, out=None):
        if other is None and dim is not None and (is_jet(dim) or isinstance(dim, Tensor)):
            other, dim = dim, None                                  # torch.max(a, b)
        if other is not None:                                       # torch.max(a, other=b) too
            return (torch.maximum if kind == "max" else torch.minimum)(input, other)
        x0 = input._coeffs[0]
        if dim is None:
            flat = input.reshape(-1)
            i = arg(x0.reshape(-1))
            return flat[i]
        d = dim % max(input.dim(), 1)
        idx = arg(x0, dim=d, keepdim=True)
        vals = _gather_at(input, idx, d, keepdim)
        indices = idx if keepdim else idx.squeeze(d)
        return torch.return_types.max((vals, indices)) if kind == "max" else \
            torch.return_types.min((vals, indices))
    return rule


register(*aliases("max"))(_extreme("max"))
register(*aliases("min"))(_extreme("min"))


def _aextreme(kind):
    arg = torch.argmax if kind == "max" else torch.argmin

    def rule(input, dim=(), keepdim=False, *, out=None):
        dims = [dim] if isinstance(dim, int) else list(dim)
        if len(dims) == 0 or input.dim() == 0:
            flat = input.reshape(-1)
            return flat[arg(input._coeffs[0].reshape(-1))].reshape([1] * input.dim() if keepdim else [])
        if len(dims) > 1:
            # reduce one dim at a time (keepdim), then squeeze
            y = input
            for d in sorted(x % input.dim() for x in dims):
                y = rule(y, d, True)
            return y if keepdim else y.squeeze(tuple(x % input.dim() for x in dims))
        d = dims[0] % input.dim()
        idx = arg(input._coeffs[0], dim=d, keepdim=True)
        return _gather_at(input, idx, d, keepdim)
    return rule


register(*aliases("amax"))(_aextreme("max"))
register(*aliases("amin"))(_aextreme("min"))


def _abs2(x):
    """|x|²: x² for real x, Re(x)² + Im(x)² for complex x (z² is not |z|²)."""
    if x.is_complex():
        return torch.square(torch.real(x)) + torch.square(torch.imag(x))
    return torch.square(x)


@register(torch.linalg.vector_norm)
def vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None, out=None):
    """‖x‖_p: p = 2 as sqrt(Σ x²) (not differentiable at 0, like autograd), p = 1 as Σ|x|,
    p = ±∞ as max/min |x| (the coefficients at the primal's extreme entry), p = 0 the number of
    non-zero entries (integer-valued: a constant), other p as (Σ|x|^p)^(1/p)."""
    if ord == 0:
        return torch.linalg.vector_norm(x._coeffs[0], 0, dim, keepdim, dtype=dtype)
    if dtype is not None:
        x = x.to(dtype)
    dims = dim
    if ord == float("-inf"):
        return torch.abs(x).amin(dim=() if dims is None else dims, keepdim=keepdim)
    if ord == 2:
        ss = _abs2(x).sum(dim=dims, keepdim=keepdim)
        require(primal(ss) != 0, JetError, "linalg.vector_norm (ord=2) of a zero vector: ‖t·u‖ = |t|·‖u‖ has "
                "no Taylor expansion at t = 0 (autograd gives NaN derivatives there)")
        return torch.sqrt(ss)
    if ord == 1:
        return torch.abs(x).sum(dim=dims, keepdim=keepdim)
    if ord == float("inf"):
        return torch.abs(x).amax(dim=() if dims is None else dims, keepdim=keepdim)
    return torch.pow(torch.pow(torch.abs(x), ord).sum(dim=dims, keepdim=keepdim), 1.0 / ord)


@register(*aliases("cumsum"))
def cumsum(input, dim, *, dtype=None, out=None):
    c = input._coeffs if dtype is None else input._coeffs.to(dtype)
    if input.dim() == 0:  # a 0-dim tensor: cumsum is the identity (dim 0 or -1)
        torch.cumsum(primal(input), dim)  # torch's own check of dim
        return make_jet(c, input._order)
    return make_jet(torch.cumsum(c, dim=(dim % input.dim()) + 1), input._order)


@register(*aliases("dot"))
def dot(input, tensor, *, out=None):
    """Σ a_i b_i of two 1-D tensors: bilinear, through the product and sum rules."""
    return (input * tensor).sum()


@register(*aliases("vdot"))
def vdot(input, other, *, out=None):
    """Σ conj(a_i) b_i (the first argument is conjugated for complex input)."""
    return (torch.conj(input) * other).sum()
