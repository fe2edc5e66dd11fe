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


def fd_jet(fn, inputs, directions, order: int = 3):
    """An oracle that shares no code with the engine: the Taylor coefficients 0..order of
    t ↦ fn(*[x + t·u]) at t = 0 from Chebyshev interpolation of the plain function on shrinking
    intervals [−h, h], element by element the first pair of consecutive h whose fits agree
    (tests/_opinfo.py). ``fn`` returns one float64 tensor. Returns (coefficients, tolerance,
    conclusive mask), each of shape (order + 1, numel) but the mask (numel,).

    Example::

        >>> c, tol, ok = fd_jet(torch.special.i0e, [x], [u], order=3)
        >>> assert ((ours.reshape(4, -1) - c).abs() <= tol)[:, ok].all()
    """
    import _opinfo
    old = _opinfo.K
    _opinfo.set_order(order)
    try:
        def g(t):
            out = fn(*[x + t * u for x, u in zip(inputs, directions)])
            return [torch.view_as_real(out.resolve_conj()) if out.is_complex() else out.to(torch.float64)]
        (best, tol, mask), = _opinfo.oracle(g)
        return best, tol, mask
    finally:
        _opinfo.set_order(old)


def assert_matches_fd(ours, fn, inputs, directions, order: int = 3, min_conclusive: float = 0.5):
    """``ours`` (order + 1, *shape) equals the finite-difference oracle wherever the oracle is
    conclusive, and the oracle is conclusive on at least ``min_conclusive`` of the elements."""
    best, tol, mask = fd_jet(fn, inputs, directions, order)
    c = ours.detach()
    c = torch.view_as_real(c.resolve_conj()) if c.is_complex() else c.to(torch.float64)
    c = c.reshape(order + 1, -1)
    assert mask.float().mean() >= min_conclusive, "the finite-difference oracle is inconclusive here"
    diff = (c - best).abs()[:, mask]
    bad = diff > tol[:, mask]
    assert not bool(bad.any()), (f"max |ours − oracle| = {float(diff.max()):.3g} at order "
                                 f"{int(bad.nonzero()[0][0])}")
