"""Triton GPU kernels of curvrate_fast, installed as ``curvrate_fast.triton_kernels``.

One module per op family; each holds the kernels, their launchers and their config space:

- :mod:`.activation_jet`: the jet of an elementwise activation (tanh, sigmoid, GELU erf/tanh, SiLU,
  softplus, ReLU, leaky ReLU, identity), all K+1 coefficients in one pass, forward and backward,
  optionally with a bias added to coefficient 0 (the epilogue of a linear or conv layer).
- :mod:`.cross_entropy_jet`: the per-sample cross-entropy jet ℓ = logsumexp(z) − z_y.
- :mod:`.linear_jet`: linear / conv layers on stacked jets: one cuBLAS/cuDNN call for all K+1
  coefficients, then the fused bias + activation epilogue.

The kernels compute in fp32 whatever the storage dtype. ``TRITON_INTERPRET=1`` (set before the import)
runs them on CPU tensors through the Triton interpreter; then every config space collapses to one
config. Import these modules lazily: importing them imports triton.

This folder must never be importable as a top-level ``triton_kernels`` (an unrelated PyPI package
of that name exists): import siblings relatively.
"""
__all__ = ["activation_jet", "cross_entropy_jet", "linear_jet"]
