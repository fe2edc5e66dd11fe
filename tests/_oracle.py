"""Shared test helpers: relative errors against the float64 nested-autograd oracle."""
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def rand(*shape, seed=None, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=g, dtype=dtype) * scale
