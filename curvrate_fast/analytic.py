r"""Analytic validation of the curvature rate λ (docs/math.md §5, paper §5.1).

Everything here is plain NumPy (float64); torch tensors are accepted wherever an array is (they are
detached and moved to the CPU). Nothing here differentiates a network: these are the closed-form
checks that tie the estimator of docs/math.md §3 to the radius of convergence and to the spectral edge.

**1. Radius of convergence.** For f analytic at 0 with Taylor coefficients c_n = f⁽ⁿ⁾(0)/n! and radius of
convergence R, Cauchy–Hadamard gives limsup (1/n) log|c_n| = −log R. With the *normalized* (divided by
n!) convention of docs/math.md §5, λ = −log R. The three test functions and their exact coefficients are

    1/(1−x)      c_n = 1                 R = 1     λ = 0
    1/(1−2x)     c_n = 2ⁿ                R = 1/2   λ = log 2 = 0.693147
    1/(1−x)³     c_n = (n+1)(n+2)/2      R = 1     λ = 0

(docs/math.md notes that the paper misprints the third as (1−x³)⁻¹.) A pole of order m gives
log|c_n| = −n·log R + (m−1)·log n + const + O(1/n), so the fit

    y_n = log|c_n| ≈ β + α·n + κ·log n,     n = 2..60,

absorbs the polynomial prefactor in κ·log n; α estimates λ and R̂ = e^{−α}. It is a weighted least-squares
fit with weights w_n = 1/(1 + 0.02·n) that multiply the **squared** residuals, i.e. it minimises
Σ_n w_n (y_n − β − α n − κ log n)² (the standard WLS convention; ``numpy.polyfit(w=...)`` would instead
multiply the residuals, i.e. square the weights, and does *not* reproduce the paper). This convention
reproduces docs/math.md §5 to the printed digits: α = 0.000000, 0.693147, 0.011665 (R̂ = 0.988403, a 1.16 %
error, from the O(1/n) corrections of log((n+1)(n+2)/2) that κ·log n cannot absorb), and α = 0.0845
(R̂ = 0.9190) for the third function when the κ·log n term is dropped.

**2. Spectral edge.** A bandlimited f with spectrum supported on |ξ| ≤ Ω has
‖Dⁿf‖₂² = (1/2π)∫|ξ|^{2n}|f̂|² dξ ≍ Ω^{2n+1}/(2n+1) for a flat spectrum, so
z_n = log‖Dⁿf‖₂ = n·log Ω − ½·log(2n+1) + const and the slope of z_n against n is log Ω (here the
derivatives are *not* divided by n!). docs/math.md §5's signal: grid x ∈ [−10, 10), N = 8192 points,
dx = 20/N, ξ = 2π·rfftfreq(N, dx), Ω = 0.35·max ξ = 450.3787, H(ξ) = e^{iφ(ξ)} for ξ ≤ Ω and 0 above,
Dⁿf = irfft((iξ)ⁿ·H, N), z_n = log sqrt(Σ (Dⁿf)²·dx) for n = 0..30. Weighted (1/(1 + 0.05 n), same
convention) fits give Ω̂ = e^α = 427.23 (5.1 % low: the −½ log(2n+1) term biases a pure line) and, with
κ·log n over n = 1..30, Ω̂ = 448.14 (0.50 %).

Random phase: φ = ``default_rng(123).uniform(0, 2π, size=#in-band bins)``, one draw per in-band rfft bin
in increasing frequency order. By Parseval the norms do not depend on the phase except through the DC bin
(irfft keeps only Re H[0], and (iξ)ⁿ = 0 there for n ≥ 1), so only z_0 is affected; drawing a phase for
all 4097 bins gives bit-identical results (bin 0 gets the first draw either way), and zero phase changes
Ω̂ only in the 4th decimal of the linear fit (427.2320 vs 427.2325) and not at all with the κ·log n term
(which does not use n = 0).

**3. Two conventions.** The network estimator (docs/math.md §3, estimator A) does *not* divide by n! and fits
n = 1..4 by ordinary least squares. On the analytic functions that slope of log|f⁽ⁿ⁾(0)| is 1.063, 1.756,
1.597 — mostly log n! growth, not −log R. :func:`unnormalized_slope` computes it.

:func:`analytic_table` collects every number of docs/math.md §5 next to the paper's, and
:func:`format_analytic_table` renders it (used by ``python -m curvrate_fast reproduce analytic``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "ANALYTIC_FUNCTIONS",
    "PAPER_VALUES",
    "AnalyticFunction",
    "RadiusFit",
    "BandlimitedSignal",
    "SpectralEdgeFit",
    "AnalyticRow",
    "exact_taylor_coefficients",
    "exact_log_coefficients",
    "weighted_log_linear_fit",
    "radius_of_convergence_fit",
    "unnormalized_slope",
    "bandlimited_signal",
    "spectral_edge_fit",
    "analytic_table",
    "format_analytic_table",
]


# ---------------------------------------------------------------------------------------------------
# The three analytic test functions
# ---------------------------------------------------------------------------------------------------


class AnalyticFunction(NamedTuple):
    """One test function of docs/math.md §5: a display name, its radius of convergence and ``log c_n``."""

    key: str
    display: str
    radius: float
    log_coeff: Any  # Callable[[np.ndarray], np.ndarray]: log of f^(n)(0)/n! for integer n >= 0


ANALYTIC_FUNCTIONS: Dict[str, AnalyticFunction] = {
    "geometric": AnalyticFunction(
        "geometric", "1/(1-x)", 1.0, lambda n: np.zeros(np.shape(n), dtype=np.float64)),
    "geometric2": AnalyticFunction(
        "geometric2", "1/(1-2x)", 0.5, lambda n: np.asarray(n, dtype=np.float64) * math.log(2.0)),
    "cubic_pole": AnalyticFunction(
        "cubic_pole", "1/(1-x)^3", 1.0,
        lambda n: np.log((np.asarray(n, dtype=np.float64) + 1.0) * (np.asarray(n, dtype=np.float64) + 2.0) / 2.0)),
}

_ALIASES: Dict[str, str] = {
    "1/(1-x)": "geometric", "1/(1−x)": "geometric", "inv": "geometric",
    "1/(1-2x)": "geometric2", "1/(1−2x)": "geometric2", "inv2": "geometric2",
    "1/(1-x)^3": "cubic_pole", "1/(1−x)^3": "cubic_pole", "1/(1−x)³": "cubic_pole",
    "(1-x)^-3": "cubic_pole", "inv3": "cubic_pole",
}


def _lookup(name: str) -> AnalyticFunction:
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in ANALYTIC_FUNCTIONS:
        raise ValueError(
            f"unknown analytic function {name!r}; expected one of {sorted(ANALYTIC_FUNCTIONS)} "
            f"or {sorted(_ALIASES)}")
    return ANALYTIC_FUNCTIONS[key]


def _orders(n_min: int, n_max: int) -> np.ndarray:
    for v, nm in ((n_min, "n_min"), (n_max, "n_max")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{nm} must be an integer, got {v!r}")
    if n_min < 0 or n_max < n_min:
        raise ValueError(f"need 0 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    return np.arange(int(n_min), int(n_max) + 1)


def exact_log_coefficients(name: str, n_max: int = 60, *, n_min: int = 2,
                           normalized: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Exact ``log|f⁽ⁿ⁾(0)/n!|`` (or ``log|f⁽ⁿ⁾(0)|`` if not ``normalized``) for n = n_min..n_max.

    Computed in log space (``lgamma`` for n!), so it never overflows. Returns ``(n, log_values)``.

    >>> n, y = exact_log_coefficients("1/(1-2x)", 4, n_min=1)
    >>> [round(float(v), 6) for v in y]
    [0.693147, 1.386294, 2.079442, 2.772589]
    """
    f = _lookup(name)
    n = _orders(n_min, n_max)
    y = np.asarray(f.log_coeff(n), dtype=np.float64)
    if not normalized:
        y = y + np.array([math.lgamma(k + 1.0) for k in n], dtype=np.float64)
    return n, y


def exact_taylor_coefficients(name: str, n_max: int = 60, *, n_min: int = 2,
                              normalized: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Exact Taylor coefficients at x = 0 of an analytic test function of docs/math.md §5.

    ``name`` is ``"geometric"`` / ``"1/(1-x)"`` (c_n = 1), ``"geometric2"`` / ``"1/(1-2x)"``
    (c_n = 2ⁿ) or ``"cubic_pole"`` / ``"1/(1-x)^3"`` (c_n = (n+1)(n+2)/2). Returns ``(n, values)`` with
    n = n_min..n_max and values = f⁽ⁿ⁾(0)/n! (``normalized=True``, default) or the derivatives f⁽ⁿ⁾(0)
    themselves, as float64 (exact for the default range n ≤ 60 up to float64 rounding; use
    :func:`exact_log_coefficients` for large n).

    >>> n, c = exact_taylor_coefficients("1/(1-x)^3", 5)
    >>> n.tolist(), c.tolist()
    ([2, 3, 4, 5], [6.0, 10.0, 15.0, 21.0])
    >>> exact_taylor_coefficients("1/(1-x)", 3, n_min=1, normalized=False)[1].tolist()
    [1.0, 2.0, 6.0]
    """
    f = _lookup(name)
    n = _orders(n_min, n_max)
    if f.key == "geometric":
        c = [1.0 for _ in n]
    elif f.key == "geometric2":
        c = [float(2 ** int(k)) for k in n]
    else:
        c = [float((int(k) + 1) * (int(k) + 2) // 2) for k in n]
    if not normalized:
        c = [float(math.factorial(int(k))) * v for k, v in zip(n, c)]
    return n, np.asarray(c, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------
# Weighted log-linear fit
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RadiusFit:
    """Result of a weighted fit y_n ≈ β + α·n (+ κ·log n).

    ``alpha`` is the slope (λ in the normalized convention), ``R_hat = exp(−alpha)`` the estimated radius
    of convergence, ``beta`` the intercept, ``kappa`` the log n coefficient (``None`` without that term),
    ``n`` the orders used, ``weight_decay`` the c of the weights 1/(1 + c·n).
    """

    alpha: float
    R_hat: float
    beta: float
    kappa: Optional[float]
    n: Tuple[int, ...]
    log_term: bool
    weight_decay: float

    @property
    def lam(self) -> float:
        """λ = α."""
        return self.alpha

    @property
    def growth(self) -> float:
        """e^α = 1/R̂ (the spectral-edge estimate Ω̂ when the data are log-norms of derivatives)."""
        return math.exp(self.alpha)


def _to_numpy(a: Any, what: str) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a 1-D array of real numbers: {e}") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    return arr


def weighted_log_linear_fit(y: Any, n: Any, *, log_term: bool = True,
                            weight_decay: float = 0.02) -> RadiusFit:
    """Weighted least squares y_n ≈ β + α·n (+ κ·log n) with weights 1/(1 + weight_decay·n).

    The weights multiply the squared residuals: minimise Σ w_n (y_n − β − α n − κ log n)². This is the
    convention that reproduces docs/math.md §5. ``y`` are already-logged values; see
    :func:`radius_of_convergence_fit` for the version that takes coefficients.

    >>> fit = weighted_log_linear_fit([0.0, 1.0, 2.0, 3.0], [1, 2, 3, 4], log_term=False)
    >>> round(fit.alpha, 12), round(fit.beta, 12)
    (1.0, -1.0)
    """
    yy = _to_numpy(y, "y")
    nn = _to_numpy(n, "n")
    if yy.shape != nn.shape:
        raise ValueError(f"y and n must have the same length, got {yy.size} and {nn.size}")
    if not np.all(np.isfinite(yy)):
        raise ValueError("y contains NaN or infinite values")
    if not np.all(np.isfinite(nn)):
        raise ValueError("n contains NaN or infinite values")
    if not np.all(nn == np.round(nn)):
        raise ValueError("n must hold integer orders")
    wd = float(weight_decay)
    if not math.isfinite(wd):
        raise ValueError(f"weight_decay must be finite, got {weight_decay!r}")
    n_params = 3 if log_term else 2
    if nn.size < n_params:
        raise ValueError(
            f"need at least {n_params} points for the {'β + α·n + κ·log n' if log_term else 'β + α·n'} "
            f"fit, got {nn.size}")
    if log_term and np.any(nn < 1):
        raise ValueError("the κ·log n term needs orders n >= 1 (log 0 is undefined); "
                         "drop n = 0 or pass log_term=False")
    denom = 1.0 + wd * nn
    if np.any(denom <= 0):
        raise ValueError(f"weights 1/(1 + {wd}·n) must be positive for all n")
    w = 1.0 / denom
    cols = [np.ones_like(nn), nn] + ([np.log(nn)] if log_term else [])
    A = np.stack(cols, axis=1)
    s = np.sqrt(w)
    As = A * s[:, None]
    if np.linalg.matrix_rank(As) < n_params:
        raise ValueError("the fit is degenerate: need at least "
                         f"{n_params} distinct orders n")
    coef, *_ = np.linalg.lstsq(As, yy * s, rcond=None)
    alpha = float(coef[1])
    return RadiusFit(alpha=alpha, R_hat=math.exp(-alpha), beta=float(coef[0]),
                     kappa=float(coef[2]) if log_term else None,
                     n=tuple(int(k) for k in nn), log_term=bool(log_term), weight_decay=wd)


def radius_of_convergence_fit(coeffs: Any, n: Any = None, *, log_term: bool = True,
                              weight_decay: float = 0.02, is_log: bool = False) -> RadiusFit:
    """Estimate λ = α and R̂ = e^{−α} from Taylor coefficients (docs/math.md §5).

    Fits y_n = log|c_n| ≈ β + α·n + κ·log n by weighted least squares with weights 1/(1 + 0.02 n) on
    the squared residuals. ``coeffs`` are c_n = f⁽ⁿ⁾(0)/n! (any sign, none zero), or already
    ``log|c_n|`` if ``is_log=True``. ``n`` defaults to 2, 3, … (docs/math.md's range starts at 2).
    ``log_term=False`` drops κ·log n.

    >>> n, c = exact_taylor_coefficients("1/(1-x)^3", 60)
    >>> fit = radius_of_convergence_fit(c, n)
    >>> round(fit.alpha, 6), round(fit.R_hat, 6)
    (0.011665, 0.988403)
    >>> round(radius_of_convergence_fit(c, n, log_term=False).alpha, 4)
    0.0845
    """
    c = _to_numpy(coeffs, "coeffs")
    if c.size == 0:
        raise ValueError("coeffs is empty")
    if np.any(np.isnan(c)):
        raise ValueError("coeffs contains NaN")
    if is_log:
        y = c
    else:
        if not np.all(np.isfinite(c)):
            raise ValueError("coeffs contains infinite values")
        if np.any(c == 0):
            raise ValueError("coeffs contains zeros; log|c_n| is undefined (drop those orders)")
        y = np.log(np.abs(c))
    nn = np.arange(2, 2 + c.size) if n is None else n
    return weighted_log_linear_fit(y, nn, log_term=log_term, weight_decay=weight_decay)


def unnormalized_slope(name_or_derivs: Any, orders: Sequence[int] = (1, 2, 3, 4)) -> float:
    """Ordinary least-squares slope of log|f⁽ⁿ⁾(0)| on n (no n!), as the network estimator computes it.

    ``name_or_derivs`` is the name of an analytic test function (its exact derivatives are used) or the
    derivatives d_n themselves at ``orders``. docs/math.md §5: 1.063, 1.756, 1.597 on the three functions
    for n = 1..4 — a different quantity from −log R.

    >>> round(unnormalized_slope("1/(1-x)"), 3), round(unnormalized_slope("1/(1-x)^3"), 3)
    (1.063, 1.597)
    """
    ords = _to_numpy(list(orders), "orders")
    if isinstance(name_or_derivs, str):
        o = [int(k) for k in ords]
        if any(k != float(v) for k, v in zip(o, ords)) or min(o) < 0:
            raise ValueError("orders must be non-negative integers")
        y = np.array([exact_log_coefficients(name_or_derivs, k, n_min=k, normalized=False)[1][0]
                      for k in o])
    else:
        d = _to_numpy(name_or_derivs, "derivatives")
        if d.shape != ords.shape:
            raise ValueError(f"got {d.size} derivatives for {ords.size} orders")
        if np.any(np.isnan(d)) or not np.all(np.isfinite(d)):
            raise ValueError("derivatives contain NaN or infinite values")
        if np.any(d == 0):
            raise ValueError("derivatives contain zeros; log|d_n| is undefined")
        y = np.log(np.abs(d))
    return weighted_log_linear_fit(y, ords, log_term=False, weight_decay=0.0).alpha


# ---------------------------------------------------------------------------------------------------
# Bandlimited signal and spectral edge
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BandlimitedSignal:
    """docs/math.md §5's bandlimited test signal and the log-norms of its derivatives.

    ``x`` grid, ``dx`` spacing, ``xi`` angular rfft frequencies, ``omega`` the band edge Ω, ``H`` the
    (complex) rfft spectrum, ``orders`` n = 0..n_max, ``z`` = log ‖Dⁿf‖₂ (Riemann sum, no n!).
    """

    x: np.ndarray
    dx: float
    xi: np.ndarray
    omega: float
    H: np.ndarray
    orders: np.ndarray
    z: np.ndarray

    def derivative(self, n: int) -> np.ndarray:
        """Dⁿf on the grid: irfft((iξ)ⁿ·H, N)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"derivative order must be a non-negative integer, got {n!r}")
        return np.fft.irfft((1j * self.xi) ** int(n) * self.H, n=self.x.size)


def bandlimited_signal(n_points: int = 8192, x_min: float = -10.0, x_max: float = 10.0, *,
                       band_fraction: float = 0.35, seed: int = 123, n_max: int = 30,
                       phase: str = "in_band") -> BandlimitedSignal:
    """Build docs/math.md §5's bandlimited signal and z_n = log sqrt(Σ (Dⁿf)²·dx), n = 0..n_max.

    Grid x = x_min + k·dx, dx = (x_max − x_min)/n_points (so x ∈ [−10, 10)), ξ = 2π·rfftfreq(N, dx),
    Ω = band_fraction·max ξ, H = e^{iφ} on ξ ≤ Ω and 0 above. ``phase="in_band"`` (default) draws
    φ = ``default_rng(seed).uniform(0, 2π, #in-band bins)``; ``"all_bins"`` draws one phase for every
    rfft bin (then zeroes the out-of-band ones; identical result, since bin 0 gets the first draw either
    way); ``"zero"`` uses φ = 0. The phase affects only z_0 (see the module docstring).

    >>> s = bandlimited_signal()
    >>> round(s.omega, 4), s.z.shape
    (450.3787, (31,))
    """
    for v, nm in ((n_points, "n_points"), (n_max, "n_max"), (seed, "seed")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{nm} must be an integer, got {v!r}")
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    if n_max < 0:
        raise ValueError(f"n_max must be >= 0, got {n_max}")
    if not (math.isfinite(x_min) and math.isfinite(x_max) and x_max > x_min):
        raise ValueError(f"need finite x_min < x_max, got {x_min}, {x_max}")
    if not (math.isfinite(band_fraction) and 0.0 < band_fraction <= 1.0):
        raise ValueError(f"band_fraction must be in (0, 1], got {band_fraction}")
    N = int(n_points)
    dx = (x_max - x_min) / N
    x = x_min + dx * np.arange(N)
    xi = 2.0 * np.pi * np.fft.rfftfreq(N, dx)
    omega = band_fraction * float(xi.max())
    band = xi <= omega
    rng = np.random.default_rng(seed)
    H = np.zeros(xi.shape, dtype=np.complex128)
    if phase == "in_band":
        H[band] = np.exp(1j * rng.uniform(0.0, 2.0 * np.pi, int(band.sum())))
    elif phase == "all_bins":
        H = np.exp(1j * rng.uniform(0.0, 2.0 * np.pi, xi.size)) * band
    elif phase == "zero":
        H[band] = 1.0
    else:
        raise ValueError(f"phase must be 'in_band', 'all_bins' or 'zero', got {phase!r}")
    orders = np.arange(int(n_max) + 1)
    z = np.empty(orders.size)
    for k in orders:
        D = np.fft.irfft((1j * xi) ** int(k) * H, n=N)
        z[k] = math.log(math.sqrt(float(np.sum(D * D)) * dx))
    return BandlimitedSignal(x=x, dx=dx, xi=xi, omega=omega, H=H, orders=orders, z=z)


@dataclass(frozen=True)
class SpectralEdgeFit:
    """Both spectral-edge fits of docs/math.md §5.

    ``linear``: z_n ≈ β + α n over all orders (n = 0..30); ``with_log``: z_n ≈ β + α n + κ log n over
    n ≥ 1. Ω̂ = e^α. ``omega`` is the true edge when known (else ``None``).
    """

    linear: RadiusFit
    with_log: RadiusFit
    omega: Optional[float] = None

    @property
    def omega_hat_linear(self) -> float:
        return self.linear.growth

    @property
    def omega_hat_log(self) -> float:
        return self.with_log.growth

    @property
    def rel_error_linear(self) -> Optional[float]:
        """|Ω̂ − Ω|/Ω of the linear fit (``None`` if Ω unknown)."""
        return None if self.omega is None else abs(self.omega_hat_linear - self.omega) / self.omega

    @property
    def rel_error_log(self) -> Optional[float]:
        """|Ω̂ − Ω|/Ω of the fit with κ·log n (``None`` if Ω unknown)."""
        return None if self.omega is None else abs(self.omega_hat_log - self.omega) / self.omega


def spectral_edge_fit(z: Any = None, n: Any = None, *, omega: Optional[float] = None,
                      weight_decay: float = 0.05, log_n_min: int = 1) -> SpectralEdgeFit:
    """Estimate the band edge Ω̂ = e^α from log-norms z_n = log‖Dⁿf‖ (docs/math.md §5).

    Without arguments it uses :func:`bandlimited_signal` (and its Ω). ``n`` defaults to 0, 1, ….
    The linear fit uses all orders; the κ·log n fit uses orders n ≥ ``log_n_min``. Weights
    1/(1 + 0.05 n) on the squared residuals.

    >>> res = spectral_edge_fit()
    >>> round(res.omega_hat_linear, 2), round(res.omega_hat_log, 2)
    (427.23, 448.14)
    >>> round(100 * res.rel_error_linear, 1), round(100 * res.rel_error_log, 2)
    (5.1, 0.5)
    """
    if z is None:
        if n is not None:
            raise ValueError("pass n only together with z")
        sig = bandlimited_signal()
        zz, nn = sig.z, sig.orders.astype(np.float64)
        if omega is None:
            omega = sig.omega
    else:
        zz = _to_numpy(z, "z")
        nn = np.arange(zz.size, dtype=np.float64) if n is None else _to_numpy(n, "n")
        if nn.shape != zz.shape:
            raise ValueError(f"z and n must have the same length, got {zz.size} and {nn.size}")
    if np.any(np.isnan(zz)):
        raise ValueError("z contains NaN")
    linear = weighted_log_linear_fit(zz, nn, log_term=False, weight_decay=weight_decay)
    m = nn >= max(1, log_n_min)
    with_log = weighted_log_linear_fit(zz[m], nn[m], log_term=True, weight_decay=weight_decay)
    return SpectralEdgeFit(linear=linear, with_log=with_log,
                           omega=None if omega is None else float(omega))


# ---------------------------------------------------------------------------------------------------
# The table of docs/math.md §5
# ---------------------------------------------------------------------------------------------------


class AnalyticRow(NamedTuple):
    """One number of docs/math.md §5: what it is, our value, the paper's value as printed, display digits."""

    name: str
    value: float
    paper: str
    decimals: int


#: docs/math.md §5's printed numbers (as printed).
PAPER_VALUES: Dict[str, str] = {
    "alpha geometric": "0.000000", "R_hat geometric": "1",
    "alpha geometric2": "0.693147", "R_hat geometric2": "0.5",
    "alpha cubic_pole": "0.011665", "R_hat cubic_pole": "0.988403", "R_err cubic_pole": "1.16",
    "alpha_nolog cubic_pole": "0.0845",
    "omega": "450.3787", "omega_hat_linear": "427.23", "omega_err_linear": "5.1",
    "omega_hat_log": "448.14", "omega_err_log": "0.50",
    "slope14 geometric": "1.063", "slope14 geometric2": "1.756", "slope14 cubic_pole": "1.597",
}


def analytic_table() -> List[AnalyticRow]:
    """Every number of docs/math.md §5, recomputed, next to the paper's value.

    Rows are :class:`AnalyticRow` ``(name, value, paper, decimals)``: ``paper`` is the string docs/math.md
    prints, ``decimals`` the digits to show ``value`` with. Takes ~0.1 s.

    >>> rows = analytic_table()
    >>> [(r.name, f"{r.value:.{r.decimals}f}", r.paper) for r in rows][4]
    ('alpha 1/(1-x)^3 (kappa log n)', '0.011665', '0.011665')
    """
    rows: List[AnalyticRow] = []
    for key in ("geometric", "geometric2", "cubic_pole"):
        f = ANALYTIC_FUNCTIONS[key]
        n, c = exact_taylor_coefficients(key, 60, n_min=2)
        fit = radius_of_convergence_fit(c, n)
        rows.append(AnalyticRow(f"alpha {f.display} (kappa log n)", fit.alpha, PAPER_VALUES[f"alpha {key}"], 6))
        rows.append(AnalyticRow(f"R_hat {f.display}", fit.R_hat, PAPER_VALUES[f"R_hat {key}"], 6))
        if key == "cubic_pole":
            rows.append(AnalyticRow(f"R_hat error {f.display} (%)",
                                    100.0 * abs(fit.R_hat - f.radius) / f.radius,
                                    PAPER_VALUES["R_err cubic_pole"], 2))
            nolog = radius_of_convergence_fit(c, n, log_term=False)
            rows.append(AnalyticRow(f"alpha {f.display} (no log term)", nolog.alpha,
                                    PAPER_VALUES["alpha_nolog cubic_pole"], 4))
    sig = bandlimited_signal()
    se = spectral_edge_fit(sig.z, sig.orders, omega=sig.omega)
    rows.append(AnalyticRow("bandlimited Omega", sig.omega, PAPER_VALUES["omega"], 4))
    rows.append(AnalyticRow("Omega_hat linear, n=0..30", se.omega_hat_linear, PAPER_VALUES["omega_hat_linear"], 2))
    rows.append(AnalyticRow("Omega_hat linear error (%)", 100.0 * (se.rel_error_linear or 0.0),
                            PAPER_VALUES["omega_err_linear"], 1))
    rows.append(AnalyticRow("Omega_hat kappa log n, n=1..30", se.omega_hat_log, PAPER_VALUES["omega_hat_log"], 2))
    rows.append(AnalyticRow("Omega_hat kappa log n error (%)", 100.0 * (se.rel_error_log or 0.0),
                            PAPER_VALUES["omega_err_log"], 2))
    for key in ("geometric", "geometric2", "cubic_pole"):
        f = ANALYTIC_FUNCTIONS[key]
        rows.append(AnalyticRow(f"unnormalized OLS slope n=1..4, {f.display}", unnormalized_slope(key),
                                PAPER_VALUES[f"slope14 {key}"], 3))
    return rows


def _fmt(v: float, d: int) -> str:
    return f"{round(v, d) + 0.0:.{d}f}"  # + 0.0 turns −0.0 into 0.0


def format_analytic_table(rows: Sequence[AnalyticRow]) -> str:
    """Render :func:`analytic_table` rows as an aligned text table with a match column.

    A row matches when our value, rounded to the paper's printed digits, equals the paper's value.

    >>> print(format_analytic_table([AnalyticRow("alpha", 0.6931471805599453, "0.693147", 6)]))
    quantity  ours      paper     match
    --------  --------  --------  -----
    alpha     0.693147  0.693147  yes
    """
    table = [("quantity", "ours", "paper", "match")]
    for r in rows:
        ours = _fmt(r.value, r.decimals)
        pd = len(r.paper.split(".")[1]) if "." in r.paper else 0
        match = "yes" if _fmt(r.value, pd) == r.paper else "no"
        table.append((r.name, ours, r.paper, match))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(s.ljust(w) for s, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
