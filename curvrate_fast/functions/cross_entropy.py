"""Autograd binding of the fused per-sample cross-entropy jet, with the pure-PyTorch reference.

``cross_entropy_jet(z, target, order, ignore_index=-100, weight=None)``: z is the logits jet
(n+1, B, C), target (B,) class indices; returns the jet (order+1, B) of the per-sample loss
ℓ_b = w_{y_b}·(logsumexp(z_b) − z_{b,y_b}) (ℓ_b = 0 where y_b = ignore_index), i.e. what
``F.cross_entropy(..., reduction='none')`` computes at every order. Differentiable w.r.t. z.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import series as S
from ..first_order import first_order_backward
from ._backend import KERNEL_DTYPES, triton_available
from ._ops import ensure_registered

__all__ = ["cross_entropy_jet", "reference_cross_entropy_jet"]

from ..activation_kinds import MAX_KERNEL_ORDER  # noqa: E402  (one limit for all kernels)


def reference_cross_entropy_jet(z: Tensor, target: Tensor, order: int, ignore_index: int = -100,
                                weight: Optional[Tensor] = None) -> Tensor:
    """docs/math.md §2: shift by the constant max of z_0, exp jet, class sum, log jet, minus z_y's jet."""
    K = order
    u = list(z[: K + 1].unbind(0))
    m = u[0].detach().amax(dim=-1, keepdim=True)
    e = S.exp([u[0] - m] + u[1:], K)
    L = S.log([x.sum(dim=-1) for x in e], K)
    L[0] = L[0] + m.squeeze(-1)
    valid = target != ignore_index
    tc = torch.where(valid, target, torch.zeros_like(target)).long()
    zy = [x.gather(-1, tc[:, None]).squeeze(-1) for x in u]
    w = None
    if weight is not None:
        w = weight[tc].to(L[0].dtype)
    zero = torch.zeros_like(L[0])
    out = []
    for k in range(K + 1):
        lk = L[k] - zy[k] if k < len(zy) else L[k]
        if w is not None:
            lk = lk * w
        out.append(torch.where(valid, lk, zero))
    return torch.stack(out)


class CrossEntropyJetFunction(torch.autograd.Function):
    """Per-sample cross-entropy jet: one kernel forward (one pass over the logits), one backward."""

    @staticmethod
    def forward(ctx, z: Tensor, target: Tensor, weight: Optional[Tensor], order: int, ignore_index: int) -> Tensor:
        loss, lse = torch.ops.curvrate_fast_triton.cross_entropy_jet_fwd(z, target, weight, order,
                                                                         ignore_index)
        ctx.save_for_backward(z, target, weight, lse)
        ctx.args = (order, ignore_index)
        return loss

    @staticmethod
    @first_order_backward("cross-entropy jet (Triton kernels)")
    def backward(ctx, grad_loss: Tensor):
        z, target, weight, lse = ctx.saved_tensors
        order, ignore_index = ctx.args
        gz = torch.ops.curvrate_fast_triton.cross_entropy_jet_bwd(z, target, weight, lse, grad_loss, order,
                                                                  ignore_index)
        return gz, None, None, None, None


def cross_entropy_jet(z: Tensor, target: Tensor, order: int, ignore_index: int = -100,
                      weight: Optional[Tensor] = None) -> Tensor:
    """The (order+1, B) jet of the per-sample cross-entropy of the logits jet z (n+1, B, C), n ≤ order.

    ``weight`` (C,): class weights, ℓ_b scaled by weight[y_b] (as ``F.cross_entropy(...,
    reduction='none')``). Targets must be in [0, C) or equal ``ignore_index``; the kernel does not
    check this on the GPU (an out-of-range target reads z_y = 0 instead of faulting), the reference
    path raises. Label smoothing and probability targets are not handled here (the engine's
    reference rule does them).
    """
    if z.dim() != 3:
        raise ValueError(f"z must have shape (n+1, B, C), got {tuple(z.shape)}")
    if target.dim() != 1 or target.shape[0] != z.shape[1]:
        raise ValueError(f"target must have shape ({z.shape[1]},), got {tuple(target.shape)}")
    if target.is_floating_point():
        raise NotImplementedError("probability (floating-point) targets are not supported by cross_entropy_jet; "
                                  "use the reference rule")
    if z.shape[0] > order + 1:  # slicing only when needed: a no-op slice still adds a backward copy
        z = z[: order + 1]
    if weight is not None and weight.shape != (z.shape[2],):
        raise ValueError(f"weight must have shape ({z.shape[2]},), got {tuple(weight.shape)}")
    # the kernel has no gradient w.r.t. class weights: a trainable weight takes the reference path
    use_kernel = (z.dtype in KERNEL_DTYPES and order <= MAX_KERNEL_ORDER and triton_available(z)
                  and (weight is None or (weight.dtype != torch.float64
                                          and not (weight.requires_grad and torch.is_grad_enabled()))))
    if not use_kernel:
        return reference_cross_entropy_jet(z, target, order, ignore_index, weight)
    if target.dtype not in (torch.int64, torch.int32):
        target = target.long()
    ensure_registered()
    return CrossEntropyJetFunction.apply(z, target, weight, order, int(ignore_index))
