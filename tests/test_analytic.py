"""Tests of curvrate_fast.analytic: docs/math.md §5's numbers to the printed digits, and bad input."""
from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from curvrate_fast import analytic as A
from curvrate_fast.analytic import (
    AnalyticRow,
    analytic_table,
    bandlimited_signal,
    exact_log_coefficients,
    exact_taylor_coefficients,
    format_analytic_table,
    radius_of_convergence_fit,
    spectral_edge_fit,
    unnormalized_slope,
    weighted_log_linear_fit,
)


@pytest.fixture(scope="module")
def signal():
    return bandlimited_signal()


@pytest.fixture(scope="module")
def edge(signal):
    return spectral_edge_fit(signal.z, signal.orders, omega=signal.omega)


# --- exact coefficients --------------------------------------------------------------------------


def test_exact_coefficients_closed_forms():
    n, c = exact_taylor_coefficients("1/(1-x)", 60)
    assert n[0] == 2 and n[-1] == 60 and n.size == 59
    assert np.all(c == 1.0)
    n, c = exact_taylor_coefficients("1/(1-2x)", 60)
    assert np.array_equal(c, 2.0 ** n)
    n, c = exact_taylor_coefficients("1/(1-x)^3", 60)
    assert np.array_equal(c, (n + 1) * (n + 2) / 2)
    # derivatives = n! * coefficients, and the log version agrees without overflow
    for name in ("geometric", "geometric2", "cubic_pole"):
        n, d = exact_taylor_coefficients(name, 20, n_min=0, normalized=False)
        _, c = exact_taylor_coefficients(name, 20, n_min=0)
        assert np.allclose(d, c * np.array([math.factorial(k) for k in n], dtype=float), rtol=1e-15)
        _, ly = exact_log_coefficients(name, 20, n_min=0, normalized=False)
        assert np.allclose(ly, np.log(d), rtol=1e-13, atol=1e-13)


def test_exact_coefficients_match_series_expansion():
    # (1-x)^-3 from the Cauchy product of three geometric series
    g = np.ones(11)
    cube = np.convolve(np.convolve(g, g)[:11], g)[:11]
    _, c = exact_taylor_coefficients("cubic_pole", 10, n_min=0)
    assert np.array_equal(c, cube)


# --- radius of convergence fits (SPEC §5) ---------------------------------------------------------


@pytest.mark.parametrize("name, alpha, r_hat", [
    ("1/(1-x)", 0.000000, 1.0),
    ("1/(1-2x)", 0.693147, 0.5),
    ("1/(1-x)^3", 0.011665, 0.988403),
])
def test_radius_fit_reproduces_spec(name, alpha, r_hat):
    n, c = exact_taylor_coefficients(name, 60)
    fit = radius_of_convergence_fit(c, n)
    assert round(fit.alpha, 6) + 0.0 == alpha
    assert round(fit.R_hat, 6) == r_hat
    assert fit.lam == fit.alpha and fit.n == tuple(range(2, 61)) and fit.kappa is not None
    # the same from logs, and with n defaulting to 2..60
    fit2 = radius_of_convergence_fit(np.log(c), is_log=True)
    assert fit2.alpha == pytest.approx(fit.alpha, abs=1e-12)


def test_cubic_pole_error_and_no_log_term():
    n, c = exact_taylor_coefficients("1/(1-x)^3", 60)
    fit = radius_of_convergence_fit(c, n)
    assert round(100 * (1 - fit.R_hat), 2) == 1.16
    nolog = radius_of_convergence_fit(c, n, log_term=False)
    assert round(nolog.alpha, 4) == 0.0845 and nolog.kappa is None


def test_weights_multiply_squared_residuals():
    # polyfit-style weights (w on residuals, w^2 on squares) would give 0.012770, not the paper's 0.011665
    n, c = exact_taylor_coefficients("1/(1-x)^3", 60)
    y = np.log(c)
    w = 1 / (1 + 0.02 * n)
    X = np.stack([np.ones_like(n, dtype=float), n, np.log(n)], 1)
    ref = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * y))
    assert radius_of_convergence_fit(c, n).alpha == pytest.approx(ref[1], abs=1e-12)


def test_fit_accepts_torch_tensor():
    torch = pytest.importorskip("torch")
    n, c = exact_taylor_coefficients("1/(1-2x)", 60)
    fit = radius_of_convergence_fit(torch.tensor(c, requires_grad=True), torch.tensor(n))
    assert round(fit.alpha, 6) == 0.693147


def test_unnormalized_slope():
    assert round(unnormalized_slope("1/(1-x)"), 3) == 1.063
    assert round(unnormalized_slope("1/(1-2x)"), 3) == 1.756
    assert round(unnormalized_slope("1/(1-x)^3"), 3) == 1.597
    # from explicit derivatives, equal to estimator A's closed form (−3y1 − y2 + y3 + 3y4)/10
    _, d = exact_taylor_coefficients("cubic_pole", 4, n_min=1, normalized=False)
    y = np.log(d)
    assert unnormalized_slope(-d) == pytest.approx((-3 * y[0] - y[1] + y[2] + 3 * y[3]) / 10, abs=1e-12)


# --- bandlimited signal (SPEC §5) -----------------------------------------------------------------


def test_bandlimited_signal_setup(signal):
    assert signal.x.size == 8192 and signal.x[0] == -10.0 and signal.x[-1] < 10.0
    assert signal.dx == 20 / 8192
    assert round(signal.omega, 4) == 450.3787
    assert signal.z.shape == (31,)
    band = signal.xi <= signal.omega
    assert np.allclose(np.abs(signal.H[band]), 1.0) and np.all(signal.H[~band] == 0)
    # z_n is the Riemann-sum L2 norm of D^n f
    d3 = signal.derivative(3)
    assert signal.z[3] == pytest.approx(math.log(math.sqrt(np.sum(d3 ** 2) * signal.dx)), rel=1e-14)


def test_spectral_edge_reproduces_spec(edge):
    assert round(edge.omega_hat_linear, 2) == 427.23
    assert round(100 * edge.rel_error_linear, 1) == 5.1
    assert round(edge.omega_hat_log, 2) == 448.14
    assert round(100 * edge.rel_error_log, 2) == 0.50
    assert edge.linear.n == tuple(range(31)) and edge.with_log.n == tuple(range(1, 31))


def test_phase_convention_only_affects_z0(signal):
    other = bandlimited_signal(phase="zero")
    assert np.allclose(other.z[1:], signal.z[1:], rtol=1e-12)
    assert np.array_equal(bandlimited_signal(phase="all_bins").z, signal.z)


# --- table ---------------------------------------------------------------------------------------


def test_analytic_table_all_match():
    rows = analytic_table()
    assert len(rows) == 16 and all(isinstance(r, AnalyticRow) for r in rows)
    text = format_analytic_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.rstrip().endswith("yes") for line in lines[2:]), text


def test_docstring_examples():
    failed, attempted = doctest.testmod(A)
    assert attempted > 0 and failed == 0


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, msg", [
    (dict(coeffs=[1.0, 2.0], n=[2, 3]), "at least 3 points"),
    (dict(coeffs=[1.0, 2.0, 0.0, 4.0]), "zeros"),
    (dict(coeffs=[1.0, np.nan, 3.0, 4.0]), "NaN"),
    (dict(coeffs=[1.0, np.inf, 3.0, 4.0]), "infinite"),
    (dict(coeffs=[1.0, 2.0, 3.0], n=[2, 3]), "same length"),
    (dict(coeffs=[0.0, 1.0, 2.0], n=[0, 1, 2], is_log=True), "n >= 1"),
    (dict(coeffs=[0.0, 1.0, 2.0], n=[2, 2, 2], is_log=True), "degenerate"),
    (dict(coeffs=[0.0, 1.0, 2.0], n=[2, 3.5, 4], is_log=True), "integer"),
    (dict(coeffs=[]), "empty"),
    (dict(coeffs=[[1.0, 2.0, 3.0]]), "1-D"),
    (dict(coeffs=["a", "b", "c"]), "real numbers"),
])
def test_radius_fit_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        radius_of_convergence_fit(**kwargs)


def test_other_bad_input():
    with pytest.raises(ValueError, match="at least 2 points"):
        weighted_log_linear_fit([1.0], [1], log_term=False)
    with pytest.raises(ValueError, match="positive"):
        weighted_log_linear_fit([1.0, 2.0, 3.0], [1, 2, 100], weight_decay=-0.02)
    with pytest.raises(ValueError, match="unknown analytic function"):
        exact_taylor_coefficients("sin", 10)
    with pytest.raises(ValueError, match="n_min <= n_max"):
        exact_taylor_coefficients("geometric", 1, n_min=2)
    with pytest.raises(ValueError, match="zeros"):
        unnormalized_slope([1.0, 0.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        unnormalized_slope([1.0, np.nan, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        spectral_edge_fit([0.0, 1.0, np.nan, 3.0, 4.0])
    with pytest.raises(ValueError, match="phase"):
        bandlimited_signal(phase="gaussian")
    with pytest.raises(ValueError, match="band_fraction"):
        bandlimited_signal(band_fraction=0.0)
    with pytest.raises(ValueError, match="non-negative integer"):
        bandlimited_signal(n_max=2).derivative(-1)
