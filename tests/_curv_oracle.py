"""Shared helpers of test_curvature / test_crr / test_compat_flatgrad / test_tracking: tiny models
and nested-autograd oracles written from docs/math.md §3–4 (the paper's method)."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def tiny_mlp(seed: int = 0, din: int = 3, hidden: int = 8, dout: int = 3,
             dtype: torch.dtype = torch.float64, act=torch.nn.Tanh) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(din, hidden), act(), torch.nn.Linear(hidden, hidden),
                            act(), torch.nn.Linear(hidden, dout))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.8)
    return m.to(dtype)


def data(seed: int = 0, B: int = 10, din: int = 3, classes: int = 3,
         dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(B, din, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (B,), generator=g)
    return x, y


def unit(shape, seed: int, dtype=torch.float64) -> Tensor:
    """Unit directions per sample (first axis = batch)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g, dtype=dtype)
    flat = u.reshape(shape[0], -1)
    return (flat / flat.norm(dim=1, keepdim=True)).reshape(shape)


def ce_none(z: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(z, t, reduction="none")


def nested_mixed(model, x: Tensor, y: Tensor, us: Sequence[Tensor], loss_fn=ce_none,
                 create_graph: bool = True) -> List[Tensor]:
    """The notebooks' loop: g_1 = ∇Σℓ, d_1 = ⟨g_1, u_1⟩, g_2 = ∇Σd_1, d_2 = ⟨g_2, u_2⟩, …;
    d_n = Dⁿℓ[u_1, …, u_n]. With all u_i equal this is the paper's fixed-direction method."""
    X = x.detach().clone().requires_grad_(True)
    s = loss_fn(model(X), y).sum()
    out = []
    for u in us:
        (g,) = torch.autograd.grad(s, X, create_graph=create_graph)
        d = (g.reshape(g.shape[0], -1) * u.reshape(u.shape[0], -1)).sum(1)
        out.append(d)
        s = d.sum()
    return out


def nested_fixed(model, x, y, U: Tensor, N: int, loss_fn=ce_none) -> Tensor:
    """(N, D, B) with U of shape (D, B, ...): d_n = Dⁿℓ[uⁿ] per direction set."""
    return torch.stack([torch.stack(nested_mixed(model, x, y, [U[k]] * N, loss_fn))
                        for k in range(U.shape[0])], dim=1)
