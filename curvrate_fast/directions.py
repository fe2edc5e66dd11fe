r"""Random unit directions and polarization (docs/math.md §1, §4).

**Directions.** The paper draws one independent unit vector per sample (docs/math.md §1):

    u_b = g_b / (‖g_b‖₂ + 1e-12),   g_b ~ N(0, I) of the shape of one sample,

normalized over *all* of the sample's entries (e.g. all 784 pixels of an MNIST image) and never
shared across the batch. :func:`sample_directions` draws ``n_dirs`` such sets with ``n_dirs``
consecutive ``torch.randn(x.shape)`` calls (the order in which the reference code draws them).

**Polarization.** A mixed derivative with distinct directions is a signed sum of pure-direction
derivatives (docs/math.md §4):

    Dⁿf[u_1,…,u_n] = 1/(2^{n−1}·n!) · Σ_{ε∈{±1}^{n−1}} (Π_i ε_i) · Dⁿf[(u_1 + Σ_i ε_i u_{i+1})ⁿ].

With normalized Taylor coefficients f_n(w) = Dⁿf[wⁿ]/n! this reads
Dⁿf[u_1,…,u_n] = Σ_ε c_ε · f_n(w_ε) with c_ε = Π ε_i / 2^{n−1}, w_ε = u_1 + Σ ε_i u_{i+1}.
:func:`polarization` returns the 2^{n−1} directions w_ε and the weights c_ε; all of them are rows of
one batched jet pass. The same rows also give every lower mixed derivative Dᵐf[u_1,…,u_m], m < n
(weights Π_{i<m} ε_i / 2^{n−1}), so the orders 1..n of the notebooks' loop need 2^{n−1} rows in
all. This is how ``crr_penalty(directions="per_order")`` reproduces the notebooks' fresh direction
at every order (nested ``grad`` of ⟨grad, u_1⟩, then ⟨·, u_2⟩, …) exactly.

Example::

    >>> u = sample_directions(x, n_dirs=2)            # (2, *x.shape), unit norm per sample
    >>> W, c = polarization([u1, u2, u3])             # W: (4, *x.shape), c: (4,)
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .finite import require_finite

__all__ = ["DIRECTION_EPS", "normalize_directions", "sample_directions", "draw_directions", "check_directions",
           "polarization", "polarization_weights"]

#: the ε in u = g / (‖g‖₂ + ε) (docs/math.md §1, the reference code's value)
DIRECTION_EPS = 1e-12


def normalize_directions(u: Tensor, batch_dims: int = 1) -> Tensor:
    """u / (‖u‖₂ + 1e-12), the norm taken per sample over every entry after the first
    ``batch_dims`` axes (docs/math.md §1).

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
    RNG), normalized per sample: u_b = g_b / (‖g_b‖₂ + 1e-12) (docs/math.md §1). ``dtype`` defaults to
    ``x.dtype``. The numbers are drawn on the generator's device (a CPU generator works for CUDA
    inputs) and moved to ``x.device``.

    Example::

        >>> x = torch.randn(16, 2)
        >>> u = sample_directions(x, n_dirs=2, generator=torch.Generator().manual_seed(0))
        >>> u.shape, u[0].norm(dim=1)          # (2, 16, 2), all ones
    """
    return normalize_directions(draw_directions(x, n_dirs, generator=generator, dtype=dtype), batch_dims=2)


def draw_directions(x: Tensor, n_dirs: int = 1, *, generator: Optional[torch.Generator] = None,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """The draws of :func:`sample_directions` before their normalization: ``n_dirs`` standard
    normal tensors shaped like ``x``, stacked, on ``x.device`` (the same random numbers, from the
    same generator calls). A captured CRR program takes these and normalizes them inside its graph.

    Example::

        >>> g = torch.randn(16, 2)
        >>> d = draw_directions(g, 2, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(normalize_directions(d, batch_dims=2),
        ...                sample_directions(g, 2, generator=torch.Generator().manual_seed(0)))
        True
    """
    n_dirs = _check_positive_int("n_dirs", n_dirs)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with a batch dimension")
    dtype = dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype())
    dev = generator.device if generator is not None else x.device
    # one normal_ fill per direction (randn's own draw: the numbers of n_dirs randn calls), into
    # one tensor instead of stacking n_dirs of them
    out = torch.empty((n_dirs,) + tuple(x.shape), dtype=dtype, device=dev)
    for d in out:
        d.normal_(generator=generator)
    return out.to(x.device)


def check_directions(u: Tensor, x: Tensor, *, name: str = "directions", values: bool = True) -> Tensor:
    """Validate user-given directions: shape ``x.shape`` or ``(D, *x.shape)``, finite, and no
    sample with a zero direction (a zero direction gives zero derivatives of every order and
    log 0 = −∞ in λ). Returns ``u`` as ``(D, *x.shape)`` in ``x``'s dtype and device.

    Example::

        >>> check_directions(torch.randn(8, 2), torch.randn(8, 2)).shape
        torch.Size([1, 8, 2])
    """
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
    if not values:  # shapes only: a captured program checks the values before its graph
        return u
    require_finite(u, name)
    norms = u.reshape(u.shape[0], u.shape[1], -1).norm(dim=-1)
    if bool((norms == 0).any()):
        k, b = (norms == 0).nonzero()[0].tolist()
        raise ValueError(f"{name}[{k}] is zero for sample {b}: a zero direction has no derivative "
                         "to measure (every d_n would be 0)")
    return u


def polarization(us: Sequence[Tensor], order: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Directions and weights that turn pure-direction jets into the mixed derivative
    Dᵐf[u_1,…,u_m] (docs/math.md §4), for every m ≤ n from the same 2^{n−1} directions.

    Returns ``W`` of shape ``(2^{n−1}, *u.shape)`` with W_ε = u_1 + Σ_{i=2..n} ε_i u_i, and ``c`` of
    shape ``(2^{n−1},)`` with c_ε = Π_{i=2..m} ε_i / 2^{n−1} (m = ``order``, default n), such that

        Dᵐf[u_1,…,u_m] = Σ_ε c_ε · f_m(W_ε),   f_m(w) = Dᵐf[wᵐ] / m!  (normalized coefficient).

    For m = n this is docs/math.md §4's formula. For m < n it holds because averaging
    Π_{i=2..m} ε_i · Dᵐf[W_εᵐ] over all ε ∈ {±1}^{n−1} keeps only the multinomial terms in which
    u_2..u_m appear an odd number of times and u_{m+1}..u_n an even number; with m slots in total
    the only such term is m!·Dᵐf[u_1,…,u_m]. So the lower orders of the notebooks' loop (which
    share u_1..u_m with the top order) cost no extra jets: orders 1..n need 2^{n−1} rows in all
    (orders 2–3: 4 rows per sample, 1–4: 8). ε runs over {±1}^{n−1} in
    ``itertools.product((1, -1), ...)`` order.

    Example::

        >>> W, c = polarization([u1, u2])        # W = [u1 + u2, u1 − u2], c = [1/2, −1/2]
        >>> f = curvrate_fast.jet(g, x.expand(2, *x.shape), W, order=2)[2]
        >>> mixed = (c[:, None] * f).sum(0)       # D²g[u1, u2]
        >>> _, c1 = polarization([u1, u2], order=1)   # [1/2, 1/2]: Dg[u1] from the same rows
    """
    us = list(us)
    n = len(us)
    if n < 1:
        raise ValueError("polarization needs at least one direction")
    ref = us[0]
    for u in us[1:]:
        if u.shape != ref.shape:
            raise ValueError("all directions must have one shape")
    W: List[Tensor] = []
    for eps in itertools.product((1.0, -1.0), repeat=n - 1):
        w = ref
        for e, u in zip(eps, us[1:]):
            w = w + u if e > 0 else w - u
        W.append(w)
    return torch.stack(W), polarization_weights(n, order, dtype=ref.dtype, device=ref.device)


def polarization_weights(n: int, order: Optional[int] = None, *, dtype: torch.dtype = torch.float64,
                         device: Optional[torch.device] = None) -> Tensor:
    """The weights c_ε = Π_{i=2..m} ε_i / 2^{n−1} of :func:`polarization` (m = ``order``, default
    n) for the 2^{n−1} rows W_ε, without building the rows.

    Example::

        >>> polarization_weights(3, order=2)
        tensor([ 0.2500,  0.2500, -0.2500, -0.2500], dtype=torch.float64)
    """
    m = n if order is None else order
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"order must be an int in 1..{n}, got {order!r}")
    c = []
    for eps in itertools.product((1.0, -1.0), repeat=n - 1):
        prod = 1.0
        for e in eps[: m - 1]:
            prod *= e
        c.append(prod / 2.0 ** (n - 1))
    return torch.tensor(c, dtype=dtype, device=device)


def _check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int ≥ 1, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be ≥ 1, got {v}")
    return v
