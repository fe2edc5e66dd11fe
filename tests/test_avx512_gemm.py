"""The AVX-512 float32 GEMM of csrc/cpu_gemm.cpp (curvrate_fast.cpu_gemm.avx512_mm) against a
float64 product: within the float32 error bound of a length-K sum, elementwise, on the layouts a
captured linear layer hands it (x·Wᵀ, gᵀ·x, g·W), on sizes around its 6-row and 16/64-column tiles,
broadcast, strided and empty operands; the same bits for 1 and 2 threads; errors for operands it
does not multiply; and in use: graph rewrites (modes "avx512" and "auto"), a captured float32 step
compiled by inductor, and the eager linear rule, each against the eager engine or nested autograd.
On a CPU without AVX-512 the op is at::mm (the value tests still run; the rest is skipped)."""
import pytest
import torch
import torch.nn.functional as F
from _gemm_kernels import assert_eager_engine_on_kernel_matches_nested_autograd
from models import mlp
from torch.fx.experimental.proxy_tensor import make_fx

import curvrate_fast as cf
from curvrate_fast import cpp_backend, cpu_gemm

EPS32 = 2.0 ** -24


@pytest.fixture(scope="module", autouse=True)
def built():
    cpp_backend.build()  # compiles once (cached); a failure here is a real failure
    assert hasattr(torch.ops.curvrate_fast, "avx512_mm")


@pytest.fixture
def avx512(built):
    """Skips where the CPU has no AVX-512 (checked after the build: a collection-time check would
    skip these on every fresh CI run, before anything is built)."""
    if not cpu_gemm.avx512_available():
        pytest.skip("this CPU has no AVX-512 (the op falls back to at::mm)")


def _mm(a, b):
    return torch.ops.curvrate_fast.avx512_mm(a, b)


def _assert_within_float32_bound(out, a, b, what=""):
    """|C − A·B| ≤ (K+2)·ε₃₂·(|A|·|B|) elementwise (a sequential float32 sum of K products: each
    product and addition rounds once), A·B in float64."""
    a64, b64 = a.double(), b.double()
    ref = a64 @ b64
    bound = (a.shape[1] + 2) * EPS32 * (a64.abs() @ b64.abs()) + 1e-30
    assert out.shape == ref.shape and out.dtype == torch.float32
    excess = ((out.double() - ref).abs() / bound).max() if out.numel() else torch.tensor(0.0)
    assert float(excess) <= 1.0, f"{what}: error {float(excess):.2f}× the float32 bound"


def _layouts(m, k, n, g):
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    gr = torch.randn(m, n, generator=g)
    return {"forward x·Wᵀ": (x, w.t()), "weight grad gᵀ·x": (gr.t(), x), "input grad g·W": (gr, w),
            "dense": (x, torch.randn(k, n, generator=g))}


# sizes around the register tile (6 rows, 16-float vectors, 64-column blocks)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 3, 15), (6, 64, 16), (7, 65, 17), (13, 2, 63), (48, 100, 64),
                                   (49, 31, 65), (100, 7, 130), (640, 64, 64), (6, 300, 129)])
def test_matches_float64_within_the_float32_bound(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    for name, (a, b) in _layouts(m, k, n, g).items():
        _assert_within_float32_bound(_mm(a, b), a, b, name)


def test_broadcast_strided_and_empty_operands():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50, 80, generator=g)
    big = torch.randn(80, 30, generator=g)
    cases = [(torch.randn(8, 4, generator=g), torch.randn(4, 1, generator=g).expand(4, 70)),   # stride-0 columns of b
             (torch.randn(4, 1, generator=g).expand(4, 5), torch.randn(5, 33, generator=g)),   # stride-0 columns of a
             (torch.randn(1, 6, generator=g).expand(9, 6), torch.randn(6, 20, generator=g)),   # stride-0 rows of a
             (torch.randn(6, 1, generator=g).expand(6, 9).t(), torch.randn(6, 20, generator=g)),  # aᵀ, stride 0
             (base[::3, ::2], big[::2, 1:21]),             # (17, 40) strided both ways · (40, 20), row stride 60
             (base[:20, :30], big.t()[:, 3:23]),           # b (30, 20) with column stride 30: copied dense
             (base[:20, :30], big.t()[:, 3:4])]            # one column, any stride
    for a, b in cases:
        _assert_within_float32_bound(_mm(a, b), a, b)
    assert _mm(torch.randn(0, 4), torch.randn(4, 3)).shape == (0, 3)
    assert _mm(torch.randn(3, 4), torch.randn(4, 0)).shape == (3, 0)
    torch.testing.assert_close(_mm(torch.randn(5, 0), torch.randn(0, 4)), torch.zeros(5, 4))


def test_same_bits_for_any_thread_count():
    """Each element is one sequential sum over k, whichever thread computes its row panel."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(1000, 96, generator=g), torch.randn(96, 200, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mm(a, b)
        torch.set_num_threads(2)
        two = _mm(a, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_refuses_what_it_does_not_multiply():
    with pytest.raises(RuntimeError, match="multiplies two matrices"):
        _mm(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="multiplies two matrices"):
        _mm(torch.randn(2, 3, 4), torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="float32 GEMM"):
        _mm(torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))
    out = _mm(torch.randn(5, 3, device="meta"), torch.randn(3, 4, device="meta"))   # the fake kernel
    assert out.shape == (5, 4) and out.device.type == "meta"


def test_rewrite_mode_avx512_and_auto(avx512):
    a, b = torch.randn(640, 64), torch.randn(64, 64)
    f = lambda a, b: torch.tanh(a @ b) @ b.t()   # noqa: E731
    gm = make_fx(f)(a, b)
    ref = f(a, b)
    assert cpu_gemm.rewrite_graph(gm, "avx512") == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.curvrate_fast.avx512_mm.default) == 2
    assert torch.ops.aten.mm.default not in targets
    torch.testing.assert_close(gm(a, b), ref, rtol=1e-5, atol=1e-5)
    gm = make_fx(f)(a, b)                          # "auto" rewrites to what it measures fastest
    n = cpu_gemm.rewrite_graph(gm, "auto")
    choice = cpu_gemm.fastest_gemm(a.shape, a.stride(), b.shape, b.stride(), tuple(cpu_gemm.KERNELS))
    assert choice in ("aten",) + tuple(cpu_gemm.KERNELS)
    assert n >= (choice != "aten")
    torch.testing.assert_close(gm(a, b), ref, rtol=1e-5, atol=1e-5)


def test_forced_mode_refuses_where_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "avx512_available", lambda: False)
    gm = make_fx(lambda a, b: a @ b)(torch.randn(64, 32), torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="AVX-512 GEMM is not available"):
        cpu_gemm.rewrite_graph(gm, "avx512")
    assert cpu_gemm.rewrite_graph(gm, "auto") == 0 or cpu_gemm.onednn_available()


def test_captured_inductor_step_with_avx512_gemms_matches_eager(avx512):
    """inductor calls the op as an extern kernel; the float32 loss derivatives and their
    parameter gradients agree with the eager engine to float32 rounding."""
    torch.manual_seed(0)
    model = mlp(torch.nn.Tanh(), d_in=6, width=64, classes=3)
    x, y, u = torch.randn(64, 6), torch.randint(0, 3, (64,)), torch.randn(64, 6)

    def loss(m, x, y, u):
        return cf.loss_directional_derivatives(m, x, y, u, 3).abs().mean()

    ref = loss(model, x, y, u)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    fast = cf.compile(loss, cpu_gemm="avx512")      # backend inductor
    out = fast(model, x, y, u)
    g = torch.autograd.grad(out, list(model.parameters()))
    targets = [n.target for n in fast.graphs()[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.curvrate_fast.avx512_mm.default in targets
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for gi, gr in zip(g, g_ref):
        torch.testing.assert_close(gi, gr, rtol=1e-4, atol=1e-5)


def test_eager_linear_on_avx512_matches_nested_autograd(avx512, monkeypatch):
    """The eager linear rule on the AVX-512 kernel (forward and input gradient): loss derivatives
    and their parameter gradients as nested autograd gives them; second derivatives of the
    linear layer itself as F.linear's (the backward under create_graph runs ATen products)."""
    assert_eager_engine_on_kernel_matches_nested_autograd(monkeypatch, "avx512")
    xs = torch.randn(40, 24, requires_grad=True)
    w = torch.randn(16, 24, requires_grad=True)

    def second(lin):
        (gx,) = torch.autograd.grad((lin(xs, w) ** 2).sum(), xs, create_graph=True)
        return torch.autograd.grad((gx * gx).sum(), w)[0]
    h, h_ref = second(cpu_gemm.eager_linear), second(F.linear)
    assert float((h - h_ref).abs().max() / h_ref.abs().max()) < 1e-5
