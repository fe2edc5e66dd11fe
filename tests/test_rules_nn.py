"""Taylor rules of the torch.nn.functional family (activations, losses, resampling, distances)
against oracles that share no code with them: the finite-difference Chebyshev fit of the plain op
along the path (``_oracle.assert_matches_fd``) and float64 nested autograd (``baseline.jet``) where
PyTorch's higher derivatives are right; coefficient 0 against the plain op itself; parameter
gradients through the coefficients by ``torch.autograd.gradcheck``; the clear errors."""
import pytest
import torch
import torch.nn.functional as F
from _oracle import assert_matches_fd

import curvrate_fast as cf
from curvrate_fast import baseline
from curvrate_fast.jets.tensor import JetError, JetTensor, is_jet

D64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=D64) * scale


def _coeffs(out, K):
    from curvrate_fast.jets.tensor import pad_coeffs
    if is_jet(out):
        return pad_coeffs(out.coeffs, K + 1)
    return pad_coeffs(out.unsqueeze(0), K + 1)


def check(fn, xs, jets=None, K=3, seed=1, min_conclusive=0.5, value_tol=1e-12):
    """fn on jets of ``xs[i]`` (i in ``jets``, default all) along random directions: coefficient 0
    equals the plain op, coefficients 0..K the finite-difference oracle. Returns the coefficients."""
    jets = range(len(xs)) if jets is None else jets
    g = _gen(seed)
    us = [torch.randn(x.shape, generator=g, dtype=D64) if i in jets else torch.zeros_like(x)
          for i, x in enumerate(xs)]
    args = [JetTensor(torch.stack([x, u]), K) if i in jets else x for i, (x, u) in enumerate(zip(xs, us))]
    ours = _coeffs(fn(*args), K)
    ref = fn(*xs)
    assert ours.shape[1:] == ref.shape
    torch.testing.assert_close(ours[0], ref, rtol=value_tol, atol=value_tol, equal_nan=True)
    assert_matches_fd(ours, fn, xs, us, K, min_conclusive=min_conclusive)
    return ours


def check_autograd(fn, x, K=5, seed=2, rtol=1e-9):
    """All K + 1 coefficients against float64 nested autograd (one jet input)."""
    u = randn(*x.shape, seed=seed)
    ours = _coeffs(fn(JetTensor(torch.stack([x, u]), K)), K)
    ref = baseline.jet(fn, x, u, K, primitive=False)
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol / 10)


# -- activations --------------------------------------------------------------------------------

ACTIVATIONS = {
    "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish,
    "hardshrink": lambda x: F.hardshrink(x, 0.7),
    "softshrink": lambda x: F.softshrink(x, 0.3),
    "threshold": lambda x: F.threshold(x, 0.2, -1.5),
    "hardtanh": lambda x: F.hardtanh(x, -0.5, 1.2),
    "relu6": F.relu6,
    "glu": lambda x: F.glu(x, 1),
    "glu_last": F.glu,
    "softmin": lambda x: F.softmin(x, 1),
    "celu": lambda x: F.celu(x, 0.7),
    "selu": F.selu,
    "elu": lambda x: F.elu(x, 1.3),
    "elu_aten_scaled": lambda x: torch._C._nn.elu(x, 0.8, 1.7, 0.6),
    "mish": F.mish,
    "softsign": F.softsign,
    "tanhshrink": F.tanhshrink,
    "logsigmoid": F.logsigmoid,
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_fd(name):
    x = randn(3, 6, 4, seed=3, scale=3.0)
    check(ACTIVATIONS[name], [x], K=4)


@pytest.mark.parametrize("name", ["hardsigmoid", "hardswish", "hardshrink", "softshrink", "threshold",
                                  "hardtanh", "logsigmoid", "celu"])
def test_activation_zero_dim(name):
    check(ACTIVATIONS[name], [torch.tensor(1.7, dtype=D64)], K=4)


def test_losses_broadcast_against_higher_rank_constants():
    x, t = randn(5, seed=19), randn(3, 5, seed=20)
    for fn in (lambda z: F.huber_loss(z, t, reduction="none", delta=0.6),
               lambda z: F.smooth_l1_loss(z, t, beta=0.6), lambda z: F.mse_loss(z, t),
               lambda z: F.kl_div(z, t.abs(), reduction="none"),
               lambda z: F.poisson_nll_loss(z, t.abs(), reduction="none"),
               lambda z: torch.binary_cross_entropy_with_logits(z, t.sigmoid(), None, None, 0)):
        check(fn, [x])
    check(lambda z: F.huber_loss(z, torch.tensor(0.2, dtype=D64), delta=0.5), [torch.tensor(1.1, dtype=D64)])


# (not celu: PyTorch's own celu derivatives are off by ~1e-7, its backward keeps 1/α in float32)
@pytest.mark.parametrize("name", ["glu", "softmin", "logsigmoid", "hardswish", "mish", "elu"])
def test_activation_autograd(name):
    check_autograd(ACTIVATIONS[name], randn(4, 6, seed=4, scale=2.0), K=5)


def test_logsigmoid_far_tails():
    """No softplus threshold: σ(−x) enters exactly even at |x| = 40."""
    x = torch.tensor([-40.0, -25.0, 0.0, 25.0, 40.0], dtype=D64)
    check_autograd(F.logsigmoid, x, K=4)


def test_piecewise_corners_follow_autograd():
    """At the corners the slopes are autograd's (hardtanh/relu6/hardsigmoid exclusive, hardswish's
    outer pieces at ±3), every order (nested autograd of the plain op; hardsigmoid's backward
    uses 1/6 in float32, hence the tolerance, and has no derivative itself in PyTorch)."""
    x = torch.tensor([-3.0, 3.0, -1.0, 1.0, 0.0, 6.0, 2.5], dtype=D64)
    for fn in (F.hardswish, F.hardtanh, F.relu6, lambda z: F.hardshrink(z, 1.0),
               lambda z: F.threshold(z, 1.0, 0.0)):
        check_autograd(fn, x, K=3)
    u = randn(7, seed=17)
    ours = F.hardsigmoid(JetTensor(torch.stack([x, u]), 3)).coeffs
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.hardsigmoid(xr).sum(), xr)
    torch.testing.assert_close(ours[1], g * u, rtol=1e-7, atol=0)
    assert ours.shape[0] == 2  # piecewise linear: no higher coefficients


def test_inplace_writes_back():
    x = randn(5, seed=5, scale=4)
    for fn, ref in ((lambda j: F.hardswish(j, inplace=True), F.hardswish),
                    (F.hardtanh_, F.hardtanh), (torch._C._nn.hardsigmoid_, F.hardsigmoid),
                    (F.elu_, F.elu), (lambda j: F.threshold(j, 0.1, 2.0, inplace=True),
                                      lambda z: F.threshold(z, 0.1, 2.0))):
        j = JetTensor(torch.stack([x, torch.ones_like(x)]), 2)
        out = fn(j)
        assert out is j
        torch.testing.assert_close(j.coeffs[0], ref(x))


def test_prelu_weight_jet_and_grad():
    x = randn(4, 3, 5, seed=6)
    w = torch.tensor([0.1, -0.4, 0.7], dtype=D64)
    check(F.prelu, [x, w], K=3)                        # both operands jets
    check(F.prelu, [x, torch.tensor([0.3], dtype=D64)], jets=[0])
    check(F.prelu, [randn(5, seed=7), randn(1, seed=8)], K=3)   # 1-d input: one channel
    with pytest.raises(RuntimeError, match="Mismatch of parameter numbers"):
        F.prelu(JetTensor(torch.stack([x[0, 0], x[0, 0]]), 2), w[:2])
    u = randn(4, 3, 5, seed=9)

    def coeff2(weight):
        return F.prelu(JetTensor(torch.stack([x, u]), 2), weight).coeffs[1].sum()
    torch.autograd.gradcheck(coeff2, (w.clone().requires_grad_(),))


def test_softmax_relatives():
    x = randn(3, 5, seed=10)
    x[1] = float("-inf")
    x[2, 1] = float("-inf")
    u = randn(3, 5, seed=11)
    out = torch.ops.aten._safe_softmax.default(JetTensor(torch.stack([x, u]), 3), 1)
    assert torch.isfinite(out.coeffs).all()
    assert (out.coeffs[:, 1] == 0).all() and (out.coeffs[:, 2, 1] == 0).all()
    torch.testing.assert_close(out.coeffs[0], torch.ops.aten._safe_softmax.default(x, 1))
    y = torch.softmax(randn(4, 6, seed=12), 1)
    check(lambda g, o: torch._softmax_backward_data(g, o, 1, D64), [randn(4, 6, seed=13), y])
    check(lambda g, o: torch._log_softmax_backward_data(g, o, 1, D64),
          [randn(4, 6, seed=14), torch.log(y)])
    mask = torch.rand(4, 6, generator=_gen(15)) > 0.4
    check(lambda g: torch.ops.aten.native_dropout_backward(g, mask, 2.0), [randn(4, 6, seed=16)])


# -- losses -------------------------------------------------------------------------------------

def _pos(*shape, seed):
    return torch.rand(*shape, generator=_gen(seed), dtype=D64) * 0.8 + 0.1


def _mid(*shape, seed):  # in [0.3, 0.7]: stays in [0, 1] along the oracle's path
    return torch.rand(*shape, generator=_gen(seed), dtype=D64) * 0.4 + 0.3


LOSSES = {
    "huber": (lambda x, t, w: F.huber_loss(x, t, reduction="none", delta=0.7, weight=w),
              lambda: [randn(4, 5, seed=20), randn(4, 5, seed=21), _pos(4, 5, seed=22)]),
    "huber_mean": (lambda x, t: F.huber_loss(x, t, delta=1.5),
                   lambda: [randn(4, 5, seed=23), randn(4, 5, seed=24)]),
    "smooth_l1": (lambda x, t: F.smooth_l1_loss(x, t, reduction="none", beta=0.5),
                  lambda: [randn(4, 5, seed=25), randn(5, seed=26)]),
    "smooth_l1_beta0": (lambda x, t: F.smooth_l1_loss(x, t, reduction="sum", beta=0.0),
                        lambda: [randn(4, 5, seed=27), randn(4, 5, seed=28)]),
    "soft_margin": (lambda x, t: F.soft_margin_loss(x, t, reduction="none"),
                    lambda: [randn(4, 5, seed=29, scale=3), randn(4, 5, seed=30)]),
    "kl_div": (lambda x, t: F.kl_div(x, t, reduction="none"),
               lambda: [randn(3, 4, seed=31), _pos(3, 4, seed=32)]),
    "kl_div_batchmean": (lambda x, t: F.kl_div(x, t, reduction="batchmean"),
                         lambda: [randn(3, 4, seed=33), _pos(3, 4, seed=34)]),
    "kl_div_log_target": (lambda x, t: F.kl_div(x, t, reduction="sum", log_target=True),
                          lambda: [randn(3, 4, seed=35), randn(3, 4, seed=36)]),
    "poisson": (lambda x, t: F.poisson_nll_loss(x, t, reduction="none"),
                lambda: [randn(3, 4, seed=37), _pos(3, 4, seed=38) * 3]),
    "poisson_full": (lambda x, t: F.poisson_nll_loss(x, t, log_input=False, full=True,
                                                     reduction="none"),
                     lambda: [_pos(3, 4, seed=39) + 0.5, _pos(3, 4, seed=40) * 3]),
    "gaussian": (lambda x, t, v: F.gaussian_nll_loss(x, t, v, reduction="none", full=True),
                 lambda: [randn(3, 4, seed=41), randn(3, 4, seed=42), _pos(3, 4, seed=43) + 1]),
    "gaussian_homoscedastic": (lambda x, t, v: F.gaussian_nll_loss(x, t, v),
                               lambda: [randn(3, 4, seed=44), randn(3, 4, seed=45), _pos(3, seed=46) + 1]),
    "margin_ranking": (lambda a, b, y: F.margin_ranking_loss(a, b, y, 0.3, reduction="none"),
                       lambda: [randn(7, seed=47), randn(7, seed=48), randn(7, seed=49)]),
    "multilabel_soft_margin": (
        lambda x, t, w: F.multilabel_soft_margin_loss(x, t, w, reduction="none"),
        lambda: [randn(3, 5, seed=50), _pos(3, 5, seed=51), _pos(5, seed=52)]),
    "bce": (lambda x, t, w: F.binary_cross_entropy(x, t, w, reduction="none"),
            lambda: [_mid(3, 4, seed=53), _mid(3, 4, seed=54), _pos(3, 4, seed=55)]),
    "bce_logits": (lambda x, t, pw: F.binary_cross_entropy_with_logits(x, t, pos_weight=pw,
                                                                      reduction="none"),
                   lambda: [randn(3, 4, seed=56, scale=10), _pos(3, 4, seed=57), _pos(4, seed=58)]),
    "triplet": (lambda a, p, n: F.triplet_margin_loss(a, p, n, margin=2.0, reduction="none"),
                lambda: [randn(5, 4, seed=59), randn(5, 4, seed=60), randn(5, 4, seed=61)]),
    "triplet_p_swap": (lambda a, p, n: F.triplet_margin_loss(a, p, n, margin=3.0, p=1.5, swap=True,
                                                             reduction="none"),
                       lambda: [randn(5, 4, seed=62), randn(5, 4, seed=63), randn(5, 4, seed=64)]),
    "triplet_distance_fn": (
        lambda a, p, n: F.triplet_margin_with_distance_loss(
            a, p, n, distance_function=lambda u, v: 1 - F.cosine_similarity(u, v), margin=1.5,
            swap=True, reduction="none"),
        lambda: [randn(5, 4, seed=65), randn(5, 4, seed=66), randn(5, 4, seed=67)]),
    "mse_weighted": (lambda x, t, w: F.mse_loss(x, t, weight=w),
                     lambda: [randn(3, 4, seed=68), randn(3, 4, seed=69), _pos(3, 4, seed=70)]),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_fd(name):
    fn, make = LOSSES[name]
    check(fn, make(), K=3)


def test_losses_with_constant_labels():
    x1, x2 = randn(6, 5, seed=71), randn(6, 5, seed=72)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, -1.0], dtype=D64)
    check(lambda a, b: F.cosine_embedding_loss(a, b, y, margin=-0.2, reduction="none"), [x1, x2])
    check(lambda a, b: F.cosine_embedding_loss(a, b, torch.tensor(-1.0, dtype=D64), margin=-0.5),
          [x1[0], x2[0]])
    h = randn(7, seed=73, scale=2)
    yh = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, -1.0, 1.0], dtype=D64)
    check(lambda x: F.hinge_embedding_loss(x, yh, margin=1.5, reduction="none"), [h])
    x = randn(4, 6, seed=74)
    t = torch.tensor([0, 5, 2, 2])
    w = _pos(6, seed=75)
    for p in (1, 2):
        check(lambda z, ww: F.multi_margin_loss(z, t, p=p, margin=0.8, weight=ww, reduction="none"),
              [x, w])
    check(lambda z: F.multi_margin_loss(z, torch.tensor(3), reduction="none"), [x[0]])
    tl = torch.tensor([[3, 0, -1, 1, 1, 1], [1, 1, 2, 5, 4, -1], [-1, 2, 0, 0, 0, 0], [5, 4, 3, 2, 1, 0]])
    check(lambda z: F.multilabel_margin_loss(z, tl, reduction="none"), [x])
    check(lambda z: F.multilabel_margin_loss(z, tl[0]), [x[0]])


def test_aten_forms_take_integer_reductions():
    """torch.hinge_embedding_loss(x, y, margin, 0) etc.: the reduction is ATen's integer, not the
    legacy size_average of the functional form."""
    x, t = randn(4, 5, seed=17), randn(4, 5, seed=18)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D64)
    lab = torch.tensor([[1, 0, -1, 2, 2], [4, -1, 0, 0, 0], [0, 1, 2, 3, 4], [-1, 1, 1, 1, 1]])
    for r in (0, 1, 2):
        check(lambda z: torch._C._nn.soft_margin_loss(z, t, r), [x])
        check(lambda z: torch.hinge_embedding_loss(z, t.sign(), 0.7, r), [x])
        check(lambda z: torch.cosine_embedding_loss(z, t, y, 0.1, r), [x])
        check(lambda z: torch._C._nn.multi_margin_loss(z, torch.tensor([0, 4, 2, 2]), 2, 0.9, None, r), [x])
        check(lambda z: torch._C._nn.multilabel_margin_loss(z, lab, r), [x])
        check(lambda z: torch._C._nn.mse_loss(z, t, r), [x])
        check(lambda z: torch._C._nn.l1_loss(z, t, r), [x])
        check(lambda z: torch._C._nn.huber_loss(z, t, r, 0.4), [x])
        check(lambda z: torch._C._nn.smooth_l1_loss(z, t, r, 0.4), [x])
        check(lambda z: torch.kl_div(z, t.abs(), r), [x])
        check(lambda z: torch.binary_cross_entropy_with_logits(z, t.sigmoid(), None, None, r), [x])
        check(lambda z: torch._C._nn.nll_loss(z, torch.tensor([0, 4, 2, 1]), None, r, 2), [x])
        check(lambda z: torch._C._nn.cross_entropy_loss(z, torch.tensor([0, 4, 2, 1]), None, r, 2, 0.1),
              [x])


def test_invalid_arguments_raise_as_pytorch():
    x = JetTensor(torch.stack([randn(5, seed=21), randn(5, seed=22)]), 2)
    with pytest.raises(ValueError, match="Target size"):
        F.binary_cross_entropy_with_logits(x, randn(3, 5, seed=23))
    with pytest.raises(RuntimeError, match="soft_margin_loss"):
        F.soft_margin_loss(x, randn(3, 5, seed=24))
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        F.binary_cross_entropy(torch.sigmoid(x), torch.full((5,), 1.5, dtype=D64))
    with pytest.raises(RuntimeError):
        F.cosine_embedding_loss(x, x, torch.ones(3, dtype=D64))


def test_label_targets_that_move_raise():
    x1, x2, y = randn(3, 4, seed=76), randn(3, 4, seed=77), torch.tensor([1.0, -1.0, 1.0], dtype=D64)
    yj = JetTensor(torch.stack([y, torch.ones_like(y)]), 2)
    with pytest.raises(JetError, match="cosine_embedding_loss"):
        F.cosine_embedding_loss(x1, x2, yj)
    with pytest.raises(JetError, match="hinge_embedding_loss"):
        F.hinge_embedding_loss(x1[0, :3], yj)
    # a target jet that does not move at the ±1 entries is fine
    y2 = torch.tensor([1.0, 0.3, -1.0], dtype=D64)
    yj2 = JetTensor(torch.stack([y2, torch.tensor([0.0, 1.0, 0.0], dtype=D64)]), 2)
    out = F.hinge_embedding_loss(x1[0, :3], yj2, reduction="none")  # the target only selects
    torch.testing.assert_close(_coeffs(out, 2)[0], F.hinge_embedding_loss(x1[0, :3], y2, reduction="none"))


def test_kl_div_target_through_zero_raises():
    t = torch.tensor([0.0, 0.5], dtype=D64)
    tj = JetTensor(torch.stack([t, torch.ones_like(t)]), 2)
    with pytest.raises(JetError, match="kl_div"):
        F.kl_div(randn(2, seed=78), tj, reduction="sum")
    # zero entries that stay zero are exact (the term is 0 along the path)
    tj = JetTensor(torch.stack([t, torch.tensor([0.0, 1.0], dtype=D64)]), 2)
    out = F.kl_div(randn(2, seed=78), tj, reduction="none")
    assert out.coeffs[:, 0].abs().max() == 0


def test_classification_losses():
    x = randn(5, 4, 3, seed=79)
    t = torch.tensor([[0, 3, 1], [2, 2, -100], [1, 0, 3], [3, 3, 3], [0, 1, -100]])
    w = _pos(4, seed=80)
    check(lambda z: F.cross_entropy(z, t, w, label_smoothing=0.2), [x])
    check(lambda z: F.cross_entropy(z, t, reduction="none", label_smoothing=0.1), [x])
    check(lambda z: F.nll_loss(F.log_softmax(z, 1), t, w), [x])
    p = torch.softmax(randn(5, 4, 3, seed=81), 1)
    check(lambda z, q: F.cross_entropy(z, q, w, label_smoothing=0.1), [x, p])
    check(lambda z, q: F.cross_entropy(z, q), [x[:, :, 0], p[:, :, 0]])


def test_linear_cross_entropy_chunked():
    x, W, b = randn(6, 5, seed=82), randn(7, 5, seed=83), randn(7, seed=84)
    t = torch.tensor([0, 6, 3, 3, 1, 2])
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2, allow_retain_graph=True)
    for red in ("mean", "none"):
        check(lambda z, ww, bb: F.linear_cross_entropy(z, ww, t, linear_bias=bb, reduction=red,
                                                       options=opts), [x, W, b])


def test_ctc_loss():
    T, N, C = 7, 3, 5
    lp = randn(T, N, C, seed=85).log_softmax(2)
    tg = torch.tensor([[1, 2, 2], [3, 3, 0], [4, 1, 2]])
    il, tl = torch.tensor([7, 6, 5]), torch.tensor([3, 2, 3])
    for red in ("none", "mean", "sum"):
        check(lambda z: F.ctc_loss(z, tg, il, tl, reduction=red), [lp])
    flat = torch.cat([tg[0], tg[1, :2], tg[2]])
    check(lambda z: F.ctc_loss(z, flat, il, tl, reduction="none"), [lp])
    check(lambda z: F.ctc_loss(z, tg[0], torch.tensor(7), torch.tensor(3)), [lp[:, 0]])
    # no alignment fits: +inf (or 0 with zero_infinity), no derivatives
    imp = torch.tensor([[1, 1, 1]])
    lj = JetTensor(torch.stack([lp[:3, :1], lp[:3, :1]]), 2)
    assert torch.isinf(F.ctc_loss(lj, imp, [3], [3], reduction="none").coeffs[0]).all()
    assert (F.ctc_loss(lj, imp, [3], [3], reduction="sum", zero_infinity=True).coeffs == 0).all()


def test_loss_parameter_gradients():
    """Gradients of the coefficients w.r.t. parameters that enter the op (CRR backpropagates
    through them), checked by finite differences of the (exact) coefficients."""
    x, u = randn(4, 5, seed=86), randn(4, 5, seed=87)
    t = randn(4, 5, seed=88)
    lab = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D64)
    lp_lin = randn(5, 6, seed=89)

    def through(fn):
        def f(param):
            return fn(JetTensor(torch.stack([x, u]), 3), param).coeffs[1:].sum()
        return f
    cases = [
        (lambda z, w: F.huber_loss(z * w, t, delta=0.5), _pos(4, 5, seed=90)),
        (lambda z, w: F.cosine_embedding_loss(z, w, lab, margin=-0.3), randn(4, 5, seed=91)),
        (lambda z, w: F.triplet_margin_loss(z, w, t, margin=2.0), randn(4, 5, seed=92)),
        (lambda z, w: F.ctc_loss((z @ w).log_softmax(1).reshape(4, 1, 6), torch.tensor([[1, 2]]),
                                 [4], [2]), lp_lin),
        (lambda z, w: F.binary_cross_entropy(torch.sigmoid(z), torch.sigmoid(w)), randn(4, 5, seed=93)),
    ]
    for fn, p in cases:
        torch.autograd.gradcheck(through(fn), (p.clone().requires_grad_(),))


def test_resample_parameter_gradients():
    """A parameter that enters the op next to a jet (the image under a jet grid, the embedding
    table under jet per-sample weights, the second point set of cdist)."""
    img, grid, ug = randn(1, 2, 4, 5, seed=94), randn(1, 3, 2, 2, seed=95, scale=0.7), randn(1, 3, 2, 2, seed=96)
    idx, off, psw, up = torch.tensor([1, 2, 0, 3]), torch.tensor([0, 2]), randn(4, seed=97), randn(4, seed=98)
    x, ux = randn(3, 4, seed=99), randn(3, 4, seed=100)

    def jet(z, u):
        return JetTensor(torch.stack([z, u]), 3)
    cases = [
        (lambda im: F.grid_sample(im, jet(grid, ug), mode=m, align_corners=False).coeffs[1:].sum(),
         img) for m in ("bilinear", "bicubic")] + [
        (lambda w: F.embedding_bag(idx, w, off, mode="sum", per_sample_weights=jet(psw, up))
         .coeffs[1:].sum(), randn(5, 3, seed=101)),
        (lambda y: torch.cdist(jet(x, ux), y, p=1.5).coeffs[1:].sum(), randn(2, 4, seed=102)),
    ]
    for fn, p in cases:
        torch.autograd.gradcheck(fn, (p.clone().requires_grad_(),))


# -- resampling ---------------------------------------------------------------------------------

INTERP = [
    dict(size=7, mode="nearest"), dict(scale_factor=1.7, mode="nearest-exact"),
    dict(size=9, mode="linear", align_corners=True), dict(scale_factor=0.6, mode="linear"),
    dict(size=(5, 7), mode="bilinear"), dict(size=(5, 3), mode="bilinear", antialias=True),
    dict(scale_factor=1.5, mode="bicubic", align_corners=True), dict(size=(4, 4), mode="area"),
    dict(size=(3, 4, 5), mode="trilinear"), dict(scale_factor=(2, 1, 0.5), mode="nearest"),
]


@pytest.mark.parametrize("i", range(len(INTERP)))
def test_interpolate(i):
    kw = INTERP[i]
    size = kw.get("size", 0)
    nd = 3 if (isinstance(size, tuple) and len(size) == 3) or kw.get("mode") == "trilinear" or \
        isinstance(kw.get("scale_factor"), tuple) else \
        (2 if isinstance(size, tuple) or kw["mode"] in ("bilinear", "bicubic", "area") else 1)
    x = randn(*((2, 3) + (5, 6, 4)[:nd]), seed=100 + i)
    check(lambda z: F.interpolate(z, **kw), [x])


def test_upsample_aliases():
    x = randn(2, 3, 5, 6, seed=111)
    check(lambda z: F.upsample_bilinear(z, size=(7, 8)), [x])
    check(lambda z: F.upsample_nearest(z, scale_factor=2), [x])
    check(lambda z: torch.ops.aten._upsample_bilinear2d_aa(z, [3, 4], False, None), [x])
    check(lambda z: torch._C._nn.upsample_bicubic2d(z, [7, 9], True), [x])


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [False, True])
def test_grid_sample_2d(mode, padding, align):
    x = randn(2, 3, 5, 6, seed=112)
    grid = randn(2, 4, 3, 2, seed=113, scale=0.8)   # reaches outside [−1, 1]: every padding path
    fn = (lambda z, g: F.grid_sample(z, g, mode=mode, padding_mode=padding, align_corners=align))
    check(fn, [x, grid], K=3, min_conclusive=0.4)          # input and grid jets
    check(fn, [x, grid], jets=[0], K=2)                       # constant grid: linear in the input


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_grid_sample_3d(padding):
    x = randn(2, 2, 4, 5, 3, seed=114)
    grid = randn(2, 3, 2, 2, 3, seed=115, scale=0.8)
    check(lambda z, g: F.grid_sample(z, g, padding_mode=padding, align_corners=False), [x, grid],
          min_conclusive=0.4)


def test_affine_grid_then_sample():
    theta = randn(2, 2, 3, seed=116, scale=0.5) + torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=D64)
    x = randn(2, 3, 5, 6, seed=117)
    check(lambda th: F.affine_grid(th, [2, 3, 4, 5], align_corners=False), [theta])
    check(lambda th, z: F.grid_sample(z, F.affine_grid(th, [2, 3, 4, 5], align_corners=True),
                                      align_corners=True), [theta, x], min_conclusive=0.4)
    theta3 = randn(1, 3, 4, seed=118)
    check(lambda th: F.affine_grid(th, [1, 1, 2, 3, 4], align_corners=False), [theta3])


def test_embedding():
    W = randn(10, 4, seed=119)
    idx = torch.tensor([[1, 3, 3], [0, 9, 1]])
    check(lambda w: F.embedding(idx, w, padding_idx=3), [W])
    check(lambda w: F.embedding(idx, w.clone(), max_norm=1.2), [W])         # renorm, exact
    check(lambda w: F.embedding(idx, w.clone(), max_norm=0.9, norm_type=1.5), [W])
    wj = JetTensor(torch.stack([W.clone(), randn(10, 4, seed=120)]), 2)
    F.embedding(idx, wj, max_norm=1.0)
    assert (wj.coeffs[0].norm(dim=1)[idx.unique()] <= 1.0 + 1e-6).all()       # written back


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag(mode):
    W = randn(10, 4, seed=121)
    idx = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9])
    off = torch.tensor([0, 4, 4, 6])
    check(lambda w: F.embedding_bag(idx, w, off, mode=mode), [W])
    check(lambda w: F.embedding_bag(idx, w, off, mode=mode, padding_idx=4), [W])
    check(lambda w: F.embedding_bag(idx.reshape(2, 4), w.clone(), mode=mode, max_norm=1.1), [W])
    if mode == "sum":
        psw = randn(8, seed=122)
        check(lambda w, p: F.embedding_bag(idx, w, off, mode="sum", per_sample_weights=p), [W, psw])
        check(lambda p: F.embedding_bag(idx, W, off, mode="sum", per_sample_weights=p,
                                        include_last_offset=True), [psw])


def test_unpool_and_fractional_pool():
    x = randn(2, 3, 6, 8, seed=123)
    _, i2 = F.max_pool2d(x, 2, return_indices=True)
    y2 = randn(2, 3, 3, 4, seed=124)
    check(lambda z: F.max_unpool2d(z, i2, 2), [y2])
    check(lambda z: F.max_unpool2d(z, i2[0], 2, output_size=(7, 9)), [y2[0]])
    _, i1 = F.max_pool1d(x[:, :, 0], 2, return_indices=True)
    check(lambda z: F.max_unpool1d(z, i1, 2), [randn(2, 3, 4, seed=125)])
    x3 = randn(1, 2, 4, 4, 6, seed=126)
    _, i3 = F.max_pool3d(x3, 2, return_indices=True)
    check(lambda z: F.max_unpool3d(z, i3, 2), [randn(1, 2, 2, 2, 3, seed=127)])
    # fractional max pooling: the random regions are drawn once, as the plain call draws them
    x5 = randn(2, 3, 4, 6, 8, seed=128)
    for fn, z in ((lambda z: F.fractional_max_pool2d(z, 2, output_size=(4, 5)), x),
                  (lambda z: F.fractional_max_pool2d(z, 2, output_ratio=(0.5, 0.5),
                                                     return_indices=True)[0], x),
                  (lambda z: F.fractional_max_pool3d(z, 2, output_size=(2, 3, 4)), x5)):
        torch.manual_seed(7)
        ref = fn(z)
        state = torch.get_rng_state()
        torch.manual_seed(7)
        out = fn(JetTensor(torch.stack([z, torch.ones_like(z)]), 2))
        assert torch.equal(torch.get_rng_state(), state)
        torch.testing.assert_close(out.coeffs[0], ref)
    samples = torch.rand(2, 3, 2, generator=_gen(129), dtype=D64)
    check(lambda z: F.fractional_max_pool2d(z, 2, output_size=(4, 5), _random_samples=samples), [x])


def test_pads_and_shuffles():
    x = randn(2, 4, 5, 6, seed=130)
    check(lambda z: torch.constant_pad_nd(z, [1, 2, 0, 1], 0.5), [x])
    for mode in ("constant", "reflect", "replicate", "circular"):
        check(lambda z: F.pad(z, (2, 1, 1, 2), mode=mode), [x])
    check(lambda z: F.pad(z, (-1, 2, 1, -2), mode="replicate"), [x])
    check(lambda z: F.pixel_shuffle(z, 2), [x])
    check(lambda z: F.pixel_unshuffle(z[:, :, :4], 2), [x])
    check(lambda z: F.channel_shuffle(z, 2), [x])
    cols = F.unfold(x, 2)
    check(lambda z: F.unfold(z, (2, 3), padding=1, stride=2), [x])
    check(lambda c: F.fold(c, (5, 6), 2), [cols])


def test_local_response_norm():
    check(lambda z: F.local_response_norm(z, 3, alpha=0.3, beta=0.7, k=1.5), [randn(2, 5, 4, seed=131)])
    check(lambda z: F.local_response_norm(z, 2, alpha=0.2), [randn(2, 5, 3, 4, seed=132)])
    check_autograd(lambda z: F.local_response_norm(z, 3, alpha=0.3), randn(2, 4, 3, seed=133), K=4)


# -- distances ----------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 4.0, 0.7, float("inf")])
def test_pairwise_distances(p):
    a, b = randn(5, 4, seed=140), randn(5, 4, seed=141)
    check(lambda x, y: F.pairwise_distance(x, y, p=p), [a, b])
    check(lambda x, y: F.pairwise_distance(x, y, p=p, keepdim=True), [a, b[0]])
    check(lambda x: F.pdist(x, p=p), [a])
    check(lambda x, y: torch.cdist(x, y, p=p), [randn(2, 3, 4, seed=142), randn(5, 4, seed=143)])


def test_distances_in_chunks(monkeypatch):
    import curvrate_fast.rules.distances as D
    monkeypatch.setattr(D, "_CHUNK_ELEMENTS", 40)      # a few rows / pairs per chunk
    check(lambda x, y: torch.cdist(x, y, p=1.5), [randn(2, 7, 3, seed=138), randn(5, 3, seed=139)])
    check(lambda x: F.pdist(x), [randn(9, 4, seed=137)])


def test_cdist_matrix_product_path_and_zero():
    x1, x2 = randn(30, 3, seed=144), randn(27, 3, seed=145)
    check(lambda a, b: torch.cdist(a, b), [x1, x2], value_tol=1e-9)
    # zero distances: value 0 and zero higher coefficients (autograd's convention)
    x = randn(3, 4, seed=146)
    xj = JetTensor(torch.stack([x, randn(3, 4, seed=147)]), 3)
    d = torch.cdist(xj, xj)
    assert (d.coeffs[:, torch.arange(3), torch.arange(3)] == 0).all()
    assert torch.isfinite(d.coeffs).all()
    assert (torch.pdist(torch.cat([xj, xj[:1]])).coeffs[:, 2] == 0).all()  # rows 0 and 3


def test_cosine_similarity_and_normalize():
    a, b = randn(4, 5, seed=148), randn(5, seed=149)
    check(lambda x, y: F.cosine_similarity(x, y, dim=-1), [a, b])
    check(lambda x, y: F.cosine_similarity(x, y, dim=0), [a, b[:4, None].expand(4, 5).clone()])
    check_autograd(lambda x: F.cosine_similarity(x, b.expand(4, 5), dim=1), a, K=4)
    for p in (2.0, 1.0, 3.0):
        check(lambda x: F.normalize(x, p=p, dim=1), [a])
    check_autograd(lambda x: F.normalize(x, dim=0), a, K=4)
    # a norm below eps is the constant eps: zero vectors stay finite
    z = torch.zeros(2, 3, dtype=D64)
    zj = JetTensor(torch.stack([z, torch.ones_like(z)]), 2)
    out = F.normalize(zj)
    torch.testing.assert_close(out.coeffs[1], torch.ones_like(z) / 1e-12)


def test_negative_p_with_zero_component_raises():
    x = torch.tensor([[0.0, 1.0]], dtype=D64)
    xj = JetTensor(torch.stack([x, torch.ones_like(x)]), 2)
    with pytest.raises(JetError, match="norm"):
        F.pairwise_distance(xj, torch.zeros_like(x), p=-1.0, eps=0.0)


# -- attention ----------------------------------------------------------------------------------

def test_sdpa_masks_causal_gqa():
    q, k, v = randn(2, 4, 3, 5, seed=150), randn(2, 4, 6, 5, seed=151), randn(2, 4, 6, 5, seed=152)
    m = torch.rand(3, 6, generator=_gen(153)) > 0.3
    m[:, 0] = True
    fm = randn(3, 6, seed=154)
    check(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=m), [q, k, v])
    check(lambda a, b, c, d: F.scaled_dot_product_attention(a, b, c, attn_mask=d, scale=0.3),
          [q, k, v, fm])
    check(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, dropout_p=0.0),
          [q, k, v])
    check(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, enable_gqa=True),
          [q, k[:, :2], v[:, :2]])


def test_sdpa_fully_masked_row():
    """A row with every key masked gives zeros, as PyTorch's math path (_safe_softmax) does."""
    q, k, v = randn(1, 3, 5, seed=155), randn(1, 4, 5, seed=156), randn(1, 4, 5, seed=157)
    m = torch.ones(3, 4, dtype=torch.bool)
    m[1] = False
    out = F.scaled_dot_product_attention(JetTensor(torch.stack([q, q]), 2), k, v, attn_mask=m)
    assert torch.isfinite(out.coeffs).all()
    assert torch.equal(out.coeffs[:, :, 1], torch.zeros_like(out.coeffs[:, :, 1]))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert torch.allclose(out.coeffs[0], ref, rtol=1e-12, atol=1e-12)


def test_sdpa_query_of_lower_rank():
    q, k, v = randn(4, 3, 8, seed=158), randn(4, 4, 6, 8, seed=159), randn(4, 4, 6, 8, seed=160)
    check(lambda a: F.scaled_dot_product_attention(a, k, v), [q])


def test_multi_head_attention_forward():
    mha = torch.nn.MultiheadAttention(6, 2, dtype=D64, bias=True, add_bias_kv=True)
    q, k = randn(3, 2, 6, seed=161), randn(4, 2, 6, seed=162)
    kpm = torch.tensor([[False, True, False, False], [False, False, False, True]])
    am = randn(3, 4, seed=163)
    with torch.no_grad():
        for need in (True, False):
            check(lambda a, b: mha(a, b, b, key_padding_mask=kpm, attn_mask=am,
                                   need_weights=need)[0], [q, k])
        check(lambda a: mha(a, a, a, need_weights=True, average_attn_weights=False)[1], [q])


# -- a model of the family end to end -------------------------------------------------------------

class _MobileNetV3Block(torch.nn.Module):
    """A MobileNetV3-style block: conv, BN (eval), hardswish, depthwise conv, squeeze-excite with
    hardsigmoid, projection and residual, then pooling, a GLU head and cross-entropy."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(170)

        def p(*shape, scale=0.4):
            return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=D64) * scale)
        self.expand, self.dw = p(8, 3, 1, 1), p(8, 1, 3, 3)
        self.se1, self.se2, self.proj = p(4, 8, 1, 1), p(8, 4, 1, 1), p(3, 8, 1, 1)
        self.head = p(6, 3)
        self.bn = torch.nn.BatchNorm2d(8, dtype=D64).eval()

    def forward(self, x):
        h = F.hardswish(self.bn(F.conv2d(x, self.expand)))
        h = F.hardswish(F.conv2d(h, self.dw, padding=1, groups=8))
        s = F.hardsigmoid(F.conv2d(F.relu(F.conv2d(F.adaptive_avg_pool2d(h, 1), self.se1)), self.se2))
        y = F.conv2d(h * s, self.proj) + x
        z = F.glu(F.linear(F.adaptive_avg_pool2d(y, 1).flatten(1), self.head), -1)
        return F.cross_entropy(z, torch.tensor([0, 2]), reduction="none")


def test_mobilenet_v3_block_end_to_end():
    model = _MobileNetV3Block()
    x, u = randn(2, 3, 6, 6, seed=171), randn(2, 3, 6, 6, seed=172)
    with cf.track_ops() as report:
        ours = cf.jet(model, x, u, 3)
    assert not report.decomposed
    with torch.no_grad():
        assert_matches_fd(ours, model, [x], [u], 3)
    grads = torch.autograd.grad(ours[1:].abs().sum(), [model.dw, model.se2])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# -- recurrent layers ------------------------------------------------------------------------------
class _Recurrent(torch.nn.Module):
    """A recurrent layer (batch first), the last step through a head; with ``state`` the initial
    state is computed from the input (a jet), else the layer's zeros."""

    def __init__(self, kind, state=False, **kw):
        super().__init__()
        self.kind, self.state = kind, state
        self.rnn = getattr(torch.nn, kind)(4, 6, batch_first=True, **kw).to(D64)
        dirs = 2 if kw.get("bidirectional") else 1
        out = kw.get("proj_size") or 6
        self.head = torch.nn.Linear(out * dirs, 3).to(D64)
        self.init = torch.nn.Linear(4, out).to(D64)
        self.layers = kw.get("num_layers", 1) * dirs
        self.cell = 6

    def forward(self, x):
        hx = None
        if self.state:
            h0 = torch.tanh(self.init(x[:, 0])).unsqueeze(0).expand(self.layers, -1, -1).contiguous()
            hx = (h0, torch.zeros(self.layers, x.shape[0], self.cell, dtype=x.dtype)) if self.kind == "LSTM" else h0
        return self.head(self.rnn(x, hx)[0][:, -1])


RECURRENT = [("RNN", False, {}), ("RNN", False, {"nonlinearity": "relu"}), ("GRU", False, {}), ("LSTM", False, {}),
             ("LSTM", True, {"num_layers": 2}), ("LSTM", False, {"bidirectional": True}),
             ("GRU", True, {"bidirectional": True, "num_layers": 2}), ("LSTM", False, {"proj_size": 2}),
             ("RNN", True, {"bias": False})]


@pytest.mark.parametrize("kind,state,kw", RECURRENT, ids=[f"{k}-{s}-{kw}" for k, s, kw in RECURRENT])
def test_recurrent_layers_match_nested_autograd(kind, state, kw):
    """nn.RNN/GRU/LSTM (stacked, bidirectional, projected, no bias; zero or computed initial state)
    against nested autograd through PyTorch's own kernels: loss derivatives d1..d3 and the CRR
    gradient (before: refused as 'torch.lstm draws random numbers', the kernels being tagged random
    for their inter-layer dropout)."""
    torch.manual_seed(3)
    model = _Recurrent(kind, state, **kw)
    x, u = randn(3, 5, 4, seed=4), randn(3, 5, 4, seed=5)
    y = torch.tensor([0, 2, 1])
    params = [p for p in model.parameters() if p.requires_grad]
    d = cf.loss_directional_derivatives(model, x, y, u, 3)
    ref = baseline.loss_directional_derivatives(model, x, y, u, 3)
    assert float((d - ref).abs().max() / ref.abs().max()) < 1e-12
    g = torch.autograd.grad(d.abs().sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.abs().sum(), params, allow_unused=True)
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert float((a - b).abs().max()) <= 1e-11 * max(1.0, float(b.abs().max()))


def test_recurrent_layers_refuse_what_they_cannot_do():
    """Dropout between layers in train mode is refused (the native kernel's masks cannot be drawn
    again); eval mode and unbatched inputs work; packing a jet is refused by its own op."""
    x, u = randn(3, 5, 4, seed=6), randn(3, 5, 4, seed=7)
    lstm = torch.nn.LSTM(4, 6, num_layers=2, dropout=0.3, batch_first=True).to(D64).train()
    with pytest.raises(JetError, match="dropout between layers in train mode"):
        cf.jet(lambda z: lstm(z)[0], x, u, 2)
    lstm.eval()
    cf.jet(lambda z: lstm(z)[0], x, u, 2)
    gru = torch.nn.GRU(4, 6).to(D64)                # unbatched: the module adds the batch axis
    c = cf.jet(lambda z: gru(z[0])[0], x, u, 2)
    assert torch.allclose(c[0], gru(x[0])[0], rtol=1e-13, atol=0)
    packed = torch.nn.utils.rnn.pack_padded_sequence
    with pytest.raises(cf.RuleMissingError, match="_pack_padded_sequence"):
        cf.jet(lambda z: gru(packed(z, [5, 4, 2], batch_first=True))[0].data, x, u, 2)



@pytest.mark.parametrize("cell", ["RNNCell", "GRUCell", "LSTMCell", "RNNCell-relu"])
def test_recurrent_cells_match_nested_autograd(cell):
    """nn.RNNCell/GRUCell/LSTMCell (torch.*_cell) unrolled by hand over three steps, against nested
    autograd through PyTorch's kernels (before: no rule)."""
    torch.manual_seed(4)
    kind, _, act = cell.partition("-")
    mod = (getattr(torch.nn, kind)(4, 5, nonlinearity="relu") if act else getattr(torch.nn, kind)(4, 5)).to(D64)
    head = torch.nn.Linear(5, 3).to(D64)

    def model(z):
        h = torch.zeros(z.shape[0], 5, dtype=z.dtype)
        state = (h, h) if kind == "LSTMCell" else h
        for t in range(3):
            state = mod(z * (t + 1) / 3, state)
        return head(state[0] if kind == "LSTMCell" else state)
    x, u = randn(4, 4, seed=8), randn(4, 4, seed=9)
    y = torch.tensor([0, 1, 2, 1])
    d = cf.loss_directional_derivatives(model, x, y, u, 3)
    ref = baseline.loss_directional_derivatives(model, x, y, u, 3)
    assert float((d - ref).abs().max() / ref.abs().max()) < 1e-12
