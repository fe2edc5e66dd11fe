"""Linear and convolution layers on stacked jets, with the fused bias + activation epilogue.

SPEC.md §2, linear maps: the map is applied to every coefficient, the bias goes to coefficient 0 only,
and all K+1 coefficients go through ONE call (stacked along the batch axis, so the weight is read
once): a (n+1)·B-row GEMM by cuBLAS (``F.linear``), or one cuDNN convolution of (n+1)·B images.
The epilogue (:func:`bias_act_epilogue`) is the activation-jet kernel of :mod:`.activation_jet` with
``HAS_BIAS``: it reads the n+1 stored pre-activation rows once, adds bias[c] to coefficient 0 in
registers (the biased pre-activation is never written), applies the activation jet and writes the
K+1 output rows once. With ``kind=None`` (or "identity") it is the bare bias epilogue.

A single Triton GEMM with this epilogue fused is possible (the pre-activation tile would never reach
HBM) but is not implemented: cuBLAS + one fused elementwise pass is the default, as DESIGN.md §2 asks
to fuse only where it measures faster (see bench/bench_kernels.py for the measurement).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .activation_jet import activation_jet_fwd

__all__ = ["channel_layout", "bias_act_epilogue", "linear_pre", "conv_pre", "linear_act_jet", "conv_act_jet"]


def channel_layout(shape: Sequence[int], channel_dim: int) -> Tuple[int, int]:
    """(C, inner) of the primal ``shape`` for a bias broadcast along ``channel_dim``: the flat index
    i of an element has channel (i // inner) % C."""
    nd = len(shape)
    if nd == 0:
        raise ValueError("a bias needs a primal of at least one dimension")
    if not -nd <= channel_dim < nd:
        raise ValueError(f"channel_dim {channel_dim} out of range for a primal of shape {tuple(shape)}")
    cd = channel_dim % nd
    return int(shape[cd]), int(math.prod(shape[cd + 1:]))


def bias_act_epilogue(pre: torch.Tensor, bias: Optional[torch.Tensor], kind: Optional[str], order: int,
                      channel_dim: int = -1, p0: float = 0.0, p1: float = 0.0) -> torch.Tensor:
    """pre (n+1, *S) → (order+1, *S): bias (C,) added to coefficient 0 along ``channel_dim`` of S,
    then the activation jet ``kind`` (None: identity), in one pass."""
    if bias is not None:
        C, inner = channel_layout(pre.shape[1:], channel_dim)
    else:
        C, inner = 1, 1
    return activation_jet_fwd(pre, order, kind or "identity", p0, p1, bias=bias, channels=C, inner=inner)


def linear_pre(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (n+1, *batch, in) → (n+1, *batch, out): one GEMM of (n+1)·batch rows (no bias)."""
    return F.linear(x, weight)


_IntOrTuple = Union[int, Sequence[int]]


def conv_pre(x: torch.Tensor, weight: torch.Tensor, stride: _IntOrTuple = 1, padding: Union[_IntOrTuple, str] = 0,
             dilation: _IntOrTuple = 1, groups: int = 1) -> torch.Tensor:
    """x (n+1, B, C_in, *spatial) → (n+1, B, C_out, *spatial'): one convolution of (n+1)·B inputs
    (no bias); conv1d/2d/3d by the weight's dimension."""
    nd = weight.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if conv is None:
        raise ValueError(f"conv weight must have 3, 4 or 5 dimensions, got {weight.dim()}")
    if x.dim() != nd + 3:
        raise ValueError(f"conv jet input must have shape (n+1, B, C, {'*' * nd}) with {nd} spatial dims, "
                         f"got {tuple(x.shape)}")
    n1, B = x.shape[:2]
    out = conv(x.reshape((n1 * B,) + tuple(x.shape[2:])), weight, None, stride, padding, dilation, groups)
    return out.reshape((n1, B) + tuple(out.shape[1:]))


def linear_act_jet(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kind: Optional[str],
                   order: int, p0: float = 0.0, p1: float = 0.0) -> torch.Tensor:
    """Activation(linear(x)) as a jet: one GEMM + the fused epilogue (forward only; the autograd
    binding is ``curvrate_fast.functions.linear_activation_jet``)."""
    return bias_act_epilogue(linear_pre(x, weight), bias, kind, order, -1, p0, p1)


def conv_act_jet(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kind: Optional[str],
                 order: int, stride: _IntOrTuple = 1, padding: Union[_IntOrTuple, str] = 0,
                 dilation: _IntOrTuple = 1, groups: int = 1, p0: float = 0.0, p1: float = 0.0) -> torch.Tensor:
    """Activation(conv(x)) as a jet: one convolution + the fused epilogue (bias per output channel,
    broadcast over spatial positions, coefficient 0 only)."""
    pre = conv_pre(x, weight, stride, padding, dilation, groups)
    return bias_act_epilogue(pre, bias, kind, order, 1, p0, p1)
