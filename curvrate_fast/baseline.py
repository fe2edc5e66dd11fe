"""Nested reverse-mode autograd: the test oracle and the benchmark baseline (docs/math.md §3).

This is the method of the paper's code: derivatives of order n by n nested
``torch.autograd.grad(create_graph=True)`` calls. It is exact where PyTorch's higher derivatives are
right, but about 3× more expensive per order. PyTorch's higher derivatives are wrong or missing for
LayerNorm, instance norm and scaled-dot-product attention (docs/math.md §2); inside
:func:`primitive_ops` (on by default here) those functions are replaced by the same math written in
primitive operations (mean, subtraction, square, sqrt, division, matmul, softmax), so the oracle
is right on them too.

Example::

    >>> d = baseline.loss_directional_derivatives(model, x, y, u, order=4)   # (4, B)
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["jet", "directional_derivatives", "loss_directional_derivatives", "primitive_ops",
           "nested_directional_derivatives", "per_sample_cross_entropy",
           "layer_norm_primitive", "sdpa_primitive", "instance_norm_primitive"]


def layer_norm_primitive(input: Tensor, normalized_shape, weight: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm in primitive ops: (x − mean) / sqrt(mean((x − mean)²) + eps) · w + b."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mu = input.mean(dim=dims, keepdim=True)
    xc = input - mu
    var = (xc * xc).mean(dim=dims, keepdim=True)
    y = xc / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def instance_norm_primitive(input: Tensor, running_mean=None, running_var=None, weight=None,
                            bias=None, use_input_stats: bool = True, momentum: float = 0.1,
                            eps: float = 1e-5) -> Tensor:
    if not use_input_stats:
        raise NotImplementedError("instance_norm with running statistics in the oracle")
    dims = tuple(range(2, input.dim()))
    mu = input.mean(dim=dims, keepdim=True)
    xc = input - mu
    var = (xc * xc).mean(dim=dims, keepdim=True)
    y = xc / torch.sqrt(var + eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def sdpa_primitive(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                   enable_gqa: bool = False) -> Tensor:
    """softmax(q kᵀ · scale + mask) v in primitive ops. Works on plain tensors (the oracle) and on
    jets (the Taylor rule of F.scaled_dot_product_attention is this function: each op meets its
    rule). Attention dropout uses F.dropout on the weights (its own random draws)."""
    L, S = query.shape[-2], key.shape[-2]
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * s
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, True)
    return torch.matmul(weights, value)


@contextlib.contextmanager
def primitive_ops(enabled: bool = True) -> Iterator[None]:
    """Replace F.layer_norm, F.instance_norm and F.scaled_dot_product_attention by primitive-op
    versions (whose nested derivatives PyTorch gets right) inside the block."""
    if not enabled:
        yield
        return
    saved = {n: getattr(F, n) for n in ("layer_norm", "instance_norm", "scaled_dot_product_attention")}
    F.layer_norm = layer_norm_primitive
    F.instance_norm = instance_norm_primitive
    F.scaled_dot_product_attention = sdpa_primitive
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(F, n, f)


def _dt_all(out: Tensor, t: Tensor) -> Tensor:
    """d out / dt for every element of ``out`` (a function of the scalar t), by two reverse passes:
    s(v) = ⟨v, d out/dt⟩ is linear in v, so ∂s/∂v = d out/dt; both passes keep the graph."""
    if not out.requires_grad:  # constant in t from here on
        return torch.zeros_like(out)
    v = torch.zeros_like(out, requires_grad=True)
    (s,) = torch.autograd.grad(out, t, grad_outputs=v, create_graph=True, allow_unused=True)
    if s is None or not s.requires_grad:
        return torch.zeros_like(out)
    (d,) = torch.autograd.grad(s, v, create_graph=True, allow_unused=True)
    return torch.zeros_like(out) if d is None else d


def jet(fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, order: int,
        primitive: bool = True) -> Tensor:
    """Normalized coefficients f_0..f_K of t ↦ fn(x + t·u) by nested reverse mode (slow oracle)."""
    with primitive_ops(primitive):
        t = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
        cur = fn(x + t * u)
        out = [cur]
        for k in range(1, order + 1):
            cur = _dt_all(cur, t)
            out.append(cur / math.factorial(k))
    return torch.stack(out)


def directional_derivatives(fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, order: int,
                            primitive: bool = True) -> Tensor:
    """d_n = Dⁿfn(x)[u,…,u], n = 1..order, by nested reverse mode."""
    c = jet(fn, x, u, order, primitive)
    return torch.stack([c[n] * math.factorial(n) for n in range(1, order + 1)])


def per_sample_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """The default loss of every entry point: the per-sample cross-entropy ℓ_b = CE(z_b, y_b)
    (docs/math.md §3: the function whose derivatives λ and CRR are about). The model must return
    the logits as one tensor; for a model returning a tuple or an output object (Hugging Face's
    ``ModelOutput``) pass a ``loss_fn`` that picks them, e.g. ``lambda out, y:
    F.cross_entropy(out.logits, y, reduction="none")``."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"the default loss (per-sample cross-entropy) needs the model to return the logits "
                        f"as one tensor, got {type(logits).__name__}; pass loss_fn=lambda out, y: ... that "
                        "picks them (e.g. F.cross_entropy(out.logits, y, reduction='none') for a Hugging "
                        "Face model, or out[0] for a tuple)")
    if logits.dim() < 2 or (isinstance(y, Tensor) and y.dim() >= 1 and logits.shape[0] != y.shape[0]):
        raise ValueError(f"the default loss (per-sample cross-entropy) needs the model to return logits of shape "
                         f"(B, C, ...), one row of class scores per sample, got shape {tuple(logits.shape)} for "
                         f"labels of shape {tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}; for "
                         "another output (one value per sample, a regression) pass loss_fn=lambda out, y: ... "
                         "returning one loss per sample")
    return F.cross_entropy(logits, y, reduction="none")


def nested_directional_derivatives(per_sample_loss: Callable[[Tensor], Tensor], x: Tensor,
                                   directions, order: int) -> Tensor:
    """The reference code's loop (docs/math.md §3): s_0 = Σ_b ℓ_b(X); for n = 1..order,
    g_n = ∂s_{n−1}/∂X (create_graph), d_n[b] = ⟨g_n[b], u_n[b]⟩, s_n = Σ_b d_n[b]. Returns (order, B).

    ``directions`` is one tensor of x's shape (the same u at every order: then d_n is the pure
    n-th derivative along u) or a callable ``n ↦ u_n`` called after g_n is formed, so that a fresh
    draw per order consumes the random stream exactly as the reference code does (then d_n is the
    mixed derivative Dⁿℓ[u_1, …, u_n]). Once s_n no longer depends on X the rest are zero (the
    directions are still drawn, keeping the stream)."""
    X = x.detach().clone().requires_grad_(True)
    s = per_sample_loss(X).sum()
    out: List[Tensor] = []
    for n in range(1, order + 1):
        g = None
        if s.requires_grad:
            (g,) = torch.autograd.grad(s, X, create_graph=True, allow_unused=True)
        u = directions(n, X) if callable(directions) else directions
        if g is None:
            d = torch.zeros(X.shape[0], dtype=torch.promote_types(X.dtype, u.dtype), device=X.device)
        else:
            d = (g.reshape(g.shape[0], -1) * u.reshape(u.shape[0], -1)).sum(dim=1)
        out.append(d)
        s = d.sum()
    return torch.stack(out)


def loss_directional_derivatives(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, u: Tensor,
                                 order: int, loss_fn: Optional[Callable] = None,
                                 primitive: bool = True) -> Tensor:
    """The paper's method (docs/math.md §3): s_0 = Σ_b ℓ_b; g_n = ∂s_{n−1}/∂X (create_graph);
    d_n[b] = ⟨g_n[b], u[b]⟩; s_n = Σ_b d_n[b]. ``u`` of shape x.shape gives (order, B); of shape
    (D, *x.shape) gives (order, D, B), looping over the D directions as the reference code does."""
    loss_fn = loss_fn or per_sample_cross_entropy
    if u.dim() == x.dim() + 1:
        return torch.stack([loss_directional_derivatives(model, x, y, u[d], order, loss_fn, primitive)
                            for d in range(u.shape[0])], dim=1)
    with primitive_ops(primitive):
        return nested_directional_derivatives(lambda X: loss_fn(model(X), y), x, u, order)
