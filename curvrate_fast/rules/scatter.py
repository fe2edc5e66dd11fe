"""Taylor rules for scatter and index ops (scatter, scatter_reduce, index_reduce, index_put, put,
index_fill, masked_scatter, _segment_reduce, _unsafe_masked_index*), for structural ops that
copy or rearrange elements (narrow, tensor_split, slice, as_strided*, *_copy, _chunk_cat,
combinations, cartesian_prod, meshgrid, broadcast_tensors, atleast_*d, column_stack, split
variants, sum_to_size, fill, zero_, max_pool*_with_indices_backward) and for the finite
differences and quadratures (diff, gradient, trapezoid, cumulative_trapezoid), renorm and dist.

Where an element goes is decided by integer arguments (indices, masks, lengths), constants along
the path, so:

- writes and sums (scatter, index_put, put, scatter_reduce 'sum'/'mean', index_add) are linear in
  the operands: every coefficient is scattered the same way. Where several sources write the same
  place without reduction (an order torch leaves unspecified), one winner per place is chosen
  once, by scattering source *positions*, and all coefficients are taken from it;
- 'prod' multiplies the sources of each place: a segmented scan of Cauchy products (exact with
  zeros: no log trick);
- 'amax'/'amin' select the source with the extreme primal, and take all its coefficients (ties
  are points of non-differentiability: the rule takes one of the tied sources);
- a constant fill value (scatter/index_fill/masked_fill value, fill) goes to coefficient 0 only.

The elements are addressed by their flat (row-major) position in the output: ``pos`` below.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import series as S
from ..jets.kit import def_linear
from ..jets.registry import register
from ..jets.tensor import primals
from ._common import JetError, aliases, is_jet, lift, make_jet, order_of, primal, sizes_arg
from .sorting import out_shape, segment_prod, series_list, stack_of, stack_series


def _n(*xs) -> int:
    """Number of stored coefficients to use for operands xs (jets or constants)."""
    return max(x._coeffs.shape[0] if is_jet(x) else 1 for x in xs)


def _positions(shape: Sequence[int], dim: int, index: Tensor) -> Tensor:
    """Flat output position of every element of ``index`` for a scatter along ``dim`` into a
    tensor of ``shape``: the element's own coordinates, with coordinate ``dim`` replaced by the
    index value."""
    shape = tuple(shape)
    if len(shape) == 0:
        return index.reshape(-1).long()
    index = index.long()
    if index.dim() == 0:
        index = index.reshape((1,) * len(shape))
    d = dim % len(shape)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    pos = index * strides[d]
    for i in range(index.dim()):
        if i == d:
            continue
        view = [1] * index.dim()
        view[i] = index.shape[i]
        pos = pos + torch.arange(index.shape[i], device=index.device).view(view) * strides[i]
    return pos


def _region(src, index: Tensor, n: int, like: Tensor) -> Tensor:
    """The part of ``src`` a scatter reads (index-shaped, from the corner), flattened: (n, M)."""
    c = stack_of(src, n, like=like)
    if c.dim() - 1 == 0:
        return c.reshape(n, -1)
    region = (slice(None),) + tuple(slice(0, s) for s in (index.shape if index.dim() else (1,)))
    return c[region].reshape(n, -1)


def _winner(N: int, pos: Tensor) -> Tensor:
    """For each of N places, the position in ``pos`` of the one source written there (−1: none).
    Computed once from the indices, so every coefficient comes from the same source."""
    ids = torch.arange(pos.numel(), device=pos.device)
    return torch.full((N,), -1, dtype=torch.long, device=pos.device).scatter(0, pos.reshape(-1), ids)


def _assign(Cin: Tensor, pos: Tensor, Csrc: Tensor) -> Tensor:
    """Cin (n, N) with places ``pos`` (M,) overwritten by the sources Csrc (n, M)."""
    if pos.numel() == 0:
        return Cin
    W = _winner(Cin.shape[1], pos)
    return torch.where(W >= 0, Csrc[:, W.clamp(min=0)], Cin)


def _pairs(a: Tensor, b: Tensor):
    n = max(a.shape[0], b.shape[0])
    from ..jets.tensor import pad_coeffs
    return pad_coeffs(a, n), pad_coeffs(b, n)


def reduce_into(Cin: Tensor, pos: Tensor, Csrc: Tensor, reduce: str, include_self: bool, K: int,
                r0: Optional[Tensor] = None) -> Tensor:
    """The coefficients (n', N) of scatter_reduce(Cin, pos, Csrc, reduce, include_self) on flat
    coefficients Cin (n, N), sources Csrc (n, M) going to places ``pos`` (M,).

    - 'sum', 'mean': linear (the count per place is a constant);
    - 'prod': the sources' product per place by segment_prod, times Cin when include_self;
    - 'amax'/'amin': the coefficients of the source (or self) whose primal equals the result
      ``r0`` (torch's own primal result, used as coefficient 0: NaN propagation included).
    Places no source reaches keep Cin."""
    Cin, Csrc = _pairs(Cin, Csrc)
    N = Cin.shape[1]
    counts = torch.bincount(pos, minlength=N) if pos.numel() else torch.zeros(N, dtype=torch.long, device=Cin.device)
    hit = counts > 0
    if reduce in ("sum", "mean"):
        base = Cin if include_self else Cin.masked_fill(hit, 0)
        acc = base.index_add(1, pos, Csrc)
        if reduce == "mean":
            denom = (counts + int(include_self)).clamp(min=1).to(acc.dtype)
            acc = torch.where(hit, acc / denom, Cin)
        return acc
    if reduce == "prod":
        P = segment_prod(Csrc, pos, N, K)
        if include_self:
            P = stack_series(S.mul(series_list(Cin), series_list(P), K))
        Cin, P = _pairs(Cin, P)
        return torch.where(hit, P, Cin)
    if reduce in ("amax", "amin"):
        x0, s0 = Cin[0], Csrc[0]
        rt = r0[pos]
        cand = (s0 == rt) | (torch.isnan(s0) & torch.isnan(rt))
        ids = torch.where(cand, torch.arange(pos.numel(), device=pos.device), -1)
        W = torch.full((N,), -1, dtype=torch.long, device=pos.device).scatter_reduce(
            0, pos, ids, "amax", include_self=True)
        self_ok = (x0 == r0) | (torch.isnan(x0) & torch.isnan(r0))
        use_self = ~hit | (W < 0) | (self_ok if include_self else torch.zeros_like(hit))
        out = torch.where(use_self, Cin, Csrc[:, W.clamp(min=0)])
        return torch.cat([r0.unsqueeze(0), out[1:]])
    raise JetError(f"scatter reduction {reduce!r} is not supported on jets")


# -- scatter, scatter_reduce, index_reduce ---------------------------------------------------------

@register(*aliases("scatter"))
def scatter(input, dim, index, src=None, value=None, *, reduce=None, out=None):
    """scatter: places ``index`` along ``dim`` get the sources (or the constant ``value``: coefficient
    0 only); reduce='add' adds them (linear), reduce='multiply' multiplies them in (Cauchy
    products; a constant value v multiplies every coefficient by v^count)."""
    if src is not None and not isinstance(src, Tensor):
        src, value = None, src
    if is_jet(index):
        raise JetError("scatter: the index cannot be a jet")
    x0 = primal(input)
    K = order_of(input, src)
    shape = tuple(x0.shape)
    pos = _positions(shape, dim, index).reshape(-1)
    if src is None:
        n = _n(input)
        Cin = stack_of(input, n).reshape(n, -1)
        counts = torch.bincount(pos, minlength=Cin.shape[1]) if pos.numel() else \
            torch.zeros(Cin.shape[1], dtype=torch.long, device=Cin.device)
        hit = counts > 0
        if reduce is None:
            out = torch.cat([torch.where(hit, torch.as_tensor(value, dtype=Cin.dtype, device=Cin.device),
                                         Cin[0]).unsqueeze(0), Cin[1:].masked_fill(hit, 0)])
        elif reduce == "add":
            out = torch.cat([(Cin[0] + counts.to(Cin.dtype) * value).unsqueeze(0), Cin[1:]])
        elif reduce == "multiply":
            f = torch.pow(torch.as_tensor(value, dtype=Cin.dtype, device=Cin.device), counts.to(Cin.dtype))
            out = Cin * f
        else:
            raise JetError(f"scatter: reduce={reduce!r} is not supported")
        return make_jet(out.reshape((out.shape[0],) + shape), K)
    n = _n(input, src)
    Cin = stack_of(input, n, like=x0).expand((n,) + shape).reshape(n, -1)
    Csrc = _region(src, index, n, x0)
    if reduce is None:
        out = _assign(Cin, pos, Csrc)
    elif reduce == "add":
        out = reduce_into(Cin, pos, Csrc, "sum", True, K)
    elif reduce == "multiply":
        out = reduce_into(Cin, pos, Csrc, "prod", True, K)
    else:
        raise JetError(f"scatter: reduce={reduce!r} is not supported")
    return make_jet(out.reshape((out.shape[0],) + shape), K)


@register(*aliases("scatter_reduce"))
def scatter_reduce(input, dim, index, src, reduce, *, include_self=True, out=None):
    """scatter_reduce: see reduce_into ('sum'/'mean' linear, 'prod' Cauchy products, 'amax'/'amin'
    the coefficients of the extreme source)."""
    x0, s0 = primal(input), primal(src)
    r0 = torch.scatter_reduce(x0, dim, index, s0, reduce, include_self=include_self) \
        if reduce in ("amax", "amin") else None  # the selected values, NaN propagation included
    K = order_of(input, src)
    n = _n(input, src)
    shape = tuple(x0.shape)
    Cin = stack_of(input, n).expand((n,) + shape).reshape(n, -1)
    pos = _positions(shape, dim, index).reshape(-1)
    out = reduce_into(Cin, pos, _region(src, index, n, x0), reduce, include_self, K,
                      None if r0 is None else r0.reshape(-1))
    return make_jet(out.reshape((out.shape[0],) + shape), K)


@register(*aliases("index_reduce"))
def index_reduce(input, dim, index, source, reduce, *, include_self=True, out=None):
    """index_reduce: slice i of ``source`` along ``dim`` goes to slice index[i]: a scatter_reduce
    with the index expanded over the source's other dims."""
    x0, s0 = primal(input), primal(source)
    r0 = torch.index_reduce(x0, dim, index, s0, reduce, include_self=include_self) \
        if reduce in ("amax", "amin") else None
    K = order_of(input, source)
    n = _n(input, source)
    shape = tuple(x0.shape)
    sshape = tuple(s0.shape) if s0.dim() else (1,)
    d = dim % max(len(shape), 1)
    view = [1] * len(sshape)
    view[d] = -1
    full = index.long().reshape(view).expand(sshape)
    pos = _positions(shape if shape else (1,), d, full).reshape(-1)
    Cin = stack_of(input, n).expand((n,) + shape).reshape(n, -1)
    Csrc = stack_of(source, n).expand((n,) + tuple(s0.shape)).reshape(n, -1)
    out = reduce_into(Cin, pos, Csrc, reduce, include_self, K, None if r0 is None else r0.reshape(-1))
    return make_jet(out.reshape((out.shape[0],) + shape), K)


# -- index_put, put, index_fill, masked_scatter -------------------------------------------------

def _index_positions(shape, indices, device) -> Tensor:
    """Flat positions selected by advanced indexing with ``indices`` (None = the whole dim)."""
    idx = tuple(slice(None) if i is None else primal(i) for i in indices)
    return torch.arange(math.prod(shape), device=device).reshape(shape)[idx]


def _put_values(Cin: Tensor, P: Tensor, values, n: int, accumulate: bool, like: Tensor) -> Tensor:
    V = stack_of(values, n, like=like)
    V = lift(V, P.dim()).expand((n,) + tuple(P.shape)).reshape(n, -1)
    pos = P.reshape(-1)
    if accumulate:
        return Cin.index_add(1, pos, V)
    return _assign(Cin, pos, V)


@register(*aliases("index_put"))
def index_put(input, indices, values, accumulate=False):
    """index_put: the values go to the places the indices select (linear); accumulate adds them."""
    if any(is_jet(i) for i in indices if i is not None):
        raise JetError("index_put: the indices cannot be jets")
    x0 = primal(input)
    K = order_of(input, values)
    n = _n(input, values)
    shape = tuple(x0.shape)
    P = _index_positions(shape, indices, x0.device)
    Cin = stack_of(input, n).expand((n,) + shape).reshape(n, -1)
    out = _put_values(Cin, P, values, n, accumulate, x0)
    return make_jet(out.reshape((n,) + shape), K)


@register(*aliases("put"))
def put(input, index, source, accumulate=False):
    """put: source element i goes to flat place index[i] (negative places wrap)."""
    x0 = primal(input)
    torch.put(x0.detach(), index, primal(source).detach(), accumulate)  # validates the arguments
    K = order_of(input, source)
    n = _n(input, source)
    shape = tuple(x0.shape)
    N = x0.numel()
    P = torch.where(index < 0, index + N, index).reshape(-1).long()
    Cin = stack_of(input, n).expand((n,) + shape).reshape(n, -1)
    Cs = stack_of(source, n, like=x0).reshape(n, -1)
    out = Cin.index_add(1, P, Cs) if accumulate else _assign(Cin, P, Cs)
    return make_jet(out.reshape((n,) + shape), K)


@register(*aliases("index_fill"))
def index_fill(input, dim, index, value):
    """index_fill: where(mask, value, input), the mask (the slices ``index`` along ``dim``) built
    from the indices; a constant value reaches coefficient 0 only, a jet value all."""
    x0 = primal(input)
    mask = torch.zeros(x0.shape, dtype=torch.bool, device=x0.device).index_fill(dim, index, True)
    if not is_jet(value):
        value = torch.as_tensor(value, dtype=x0.dtype, device=x0.device)
    return torch.where(mask, value, input)


@register(*aliases("masked_scatter"))
def masked_scatter(input, mask, source):
    """masked_scatter: the places where the (broadcast) mask is True take the source's elements in
    order; the others keep the input (linear)."""
    x0, m = primal(input), primal(mask)
    ref = torch.masked_scatter(x0.detach(), m, primal(source).detach())  # validates, gives the shape
    K = order_of(input, source)
    n = _n(input, source)
    shape = tuple(ref.shape)
    mb = m.expand(shape).reshape(-1)
    k = (torch.cumsum(mb.long(), 0) - 1).clamp(min=0)
    Cin = lift(stack_of(input, n), len(shape)).expand((n,) + shape).reshape(n, -1)
    Cs = stack_of(source, n, like=x0).reshape(n, -1)
    out = torch.where(mb, Cs[:, k] if Cs.shape[1] else Cin, Cin)
    return make_jet(out.reshape((n,) + shape), K)


@register(torch._unsafe_masked_index)
def _unsafe_masked_index(x, mask, indices, fill):
    """x[clamped indices] where mask, else the constant fill (PyTorch's own decomposition, on jets)."""
    idx = tuple(slice(None) if i is None else i.clamp(min=0, max=x.shape[k] - 1)
                for k, i in enumerate(indices))
    return x[idx].masked_fill(~primal(mask), fill)


@register(torch._unsafe_masked_index_put_accumulate)
def _unsafe_masked_index_put_accumulate(x, mask, indices, values):
    """index_put(x, clamped indices, values where mask else 0, accumulate=True)."""
    if primal(x).numel() == 0:
        return x * 1
    idx = [None if i is None else i.clamp(min=-x.shape[k], max=x.shape[k] - 1)
           for k, i in enumerate(indices)]
    m = primal(mask)
    masked = values.masked_fill(~m, 0) if is_jet(values) else primal(values).masked_fill(~m, 0)
    return index_put(x, idx, masked, True)


# -- _segment_reduce -------------------------------------------------------------------------------

@register(torch.segment_reduce)
def segment_reduce(data, reduce, *, lengths=None, indices=None, offsets=None, axis=0, unsafe=False,
                   initial=None):
    """segment_reduce over segments given by lengths (start = running sum) or offsets (start =
    offsets[i], end = offsets[i+1]), along the last dim of lengths/offsets (as ATen). The segment
    members are gathered into a padded table (segments × longest); then 'sum' Σ + initial,
    'mean' (initial + Σ)/length (an empty segment: initial, or NaN), 'prod' initial·Π by a tree
    of Cauchy products, 'max'/'min' the coefficients of the extreme member, or the constant
    ``initial`` where it wins. Coefficient 0 is torch's own result."""
    x0 = data._coeffs[0]
    ref = torch.segment_reduce(x0, reduce, lengths=lengths, indices=indices, offsets=offsets,
                               axis=axis, unsafe=unsafe, initial=initial)
    K = data._order
    if offsets is not None:
        starts = offsets[..., :-1].long()
        lens = (offsets[..., 1:] - offsets[..., :-1]).long()
        a = offsets.dim() - 1
    else:
        lens = lengths.long()
        starts = torch.cumsum(lens, -1) - lens
        a = lengths.dim() - 1
    C = data._coeffs
    n = C.shape[0]
    B = tuple(x0.shape[:a])
    Nax = x0.shape[a]
    R = tuple(x0.shape[a + 1:])
    Cf = C.reshape((n,) + B + (Nax, math.prod(R)))
    L = int(lens.max()) if lens.numel() else 0
    Sg = lens.shape[-1]
    j = torch.arange(max(L, 1), device=x0.device)
    valid = j < lens.unsqueeze(-1)                                    # (*B, Sg, L)
    gidx = (starts.unsqueeze(-1) + j).clamp(0, max(Nax - 1, 0))
    gi = gidx.reshape(B + (-1, 1)).expand(B + (gidx.shape[-2] * gidx.shape[-1], Cf.shape[-1]))
    V = torch.gather(Cf, a + 1, gi.unsqueeze(0).expand((n,) + tuple(gi.shape)))
    V = V.reshape((n,) + B + (Sg, j.numel(), Cf.shape[-1]))         # (n, *B, Sg, L, Rn)
    vm = valid.unsqueeze(-1)                                           # (*B, Sg, L, 1)
    lens_b = lens.unsqueeze(-1)                                        # (*B, Sg, 1)
    refc = ref.reshape(B + (Sg, -1))
    if reduce in ("sum", "mean"):
        Y = V.masked_fill(~vm, 0).sum(-2)                              # (n, *B, Sg, Rn)
        if reduce == "mean":
            Y = torch.where(lens_b > 0, Y / lens_b.clamp(min=1).to(Y.dtype), torch.zeros_like(Y))
    elif reduce == "prod":
        one = torch.ones_like(V[0])
        s = [torch.where(vm, V[k], one if k == 0 else torch.zeros_like(one)).movedim(-2, -1)
             for k in range(n)]
        from .sorting import tree_prod
        Y = stack_series(tree_prod(s, K))
        if initial is not None:
            Y = Y * initial
    elif reduce in ("max", "min"):
        v0 = V[0].masked_fill(~vm, float("-inf") if reduce == "max" else float("inf"))
        arg = (v0.argmax(-2) if reduce == "max" else v0.argmin(-2)).unsqueeze(-2)  # (*B, Sg, 1, Rn)
        Y = torch.gather(V, -2, arg.unsqueeze(0).expand((V.shape[0],) + tuple(arg.shape))).squeeze(-2)
        w0 = Y[0]
        member = (w0 == refc) | (torch.isnan(w0) & torch.isnan(refc))
        Y = torch.where(member & (lens_b > 0), Y, torch.zeros_like(Y))
    else:
        raise JetError(f"segment_reduce: reduce={reduce!r} is not supported on jets")
    Y = torch.cat([refc.unsqueeze(0), Y[1:]]) if Y.shape[0] > 1 else refc.unsqueeze(0)
    return make_jet(Y.reshape((Y.shape[0],) + tuple(ref.shape)), K)


# -- narrow, tensor_split, slice, split variants, copies --------------------------------------------

def _as_int(v):
    return int(v) if isinstance(v, Tensor) else v


@register(*aliases("narrow"))
def narrow(input, dim, start, length):
    """narrow (start may be a 0-dim integer tensor): the same slice of every coefficient."""
    nd = input.dim()
    return make_jet(input._coeffs.narrow(dim % max(nd, 1) + 1, _as_int(start), _as_int(length)),
                    input._order, is_view=True)


@register(*aliases("narrow_copy"))
def narrow_copy(input, dim, start, length, *, out=None):
    return make_jet(narrow(input, dim, start, length)._coeffs.clone(), input._order)


@register(*aliases("tensor_split"))
def tensor_split(input, indices_or_sections=None, dim=0, *, indices=None, sections=None,
                 tensor_indices_or_sections=None):
    """tensor_split (a tensor of split points becomes a list, a 0-dim one a count): the same
    pieces of every coefficient."""
    spec = next(v for v in (indices_or_sections, indices, sections, tensor_indices_or_sections)
                if v is not None)
    if isinstance(spec, Tensor):
        spec = int(spec) if spec.dim() == 0 else [int(v) for v in spec.tolist()]
    c = input._coeffs
    return tuple(make_jet(p, input._order, is_view=True)
                 for p in torch.tensor_split(c, spec, dim=dim % max(input.dim(), 1) + 1))


@register(torch.ops.aten.slice)
def aten_slice(input, dim=0, start=None, end=None, step=1):
    """aten.slice: basic slicing of every coefficient."""
    d = dim % max(input.dim(), 1)
    return make_jet(input._coeffs[(slice(None),) * (d + 1) + (slice(start, end, step),)],
                    input._order, is_view=True)


for _name in ("hsplit", "vsplit", "dsplit", "unsafe_split", "unsafe_chunk", "split_with_sizes",
              "unsafe_split_with_sizes", "permute_copy", "t_copy", "transpose_copy",
              "unsqueeze_copy", "squeeze_copy", "expand_copy", "diagonal_copy", "unbind_copy",
              "unfold_copy", "alias_copy", "split_with_sizes_copy", "split_copy", "select_copy",
              "slice_copy", "diff"):
    _fs = aliases(_name)
    if _fs:
        def_linear(*_fs)


@register(*aliases("view_copy"))
def view_copy(input, *size, dtype=None, out=None, **named):
    """view_copy to a shape: the same reshape of every coefficient. To a dtype (a reinterpretation
    of the bits): the same dtype copies; an integer/bool dtype gives a constant (as other integer
    results); another float dtype has no Taylor expansion (JetError)."""
    if "size" in named:          # torch.view_copy(x, size=(...)): torch's keyword for the shape
        size = (named.pop("size"),)
    if named or (dtype is not None and size):
        raise TypeError(f"view_copy() got unexpected arguments {sorted(named) or ['dtype and a size']}")
    if dtype is not None:
        size = (dtype,)
    if len(size) == 1 and isinstance(size[0], torch.dtype):
        dt = size[0]
        if dt == input.dtype:
            return make_jet(input._coeffs.clone(), input._order)
        if not (dt.is_floating_point or dt.is_complex):
            return torch.view_copy(input._coeffs[0], dt)
        raise JetError(f"view_copy({dt}) reinterprets the bits of a {input.dtype} jet: the result "
                       "is not a differentiable function of the values")
    shape = out_shape(torch.view_copy, input._coeffs[0], *size)
    c = input._coeffs
    return make_jet(c.reshape((c.shape[0],) + tuple(shape)), input._order)


@register(*aliases("detach_copy"))
def detach_copy(input, *, out=None):
    """A detached copy is a constant along the path (as ``detach``)."""
    return input._coeffs[0].detach().clone()


# -- as_strided family: storage positions mapped to elements ------------------------------------

def _storage_positions(size, stride, offset: int, device) -> Tensor:
    pos = torch.full(tuple(size), int(offset), dtype=torch.long, device=device)
    for i, (s, st) in enumerate(zip(size, stride)):
        view = [1] * len(size)
        view[i] = s
        pos = pos + torch.arange(s, device=device).view(view) * int(st)
    return pos


def _strided_elements(shape, strides, base_offset: int, size, stride, offset: int, device,
                      what: str) -> Tensor:
    """The (row-major) element numbers of a tensor laid out with ``strides``/``base_offset``
    that ``as_strided(size, stride, offset)`` reads; raises where it would read memory that is not
    one of the tensor's elements (plain torch would read whatever is there: for a jet, the other
    coefficients or nothing)."""
    numel = math.prod(shape)
    epos = _storage_positions(shape, strides, base_offset, device).reshape(-1)
    want = _storage_positions(size, stride, offset, device)
    if want.numel() == 0:
        return want
    if numel == 0:
        raise JetError(f"{what}: reads elements of an empty jet")
    lo, hi = int(epos.min()), int(epos.max())
    table = torch.full((hi - lo + 1,), -1, dtype=torch.long, device=device)
    table[epos - lo] = torch.arange(numel, device=device)
    inside = (want >= lo) & (want <= hi)
    el = torch.where(inside, table[(want - lo).clamp(0, hi - lo)], -1)
    if bool((el < 0).any()):
        raise JetError(
            f"{what}: the strided window reads memory outside the tensor's own elements (storage "
            "shared with other tensors); on a jet that memory holds no coefficients of this value. "
            "Take the window from the tensor that owns the storage, or use view ops.")
    return el


@register(*aliases("as_strided"))
def as_strided(input, size, stride, storage_offset=None):
    """as_strided reads the jet's elements at the storage positions the primal's layout gives
    (``stride()``/``storage_offset()`` as the model sees them); every coefficient is read at the
    same elements. Windows that reach outside the tensor's own elements raise."""
    c0 = input._coeffs[0]
    off = c0.storage_offset() if storage_offset is None else _as_int(storage_offset)
    el = _strided_elements(c0.shape, c0.stride(), c0.storage_offset(), size, stride, off, c0.device,
                           "as_strided")
    c = input._coeffs
    out = c.reshape(c.shape[0], -1)[:, el.reshape(-1)].reshape((c.shape[0],) + tuple(size))
    return make_jet(out, input._order, is_view=True)


@register(*aliases("as_strided_copy"))
def as_strided_copy(input, size, stride, storage_offset=None, *, out=None):
    return make_jet(as_strided(input, size, stride, storage_offset)._coeffs.clone(), input._order)


@register(*aliases("as_strided_scatter"))
def as_strided_scatter(input, src, size, stride, storage_offset=None):
    """as_strided_scatter: a copy of the input (laid out as ``clone`` lays it out, offset 0) whose
    strided window gets ``src`` (linear; overlapping windows: one write wins per element)."""
    x0 = primal(input)
    K = order_of(input, src)
    n = _n(input, src)
    layout = torch.empty_like(x0)  # the layout of input.clone(), which ATen writes into
    el = _strided_elements(x0.shape, layout.stride(), 0, size, stride,
                           0 if storage_offset is None else _as_int(storage_offset), x0.device,
                           "as_strided_scatter")
    shape = tuple(x0.shape)
    Cin = stack_of(input, n).expand((n,) + shape).reshape(n, -1)
    Cs = stack_of(src, n, like=x0).expand((n,) + tuple(size)).reshape(n, -1)
    out = _assign(Cin, el.reshape(-1), Cs)
    return make_jet(out.reshape((n,) + shape), K)


# -- lists of tensors ----------------------------------------------------------------------------

@register(torch._chunk_cat)
def _chunk_cat(tensors, dim, num_chunks, *, out=None):
    """_chunk_cat is linear and acts on dims ≥ dim only (the leading dims must agree): the stacked
    coefficients go through it once, with ``dim`` shifted past the coefficient axis."""
    K = order_of(tensors)
    ndims = {t.dim() for t in tensors}
    if len(ndims) > 1 and dim < 0:
        return torch._chunk_cat(primals(list(tensors)), dim, num_chunks)  # torch's own error
    d = dim % next(iter(ndims)) if len(ndims) == 1 else dim
    n = _n(*tensors)
    like = primal(next(t for t in tensors if is_jet(t)))
    return make_jet(torch._chunk_cat([stack_of(t, n, like=like) for t in tensors], d + 1, num_chunks), K)


@register(*aliases("combinations"))
def combinations(input, r=2, with_replacement=False):
    """combinations: rows of input elements at index combinations (a gather)."""
    idx = torch.combinations(torch.arange(input.shape[0], device=input.device), r, with_replacement)
    c = input._coeffs
    return make_jet(c[:, idx.reshape(-1)].reshape((c.shape[0],) + tuple(idx.shape)), input._order)


def _cartesian_prod(tensors):
    """cartesian_prod: column j holds tensor j's elements at the product grid's indices."""
    tensors = list(tensors)
    K = order_of(tensors)
    if len(tensors) == 1:
        t = tensors[0]
        return make_jet(t._coeffs.clone(), K)
    n = _n(*tensors)
    like = primal(next(t for t in tensors if is_jet(t)))
    idx = torch.cartesian_prod(*[torch.arange(t.shape[0], device=like.device) for t in tensors])
    cols = [stack_of(t, n, like=like)[:, idx[:, j]] for j, t in enumerate(tensors)]
    return make_jet(torch.stack(cols, -1), K)


register(torch.cartesian_prod)(lambda *tensors: _cartesian_prod(tensors))
register(torch._C._VariableFunctions.cartesian_prod)(_cartesian_prod)


def _meshgrid(tensors, indexing=None):
    """meshgrid: output i is tensor i expanded along the grid (its own axis: i, or with 'xy' the
    first two swapped)."""
    tensors = list(tensors)
    K = order_of(tensors)
    outs0 = torch.meshgrid(*primals(tensors), indexing=indexing or "ij")
    shape = tuple(outs0[0].shape)
    res = []
    for i, t in enumerate(tensors):
        if not is_jet(t):
            res.append(outs0[i])
            continue
        axis = i
        if indexing == "xy" and len(tensors) >= 2 and i < 2:
            axis = 1 - i
        c = t._coeffs
        view = [1] * len(shape)
        view[axis] = shape[axis]
        res.append(make_jet(c.reshape((c.shape[0],) + tuple(view)).expand((c.shape[0],) + shape),
                            K, is_view=True))
    return tuple(res)


def _meshgrid_py(*tensors, indexing=None):
    if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
        tensors = tensors[0]
    return _meshgrid(tensors, indexing)


register(torch.meshgrid)(_meshgrid_py)
register(torch._C._VariableFunctions.meshgrid)(_meshgrid)


def _broadcast_tensors(*tensors):
    """broadcast_tensors: every operand expanded to the common shape."""
    if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
        tensors = tensors[0]
    shape = torch.broadcast_shapes(*[t.shape for t in tensors])
    return tuple(t.expand(shape) for t in tensors)


register(torch.broadcast_tensors)(_broadcast_tensors)
register(torch._C._VariableFunctions.broadcast_tensors)(_broadcast_tensors)


def _atleast(fn):
    def one(t):
        if not is_jet(t):
            return fn(t)
        shape = out_shape(fn, t._coeffs[0])
        c = t._coeffs
        return make_jet(c.reshape((c.shape[0],) + tuple(shape)), t._order, is_view=True)

    def rule(*tensors, **named):
        if "tensors" in named:       # torch._VF.atleast_1d(tensors=[...]): torch's keyword
            tensors = (named.pop("tensors"),)
        if named:
            raise TypeError(f"{fn.__name__}() got unexpected keyword arguments {sorted(named)}")
        if len(tensors) == 1:
            tensors = tensors[0]
        if isinstance(tensors, (list, tuple)):
            return tuple(one(t) for t in tensors)
        return one(tensors)
    rule.__doc__ = f"{fn.__name__}: a reshape (leading/trailing unit dims) of every coefficient."
    return rule


for _name in ("atleast_1d", "atleast_2d", "atleast_3d"):
    _vf = getattr(torch._C._VariableFunctions, _name)
    _rule = _atleast(_vf)
    register(getattr(torch, _name), _vf)(_rule)


@register(*aliases("column_stack"))
def column_stack(tensors, *, out=None):
    """column_stack: 0-/1-dim operands become columns, then hstack."""
    return torch.hstack([t.reshape(t.numel(), 1) if t.dim() <= 1 else t for t in tensors])


# -- sum_to_size, fill, zero_ ---------------------------------------------------------------------

@register(torch.Tensor.sum_to_size)
def sum_to_size(input, *args, size=None):
    """sum_to_size: sums over the broadcast dims (linear)."""
    size = sizes_arg(args, size)
    c = input._coeffs
    full = (1,) * (input.dim() - len(size)) + tuple(size)
    out = c.sum_to_size((c.shape[0],) + full)
    return make_jet(out.reshape((c.shape[0],) + tuple(size)), input._order)


@register(*aliases("fill"))
def fill(input, value):
    """fill: every element becomes ``value``: a constant, or the jet ``value`` broadcast."""
    if is_jet(value):
        return value.to(input.dtype).expand(input.shape).clone()
    return torch.fill(primal(input), primal(value))


@register(*aliases("zero_"))
def zero_(input):
    """zero_: the jet becomes the constant 0 (in place, as the dispatcher's in-place ops)."""
    if not input.writable():
        raise JetError("in-place zero_ on a view of a jet (from view/reshape/indexing) would not "
                       "reach the tensor it views; use torch.zeros_like instead")
    input.assign(torch.zeros_like(input._coeffs[:1]))
    return input


# -- max_pool{2,3}d_with_indices_backward ----------------------------------------------------------

def _max_pool_backward(op, nsp: int):
    def rule(grad_output, input, kernel_size, stride, padding, dilation, ceil_mode, indices):
        """The gradient of max pooling: grad_output added at the argmax positions ``indices`` of
        each window. Linear in grad_output; the input enters only through its shape."""
        x0, g0 = primal(input), primal(grad_output)
        if not is_jet(grad_output):
            return op(g0, x0, kernel_size, stride, padding, dilation, ceil_mode, indices)
        G = grad_output._coeffs
        n = G.shape[0]
        shape = tuple(x0.shape)
        lead = shape[:-nsp]
        Gf = G.reshape((n,) + lead + (-1,))
        If = indices.reshape(lead + (-1,))
        out = torch.zeros((n,) + lead + (math.prod(shape[-nsp:]),), dtype=G.dtype, device=G.device)
        out = out.scatter_add(-1, If.unsqueeze(0).expand((n,) + tuple(If.shape)), Gf)
        return make_jet(out.reshape((n,) + shape), grad_output._order)
    return rule


register(torch.ops.aten.max_pool2d_with_indices_backward)(
    _max_pool_backward(torch.ops.aten.max_pool2d_with_indices_backward.default, 2))
register(torch.ops.aten.max_pool3d_with_indices_backward)(
    _max_pool_backward(torch.ops.aten.max_pool3d_with_indices_backward.default, 3))


# -- finite differences, quadrature, renorm, dist -------------------------------------------------

def _sl(t, d: int, start=None, stop=None):
    return t[(slice(None),) * d + (slice(start, stop),)]


@register(*aliases("gradient"))
def gradient(input, *, spacing=None, dim=None, edge_order=1):
    """torch.gradient as ATen computes it (second-order central differences inside, one-sided of
    order ``edge_order`` at the edges), written in ops with rules, so the input and the
    coordinates (tensor spacing) may both be jets (the coefficients are then rational functions
    of the coordinates, exactly)."""
    x0 = primal(input)
    torch.gradient(x0.detach(), spacing=primals(spacing) if isinstance(spacing, (list, tuple))
                   else primal(spacing) if spacing is not None else None,
                   dim=dim, edge_order=edge_order)  # validates the arguments
    nd = input.dim()
    dims = list(range(nd)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    if spacing is None:
        sp = [1.0] * len(dims)
    elif isinstance(spacing, (list, tuple)):
        sp = list(spacing)
    else:
        sp = [spacing] * len(dims)
    out = []
    for d0, h in zip(dims, sp):
        d = d0 % nd
        if isinstance(h, Tensor) and h.dim() == 1:
            dx = h[1:] - h[:-1]
            dx1, dx2 = dx[:-1], dx[1:]
            shp = [1] * nd
            shp[d] = -1
            a = (-dx2 / (dx1 * (dx1 + dx2))).reshape(shp)
            b = ((dx2 - dx1) / (dx1 * dx2)).reshape(shp)
            c = (dx1 / (dx2 * (dx1 + dx2))).reshape(shp)
            center = a * _sl(input, d, 0, -2) + b * _sl(input, d, 1, -1) + c * _sl(input, d, 2)
            if edge_order == 1:
                pre = (_sl(input, d, 1, 2) - _sl(input, d, 0, 1)) / dx[0]
                app = (_sl(input, d, -1) - _sl(input, d, -2, -1)) / dx[-1]
            else:
                a0 = -(2.0 * dx[0] + dx[1]) / (dx[0] * (dx[0] + dx[1]))
                b0 = (dx[0] + dx[1]) / (dx[0] * dx[1])
                c0 = (-dx[0]) / (dx[1] * (dx[0] + dx[1]))
                pre = a0 * _sl(input, d, 0, 1) + b0 * _sl(input, d, 1, 2) + c0 * _sl(input, d, 2, 3)
                a1 = dx[-1] / (dx[-2] * (dx[-1] + dx[-2]))
                b1 = -(dx[-1] + dx[-2]) / (dx[-1] * dx[-2])
                c1 = (2 * dx[-1] + dx[-2]) / (dx[-1] * (dx[-1] + dx[-2]))
                app = a1 * _sl(input, d, -3, -2) + b1 * _sl(input, d, -2, -1) + c1 * _sl(input, d, -1)
        else:
            center = (_sl(input, d, 2) - _sl(input, d, 0, -2)) / h / 2
            if edge_order == 1:
                pre = (_sl(input, d, 1, 2) - _sl(input, d, 0, 1)) / h
                app = (_sl(input, d, -1) - _sl(input, d, -2, -1)) / h
            else:
                pre = (-1.5 * _sl(input, d, 0, 1) + 2 * _sl(input, d, 1, 2) - 0.5 * _sl(input, d, 2, 3)) / h
                app = (0.5 * _sl(input, d, -3, -2) - 2 * _sl(input, d, -2, -1) + 1.5 * _sl(input, d, -1)) / h
        out.append(torch.cat([pre, center, app], d))
    return tuple(out)


def _trapz_dx(y, x, d: int):
    """ATen's x handling: a 1-D x lies along ``dim``; a lower-rank x gets leading unit dims; the
    differences broadcast against y's."""
    nd = y.dim()
    if x.dim() == 1:
        shp = [1] * nd
        shp[d] = x.shape[0]
        xv = x.reshape(shp)
    elif x.dim() < nd:
        xv = x.reshape((1,) * (nd - x.dim()) + tuple(x.shape))
    else:
        xv = x
    return _sl(xv, d, 1) - _sl(xv, d, 0, -1)


def _trapezoid(y, x=None, *, dx=None, dim=-1):
    """Σ (y_i + y_{i+1})·Δx_i / 2 (ATen's formula; with a scalar dx, dx·(Σ y − (y_first + y_last)/2)),
    in ops with rules: y and x may both be jets."""
    y0 = primal(y)
    d = dim % y0.dim()
    if y0.shape[d] == 0:
        return torch.zeros(y0.shape[:d] + y0.shape[d + 1:], dtype=y0.dtype, device=y0.device)
    if x is not None:
        return ((_sl(y, d, 0, -1) + _sl(y, d, 1)) * _trapz_dx(y, x, d)).sum(d) / 2.0
    h = 1.0 if dx is None else dx
    return (y.sum(d) - (y.select(d, 0) + y.select(d, -1)) * 0.5) * h


@register(*aliases("trapezoid"))
def trapezoid(y, x=None, *, dx=None, dim=-1):
    return _trapezoid(y, x, dx=dx, dim=dim)


@register(*aliases("trapz"))
def trapz(y, x=None, *, dx=None, dim=-1):
    return _trapezoid(y, x, dx=dx, dim=dim)


@register(*aliases("cumulative_trapezoid"))
def cumulative_trapezoid(y, x=None, *, dx=None, dim=-1):
    """The running trapezoid sums (ATen's formula), in ops with rules."""
    d = dim % primal(y).dim()
    s = _sl(y, d, 0, -1) + _sl(y, d, 1)
    if x is not None:
        return (s * _trapz_dx(y, x, d)).cumsum(d) / 2.0
    h = 1.0 if dx is None else dx
    return (h / 2.0 * s).cumsum(d)


@register(*aliases("renorm"))
def renorm(input, p, dim, maxnorm):
    """renorm: slices along ``dim`` whose p-norm exceeds maxnorm are scaled by
    maxnorm / (norm + 1e-7) (ATen's factor; the norm is a jet, the comparison a constant mask)."""
    x0 = primal(input)
    if x0.dim() < 2:
        return torch.renorm(x0, p, dim, maxnorm)  # torch's own error
    d = dim % x0.dim()
    dims = [i for i in range(x0.dim()) if i != d]
    norm = torch.linalg.vector_norm(input, p, dims, keepdim=True)
    factor = torch.where(primal(norm) > maxnorm, maxnorm / (norm + 1e-7),
                         torch.ones((), dtype=x0.dtype, device=x0.device))
    return input * factor


@register(*aliases("dist"))
def dist(input, other, p=2):
    """dist = ‖input − other‖_p (the vector_norm rule; p = 0 is a count, a constant)."""
    return torch.linalg.vector_norm(input - other, p)
