"""Taylor rules for distances and normalizations: pairwise_distance, pdist, cdist,
cosine_similarity, F.normalize, all through one p-norm jet (:func:`pnorm`).

Zero distances. ‖v‖_p is not differentiable where v = 0 (along t ↦ t·u it is |t|·‖u‖_p), and |v_i|^p
is not smooth where one component v_i is 0 (unless p is an even integer). Like autograd (whose
backward of norm, pdist and cdist puts 0 there), the rules give such terms zero derivatives of
every order: a component with v_i,0 = 0 contributes nothing beyond its value, and a norm whose
primal is 0 has coefficients (0, 0, ...). These coefficients are exact below order p (|t|^p has
vanishing derivatives there) and a convention above it. For p = ∞ (−∞) the coefficients are those of
the component with the largest (smallest) primal |v_i|, the first one on ties (autograd splits the
gradient among ties; there the norm has no derivative). Coefficient 0 is always the plain op's own
value (PyTorch may compute it differently, e.g. cdist's matrix-product path for p = 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..jets.registry import register, tracing
from ._common import JetError, is_jet, make_jet, primal, require


def _const(x, value: float) -> Tensor:
    p = primal(x)
    return torch.full((), value, dtype=p.dtype, device=p.device)


def pnorm(v, p: float, dim, keepdim: bool = False):
    """The jet of ‖v‖_p over ``dim`` (zero-distance convention of the module docstring)."""
    if not is_jet(v):
        return torch.linalg.vector_norm(v, p, dim, keepdim)
    if v.dim() == 0:  # the norm of a single number: |v|
        v, dim, keepdim = v.unsqueeze(0), 0, False
    p = float(p)
    v0 = primal(v)
    if p == 0.0:  # the number of non-zero entries: piecewise constant
        return torch.linalg.vector_norm(v0, 0.0, dim, keepdim)
    if math.isinf(p):
        a = torch.abs(v)
        return a.amax(dim, keepdim) if p > 0 else a.amin(dim, keepdim)
    if p == 2.0:
        s = (v * v).sum(dim, keepdim=keepdim)
        return _root(s, 2.0)
    if p == 1.0:
        return torch.abs(v).sum(dim, keepdim=keepdim)
    if p.is_integer() and p % 2 == 0 and 0 < p <= 8:
        s = torch.pow(v, p).sum(dim, keepdim=keepdim)   # v^p is smooth at 0: exact everywhere
        return _root(s, p)
    zero = v0 == 0
    if p < 0:
        require(~zero, JetError, f"a {p}-norm of a jet with a zero component: the norm is 0 there and has no "
                "Taylor expansion")
        return _root(torch.pow(torch.abs(v), p).sum(dim, keepdim=keepdim), p)
    one = _const(v, 1.0)
    safe = torch.where(zero, one, torch.abs(v))          # |v| = sign(v_0)·v away from 0
    terms = torch.where(zero, _const(v, 0.0), torch.pow(safe, p))
    return _root(terms.sum(dim, keepdim=keepdim), p)


def _root(s, p: float):
    """s^(1/p) with coefficients (0, 0, ...) where the primal s_0 is 0."""
    if not is_jet(s):
        return torch.pow(s, 1.0 / p)
    s0 = primal(s)
    zero = s0 == 0
    if not tracing() and not bool(zero.any()):   # a capture takes the general form below
        return torch.pow(s, 1.0 / p) if p != 2.0 else torch.sqrt(s)
    safe = torch.where(zero, _const(s, 1.0), s)
    r = torch.sqrt(safe) if p == 2.0 else torch.pow(safe, 1.0 / p)
    return torch.where(zero, _const(s, 0.0), r)


def _with_value(jet, value: Tensor):
    """``jet`` with coefficient 0 replaced by the plain op's own value."""
    if not is_jet(jet):
        return value
    c = jet._coeffs
    return make_jet(torch.cat([value.to(c.dtype).unsqueeze(0), c[1:]]), jet._order)


@register(torch.pairwise_distance, F.pairwise_distance)
def pairwise_distance(x1, x2, p: float = 2.0, eps: float = 1e-6, keepdim: bool = False):
    """‖x₁ − x₂ + eps‖_p over the last dimension (ATen's definition)."""
    value = torch.pairwise_distance(primal(x1), primal(x2), p, eps, keepdim)
    dim = max(x1.dim(), x2.dim()) - 1
    return _with_value(pnorm(x1 - x2 + eps, p, max(dim, 0), keepdim), value)


# The differences of all pairs are formed chunk by chunk: at most this many elements (times the
# number of stored coefficients) at a time.
_CHUNK_ELEMENTS = 1 << 22


def _stored(*xs) -> int:
    return max(x._coeffs.shape[0] if is_jet(x) else 1 for x in xs)


@register(torch.pdist, F.pdist)
def pdist(input, p: float = 2.0):
    """‖x_i − x_j‖_p for the rows i < j, in row-major order (torch.triu_indices), from the
    differences themselves (formed in chunks of pairs)."""
    value = torch.pdist(primal(input), p)
    n = input.shape[0]
    if value.numel() == 0:
        return value
    i, j = torch.triu_indices(n, n, 1, device=value.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, input.shape[1] * _stored(input)))
    parts = [pnorm(input[i[s:s + step]] - input[j[s:s + step]], p, 1)
             for s in range(0, i.numel(), step)]
    return _with_value(parts[0] if len(parts) == 1 else torch.cat(parts), value)


@register(torch.cdist)
def cdist(x1, x2, p: float = 2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """‖x₁[..., i, :] − x₂[..., j, :]‖_p from the differences themselves, formed for chunks of the
    rows of x₁ (exact, also where PyTorch takes its matrix-product shortcut for p = 2, whose
    cancellation would blur the derivatives of close points)."""
    value = torch.cdist(primal(x1), primal(x2), p, compute_mode)
    if value.numel() == 0:
        return value
    rows = x1.shape[-2]
    per_row = value[..., :1, :].numel() * x1.shape[-1] * _stored(x1, x2)
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    parts = [pnorm(x1[..., s:s + step, :].unsqueeze(-2) - x2.unsqueeze(-3), p, -1)
             for s in range(0, rows, step)]
    return _with_value(parts[0] if len(parts) == 1 else torch.cat(parts, -2), value)


@register(torch.cosine_similarity, F.cosine_similarity)
def cosine_similarity(x1, x2, dim: int = 1, eps: float = 1e-8):
    """Σ (x₁/max(‖x₁‖, eps))·(x₂/max(‖x₂‖, eps)) over ``dim`` (ATen's form). PyTorch clamps the
    norms in place under no_grad, so its autograd treats a clamped norm as if it were not clamped;
    here a norm below eps is the constant eps (the function it computes); the two agree wherever
    ‖x‖ ≥ eps."""
    value = torch.cosine_similarity(primal(x1), primal(x2), dim, eps)
    shape = torch.broadcast_shapes(x1.shape, x2.shape)
    a, b = x1.expand(shape), x2.expand(shape)
    na = torch.clamp_min(pnorm(a, 2.0, dim, keepdim=True), eps)
    nb = torch.clamp_min(pnorm(b, 2.0, dim, keepdim=True), eps)
    return _with_value(((a / na) * (b / nb)).sum(dim), value)


@register(F.normalize)
def normalize(input, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out=None):
    """x / max(‖x‖_p, eps) along ``dim``."""
    if out is not None:
        raise JetError("F.normalize(..., out=...) with a jet: use the returned value")
    value = F.normalize(primal(input), p, dim, eps)
    denom = torch.clamp_min(pnorm(input, p, dim, keepdim=True), eps)
    return _with_value(input / denom, value)
