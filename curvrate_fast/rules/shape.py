"""Taylor rules for shape and layout ops: views, reshapes, permutations, indexing, concatenation,
padding, splitting, dtype/device moves (docs/math.md §2: linear maps act on every coefficient).

Ops that keep the element order (view, reshape, flatten, squeeze, ...) reshape the stacked
coefficients directly; permutations shift their dims past the coefficient axis; everything else
runs once over all coefficients with ``torch.vmap``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..jets.draws import shared_draw
from ..jets.registry import register
from ..jets.tensor import primals
from ._common import JetError, aliases, is_jet, make_jet, order_of, per_coefficient, primal, sizes_arg


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


for _name in ("reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
              "reshape_as", "ravel"):
    register(*aliases(_name))(_order_preserving(getattr(torch.Tensor, _name)))
_view_shape = _order_preserving(torch.Tensor.view)


@register(*aliases("view"))
def view(input, *args, **kwargs):
    """``view(shape)``: same element order, every coefficient reshaped. ``view(dtype)`` reinterprets
    the bits: to the same dtype nothing changes; to an integer or bool dtype the bits are piecewise
    constant along the path (a constant); to another floating dtype the result is not a smooth
    function of the values, so it is refused."""
    dtype = args[0] if len(args) == 1 and isinstance(args[0], torch.dtype) else kwargs.get("dtype")
    if dtype is None:
        return _view_shape(input, *args, **kwargs)
    if dtype == input.dtype:
        return input
    if dtype.is_floating_point or dtype.is_complex:
        raise JetError(f"Tensor.view({dtype}) of a {input.dtype} jet reinterprets the bits of its values, "
                       "which is not a smooth function of them; use .to(dtype) for a cast")
    return input._coeffs[0].view(dtype)


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
def permute(input, *args, dims=None):
    dims = sizes_arg(args, dims)
    nd = input.dim()
    return make_jet(input._coeffs.permute(0, *[_dims(d, nd) + 1 for d in dims]), input._order,
                    is_view=True)


@register(*aliases("transpose"), *aliases("swapdims"))
def transpose(input, dim0, dim1):
    nd = input.dim()
    return make_jet(input._coeffs.transpose(_dims(dim0, nd) + 1, _dims(dim1, nd) + 1),
                    input._order, is_view=True)


@register(*aliases("swapaxes"))
def swapaxes(input, axis0, axis1):
    """transpose under numpy's names."""
    return transpose(input, axis0, axis1)


@register(*aliases("t"))
def t(input):
    if input.dim() < 2:
        return input
    return transpose(input, 0, 1)


# the conjugate transposes (mH, H, adjoint) are in rules/complex.py
@register(torch.Tensor.T.__get__, torch.Tensor.mT.__get__)
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
    if not input.writable():
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
    input.assign(new)          # a view's write reaches its base (JetTensor.assign)
    return None


# (narrow, tensor_split, as_strided, scatter and index_fill have their own rules in scatter.py:
# tensor arguments, storage windows, constant fill values)
_LINEAR_STRUCTURAL = [
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "chunk", "split",
    "unbind", "select", "index_select", "gather", "take_along_dim",
    "flip", "fliplr", "flipud", "roll", "rot90", "repeat", "tile", "repeat_interleave", "diagonal",
    "diag", "diag_embed", "diagflat", "tril", "triu", "trace", "unfold",
    "take", "masked_select", "index_add", "scatter_add", "index_copy",
    "slice_scatter", "select_scatter", "diagonal_scatter", "block_diag",
]


def _structural(func):
    def rule(*args, **kwargs):
        return per_coefficient(func, args, kwargs)
    rule.__doc__ = f"{getattr(func, '__name__', func)}: linear, applied to every coefficient."
    return rule


for _name in _LINEAR_STRUCTURAL:
    for _f in aliases(_name):
        register(_f)(_structural(_f))

for _f in (F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, F.fold, F.unfold):
    register(_f)(_structural(_f))


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

@register(*aliases("clone"))
def clone(input, *args, **kwargs):
    return make_jet(input._coeffs.clone(), input._order)


@register(*aliases("contiguous"))
def contiguous(input, *args, **kwargs):
    """contiguous: the jet itself where its coefficients are already laid out contiguously (as
    PyTorch returns the tensor itself: a write into the result is a write into it), else a copy."""
    return input if input._coeffs.is_contiguous() else make_jet(input._coeffs.clone(), input._order)


@register(*aliases("detach"))
def detach(input):
    """A detached jet is a constant along the path too, as in the nested-autograd oracle; the
    plain tensor follows the jet's later in-place writes, as PyTorch's shares the storage
    (JetTensor.detached)."""
    return input.detached()


def _cast(input, dtype: torch.dtype):
    """A cast is linear (docs/math.md §2): every coefficient is cast; the derivative of a cast is 1, as in
    autograd, also to lower precision (each coefficient then carries that precision's rounding).
    A cast to an integer or bool dtype is piecewise constant along the path: a constant."""
    if not is_jet(input):
        return input.to(dtype)
    if not (dtype.is_floating_point or dtype.is_complex):
        return input._coeffs[0].to(dtype)
    if input.dtype.is_complex and not dtype.is_complex:
        raise JetError(f"casting a complex jet to {dtype} discards the imaginary part; use .real "
                       "(or torch.view_as_real) to say which part you mean")
    if dtype == input.dtype:
        return input
    return make_jet(input._coeffs.to(dtype), input._order)


_to_dtype = _cast


def _to_target(args, kwargs):
    """(device, dtype, memory_format, copy) of a Tensor.to call, parsed the way torch parses it."""
    args = list(primals(args))
    kwargs = dict(primals(kwargs))
    memory_format = kwargs.pop("memory_format", None)
    copy = kwargs.pop("copy", False)
    kwargs.pop("non_blocking", None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    if kwargs:
        raise TypeError(f"Tensor.to() got unexpected keyword arguments {sorted(kwargs)}")
    for a in args:
        if isinstance(a, Tensor):
            device, dtype = a.device, a.dtype
        elif isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
            device = torch.device(a)
        elif isinstance(a, bool):  # positional non_blocking / copy
            pass
        elif a is None:
            pass
        else:
            raise TypeError(f"Tensor.to() got an argument of type {type(a).__name__}")
    return device, dtype, memory_format, copy


@register(torch.Tensor.to)
def to(input, *args, **kwargs):
    """A move to another device or dtype moves/casts every coefficient (a cast is linear); a cast
    to an integer or bool dtype gives a constant. A memory format is a layout, not a value: it is
    checked on the primal (so the same shapes are refused as by torch) and otherwise ignored, since
    the coefficients' layout is the engine's own."""
    device, dtype, memory_format, copy = _to_target(args, kwargs)
    if memory_format is not None:
        torch.empty(input.shape, device="meta").to(memory_format=memory_format)
    out = input
    if device is not None and torch.device(device) != input.device:
        out = make_jet(out._coeffs.to(device), out._order)
    if dtype is not None:
        out = _cast(out, dtype)
    if copy and out is input:
        out = make_jet(input._coeffs.clone(), input._order)
    return out


_TYPE_NAMES = {
    "torch.FloatTensor": torch.float32, "torch.DoubleTensor": torch.float64,
    "torch.HalfTensor": torch.float16, "torch.BFloat16Tensor": torch.bfloat16,
    "torch.LongTensor": torch.int64, "torch.IntTensor": torch.int32, "torch.ShortTensor": torch.int16,
    "torch.CharTensor": torch.int8, "torch.ByteTensor": torch.uint8, "torch.BoolTensor": torch.bool,
    "torch.ComplexFloatTensor": torch.complex64, "torch.ComplexDoubleTensor": torch.complex128,
}


@register(torch.Tensor.type)
def type_(input, dtype=None, non_blocking: bool = False, **kwargs):
    """``x.type()`` is the type name (a constant); ``x.type(dtype)`` a cast (HF GPT-2's eager
    attention calls ``attn_weights.type(value.dtype)``)."""
    if dtype is None:
        return primal(input).type()
    if isinstance(dtype, str):
        name = dtype.replace("torch.cuda.", "torch.")
        if name not in _TYPE_NAMES:
            raise ValueError(f"invalid type: {dtype!r}")
        out = _cast(input, _TYPE_NAMES[name])
        if dtype.startswith("torch.cuda.") and is_jet(out):
            out = make_jet(out._coeffs.cuda(), out._order)
        return out
    return _cast(input, dtype)


for _name, _dtype in (("float", torch.float32), ("double", torch.float64), ("half", torch.float16),
                      ("bfloat16", torch.bfloat16), ("long", torch.int64), ("int", torch.int32),
                      ("bool", torch.bool), ("short", torch.int16), ("byte", torch.uint8),
                      ("char", torch.int8)):
    register(getattr(torch.Tensor, _name))(
        lambda input, *a, _d=_dtype, **k: _cast(input, _d))


@register(torch.Tensor.type_as)
def type_as(input, other):
    return _cast(input, primal(other).dtype)


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


def _random_like(func):
    """A random factory shaped like a jet: a constant draw, shared by the polarization rows of a
    pass with per-order directions (jets/draws.py)."""
    def rule(input, *args, **kwargs):
        rest, kw = primals(args), primals(kwargs)
        return shared_draw(primal(input), lambda t: func(t, *rest, **kw), func.__name__)
    return rule


for _name in ("zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty",
              "new_full", "new_tensor", "new", "new_empty_strided"):
    for _f in aliases(_name):
        register(_f)(_make_like(_f))
for _name in ("rand_like", "randn_like", "randint_like"):
    for _f in aliases(_name):
        register(_f)(_random_like(_f))


def _resize_into(input, shape):
    """resize_: the first numel(shape) elements in row-major order keep their values; when the
    tensor grows, the new elements are uninitialized memory, which has no derivative."""
    if not is_jet(input):
        raise JetError("resize_ of a plain tensor to a jet's shape cannot hold Taylor coefficients")
    if input._is_view:
        raise JetError("resize_ on a view of a jet would not reach the tensor it views")
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    if n > input.numel():
        raise JetError(f"resize_ of a jet from {input.numel()} to {n} elements: the new elements are "
                       "uninitialized memory, which has no Taylor coefficients; build the larger "
                       "tensor out of place (torch.cat, F.pad)")
    c = input._coeffs
    input._coeffs = c.reshape(c.shape[0], -1)[:, :n].reshape((c.shape[0],) + shape).clone()
    # the wrapper's own size must follow: a new wrapper is not possible in place, so refuse a
    # shape change the wrapper cannot express
    if tuple(input.shape) != shape:
        raise JetError("resize_ that changes a jet's shape in place is not supported (the tensor "
                       "object keeps its shape); use .reshape()/.view() or slicing instead")
    return input


@register(torch.Tensor.resize_, getattr(torch, "resize_", None))
def resize_(input, *args, size=None, memory_format=None):
    return _resize_into(input, sizes_arg(args, size))


@register(torch.Tensor.resize_as_, torch.resize_as_)
def resize_as_(input, the_template, memory_format=None):
    return _resize_into(input, tuple(the_template.shape))
