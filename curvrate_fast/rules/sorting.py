"""Taylor rules for sorting and selection (sort, msort, topk, kthvalue, median, nanmedian, mode,
quantile, nanquantile, unique, unique_consecutive, cummax, cummin, aminmax) and for the reductions
that multiply or scan (prod, cumprod, logcumsumexp) or return two results (var_mean, std_mean).

Selection. Along the path x(t) = Σ_k x_k t^k these ops return input elements at positions that
the primal x_0 chooses (a permutation, a gather). Where the primal has no ties the choice is the
same for all small t, so the output's coefficients are the input's coefficients gathered at the
primal's positions, exactly. At a tie (two equal primal values competing for a place) the value is
continuous but not differentiable; the rule then gathers at the position torch returns, which is
where autograd routes the gradient too (one of the one-sided derivatives). Two ops are worse than
non-differentiable at ties: ``unique`` (and ``unique_consecutive``) changes its output *size* when
equal values separate along the path, and ``mode`` jumps to another value; both raise a JetError
then, unless the tied elements carry identical coefficients (they stay equal along the path).

Products. prod is a pairwise tree of Cauchy products (depth log n, exact with zeros: no log
trick); cumprod and logcumsumexp are inclusive scans (Hillis–Steele, log n steps of one batched
Cauchy product / log-add-exp of series each).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .. import series as S
from ..jets.registry import register
from ..jets.tensor import pad_coeffs
from ._common import JetError, aliases, is_jet, make_jet, order_of, primal, require

Series = List[Tensor]


# -- helpers shared with scatter.py ----------------------------------------------------------

def stack_of(x, n: Optional[int] = None, like: Optional[Tensor] = None) -> Tensor:
    """Stacked coefficients (n+1, *shape) of a jet, or of a constant (coefficient 0 only), padded
    with zeros to ``n`` coefficients when given."""
    if is_jet(x):
        c = x._coeffs
    else:
        if like is not None and not isinstance(x, Tensor):  # a number: the jet's dtype, no float32 detour
            t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
        else:
            t = torch.as_tensor(x, device=None if like is None else like.device)
        c = t.unsqueeze(0)
    return c if n is None else pad_coeffs(c, n)


def series_list(c: Tensor) -> Series:
    return list(c.unbind(0))


def stack_series(s: Sequence[Tensor]) -> Tensor:
    shape = torch.broadcast_shapes(*[t.shape for t in s])
    return torch.stack([t.expand(shape) for t in s])


def out_shape(fn: Callable, *args, **kwargs) -> torch.Size:
    """The shape of ``fn``'s (first) result, from meta tensors (no computation)."""
    from torch.utils._pytree import tree_map
    meta = tree_map(lambda a: torch.empty(a.shape, dtype=a.dtype, device="meta")
                    if isinstance(a, Tensor) else a, (args, kwargs))
    out = fn(*meta[0], **meta[1])
    return (out[0] if isinstance(out, (tuple, list)) else out).shape


def take_along(x, idx: Tensor, dim: int):
    """The jet of ``x`` at integer positions ``idx`` along ``dim``: ``idx`` has x's rank (keepdim
    layout) or one less (the reduced dim squeezed). Every coefficient is gathered at the same
    positions (chosen by the primal: constant along the path)."""
    c = x._coeffs
    if x.dim() == 0:
        return make_jet(c, x._order)
    d = dim % x.dim()
    squeeze = idx.dim() < x.dim()
    if squeeze:
        idx = idx.unsqueeze(d)
    out = torch.gather(c, d + 1, idx.unsqueeze(0).expand((c.shape[0],) + tuple(idx.shape)))
    return make_jet(out.squeeze(d + 1) if squeeze else out, x._order)


def _cat_last(a: Series, b: Series) -> Series:
    """Concatenate two series along the last axis (the shorter one padded with zeros)."""
    n = max(len(a), len(b))
    za, zb = torch.zeros_like(a[0]), torch.zeros_like(b[0])
    return [torch.cat([a[k] if k < len(a) else za, b[k] if k < len(b) else zb], -1)
            for k in range(n)]


def tree_prod(s: Series, K: int) -> Series:
    """Π over the last axis of a series of tensors (..., N), by a pairwise tree of Cauchy products:
    depth ⌈log₂ N⌉, exact with zero factors. An empty product is 1."""
    N = s[0].shape[-1]
    if N == 0:
        return [torch.ones(s[0].shape[:-1], dtype=s[0].dtype, device=s[0].device)]
    while N > 1:
        h = N // 2
        p = S.mul([t[..., :h] for t in s], [t[..., h:2 * h] for t in s], K)
        if N % 2:
            p = _cat_last(p, [t[..., 2 * h:] for t in s])
        s, N = p, h + N % 2
    return [t[..., 0] for t in s]


def scan(s: Series, combine: Callable[[Series, Series], Series],
         same: Optional[Tensor] = None) -> Series:
    """Inclusive scan y_i = x_0 ∘ x_1 ∘ … ∘ x_i along the last axis for an associative ``combine``
    of series (Hillis–Steele: ⌈log₂ N⌉ steps, each one batched ``combine``). With ``same`` (a
    segment id per position along the last axis, sorted), the scan restarts at every segment."""
    N = s[0].shape[-1]
    step = 1
    while step < N:
        left = [t[..., :-step] for t in s]
        right = [t[..., step:] for t in s]
        comb = combine(left, right)
        if same is not None:
            keep = same[step:] == same[:-step]
            n = max(len(comb), len(right))
            zc, zr = torch.zeros_like(comb[0]), torch.zeros_like(right[0])
            comb = [torch.where(keep, comb[k] if k < len(comb) else zc, right[k] if k < len(right) else zr)
                    for k in range(n)]
        s = _cat_last([t[..., :step] for t in s], comb)
        step *= 2
    return s


def segment_prod(v: Tensor, seg: Tensor, num: int, K: int) -> Tensor:
    """Π of the series v (n+1, M) over segments ``seg`` (M,) with ids in [0, num): stacked
    (n'+1, num), an empty segment's product is 1. Sorts by segment, scans with Cauchy products
    (restarting at segment starts) and reads each segment's last element: ⌈log₂ M⌉ steps."""
    dev = v.device
    if v.shape[-1] == 0:
        one = torch.ones((1, num), dtype=v.dtype, device=dev)
        return one
    order = torch.argsort(seg, stable=True)
    sseg = seg[order]
    s = scan(series_list(v[:, order]), lambda a, b: S.mul(a, b, K), same=sseg)
    counts = torch.bincount(sseg, minlength=num)
    ends = (torch.cumsum(counts, 0) - 1).clamp(min=0)
    has = counts > 0
    out = []
    for k, t in enumerate(s):
        fill = torch.ones((), dtype=t.dtype, device=dev) if k == 0 else torch.zeros((), dtype=t.dtype, device=dev)
        out.append(torch.where(has, t[ends], fill))
    return torch.stack(out)


def _no_jet_params(name: str, args, kwargs) -> None:
    if any(is_jet(a) for a in args) or any(is_jet(v) for v in kwargs.values()):
        raise JetError(f"{name}: only the input may be a jet (the other arguments choose positions "
                       "or sizes; they are not values on the path)")


# -- sort and friends: gather at the primal's indices -----------------------------------------

def _selection(op: Callable, name: str, dim_pos: int, default_dim: Optional[int] = -1):
    def rule(input, *args, **kwargs):
        _no_jet_params(name, args, kwargs)
        kwargs.pop("out", None)
        res = op(input._coeffs[0], *args, **kwargs)
        dim = kwargs["dim"] if "dim" in kwargs else (args[dim_pos] if len(args) > dim_pos else default_dim)
        return type(res)((take_along(input, res.indices, dim), res.indices))
    rule.__doc__ = (f"{name}: the values are the input's coefficients gathered at the primal's "
                    "indices (constant along the path away from ties).")
    return rule


register(*aliases("sort"))(_selection(torch.sort, "sort", 0))
register(*aliases("topk"))(_selection(torch.topk, "topk", 1))
register(*aliases("kthvalue"))(_selection(torch.kthvalue, "kthvalue", 1))
register(*aliases("cummax"))(_selection(torch.cummax, "cummax", 0, None))
register(*aliases("cummin"))(_selection(torch.cummin, "cummin", 0, None))


@register(*aliases("msort"))
def msort(input, *, out=None):
    """sort along dim 0 (values only): coefficients gathered at the primal's sort indices."""
    return take_along(input, torch.sort(input._coeffs[0], dim=0).indices, 0)


def _median(op: Callable, name: str):
    with_dim = _selection(op, name, 0)

    def rule(input, *args, **kwargs):
        if args or "dim" in kwargs:
            return with_dim(input, *args, **kwargs)
        x0 = input._coeffs[0]
        if x0.numel() == 0:
            return op(x0)  # NaN: no element to follow
        # the element torch's full reduction returns (the lower median; NaN first if any) is the
        # one its dim=0 reduction of the flattened tensor indexes
        idx = op(x0.reshape(-1), 0).indices
        return take_along(input.reshape(-1), idx, 0)
    rule.__doc__ = (f"{name}: the coefficients of the median element (the lower of the two middle "
                    "ones), chosen by the primal.")
    return rule


register(*aliases("median"))(_median(torch.median, "median"))
register(*aliases("nanmedian"))(_median(torch.nanmedian, "nanmedian"))


@register(*aliases("mode"))
def mode(input, dim=-1, keepdim=False, *, out=None):
    """mode: the most frequent value (the smallest of those), at the index torch returns. When it
    is unique in its row it is the row's minimum, a selection. When it occurs k ≥ 2 times, the
    copies must carry the same coefficients: otherwise they separate at t ≠ 0, the count drops
    and the mode jumps to another value (no Taylor expansion: JetError)."""
    _no_jet_params("mode", (dim, keepdim), {})
    c = input._coeffs
    x0 = c[0]
    res = torch.mode(x0, dim, keepdim)
    if x0.dim() == 0:
        return type(res)((make_jet(c, input._order), res.indices))
    d = dim % x0.dim()
    idx = res.indices if keepdim else res.indices.unsqueeze(d)
    chosen = torch.gather(c, d + 1, idx.unsqueeze(0).expand((c.shape[0],) + tuple(idx.shape)))
    if c.shape[0] > 1:
        tied = x0 == chosen[0]
        require(~((c[1:] != chosen[1:]) & tied), JetError,
                "torch.mode: the mode occurs more than once in the primal and its copies move differently "
                "along the path, so they separate at t ≠ 0 and the mode jumps: the result has no Taylor "
                "expansion at this point")
    vals = make_jet(chosen if keepdim else chosen.squeeze(d + 1), input._order)
    return type(res)((vals, res.indices))


# -- quantile ----------------------------------------------------------------------------------

def _quantile(ignore_nan: bool, name: str):
    ref_op = torch.nanquantile if ignore_nan else torch.quantile

    def rule(input, q, dim=None, keepdim=False, *, interpolation="linear", out=None):
        """Exactly ATen's algorithm on the coefficients: sort along ``dim`` by the primal (NaN last),
        ranks r = q·(N−1) (nanquantile: q·(count of non-NaN − 1)), then the sorted coefficients at
        ⌊r⌋ and ⌈r⌉ and, for 'linear', lerp with weight w = r − ⌊r⌋, a jet when q is one
        (w_k = q_k·(N−1)): y = a + w·(b − a) by a Cauchy product; 'midpoint' w = ½; 'lower',
        'higher', 'nearest' take one element. Sort positions and ⌊r⌋ come from the primal."""
        x0, q0 = primal(input), primal(q)
        ref_shape = ref_op(x0.detach(), q0.detach() if isinstance(q0, Tensor) else q0, dim, keepdim,
                           interpolation=interpolation).shape  # also validates the arguments
        K = order_of(input, q)
        qs = stack_of(q, like=x0)          # (m+1, *qshape)
        n = max(stack_of(input).shape[0], qs.shape[0])
        X = stack_of(input, n)
        if dim is None:
            Xs = X.reshape(n, -1)
        elif x0.dim() == 0:
            Xs = X.reshape(n, 1)
        else:
            Xs = X.movedim(dim % x0.dim() + 1, -1)
        order = torch.argsort(Xs[0].detach(), dim=-1, stable=True)  # NaN sorts last, as torch.sort
        Srt = torch.gather(Xs, -1, order.unsqueeze(0).expand_as(Xs))
        N = Srt.shape[-1]
        qv = qs.reshape(qs.shape[0], -1)     # (m+1, Q)
        nan = torch.isnan(Srt[0])
        if ignore_nan:
            scale = ((~nan).sum(-1, keepdim=True) - 1).to(Srt.dtype)       # (*other, 1)
            rank0 = qv[0] * scale
            fixed = rank0 < 0                                             # an all-NaN row
            rank0 = rank0.masked_fill(fixed, 0)
        else:
            scale = torch.full(nan.shape[:-1] + (1,), N - 1, dtype=Srt.dtype, device=Srt.device)
            rank0 = qv[0] * scale
            fixed = nan.any(-1, keepdim=True).expand_as(rank0)            # a NaN: result NaN
            rank0 = rank0.masked_fill(fixed, N - 1)
        r = rank0.detach()
        if interpolation == "lower":
            r = r.floor()
        elif interpolation == "higher":
            r = r.ceil()
        elif interpolation == "nearest":
            r = r.round()
        below = r.long()
        lo = torch.gather(Srt, -1, below.unsqueeze(0).expand((n,) + tuple(below.shape)))
        if interpolation in ("linear", "midpoint"):
            above = r.ceil().long()
            hi = torch.gather(Srt, -1, above.unsqueeze(0).expand((n,) + tuple(above.shape)))
            span = series_list(hi - lo)
            if interpolation == "midpoint":
                w = [torch.full_like(rank0, 0.5)]
            else:
                w = [rank0 - below.to(rank0.dtype)]
                w += [torch.where(fixed, torch.zeros_like(rank0), qk * scale) for qk in qv[1:]]
            y = S.add(series_list(lo), S.mul(w, span, K), K)
        else:
            y = series_list(lo)
        Y = stack_series(y)                  # (n'+1, *other, Q)
        Y = Y.movedim(-1, 1) if Y.dim() > 1 else Y
        return make_jet(Y.reshape((Y.shape[0],) + tuple(ref_shape)), K)
    return rule


register(*aliases("quantile"))(_quantile(False, "quantile"))
register(*aliases("nanquantile"))(_quantile(True, "nanquantile"))


# -- unique ------------------------------------------------------------------------------------

def _unique_values(input, out0: Tensor, inverse: Tensor, dim, what: str):
    """The output jet of unique/unique_consecutive: the coefficients of one member of every group
    of equal primal values (slices when ``dim`` is given). Exact only when every member of a
    group carries the same coefficients: otherwise the group splits along the path, the output
    changes size, and there is no Taylor expansion (JetError)."""
    c = input._coeffs
    if dim is None:
        flat = c.reshape(c.shape[0], -1)
        inv = inverse.reshape(-1)
        G = out0.numel()
        # the first member of each group represents it (positions are constants)
        pos = torch.arange(inv.numel(), device=inv.device)
        first = torch.full((G,), inv.numel(), dtype=torch.long, device=inv.device)
        first = first.scatter_reduce(0, inv, pos, "amin", include_self=True)
        rep = flat[:, first]
        if c.shape[0] > 1 and not torch.equal(rep[1:, inv], flat[1:]):
            raise JetError(
                f"{what}: equal primal values move differently along the path, so they separate "
                "at t ≠ 0 and the number of unique values changes: the result has no Taylor "
                "expansion at this point")
        return make_jet(rep.reshape((c.shape[0],) + tuple(out0.shape)), input._order)
    d = dim % max(input.dim(), 1)
    moved = c.movedim(d + 1, 1)                       # (n+1, L, ...)
    G = out0.shape[d]
    pos = torch.arange(inverse.numel(), device=inverse.device)
    first = torch.full((G,), inverse.numel(), dtype=torch.long, device=inverse.device)
    first = first.scatter_reduce(0, inverse, pos, "amin", include_self=True)
    rep = moved[:, first]
    if c.shape[0] > 1 and not torch.equal(rep[1:, inverse], moved[1:]):
        raise JetError(
            f"{what}: equal primal slices move differently along the path, so they separate at "
            "t ≠ 0 and the number of unique slices changes: the result has no Taylor expansion")
    return make_jet(rep.movedim(1, d + 1), input._order)


def _unique_format(values, inverse, counts, return_inverse, return_counts):
    if not return_inverse and not return_counts:
        return values
    out = [values]
    if return_inverse:
        out.append(inverse)
    if return_counts:
        out.append(counts)
    return tuple(out)


@register(torch.unique, torch.Tensor.unique)
def unique(input, sorted=True, return_inverse=False, return_counts=False, dim=None):
    """unique: every output value is a group of equal primal values; its coefficients are those
    of the group's members, which must agree (see _unique_values). Inverse indices and counts
    are integer constants."""
    x0 = input._coeffs[0]
    out0, inverse, counts = torch.unique(x0, sorted=sorted, return_inverse=True, return_counts=True,
                                         dim=dim)
    vals = _unique_values(input, out0, inverse, dim, "torch.unique")
    return _unique_format(vals, inverse, counts, return_inverse, return_counts)


@register(torch.unique_consecutive, torch.Tensor.unique_consecutive)
def unique_consecutive(input, return_inverse=False, return_counts=False, dim=None):
    """unique_consecutive: as unique, for runs of equal consecutive values."""
    x0 = input._coeffs[0]
    out0, inverse, counts = torch.unique_consecutive(x0, return_inverse=True, return_counts=True,
                                                     dim=dim)
    vals = _unique_values(input, out0, inverse, dim, "torch.unique_consecutive")
    return _unique_format(vals, inverse, counts, return_inverse, return_counts)


# -- aminmax -----------------------------------------------------------------------------------

@register(*aliases("aminmax"))
def aminmax(input, *, dim=None, keepdim=False, out=None):
    """(amin, amax): each the coefficients at the primal's extreme position."""
    shape = out_shape(torch.aminmax, input._coeffs[0], dim=dim, keepdim=keepdim)
    if dim is None:
        lo, hi = torch.amin(input, dim=()), torch.amax(input, dim=())
        lo, hi = lo.reshape(shape), hi.reshape(shape)
    else:
        lo, hi = torch.amin(input, dim=dim, keepdim=keepdim), torch.amax(input, dim=dim, keepdim=keepdim)
    return torch.return_types.aminmax((lo, hi))


# -- products and scans ------------------------------------------------------------------------

def _reduce_dims(x, dim) -> List[int]:
    nd = x.dim()
    if dim is None:
        return list(range(nd))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d % nd for d in dims}) if nd else []


@register(*aliases("prod"))
def prod(input, dim=None, keepdim=False, *, dtype=None, out=None):
    """Π x over ``dim`` (all dims when None) as a pairwise tree of Cauchy products: depth ⌈log₂ N⌉,
    exact with zeros (no division, no log)."""
    if isinstance(dim, torch.dtype):
        dim, dtype = None, dim
    K = input._order
    c = input._coeffs if dtype is None else input._coeffs.to(dtype)
    args = () if dim is None else (dim,)
    shape = out_shape(torch.prod, c[0], *args, keepdim=keepdim) if dim is not None \
        else out_shape(torch.prod, c[0])
    dims = _reduce_dims(input, dim)
    n = c.shape[0]
    if dims:
        kept = [d for d in range(input.dim()) if d not in dims]
        c = c.permute([0] + [d + 1 for d in kept] + [d + 1 for d in dims])
        c = c.reshape((n,) + tuple(input.shape[d] for d in kept) + (-1,))
        y = tree_prod(series_list(c), K)
    else:
        y = series_list(c)
    return make_jet(stack_series(y).reshape((len(y),) + tuple(shape)), K)


def _scan_along(input, dim, combine: Callable[[Series, Series], Series], dtype=None):
    c = input._coeffs if dtype is None else input._coeffs.to(dtype)
    if input.dim() == 0:
        return make_jet(c, input._order)
    d = dim % input.dim() + 1
    y = scan(series_list(c.movedim(d, -1)), combine)
    return make_jet(stack_series(y).movedim(-1, d), input._order)


@register(*aliases("cumprod"))
def cumprod(input, dim, *, dtype=None, out=None):
    """y_i = Π_{j≤i} x_j: an inclusive scan of Cauchy products (⌈log₂ N⌉ batched steps), exact
    with zeros."""
    K = input._order
    return _scan_along(input, dim, lambda a, b: S.mul(a, b, K), dtype)


def logaddexp_series(a: Series, b: Series, K: int) -> Series:
    """log(e^a + e^b) of two series: h + log1p(exp(l − h)), with h the operand of larger primal
    (a constant choice) so that l − h ≤ 0 at t = 0 (no overflow). Both −∞: −∞."""
    pick = a[0] >= b[0]
    n = max(len(a), len(b))
    za, zb = torch.zeros_like(a[0]), torch.zeros_like(b[0])
    A = [a[k] if k < len(a) else za for k in range(n)]
    B = [b[k] if k < len(b) else zb for k in range(n)]
    hi = [torch.where(pick, x, y) for x, y in zip(A, B)]
    lo = [torch.where(pick, y, x) for x, y in zip(A, B)]
    d = [x - y for x, y in zip(lo, hi)]
    d[0] = torch.where(torch.isneginf(hi[0]), torch.full_like(d[0], float("-inf")), d[0])
    return S.add(hi, S.log1p(S.exp(d, K), K), K)


@register(*aliases("logcumsumexp"))
def logcumsumexp(input, dim, *, out=None):
    """y_i = log Σ_{j≤i} e^{x_j}: an inclusive scan of log-add-exp of series (each step shifted by
    the larger primal, a constant), so no prefix underflows as a global shift would."""
    K = input._order
    return _scan_along(input, dim, lambda a, b: logaddexp_series(a, b, K))


# -- var_mean / std_mean ----------------------------------------------------------------------

def _moments(with_std: bool):
    from . import reductions as R

    def rule(input, dim=None, unbiased=None, keepdim=False, *, correction=None, out=None):
        if isinstance(dim, bool):  # var_mean(x, unbiased)
            unbiased, dim = dim, None
        v = (R.std if with_std else R.var)(input, dim, unbiased, keepdim, correction=correction)
        dims = None if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        if input.dim() == 0:
            m = input * 1
        elif dims is None or not dims:
            m = torch.mean(input, dim=list(range(input.dim())), keepdim=keepdim)
        else:
            m = torch.mean(input, dim=dims, keepdim=keepdim)
        return v, m
    rule.__doc__ = ("(std, mean)" if with_std else "(var, mean)") + \
        ": the var/std rule (centring, square, mean) and the mean rule."
    return rule


register(torch.var_mean)(_moments(False))
register(torch.std_mean)(_moments(True))
