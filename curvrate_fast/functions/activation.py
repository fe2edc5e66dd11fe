"""Autograd bindings of the fused activation-jet kernels, with the pure-PyTorch reference as fallback.

``activation_jet(c, kind, order, **params)`` and ``bias_activation_jet(pre, bias, kind, order,
channel_dim, **params)`` take a stacked jet (n+1, *S), n ≤ order (missing coefficients are zero), and
return the (order+1, *S) jet of the activation; both are differentiable w.r.t. the coefficients (and
the bias). On CUDA (or under ``TRITON_INTERPRET=1``) they run one Triton kernel forward and one
backward (:mod:`curvrate_fast.triton_kernels.activation_jet`); elsewhere, for float64, or above the
kernels' maximum order, they run the recurrences of :mod:`curvrate_fast.series`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..activation_jet import activation_jet_reference
from ..activation_kinds import ACTIVATIONS, MAX_KERNEL_ORDER, kernel_params
from ..first_order import first_order_backward
from ._backend import KERNEL_DTYPES, triton_available
from ._ops import ensure_registered

__all__ = ["activation_jet", "bias_activation_jet", "reference_activation_jet", "KINDS", "MAX_KERNEL_ORDER",
           "activation_params"]

#: activations with a fused kernel ("identity" = bias only), and the highest order the kernels
#: are built for: both from the one table (``curvrate_fast.activation_kinds``)
KINDS = tuple(ACTIVATIONS)
activation_params = kernel_params


# -- reference (pure PyTorch, any device and dtype) ----------------------------------------------
def _pad(out: List[Tensor], order: int, like: Tensor) -> Tensor:
    out = list(out[: order + 1])
    while len(out) < order + 1:
        out.append(torch.zeros_like(like))
    return torch.stack(out)


def reference_activation_jet(c: Tensor, kind: str, order: int, p0: float = 0.0, p1: float = 0.0) -> Tensor:
    """The jet of ``kind`` by the recurrences of :mod:`curvrate_fast.series` (docs/math.md §2), with the
    Toeplitz backward of :mod:`curvrate_fast.activation_jet` (the engine's reference path)."""
    if c.shape[0] > order + 1:  # slicing only when needed: a no-op slice still adds a backward copy
        c = c[: order + 1]
    if kind == "identity":
        return _pad(list(c.unbind(0)), order, c[0])
    params = ({"beta": p0, "threshold": p1} if kind == "softplus" else
              {"negative_slope": p0} if kind == "leaky_relu" else {})
    return activation_jet_reference(c, kind, order, **params)


def _bias_view(bias: Tensor, shape, channel_dim: int) -> Tensor:
    nd = len(shape)
    cd = channel_dim % nd
    return bias.reshape((-1,) + (1,) * (nd - cd - 1))


# -- autograd binding ----------------------------------------------------------------------------
class ActivationJetFunction(torch.autograd.Function):
    """y = φ(x (+ bias on coefficient 0)) as jets; forward and backward are one kernel each."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Optional[Tensor], kind: str, order: int, p0: float, p1: float,
                channels: int, inner: int) -> Tensor:
        y = torch.ops.curvrate_fast_triton.activation_jet_fwd(x, bias, kind, order, p0, p1, channels,
                                                              inner)
        ctx.save_for_backward(x, bias)
        ctx.args = (kind, order, p0, p1, channels, inner)
        return y

    @staticmethod
    @first_order_backward("activation jet (Triton kernels)")
    def backward(ctx, grad_y: Tensor):
        x, bias = ctx.saved_tensors
        kind, order, p0, p1, channels, inner = ctx.args
        gx = torch.ops.curvrate_fast_triton.activation_jet_bwd(x, bias, grad_y, kind, order, p0, p1,
                                                               channels, inner)
        gb = None
        if bias is not None and ctx.needs_input_grad[1]:
            g0 = gx[0].reshape(-1, channels, inner)
            gb = g0.sum(dim=(0, 2), dtype=torch.float32).to(bias.dtype)
        return (gx if ctx.needs_input_grad[0] else None), gb, None, None, None, None, None, None


def _use_kernel(t: Tensor, order: int) -> bool:
    return t.dtype in KERNEL_DTYPES and order <= MAX_KERNEL_ORDER and triton_available(t)


def activation_jet(c: Tensor, kind: str, order: int, **params) -> Tensor:
    """The (order+1, *S) jet of the activation ``kind`` of the jet ``c`` (n+1, *S), n ≤ order.

    kind: tanh, sigmoid, gelu (``approximate="tanh"`` → gelu_tanh), gelu_tanh, silu, softplus
    (``beta``, ``threshold``), relu, leaky_relu (``negative_slope``), identity. Differentiable
    w.r.t. ``c``. Runs the fused Triton kernels when :func:`triton_available` (CUDA, or
    ``TRITON_INTERPRET=1``) and the dtype is fp32/fp16/bf16, the reference recurrences otherwise.
    """
    kind, p0, p1 = activation_params(kind, params)
    if c.dim() < 1:
        raise ValueError("c needs a leading coefficient axis")
    if c.shape[0] > order + 1:  # slicing only when needed: a no-op slice still adds a backward copy
        c = c[: order + 1]
    if not _use_kernel(c, order):
        return reference_activation_jet(c, kind, order, p0, p1)
    ensure_registered()
    return ActivationJetFunction.apply(c, None, kind, order, p0, p1, 1, 1)


def bias_activation_jet(pre: Tensor, bias: Optional[Tensor], kind: Optional[str], order: int,
                        channel_dim: int = -1, **params) -> Tensor:
    """(order+1, *S) jet of φ(pre + bias): ``bias`` (C,) is added to coefficient 0 only, broadcast
    along ``channel_dim`` of the primal shape S (-1 after a linear layer, 1 after a conv);
    ``kind=None`` is the bias alone. Differentiable w.r.t. ``pre`` and ``bias``; the fused kernel
    adds the bias in registers (the biased pre-activation is never written)."""
    kind, p0, p1 = activation_params(kind, params)
    if pre.dim() < 1:
        raise ValueError("pre needs a leading coefficient axis")
    if pre.shape[0] > order + 1:  # slicing only when needed: a no-op slice still adds a backward copy
        pre = pre[: order + 1]
    shape = tuple(pre.shape[1:])
    channels, inner = 1, 1
    if bias is not None:
        if len(shape) == 0:
            raise ValueError("a bias needs a primal of at least one dimension")
        cd = channel_dim % len(shape)
        channels = shape[cd]
        inner = 1
        for s in shape[cd + 1:]:
            inner *= int(s)
        if bias.shape != (channels,):
            raise ValueError(f"bias must have shape ({channels},) for channel_dim {channel_dim} of a primal of "
                             f"shape {shape}, got {tuple(bias.shape)}")
    if not _use_kernel(pre, order) or (bias is not None and bias.dtype == torch.float64):
        if bias is not None:
            pre = torch.cat([(pre[0] + _bias_view(bias, shape, channel_dim)).unsqueeze(0), pre[1:]])
        return reference_activation_jet(pre, kind, order, p0, p1)
    if bias is not None and bias.device != pre.device:
        raise ValueError(f"bias is on {bias.device}, pre on {pre.device}")
    ensure_registered()
    return ActivationJetFunction.apply(pre, bias, kind, order, p0, p1, channels, inner)
