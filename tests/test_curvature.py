"""curvrate_fast.curvature: the λ estimators of docs/math.md §3 on hand-checkable derivative arrays,
curvature_rate against nested autograd (float64), the boundary band and its fallback, and bad input."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _curv_oracle import data, nested_fixed, tiny_mlp, unit

from curvrate_fast import baseline
from curvrate_fast.curvature import (
    Band,
    CurvatureWarning,
    band_indices,
    curvature_rate,
    estimate_from_derivatives,
    model_mode,
    ols_slope,
    select_band,
)
from curvrate_fast.directions import check_directions, polarization, sample_directions

E = math.e


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- OLS and estimator A ------------------------------------------------------------------------
def test_ols_weights_for_orders_1_to_4():
    w = ols_slope(torch.eye(4, dtype=torch.float64))
    assert torch.allclose(w, _t([-0.3, -0.1, 0.1, 0.3]), atol=1e-15)
    assert float(ols_slope(_t([5.0, 7.0]))) == pytest.approx(2.0)
    assert float(ols_slope(_t([0.0, 1.0, 3.0, 6.0]))) == pytest.approx(2.0, abs=1e-14)
    with pytest.raises(ValueError):
        ols_slope(_t([1.0]))
    assert float(ols_slope([0, 2, 4])) == pytest.approx(2.0)                  # integers: as floats
    assert float(ols_slope(_t([1.0, 4.0]), orders=[1, 4])) == pytest.approx(1.0)


@pytest.mark.parametrize("y, orders, match", [
    ([1.0, float("nan"), 3.0], None, "y contains 1 NaN or Inf"),
    ([1.0, float("inf")], None, "y contains 1 NaN or Inf"),
    ([1.0, 2.0, 3.0], [2, 2, 2], "must not all be equal"),       # was 0/0: NaN
    ([1.0, 2.0, 3.0], [1, 2], "one value per entry"),
    ([1.0, 2.0], [1, float("nan")], "orders contains 1 NaN"),
])
def test_ols_slope_rejects_what_has_no_slope(y, orders, match):
    with pytest.raises(ValueError, match=match):
        ols_slope(_t(y), orders=orders)


def test_slope_estimator_hand_numbers():
    # two samples, one direction: log|d| = (0, 1, 3, 6) and (2, 2, 2, 2) (signs must not matter)
    d = _t([[1.0, E**2], [-E, -E**2], [E**3, E**2], [E**6, -E**2]])
    r = estimate_from_derivatives(d, "slope")
    # y = (1, 1.5, 2.5, 4); λ = (−3·1 − 1.5 + 2.5 + 3·4)/10 = 1.0
    assert torch.allclose(r.log_norms, _t([1.0, 1.5, 2.5, 4.0]), atol=1e-14)
    assert r.value == pytest.approx(1.0, abs=1e-14)
    assert torch.allclose(r.per_sample, _t([2.0, 0.0]), atol=1e-14)
    assert r.value == pytest.approx(float(r.per_sample.mean()), abs=1e-14)
    assert r.n_samples == 2 and r.n_dirs == 1 and r.max_order == 4 and r.std == 0.0


def test_slope_estimator_directions_and_spread():
    # (N=2, K=3, B=1): per-direction slopes 1, 2, 4 → λ = 7/3, std (ddof 1) = sqrt(7/3)
    d = _t([[[1.0], [1.0], [1.0]], [[E], [E**2], [E**4]]])
    r = estimate_from_derivatives(d, "slope")
    assert torch.allclose(r.per_direction, _t([1.0, 2.0, 4.0]), atol=1e-14)
    assert r.value == pytest.approx(7 / 3, abs=1e-14)
    assert r.std == pytest.approx(math.sqrt(7 / 3), abs=1e-12)


def test_slope_clamps_zero_at_1e_12_and_warns():
    d = _t([[1.0], [0.0], [1.0], [1.0]])
    with pytest.warns(CurvatureWarning, match=r"order\(s\) \[2\]"):
        r = estimate_from_derivatives(d, "slope")
    assert r.extra["n_clamped"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # an isolated zero is clamped without a warning
        r2 = estimate_from_derivatives(_t([[1.0, 1.0], [0.0, 1.0]]), "slope")
    assert r2.extra["n_clamped"] == 1
    # y = (0, log 1e-12, 0, 0) → λ = −(−log 1e-12)/10 ... = −0.1·log(1e-12)
    assert r.value == pytest.approx(-0.1 * math.log(1e-12), abs=1e-12)
    assert math.isfinite(r.value)


def test_slope_rejects_non_finite():
    with pytest.raises(ValueError, match="NaN or Inf"):
        estimate_from_derivatives(_t([[1.0], [float("inf")]]), "slope")


# --- estimator B --------------------------------------------------------------------------------
def test_log_ratio_hand_numbers_and_skipping():
    # samples: (1, 2, 4, 8) → log 2; (1, .5, .25, .125) → −log 2; |d_1| = 1e-8 exactly → skipped;
    # (3, 9, 27, 81) → log 3
    d = _t([[1.0, 1.0, 1e-8, 3.0], [2.0, -0.5, 5.0, 9.0], [4.0, 0.25, 5.0, 27.0],
            [8.0, 0.125, 5.0, 81.0]])
    r = estimate_from_derivatives(d, "log_ratio")
    lam = [sum(math.log(a[i + 1] / (a[i] + 1e-12) + 1e-12) for i in range(3)) / 3
           for a in ([1, 2, 4, 8], [1, .5, .25, .125], [3, 9, 27, 81])]
    assert lam[2] == pytest.approx(math.log(3.0), abs=1e-11)
    assert r.value == pytest.approx(sum(lam) / 3, rel=1e-13)
    assert r.n_samples == 3
    assert math.isnan(float(r.per_sample[2]))
    assert r.per_sample[0].item() == pytest.approx(math.log(2.0), abs=1e-11)
    assert r.valid.tolist() == [[True, True, False, True]]
    # the per-order log norms average the kept samples only
    assert r.log_norms[0].item() == pytest.approx(math.log(3.0) / 3, abs=1e-14)
    assert r.log_norms[3].item() == pytest.approx((math.log(8) + math.log(.125) + math.log(81)) / 3)


def test_log_ratio_all_skipped_warns_nan():
    d = _t([[1e-9, 0.0], [1.0, 1.0]])
    with pytest.warns(CurvatureWarning, match="skipped"):
        r = estimate_from_derivatives(d, "log_ratio")
    assert math.isnan(r.value) and r.n_samples == 0


def test_log_ratio_zero_higher_order_warns():
    d = _t([[1.0], [0.0]])
    with pytest.warns(CurvatureWarning, match="polynomial"):
        r = estimate_from_derivatives(d, "log_ratio")
    assert r.value == pytest.approx(math.log(1e-12), abs=1e-9)


# --- estimator C --------------------------------------------------------------------------------
def test_per_direction_hand_numbers_and_validity_mask():
    N, K, B = 3, 3, 3
    d = torch.zeros(N, K, B, dtype=torch.float64)
    # direction 0: sample 2 has |d_1| < 1e-8 → dropped; y = (0.5, 2, 3.5) → slope 1.5
    d[:, 0, 0] = _t([1.0, E, E**2])
    d[:, 0, 1] = _t([E, E**3, E**5])
    d[:, 0, 2] = _t([1e-9, 1.0, 1.0])
    # direction 1: samples 0, 1 drop out at order 3 (|d_3| ≤ 1e-10, inf); y = (1/3, 1, 1) → 1/3
    d[:, 1, 0] = _t([1.0, 1.0, 1e-11])
    d[:, 1, 1] = _t([1.0, E**2, float("inf")])
    d[:, 1, 2] = _t([E, E, E])
    # direction 2: nothing valid → no slope
    d[:, 2, :] = 1e-9
    r = estimate_from_derivatives(d, "per_direction")
    assert r.per_direction[0].item() == pytest.approx(1.5, abs=1e-14)
    assert r.per_direction[1].item() == pytest.approx(1 / 3, abs=1e-14)
    assert math.isnan(r.per_direction[2].item())
    assert r.value == pytest.approx((1.5 + 1 / 3) / 2, abs=1e-14)
    assert r.std == pytest.approx(abs(1.5 - 1 / 3) / math.sqrt(2), abs=1e-14)
    assert r.valid[0].tolist() == [True, True, False] and r.valid[2].tolist() == [False] * 3
    # per sample: sample 0 → mean(slope(0,1,2)=1, slope(0,0)=0) = 0.5; sample 2 → slope(1,1,1)=0
    assert r.per_sample[0].item() == pytest.approx(0.5, abs=1e-14)
    assert r.per_sample[2].item() == pytest.approx(0.0, abs=1e-14)
    assert r.n_samples == 3


def test_per_direction_nothing_valid_warns():
    with pytest.warns(CurvatureWarning, match="NaN"):
        r = estimate_from_derivatives(torch.full((4, 2, 3), 1e-11, dtype=torch.float64),
                                      "per_direction")
    assert math.isnan(r.value)


def test_estimators_disagree_on_the_same_derivatives():
    # log|d| = (0, 2, 0, 0): A = (−3·0 − 2 + 0 + 0)/10 = −0.2, B = (y_4 − y_1)/3 = 0
    d = _t([[1.0], [E**2], [1.0], [1.0]])
    assert estimate_from_derivatives(d, "slope").value == pytest.approx(-0.2, abs=1e-14)
    assert estimate_from_derivatives(d, "log_ratio").value == pytest.approx(0.0, abs=1e-11)


# --- directions ---------------------------------------------------------------------------------
def test_sample_directions_unit_per_sample_and_generator():
    x = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    u = sample_directions(x, 3, generator=torch.Generator().manual_seed(7))
    assert u.shape == (3, 5, 1, 3, 3) and u.dtype == torch.float64
    assert torch.allclose(u.reshape(3, 5, -1).norm(dim=-1), torch.ones(3, 5, dtype=torch.float64))
    g = torch.Generator().manual_seed(7)
    raw = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(3)]
    ref = torch.stack([r / (r.reshape(5, -1).norm(dim=1).reshape(5, 1, 1, 1) + 1e-12) for r in raw])
    assert torch.equal(u, ref)
    assert not torch.allclose(u[0], u[1])


def test_check_directions_rejects_zero_and_bad_shapes():
    x = torch.randn(4, 3, dtype=torch.float64)
    u = torch.randn(4, 3, dtype=torch.float64)
    u[2] = 0
    with pytest.raises(ValueError, match="zero for sample 2"):
        check_directions(u, x)
    with pytest.raises(ValueError, match="shape"):
        check_directions(torch.randn(4, 2), x)
    assert check_directions(torch.randn(4, 3), x).shape == (1, 4, 3)


def test_polarization_weights():
    u1, u2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    W, c = polarization([u1, u2])
    assert torch.equal(W, torch.tensor([[1.0, 1.0], [1.0, -1.0]])) and c.tolist() == [0.5, -0.5]
    W, c = polarization([u1, u2, u1])
    assert W.shape == (4, 2) and torch.allclose(c, torch.tensor([0.25, -0.25, -0.25, 0.25]))
    # bilinear form xᵀAy: D²f[u1, u2] for f(x) = ½ xᵀAx is u1ᵀAu2
    A = torch.tensor([[2.0, 3.0], [3.0, -1.0]])
    W, c = polarization([u1, u2])
    f2 = 0.5 * torch.einsum("ki,ij,kj->k", W, A, W)      # normalized coefficient of order 2
    assert float((c * f2).sum()) == pytest.approx(3.0)
    # lower orders from the rows of a higher one: D²f[u1, u2] and Df[u1] from u1 ± u2 ± u3
    u3 = torch.tensor([0.3, -2.0])
    W, c2 = polarization([u1, u2, u3], order=2)
    _, c1 = polarization([u1, u2, u3], order=1)
    assert torch.allclose(c1, torch.full((4,), 0.25)) and torch.allclose(c2, torch.tensor([.25, .25, -.25, -.25]))
    f2 = 0.5 * torch.einsum("ki,ij,kj->k", W, A, W)
    assert float((c2 * f2).sum()) == pytest.approx(3.0)
    b = torch.tensor([1.5, -0.7])                          # f(x) = bᵀx: Df[u1] = b_0
    assert float((c1 * (W @ b)).sum()) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        polarization([u1, u2], order=3)


# --- curvature_rate against nested autograd ----------------------------------------------------
@pytest.mark.parametrize("estimator", ["slope", "log_ratio", "per_direction"])
def test_curvature_rate_matches_oracle(estimator):
    m = tiny_mlp(1)
    x, y = data(1, B=12)
    U = unit((3, 12, 3), 5)
    r = curvature_rate(m, x, y, max_order=4, estimator=estimator, directions=U)
    d_ref = nested_fixed(m, x, y, U, 4).detach()
    assert torch.allclose(r.derivatives, d_ref, rtol=1e-10, atol=1e-12)
    ref = estimate_from_derivatives(d_ref, estimator)
    assert r.value == pytest.approx(ref.value, rel=1e-9, abs=1e-12)
    assert r.n_dirs == 3 and r.n_samples == 12 and r.estimator == estimator
    if estimator == "slope":
        y_n = torch.log(d_ref.abs().clamp_min(1e-12)).mean(dim=(1, 2))
        lam = float((-3 * y_n[0] - y_n[1] + y_n[2] + 3 * y_n[3]) / 10)
        assert r.value == pytest.approx(lam, rel=1e-12)


def test_curvature_rate_generator_reproducible_and_directions_drawn_per_sample():
    m = tiny_mlp(2)
    x, y = data(2, B=8)
    r1 = curvature_rate(m, x, y, generator=torch.Generator().manual_seed(3))
    r2 = curvature_rate(m, x, y, generator=torch.Generator().manual_seed(3))
    r3 = curvature_rate(m, x, y, generator=torch.Generator().manual_seed(4))
    assert r1.value == r2.value and r1.value != r3.value
    U = sample_directions(x, 2, generator=torch.Generator().manual_seed(3))
    r4 = curvature_rate(m, x, y, directions=U)
    assert r4.value == pytest.approx(r1.value, rel=1e-14)
    # global RNG when no generator is given
    torch.manual_seed(11)
    a = curvature_rate(m, x, y).value
    torch.manual_seed(11)
    assert curvature_rate(m, x, y).value == a


def test_curvature_rate_factorial_normalization():
    m = tiny_mlp(3)
    x, y = data(3, B=6)
    U = unit((2, 6, 3), 1)
    r = curvature_rate(m, x, y, directions=U)
    rf = curvature_rate(m, x, y, directions=U, normalize="factorial")
    fact = _t([1.0, 2.0, 6.0, 24.0]).reshape(4, 1, 1)
    assert torch.allclose(rf.derivatives, r.derivatives / fact, rtol=1e-13)
    # OLS of log n! over 1..4 = (−3·0 − log 2 + log 6 + 3 log 24)/10
    shift = (-math.log(2) + math.log(6) + 3 * math.log(24)) / 10
    assert rf.value == pytest.approx(r.value - shift, abs=1e-10)
    assert rf.normalize == "factorial" and r.normalize is None


def test_curvature_rate_chunks_equal_one_pass():
    m = tiny_mlp(4)
    x, y = data(4, B=10)
    U = unit((2, 10, 3), 2)
    a = curvature_rate(m, x, y, directions=U)
    b = curvature_rate(m, x, y, directions=U, batch_size=3)
    assert torch.allclose(a.derivatives, b.derivatives, rtol=1e-13)


def test_curvature_rate_eval_mode_restores_modes():
    m = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                            torch.nn.Linear(8, 3)).double()
    m.train()
    m[2].eval()        # a submodule with its own mode must keep it
    m[0].train()
    x, y = data(5, B=6)
    U = unit((1, 6, 3), 3)
    r = curvature_rate(m, x, y, directions=U)
    assert m.training and m[0].training and not m[2].training
    m_eval = torch.nn.Sequential(m[0], m[1], m[3])
    ref = baseline.loss_directional_derivatives(m_eval, x, y, U, 4)
    assert torch.allclose(r.derivatives, ref.detach(), rtol=1e-10)


def test_model_mode_none_leaves_mode():
    m = torch.nn.Linear(2, 2)
    m.train()
    with model_mode(m, None):
        assert m.training
    with model_mode(m, True):
        assert not m.training
    assert m.training


# --- band -----------------------------------------------------------------------------------------
def test_band_indices_inside_and_fallback():
    conf = torch.tensor([0.50, 0.90, 0.60, 0.99, 0.70, 0.66])
    sel = band_indices(conf, (0.45, 0.65))
    assert sel.indices.tolist() == [0, 2] and sel.n_in_band == 2 and not sel.fallback
    assert band_indices(conf, (0.6, 0.6)).indices.tolist() == [2]         # closed interval
    with pytest.warns(CurvatureWarning, match="falling back"):
        fb = band_indices(conf, Band(0.45, 0.65, min_count=3, fallback_count=4))
    # distances to [0.45, 0.65]: 0, .25, 0, .34, .05, .01 → the 4 closest: 0, 2, 5, 4
    assert fb.fallback and fb.indices.tolist() == [0, 2, 4, 5] and fb.n_in_band == 2
    with pytest.warns(CurvatureWarning):
        fb = band_indices(conf, (0.1, 0.2), fallback_count=2)
    assert fb.indices.tolist() == [0, 2]            # closest to the band = least confident
    with pytest.raises(ValueError):
        band_indices(conf, (0.7, 0.6))


def _binary_model():
    # logits (0, 4·x_0): confidence = max(σ(4x_0), 1 − σ(4x_0))
    m = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
        m.bias.zero_()
    return torch.nn.Sequential(m, torch.nn.Tanh(), torch.nn.Linear(2, 2).double())


def test_curvature_rate_band_selects_and_reports():
    m = _binary_model()
    x, _ = data(6, B=40, din=2)
    y = (x[:, 0] > 0).long()
    conf = torch.softmax(m(x), -1).amax(-1).detach()
    inside = ((conf >= 0.5) & (conf <= 0.56)).nonzero().reshape(-1)
    assert 0 < len(inside) < 40
    U = unit((2, 40, 2), 9)
    r = curvature_rate(m, x, y, band=(0.5, 0.56), directions=U)
    assert r.indices.tolist() == inside.tolist() and not r.band_fallback
    assert r.n_samples == len(inside) and r.band == (0.5, 0.56)
    ref = nested_fixed(m, x[inside], y[inside], U[:, inside], 4).detach()
    assert torch.allclose(r.derivatives, ref, rtol=1e-10, atol=1e-14)
    assert select_band(m, x, (0.5, 0.56)).indices.tolist() == inside.tolist()
    # nothing in the band: the paper's fallback, reported
    with pytest.warns(CurvatureWarning, match="falling back"):
        r = curvature_rate(m, x, y, band=Band(0.3, 0.4, fallback_count=5), directions=U)
    assert r.band_fallback and r.n_samples == 5
    assert r.indices.tolist() == sorted(torch.argsort(conf)[:5].tolist())


# --- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_raise_clearly():
    m = tiny_mlp(7)
    x, y = data(7, B=5)
    with pytest.raises(ValueError, match="max_order ≥ 2"):
        curvature_rate(m, x, y, max_order=1)
    with pytest.raises(ValueError, match="n_dirs"):
        curvature_rate(m, x, y, n_dirs=0)
    with pytest.raises(ValueError, match="estimator"):
        curvature_rate(m, x, y, estimator="bogus")
    with pytest.raises(ValueError, match="normalize"):
        curvature_rate(m, x, y, normalize="n!")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        curvature_rate(m, x, torch.tensor([0, 1, 2, 3, 1]))
    with pytest.raises(ValueError, match="≥ 0"):
        curvature_rate(m, x, torch.tensor([0, 1, -100, 2, 1]))
    with pytest.raises(ValueError, match="one entry per sample"):
        curvature_rate(m, x, y[:3])
    with pytest.raises(ValueError, match="one loss per sample"):
        curvature_rate(m, x, y, loss_fn=lambda z, t: F.cross_entropy(z, t))
    U = unit((1, 5, 3), 0)
    U[0, 1] = 0
    with pytest.raises(ValueError, match="zero"):
        curvature_rate(m, x, y, directions=U)


def test_linear_loss_is_warned_not_nan():
    lin = torch.nn.Linear(3, 2).double()
    x, y = data(8, B=6)
    with pytest.warns(CurvatureWarning, match="polynomial"):
        r = curvature_rate(lin, x, y, loss_fn=lambda z, t: z[:, 0] * 2.0,
                           generator=torch.Generator().manual_seed(0))
    assert math.isfinite(r.value)
    assert (r.derivatives[1:] == 0).all()
