"""Taylor rules for dropout: one mask for all coefficients (docs/math.md §2: dropout with a fixed mask
is linear), so train mode works. The mask is drawn by running the same dropout function on a
tensor of ones shaped like the primal: it consumes the random number generator exactly as the
plain model would, so a seeded run draws the same mask as nested autograd does. In a pass with
per-order directions the mask is drawn for one group of polarization rows and shared by all
(jets/draws.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..jets.draws import shared_draw
from ..jets.registry import register
from ._common import make_jet


def _dropout_rule(mask_fn):
    def rule(input, p: float = 0.5, training: bool = True, inplace: bool = False):
        if not training or p == 0.0:
            return input
        x0 = input._coeffs[0]
        mask = shared_draw(torch.ones_like(x0), lambda ones: mask_fn(ones, p, True), mask_fn.__name__)
        return make_jet(input._coeffs * mask, input._order)
    rule.__doc__ = f"{mask_fn.__name__} with one mask for every coefficient."
    return rule


register(F.dropout)(_dropout_rule(F.dropout))
register(F.dropout1d)(_dropout_rule(F.dropout1d))
register(F.dropout2d)(_dropout_rule(F.dropout2d))
register(F.dropout3d)(_dropout_rule(F.dropout3d))


@register(torch.dropout, torch.Tensor.dropout if hasattr(torch.Tensor, "dropout") else None)
def _torch_dropout(input, p: float, train: bool):
    return _dropout_rule(F.dropout)(input, p, train)


@register(torch.feature_dropout)
def _torch_feature_dropout(input, p: float, train: bool):
    if not train or p == 0.0:
        return input
    x0 = input._coeffs[0]
    mask = shared_draw(torch.ones_like(x0), lambda ones: torch.feature_dropout(ones, p, True), "feature_dropout")
    return make_jet(input._coeffs * mask, input._order)


@register(torch.ops.aten.native_dropout_backward)
def _native_dropout_backward(grad_output, mask, scale: float):
    """dropout's vector-Jacobian product g ⊙ mask · scale: linear in g (the mask is constant)."""
    return grad_output * (mask.to(grad_output.dtype) * scale)
