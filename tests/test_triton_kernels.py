"""The fused Triton jet kernels against the pure-PyTorch reference rules (curvrate_fast.series).

Without a GPU the kernels run through the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is
set below, before anything imports a kernel module). Every kernel is checked in float32 against the
reference evaluated in float64 on the same inputs: forward values and the gradients of every input
(autograd.grad with random output gradients), orders 1..6, odd sizes, shorter stored series,
non-contiguous inputs, NaN-poisoned output buffers (an unwritten element fails).

Accuracy criterion (per coefficient k, elementwise):
    |kernel − ref64| ≤ 1e-5·(|ref64| + 0.1·s_k) + 2·|ref32 − ref64|,
    s_k = max(max|ref64_k|, 0.1·max|ref64|)
i.e. 1e-5 relative, with an absolute floor of 1e-6 of the coefficient's largest value for values
near 0 (but not below 1e-7 of the whole jet's largest value, which only matters for tensors of a
handful of elements, where cancellation in one element cannot be judged against others); the last
term only matters where the float32 reference itself is inaccurate (cancellation
in the recurrences, e.g. the log jet of the cross-entropy at order 6): there the kernel must not be
worse than the float32 reference. Comparing with float32 reference values directly would be
meaningless there (e.g. the float32 tanh-GELU reference is off by 1e-3 at order 6; the kernels'
1 − tanh² = 4e/(1+e)² has no cancellation).
GPU-only tests (marker ``gpu``) use realistic shapes and per-dtype tolerances.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from curvrate_fast import functions as CF  # noqa: E402
from curvrate_fast.functions import _backend, _ops  # noqa: E402
from curvrate_fast.functions.activation import activation_params, reference_activation_jet  # noqa: E402
from curvrate_fast.functions.cross_entropy import reference_cross_entropy_jet  # noqa: E402

A = _backend.kernel_module("activation_jet")
CE = _backend.kernel_module("cross_entropy_jet")
LJ = _backend.kernel_module("linear_jet")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; none is present")

from curvrate_fast.activation_kinds import KINDS  # noqa: E402

KINDS = list(KINDS)
PARAMS = {"softplus": {"beta": 1.5, "threshold": 3.0}, "leaky_relu": {"negative_slope": 0.1}}
SHAPES = [(63,), (123,), (1,), (7, 9), (3, 5, 11)]


# -- helpers -------------------------------------------------------------------------------------
def assert_jet_close(got, ref64, ref32=None, rtol=1e-5, floor=0.1, what=""):
    """Elementwise mixed criterion (module docstring); coefficient axis first."""
    got = got.detach().double()
    ref64 = ref64.detach().double()
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(ref64).all(), f"{what}: non-finite reference"
    assert torch.isfinite(got).all(), f"{what}: {(~torch.isfinite(got)).sum().item()} non-finite values"
    dims = tuple(range(1, ref64.dim()))
    scale = ref64.abs().amax(dim=dims, keepdim=True) if dims else ref64.abs()
    scale = scale.clamp_min(0.1 * ref64.abs().max())   # tensors of a handful of elements
    tol = rtol * (ref64.abs() + floor * scale)
    if ref32 is not None:
        tol = tol + 2 * (ref32.detach().double() - ref64).abs()
    err = (got - ref64).abs()
    bad = err > tol
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {bad.sum().item()}/{bad.numel()} elements off; worst err/tol "
                             f"{(err / tol.clamp_min(1e-300)).max().item():.3g}; first at {idx}: got "
                             f"{got[idx].item():.9g}, ref {ref64[idx].item():.9g}")


def rand_jet(nu, shape, gen, u0_scale=2.0, dtype=torch.float32):
    c = torch.randn((nu,) + tuple(shape), generator=gen, dtype=torch.float64)
    c[0] *= u0_scale
    return c.to(dtype).to(DEV)


def grads(fn, inputs, gy):
    """(output, grads of every input) of fn(*inputs) with output gradient gy."""
    ins = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*ins)
    gs = torch.autograd.grad(out, [t for t in ins if t is not None], gy.to(out.dtype))
    return out.detach(), gs


def ref_act(kind, order, params):
    _, p0, p1 = activation_params(kind, params)
    return lambda c: reference_activation_jet(c, kind, order, p0, p1)


# -- activation jets -----------------------------------------------------------------------------
@pytest.mark.parametrize("stored", ["full", "short"])
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_activation_jet_forward_and_backward(kind, order, stored):
    """Every activation × order 1..6 × (all K+1 coefficients stored | only (x, u) stored, like an
    input jet, or a middle length), shapes cycling through odd sizes."""
    i = KINDS.index(kind)
    shape = SHAPES[(i + order + (stored == "short")) % len(SHAPES)]
    nu = order + 1 if stored == "full" else (2 if (i + order) % 2 else max(1, order - 1))
    gen = torch.Generator().manual_seed(1000 * i + 10 * order + (stored == "short"))
    c = rand_jet(nu, shape, gen)
    gy = torch.randn((order + 1,) + shape, generator=gen, dtype=torch.float64).to(DEV)
    params = PARAMS.get(kind, {})
    y, (gc,) = grads(lambda t: CF.activation_jet(t, kind, order, **params), [c], gy)
    y64, (gc64,) = grads(ref_act(kind, order, params), [c.double()], gy)
    y32, (gc32,) = grads(ref_act(kind, order, params), [c], gy)
    assert y.shape == (order + 1,) + shape and y.dtype == c.dtype
    assert_jet_close(y, y64, y32, what=f"{kind} K={order} forward")
    assert_jet_close(gc, gc64, gc32, what=f"{kind} K={order} grad")


@pytest.mark.parametrize("kind", ["tanh", "gelu", "gelu_tanh", "softplus", "leaky_relu"])
def test_activation_kernel_writes_every_element(kind):
    """NaN-poisoned destinations with a guard band: every element written, nothing outside."""
    order, nu, shape = 3, 2, (41, 3)   # N = 123: one partial block
    N = 123
    gen = torch.Generator().manual_seed(7)
    c = rand_jet(nu, shape, gen)
    gy = torch.randn((order + 1,) + shape, generator=gen).to(DEV)
    _, p0, p1 = activation_params(kind, PARAMS.get(kind, {}))
    buf = torch.full((order + 1, N + 37), float("nan"), device=DEV)
    out = buf[:, :N].view((order + 1,) + shape)
    y = A.activation_jet_fwd(c, order, kind, p0, p1, out=out)
    assert y.data_ptr() == buf.data_ptr()
    assert torch.isfinite(buf[:, :N]).all()
    assert torch.isnan(buf[:, N:]).all(), "the kernel wrote past the end of a row"
    torch.testing.assert_close(y, A.activation_jet_fwd(c, order, kind, p0, p1), rtol=0, atol=0)
    gbuf = torch.full((nu, N + 5), float("nan"), device=DEV)
    gx = A.activation_jet_bwd(c, gy, order, kind, p0, p1, out=gbuf[:, :N].view((nu,) + shape))
    assert torch.isfinite(gbuf[:, :N]).all() and torch.isnan(gbuf[:, N:]).all()
    torch.testing.assert_close(gx, A.activation_jet_bwd(c, gy, order, kind, p0, p1), rtol=0, atol=0)


def test_activation_noncontiguous_and_long_inputs():
    """Transposed input, a stored series longer than order+1 (extra rows get zero gradient) and a
    non-contiguous output gradient."""
    order, kind = 3, "silu"
    gen = torch.Generator().manual_seed(3)
    base = rand_jet(6, (11, 9), gen)            # 6 stored rows > order + 1
    c = base.transpose(1, 2)                    # (6, 9, 11), non-contiguous
    assert not c.is_contiguous()
    w = torch.randn(order + 1, 11, 9, generator=gen, dtype=torch.float64).to(DEV)

    def loss(fn, t):
        return (fn(t).transpose(1, 2) * w.to(t.dtype)).sum()   # non-contiguous grad_y

    ck = c.detach().clone().requires_grad_(True)
    lk = loss(lambda t: CF.activation_jet(t, kind, order), ck)
    (gk,) = torch.autograd.grad(lk, ck)
    c64 = c.double().detach().requires_grad_(True)
    l64 = loss(ref_act(kind, order, {}), c64)
    (g64,) = torch.autograd.grad(l64, c64)
    assert abs(lk.item() - l64.item()) <= 1e-5 * (1 + abs(l64.item()))
    assert gk.shape == c.shape
    assert (gk[order + 1:] == 0).all()
    assert_jet_close(gk[: order + 1], g64[: order + 1], what="non-contiguous grad")


@pytest.mark.parametrize("kind", ["tanh", "gelu"])
def test_activation_constant_jet(kind):
    """One stored coefficient (a constant path): the higher coefficients are exactly zero."""
    gen = torch.Generator().manual_seed(5)
    c = rand_jet(1, (63,), gen)
    y = CF.activation_jet(c, kind, 4)
    assert (y[1:] == 0).all()
    assert_jet_close(y, reference_activation_jet(c.double(), kind, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_activation_extreme_inputs(kind):
    """Saturated and tiny primal values: finite, and as accurate as the criterion asks."""
    order = 4
    u0 = torch.tensor([-30.0, -12.0, -5.0, -0.7, -1e-3, 1e-4, 0.3, 2.5, 5.0, 12.0, 30.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    c = torch.randn(order + 1, u0.numel(), generator=gen, dtype=torch.float64)
    c[0] = u0
    c = c.float().to(DEV)
    gy = torch.randn(order + 1, u0.numel(), generator=gen, dtype=torch.float64).to(DEV)
    params = PARAMS.get(kind, {})
    y, (g,) = grads(lambda t: CF.activation_jet(t, kind, order, **params), [c], gy)
    y64, (g64,) = grads(ref_act(kind, order, params), [c.double()], gy)
    y32, (g32,) = grads(ref_act(kind, order, params), [c], gy)
    assert_jet_close(y, y64, y32, what=f"{kind} extreme forward")
    assert_jet_close(g, g64, g32, what=f"{kind} extreme grad")


@pytest.mark.parametrize("case", ["linear", "conv", "bias_only", "channel0"])
def test_bias_activation_jet(case):
    kind, order, nu, shape, cdim = {
        "linear": ("gelu", 3, 4, (63, 10), -1),
        "conv": ("silu", 4, 2, (2, 3, 5, 7), 1),
        "bias_only": (None, 2, 2, (7, 12), -1),
        "channel0": ("tanh", 5, 3, (6, 11), 0),
    }[case]
    gen = torch.Generator().manual_seed(["linear", "conv", "bias_only", "channel0"].index(case) + 40)
    pre = rand_jet(nu, shape, gen, u0_scale=1.0)
    C = shape[cdim]
    bias = torch.randn(C, generator=gen, dtype=torch.float64).float().to(DEV)
    gy = torch.randn((order + 1,) + shape, generator=gen, dtype=torch.float64).to(DEV)
    y, (gp, gb) = grads(lambda p, b: CF.bias_activation_jet(p, b, kind, order, cdim), [pre, bias], gy)

    def ref(p, b):
        nd = len(shape)
        bv = b.reshape((-1,) + (1,) * (nd - cdim % nd - 1))
        p = torch.cat([(p[0] + bv).unsqueeze(0), p[1:]])
        return reference_activation_jet(p, kind or "identity", order)

    y64, (gp64, gb64) = grads(ref, [pre.double(), bias.double()], gy)
    y32, (gp32, gb32) = grads(ref, [pre, bias], gy)
    assert_jet_close(y, y64, y32, what=f"{case} forward")
    assert_jet_close(gp, gp64, gp32, what=f"{case} grad pre")
    assert_jet_close(gb, gb64, gb32, what=f"{case} grad bias")
    # the launcher-level epilogue gives the same forward
    torch.testing.assert_close(LJ.bias_act_epilogue(pre, bias, kind, order, cdim), y, rtol=0, atol=0)


def test_linear_activation_jet():
    gen = torch.Generator().manual_seed(21)
    # linear: one GEMM for the stacked coefficients, then the fused epilogue
    x = rand_jet(2, (9, 13), gen, u0_scale=1.0)
    W = (torch.randn(17, 13, generator=gen, dtype=torch.float64) / 4).float().to(DEV)
    b = torch.randn(17, generator=gen, dtype=torch.float64).float().to(DEV)
    order = 4
    gy = torch.randn(order + 1, 9, 17, generator=gen, dtype=torch.float64).to(DEV)

    def lin_ref(x, W, b):
        pre = torch.stack([xi @ W.T for xi in x])
        pre = torch.cat([(pre[0] + b).unsqueeze(0), pre[1:]])
        return reference_activation_jet(pre, "gelu_tanh", order)

    y, g = grads(lambda x, W, b: CF.linear_activation_jet(x, W, b, "gelu_tanh", order), [x, W, b], gy)
    y64, g64 = grads(lin_ref, [x.double(), W.double(), b.double()], gy)
    y32, g32 = grads(lin_ref, [x, W, b], gy)
    assert_jet_close(y, y64, y32, rtol=2e-5, what="linear forward")
    for name, a, r, r32 in zip("xWb", g, g64, g32):
        assert_jet_close(a, r, r32, rtol=2e-5, what=f"linear grad {name}")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_activation_low_precision_storage(dtype, tol):
    """fp16/bf16 storage, fp32 arithmetic inside: errors at the storage rounding level."""
    gen = torch.Generator().manual_seed(13)
    order = 3
    c = rand_jet(2, (63,), gen).to(dtype)
    gy = torch.randn(order + 1, 63, generator=gen, dtype=torch.float64).to(DEV)
    y, (g,) = grads(lambda t: CF.activation_jet(t, "gelu", order), [c], gy.to(dtype))
    y64, (g64,) = grads(ref_act("gelu", order, {}), [c.double()], gy.to(dtype).double())
    assert y.dtype == dtype and g.dtype == dtype
    assert_jet_close(y, y64, rtol=tol, what=f"{dtype} forward")
    assert_jet_close(g, g64, rtol=tol, what=f"{dtype} grad")


# -- cross-entropy jet ---------------------------------------------------------------------------
CE_CASES = [  # order, B, C, stored coefficients, class weights, ignore_index
    (1, 1, 7, 2, False, -100),
    (2, 63, 37, 3, True, -100),
    (3, 5, 300, 2, False, -1),       # 2 chunks of classes under the interpreter
    (4, 123, 10, 2, True, -100),
    (5, 17, 129, 6, False, -100),
    (6, 9, 50, 2, True, -100),
    (6, 4, 1000, 7, False, -100),    # 4 chunks
]


def _ce_inputs(order, B, C, nu, weighted, ignore_index, seed):
    gen = torch.Generator().manual_seed(seed)
    z = rand_jet(nu, (B, C), gen, u0_scale=3.0)
    t = torch.randint(0, C, (B,), generator=gen)
    if B > 2:
        t[1::3] = ignore_index
    w = (torch.rand(C, generator=gen) + 0.5).to(DEV) if weighted else None
    gl = torch.randn(order + 1, B, generator=gen, dtype=torch.float64).to(DEV)
    return z, t.to(DEV), w, gl


@pytest.mark.parametrize("case", CE_CASES, ids=[f"K{c[0]}-B{c[1]}-C{c[2]}" for c in CE_CASES])
def test_cross_entropy_jet_forward_and_backward(case):
    order, B, C, nu, weighted, ii = case
    z, t, w, gl = _ce_inputs(order, B, C, nu, weighted, ii, seed=order * 100 + B)
    loss, (gz,) = grads(lambda z: CF.cross_entropy_jet(z, t, order, ignore_index=ii, weight=w), [z], gl)

    def ref(z):
        return reference_cross_entropy_jet(z, t, order, ii, None if w is None else w.to(z.dtype))

    l64, (g64,) = grads(ref, [z.double()], gl)
    l32, (g32,) = grads(ref, [z], gl)
    assert loss.shape == (order + 1, B)
    assert_jet_close(loss, l64, l32, what=f"CE {case} forward")
    assert_jet_close(gz, g64, g32, what=f"CE {case} grad")
    ignored = t == ii
    assert (loss[:, ignored] == 0).all() and (gz[:, ignored] == 0).all()
    if order == 1 and w is None:   # coefficient 0 is F.cross_entropy
        ce = torch.nn.functional.cross_entropy(z[0], t, ignore_index=ii, reduction="none")
        torch.testing.assert_close(loss[0], ce, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [CE_CASES[1], CE_CASES[4]], ids=["B63-C37", "B17-C129"])
def test_cross_entropy_kernel_writes_every_element(case):
    """Small class chunks (many loop trips), NaN-poisoned destinations with guard bands."""
    order, B, C, nu, weighted, ii = case
    z, t, w, gl = _ce_inputs(order, B, C, nu, weighted, ii, seed=5)
    lbuf = torch.full((order + 1, B + 3), float("nan"), device=DEV)
    ebuf = torch.full((order + 1, B + 3), float("nan"), device=DEV)
    loss, lse = CE.cross_entropy_jet_fwd(z, t, order, ii, w, max_block_c=16, out=lbuf[:, :B], lse_out=ebuf[:, :B])
    assert torch.isfinite(lbuf[:, :B]).all() and torch.isnan(lbuf[:, B:]).all()
    assert torch.isfinite(ebuf[:, :B]).all() and torch.isnan(ebuf[:, B:]).all()
    ref_loss, ref_lse = CE.cross_entropy_jet_fwd(z, t, order, ii, w)     # default chunking
    torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-6, atol=1e-6)
    gbuf = torch.full((nu, B, C + 5), float("nan"), device=DEV)
    gz = CE.cross_entropy_jet_bwd(z, t, lse, gl.float(), order, ii, w, max_block_c=16, out=gbuf[:, :, :C])
    assert torch.isfinite(gbuf[:, :, :C]).all() and torch.isnan(gbuf[:, :, C:]).all()
    torch.testing.assert_close(gz, CE.cross_entropy_jet_bwd(z, t, lse, gl.float(), order, ii, w),
                               rtol=2e-6, atol=1e-6)


def test_cross_entropy_noncontiguous_and_extreme_logits():
    """Logits with a class stride ≠ 1 and a row stride ≠ C, large logits, a −inf (masked) class,
    a stored series longer than order + 1, and an expanded (stride-0) output gradient."""
    order, B, C = 3, 13, 40
    gen = torch.Generator().manual_seed(17)
    base = torch.randn(5, C, 2 * B, generator=gen, dtype=torch.float64)
    base[0] *= 40.0                                  # near one-hot softmax, large shifts
    base[0, 3, ::3] = float("-inf")                  # a masked class in some rows
    z = base.float().to(DEV).transpose(1, 2)[:, ::2]   # (5, B, C): class stride 2B, row stride 2
    assert z.stride(2) != 1
    t = torch.randint(0, C, (B,), generator=gen).to(DEV)
    t[t == 3] = 4
    zk = z.detach().clone().requires_grad_(True)
    loss = CF.cross_entropy_jet(zk, t, order)
    (gk,) = torch.autograd.grad(loss.sum(), zk)       # stride-0 grad_loss
    z64 = z.double().detach().requires_grad_(True)
    l64 = reference_cross_entropy_jet(z64, t, order)
    (g64,) = torch.autograd.grad(l64.sum(), z64)
    z32 = z.detach().clone().requires_grad_(True)
    l32 = reference_cross_entropy_jet(z32, t, order)
    (g32,) = torch.autograd.grad(l32.sum(), z32)
    assert_jet_close(loss, l64, l32, what="CE extreme forward")
    assert (gk[order + 1:] == 0).all()
    g64[~torch.isfinite(g64)] = 0.0   # −inf logits: the reference's gradient there is 0·inf
    g32[~torch.isfinite(g32)] = 0.0
    assert_jet_close(gk[: order + 1], g64[: order + 1], g32[: order + 1], what="CE extreme grad")


# -- plumbing: backend choice, registration, torch.compile, double backward -------------------------
def test_triton_available_and_reference_fallback(monkeypatch):
    c = rand_jet(2, (7,), torch.Generator().manual_seed(1))
    assert CF.triton_available(c)
    monkeypatch.setenv("CURVRATE_DISABLE_TRITON", "1")
    assert not CF.triton_available(c)
    y = CF.activation_jet(c, "tanh", 3)
    torch.testing.assert_close(y, reference_activation_jet(c, "tanh", 3), rtol=0, atol=0)
    # float64 always takes the exact reference path
    monkeypatch.delenv("CURVRATE_DISABLE_TRITON")
    y64 = CF.activation_jet(c.double(), "tanh", 3)
    torch.testing.assert_close(y64, reference_activation_jet(c.double(), "tanh", 3), rtol=0, atol=0)


def test_registered_ops_and_torch_compile():
    mode = _ops.registration_mode()
    assert mode == ("custom_op" if os.environ.get("TRITON_INTERPRET") == "1" else "triton_op")
    ns = torch.ops.curvrate_fast_triton
    for name in ("activation_jet_fwd", "activation_jet_bwd", "cross_entropy_jet_fwd", "cross_entropy_jet_bwd",
                 "linear_act_jet_fused", "linear_act_jet_fused_bwd"):
        assert hasattr(ns, name)
    gen = torch.Generator().manual_seed(2)
    pre = rand_jet(2, (5, 6), gen)
    b = torch.randn(6, generator=gen).to(DEV)
    t = torch.randint(0, 6, (5,), generator=gen).to(DEV)

    def f(p, b):
        y = CF.bias_activation_jet(p, b, "tanh", 3, -1)
        return CF.cross_entropy_jet(y, t, 3).sum()

    backend = "inductor" if CUDA else "aot_eager"
    cf = torch.compile(f, backend=backend, fullgraph=True)
    p1 = pre.clone().requires_grad_(True)
    b1 = b.clone().requires_grad_(True)
    p2 = pre.clone().requires_grad_(True)
    b2 = b.clone().requires_grad_(True)
    l1, l2 = cf(p1, b1), f(p2, b2)
    g1 = torch.autograd.grad(l1, (p1, b1))
    g2 = torch.autograd.grad(l2, (p2, b2))
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_double_backward_raises():
    """The kernels' backward is first-order (curvrate_fast/first_order.py): a second derivative
    raises, naming the op; with a constant incoming gradient the create_graph backward raises at
    once (no later backward could reach the guard); a plain backward is unaffected."""
    c = rand_jet(2, (7,), torch.Generator().manual_seed(4)).requires_grad_(True)
    y = CF.activation_jet(c, "tanh", 2)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(y.sum(), c, create_graph=True)
    w = torch.randn(y.shape, requires_grad=True)
    (g,) = torch.autograd.grad(CF.activation_jet(c, "tanh", 2), c, w, create_graph=True)
    (g_plain,) = torch.autograd.grad(CF.activation_jet(c, "tanh", 2), c, w.detach())
    assert torch.equal(g.detach(), g_plain)
    with pytest.raises(RuntimeError, match="activation jet"):
        torch.autograd.grad(g.sum(), w)


def test_bad_arguments():
    c = rand_jet(2, (7,), torch.Generator().manual_seed(4))
    with pytest.raises(ValueError):
        CF.activation_jet(c, "swish2", 2)
    with pytest.raises(TypeError):
        CF.activation_jet(c, "tanh", 2, beta=2.0)
    with pytest.raises(ValueError):
        CF.bias_activation_jet(c, torch.zeros(3, device=DEV), "tanh", 2)
    with pytest.raises(ValueError):
        CF.cross_entropy_jet(c, torch.zeros(7, dtype=torch.long, device=DEV), 2)


# -- GPU only: realistic shapes, per-dtype tolerances --------------------------------------------
# (rtol of the mixed criterion, for fp32 also covering the approximate ex2-based exp on GPU)
GPU_TOL = {torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["tanh", "gelu", "gelu_tanh", "silu", "softplus", "relu"])
def test_gpu_activation_jet(kind, dtype):
    order = 4
    gen = torch.Generator(device="cuda").manual_seed(0)
    c = torch.randn(2, 256, 4096, device="cuda", generator=gen)
    c[0] *= 2
    c = c.to(dtype)
    gy = torch.randn(order + 1, 256, 4096, device="cuda", generator=gen).to(dtype)
    y, (g,) = grads(lambda t: CF.activation_jet(t, kind, order), [c], gy)
    y64, (g64,) = grads(ref_act(kind, order, {}), [c.double()], gy.double())
    assert_jet_close(y, y64, rtol=GPU_TOL[dtype], what=f"gpu {kind} {dtype}")
    assert_jet_close(g, g64, rtol=GPU_TOL[dtype], what=f"gpu {kind} {dtype} grad")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cross_entropy_jet(dtype):
    order, B, C = 4, 256, 32000
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(2, B, C, device="cuda", generator=gen)
    z[0] *= 3
    z = z.to(dtype)
    t = torch.randint(0, C, (B,), device="cuda", generator=gen)
    gl = torch.randn(order + 1, B, device="cuda", generator=gen)
    loss, (gz,) = grads(lambda z: CF.cross_entropy_jet(z, t, order), [z], gl)
    l64, (g64,) = grads(lambda z: reference_cross_entropy_jet(z, t, order), [z.double()], gl.double())
    assert_jet_close(loss, l64, rtol=GPU_TOL[dtype], what=f"gpu CE {dtype}")
    assert_jet_close(gz, g64, rtol=GPU_TOL[dtype], what=f"gpu CE {dtype} grad")


@gpu
@needs_cuda
@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_linear_activation_jet(tf32):
    order = 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 512, 1024, device="cuda", generator=gen)
    W = torch.randn(1024, 1024, device="cuda", generator=gen) / 32
    b = torch.randn(1024, device="cuda", generator=gen)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        y = CF.linear_activation_jet(x, W, b, "gelu", order)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    pre = torch.stack([xi @ W.double().T for xi in x.double()])
    pre = torch.cat([(pre[0] + b.double()).unsqueeze(0), pre[1:]])
    y64 = reference_activation_jet(pre, "gelu", order)
    assert_jet_close(y, y64, rtol=5e-3 if tf32 else 1e-4, what=f"gpu linear tf32={tf32}")
