"""The logsumexp jet of a large input on the CPU runs block by block (rules/reductions.py,
``LSE_BLOCK_ELEMENTS``): the same numbers as the one-block computation, bit for bit, forward and
backward; the derivatives of a cross-entropy over many classes still match nested autograd; a
captured graph keeps the one-block form (its compiler fuses it)."""
import pytest
import torch
import torch.nn as nn

import curvrate_fast as cf
import curvrate_fast.rules.reductions as red
from curvrate_fast import baseline

SHAPES = [((6, 5), (1,), 4, 3), ((3, 4, 7), (2,), 5, 4), ((3, 4, 7), (1, 2), 3, 4),
          ((2, 3, 4, 5), (3,), 2, 4), ((9, 3), (1,), 1, 2)]


def _jet_and_grad(c, dims, K):
    c = c.clone().requires_grad_(True)
    y = red._LogSumExpJet.apply(c, dims, K)
    gy = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape)
    (g,) = torch.autograd.grad(y, c, gy)
    return y.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,dims,n,K", SHAPES)
def test_blocks_give_the_one_block_numbers(monkeypatch, shape, dims, n, K, dtype):
    c = torch.randn((n,) + shape, dtype=dtype, generator=torch.Generator().manual_seed(3)) * 3
    y_one, g_one = _jet_and_grad(c, dims, K)
    monkeypatch.setattr(red, "LSE_BLOCK_ELEMENTS", 8)
    assert red._row_blocks(c, dims) is not None          # this shape is run in blocks now
    y_blk, g_blk = _jet_and_grad(c, dims, K)
    assert y_blk.shape == y_one.shape and g_blk.shape == g_one.shape
    assert torch.equal(y_blk, y_one) and torch.equal(g_blk, g_one)
    # the no-grad path (λ estimation) too
    with torch.no_grad():
        jet = cf.jets.tensor.JetTensor(c, K)
        a = red.logsumexp_coeffs(jet, [d for d in dims], keepdim=False)
    monkeypatch.setattr(red, "LSE_BLOCK_ELEMENTS", 1 << 40)
    with torch.no_grad():
        b = red.logsumexp_coeffs(cf.jets.tensor.JetTensor(c, K), [d for d in dims], keepdim=False)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_not_in_blocks_when_not_worth_it_or_not_possible(monkeypatch):
    monkeypatch.setattr(red, "LSE_BLOCK_ELEMENTS", 8)
    c = torch.randn(3, 4, 7)
    assert red._row_blocks(c, (0,)) is None               # a leading axis reduced
    assert red._row_blocks(c, (0, 1)) is None             # every axis reduced
    assert red._row_blocks(c.transpose(1, 2), (1,)) is None   # not contiguous
    monkeypatch.setattr(red, "LSE_BLOCK_ELEMENTS", 1 << 18)
    assert red._row_blocks(c, (1,)) is None               # one block holds it all


def test_many_class_cross_entropy_derivatives_match_nested_autograd(monkeypatch):
    monkeypatch.setattr(red, "LSE_BLOCK_ELEMENTS", 64)    # blocks of a few rows
    calls = []
    real = red._lse_blocks
    monkeypatch.setattr(red, "_lse_blocks", lambda *a: calls.append(a[1]) or real(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 40)).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randint(0, 40, (12,))
    u = torch.randn(12, 5, dtype=torch.float64)
    d = cf.loss_directional_derivatives(model, x, y, u, 4)
    ref = baseline.loss_directional_derivatives(model, x, y, u, 4)
    assert torch.allclose(d, ref, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    g = torch.autograd.grad(d.abs().mean(), params)
    g_ref = torch.autograd.grad(baseline.loss_directional_derivatives(model, x, y, u, 4).abs().mean(), params)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert calls                                           # the cross-entropy's jet ran in blocks


def test_a_captured_graph_keeps_one_block(monkeypatch):
    monkeypatch.setattr(red, "LSE_BLOCK_ELEMENTS", 8)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    x, y, u = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 10, (6,)), torch.randn(6, 3, dtype=torch.float64)

    def loss(m, x, y, u):
        return cf.loss_directional_derivatives(m, x, y, u, 3).abs().mean()

    fast = cf.compile(loss, backend="eager")
    v = fast(model, x, y, u)
    assert torch.allclose(v, loss(model, x, y, u), rtol=1e-12)
    (gm,) = fast.graphs()
    amax = [n for n in gm.graph.nodes if n.op == "call_function" and "amax" in str(n.target)]
    assert len(amax) == 1                                  # one logsumexp, not one per block
