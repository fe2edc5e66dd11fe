"""curvrate_fast.compat.flatgrad against nested-autograd oracles written from docs/math.md §1, §3, §4, §6
that make the same torch.randn calls: same seed → same directions, same numbers, same RNG state."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _curv_oracle import ce_none, data, nested_mixed, tiny_mlp

from curvrate_fast.compat import flatgrad as fg
from curvrate_fast.curvature import CurvatureWarning


# --- oracles (docs/math.md) ----------------------------------------------------------------------------
def o_sample(B, shape, device="cpu"):
    g = torch.randn(B, *shape, device=device)                                   # SPEC §1
    n = g.reshape(B, -1).norm(dim=1).reshape((B,) + (1,) * len(shape))
    return g / (n + 1e-12)


def o_derivs(model, x, y, u, loss, N):
    return nested_mixed(model, x, y, [u] * N, loss)


def o_per_direction(model, x, y, loss, N=4, K=5, min1=1e-8):                     # SPEC §3 C
    was = model.training
    model.eval()
    lams, derivs = [], []
    for _ in range(K):
        u = o_sample(x.shape[0], tuple(x.shape[1:]))
        d = [v.detach().abs() for v in o_derivs(model, x, y, u, loss, N)]
        valid = torch.ones(x.shape[0], dtype=torch.bool)
        ys = []
        for n in range(N):
            if n == 0:
                valid = valid & (d[0] >= min1)
            valid = valid & torch.isfinite(d[n]) & (d[n] > 1e-10)
            if not valid.any():
                break
            ys.append(float(torch.log(d[n][valid]).mean()))
        if len(ys) >= 2:
            ns = np.arange(1, len(ys) + 1, dtype=float)
            c = ns - ns.mean()
            lams.append(float((c * np.array(ys)).sum() / (c * c).sum()))
            derivs.append([float(v[valid].mean()) for v in d])
    model.train(was)
    return lams, derivs


def o_regularizer(model, x, y, loss_fn, start, end, K, scale):                 # SPEC §4 package
    was = model.training
    model.eval()
    tot = 0
    for _ in range(K):
        u = o_sample(x.shape[0], tuple(x.shape[1:]))
        d = o_derivs(model, x, y, u, lambda z, t: loss_fn(z, t, reduction="none"), end)
        tot = tot + sum(d[n - 1].abs().mean() for n in range(start, end + 1))
    model.train(was)
    return scale * tot / K


def o_target(model, x, y, loss_fn, target, N, K, scale):                      # SPEC §4 target
    was = model.training
    model.eval()
    lams = []
    for _ in range(K):
        u = o_sample(x.shape[0], tuple(x.shape[1:]))
        d = [v.abs() for v in o_derivs(model, x, y, u, lambda z, t: loss_fn(z, t, reduction="none"), N)]
        per = torch.stack([torch.log(torch.clamp((d[n + 1] + 1e-12) / (d[n] + 1e-12), min=1e-10))
                           for n in range(N - 1)]).mean(0)
        lams.append(per.mean())
    model.train(was)
    return scale * (torch.stack(lams).mean() - target) ** 2


def o_ece(logits, labels, n_bins=10):                                             # SPEC §6
    p = torch.softmax(logits.double(), 1)
    conf, pred = p.max(1)
    N, tot = len(labels), 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        m = [j for j in range(N) if lo < conf[j] <= hi]
        if m:
            acc = sum(float(pred[j] == labels[j]) for j in m) / len(m)
            c = sum(float(conf[j]) for j in m) / len(m)
            tot += len(m) / N * abs(acc - c)
    return tot


def _grads(model, v):
    return torch.autograd.grad(v, list(model.parameters()))


# --- directions -------------------------------------------------------------------------------------
def test_sample_unit_directions_bitwise_and_rng_state():
    torch.manual_seed(3)
    u = fg.sample_unit_directions(6, (1, 4, 4), torch.device("cpu"))
    s1 = torch.get_rng_state()
    torch.manual_seed(3)
    ref = o_sample(6, (1, 4, 4))
    assert torch.equal(u, ref) and u.dtype == torch.get_default_dtype() and u.shape == (6, 1, 4, 4)
    assert torch.equal(s1, torch.get_rng_state())
    assert torch.allclose(u.reshape(6, -1).norm(dim=1), torch.ones(6))


# --- derivatives ------------------------------------------------------------------------------------
def test_compute_directional_derivatives_values_and_gradient():
    m = tiny_mlp(0)
    x, y = data(0, B=8)
    torch.manual_seed(0)
    u = fg.sample_unit_directions(8, (3,), x.device)                   # float32, as the reference
    ds = fg.compute_directional_derivatives(m, x, y, u, ce_none, 2, 4)
    ref = o_derivs(m, x, y, u, ce_none, 4)
    assert len(ds) == 3
    for a, b in zip(ds, ref[1:]):
        assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    ga = _grads(m, sum(d.abs().sum() for d in ds))
    gb = _grads(m, sum(d.abs().sum() for d in ref[1:]))
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-13) for a, b in zip(ga, gb))


def test_compute_directional_derivatives_create_graph_and_errors():
    m = tiny_mlp(1)
    x, y = data(1, B=4)
    u = o_sample(4, (3,)).double()
    (d1,) = fg.compute_directional_derivatives(m, x, y, u, ce_none, 1, 1, create_graph=False)
    assert d1.grad_fn is None and torch.allclose(d1, o_derivs(m, x, y, u, ce_none, 1)[0].detach())
    with pytest.raises(ValueError, match="create_graph"):
        fg.compute_directional_derivatives(m, x, y, u, ce_none, 1, 2, create_graph=False)
    with pytest.raises(ValueError, match="min_order"):
        fg.compute_directional_derivatives(m, x, y, u, ce_none, 0, 2)
    with pytest.raises(ValueError, match="max_order"):
        fg.compute_directional_derivatives(m, x, y, u, ce_none, 3, 2)
    with pytest.raises(ValueError, match="Batch size"):
        fg.compute_directional_derivatives(m, x, y, u[:3], ce_none, 1, 2)
    with pytest.raises(ValueError, match="Shape"):
        fg.compute_directional_derivatives(m, x, y, torch.ones(4, 2), ce_none, 1, 2)


def test_scalar_loss_falls_back_to_nested_autograd_with_warning():
    m = tiny_mlp(2)
    x, y = data(2, B=5)
    u = o_sample(5, (3,)).double()
    with pytest.warns(UserWarning, match="not one loss per sample"):
        ds = fg.compute_directional_derivatives(m, x, y, u, F.cross_entropy, 1, 3)
    ref = o_derivs(m, x, y, u, F.cross_entropy, 3)                    # mean loss: d_n / B
    per = o_derivs(m, x, y, u, ce_none, 3)
    for a, b, c in zip(ds, ref, per):
        assert torch.allclose(a, b, rtol=1e-12) and torch.allclose(a * 5, c, rtol=1e-10)


# --- estimators on derivative lists ----------------------------------------------------------------
def test_compute_derivative_ratios():
    d = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([6.0, 4.0])]
    r = fg.compute_derivative_ratios(d)
    assert r.shape == (2, 2)
    assert torch.allclose(r, torch.tensor([[3.0, 2.0], [-0.5, -4.0]]))
    with pytest.raises(ValueError):
        fg.compute_derivative_ratios(d[:1])


def test_estimate_lambda_from_derivatives_hand_numbers():
    d = [torch.tensor([1.0, 1e-9, -2.0]), torch.tensor([2.0, 1.0, 6.0]),
         torch.tensor([4.0, 1.0, 18.0])]
    # sample 1 skipped (|d_1| < 1e-8); sample 0 → log 2, sample 2 → log 3
    lam = fg.estimate_lambda_from_derivatives(d)
    assert lam == pytest.approx((math.log(2) + math.log(3)) / 2, rel=1e-6)
    # without abs, the negative first derivative is below the threshold: sample 2 skipped too
    assert fg.estimate_lambda_from_derivatives(d, abs_derivatives=False) == pytest.approx(math.log(2),
                                                                                        rel=1e-6)
    # ratios ≤ 0 are floored at 1e-10 before the log
    lam = fg.estimate_lambda_from_derivatives([torch.tensor([1.0]), torch.tensor([0.0])])
    assert lam == pytest.approx(math.log(1e-10), rel=1e-6)
    with pytest.warns(CurvatureWarning):
        assert fg.estimate_lambda_from_derivatives([torch.tensor([1.0])]) is None
    with pytest.warns(CurvatureWarning):
        assert fg.estimate_lambda_from_derivatives([torch.tensor([1e-9]), torch.tensor([1.0])]) is None


def test_estimate_lambda_from_derivatives_matches_oracle_on_random_arrays():
    g = torch.Generator().manual_seed(0)
    d = [torch.randn(50, generator=g) * 10.0 ** k for k in range(4)]
    d[0][:5] = 1e-9
    lam = fg.estimate_lambda_from_derivatives(d)
    a = [v.double().abs() for v in d]
    vals = [np.mean([math.log(max(float(a[n + 1][b] / (a[n][b] + 1e-12)), 1e-10)) for n in range(3)])
            for b in range(50) if float(a[0][b]) >= 1e-8]
    assert len(vals) == 45
    assert lam == pytest.approx(float(np.mean(vals)), rel=1e-5)


# --- λ per direction ------------------------------------------------------------------------------
@pytest.mark.parametrize("min1", [1e-8, 0.05])
def test_estimate_lambda_per_direction_matches_oracle_same_seed(min1):
    m = tiny_mlp(3)
    x, y = data(3, B=10)
    m.train()
    torch.manual_seed(21)
    out = fg.estimate_lambda_per_direction(m, x, y, ce_none, max_order=4, K_dirs=4,
                                           min_first_derivative=min1, return_derivatives=True)
    s1 = torch.get_rng_state()
    assert m.training
    torch.manual_seed(21)
    lams, derivs = o_per_direction(m, x, y, ce_none, 4, 4, min1)
    assert torch.equal(s1, torch.get_rng_state())
    assert out["n_valid_directions"] == len(lams) == 4
    assert np.allclose(out["lambda_values"], lams, rtol=1e-9, atol=1e-12)
    assert out["lambda_mean"] == pytest.approx(float(np.mean(lams)), rel=1e-9)
    assert out["lambda_std"] == pytest.approx(float(np.std(lams, ddof=1)), rel=1e-8)
    assert np.allclose(out["derivatives_per_dir"], derivs, rtol=1e-9)
    assert isinstance(out["lambda_mean"], float) and isinstance(out["lambda_values"], list)


def test_estimate_lambda_per_direction_float32_and_one_direction():
    m = tiny_mlp(4, dtype=torch.float32)
    x, y = data(4, B=12, dtype=torch.float32)
    torch.manual_seed(5)
    out = fg.estimate_lambda_per_direction(m, x, y, ce_none, K_dirs=1)
    torch.manual_seed(5)
    lams, _ = o_per_direction(m, x, y, ce_none, 4, 1)
    assert out["lambda_mean"] == pytest.approx(lams[0], rel=1e-4, abs=1e-5)
    assert out["lambda_std"] == 0.0 and "derivatives_per_dir" not in out


def test_estimate_lambda_per_direction_degenerate():
    m = tiny_mlp(5)
    x, y = data(5, B=4)
    with pytest.warns(CurvatureWarning):
        out = fg.estimate_lambda_per_direction(m, x, y, ce_none, max_order=1, K_dirs=2)
    assert out == {"lambda_mean": None, "lambda_std": None, "lambda_values": [],
                   "n_valid_directions": 0}
    with pytest.raises(ValueError, match="K_dirs"):
        fg.estimate_lambda_per_direction(m, x, y, ce_none, K_dirs=0)


# --- regularizers -------------------------------------------------------------------------------
def test_compute_lambda_regularizer_matches_oracle():
    m = tiny_mlp(6)
    x, y = data(6, B=9)
    m.train()
    torch.manual_seed(2)
    R = fg.compute_lambda_regularizer(m, x, y, F.cross_entropy, start_n=2, end_n=4, K_dirs=3,
                                      scale=0.5)
    s1 = torch.get_rng_state()
    assert m.training
    torch.manual_seed(2)
    ref = o_regularizer(m, x, y, F.cross_entropy, 2, 4, 3, 0.5)
    assert torch.equal(s1, torch.get_rng_state())
    assert isinstance(R, torch.Tensor) and R.dim() == 0
    assert R.item() == pytest.approx(ref.item(), rel=1e-10)
    ga, gb = _grads(m, R), _grads(m, ref)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-14) for a, b in zip(ga, gb))
    with pytest.raises(ValueError):
        fg.compute_lambda_regularizer(m, x, y, F.cross_entropy, start_n=3, end_n=2)


def test_compute_lambda_regularizer_defaults_float32():
    m = tiny_mlp(7, dtype=torch.float32)
    x, y = data(7, B=16, dtype=torch.float32)
    torch.manual_seed(9)
    R = fg.compute_lambda_regularizer(m, x, y, F.cross_entropy)
    torch.manual_seed(9)
    ref = o_regularizer(m, x, y, F.cross_entropy, 1, 4, 5, 1e-3)
    assert R.item() == pytest.approx(ref.item(), rel=1e-4)


def test_compute_lambda_target_regularizer_matches_oracle():
    m = tiny_mlp(8)
    x, y = data(8, B=7)
    torch.manual_seed(4)
    R = fg.compute_lambda_target_regularizer(m, x, y, F.cross_entropy, target_lambda=0.3,
                                             max_order=4, K_dirs=2, scale=2.0)
    s1 = torch.get_rng_state()
    torch.manual_seed(4)
    ref = o_target(m, x, y, F.cross_entropy, 0.3, 4, 2, 2.0)
    assert torch.equal(s1, torch.get_rng_state())
    assert R.item() == pytest.approx(ref.item(), rel=1e-9)
    ga, gb = _grads(m, R), _grads(m, ref)
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-13) for a, b in zip(ga, gb))
    # max_order < 2: a zero tensor that requires grad, after the same K draws
    torch.manual_seed(4)
    with pytest.warns(CurvatureWarning):
        Z = fg.compute_lambda_target_regularizer(m, x, y, F.cross_entropy, 0.3, max_order=1, K_dirs=2)
    assert Z.item() == 0.0 and Z.requires_grad
    assert torch.equal(s1, torch.get_rng_state())


# --- ECE ----------------------------------------------------------------------------------------------
def test_compute_ece_hand_example_and_oracle():
    p = torch.tensor([[0.93, 0.07], [0.82, 0.18], [0.29, 0.71], [0.36, 0.64], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 1, 1])
    logits = torch.log(p)
    # bins: .5 → (.4,.5] wrong; .64, .71 correct; .82 wrong; .93 correct
    assert fg.compute_ece(logits, labels) == pytest.approx((0.5 + 0.36 + 0.29 + 0.82 + 0.07) / 5,
                                                           abs=1e-6)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 5, generator=g) * 2
    t = torch.randint(0, 5, (300,), generator=g)
    assert fg.compute_ece(z, t) == pytest.approx(o_ece(z, t), abs=1e-6)
    assert fg.compute_ece(z, t, n_bins=15) == pytest.approx(o_ece(z, t, 15), abs=1e-6)
    assert isinstance(fg.compute_ece(z, t), float)
