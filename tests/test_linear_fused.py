"""The fused linear + activation-jet Triton GEMM (triton_kernels/linear_jet.py) and its autograd
binding, against the float64 reference (one GEMM per coefficient, bias on coefficient 0, then the
activation recurrences of curvrate_fast.series), under the Triton interpreter on CPU.

Same criterion as test_triton_kernels.py (1e-5 relative, mixed). Shapes are odd on purpose: rows 1,
63, 123, widths not a multiple of the 32-wide tiles, reductions not a multiple of BLOCK_D, several batch
axes, non-contiguous inputs, NaN-poisoned outputs (an unwritten element fails).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from test_triton_kernels import DEV, PARAMS, assert_jet_close, grads, rand_jet  # noqa: E402

import curvrate_fast as cf  # noqa: E402
from curvrate_fast import functions as CF  # noqa: E402
from curvrate_fast.functions import _backend  # noqa: E402
from curvrate_fast.functions import linear as CL  # noqa: E402
from curvrate_fast.functions.activation import activation_params, reference_activation_jet  # noqa: E402

LJ = _backend.kernel_module("linear_jet")

from curvrate_fast.activation_kinds import KINDS as _TABLE_KINDS  # noqa: E402

KINDS = list(_TABLE_KINDS) + [None]
# (batch shape, in D, out N): rows M = prod(batch)
SHAPES = [((63,), 40, 33), ((3, 41), 17, 70), ((1,), 5, 3), ((123,), 37, 9), ((), 21, 11)]


def reference(kind, order, params):
    """φ(x Wᵀ + b) by one GEMM per coefficient, then the reference recurrences."""
    k, p0, p1 = activation_params(kind, params)

    def f(x, W, b=None):
        pre = torch.stack([xi @ W.T for xi in x])
        if b is not None:
            pre = torch.cat([(pre[0] + b).unsqueeze(0), pre[1:]])
        return reference_activation_jet(pre, k, order, p0, p1)
    return f


def problem(i, nu, batch, D, N, bias=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + i)
    x = rand_jet(nu, tuple(batch) + (D,), gen, u0_scale=1.0, dtype=dtype)
    W = (torch.randn(N, D, generator=gen, dtype=torch.float64) / D ** 0.5).to(dtype).to(DEV)
    b = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype).to(DEV) if bias else None
    return x, W, b


@pytest.mark.parametrize("order", [1, 3, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_linear_forward_and_backward(kind, order):
    """Every activation (None: bias only) × orders 1, 3, 6, stored rows short and full, the gradient
    of every input (x, W, b) through the fused path vs the float64 reference."""
    i = KINDS.index(kind) * 7 + order
    batch, D, N = SHAPES[i % len(SHAPES)]
    nu = (2, order + 1, min(3, order + 1))[i % 3]
    params = PARAMS.get(kind, {})
    x, W, b = problem(i, nu, batch, D, N, bias=i % 4 != 3)
    gen = torch.Generator().manual_seed(i)
    gy = torch.randn((order + 1,) + tuple(batch) + (N,), generator=gen, dtype=torch.float64).to(DEV)
    inputs = [x, W, b]
    y, g = grads(lambda *a: CF.linear_activation_jet(*a, kind, order, impl="fused", **params), inputs, gy)
    ins64 = [t.double() if t is not None else None for t in inputs]
    ref = reference(kind, order, params)
    y64, g64 = grads(ref, ins64, gy)
    y32, g32 = grads(ref, inputs, gy)
    what = f"{kind} K={order} nu={nu} batch={batch} D={D} N={N}"
    assert_jet_close(y, y64, y32, rtol=2e-5, what=what + " forward")
    # ∂W and ∂b sum over all rows (fp32 sums with cancellation): judged at 5e-5
    for name, a, r, r32, tol in zip("xWb", g, g64, g32, (2e-5, 5e-5, 5e-5)):
        assert_jet_close(a, r, r32, rtol=tol, what=f"{what} grad {name}")


def test_fused_kernel_writes_every_output_and_takes_strided_inputs():
    """NaN-poisoned destination, a non-contiguous x (transposed storage) and a non-contiguous weight."""
    gen = torch.Generator().manual_seed(5)
    order, nu, M, D, N = 4, 2, 63, 45, 37
    base = torch.randn(nu, D, M, generator=gen, dtype=torch.float64).float().to(DEV)
    x = base.transpose(1, 2)  # (nu, M, D) with stride 1 along M
    Wt = (torch.randn(D, N, generator=gen, dtype=torch.float64) / 7).float().to(DEV)
    W = Wt.t()               # (N, D), column-major
    b = torch.randn(N, generator=gen, dtype=torch.float64).float().to(DEV)
    out = torch.full((order + 1, M, N), float("nan"), device=DEV)
    y = LJ.linear_act_jet_fused(x, W, b, "silu", order, out=out)
    assert y is out
    ref = reference("silu", order, {})
    assert_jet_close(y, ref(x.double(), W.double(), b.double()), ref(x, W, b), rtol=2e-5, what="strided")
    # the backward kernel: ∂L/∂pre for a non-contiguous grad_y, into a poisoned buffer
    gy = torch.randn(M, order + 1, N, generator=gen, dtype=torch.float64).float().to(DEV).transpose(0, 1)
    gu = torch.full((nu, M, N), float("nan"), device=DEV)
    assert LJ.linear_act_jet_fused_bwd(x, W, b, gy, "silu", order, out=gu) is gu

    def pre_grad(x, W, b):
        pre = torch.stack([xi @ W.T for xi in x])
        pre = torch.cat([(pre[0] + b).unsqueeze(0), pre[1:]]).detach().requires_grad_(True)
        return torch.autograd.grad(reference_activation_jet(pre, "silu", order), pre, gy.to(pre.dtype))[0]
    assert_jet_close(gu, pre_grad(x.double(), W.double(), b.double()), pre_grad(x, W, b), rtol=2e-5,
                     what="fused bwd kernel")
    with pytest.raises(ValueError, match="grad_y has shape"):
        LJ.linear_act_jet_fused_bwd(x, W, b, gy[:, :5], "silu", order)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_fused_linear_low_precision(dtype, tol):
    """fp16/bf16 operands, fp32 accumulation and epilogue: storage-rounding-level errors."""
    x, W, b = problem(9, 2, (31,), 24, 19, dtype=dtype)
    y = CF.linear_activation_jet(x, W, b, "gelu", 3, impl="fused")
    assert y.dtype == dtype
    y64 = reference("gelu", 3, {})(x.double(), W.double(), b.double())
    assert_jet_close(y.float(), y64, rtol=tol, floor=1.0, what=f"fused linear {dtype}")


def test_empty_and_bad_inputs():
    x, W, b = problem(3, 2, (0,), 8, 5)
    assert CF.linear_activation_jet(x, W, b, "tanh", 2, impl="fused").shape == (3, 0, 5)
    x, W, b = problem(4, 2, (6,), 8, 5)
    with pytest.raises(ValueError, match="weight must have shape"):
        LJ.linear_act_jet_fused(x, W[:, :7], b, "tanh", 2)
    with pytest.raises(ValueError, match="one dtype"):
        LJ.linear_act_jet_fused(x, W.half(), b, "tanh", 2)
    with pytest.raises(ValueError, match="bias must have shape"):
        LJ.linear_act_jet_fused(x, W, b[:4], "tanh", 2)
    with pytest.raises(ValueError, match="order"):
        LJ.linear_act_jet_fused(x, W, b, "tanh", 99)
    with pytest.raises(ValueError, match="out must be"):
        LJ.linear_act_jet_fused(x, W, b, "tanh", 2, out=torch.empty(3, 6, 4))
    with pytest.raises(ValueError, match="linear_impl must be one of"):
        CF.linear_activation_jet(x, W, b, "tanh", 2, impl="triton-gemm")
    # mixed dtypes / float64 cannot run fused: the exact cuBLAS + reference path runs instead
    y = CF.linear_activation_jet(x.double(), W.double(), b.double(), "tanh", 2, impl="fused")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference("tanh", 2, {})(x.double(), W.double(), b.double()))


def test_choice_by_measurement_is_cached_per_shape(monkeypatch):
    """"auto" times both implementations once per shape (a fake timer here) and keeps the faster."""
    monkeypatch.setattr(CL, "_CHOICES", {})
    x, W, b = problem(6, 2, (10,), 12, 7)
    calls = []

    def timer_fused_wins(fn):
        y = fn()
        calls.append(y.grad_fn.name())
        return 1.0 if "LinearActivationJet" in y.grad_fn.name() else 2.0

    assert CF.choose_linear_impl(x, W, b, "tanh", 3, timer=timer_fused_wins) == "fused"
    assert len(calls) == 2 and any("LinearActivationJet" in c for c in calls)
    # cached: no more timing for the same shape bucket (rows 9..16 share one)
    assert CF.choose_linear_impl(x[:, :9], W, b, "tanh", 3, timer=lambda fn: pytest.fail("timed again")) == "fused"
    # another shape is timed anew; cuBLAS wins this time
    x2, W2, b2 = problem(7, 2, (10,), 12, 8)
    assert CF.choose_linear_impl(x2, W2, b2, "tanh", 3, timer=lambda fn: 2.0 if fn().grad_fn.name()
                                 .startswith("LinearActivationJet") else 1.0) == "cublas"
    assert set(CF.linear_impl_choices().values()) == {"fused", "cublas"}
    # without CUDA and without a timer there is nothing to measure: cuBLAS, not cached
    assert CF.choose_linear_impl(x2, W2, None, "relu", 2) == "cublas"


def test_fused_op_under_torch_compile():
    """The fused GEMM is a registered operator: torch.compile(fullgraph=True) traces through it."""
    x, W, b = problem(8, 2, (9,), 13, 6)

    def f(x, W, b):
        return CF.linear_activation_jet(x, W, b, "tanh", 3, impl="fused").square().sum()

    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    a = [t.clone().requires_grad_(True) for t in (x, W, b)]
    r = [t.clone().requires_grad_(True) for t in (x, W, b)]
    la, lr = compiled(*a), f(*r)
    torch.testing.assert_close(la, lr, rtol=1e-6, atol=1e-6)
    for ga, gr in zip(torch.autograd.grad(la, a), torch.autograd.grad(lr, r)):
        torch.testing.assert_close(ga, gr, rtol=1e-6, atol=1e-6)


def test_engine_settings_linear_impl_validates():
    with pytest.raises(ValueError, match="linear_impl"):
        with cf.engine_settings(linear_impl="gemm"):
            pass
    with cf.engine_settings(linear_impl="fused"):
        from curvrate_fast.jets.registry import settings
        assert settings.linear_impl == "fused"


# -- GPU only: realistic shapes, per-dtype tolerances --------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present")
@pytest.mark.parametrize("dtype,tf32,tol", [(torch.float32, False, 1e-4), (torch.float32, True, 5e-3),
                                            (torch.float16, False, 1e-2), (torch.bfloat16, False, 5e-2)])
def test_gpu_fused_linear(dtype, tf32, tol):
    """MLP-sized layer (x, u of 512 rows, 1024 → 1024, tanh-GELU, order 4), forward and the
    gradients of x, W, b, fused GEMM vs float64; autotuning runs here on first use."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 512, 1024, device="cuda", generator=gen).to(dtype)
    W = (torch.randn(1024, 1024, device="cuda", generator=gen) / 32).to(dtype)
    b = torch.randn(1024, device="cuda", generator=gen).to(dtype)
    gy = torch.randn(5, 512, 1024, device="cuda", generator=gen).double()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        y, g = grads(lambda *a: CF.linear_activation_jet(*a, "gelu_tanh", 4, impl="fused"), [x, W, b], gy)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    ref = reference("gelu_tanh", 4, {})
    y64, g64 = grads(ref, [x.double(), W.double(), b.double()], gy)
    assert_jet_close(y.float(), y64, rtol=tol, floor=1.0, what=f"gpu fused linear {dtype} tf32={tf32}")
    for name, a, r in zip("xWb", g, g64):
        assert_jet_close(a.float(), r, rtol=tol, floor=1.0, what=f"gpu fused linear {dtype} grad {name}")
