"""Elementwise activation jets as one autograd Function: reference forward, Toeplitz backward.

For an elementwise φ and an input series u(t) = Σ_j u_j t^j, the output y(t) = φ(u(t)) changes, when
u_j moves by ε, by ε·t^j·φ′(u(t)). So the Jacobian of the coefficient map is lower-triangular
Toeplitz,

    ∂y_k/∂u_j = w_{k−j},    w = the Taylor coefficients of φ′(u(t)),

and the backward of the whole jet is  ḡu_j = Σ_{k=j..K} ḡy_k · w_{k−j}  (K²/2 fused multiply-adds).
The forward runs the recurrences of docs/math.md §2 (``curvrate_fast.series``) without recording a graph
and keeps only w; autograd through the recurrence would record and replay every intermediate.
The w series come with the recurrences: tanh w = 1 − y², sigmoid w = s(1 − s), softplus w = σ(βu),
SiLU w = σ(1 + u(1 − σ)), GELU w = Φ(u) + u·ϕ(u), tanh-GELU by the product rule.

This is the CPU path and the oracle-side twin of the fused GPU kernels in ``curvrate_fast.functions``.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
from torch import Tensor

from . import series as S
from .activation_kinds import KINDS  # the one table of activation kinds
from .first_order import first_order_backward
from .jets.registry import tracing

__all__ = ["activation_jet_reference", "activation_series_with_derivative", "toeplitz_backward", "KINDS"]


def _pad(a: List[Tensor], n: int) -> List[Tensor]:
    z = torch.zeros_like(a[0])
    return list(a[:n]) + [z] * (n - len(a))


def activation_series_with_derivative(u: List[Tensor], kind: str, K: int,
                                      **params) -> Tuple[List[Tensor], List[Tensor]]:
    """(y, w): the jets of φ(u(t)) and φ′(u(t)), both to order K."""
    if kind == "tanh":
        return S.tanh_with_derivative(u, K)
    if kind == "sigmoid":
        return S.sigmoid_with_derivative(u, K)
    if kind == "softplus":
        beta, threshold = float(params.get("beta", 1.0)), float(params.get("threshold", 20.0))
        bu = S.scale(u, beta, K) if beta != 1.0 else u
        sig = S.sigmoid_with_derivative(bu, K)[0]
        y = S.integrate(u, sig, K, torch.nn.functional.softplus(u[0], beta, threshold))
        lin = (beta * u[0]) > threshold
        if tracing() or bool(lin.any()):      # a capture cannot read which are linear
            one = torch.ones_like(u[0])
            y = [y[0]] + [torch.where(lin, _pad(u, K + 1)[k], y[k]) for k in range(1, K + 1)]
            sig = [torch.where(lin, one, sig[0])] + [torch.where(lin, torch.zeros_like(s), s)
                                                     for s in sig[1:]]
        return y, _pad(sig, K + 1)
    if kind == "silu":
        s = S.sigmoid(u, K)
        y = S.mul(u, s, K)
        y[0] = torch.nn.functional.silu(u[0])
        one_minus_s = [1 - s[0]] + [-x for x in s[1:]]
        w = S.mul(s, S.add([torch.ones_like(u[0])], S.mul(u, one_minus_s, K), K), K)
        return _pad(y, K + 1), _pad(w, K + 1)
    if kind == "gelu":
        r2 = 1.0 / math.sqrt(2.0)
        v = S.scale(u, r2, K)
        g = S.exp(S.scale(S.square(v, K), -1.0, K), K)          # e^{−u²/2}
        pdf = S.scale(g, 1.0 / math.sqrt(2.0 * math.pi), K)      # ϕ(u)
        e = S.integrate(v, S.scale(g, 2.0 / math.sqrt(math.pi), K), K, torch.erf(v[0]))
        cdf = [0.5 * (1 + e[0])] + [0.5 * x for x in e[1:]]      # Φ(u)
        y = S.mul(u, cdf, K)
        y[0] = torch.nn.functional.gelu(u[0])
        w = S.add(cdf, S.mul(u, pdf, K), K)
        return _pad(y, K + 1), _pad(w, K + 1)
    if kind == "gelu_tanh":
        c, a = math.sqrt(2.0 / math.pi), 0.044715
        u2 = S.square(u, K)
        inner = S.scale(S.add(u, S.mul(u2, u, K), K, alpha=a), c, K)
        T, sech2 = S.tanh_with_derivative(inner, K)
        half = [0.5 * (1 + T[0])] + [0.5 * x for x in T[1:]]
        y = S.mul(u, half, K)
        y[0] = torch.nn.functional.gelu(u[0], approximate="tanh")
        dinner = S.scale(S.add([torch.ones_like(u[0])], u2, K, alpha=3 * a), c, K)
        w = S.add(half, S.scale(S.mul(S.mul(u, sech2, K), dinner, K), 0.5, K), K)
        return _pad(y, K + 1), _pad(w, K + 1)
    if kind in ("relu", "leaky_relu"):
        slope = float(params.get("negative_slope", 0.01)) if kind == "leaky_relu" else 0.0
        x0 = u[0]
        pos = x0 > 0
        m = pos.to(x0.dtype) if slope == 0.0 else torch.where(pos, torch.ones_like(x0),
                                                              torch.full_like(x0, slope))
        y = [x * m for x in _pad(u, K + 1)]
        return y, [m] + [torch.zeros_like(x0)] * K
    raise ValueError(f"unknown activation kind {kind!r}; expected one of {KINDS}")


class _ActivationJet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c: Tensor, kind: str, K: int, params: dict) -> Tensor:
        with torch.no_grad():
            y, w = activation_series_with_derivative(list(c.unbind(0)), kind, K, **params)
            out = torch.stack(_pad(y, K + 1))
        ctx.n_in = c.shape[0]
        ctx.save_for_backward(*w)
        return out

    @staticmethod
    @first_order_backward("activation jet (reference rules)")
    def backward(ctx, gy: Tensor):
        w = ctx.saved_tensors
        if w and w[0].is_complex():  # autograd's convention for holomorphic maps: ḡu = conj(∂y/∂u)·ḡy
            w = [x.conj() for x in w]
        return torch.stack(toeplitz_backward(gy, w, ctx.n_in)), None, None, None


def toeplitz_backward(gy: Tensor, w, n_in: int) -> List[Tensor]:
    """ḡu_j = Σ_{k≥j} ḡy_k · w_{k−j} for j < n_in (only the stored input coefficients need a
    gradient): the backward of a map whose coefficient Jacobian is lower-triangular Toeplitz in
    the jet w (docs/math.md, "The Toeplitz backward"); gy holds the K + 1 output coefficients."""
    K = gy.shape[0] - 1
    grads = []
    for j in range(n_in):
        acc = None
        for k in range(j, K + 1):
            acc = gy[k] * w[k - j] if acc is None else torch.addcmul(acc, gy[k], w[k - j])
        grads.append(acc)
    return grads


def activation_jet_reference(c: Tensor, kind: str, order: int, **params) -> Tensor:
    """Jet (order+1, *S) of an elementwise activation of the jet c (n+1, *S), n ≤ order.

    Differentiable with respect to c through the Toeplitz backward (module docstring).

    Example::

        >>> c = torch.randn(2, 4, 8)                    # x and u of a batch of 4
        >>> activation_jet_reference(c, "tanh", 4).shape
        torch.Size([5, 4, 8])
    """
    if kind not in KINDS:
        raise ValueError(f"unknown activation kind {kind!r}; expected one of {KINDS}")
    if c.requires_grad and torch.is_grad_enabled():
        return _ActivationJet.apply(c, kind, order, params)
    with torch.no_grad():
        y, _ = activation_series_with_derivative(list(c.unbind(0)), kind, order, **params)
    return torch.stack(_pad(y, order + 1))
