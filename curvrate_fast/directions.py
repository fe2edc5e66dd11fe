r"""Random unit directions and polarization (SPEC.md §1, §4).

**Directions.** The paper draws one independent unit vector per sample (SPEC.md §1):

    u_b = g_b / (‖g_b‖₂ + 1e-12),   g_b ~ N(0, I) of the shape of one sample,

normalized over *all* of the sample's entries (e.g. all 784 pixels of an MNIST image) and never
shared across the batch. :func:`sample_directions` draws ``n_dirs`` such sets with ``n_dirs``
consecutive ``torch.randn(x.shape)`` calls (the order in which the reference code draws them).

**Polarization.** A mixed derivative with distinct directions is a signed sum of pure-direction
derivatives (SPEC.md §4):

    Dⁿf[u_1,…,u_n] = 1/(2^{n−1}·n!) · Σ_{ε∈{±1}^{n−1}} (Π_i ε_i) · Dⁿf[(u_1 + Σ_i ε_i u_{i+1})ⁿ].

With normalized Taylor coefficients f_n(w) = Dⁿf[wⁿ]/n! this reads
Dⁿf[u_1,…,u_n] = Σ_ε c_ε · f_n(w_ε) with c_ε = Π ε_i / 2^{n−1}, w_ε = u_1 + Σ ε_i u_{i+1}.
:func:`polarization` returns the 2^{n−1} directions w_ε and the weights c_ε; all of them are rows of
one batched jet pass. This is how ``crr_penalty(directions="per_order")`` reproduces the notebooks'
fresh direction at every order (nested ``grad`` of ⟨grad, u_1⟩, then ⟨·, u_2⟩, …) exactly.

Example::

    >>> u = sample_directions(x, n_dirs=2)            # (2, *x.shape), unit norm per sample
    >>> W, c = polarization([u1, u2, u3])             # W: (4, *x.shape), c: (4,)
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["DIRECTION_EPS", "normalize_directions", "sample_directions", "check_directions",
           "polarization"]

#: the ε in u = g / (‖g‖₂ + ε) (SPEC.md §1, the reference code's value)
DIRECTION_EPS = 1e-12


def normalize_directions(u: Tensor, batch_dims: int = 1) -> Tensor:
    """u / (‖u‖₂ + 1e-12), the norm taken per sample over every entry after the first
    ``batch_dims`` axes (SPEC.md §1).

    Example::

        >>> u = normalize_directions(torch.randn(8, 1, 28, 28))   # each image has norm 1
    """
    lead = tuple(u.shape[:batch_dims])
    flat = u.reshape(lead + (-1,))
    norms = flat.norm(dim=-1, keepdim=True)
    return (flat / (norms + DIRECTION_EPS)).reshape(u.shape)


def sample_directions(x: Tensor, n_dirs: int = 1, *, generator: Optional[torch.Generator] = None,
                      dtype: Optional[torch.dtype] = None) -> Tensor:
    """``n_dirs`` independent random unit directions per sample, shape ``(n_dirs, *x.shape)``.

    Each set is one ``torch.randn(x.shape)`` call (with ``generator`` if given, else the global
    RNG), normalized per sample: u_b = g_b / (‖g_b‖₂ + 1e-12) (SPEC.md §1). ``dtype`` defaults to
    ``x.dtype``.

    Example::

        >>> x = torch.randn(16, 2)
        >>> u = sample_directions(x, n_dirs=2, generator=torch.Generator().manual_seed(0))
        >>> u.shape, u[0].norm(dim=1)          # (2, 16, 2), all ones
    """
    n_dirs = _check_positive_int("n_dirs", n_dirs)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with a batch dimension")
    dtype = dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype())
    out = [torch.randn(tuple(x.shape), generator=generator, dtype=dtype, device=x.device)
           for _ in range(n_dirs)]
    return normalize_directions(torch.stack(out), batch_dims=2)


def check_directions(u: Tensor, x: Tensor, *, name: str = "directions") -> Tensor:
    """Validate user-given directions: shape ``x.shape`` or ``(D, *x.shape)``, finite, and no
    sample with a zero direction (a zero direction gives zero derivatives of every order and
    log 0 = −∞ in λ). Returns ``u`` as ``(D, *x.shape)`` in ``x``'s dtype and device."""
    if not isinstance(u, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(u).__name__}")
    if tuple(u.shape) == tuple(x.shape):
        u = u.unsqueeze(0)
    elif not (u.dim() == x.dim() + 1 and tuple(u.shape[1:]) == tuple(x.shape)):
        raise ValueError(f"{name} must have shape {tuple(x.shape)} or (D, {', '.join(map(str, x.shape))}), "
                         f"got {tuple(u.shape)}")
    if u.shape[0] < 1:
        raise ValueError(f"{name} holds no direction")
    u = u.to(dtype=x.dtype, device=x.device)
    if not bool(torch.isfinite(u).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    norms = u.reshape(u.shape[0], u.shape[1], -1).norm(dim=-1)
    if bool((norms == 0).any()):
        k, b = (norms == 0).nonzero()[0].tolist()
        raise ValueError(f"{name}[{k}] is zero for sample {b}: a zero direction has no derivative "
                         "to measure (every d_n would be 0)")
    return u


def polarization(us: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Directions and weights that turn pure-direction jets into the mixed derivative
    Dⁿf[u_1,…,u_n] (SPEC.md §4).

    Returns ``W`` of shape ``(2^{n−1}, *u.shape)`` with W_ε = u_1 + Σ_i ε_i u_{i+1}, and ``c`` of
    shape ``(2^{n−1},)`` with c_ε = Π_i ε_i / 2^{n−1}, such that

        Dⁿf[u_1,…,u_n] = Σ_ε c_ε · f_n(W_ε),   f_n(w) = Dⁿf[wⁿ] / n!  (normalized coefficient).

    ε runs over {±1}^{n−1} in ``itertools.product((1, -1), ...)`` order.

    Example::

        >>> W, c = polarization([u1, u2])        # W = [u1 + u2, u1 − u2], c = [1/2, −1/2]
        >>> f = curvrate_fast.jet(g, x.expand(2, *x.shape), W, order=2)[2]
        >>> mixed = (c[:, None] * f).sum(0)       # D²g[u1, u2]
    """
    us = list(us)
    n = len(us)
    if n < 1:
        raise ValueError("polarization needs at least one direction")
    ref = us[0]
    for u in us[1:]:
        if u.shape != ref.shape:
            raise ValueError("all directions must have one shape")
    signs = list(itertools.product((1.0, -1.0), repeat=n - 1))
    W: List[Tensor] = []
    c: List[float] = []
    for eps in signs:
        w = ref
        for e, u in zip(eps, us[1:]):
            w = w + u if e > 0 else w - u
        W.append(w)
        prod = 1.0
        for e in eps:
            prod *= e
        c.append(prod / 2.0 ** (n - 1))
    return torch.stack(W), torch.tensor(c, dtype=ref.dtype, device=ref.device)


def _check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int ≥ 1, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be ≥ 1, got {v}")
    return v
