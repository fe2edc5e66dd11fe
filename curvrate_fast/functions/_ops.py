"""The kernels' launchers registered as PyTorch operators (namespace ``curvrate_fast_triton``).

On a GPU the launchers are registered with ``torch.library.triton_op`` and call their kernels through
``wrap_triton``, so ``torch.compile`` / ``torch.export`` see the Triton kernels themselves (no graph
break, the kernels can be inlined by Inductor). Under the Triton interpreter (``TRITON_INTERPRET=1``)
``wrap_triton`` cannot trace an interpreted kernel (fake tensors have no data), so there the same
launchers are registered with ``torch.library.custom_op`` plus a shape-only fake implementation:
the operators exist with identical schemas and ``torch.compile`` treats them as opaque.

The ops are forward-only building blocks; the autograd Functions of this package pair them.

    torch.ops.curvrate_fast_triton.activation_jet_fwd(x, bias, kind, order, p0, p1, channels, inner)
    torch.ops.curvrate_fast_triton.activation_jet_bwd(x, bias, grad_y, kind, order, p0, p1, channels, inner)
    torch.ops.curvrate_fast_triton.cross_entropy_jet_fwd(z, target, weight, order, ignore_index) -> (loss, lse)
    torch.ops.curvrate_fast_triton.cross_entropy_jet_bwd(z, target, weight, lse, grad_loss, order, ignore_index)
    torch.ops.curvrate_fast_triton.linear_act_jet_fused(x, weight, bias, kind, order, p0, p1)
    torch.ops.curvrate_fast_triton.linear_act_jet_fused_bwd(x, weight, bias, grad_y, kind, order, p0, p1)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._backend import interpreting, kernel_module

NAMESPACE = "curvrate_fast_triton"

__all__ = ["ops", "NAMESPACE", "registration_mode", "ensure_registered"]

_MODE = None  # "triton_op" or "custom_op" once registered


def _register() -> str:
    """Register the operators once; returns "triton_op" or "custom_op"."""
    act = kernel_module("activation_jet")
    ce = kernel_module("cross_entropy_jet")
    lin = kernel_module("linear_jet")
    _lin_fused = lin.linear_act_jet_fused
    _lin_fused_bwd = lin.linear_act_jet_fused_bwd
    _act_fwd = act.activation_jet_fwd
    _act_bwd = act.activation_jet_bwd
    _ce_fwd = ce.cross_entropy_jet_fwd
    _ce_bwd = ce.cross_entropy_jet_bwd

    def activation_jet_fwd(x: Tensor, bias: Optional[Tensor], kind: str, order: int, p0: float, p1: float,
                           channels: int, inner: int) -> Tensor:
        return _act_fwd(x, order, kind, p0, p1, bias=bias, channels=channels, inner=inner)

    def activation_jet_bwd(x: Tensor, bias: Optional[Tensor], grad_y: Tensor, kind: str, order: int, p0: float,
                           p1: float, channels: int, inner: int) -> Tensor:
        return _act_bwd(x, grad_y, order, kind, p0, p1, bias=bias, channels=channels, inner=inner)

    def cross_entropy_jet_fwd(z: Tensor, target: Tensor, weight: Optional[Tensor], order: int,
                              ignore_index: int) -> Tuple[Tensor, Tensor]:
        return _ce_fwd(z, target, order, ignore_index, weight)

    def cross_entropy_jet_bwd(z: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor, grad_loss: Tensor,
                              order: int, ignore_index: int) -> Tensor:
        return _ce_bwd(z, target, lse, grad_loss, order, ignore_index, weight)

    def linear_act_jet_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], kind: str, order: int, p0: float,
                             p1: float) -> Tensor:
        return _lin_fused(x, weight, bias, kind, order, p0, p1)

    def linear_act_jet_fused_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], grad_y: Tensor, kind: str,
                                 order: int, p0: float, p1: float) -> Tensor:
        return _lin_fused_bwd(x, weight, bias, grad_y, kind, order, p0, p1)

    impls = {"activation_jet_fwd": activation_jet_fwd, "activation_jet_bwd": activation_jet_bwd,
             "cross_entropy_jet_fwd": cross_entropy_jet_fwd, "cross_entropy_jet_bwd": cross_entropy_jet_bwd,
             "linear_act_jet_fused": linear_act_jet_fused, "linear_act_jet_fused_bwd": linear_act_jet_fused_bwd}

    if not interpreting() and hasattr(torch.library, "triton_op"):
        for name, fn in impls.items():
            torch.library.triton_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        return "triton_op"

    # interpreter (or a torch without triton_op): opaque custom ops with shape-only fakes
    def fake_act_fwd(x, bias, kind, order, p0, p1, channels, inner):
        return x.new_empty((order + 1,) + tuple(x.shape[1:]))

    def fake_act_bwd(x, bias, grad_y, kind, order, p0, p1, channels, inner):
        return x[: order + 1].new_empty(x[: order + 1].shape)

    def fake_ce_fwd(z, target, weight, order, ignore_index):
        B = z.shape[1]
        return z.new_empty((order + 1, B)), z.new_empty((order + 1, B), dtype=torch.float32)

    def fake_ce_bwd(z, target, weight, lse, grad_loss, order, ignore_index):
        return z[: order + 1].new_empty(z[: order + 1].shape)

    def fake_lin_fused(x, weight, bias, kind, order, p0, p1):
        return x.new_empty((order + 1,) + tuple(x.shape[1:-1]) + (weight.shape[0],))

    def fake_lin_fused_bwd(x, weight, bias, grad_y, kind, order, p0, p1):
        return x.new_empty((min(x.shape[0], order + 1),) + tuple(x.shape[1:-1]) + (weight.shape[0],))

    fakes = {"activation_jet_fwd": fake_act_fwd, "activation_jet_bwd": fake_act_bwd,
             "cross_entropy_jet_fwd": fake_ce_fwd, "cross_entropy_jet_bwd": fake_ce_bwd,
             "linear_act_jet_fused": fake_lin_fused, "linear_act_jet_fused_bwd": fake_lin_fused_bwd}
    for name, fn in impls.items():
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fakes[name])
    return "custom_op"


@torch.compiler.disable
def _register_once() -> str:
    global _MODE
    if _MODE is None:
        _MODE = _register()
    return _MODE


def ensure_registered() -> None:
    """Register the operators (imports triton) unless done. Plain global check first, so that
    torch.compile traces nothing here once they exist (``curvrate_fast.functions`` registers them at
    import when a GPU or the interpreter is present; otherwise the first call does, eagerly)."""
    if _MODE is None:
        _register_once()


def registration_mode() -> str:
    """How the operators were registered: "triton_op" (GPU) or "custom_op" (interpreter, or a torch
    without ``torch.library.triton_op``)."""
    ensure_registered()
    return _MODE


def ops():
    """``torch.ops.curvrate_fast_triton`` after registering the operators (imports triton)."""
    ensure_registered()
    return torch.ops.curvrate_fast_triton
