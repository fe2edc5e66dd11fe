"""Tiny GEMMs of captured CPU graphs (curvrate_fast.cpu_gemm.decompose_tiny_gemms): each mm/addmm
with M, N or K ≤ TINY_GEMM_DIM (K only with b contiguous along N) becomes a broadcast product summed
over K, with the same values (float64: to rounding); a tiny K over a strided b, larger GEMMs, half
precision and "aten" mode are left alone;
a captured Two Moons CRR step (2-feature input, 2 logits) equals the eager engine."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import curvrate_fast as cf
from curvrate_fast import cpu_gemm

aten = torch.ops.aten


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


@pytest.mark.parametrize("shape", [(64, 512, 2), (3, 64, 40), (300, 2, 64), (1, 1, 1), (4, 4, 4)])
def test_decomposed_mm_and_addmm_equal_the_gemm(shape):
    m, k, n = shape
    g = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, dtype=torch.float64, generator=g)
    b = torch.randn(k, n, dtype=torch.float64, generator=g)
    bias = torch.randn(n, dtype=torch.float64, generator=g)

    def f(a, b, bias):
        return torch.tanh(a @ b), torch.addmm(bias, a, b), a.t().t() @ b.t().contiguous().t()

    gm = make_fx(f)(a, b, bias)
    ref = f(a, b, bias)
    # with only K tiny, the product over a strided b (the third) stays a GEMM
    strided_kept = min(m, n) > cpu_gemm.TINY_GEMM_DIM
    assert cpu_gemm.decompose_tiny_gemms(gm) == 3 - strided_kept
    assert _count(gm, aten.mm.default) == strided_kept and _count(gm, aten.addmm.default) == 0
    for out, r in zip(gm(a, b, bias), ref):
        torch.testing.assert_close(out, r, rtol=1e-13, atol=1e-13)


def test_larger_gemms_and_aten_mode_are_left_alone():
    # no tiny dimension; a tiny K over a strided b (the transposed weight of a 2-feature layer)
    for a, b in [(torch.randn(32, 16), torch.randn(16, 8)), (torch.randn(300, 2), torch.randn(64, 2).t())]:
        gm = make_fx(lambda a, b: a @ b)(a, b)
        assert cpu_gemm.decompose_tiny_gemms(gm) == 0
        assert _count(gm, aten.mm.default) == 1
    gm = make_fx(lambda a, b: a @ b)(torch.randn(32, 8), torch.randn(8, 2))
    assert cpu_gemm.rewrite_graph(gm, "aten") == 0
    assert _count(gm, aten.mm.default) == 1
    assert cpu_gemm.rewrite_graph(gm, "auto") == 1
    assert _count(gm, aten.mm.default) == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.bfloat16, torch.float16])
def test_integer_and_half_gemms_are_left_alone(dtype):
    a, b = torch.ones(8, 2, dtype=dtype), torch.ones(2, 8, dtype=dtype)
    gm = make_fx(lambda a, b: a @ b)(a, b)
    assert cpu_gemm.decompose_tiny_gemms(gm) == 0


def test_captured_two_moons_crr_with_tiny_gemms_equals_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (32,))
    kw = dict(orders=(2, 3), directions="per_order", subset=16, scale=0.1)
    vals = []
    for compile_ in (False, "eager"):
        m = __import__("copy").deepcopy(model)
        crit = cf.CRRLoss(**kw, compile=compile_)
        torch.manual_seed(5)
        loss = crit(m, x, y)
        loss.backward()
        vals.append((loss.detach(), [p.grad for p in m.parameters()]))
    graph = cf.crr._PROGRAMS[("total", "eager", ())].graphs()[-1]
    shapes = [[tuple(a.meta["val"].shape) for a in n.args[-2:]] for n in graph.graph.nodes
              if n.op == "call_function" and n.target in (aten.mm.default, aten.addmm.default)]
    assert shapes and all(min(a[0], b[1]) > cpu_gemm.TINY_GEMM_DIM for a, b in shapes)   # (tiny K: strided b)
    torch.testing.assert_close(vals[1][0], vals[0][0], rtol=1e-12, atol=1e-12)
    for g1, g0 in zip(vals[1][1], vals[0][1]):
        torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-12)
