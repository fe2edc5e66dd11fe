"""Taylor rules for resampling and index-based ops of ``torch.nn.functional``: interpolate and the
ATen upsample kernels, grid_sample and affine_grid, embedding and embedding_bag, max_unpool,
fractional max pooling, constant_pad_nd and local_response_norm.

Most of these are linear in their floating input for fixed sizes, indices or sampling grid: every
coefficient goes through the op once, with the coefficient axis folded into the batch axis (one
call; constant companions such as a grid or indices are repeated along it). The exceptions:

- grid_sample with a jet grid: the output is a piecewise polynomial of the grid (bilinear weights
  are products of affine functions of the sampling point, bicubic ones cubic polynomials); the
  piece (the cell and the padding branch) is fixed by the primal grid, and the weights are
  computed as jets, so the rule is exact in both the input and the grid;
- max-type selections (embedding_bag 'max', fractional max pooling): coefficients at the primal's
  argmax, as max pooling;
- local_response_norm: a composition of ops with rules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..jets.registry import register
from ._common import JetError, is_jet, make_jet, primal
from .activations import piecewise_quadratic
from .pooling import _gather_pool

# -- folding the coefficient axis into the batch axis --------------------------------------------

def _fold(c: Tensor, nd: int):
    """Coefficients (n+1, *shape) of an input with ``nd`` spatial dims as one batch: a batched input
    (N, C, *spatial) becomes ((n+1)·N, C, *spatial); an unbatched one (C, *spatial) takes the
    coefficient axis as its batch. Returns (batch, lead) with lead the shape to unfold with."""
    if c.dim() - 1 == nd + 2:
        return c.reshape((c.shape[0] * c.shape[1],) + tuple(c.shape[2:])), tuple(c.shape[:2])
    return c, None


def _unfold(out: Tensor, lead):
    return out if lead is None else out.reshape(tuple(lead) + tuple(out.shape[1:]))


def _repeat_batch(t: Tensor, n1: int, lead) -> Tensor:
    """A constant companion (grid, indices) for the folded batch: repeated n+1 times along the
    batch axis, or given the coefficient axis as its batch for an unbatched input."""
    if lead is None:
        return t.unsqueeze(0).expand((n1,) + tuple(t.shape))
    return t.repeat((n1,) + (1,) * (t.dim() - 1))


def _batch_linear(fn, nd: int):
    """The rule of an op that is linear in its first argument and acts on each batch element alone
    (``nd`` spatial dims)."""
    def rule(input, *args, **kwargs):
        flat, lead = _fold(input._coeffs, nd)
        return make_jet(_unfold(fn(flat, *args, **kwargs), lead), input._order)
    rule.__doc__ = (f"{getattr(fn, '__name__', fn)}: linear in the input, every coefficient in one "
                    "call (coefficients folded into the batch axis).")
    return rule


# -- interpolate / upsample -------------------------------------------------------------------------

@register(F.interpolate)
def interpolate(input, size=None, scale_factor=None, mode: str = "nearest", align_corners=None,
                recompute_scale_factor=None, antialias: bool = False):
    """Every mode (nearest, nearest-exact, linear, bilinear, bicubic, trilinear, area, antialiased)
    is linear in the input for fixed sizes and scales and treats batch elements alone: every
    coefficient through one call, folded into the batch axis."""
    c = input._coeffs
    if c.dim() - 1 not in (3, 4, 5):  # F.interpolate's own error for other ranks
        F.interpolate(c[0], size, scale_factor, mode, align_corners, recompute_scale_factor,
                      antialias)
        raise JetError(f"F.interpolate: a {c.dim() - 1}-d input jet (batched 3-d to 5-d expected)")
    flat, lead = _fold(c, c.dim() - 3)
    out = F.interpolate(flat, size, scale_factor, mode, align_corners, recompute_scale_factor,
                        antialias)
    return make_jet(_unfold(out, lead), input._order)


for _name, _nd in (("upsample_nearest1d", 1), ("upsample_nearest2d", 2), ("upsample_nearest3d", 3),
                   ("_upsample_nearest_exact1d", 1), ("_upsample_nearest_exact2d", 2),
                   ("_upsample_nearest_exact3d", 3), ("upsample_linear1d", 1),
                   ("upsample_bilinear2d", 2), ("upsample_bicubic2d", 2),
                   ("upsample_trilinear3d", 3), ("_upsample_bilinear2d_aa", 2),
                   ("_upsample_bicubic2d_aa", 2), ("reflection_pad1d", 1), ("reflection_pad2d", 2),
                   ("reflection_pad3d", 3), ("replication_pad1d", 1), ("replication_pad2d", 2),
                   ("replication_pad3d", 3)):
    for _fn in (getattr(torch._C._nn, _name, None), getattr(torch.ops.aten, _name, None)):
        if _fn is not None:
            register(_fn)(_batch_linear(_fn, _nd))


@register(torch.constant_pad_nd)
def constant_pad_nd(input, pad, value=0):
    """Padding is linear; the fill value is a constant, so it enters coefficient 0 only."""
    c = input._coeffs
    first = torch.constant_pad_nd(c[0], pad, value).unsqueeze(0)
    if c.shape[0] == 1:
        return make_jet(first, input._order)
    rest = torch.stack([torch.constant_pad_nd(x, pad, 0.0) for x in c[1:].unbind(0)])
    return make_jet(torch.cat([first, rest]), input._order)


# -- max_unpool, fractional max pooling, max-pool backward --------------------------------------

def _unpool_rule(fn, nd: int):
    def rule(input, indices, *args, **kwargs):
        c = input._coeffs
        n1 = c.shape[0]
        flat, lead = _fold(c, nd)
        idx = _repeat_batch(primal(indices), n1, lead)
        return make_jet(_unfold(fn(flat, idx, *args, **kwargs), lead), input._order)
    rule.__doc__ = (f"{fn.__name__}: linear in the input for fixed indices (a scatter), every "
                    "coefficient in one call.")
    return rule


for _fn, _nd in ((F.max_unpool1d, 1), (F.max_unpool2d, 2), (F.max_unpool3d, 3),
                 (torch._C._nn.max_unpool2d, 2), (torch._C._nn.max_unpool3d, 3)):
    register(_fn)(_unpool_rule(_fn, _nd))


def _fractional_rule(nd: int, returns: str):
    with_indices = getattr(F, f"fractional_max_pool{nd}d_with_indices")

    def rule(input, kernel_size, output_size=None, output_ratio=None, return_indices=False,
             _random_samples=None):
        """Fractional max pooling: the pooling regions come from random samples, drawn once by the
        plain op on the primal (the same draw as a plain call; given samples are used as they are
        and only select regions, so their derivatives do not enter); every coefficient is then
        taken at the primal's argmax in its region."""
        _, idx = with_indices(primal(input), kernel_size, output_size, output_ratio, True,
                              primal(_random_samples))
        out = _gather_pool(input, idx, nd)
        if returns == "pair" or (returns == "flag" and return_indices):
            return out, idx
        return out
    return rule


for _nd in (2, 3):
    register(getattr(F, f"fractional_max_pool{_nd}d"))(_fractional_rule(_nd, "flag"))
    register(getattr(F, f"fractional_max_pool{_nd}d_with_indices"))(_fractional_rule(_nd, "pair"))
    register(getattr(F, f"_fractional_max_pool{_nd}d"))(_fractional_rule(_nd, "out"))


def _fractional_aten(nd: int):
    fn = getattr(torch._C._nn, f"fractional_max_pool{nd}d")

    def rule(input, kernel_size, output_size, random_samples):
        _, idx = fn(primal(input), kernel_size, output_size, primal(random_samples))
        return _gather_pool(input, idx, nd), idx
    rule.__doc__ = f"{fn.__name__}: every coefficient at the primal's argmax in its region."
    return fn, rule


for _nd in (2, 3):
    _f, _r = _fractional_aten(_nd)
    register(_f)(_r)


# -- grid_sample / affine_grid --------------------------------------------------------------------

_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
_CUBIC_A = -0.75


@register(F.grid_sample)
def grid_sample(input, grid, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners=None):
    """See :func:`grid_sampler`."""
    if mode not in _MODES:
        raise ValueError(f"nn.functional.grid_sample(): expected mode to be 'bilinear', 'nearest' or "
                         f"'bicubic', but got: '{mode}'")
    if padding_mode not in _PADDINGS:
        raise ValueError("nn.functional.grid_sample(): expected padding_mode to be 'zeros', 'border', "
                         f"or 'reflection', but got: '{padding_mode}'")
    return _grid_sampler(torch.grid_sampler, input, grid, _MODES[mode], _PADDINGS[padding_mode],
                         bool(align_corners))


def _grid_rule(op):
    def rule(input, grid, interpolation_mode: int, padding_mode: int, align_corners: bool):
        return _grid_sampler(op, input, grid, interpolation_mode, padding_mode, align_corners)
    rule.__doc__ = f"{op.__name__}: see resample._grid_sampler."
    return rule


for _op in (torch.grid_sampler, torch.grid_sampler_2d, torch.grid_sampler_3d,
            torch._grid_sampler_2d_cpu_fallback):
    register(_op)(_grid_rule(_op))


def _grid_sampler(op, input, grid, mode: int, padding: int, align_corners: bool):
    """grid_sample. For a constant grid (or nearest mode, where the grid only picks pixels) the op is
    linear in the input: every coefficient in one call. For a jet grid (bilinear, bicubic) the
    output Σ_taps w_tap(x) · input[tap] is computed from the weights as jets of the sampling point x
    (an affine function of the grid on the primal's cell and padding branch) and the tap values
    gathered from the input (a jet or not), so products of jets give the exact coefficients."""
    x0, g0 = primal(input), primal(grid)
    value = op(x0, g0, mode, padding, align_corners)
    if not is_jet(grid) or mode == 1:
        if not is_jet(input):
            return value
        c = input._coeffs
        n1 = c.shape[0]
        flat = c.reshape((n1 * c.shape[1],) + tuple(c.shape[2:]))
        out = op(flat, g0.repeat((n1,) + (1,) * (g0.dim() - 1)), mode, padding, align_corners)
        return make_jet(out.reshape((n1,) + tuple(value.shape)), input._order)
    nd = g0.shape[-1]
    sizes = list(x0.shape[2:])[::-1]           # W, H(, D): the grid's x, y(, z) axes
    out = None
    if mode == 0:
        axes = []
        for a in range(nd):
            ix = _source_index(grid[..., a], sizes[a], padding, align_corners)
            lo = torch.floor(primal(ix))
            t = ix - lo
            axes.append([(lo, 1 - t), (lo + 1, t)])
        taps = _product(axes)
    elif mode == 2 and nd == 2:
        axes = []
        for a in range(nd):
            ix = _unnormalize(grid[..., a], sizes[a], align_corners)
            lo = torch.floor(primal(ix))
            t = ix - lo
            w = [_cubic2(t + 1), _cubic1(t), _cubic1(1 - t), _cubic2(2 - t)]
            axes.append([(_bounded(lo - 1 + i, sizes[a], padding, align_corners), w[i])
                         for i in range(4)])
        taps = _product(axes)
    else:
        return value  # the plain op raised for an unsupported mode already
    for pos, weight in taps:
        v = _gather_at(input, pos, sizes)
        term = weight.unsqueeze(1) * v
        out = term if out is None else out + term
    c = out._coeffs
    return make_jet(torch.cat([value.unsqueeze(0), c[1:]]), out._order)


def _unnormalize(g, size: int, align_corners: bool):
    """Grid coordinate in [−1, 1] → pixel coordinate (PyTorch's grid_sampler_unnormalize)."""
    if align_corners:
        return (g + 1) / 2 * (size - 1)
    return ((g + 1) * size - 1) / 2


def _source_index(g, size: int, padding: int, align_corners: bool):
    """The sampling coordinate as a jet: unnormalize, then (border) clip or (reflection) reflect and
    clip. Clip and reflect are piecewise affine: slope 0 where clipped (the borders count as
    clipped, as PyTorch's clip_coordinates_set_grad), ±1 per reflection."""
    ix = _unnormalize(g, size, align_corners)
    if padding == 2:
        x0 = primal(ix)
        if align_corners:
            lo2, hi2 = 0, 2 * (size - 1)
        else:
            lo2, hi2 = -1, 2 * size - 1
        if lo2 == hi2:
            ix = piecewise_quadratic(ix, torch.zeros_like(x0), torch.zeros_like(x0))
        else:
            mn, span = lo2 / 2, (hi2 - lo2) / 2
            d = x0 - mn
            sgn = torch.where(d < 0, -1.0, 1.0).to(x0.dtype)
            a = d.abs()
            extra = torch.fmod(a, span)
            even = torch.remainder(torch.floor(a / span), 2) == 0
            val = torch.where(even, extra + mn, span - extra + mn)
            ix = piecewise_quadratic(ix, val, torch.where(even, sgn, -sgn))
    if padding in (1, 2):
        x0 = primal(ix)
        inside = (x0 > 0) & (x0 < size - 1)
        ix = piecewise_quadratic(ix, x0.clamp(0, size - 1), inside)
    return ix


def _bounded(p: Tensor, size: int, padding: int, align_corners: bool) -> Tensor:
    """A bicubic tap's integer pixel position after the padding transform (PyTorch's
    get_value_bounded: compute_coordinates on the integer, then truncation)."""
    if padding == 1:
        p = p.clamp(0, size - 1)
    elif padding == 2:
        lo2, hi2 = (0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)
        if lo2 == hi2:
            p = torch.zeros_like(p)
        else:
            mn, span = lo2 / 2, (hi2 - lo2) / 2
            a = (p - mn).abs()
            extra = torch.fmod(a, span)
            even = torch.remainder(torch.floor(a / span), 2) == 0
            p = torch.where(even, extra + mn, span - extra + mn)
        p = p.clamp(0, size - 1)
    return torch.trunc(p)


def _cubic1(x):
    return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1


def _cubic2(x):
    return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A


def _product(axes):
    """All taps of a separable filter: (positions per axis, weight = product of the axis weights)."""
    taps = [([], None)]
    for axis in axes:
        taps = [(pos + [p], w if wacc is None else wacc * w) for pos, wacc in taps for p, w in axis]
    return taps


def _gather_at(input, pos, sizes):
    """input[n, :, z, y, x] at integer pixel positions (one tensor per axis, x first, shaped like the
    grid without its last axis), 0 outside the image (zeros padding of the taps)."""
    x0 = primal(input)
    N, C = x0.shape[:2]
    inb = torch.ones_like(pos[0], dtype=torch.bool)
    flat = torch.zeros_like(pos[0], dtype=torch.long)
    stride = 1
    for p, s in zip(pos, sizes):
        pl = p.long()
        inb &= (pl >= 0) & (pl < s)
        flat = flat + pl.clamp(0, s - 1) * stride
        stride *= s
    out_shape = tuple(pos[0].shape[1:])
    idx = flat.reshape(N, 1, -1).expand(N, C, flat[0].numel())
    src = input.reshape(N, C, -1)
    v = torch.gather(src, 2, idx).reshape((N, C) + out_shape)
    return v * inb.unsqueeze(1).to(x0.dtype)


def _affine_rule(fn):
    def rule(theta, size, align_corners=None):
        """affine_grid: the grid is base · θᵀ, linear in θ; every coefficient through the op."""
        if not is_jet(theta):
            return fn(theta, size, align_corners)
        outs = [fn(c, size, align_corners) for c in theta._coeffs.unbind(0)]
        return make_jet(torch.stack(outs), theta._order)
    return rule


register(F.affine_grid)(_affine_rule(F.affine_grid))
register(torch.affine_grid_generator)(_affine_rule(torch.affine_grid_generator))


# -- embedding / embedding_bag ------------------------------------------------------------------

def _renorm(weight, indices: Tensor, max_norm: float, norm_type: float):
    """F.embedding's max_norm: every row the indices use whose p-norm exceeds max_norm is scaled to
    max_norm/(‖w‖ + 1e-7) of itself, in place (as torch.embedding_renorm_). The scaled rows are a
    smooth function of the weight on the primal's side of the threshold, so their jets are exact;
    the jet of the weight takes them too, as the plain weight would. (PyTorch renormalizes under
    no_grad, so its autograd ignores the scaling; these are the coefficients of the values.)"""
    from .distances import pnorm
    if not is_jet(weight):
        with torch.no_grad():
            torch.embedding_renorm_(weight, indices, max_norm, norm_type)
        return weight
    if not weight.writable():
        raise JetError("embedding with max_norm renormalizes the weight in place, which cannot reach "
                       "the jet that a view of the weight belongs to; pass the weight itself")
    rows = torch.unique(indices.reshape(-1))
    w = weight[rows]
    n = pnorm(w, norm_type, 1, keepdim=True)
    big = primal(n) > max_norm
    scaled = torch.where(big, w * (torch.reciprocal(n + 1e-7) * max_norm), w)
    new = torch.index_copy(weight, 0, rows, scaled)
    weight.assign(new._coeffs)
    return weight


@register(F.embedding)
def embedding(input, weight, padding_idx=None, max_norm=None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False):
    """Rows of the weight at constant indices: linear in the weight (see torch.embedding)."""
    if padding_idx is not None:
        if padding_idx > 0 and padding_idx >= weight.size(0):
            raise AssertionError("Padding_idx must be within num_embeddings")
        if padding_idx < 0:
            if padding_idx < -weight.size(0):
                raise AssertionError("Padding_idx must be within num_embeddings")
            padding_idx = weight.size(0) + padding_idx
    else:
        padding_idx = -1
    if max_norm is not None:
        weight = _renorm(weight, primal(input).contiguous(), max_norm, norm_type)
    return embedding_aten(weight, input, padding_idx, scale_grad_by_freq, sparse)


@register(torch.embedding)
def embedding_aten(weight, indices, padding_idx: int = -1, scale_grad_by_freq: bool = False,
                   sparse: bool = False):
    """Each coefficient through torch.embedding (so padding_idx and scale_grad_by_freq keep their
    effect on the parameter gradients of every coefficient)."""
    idx = primal(indices)
    if not is_jet(weight):
        return torch.embedding(weight, idx, padding_idx, scale_grad_by_freq, sparse)
    outs = [torch.embedding(c, idx, padding_idx, scale_grad_by_freq, sparse)
            for c in weight._coeffs.unbind(0)]
    return make_jet(torch.stack(outs), weight._order)


@register(F.embedding_bag)
def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2,
                  scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                  per_sample_weights=None, include_last_offset: bool = False, padding_idx=None):
    """Sums, means or maxima of weight rows over bags (see the ATen rule below); the argument
    handling is F.embedding_bag's."""
    indices = primal(input)
    if per_sample_weights is not None and indices.size() != per_sample_weights.size():
        raise ValueError("embedding_bag: If per_sample_weights is not None, then it must have the "
                         "same shape as the input")
    if weight.dim() != 2:
        raise ValueError(f"weight has to be a 2D Tensor, but got Tensor of dimension {weight.dim()}")
    if indices.dim() == 2:
        if offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None, as input is treated is a "
                             "mini-batch of fixed length sequences.")
        offsets = torch.arange(0, indices.numel(), indices.size(1), dtype=indices.dtype,
                               device=indices.device)
        include_last_offset = False
        indices = indices.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    elif indices.dim() == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1D Tensor but got None")
        if offsets.dim() != 1:
            raise ValueError("offsets has to be a 1D Tensor")
    else:
        raise ValueError("input has to be 1D or 2D Tensor, but got Tensor of dimension "
                         f"{indices.dim()}")
    modes = {"sum": 0, "mean": 1, "max": 2}
    if mode not in modes:
        raise ValueError("mode has to be one of sum, mean or max")
    if mode == "max" and (scale_grad_by_freq or sparse):
        raise ValueError("max mode does not support scaling the gradient by the frequency or "
                         "sparse weights")
    if max_norm is not None:
        weight = _renorm(weight, indices, max_norm, norm_type)
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError("embedding_bag: per_sample_weights was not None. "
                                  "per_sample_weights is only supported for mode='sum'")
    return embedding_bag_aten(weight, indices, offsets, scale_grad_by_freq, modes[mode], sparse,
                              per_sample_weights, include_last_offset, padding_idx)[0]


@register(torch.embedding_bag, torch._embedding_bag)
def embedding_bag_aten(weight, indices, offsets, scale_grad_by_freq: bool = False, mode: int = 0,
                       sparse: bool = False, per_sample_weights=None,
                       include_last_offset: bool = False, padding_idx=None):
    """sum/mean: linear in the weight, and (sum) bilinear in (weight, per_sample_weights): the
    coefficients are Cauchy sums Σ_j bag(W_j, p_{k−j}). max: every coefficient at the primal's
    argmax row per bag and column (empty bags stay 0)."""
    idx = primal(indices)
    off = primal(offsets)
    W = weight._coeffs.unbind(0) if is_jet(weight) else [weight]
    P = per_sample_weights._coeffs.unbind(0) if is_jet(per_sample_weights) else [per_sample_weights]
    K = (weight if is_jet(weight) else per_sample_weights)._order
    ref = torch.embedding_bag(W[0], idx, off, scale_grad_by_freq, mode, sparse, P[0],
                              include_last_offset, padding_idx)
    out0, offset2bag, bag_size, max_indices = ref
    if mode == 2:
        c = weight._coeffs
        n1 = c.shape[0]
        pad = -1 if padding_idx is None else padding_idx
        counts = torch.zeros(out0.shape[0], dtype=torch.long, device=idx.device)
        counts.index_add_(0, offset2bag[: idx.numel()], (idx != pad).long())
        keep = (counts > 0).unsqueeze(1).to(c.dtype)
        rows = max_indices.clamp_min(0).unsqueeze(0).expand((n1,) + tuple(max_indices.shape))
        g = torch.gather(c, 1, rows)
        coeffs = torch.cat([out0.unsqueeze(0), g[1:] * keep])
        return make_jet(coeffs, K), offset2bag, bag_size, max_indices

    def bag(w, p):
        return torch.embedding_bag(w, idx, off, scale_grad_by_freq, mode, sparse, p,
                                   include_last_offset, padding_idx)[0]
    out = [out0]
    for k in range(1, min(K + 1, len(W) + len(P) - 1)):
        acc = None
        for j in range(max(0, k - len(P) + 1), min(k, len(W) - 1) + 1):
            term = bag(W[j], P[k - j])
            acc = term if acc is None else acc + term
        out.append(acc)
    return make_jet(out, K), offset2bag, bag_size, max_indices


# -- local response normalization ----------------------------------------------------------------

@register(F.local_response_norm)
def local_response_norm(input, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """x / (k + α·avg_{channel window}(x²))^β, the window average as F's zero-padded average
    pooling over channels (a composition of ops with rules)."""
    dim = input.dim()
    if dim < 3:
        raise ValueError(f"Expected 3D or higher dimensionality input (got {dim} dimensions)")
    if input.numel() == 0:
        return input
    div = input * input
    if dim == 3:
        div = div.unsqueeze(1)
        div = F.pad(div, (0, 0, size // 2, (size - 1) // 2))
        div = F.avg_pool2d(div, (size, 1), stride=1).squeeze(1)
    else:
        sizes = input.size()
        div = div.reshape(sizes[0], 1, sizes[1], sizes[2], -1)
        div = F.pad(div, (0, 0, 0, 0, size // 2, (size - 1) // 2))
        div = F.avg_pool3d(div, (size, 1, 1), stride=1).squeeze(1)
        div = div.reshape(sizes)
    div = torch.pow(div * alpha + k, beta)
    return input / div
