"""Linear and convolution layers on jets with a fused bias + activation epilogue.

One GEMM (cuBLAS, through ``F.linear``) or one convolution (cuDNN) for all n+1 stored coefficients
(SPEC.md §2: stack the coefficients along the batch axis so the weight is read once), then
:func:`bias_activation_jet` adds the bias to coefficient 0 and applies the activation jet in one pass.
Differentiable w.r.t. the input jet, the weight and the bias (the GEMM/conv by torch's autograd,
the epilogue by its kernel's backward).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor

from .activation import bias_activation_jet

__all__ = ["linear_activation_jet", "conv_activation_jet"]


def linear_activation_jet(x: Tensor, weight: Tensor, bias: Optional[Tensor], kind: Optional[str], order: int,
                          **params) -> Tensor:
    """φ(x Wᵀ + b) as a jet: x (n+1, *batch, in) → (order+1, *batch, out); ``kind=None``: no activation."""
    pre = F.linear(x, weight)  # one GEMM over (n+1)·batch rows
    return bias_activation_jet(pre, bias, kind, order, -1, **params)


def conv_activation_jet(x: Tensor, weight: Tensor, bias: Optional[Tensor], kind: Optional[str], order: int,
                        stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
                        dilation: Union[int, Sequence[int]] = 1, groups: int = 1, **params) -> Tensor:
    """φ(conv(x) + b) as a jet: x (n+1, B, C_in, *spatial) → (order+1, B, C_out, *spatial');
    conv1d/2d/3d by ``weight.dim()``; the bias (C_out,) goes to coefficient 0, broadcast over space."""
    nd = weight.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if conv is None:
        raise ValueError(f"conv weight must have 3, 4 or 5 dimensions, got {weight.dim()}")
    if x.dim() != nd + 3:
        raise ValueError(f"x must have shape (n+1, B, C, *spatial) with {nd} spatial dims, got {tuple(x.shape)}")
    n1, B = x.shape[:2]
    pre = conv(x.reshape((n1 * B,) + tuple(x.shape[2:])), weight, None, stride, padding, dilation, groups)
    pre = pre.reshape((n1, B) + tuple(pre.shape[1:]))
    return bias_activation_jet(pre, bias, kind, order, 1, **params)
