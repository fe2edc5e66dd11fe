"""Taylor rules for pooling: average and adaptive-average pooling are linear (every coefficient
through one call, coefficients folded into the batch axis); max pooling takes every coefficient
at the argmax of the primal window (docs/math.md §2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..jets.registry import register
from ._common import make_jet


def _fold(input, nd: int):
    """(n+1, N, C, *spatial) → ((n+1)·N, C, *spatial); an unbatched input is already a batch."""
    c = input._coeffs
    if input.dim() == nd + 2:
        return c.reshape((c.shape[0] * c.shape[1],) + tuple(c.shape[2:])), c.shape[:2]
    return c, None


def _unfold(out, lead):
    return out if lead is None else out.reshape(tuple(lead) + tuple(out.shape[1:]))


def _linear_pool(fn, nd: int):
    def rule(input, *args, **kwargs):
        flat, lead = _fold(input, nd)
        return make_jet(_unfold(fn(flat, *args, **kwargs), lead), input._order)
    rule.__doc__ = f"{fn.__name__}: linear, every coefficient in one call."
    return rule


for _fn, _nd in ((torch.avg_pool1d, 1), (F.avg_pool2d, 2), (F.avg_pool3d, 3),
                 (F.adaptive_avg_pool1d, 1), (F.adaptive_avg_pool2d, 2), (F.adaptive_avg_pool3d, 3),
                 (torch._C._nn.adaptive_avg_pool2d, 2), (torch._C._nn.adaptive_avg_pool3d, 3)):
    register(_fn)(_linear_pool(_fn, _nd))
# F.avg_pool1d is torch.avg_pool1d and torch.adaptive_avg_pool1d is called by F's: registered above


def _gather_pool(input, indices, nd: int):
    """Coefficients 1..n at the primal's argmax positions (indices flat over the spatial dims)."""
    c = input._coeffs
    flat = c.flatten(start_dim=c.dim() - nd)
    idx = indices.flatten(start_dim=indices.dim() - nd)
    idx = idx.unsqueeze(0).expand((c.shape[0],) + tuple(idx.shape))
    out = torch.gather(flat, -1, idx)
    return make_jet(out.reshape((c.shape[0],) + tuple(indices.shape)), input._order)


_WITH_INDICES = {1: F.max_pool1d_with_indices, 2: F.max_pool2d_with_indices,
                 3: F.max_pool3d_with_indices}
_ADAPTIVE_WITH_INDICES = {1: F.adaptive_max_pool1d_with_indices,
                          2: F.adaptive_max_pool2d_with_indices,
                          3: F.adaptive_max_pool3d_with_indices}


def _max_pool(nd: int, adaptive: bool = False):
    def rule(input, *args, return_indices: bool = False, **kwargs):
        kwargs.pop("return_indices", None)
        # positional return_indices (max_poolNd(input, k, s, p, d, ceil_mode, return_indices))
        args = list(args)
        pos_ri = 1 if adaptive else 5
        if len(args) > pos_ri:
            return_indices = bool(args[pos_ri])
            args = args[:pos_ri]
        fn = (_ADAPTIVE_WITH_INDICES if adaptive else _WITH_INDICES)[nd]
        _, idx = fn(input._coeffs[0], *args, **kwargs)
        out = _gather_pool(input, idx, nd)
        return (out, idx) if return_indices else out
    rule.__doc__ = "max pooling: every coefficient at the argmax of the primal window (docs/math.md §2)."
    return rule


for _nd in (1, 2, 3):
    _r = _max_pool(_nd)
    register(getattr(F, f"max_pool{_nd}d"), getattr(F, f"_max_pool{_nd}d"),
             getattr(F, f"max_pool{_nd}d_with_indices"), getattr(torch, f"max_pool{_nd}d", None))(_r)
    _a = _max_pool(_nd, adaptive=True)
    register(getattr(F, f"adaptive_max_pool{_nd}d"), getattr(F, f"_adaptive_max_pool{_nd}d"),
             getattr(F, f"adaptive_max_pool{_nd}d_with_indices"))(_a)


@register(torch._C._nn.max_pool2d_with_indices)
def _max_pool2d_with_indices_builtin(input, kernel_size, stride=None, padding=0, dilation=1,
                                     ceil_mode=False):
    return _max_pool(2)(input, kernel_size, stride if stride else kernel_size, padding, dilation,
                        ceil_mode, return_indices=True)
