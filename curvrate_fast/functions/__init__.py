"""Autograd Functions binding the fused Triton kernels (forward + backward) to the Taylor rules.

Public helpers (each takes the pure-PyTorch reference path of :mod:`curvrate_fast.series` when
:func:`triton_available` is False, for float64, or above the kernels' maximum order):

- :func:`activation_jet` (c, kind, order, **params) → (order+1, *S)
- :func:`bias_activation_jet` (pre, bias, kind, order, channel_dim, **params) → (order+1, *S)
- :func:`cross_entropy_jet` (z, target, order, ignore_index=-100, weight=None) → (order+1, B)
- :func:`linear_activation_jet`: cuBLAS GEMM + the fused epilogue, or one Triton GEMM with the
  epilogue fused (``impl=``; "auto" measures both per shape on the GPU)
- convolutions: the engine's conv rule runs one convolution of the stacked coefficients and
  defers the bias to :func:`bias_activation_jet` in the following activation (rules/linear.py)
- :func:`triton_available` (t) → bool

Importing this package does not import triton; the kernels load on first use.
"""
from ._backend import triton_available
from .activation import KINDS, ActivationJetFunction, activation_jet, bias_activation_jet, reference_activation_jet
from .cross_entropy import CrossEntropyJetFunction, cross_entropy_jet, reference_cross_entropy_jet
from .linear import (
    LinearActivationJetFunction,
    choose_linear_impl,
    linear_activation_jet,
    linear_impl_choices,
)


def _register_if_useful() -> None:
    """Register the torch.library operators now when they can run here (a GPU or the interpreter),
    so that torch.compile(fullgraph=True) never meets the registration; elsewhere stay lazy."""
    from ._backend import interpreting, triton_importable
    try:
        import torch
        if (interpreting() or torch.cuda.is_available()) and triton_importable():
            from ._ops import ensure_registered
            ensure_registered()
    except Exception:  # noqa: BLE001 - a broken triton install: the reference path still works
        pass


_register_if_useful()

__all__ = ["triton_available", "activation_jet", "bias_activation_jet", "cross_entropy_jet",
           "linear_activation_jet", "reference_activation_jet",
           "reference_cross_entropy_jet", "ActivationJetFunction", "CrossEntropyJetFunction",
           "LinearActivationJetFunction", "choose_linear_impl", "linear_impl_choices", "KINDS"]
