"""Shared test helpers: relative errors against the float64 nested-autograd oracle."""
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def rand(*shape, seed=None, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def derivatives_and_grads(model, x, y, u, order, **kwargs):
    """curvrate_fast's per-sample loss derivatives and the gradient of Σ|d_n| w.r.t. every parameter."""
    import curvrate_fast as cf
    params = [p for p in model.parameters() if p.requires_grad]
    d = cf.loss_directional_derivatives(model, x, y, u, order, **kwargs)
    return d, torch.autograd.grad(d.abs().sum(), params)
