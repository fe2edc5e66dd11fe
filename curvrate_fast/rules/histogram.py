"""Taylor rules for histograms: ``torch.histogram`` and ``torch.histogramdd``.

A histogram has two outputs that move differently along the path x(t):

- the **bin edges**: given edges are returned as they are (a jet if they are one); with a number
  of bins and no range they are ``linspace(min x, max x, bins + 1)``, i.e. lo + (hi − lo)·j/bins with
  lo, hi the jets of the smallest and largest input (coefficients at the primal's extreme
  elements, as for ``amin``/``amax``);
- the **counts**: which bin an element falls in is decided by the primal (a piecewise-constant
  choice), so unweighted counts are constants; with weights, hist_b = Σ_{i in b} w_i is linear in
  the weight jets; with ``density=True`` it is divided by (Σ_b hist_b)·(bin volume), the volume a
  product of edge differences (jets when the edges move).

``torch.histc`` returns counts only and stays a constant (``dispatcher.py``).
"""
from __future__ import annotations

import builtins
from typing import List, Optional

import torch
from torch import Tensor

from ..jets.registry import register
from ._common import JetError, is_jet, primal


def _edge_jets(x, dim_col: Optional[int], bins: int, range_):
    """Edges of ``bins`` equal bins over [lo, hi] (the data's range, or ``range_``)."""
    col = x if dim_col is None else x[..., dim_col]
    col = col.reshape(-1)
    if range_ is not None:
        lo, hi = float(range_[0]), float(range_[1])
        t = torch.linspace(0.0, 1.0, bins + 1, dtype=x.dtype, device=primal(x).device)
        return lo + (hi - lo) * t
    if col.numel() == 0:
        lo, hi = torch.zeros((), dtype=x.dtype), torch.zeros((), dtype=x.dtype)
    else:
        lo, hi = col.amin(), col.amax()
    if bool(primal(lo) == primal(hi)):  # torch widens an empty range by 0.5 on each side
        lo, hi = lo - 0.5, hi + 0.5
    t = torch.linspace(0.0, 1.0, bins + 1, dtype=x.dtype, device=primal(x).device)
    return lo + (hi - lo) * t


def _bin_index(x0: Tensor, edges0: Tensor) -> (Tensor, Tensor):
    """(bin index, in-range mask) of each element for the primal edges, as torch bins them:
    [e_b, e_{b+1}) with the last bin closed on the right."""
    nb = edges0.numel() - 1
    idx = torch.searchsorted(edges0.contiguous(), x0.contiguous(), right=True) - 1
    idx = torch.where(x0 == edges0[-1], torch.full_like(idx, nb - 1), idx)
    inside = (x0 >= edges0[0]) & (x0 <= edges0[-1])
    return idx.clamp(0, nb - 1), inside


def _weighted_counts(flat_bin: Tensor, inside: Tensor, weight, nbins: int, ref: Tensor):
    """Σ_{i in b} w_i (or the counts), as a jet when the weights are one."""
    if weight is None:
        return None
    w = weight.reshape(-1)
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    w = torch.where(inside.reshape(-1), w, zero)
    out = torch.zeros(nbins, dtype=ref.dtype, device=ref.device)
    return out.index_add(0, flat_bin.reshape(-1), w)


@register(torch.histogram, torch.Tensor.histogram)
def histogram(input, bins=100, *, range=None, weight=None, density: bool = False, out=None):
    x0 = primal(input)
    if isinstance(bins, Tensor):  # explicit edges: no range argument (torch refuses one)
        h0, e0 = torch.histogram(x0, primal(bins), weight=primal(weight), density=density)
    else:
        h0, e0 = torch.histogram(x0, bins, range=range, weight=primal(weight), density=density)
    if isinstance(bins, Tensor):
        edges = bins
    else:
        edges = _edge_jets(input, None, int(bins), range) if is_jet(input) else e0
    if not (is_jet(weight) or (density and is_jet(edges))):
        hist = h0  # the counts (or constant weighted counts) do not move
        return torch.return_types.histogram((hist, edges))
    idx, inside = _bin_index(x0.reshape(-1), e0)
    nb = e0.numel() - 1
    w = weight if weight is not None else torch.ones_like(x0)
    counts = _weighted_counts(idx, inside, w, nb, e0)
    if density:
        widths = edges[1:] - edges[:-1]
        counts = counts / (counts.sum() * widths)
    if bool((primal(counts) - h0).abs().max() > 1e-9 * (1 + h0.abs().max())):
        raise JetError("torch.histogram: binning the primal reproduces torch's counts only up to "
                       "rounding at a bin edge here; an element on an edge has no derivative")
    return torch.return_types.histogram((counts, edges))


@register(torch.histogramdd)
def histogramdd(input, bins=10, *, range=None, weight=None, density: bool = False, out=None):
    x0 = primal(input)
    D = x0.shape[-1]
    res0 = torch.histogramdd(x0, [primal(b) for b in bins] if isinstance(bins, (list, tuple)) and
                             bins and isinstance(bins[0], Tensor) else bins,
                             range=range, weight=primal(weight), density=density)
    h0, e0 = res0.hist, list(res0.bin_edges)
    if isinstance(bins, (list, tuple)) and bins and isinstance(bins[0], Tensor):
        edges: List = list(bins)
    elif is_jet(input):
        nbins = [int(bins)] * D if isinstance(bins, int) else [int(b) for b in bins]
        ranges = [None] * D if range is None else [range[2 * d:2 * d + 2] for d in builtins.range(D)]
        edges = [_edge_jets(input.reshape(-1, D), d, nbins[d], ranges[d]) for d in builtins.range(D)]
    else:
        edges = e0
    moving_edges = any(is_jet(e) for e in edges)
    if not (is_jet(weight) or (density and moving_edges)):
        return torch.return_types.histogramdd((h0, tuple(edges)))
    pts = x0.reshape(-1, D)
    flat = torch.zeros(pts.shape[0], dtype=torch.long, device=x0.device)
    inside = torch.ones(pts.shape[0], dtype=torch.bool, device=x0.device)
    shape = [e.numel() - 1 for e in e0]
    for d in builtins.range(D):
        idx, ins = _bin_index(pts[:, d], e0[d])
        flat = flat * shape[d] + idx
        inside &= ins
    w = weight if weight is not None else torch.ones(pts.shape[0], dtype=x0.dtype, device=x0.device)
    counts = _weighted_counts(flat, inside, w, int(torch.tensor(shape).prod()), x0).reshape(shape)
    if density:
        vol = None
        for d in builtins.range(D):
            wd = edges[d][1:] - edges[d][:-1]
            wd = wd.reshape([-1 if i == d else 1 for i in builtins.range(D)])
            vol = wd if vol is None else vol * wd
        counts = counts / (counts.sum() * vol)
    if bool((primal(counts) - h0).abs().max() > 1e-9 * (1 + h0.abs().max())):
        raise JetError("torch.histogramdd: binning the primal reproduces torch's counts only up to "
                       "rounding at a bin edge here; an element on an edge has no derivative")
    return torch.return_types.histogramdd((counts, tuple(edges)))
