"""The CPU GEMM of captured programs (curvrate_fast.cpu_gemm): oneDNN's product equals torch.mm to
float32 rounding on every layout a captured graph hands it; the rewrite touches only float32 CPU
mm nodes, is off for "aten", on for every eligible node with "onednn"; a captured float32 step
with oneDNN GEMMs matches the eager engine; float64 graphs are never rewritten (the ≤ 1e-12
replay tests keep PyTorch's GEMM)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from _gemm_kernels import assert_eager_engine_on_kernel_matches_nested_autograd, force_kernel
from models import mlp
from torch.fx.experimental.proxy_tensor import make_fx

import curvrate_fast as cf
from curvrate_fast import cpu_gemm

pytestmark = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this PyTorch has no oneDNN")


def _layouts(m, k, n):
    """(a, b) pairs with the stride patterns of a captured linear layer: forward x·Wᵀ, weight
    gradient gᵀ·x, input gradient g·W."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    gr = torch.randn(m, n, generator=g)
    return {"forward": (x, w.t()), "weight grad": (gr.t(), x), "input grad": (gr, w)}


@pytest.mark.parametrize("shape", [(40, 24, 16), (7, 3, 5), (1, 9, 1)])
def test_cpu_mm_matches_mm_on_captured_layouts(shape):
    for name, (a, b) in _layouts(*shape).items():
        ref = a.double() @ b.double()
        out = cpu_gemm.cpu_mm(a, b)
        assert out.shape == ref.shape and out.dtype == torch.float32, name
        assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-6, name


def test_cpu_mm_rejects_non_matrices():
    with pytest.raises(ValueError, match="multiplies two matrices"):
        cpu_gemm.cpu_mm(torch.randn(2, 3), torch.randn(4, 5))


def _mm_graph(dtype):
    a, b = torch.randn(32, 16, dtype=dtype), torch.randn(16, 8, dtype=dtype)
    return make_fx(lambda a, b: torch.relu(a @ b) @ b.t())(a, b), (a, b)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_rewrite_modes():
    gm, (a, b) = _mm_graph(torch.float32)
    assert cpu_gemm.rewrite_graph(gm, "aten") == 0
    assert torch.ops.curvrate.cpu_mm.default not in _targets(gm)
    ref = gm(a, b)
    assert cpu_gemm.rewrite_graph(gm, "onednn") == 2
    assert torch.ops.aten.mm.default not in _targets(gm)
    torch.testing.assert_close(gm(a, b), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        cpu_gemm.rewrite_graph(gm, "mkl")


def test_auto_leaves_small_gemms_and_other_dtypes_alone():
    gm, _ = _mm_graph(torch.float32)          # 32·16·8: far below the auto threshold
    assert cpu_gemm.rewrite_graph(gm, "auto") == 0
    gm, _ = _mm_graph(torch.float64)          # float64: never, whatever the mode
    assert cpu_gemm.rewrite_graph(gm, "onednn") == 0


def test_auto_is_off_under_deterministic_algorithms():
    a, b = torch.randn(512, 256), torch.randn(256, 256)
    gm = make_fx(lambda a, b: a @ b)(a, b)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert cpu_gemm.rewrite_graph(gm, "auto") == 0
    finally:
        torch.use_deterministic_algorithms(old)


def test_choice_is_measured_once_per_layout():
    a, b = torch.randn(512, 256), torch.randn(256, 256)
    first = cpu_gemm.fastest_gemm(a.shape, a.stride(), b.shape, b.stride(), ("onednn",))
    assert first in ("aten", "onednn")
    key = next(k for k in cpu_gemm._choices if k[0] == (512, 256) and k[2] == (256, 256))
    other = "aten" if first == "onednn" else "onednn"
    cpu_gemm._choices[key] = other        # a cached answer is returned, not re-measured
    assert cpu_gemm.fastest_gemm(a.shape, a.stride(), b.shape, b.stride(), ("onednn",)) == other
    del cpu_gemm._choices[key]


def test_captured_float32_step_with_onednn_gemms_matches_eager():
    torch.manual_seed(0)
    model = mlp(torch.nn.Tanh(), d_in=6, width=32, classes=3)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    u = torch.randn(16, 6)

    def loss(m, x, y, u):
        return cf.loss_directional_derivatives(m, x, y, u, 3).abs().mean()

    ref = loss(model, x, y, u)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    fast = cf.compile(loss, backend="eager", cpu_gemm="onednn")
    out = fast(model, x, y, u)
    g = torch.autograd.grad(out, list(model.parameters()))
    _assert_onednn_program_matches(fast, out, ref, g, g_ref)


def _assert_onednn_program_matches(fast, out, ref, grads, grads_ref):
    """The captured graph runs oneDNN GEMMs and agrees with the eager engine to float32 rounding."""
    assert torch.ops.curvrate.cpu_mm.default in _targets(fast.graphs()[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for gi, gr in zip(grads, grads_ref):
        torch.testing.assert_close(gi, gr, rtol=1e-4, atol=1e-5)


def test_compile_rejects_unknown_gemm_mode():
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        cf.compile(lambda m, x: x.sum(), cpu_gemm="blas")


def test_cpu_mm_broadcast_and_empty_operands():
    a, b = torch.randn(8, 4), torch.randn(4, 1).expand(4, 6)          # a stride-0 operand
    torch.testing.assert_close(cpu_gemm.cpu_mm(a, b), a @ b)
    a, b = torch.randn(4, 1).expand(4, 5), torch.randn(5, 3)
    torch.testing.assert_close(cpu_gemm.cpu_mm(a, b), a @ b)
    assert cpu_gemm.cpu_mm(torch.randn(0, 4), torch.randn(4, 3)).shape == (0, 3)


def test_user_torch_compile_runs_the_onednn_program_without_graph_breaks():
    """Inside a user's torch.compile(fullgraph=True) the captured program (with its oneDNN GEMMs)
    is one custom op, and the step matches the eager engine to float32 rounding."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = mlp(torch.nn.Tanh(), d_in=4, width=24, classes=3)
    x, y, u = torch.randn(12, 4), torch.randint(0, 3, (12,)), torch.randn(12, 4)

    def loss(m, x, y, u):
        return cf.loss_directional_derivatives(m, x, y, u, 2).abs().mean()

    fast = cf.compile(loss, backend="eager", cpu_gemm="onednn")

    def step(m, x, y, u):
        return torch.nn.functional.cross_entropy(m(x), y) + fast(m, x, y, u)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = compiled(model, x, y, u)
    ga = torch.autograd.grad(a, list(model.parameters()))
    b = torch.nn.functional.cross_entropy(model(x), y) + loss(model, x, y, u)
    gb = torch.autograd.grad(b, list(model.parameters()))
    _assert_onednn_program_matches(fast, a, b, ga, gb)


def test_mkldnn_switched_off_means_no_rewrite():
    a, b = torch.randn(512, 256), torch.randn(256, 256)
    gm = make_fx(lambda a, b: a @ b)(a, b)
    # flags() is the only way once a test run has called torch.backends.disable_global_flags();
    # it also re-applies TF32 settings and warns that there is no Intel GPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            assert not cpu_gemm.onednn_available()
            cpu_gemm.rewrite_graph(gm, "auto")    # (the AVX-512 kernel, where built, may still win)
            assert torch.ops.curvrate.cpu_mm.default not in _targets(gm)
            with pytest.raises(RuntimeError, match="oneDNN is not available"):
                cpu_gemm.rewrite_graph(gm, "onednn")
    assert cpu_gemm.onednn_available()


# -- the eager engine's linear layers (cpu_gemm.eager_linear) ----------------------------------

def test_eager_linear_values_gradients_and_double_backward(monkeypatch):
    """Forced onto oneDNN (every shape measured faster), eager_linear gives F.linear's product,
    gradients and second derivatives to float32 rounding; float64, small products, non-contiguous
    inputs and deterministic mode stay on F.linear."""
    force_kernel(monkeypatch, "onednn")
    torch.manual_seed(0)
    x = torch.randn(3, 40, 24, requires_grad=True)
    w = torch.randn(16, 24, requires_grad=True)
    y = cpu_gemm.eager_linear(x, w)
    assert "KernelLinear" in type(y.grad_fn.next_functions[0][0]).__name__
    ref = F.linear(x, w)
    assert y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, w), gy)
    g_ref = torch.autograd.grad(ref, (x, w), gy)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)

    def second(lin):
        f = (lin(x, w) ** 2).sum()
        (gx,) = torch.autograd.grad(f, x, create_graph=True)
        return torch.autograd.grad((gx * gx).sum(), w)[0]
    h, h_ref = second(cpu_gemm.eager_linear), second(F.linear)
    assert float((h - h_ref).abs().max() / h_ref.abs().max()) < 1e-5

    for a, b in [(x.detach().double(), w.detach().double()),           # float64
                 (x.detach().transpose(1, 2).contiguous().transpose(1, 2), w.detach())]:  # strided x
        out = cpu_gemm.eager_linear(a, b)
        assert out.grad_fn is None or "KernelLinear" not in type(out.grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):      # autocast's casts belong to F.linear
        assert cpu_gemm.eager_linear(x, w).dtype == torch.bfloat16
    torch.use_deterministic_algorithms(True)
    try:
        assert cpu_gemm.eager_linear(x, w).grad_fn.name() == F.linear(x, w).grad_fn.name()
    finally:
        torch.use_deterministic_algorithms(False)


def test_eager_engine_linear_on_onednn_matches_nested_autograd(monkeypatch):
    """The jet engine's linear rule through eager_linear (forced onto oneDNN): loss derivatives
    and their parameter gradients as nested autograd gives them (float32, rounding level)."""
    assert_eager_engine_on_kernel_matches_nested_autograd(monkeypatch, "onednn")


def test_measuring_a_shape_leaves_the_global_random_stream_alone(monkeypatch):
    """The eager engine measures a new GEMM shape on its first use, mid-training: the measurement
    draws its data from its own generator, so training with and without it draws the same numbers."""
    monkeypatch.setattr(cpu_gemm, "_choices", {})
    torch.manual_seed(5)
    before = torch.get_rng_state()
    cpu_gemm.fastest_gemm((96, 40), (40, 1), (40, 24), (1, 40), tuple(cpu_gemm.KERNELS))
    assert torch.equal(torch.get_rng_state(), before)
