"""Taylor rules for shape and layout ops: views, reshapes, permutations, indexing, concatenation,
padding, splitting, dtype/device moves (SPEC.md §2: linear maps act on every coefficient).

Ops that keep the element order (view, reshape, flatten, squeeze, ...) reshape the stacked
coefficients directly; permutations shift their dims past the coefficient axis; everything else
runs once over all coefficients with ``torch.vmap``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..jets.registry import register
from ..jets.tensor import primals
from ._common import JetError, aliases, is_jet, make_jet, order_of, per_coefficient, primal


def _meta(x) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _meta_tree(args):
    from torch.utils._pytree import tree_map
    return tree_map(lambda a: _meta(a) if isinstance(a, Tensor) else a, args)


def _order_preserving(func):
    def rule(input, *args, **kwargs):
        out_shape = func(_meta(input), *_meta_tree(args), **_meta_tree(kwargs)).shape
        c = input._coeffs
        return make_jet(c.reshape((c.shape[0],) + tuple(out_shape)), input._order, is_view=True)
    rule.__doc__ = f"{getattr(func, '__name__', func)}: same element order, reshape every coefficient."
    return rule


for _name in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
              "reshape_as", "ravel"):
    register(*aliases(_name))(_order_preserving(getattr(torch.Tensor, _name)))


@register(*aliases("expand"), *aliases("expand_as"), *aliases("broadcast_to"))
def expand(input, *sizes, **kwargs):
    if len(sizes) == 1 and isinstance(sizes[0], Tensor) and not kwargs:
        target = tuple(sizes[0].shape)  # expand_as
    else:
        target = tuple(torch.empty(input.shape, device="meta").expand(*sizes).shape)
    c = input._coeffs
    c = c.reshape((c.shape[0],) + (1,) * (len(target) - input.dim()) + tuple(input.shape))
    return make_jet(c.expand((c.shape[0],) + target), input._order, is_view=True)


def _dims(d, ndim):
    return d % ndim if ndim else 0


@register(*aliases("permute"))
def permute(input, *dims):
    if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
        dims = tuple(dims[0])
    nd = input.dim()
    return make_jet(input._coeffs.permute(0, *[_dims(d, nd) + 1 for d in dims]), input._order,
                    is_view=True)


@register(*aliases("transpose"), *aliases("swapaxes"), *aliases("swapdims"))
def transpose(input, dim0, dim1):
    nd = input.dim()
    return make_jet(input._coeffs.transpose(_dims(dim0, nd) + 1, _dims(dim1, nd) + 1),
                    input._order, is_view=True)


@register(*aliases("t"))
def t(input):
    if input.dim() < 2:
        return input
    return transpose(input, 0, 1)


@register(torch.Tensor.T.__get__, torch.Tensor.mT.__get__, *aliases("adjoint"),
          torch.Tensor.mH.__get__, torch.Tensor.H.__get__)
def _T(input):
    if input.dim() < 2:
        return input
    return transpose(input, -2, -1)


@register(*aliases("movedim"), *aliases("moveaxis"))
def movedim(input, source, destination):
    nd = input.dim()
    src = [source] if isinstance(source, int) else list(source)
    dst = [destination] if isinstance(destination, int) else list(destination)
    return make_jet(input._coeffs.movedim([_dims(s, nd) + 1 for s in src],
                                          [_dims(d, nd) + 1 for d in dst]), input._order, is_view=True)


def _basic_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool)
               for i in items)


@register(torch.Tensor.__getitem__)
def getitem(input, idx):
    if is_jet(idx):
        raise JetError("indexing with a jet (a differentiable float index) is not defined")
    if _basic_index(idx):
        items = idx if isinstance(idx, tuple) else (idx,)
        return make_jet(input._coeffs[(slice(None),) + items], input._order, is_view=True)
    idx = primals(idx)
    return per_coefficient(lambda c: c[idx], (input,), {}, is_view=True)


@register(torch.Tensor.__setitem__)
def setitem(input, idx, value):
    if not is_jet(input):
        raise JetError("assigning a jet into a plain tensor cannot store its Taylor coefficients; "
                       "build the tensor out of place (torch.cat, torch.where, torch.stack)")
    if input._is_view:
        raise JetError("item assignment into a view of a jet would not reach the tensor it views")
    order_of(input, value)  # raises for jets of different orders
    idx = primals(idx)
    c = input._coeffs
    vc = value._coeffs if is_jet(value) else torch.as_tensor(value, dtype=c.dtype, device=c.device).unsqueeze(0)
    n = max(c.shape[0], vc.shape[0])
    from ._common import pad_coeffs
    new = pad_coeffs(c, n).clone()
    vc = pad_coeffs(vc, n)
    for k in range(n):
        new[k][idx] = vc[k]
    input._coeffs = new
    return None


_LINEAR_STRUCTURAL = [
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "chunk", "split",
    "tensor_split", "unbind", "narrow", "select", "index_select", "gather", "take_along_dim",
    "flip", "fliplr", "flipud", "roll", "rot90", "repeat", "tile", "repeat_interleave", "diagonal",
    "diag", "diag_embed", "tril", "triu", "cumsum", "trace", "unfold", "as_strided",
    "take", "masked_select", "index_add", "scatter", "scatter_add", "index_copy", "index_fill",
    "slice_scatter", "select_scatter", "diagonal_scatter", "kron", "block_diag",
]


def _structural(func):
    def rule(*args, **kwargs):
        return per_coefficient(func, args, kwargs)
    rule.__doc__ = f"{getattr(func, '__name__', func)}: linear, applied to every coefficient."
    return rule


for _name in _LINEAR_STRUCTURAL:
    for _f in aliases(_name):
        register(_f)(_structural(_f))

for _f in (F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, F.fold, F.unfold, torch.Tensor.unflatten):
    if _f is not None:
        register(_f)(_structural(_f) if _f is not torch.Tensor.unflatten else
                     _order_preserving(torch.Tensor.unflatten))


@register(F.pad, torch._C._nn.pad)
def pad(input, pad, mode: str = "constant", value=None):
    """Padding is linear; a non-zero constant fill value is a constant, so coefficient 0 only."""
    c = input._coeffs
    n1 = c.shape[0]
    if mode == "constant":
        first = F.pad(c[0], pad, mode, value)
        rest = F.pad(c[1:], pad, mode, 0.0) if n1 > 1 else None
        out = first.unsqueeze(0) if rest is None else torch.cat([first.unsqueeze(0), rest])
        return make_jet(out, input._order)
    # reflect/replicate/circular: fold the coefficient axis into the batch axis
    batched = c.reshape((n1 * c.shape[1],) + tuple(c.shape[2:])) if input.dim() >= 2 else c
    out = F.pad(batched, pad, mode)
    out = out.reshape((n1, c.shape[1]) + tuple(out.shape[1:])) if input.dim() >= 2 else out
    return make_jet(out, input._order)


# -- copies and conversions ---------------------------------------------------------------------

@register(*aliases("clone"), *aliases("contiguous"))
def clone(input, *args, **kwargs):
    return make_jet(input._coeffs.clone() if kwargs.get("memory_format") is None
                    else input._coeffs.clone(), input._order)


@register(*aliases("detach"))
def detach(input):
    """A detached jet is a constant along the path too, as in the nested-autograd oracle."""
    return input._coeffs[0].detach()


def _to_dtype(input, dtype):
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        return input._coeffs[0].to(dtype)
    return make_jet(input._coeffs.to(dtype), input._order)


@register(torch.Tensor.to)
def to(input, *args, **kwargs):
    """A move to another device or float dtype moves every coefficient; a cast to an integer or
    bool dtype gives a constant (the values are piecewise constant along the path)."""
    c = input._coeffs.to(*args, **kwargs)
    if not (c.dtype.is_floating_point or c.dtype.is_complex):
        return c[0]
    return make_jet(c, input._order)


for _name, _dtype in (("float", torch.float32), ("double", torch.float64), ("half", torch.float16),
                      ("bfloat16", torch.bfloat16)):
    register(getattr(torch.Tensor, _name))(lambda input, *a, _d=_dtype, **k: _to_dtype(input, _d))
for _name, _dtype in (("long", torch.int64), ("int", torch.int32), ("bool", torch.bool),
                      ("short", torch.int16), ("byte", torch.uint8)):
    register(getattr(torch.Tensor, _name))(lambda input, *a, _d=_dtype, **k: input._coeffs[0].to(_d))


@register(torch.Tensor.type_as)
def type_as(input, other):
    if not is_jet(input):
        return input.type_as(primal(other))
    return _to_dtype(input, other.dtype)


@register(torch.Tensor.cpu)
def cpu(input, *args, **kwargs):
    return make_jet(input._coeffs.cpu(), input._order)


@register(torch.Tensor.cuda)
def cuda(input, *args, **kwargs):
    return make_jet(input._coeffs.cuda(*args, **kwargs), input._order)


@register(torch.Tensor.requires_grad_)
def requires_grad_(input, requires_grad: bool = True):
    return input


def _make_like(func):
    def rule(*args, **kwargs):
        return func(*primals(args), **primals(kwargs))
    return rule


for _name in ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
              "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
    for _f in aliases(_name):
        register(_f)(_make_like(_f))
