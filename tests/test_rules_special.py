"""The special-function and elementwise-math rules (curvrate_fast/rules/special.py, and pow/tan/
sinh/cosh of rules/arithmetic.py) against oracles that share no code with them:

- mpmath's Taylor coefficients (30 digits) of the mathematical function along the input path,
  for input jets that store three coefficients (x_0 + u·t + v·t²), orders up to 5;
- float64 nested autograd (``curvrate_fast.baseline.jet``) where torch differentiates the op;
- exact values at the removable singularities (sinc, spherical j0, J1, I1 at 0);
- ``torch.autograd.gradcheck`` / ``gradgradcheck`` for the parameter gradient through the rules
  (the derivative tables of the Bessel functions and polynomials are custom autograd functions).
"""
import functools
import math

import mpmath
import pytest
import torch

import curvrate_fast  # noqa: F401  (registers the rules)
from curvrate_fast import baseline
from curvrate_fast.jets.tensor import JetError, make_jet

D64 = torch.float64
SP = torch.special
K = 5
mpmath.mp.dps = 30


def gen(seed):
    return torch.Generator().manual_seed(seed)


def jet_of(x0, seed=0, K=K, scale=0.3):
    """An input jet storing three coefficients: x_0 + u·t + v·t² (u, v random, fixed seed)."""
    g = gen(seed)
    u = torch.randn(x0.shape, generator=g, dtype=D64) * scale
    v = torch.randn(x0.shape, generator=g, dtype=D64) * scale
    return make_jet([x0, u, v], K)


def full(j):
    return j.full_coeffs().detach()


def mp_taylor(f, jets, K=K):
    """Taylor coefficients 0..K of t ↦ f(x_1(t), …) per element, x_i(t) the polynomial of jet i."""
    series = [j.series() if hasattr(j, "series") else [j] for j in jets]
    shape = torch.broadcast_shapes(*[s[0].shape for s in series])
    series = [[c.expand(shape).reshape(-1) for c in s] for s in series]
    n = series[0][0].numel()
    out = torch.empty(K + 1, n, dtype=D64)
    for e in range(n):
        cs = [[mpmath.mpf(float(c[e])) for c in s] for s in series]

        def g(t, cs=cs):
            return f(*[sum(c * t ** i for i, c in enumerate(s)) for s in cs])
        out[:, e] = torch.tensor([float(c) for c in mpmath.taylor(g, 0, K)], dtype=D64)
    return out.reshape((K + 1,) + tuple(shape))


def close(ours, ref, rtol=1e-10, atol=1e-13):
    """Per order: max |ours − ref| ≤ rtol·max|ref| + atol."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    for k in range(ref.shape[0]):
        err = float((ours[k] - ref[k]).detach().abs().max())
        bound = rtol * float(ref[k].detach().abs().max()) + atol
        assert err <= bound, f"order {k}: max error {err:.3g} > {bound:.3g}\nours {ours[k]}\nref {ref[k]}"


def T(*v):
    return torch.tensor(v, dtype=D64)


def _mp_sinc(z):
    return mpmath.sin(z) / z if z != 0 else mpmath.mpf(1)


def _ndtr(x):
    return mpmath.erfc(-x / mpmath.sqrt(2)) / 2


# (id, torch function, mpmath function, primal values, rtol)
UNARY = [
    ("asin", torch.asin, mpmath.asin, T(-0.9, -0.3, 0.0, 0.5, 0.8), 1e-10),
    ("acos", torch.arccos, mpmath.acos, T(-0.9, -0.3, 0.0, 0.5, 0.8), 1e-10),
    ("asinh", torch.asinh, mpmath.asinh, T(-3.0, -0.3, 0.0, 0.5, 7.0), 1e-10),
    ("acosh", torch.acosh, mpmath.acosh, T(1.3, 2.0, 4.5, 30.0), 1e-10),
    ("atanh", torch.arctanh, mpmath.atanh, T(-0.8, -0.3, 0.0, 0.5, 0.7), 1e-10),
    ("erfc", SP.erfc, mpmath.erfc, T(-2.0, -0.3, 0.0, 1.5, 4.0), 1e-10),
    ("erfcx", SP.erfcx, lambda x: mpmath.exp(x * x) * mpmath.erfc(x), T(-1.5, -0.3, 0.0, 1.5, 6.0),
     1e-9),
    ("erfinv", torch.erfinv, mpmath.erfinv, T(-0.9, -0.3, 0.0, 0.5, 0.8), 1e-10),
    ("ndtr", SP.ndtr, _ndtr, T(-3.0, -0.3, 0.0, 1.5, 4.0), 1e-10),
    ("ndtri", SP.ndtri, lambda p: mpmath.sqrt(2) * mpmath.erfinv(2 * p - 1), T(0.05, 0.3, 0.5, 0.9),
     1e-9),
    ("log_ndtr", SP.log_ndtr, lambda x: mpmath.log(_ndtr(x)), T(-12.0, -3.0, -0.3, 0.0, 2.0, 5.0),
     1e-9),
    # torch's trigamma (polygamma(1, ·)) is accurate to ~5e−10 relative only
    ("lgamma", torch.lgamma, lambda x: mpmath.log(abs(mpmath.gamma(x))), T(-2.5, -0.4, 0.3, 1.7, 9.0),
     2e-9),
    ("gammaln", SP.gammaln, mpmath.loggamma, T(0.3, 1.7, 9.0), 2e-9),
    ("digamma", torch.digamma, mpmath.digamma, T(-2.5, -0.4, 0.3, 1.7, 9.0), 2e-9),
    ("psi", SP.psi, mpmath.digamma, T(0.3, 1.7, 9.0), 2e-9),
    ("polygamma2", lambda x: torch.polygamma(2, x), lambda x: mpmath.psi(2, x), T(-1.5, 0.3, 1.7, 9.0),
     1e-9),
    ("polygamma_method", lambda x: x.polygamma(1), lambda x: mpmath.psi(1, x), T(0.3, 1.7, 9.0), 2e-9),
    ("special_polygamma", lambda x: SP.polygamma(3, x), lambda x: mpmath.psi(3, x), T(0.6, 2.0, 5.0),
     1e-9),
    ("mvlgamma", lambda x: torch.mvlgamma(x, 3),
     lambda x: 3 * mpmath.log(mpmath.pi) / 2 + sum(mpmath.loggamma(x - mpmath.mpf(j) / 2)
                                                    for j in range(3)), T(1.3, 2.0, 6.5), 2e-9),
    ("sinc", torch.sinc, lambda x: _mp_sinc(mpmath.pi * x), T(-2.3, -0.4, 0.0, 1e-9, 0.5, 0.7, 3.2),
     1e-10),
    ("spherical_bessel_j0", SP.spherical_bessel_j0, _mp_sinc,
     T(-7.0, -1.0, 0.0, 1e-9, 0.5, 1.9, 2.1, 15.0), 1e-10),
    ("entr", SP.entr, lambda x: -x * mpmath.log(x), T(0.05, 0.5, 1.0, 3.0), 1e-10),
    ("logit", torch.logit, lambda x: mpmath.log(x / (1 - x)), T(0.05, 0.3, 0.5, 0.9), 1e-10),
    ("tan", torch.tan, mpmath.tan, T(-1.2, 0.0, 1e-10, 0.4, 1.3), 1e-10),
    ("sinh", torch.sinh, mpmath.sinh, T(-3.0, 0.0, 1e-10, 0.4, 5.0), 1e-12),
    ("cosh", torch.cosh, mpmath.cosh, T(-3.0, 0.0, 1e-10, 0.4, 5.0), 1e-12),
    ("exp2", torch.exp2, lambda x: mpmath.power(2, x), T(-3.0, 0.0, 0.4, 5.0), 1e-12),
]


@pytest.mark.parametrize("name,fn,mpfn,x0,rtol", UNARY, ids=[c[0] for c in UNARY])
def test_unary_against_mpmath(name, fn, mpfn, x0, rtol):
    x = jet_of(x0, seed=len(name))
    ours = full(fn(x))
    close(ours, mp_taylor(mpfn, [x]), rtol=rtol)


def mp_compose(d, cs, K=K):
    """Σ_j d_j/j!·δ(t)^j truncated at t^K, δ(t) = Σ_{i≥1} cs_i t^i (mpmath polynomial arithmetic)."""
    delta = [mpmath.mpf(0)] + list(cs[1:])
    out = [mpmath.mpf(0)] * (K + 1)
    power = [mpmath.mpf(1)] + [mpmath.mpf(0)] * K
    for j in range(K + 1):
        for k in range(K + 1):
            out[k] += d[j] / mpmath.factorial(j) * power[k]
        power = [sum(power[i] * delta[k - i] for i in range(k + 1) if k - i < len(delta))
                 for k in range(K + 1)]
    return out


_MPZ = {"J": mpmath.besselj, "Y": mpmath.bessely, "I": mpmath.besseli, "K": mpmath.besselk}


def mp_bessel(kind, nu, scaled, jet, K=K):
    """Taylor coefficients of the Bessel function along the jet's path, from the closed-form
    derivatives Z_ν^(k) = 2^−k Σ_j C(k, j) c_j Z_{ν−k+2j} (c_j = (−1)^j for J, Y; 1 for I; (−1)^k
    for K), times e^{−s·x} by Leibniz for the scaled ones (s = sign x for I, −1 for K)."""
    series = [c.reshape(-1) for c in jet.series()]
    out = torch.empty(K + 1, series[0].numel(), dtype=D64)
    for e in range(series[0].numel()):
        cs = [mpmath.mpf(float(c[e])) for c in series]
        x = cs[0]
        d = []
        for k in range(K + 1):
            acc = mpmath.mpf(0)
            for j in range(k + 1):
                c = {"J": (-1) ** j, "Y": (-1) ** j, "I": 1, "K": (-1) ** k}[kind]
                acc += mpmath.binomial(k, j) * c * mpmath.re(_MPZ[kind](nu - k + 2 * j, x))
            d.append(acc / mpmath.mpf(2) ** k)
        if scaled:
            s = mpmath.sign(x) if kind == "I" else -1
            d = [sum(mpmath.binomial(k, i) * (-s) ** (k - i) * d[i] for i in range(k + 1)) * mpmath.exp(-s * x)
                 for k in range(K + 1)]
        out[:, e] = torch.tensor([float(v) for v in mp_compose(d, cs, K)], dtype=D64)
    return out.reshape((K + 1,) + tuple(jet.series()[0].shape))


BESSEL = [  # (torch function, kind, order, scaled, primal values)
    (torch.i0, "I", 0, False, T(-7.0, -1.0, 0.0, 1e-9, 1.9, 2.1, 15.0)),
    (SP.i0, "I", 0, False, T(-1.0, 2.1, 15.0)),
    (SP.modified_bessel_i0, "I", 0, False, T(-7.0, 0.0, 1e-9, 2.1, 15.0)),
    (SP.modified_bessel_i1, "I", 1, False, T(-7.0, -1.0, 0.0, 1e-9, 1.9, 2.1, 15.0)),
    (SP.i1, "I", 1, False, T(-7.0, 0.0, 1e-9, 2.1, 15.0)),
    (SP.i0e, "I", 0, True, T(-7.0, -1.0, 1.9, 2.1, 15.0)),
    (SP.i1e, "I", 1, True, T(-7.0, -1.0, 1.9, 2.1, 15.0)),
    (SP.modified_bessel_k0, "K", 0, False, T(0.3, 1.9, 2.1, 15.0)),
    (SP.modified_bessel_k1, "K", 1, False, T(0.3, 1.9, 2.1, 15.0)),
    (SP.scaled_modified_bessel_k0, "K", 0, True, T(0.3, 1.9, 15.0, 80.0)),
    (SP.scaled_modified_bessel_k1, "K", 1, True, T(0.3, 1.9, 15.0, 80.0)),
    # torch's J0/J1/Y0/Y1 are accurate to ~1e−15 below x = 4 and above x = 12 (see the next test)
    (SP.bessel_j0, "J", 0, False, T(-2.5, 0.0, 1e-9, 0.7, 1.9, 3.0, 14.0)),
    (SP.bessel_j1, "J", 1, False, T(-2.5, 0.0, 1e-9, 0.7, 1.9, 3.0, 14.0)),
    (SP.bessel_y0, "Y", 0, False, T(0.2, 0.7, 1.9, 3.0, 14.0)),
    (SP.bessel_y1, "Y", 1, False, T(0.2, 0.7, 1.9, 3.0, 14.0)),
]


@pytest.mark.parametrize("fn,kind,nu,scaled,x0", BESSEL, ids=[b[0].__name__ for b in BESSEL])
def test_bessel_against_mpmath(fn, kind, nu, scaled, x0):
    x = jet_of(x0, seed=nu + 3 * len(kind))
    # torch's J, Y values themselves are off by ~1e−11 at x = 3 (see the next test)
    close(full(fn(x)), mp_bessel(kind, nu, scaled, x), rtol=1e-9 if kind in "JY" else 1e-10)


def test_relative_accuracy_near_zero():
    """Coefficients that vanish with x_0 keep their relative accuracy (no cancellation):
    sinh(x_0)/2 in the second coefficient of sinh at x_0 = 1e−10, J1-type odd coefficients."""
    x = make_jet([T(1e-10, -3e-9), T(1.0, 0.5)], 4)
    c = full(torch.sinh(x))
    assert torch.allclose(c[2], torch.sinh(T(1e-10, -3e-9)) / 2 * T(1.0, 0.25), rtol=1e-14, atol=0)
    c = full(torch.tan(x))
    assert torch.allclose(c[2], T(1e-10, -3e-9) * T(1.0, 0.25), rtol=1e-12, atol=0)
    c = full(torch.sinc(x))
    ref = mp_taylor(lambda z: _mp_sinc(mpmath.pi * z), [x], 4)
    assert torch.allclose(c[1], ref[1], rtol=1e-12, atol=0)   # ∝ x_0: tiny, accurate
    c = full(SP.bessel_j1(x))
    ref = mp_taylor(lambda z: mpmath.besselj(1, z), [x], 4)
    assert torch.allclose(c[2], ref[2], rtol=1e-12, atol=0)


def test_removable_singularities_exact_at_zero():
    """sinc, spherical j0, J1, I1 at x_0 = 0: the Maclaurin coefficients exactly (t ↦ f(t))."""
    x = make_jet([torch.tensor(0.0, dtype=D64), torch.tensor(1.0, dtype=D64)], 6)
    pi = math.pi
    sinc = [1, 0, -pi ** 2 / 6, 0, pi ** 4 / 120, 0, -pi ** 6 / 5040]
    j0s = [1, 0, -1 / 6, 0, 1 / 120, 0, -1 / 5040]
    j1 = [0, 1 / 2, 0, -1 / 16, 0, 1 / 384, 0]
    i1 = [0, 1 / 2, 0, 1 / 16, 0, 1 / 384, 0]
    for f, ref in ((torch.sinc, sinc), (SP.spherical_bessel_j0, j0s), (SP.bessel_j1, j1),
                   (SP.modified_bessel_i1, i1), (SP.i1, i1)):
        c = full(f(x))
        assert torch.allclose(c, torch.tensor(ref, dtype=D64), rtol=1e-14, atol=1e-16), f


def test_scaled_bessel_at_zero_follows_the_abs_convention():
    """i0e, i1e = e^{−|x|}·I have a kink at 0; there the coefficients are those of e^{−|x|}·I through
    the engine's abs rule (|x| has derivative 0 at 0, as autograd), i.e. those of I; the first
    derivative is nested autograd's."""
    x0, u = T(0.0, 0.0), T(1.0, -0.7)
    for f, g in ((SP.i0e, SP.modified_bessel_i0), (SP.i1e, SP.modified_bessel_i1)):
        x = make_jet([x0, u], 5)
        ours = full(f(x))
        close(ours, full(torch.exp(-torch.abs(x)) * g(x)), rtol=1e-14)
        close(ours[:2], baseline.jet(f, x0, u, 1), rtol=1e-14)


def test_bessel_j_y_are_the_jets_of_torchs_evaluation():
    """torch evaluates J0, J1, Y0, Y1 with its transcription of Cephes, whose values are off by up to
    ~3e−7 for x in (4, 12) (denominators without Cephes' implicit leading 1). The rules run the same
    algorithm on the series, so the coefficients are those of the function torch evaluates (the
    finite-difference oracle of torch's op) and within torch's error of the Bessel function's."""
    from _oracle import assert_matches_fd

    from curvrate_fast.rules import special
    for which in ("j0", "j1", "y0", "y1"):
        assert special._cephes_matches(which), which
    x0 = T(4.3, 5.25, 6.0, 7.5, 11.0, -6.5)
    g = gen(3)
    u = torch.randn(x0.shape, generator=g, dtype=D64)
    for f, kind, nu in ((SP.bessel_j0, "J", 0), (SP.bessel_j1, "J", 1), (SP.bessel_y0, "Y", 0),
                        (SP.bessel_y1, "Y", 1)):
        xs = x0.abs() if kind == "Y" else x0
        ours = full(f(make_jet([xs, u], 4)))
        assert_matches_fd(ours, f, [xs], [u], order=4, min_conclusive=0.8)
        close(ours, mp_bessel(kind, nu, False, make_jet([xs, u], 4), K=4), rtol=0, atol=2e-6)


def test_bessel_identity_tables_for_j_and_y():
    """The identity-based tables (used for J, Y if torch's evaluation changes) against mpmath."""
    from curvrate_fast.rules import special
    x = jet_of(T(-2.5, 0.0, 1e-9, 0.7, 1.9, 3.0, 14.0, 30.0), seed=17)
    for kind, which, op in (("J", 0, SP.bessel_j0), ("J", 1, SP.bessel_j1)):
        fn = functools.partial(special._bessel_table, kind=kind, which=which, op=op)
        close(full(special._table_jet(x, fn)), mp_bessel(kind, which, False, x), rtol=1e-10)
    x = jet_of(T(0.2, 0.7, 1.9, 3.0, 14.0, 30.0), seed=18)
    for kind, which, op in (("Y", 0, SP.bessel_y0), ("Y", 1, SP.bessel_y1)):
        fn = functools.partial(special._bessel_table, kind=kind, which=which, op=op)
        close(full(special._table_jet(x, fn)), mp_bessel(kind, which, False, x), rtol=1e-10)


def test_unary_against_nested_autograd_broadcast_shapes():
    """Odd shapes and 0-dim, input jets with two coefficients, order 6, vs float64 nested autograd."""
    g = gen(11)
    for shape in ((), (3, 5), (7,)):
        x = torch.rand(shape, generator=g, dtype=D64) * 1.6 - 0.8
        u = torch.randn(shape, generator=g, dtype=D64)
        for f in (torch.asin, torch.atanh, torch.erfinv, lambda z: SP.ndtri(0.4 * z + 0.5), torch.sinc,
                  torch.lgamma,
                  SP.log_ndtr, lambda z: torch.logit(z * 0.4 + 0.5, eps=0.2),
                  lambda z: SP.xlog1py(z, z * z), lambda z: torch.polygamma(1, z + 2)):
            ours = full(f(make_jet([x, u], 6)))
            ref = baseline.jet(f, x, u, 6)
            close(ours, ref, rtol=1e-9, atol=1e-12)


# -- two-argument functions ---------------------------------------------------------------------

BINARY = [
    ("atan2", torch.atan2, mpmath.atan2),
    ("arctan2", torch.arctan2, mpmath.atan2),
    ("hypot", torch.hypot, lambda a, b: mpmath.sqrt(a * a + b * b)),
    ("logaddexp", torch.logaddexp, lambda a, b: mpmath.log(mpmath.exp(a) + mpmath.exp(b))),
    ("logaddexp2", torch.logaddexp2, lambda a, b: mpmath.log(mpmath.power(2, a) + mpmath.power(2, b), 2)),
    ("xlogy", lambda a, b: torch.xlogy(a, b.abs() + 0.2),
     lambda a, b: a * mpmath.log(abs(b) + mpmath.mpf("0.2"))),
    ("special_xlogy", lambda a, b: SP.xlogy(a, b * b + 0.2), lambda a, b: a * mpmath.log(b * b + mpmath.mpf("0.2"))),
    ("xlog1py", lambda a, b: SP.xlog1py(a, b * b), lambda a, b: a * mpmath.log1p(b * b)),
    ("ldexp", torch.ldexp, lambda a, b: a * mpmath.power(2, b)),
]


@pytest.mark.parametrize("name,fn,mpfn", BINARY, ids=[c[0] for c in BINARY])
def test_binary_both_jets_and_constants(name, fn, mpfn):
    a = jet_of(T(-1.3, 0.4, 2.2, 0.9, -0.6), seed=1)
    b = jet_of(T(0.7, -1.1, 1.5, 0.3, -2.0), seed=2)
    close(full(fn(a, b)), mp_taylor(mpfn, [a, b]), rtol=1e-10)
    # a constant of higher rank on either side (broadcast as PyTorch does)
    c = torch.linspace(-1.5, 1.7, 10, dtype=D64).reshape(2, 5)
    if name.startswith("xlog"):
        c = c.abs() + 0.3
    close(full(fn(a, c)), mp_taylor(mpfn, [a, c]), rtol=1e-10)
    if not name.startswith("xlog"):
        close(full(fn(c, b)), mp_taylor(mpfn, [c, b]), rtol=1e-10)


def test_xlogy_zero_conventions():
    """x ≡ 0 along the path gives 0 whatever y is; x_0 = 0 with x moving and y_0 ≤ 0 is refused."""
    y = make_jet([T(0.0, -1.0, 2.0), T(1.0, 1.0, 1.0)], 3)
    out = full(torch.xlogy(torch.zeros(3, dtype=D64), y))
    assert torch.equal(out, torch.zeros(4, 3, dtype=D64))
    x = make_jet([T(0.0, 0.0, 0.0), T(0.0, 0.0, 0.0)], 3)
    assert torch.equal(full(torch.xlogy(x, y)), torch.zeros(4, 3, dtype=D64))
    # y constant: linear in x with 0·log 0 = 0
    x = make_jet([T(0.0, 1.0), T(2.0, 0.0)], 3)
    out = full(torch.xlogy(x, T(0.0, 0.0)))
    assert out[0].tolist() == [0.0, -math.inf] and out[1, 0] == -math.inf and out[1, 1] == 0
    with pytest.raises(JetError, match="xlogy"):
        torch.xlogy(make_jet([T(0.0), T(1.0)], 2), make_jet([T(0.0), T(1.0)], 2))
    with pytest.raises(JetError, match="xlog1py"):
        SP.xlog1py(make_jet([T(0.0), T(1.0)], 2), make_jet([T(-1.0), T(1.0)], 2))
    # x_0 = 0 with y_0 > 0 is smooth: x·log y = (t)·log(2 + t)
    out = full(torch.xlogy(make_jet([T(0.0), T(1.0)], 3), make_jet([T(2.0), T(1.0)], 3)))
    assert torch.allclose(out[:, 0], T(0.0, math.log(2.0), 0.5, -0.125), atol=1e-15)


def test_entr_at_zero():
    x = make_jet([T(0.0, 0.5), T(0.0, 1.0)], 3)
    out = full(SP.entr(x))
    assert torch.equal(out[:, 0], torch.zeros(4, dtype=D64))
    with pytest.raises(JetError, match="entr"):
        SP.entr(make_jet([T(0.0), T(1.0)], 2))


def test_logaddexp_infinite_operand():
    """logaddexp(−∞, b) = b along the path: the coefficients are b's."""
    b = jet_of(T(0.3, -2.0), seed=5)
    out = full(torch.logaddexp(torch.full((2,), -math.inf, dtype=D64), b))
    assert torch.allclose(out, full(b), atol=1e-15)


# -- zeta, incomplete gamma ---------------------------------------------------------------------

def mp_taylor_zeta(s, q):
    out = []
    for i in range(s.numel()):
        qi = make_jet([c[i] for c in q.series()], q._order)
        out.append(mp_taylor(lambda z, si=float(s[i]): mpmath.zeta(si, z), [qi]))
    return torch.stack(out, -1)


def test_zeta_in_q_and_refused_in_s():
    """∂ζ(s, q)/∂q = −s·ζ(s+1, q); a jet s has no identity in torch and is refused."""
    q = jet_of(T(0.4, 1.3, 3.0, -1.5), seed=7)
    s = T(2.0, 3.5, 4.0, 3.0)
    close(full(SP.zeta(s, q)), mp_taylor_zeta(s, q), rtol=1e-9)
    close(full(SP.zeta(3.0, q)), mp_taylor_zeta(torch.full((4,), 3.0, dtype=D64), q), rtol=1e-9)
    with pytest.raises(JetError, match="zeta.*s"):
        SP.zeta(jet_of(T(2.0, 3.0)), T(1.0, 2.0))


@pytest.mark.parametrize("fn,upper", [(torch.igamma, False), (SP.gammainc, False),
                                      (torch.igammac, True), (SP.gammaincc, True)])
def test_incomplete_gamma_in_x(fn, upper):
    x = jet_of(T(0.3, 1.2, 4.0, 9.0), seed=9)
    a = T(0.5, 2.0, 3.7, 1.0)
    ref = []
    for i in range(4):
        xi = make_jet([c[i] for c in x.series()], K)
        ai = float(a[i])
        f = (lambda z: mpmath.gammainc(ai, z, mpmath.inf, regularized=True)) if upper else \
            (lambda z: mpmath.gammainc(ai, 0, z, regularized=True))
        ref.append(mp_taylor(f, [xi]))
    close(full(fn(a, x)), torch.stack(ref, -1), rtol=1e-9)
    with pytest.raises(JetError, match="derivative in a"):
        fn(jet_of(T(1.0, 2.0)), T(1.0, 2.0))


# -- orthogonal polynomials ---------------------------------------------------------------------

def _mp_poly(kind, n, x):
    if n < 0:
        return mpmath.mpf(0)
    if kind == "t":
        return mpmath.chebyt(n, x)
    if kind == "u":
        return mpmath.chebyu(n, x)
    if kind == "v":
        return mpmath.chebyu(n, x) - (mpmath.chebyu(n - 1, x) if n else 0)
    if kind == "w":
        return mpmath.chebyu(n, x) + (mpmath.chebyu(n - 1, x) if n else 0)
    if kind == "h":
        return mpmath.hermite(n, x)
    if kind == "he":
        return mpmath.hermite(n, x / mpmath.sqrt(2)) / mpmath.sqrt(2) ** n
    if kind == "l":
        return mpmath.laguerre(n, 0, x)
    return mpmath.legendre(n, x)


POLYS = [("chebyshev_polynomial_t", "t", False), ("chebyshev_polynomial_u", "u", False),
         ("chebyshev_polynomial_v", "v", False), ("chebyshev_polynomial_w", "w", False),
         ("shifted_chebyshev_polynomial_t", "t", True), ("shifted_chebyshev_polynomial_u", "u", True),
         ("shifted_chebyshev_polynomial_v", "v", True), ("shifted_chebyshev_polynomial_w", "w", True),
         ("hermite_polynomial_h", "h", False), ("hermite_polynomial_he", "he", False),
         ("laguerre_polynomial_l", "l", False), ("legendre_polynomial_p", "p", False)]


@pytest.mark.parametrize("name,kind,shifted", POLYS, ids=[p[0] for p in POLYS])
def test_orthogonal_polynomials(name, kind, shifted):
    op = getattr(SP, name)
    x0 = T(-0.83, -0.2, 0.35, 0.61, 1.4, 0.1, 0.97)
    n = T(-1.0, 0.0, 1.0, 2.7, 3.0, 6.0, 9.0)     # per element; torch truncates 2.7 to 2
    x = jet_of(x0, seed=13, scale=0.2)
    ours = full(op(x, n))
    ref = []
    for i in range(x0.numel()):
        xi = make_jet([c[i] for c in x.series()], K)
        ni = int(n[i])
        ref.append(mp_taylor(lambda z: _mp_poly(kind, ni, 2 * z - 1 if shifted else z), [xi]))
    close(ours, torch.stack(ref, -1), rtol=1e-11, atol=1e-11)
    # a python degree, and a jet degree (piecewise constant: a constant along the path)
    close(full(op(x, 3)), full(op(x, torch.full((7,), 3.0, dtype=D64))), rtol=0, atol=0)
    nj = jet_of(torch.full((7,), 3.5, dtype=D64), seed=2)
    close(full(op(x, nj)), full(op(x, 3)), rtol=0, atol=0)


def test_polynomial_degree_broadcast_and_gradient():
    """A degree tensor of higher rank than x; the parameter gradient through the derivative table
    (a custom autograd function) matches finite differences, also at second order."""
    s = T(-0.7, 0.1, 0.45)
    n = T(2.0, 5.0, 7.0, 1.0, 0.0, 4.0).reshape(2, 3)

    def coeffs(w):
        x = make_jet([w * s, torch.full_like(s, 0.3), 0.2 * s], 4)
        return SP.legendre_polynomial_p(x, n).coeffs

    w = torch.tensor(0.9, dtype=D64, requires_grad=True)
    assert coeffs(w).shape == (5, 2, 3)
    assert torch.autograd.gradcheck(coeffs, (w,))
    assert torch.autograd.gradgradcheck(coeffs, (w,))


# -- parameter gradients through the rules ------------------------------------------------------

GRAD_CASES = {
    "bessel_j1": lambda x: SP.bessel_j1(x),
    "bessel_y0": lambda x: SP.bessel_y0(x + 2.0),
    "bessel_j0_y1_large": lambda x: SP.bessel_j0(x + 6.0) + SP.bessel_y1(9.0 - x),
    "i1e": lambda x: SP.i1e(x),
    "scaled_k1": lambda x: SP.scaled_modified_bessel_k1(x + 2.0),
    "sinc": torch.sinc,
    "chebyshev_t": lambda x: SP.chebyshev_polynomial_t(x, 5),
    "igamma": lambda x: torch.igamma(T(1.5), x + 2.0),
    "zeta": lambda x: SP.zeta(3.0, x + 2.0),
    "erfinv": lambda x: torch.erfinv(0.5 * torch.tanh(x)),
    "atan2_hypot": lambda x: torch.atan2(x, x * x + 1) + torch.hypot(x, 2 - x),
    "mod_copysign": lambda x: torch.fmod(3 * x, 0.7) + torch.copysign(x, -x) + torch.remainder(x, -0.3),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_parameter_gradient(name):
    f = GRAD_CASES[name]
    s = T(0.0, -0.45, 0.83, 1.7)

    def coeffs(w):
        return f(make_jet([w * s + 0.05, torch.full_like(s, 0.4), 0.1 * s], 4)).coeffs

    w = torch.tensor(0.8, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(coeffs, (w,))
    if name in ("bessel_j1", "i1e", "sinc", "chebyshev_t"):
        assert torch.autograd.gradgradcheck(coeffs, (w,))


# -- piecewise-smooth and linear ops ------------------------------------------------------------

def test_piecewise_ops():
    a = jet_of(T(2.3, -1.7, 0.4, -0.2, 5.1), seed=21)
    b = jet_of(T(0.7, 0.6, -1.1, 0.9, -2.0), seed=22)
    A, B = a.series(), b.series()
    for op in (torch.fmod, torch.remainder):
        q = torch.round((A[0] - op(A[0], B[0])) / B[0])
        expect = torch.stack([op(A[0], B[0])] + [A[k] - q * B[k] for k in (1, 2)] + [torch.zeros(5, dtype=D64)] * 3)
        close(full(op(a, b)), expect, rtol=0, atol=1e-15)
        assert torch.equal(full(a % b), full(torch.remainder(a, b)))
    close(full(3.0 % b), full(torch.remainder(torch.full((5,), 3.0, dtype=D64), b)), rtol=0, atol=0)
    # copysign: ±a by the signs of the primals; b enters through its sign only
    out = full(torch.copysign(a, b))
    m = torch.sign(A[0]) * torch.sign(B[0])
    close(out[1:3], torch.stack([A[1] * m, A[2] * m]), rtol=0, atol=0)
    assert torch.equal(out[0], torch.copysign(A[0], B[0]))
    z = full(torch.copysign(make_jet([T(0.0), T(1.0)], 2), T(-1.0)))
    assert z[1:].abs().sum() == 0       # the kink of |a| at 0: derivative 0, as autograd
    # frac, nextafter: the identity's derivatives
    close(full(torch.frac(a))[1:], full(a)[1:], rtol=0, atol=0)
    close(full(torch.nextafter(a, b))[1:], full(a)[1:], rtol=0, atol=0)
    assert torch.equal(full(torch.frac(a))[0], torch.frac(A[0]))
    # an in-place variant goes through the out-of-place rule
    y = jet_of(T(0.3, -1.2, 2.5), seed=24)
    expect = full(torch.sinc(y))
    y.sinc_()
    close(full(y), expect, rtol=0, atol=0)
    # deg2rad / rad2deg: linear
    close(full(torch.deg2rad(a)), full(a) * math.pi / 180, rtol=1e-15, atol=0)
    close(full(torch.rad2deg(a)), full(a) * 180 / math.pi, rtol=1e-15, atol=0)


def test_frexp_nan_to_num_round():
    x = jet_of(T(3.0, -0.3, 1e-3, 12.5), seed=23)
    m, e = torch.frexp(x)
    assert isinstance(e, torch.Tensor) and e.dtype == torch.int32
    assert torch.equal(e, torch.frexp(x.series()[0])[1])
    close(full(m)[1:], full(x)[1:] * torch.pow(2.0, -e.to(D64)), rtol=0, atol=0)
    x0 = T(1.0, math.nan, math.inf, -math.inf)
    y = full(torch.nan_to_num(make_jet([x0, T(1.0, 2.0, 3.0, 4.0)], 2), nan=0.5, posinf=9.0))
    assert y[0].tolist()[:3] == [1.0, 0.5, 9.0] and y[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    r = SP.round(make_jet([T(1.4, 2.6), T(1.0, 1.0)], 2))
    assert not hasattr(r, "series") and r.tolist() == [1.0, 3.0]


def test_logit_eps_clamps():
    x = make_jet([T(0.1, 0.5, 0.95), T(1.0, 1.0, 1.0)], 3)
    out = full(torch.logit(x, eps=0.2))
    assert torch.equal(out[1:, 0], torch.zeros(3, dtype=D64)) and torch.equal(out[1:, 2], torch.zeros(3, dtype=D64))
    assert torch.allclose(out[:, 1], T(0.0, 4.0, 0.0, 16 / 3), atol=1e-14)


# -- powers with a jet exponent -----------------------------------------------------------------

def test_rpow_and_pow_jet_exponent():
    e = jet_of(T(0.3, -1.2, 2.0), seed=31)
    close(full(2.5 ** e), mp_taylor(lambda t: mpmath.power(2.5, t), [e]), rtol=1e-12)
    close(full(torch.float_power(2.5, e)), mp_taylor(lambda t: mpmath.power(2.5, t), [e]), rtol=1e-12)
    base = T(0.0, 3.0, 0.0)
    out = full(torch.pow(base, e))                  # a base identically 0 with e_0 > 0: 0
    assert torch.equal(out[:, 0], torch.zeros(K + 1, dtype=D64))
    close(out[:, 1:2], mp_taylor(lambda t: mpmath.power(3, t), [make_jet([c[1:2] for c in e.series()], K)]),
          rtol=1e-12)
    with pytest.raises(JetError, match="base a > 0"):
        (-2.0) ** e
    with pytest.raises(JetError, match="base a > 0"):
        torch.pow(T(0.0, 3.0, 0.0), -e)             # 0 ** (negative) is not smooth
    with pytest.raises(JetError, match="base a > 0"):
        torch.pow(make_jet([T(0.0), T(1.0)], 2), make_jet([T(1.0), T(1.0)], 2))


# -- refusals -----------------------------------------------------------------------------------

def test_airy_refused_and_complex_refused():
    with pytest.raises(JetError, match="airy_ai.*Ai′"):
        SP.airy_ai(jet_of(T(0.3, 1.0)))
    assert torch.equal(full(SP.airy_ai(make_jet([T(0.3)], 3)))[0], SP.airy_ai(T(0.3)))
    z = make_jet([torch.tensor([0.3 + 0.1j]), torch.tensor([1.0 + 0j])], 2)
    for f in (torch.asin, SP.bessel_j0, torch.sinc, SP.erfcx):
        with pytest.raises(JetError, match="complex"):
            f(z)


def test_float32_tables():
    x = jet_of(torch.linspace(-3, 9, 7, dtype=D64), seed=41)
    x32 = make_jet(x.coeffs.float(), K)
    for f in (SP.bessel_j0, SP.i1e, torch.sinc, lambda z: SP.hermite_polynomial_h(z, 4)):
        c32 = full(f(x32))
        assert c32.dtype == torch.float32
        c64 = full(f(x))
        assert torch.allclose(c32.double(), c64, rtol=1e-4, atol=1e-4 * float(c64.abs().max()))
