"""Second derivatives through the engine's Toeplitz backwards (activation jets: reference rules and
C++ kernels; the logsumexp jet behind cross-entropy) are refused with an error that names the op,
never returned wrong (curvrate_fast/first_order.py). Before the guard a second derivative through
a small MLP's loss derivatives was 25 % (reference) to 100 % (C++) off nested autograd. First
derivatives, with or without create_graph, are unchanged."""
import pytest
import torch
import torch.nn as nn

import curvrate_fast as cf
import curvrate_fast.rules.reductions as red
from curvrate_fast import baseline, cpp_backend

D64 = torch.float64
BACKENDS = ["reference"] + (["cpp"] if cpp_backend.available() else [])


def _model_and_data(classes=4):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, classes)).double()
    x, u = torch.randn(5, 3, dtype=D64), torch.randn(5, 3, dtype=D64)
    y = torch.randint(0, classes, (5,))
    return m, x, y, u


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_through_loss_derivatives_is_refused(backend):
    m, x, y, u = _model_and_data()
    W = m[0].weight
    with cf.jets.registry.engine_settings(backend=backend):
        d = cf.loss_directional_derivatives(m, x, y, u, 2)
    (g,) = torch.autograd.grad(d.pow(2).sum(), W, create_graph=True)
    # the first derivative, computed with create_graph, is the exact one
    (g_ref,) = torch.autograd.grad(baseline.loss_directional_derivatives(m, x, y, u, 2).pow(2).sum(), W)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-14)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(g.pow(2).sum(), W)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_through_an_activation_jet_is_refused(backend):
    """The model's own derivatives (no cross-entropy): only the activation jet's guard is met."""
    m, x, _, u = _model_and_data()
    W = m[0].weight
    with cf.jets.registry.engine_settings(backend=backend):
        d = cf.directional_derivatives(m, x, u, 2)
    (g,) = torch.autograd.grad(d.pow(2).sum(), W, create_graph=True)
    (g_ref,) = torch.autograd.grad(baseline.directional_derivatives(m, x, u, 2).pow(2).sum(), W)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-14)
    with pytest.raises(RuntimeError, match="activation jet"):
        torch.autograd.grad(g.pow(2).sum(), W)


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_with_a_constant_incoming_gradient_is_refused_at_once(backend):
    """An activation whose output reaches the result through no parameter gets a constant incoming
    gradient: no later backward could reach a guard, so the create_graph backward itself raises."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 6), nn.Tanh()).double()
    x, u = torch.randn(4, 3, dtype=D64), torch.randn(4, 3, dtype=D64)
    with cf.jets.registry.engine_settings(backend=backend):
        d = cf.directional_derivatives(m, x, u, 3)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(d.sum(), m[0].weight, create_graph=True)
    with cf.jets.registry.engine_settings(backend=backend):
        d = cf.directional_derivatives(m, x, u, 3)
    (g,) = torch.autograd.grad(d.sum(), m[0].weight)               # an ordinary backward: fine
    (g_ref,) = torch.autograd.grad(baseline.directional_derivatives(m, x, u, 3).sum(), m[0].weight)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("blocks", [False, True])
def test_logsumexp_jet_second_derivative_is_refused(monkeypatch, blocks):
    if blocks:
        monkeypatch.setattr(red, "LSE_BLOCK_ELEMENTS", 16)
    c = torch.randn(3, 6, 5, dtype=D64, requires_grad=True)
    y = red._LogSumExpJet.apply(c, (1,), 3)
    w = torch.randn(y.shape, dtype=D64, requires_grad=True)       # an incoming gradient with a graph
    (g,) = torch.autograd.grad(y, c, w, create_graph=True)
    (g0,) = torch.autograd.grad(red._LogSumExpJet.apply(c, (1,), 3), c, w.detach())
    assert torch.equal(g.detach(), g0)
    with pytest.raises(RuntimeError, match="logsumexp jet"):
        torch.autograd.grad(g.sum(), w)
