"""The linear-algebra rules (curvrate_fast/rules/linalg.py) against oracles that share no code with
them: closed forms ((A + tU)^{-1} = Σ (−A^{-1}U)^k A^{-1} t^k, det(A + tU) = det A · Π(1 + tμ_i)),
the defining identities of each factorization checked as series (L Lᴴ = A(t), P L U = A(t),
Q R = A(t) with QᴴQ = I, ...: each factorization is unique, so a series satisfying them is the
expansion), exact polynomial expansions of bilinear maps, the finite-difference oracle fd_jet
(torch's own op along the path: its conventions for signs and phases), nested autograd, and
gradcheck for the parameter gradients."""
import math

import pytest
import torch
from _oracle import fd_jet

import curvrate_fast  # noqa: F401  (registers the rules)
from curvrate_fast import baseline
from curvrate_fast.jets.tensor import JetError, JetTensor, make_jet
from curvrate_fast.rules import linalg as LA

D = torch.float64
C = torch.complex128


def rnd(g, *shape, dtype=D):
    return torch.randn(shape, generator=g, dtype=dtype)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def jet(x, u, K):
    return JetTensor(torch.stack([x, u]), K)


def eye(n, dtype=D):
    return torch.eye(n, dtype=dtype)


def well(g, *shape, dtype=D):
    """A well-conditioned square matrix (batch)."""
    n = shape[-1]
    return rnd(g, *shape, dtype=dtype) + 3 * eye(n, dtype)


def spd(g, *shape, dtype=D):
    M = rnd(g, *shape, dtype=dtype)
    return M @ M.mH + shape[-1] * eye(shape[-1], dtype)


def coeffs(y, K):
    return y.full_coeffs() if isinstance(y, JetTensor) else \
        torch.cat([y.unsqueeze(0), torch.zeros((K,) + tuple(y.shape), dtype=y.dtype)])


def cauchy(a, b, K, op=torch.matmul):
    """(a ⋆ b)_k = Σ_j op(a_j, b_{k−j}) of stacked coefficients (the test's own)."""
    return torch.stack([sum(op(a[j], b[k - j]) for j in range(k + 1)) for k in range(K + 1)])


def series(*cs, K):
    """Stacked coefficients c_0.. padded with zeros to K + 1."""
    out = list(cs) + [torch.zeros_like(cs[0])] * (K + 1 - len(cs))
    return torch.stack(out[:K + 1])


def close(a, b, tol=1e-9):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * scale, f"max error {err:.3g} (scale {scale:.3g})"


def matches_fd(fn, xs, us, ours, order=3, min_conclusive=0.8):
    best, tol, mask = fd_jet(fn, xs, us, order)
    c = ours.detach()
    c = torch.view_as_real(c) if c.is_complex() else c
    c = c[:order + 1].reshape(order + 1, -1)
    assert float(mask.float().mean()) >= min_conclusive, "the finite-difference oracle is inconclusive"
    bad = (c - best).abs()[:, mask] > tol[:, mask]
    assert not bool(bad.any()), f"orders {sorted(set(bad.nonzero()[:, 0].tolist()))} differ from fd"


# -- solves and inverses ---------------------------------------------------------------------------

def test_inv_closed_form_and_identity():
    g = gen(1)
    K = 5
    A, U = well(g, 2, 3, 4, 4), rnd(g, 2, 3, 4, 4)
    X = torch.linalg.inv(jet(A, U, K))
    Ai = torch.linalg.inv(A)
    expected = torch.stack([torch.linalg.matrix_power(-Ai @ U, k) @ Ai for k in range(K + 1)])
    close(coeffs(X, K), expected)
    # a jet with three stored coefficients (a quadratic path): A(t) X(t) = I as series
    A2 = rnd(g, 4, 4)
    Aj = make_jet([A[0, 0], U[0, 0], A2], K)
    for f in (torch.linalg.inv, torch.inverse, torch.Tensor.inverse, lambda a: torch.linalg.inv_ex(a)[0]):
        Xs = coeffs(f(Aj), K)
        close(cauchy(series(A[0, 0], U[0, 0], A2, K=K), Xs, K), series(eye(4), K=K))


@pytest.mark.parametrize("case", ["matrix", "vector", "batched_vector", "broadcast", "right",
                                  "const_A", "const_B"])
def test_solve_identity(case):
    g = gen(2)
    K = 4
    A, U = well(g, 2, 4, 4), rnd(g, 2, 4, 4)
    shapes = {"matrix": (2, 4, 3), "vector": (4,), "batched_vector": (2, 4), "broadcast": (3, 1, 4, 2),
              "right": (2, 3, 4), "const_A": (2, 4, 3), "const_B": (3, 2, 4, 3)}
    B, V = rnd(g, *shapes[case]), rnd(g, *shapes[case])
    left = case != "right"
    Aj = A if case == "const_A" else jet(A, U, K)
    Bj = B if case == "const_B" else jet(B, V, K)
    X = torch.linalg.solve(Aj, Bj, left=left)
    Xs = coeffs(X, K)
    As = series(A, *(() if case == "const_A" else (U,)), K=K)
    Bs = series(B, *(() if case == "const_B" else (V,)), K=K)
    vec = case in ("vector", "batched_vector")
    if vec:
        Xs, Bs = Xs.unsqueeze(-1), Bs.unsqueeze(-1)
    lhs = cauchy(As, Xs, K) if left else cauchy(Xs, As, K)
    Bs = Bs.reshape((K + 1,) + (1,) * (lhs.dim() - Bs.dim()) + tuple(Bs.shape[1:]))
    close(lhs, Bs.expand_as(lhs))
    Xe = torch.linalg.solve_ex(Aj, Bj, left=left)
    close(coeffs(Xe.result, K), coeffs(X, K))
    assert int(Xe.info.abs().sum()) == 0


def test_solve_matches_fd_and_singular_raises():
    g = gen(3)
    A, U, B, V = well(g, 3, 3), rnd(g, 3, 3), rnd(g, 3, 2), rnd(g, 3, 2)
    X = torch.linalg.solve(jet(A, U, 3), jet(B, V, 3))
    matches_fd(torch.linalg.solve, [A, B], [U, V], coeffs(X, 3))
    S = torch.ones(3, 3, dtype=D)
    with pytest.raises(JetError, match="singular"):
        torch.linalg.inv_ex(jet(S, U, 2))


# -- determinants ----------------------------------------------------------------------------------

def _elementary(mu, K):
    """e_0..e_K of the values mu (…, n): the coefficients of Π(1 + t μ_i)."""
    e = [torch.ones(mu.shape[:-1], dtype=mu.dtype)] + [torch.zeros(mu.shape[:-1], dtype=mu.dtype)] * K
    for i in range(mu.shape[-1]):
        e = [e[0]] + [e[k] + mu[..., i] * e[k - 1] for k in range(1, K + 1)]
    return torch.stack(e)


@pytest.mark.parametrize("dtype", [D, C])
def test_det_is_the_polynomial(dtype):
    g = gen(4)
    K, n = 6, 4                                    # det(A + tU) has degree n: orders 5, 6 vanish
    A, U = rnd(g, 3, n, n, dtype=dtype), rnd(g, 3, n, n, dtype=dtype)
    if dtype == D and torch.linalg.det(A[0]) > 0:
        A[0, 0] = -A[0, 0]                         # include a negative determinant
    mu = torch.linalg.eigvals(torch.linalg.solve(A, U))
    expected = torch.linalg.det(A).to(C) * _elementary(mu, K)
    for f in (torch.linalg.det, torch.det, torch.Tensor.det):
        d = coeffs(f(jet(A, U, K)), K)
        close(d.to(C), expected, 1e-8)
    # log det = log det A + Σ log(1 + tμ_i): coefficient k = Σ (−1)^{k+1} μ_i^k / k
    logs = torch.stack([torch.zeros(3, dtype=C)] + [((-1) ** (k + 1) * mu ** k / k).sum(-1)
                                                    for k in range(1, K + 1)])
    sd = torch.linalg.slogdet(jet(A, U, K))
    close(coeffs(sd.logabsdet, K)[1:], logs[1:].real, 1e-8)
    close(sd.logabsdet.coeffs[0], torch.linalg.slogdet(A).logabsdet)
    if dtype == D:
        close(sd.sign, torch.linalg.slogdet(A).sign)
        ld = coeffs(torch.logdet(jet(A, U, K)), K)
        neg = torch.linalg.det(A) < 0
        assert bool(neg[0]) and bool(torch.isnan(ld[:, neg]).all())  # det < 0: NaN on a neighbourhood
        close(ld[1:, ~neg], logs[1:, ~neg].real, 1e-8)
    else:
        matches_fd(lambda a: torch.linalg.slogdet(a).sign, [A], [U], coeffs(sd.sign, K))
        matches_fd(torch.logdet, [A], [U], coeffs(torch.logdet(jet(A, U, K)), K))


def _dft_poly(fn, A, U, N):
    """Coefficients 0..N−1 of the polynomial t ↦ fn(A + tU) of degree < N, from its values at the
    N-th roots of unity (the discrete Fourier transform: exact for such polynomials)."""
    w = torch.exp(2j * math.pi * torch.arange(N, dtype=D) / N)
    vals = torch.stack([fn(A.to(C) + wi * U.to(C)) for wi in w])
    return torch.fft.fft(vals, dim=0) / N


def test_det_rank_deficient():
    g = gen(5)
    K = 5
    B, U = rnd(g, 2, 4, 4), rnd(g, 2, 4, 4)
    A = B.clone()
    A[..., 3] = A[..., 0] - 2 * A[..., 1]          # rank 3: det A = 0, the expansion exists
    d = coeffs(torch.linalg.det(jet(A, U, K)), K)
    close(d.to(C), _dft_poly(torch.linalg.det, A, U, 8)[:K + 1], 1e-10)
    A[..., 2] = A[..., 0]                          # rank 2: refused
    with pytest.raises(JetError, match="rank"):
        torch.linalg.det(jet(A, U, K))
    with pytest.raises(JetError, match="det A = 0"):
        torch.linalg.slogdet(jet(B[..., :1].expand(2, 4, 4).clone(), U, K))
    d = torch.linalg.det(jet(torch.zeros(0, 0, dtype=D), torch.zeros(0, 0, dtype=D), 3))
    close(coeffs(d, 3), torch.tensor([1.0, 0, 0, 0], dtype=D))


# -- triangular solves -----------------------------------------------------------------------------

@pytest.mark.parametrize("upper", [True, False])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("unit", [True, False])
def test_solve_triangular_identity(upper, left, unit):
    g = gen(6)
    K = 4
    A, U = well(g, 2, 4, 4), rnd(g, 2, 4, 4)       # the other triangle is garbage: must be ignored
    B, V = rnd(g, 2, 4, 3) if left else rnd(g, 2, 3, 4), rnd(g, 2, 4, 3) if left else rnd(g, 2, 3, 4)
    X = torch.linalg.solve_triangular(jet(A, U, K), jet(B, V, K), upper=upper, left=left,
                                      unitriangular=unit)

    def tri(M, first):
        T = M.triu() if upper else M.tril()
        if unit:
            T = T - torch.diag_embed(torch.diagonal(T, dim1=-2, dim2=-1)) + (eye(4) if first else 0)
        return T
    As = series(tri(A, True), tri(U, False), K=K)
    Xs = coeffs(X, K)
    lhs = cauchy(As, Xs, K) if left else cauchy(Xs, As, K)
    close(lhs, series(B, V, K=K))


@pytest.mark.parametrize("transpose", [True, False])
def test_triangular_solve(transpose):
    g = gen(7)
    K = 3
    A, U, B, V = well(g, 4, 4), rnd(g, 4, 4), rnd(g, 4, 2), rnd(g, 4, 2)
    res = torch.triangular_solve(jet(B, V, K), jet(A, U, K), upper=False, transpose=transpose)
    matches_fd(lambda b, a: torch.triangular_solve(b, a, upper=False, transpose=transpose)[0],
               [B, A], [V, U], coeffs(res.solution, K))
    close(coeffs(res.cloned_coefficient, K), series(A, U, K=K))


# -- Cholesky --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [D, C])
@pytest.mark.parametrize("upper", [False, True])
def test_cholesky_reconstructs(dtype, upper):
    g = gen(8)
    K = 5
    A, U = spd(g, 2, 4, 4, dtype=dtype), rnd(g, 2, 4, 4, dtype=dtype)   # U not Hermitian: one triangle counts
    W = 0.3 * rnd(g, 2, 4, 4, dtype=dtype)
    L = torch.linalg.cholesky(make_jet([A, U, W], K), upper=upper)  # a quadratic path A + tU + t²W
    Ls = coeffs(L, K)

    def herm(M):
        T = M.triu(1) if upper else M.tril(-1)
        return T + T.mH + torch.diag_embed(torch.diagonal(M, dim1=-2, dim2=-1).real.to(dtype))
    prod = cauchy(Ls.mH, Ls, K) if upper else cauchy(Ls, Ls.mH, K)
    close(prod, series(A, herm(U), herm(W), K=K))
    Ls = coeffs(torch.linalg.cholesky(jet(A, U, K), upper=upper), K)
    assert bool(((Ls.tril(-1) if upper else Ls.triu(1)) == 0).all())
    assert bool((torch.diagonal(Ls, dim1=-2, dim2=-1).imag == 0).all()) if dtype == C else True
    ex = torch.linalg.cholesky_ex(jet(A, U, K), upper=upper)
    close(coeffs(ex.L, K), Ls)
    if not upper and dtype == D:
        close(coeffs(torch.cholesky(jet(A, U, K)), K), Ls)


def test_cholesky_solve_and_inverse():
    g = gen(9)
    K = 4
    A = spd(g, 3, 3)
    L0 = torch.linalg.cholesky(A)
    dL = rnd(g, 3, 3)
    B, V = rnd(g, 3, 2), rnd(g, 3, 2)
    Lj = jet(L0, dL, K)
    Ls = series(L0, dL.tril(), K=K)
    As = cauchy(Ls, Ls.mT, K)
    X = torch.cholesky_solve(jet(B, V, K), Lj)
    close(cauchy(As, coeffs(X, K), K), series(B, V, K=K))
    Xi = torch.cholesky_inverse(Lj)
    close(cauchy(As, coeffs(Xi, K), K), series(eye(3), K=K))
    Xu = torch.cholesky_inverse(jet(L0.mT, dL, K), upper=True)
    Us = series(L0.mT, dL.triu(), K=K)
    close(cauchy(cauchy(Us.mT, Us, K), coeffs(Xu, K), K), series(eye(3), K=K))


def test_cholesky_not_pd_raises():
    with pytest.raises(JetError, match="positive definite"):
        torch.linalg.cholesky(jet(-eye(3), eye(3), 2))


# -- LU --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5), (2, 1, 4)])
def test_lu_reconstructs(shape):
    g = gen(10)
    K = 4
    A, U, W = rnd(g, *shape), rnd(g, *shape), rnd(g, *shape)
    P, L, Uf = torch.linalg.lu(make_jet([A, U, W], K))
    close(P @ cauchy(coeffs(L, K), coeffs(Uf, K), K), series(A, U, W, K=K))
    P, L, Uf = torch.linalg.lu(jet(A, U, K))
    Ls, Us = coeffs(L, K), coeffs(Uf, K)
    close(P @ cauchy(Ls, Us, K), series(A, U, K=K))
    m, n = shape[-2:]
    kk = min(m, n)
    assert bool((Ls[1:].triu() == 0).all()) and bool((Us.tril(-1) == 0).all())
    close(torch.diagonal(Ls[0], dim1=-2, dim2=-1), torch.ones(shape[:-2] + (kk,), dtype=D))
    LU, piv = torch.linalg.lu_factor(jet(A, U, K))
    packed = Ls[..., :, :kk].tril(-1)
    packed = (packed + torch.nn.functional.pad(Us, (0, 0, 0, m - kk)) if m > n
              else torch.nn.functional.pad(packed, (0, n - kk)) + Us)
    close(coeffs(LU, K), packed)
    up = torch.lu_unpack(LU, piv)
    close(coeffs(up.L, K), Ls)
    close(coeffs(up.U, K), Us)
    for LU2 in (torch.linalg.lu_factor_ex(jet(A, U, K)).LU, torch.lu(jet(A, U, K))[0],
                jet(A, U, K).lu()[0]):
        close(coeffs(LU2, K), coeffs(LU, K))


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("adjoint", [True, False])
def test_lu_solve(left, adjoint):
    g = gen(11)
    K = 3
    A, _ = well(g, 4, 4), rnd(g, 4, 4)  # the second draw keeps the generator's stream as before
    B, V = (rnd(g, 4, 2), rnd(g, 4, 2)) if left else (rnd(g, 2, 4), rnd(g, 2, 4))
    LU0, piv = torch.linalg.lu_factor(A)
    dLU = rnd(g, 4, 4)
    X = torch.linalg.lu_solve(jet(LU0, dLU, K), piv, jet(B, V, K), left=left, adjoint=adjoint)

    def f(lu, b):
        return torch.linalg.lu_solve(lu, piv, b, left=left, adjoint=adjoint)
    matches_fd(f, [LU0, B], [dLU, V], coeffs(X, K))
    if left and not adjoint:
        Xo = torch.lu_solve(jet(B, V, K), jet(LU0, dLU, K), piv)
        close(coeffs(Xo, K), coeffs(X, K))


# -- QR and Householder ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [D, C])
@pytest.mark.parametrize("shape", [(5, 3), (4, 4), (3, 5)])
def test_qr_identities(dtype, shape):
    g = gen(12)
    K = 4
    A, U, W = (rnd(g, 2, *shape, dtype=dtype) for _ in range(3))
    kk = min(shape)
    Q, R = torch.linalg.qr(make_jet([A, U, W], K))
    close(cauchy(coeffs(Q, K), coeffs(R, K), K), series(A, U, W, K=K))
    close(cauchy(coeffs(Q, K).mH, coeffs(Q, K), K), series(eye(kk, dtype).expand(2, kk, kk), K=K))
    Q, R = torch.linalg.qr(jet(A, U, K))
    Qs, Rs = coeffs(Q, K), coeffs(R, K)
    close(cauchy(Qs, Rs, K), series(A, U, K=K))
    close(cauchy(Qs.mH, Qs, K), series(eye(kk, dtype).expand(2, kk, kk), K=K))
    assert bool((Rs.tril(-1) == 0).all())
    if dtype == C:
        assert float(torch.diagonal(Rs, dim1=-2, dim2=-1).imag.abs().max()) < 1e-12
    matches_fd(lambda a: torch.linalg.qr(a).R, [A], [U], Rs)
    close(coeffs(torch.linalg.qr(jet(A, U, K), mode="r").R, K), Rs)
    close(coeffs(torch.qr(jet(A, U, K))[1], K), Rs)


def test_qr_complete_tall_raises():
    g = gen(13)
    with pytest.raises(JetError, match="complete"):
        torch.linalg.qr(jet(rnd(g, 5, 3), rnd(g, 5, 3), 2), mode="complete")


@pytest.mark.parametrize("shape", [(5, 3), (4, 4), (3, 5)])
def test_geqrf_and_householder(shape):
    g = gen(14)
    K = 3
    A, U = rnd(g, *shape), rnd(g, *shape)
    a, tau = torch.geqrf(jet(A, U, K))
    matches_fd(lambda x: torch.geqrf(x)[0], [A], [U], coeffs(a, K))
    matches_fd(lambda x: torch.geqrf(x)[1], [A], [U], coeffs(tau, K))
    m, n = shape
    if m >= n:  # householder_product of geqrf's output is the reduced Q
        Q = torch.linalg.householder_product(a, tau)
        close(coeffs(Q, K), coeffs(torch.linalg.qr(jet(A, U, K)).Q, K), 1e-8)
    # ormqr against the reflectors' product, with a jet C
    Cm, Cu = rnd(g, m, 2), rnd(g, m, 2)
    Qfull = coeffs(torch.linalg.householder_product(
        torch.nn.functional.pad(a, (0, max(0, m - n))) if n < m else a[..., :, :m], tau), K)
    for left, transpose in ((True, False), (True, True)):
        Y = torch.ormqr(a, tau, jet(Cm, Cu, K), left=left, transpose=transpose)
        Qo = Qfull.mH if transpose else Qfull
        close(coeffs(Y, K), cauchy(Qo, series(Cm, Cu, K=K), K), 1e-8)
    Cr, Cru = rnd(g, 2, m), rnd(g, 2, m)
    for transpose in (False, True):
        Y = torch.ormqr(a, tau, jet(Cr, Cru, K), left=False, transpose=transpose)
        Qo = Qfull.mH if transpose else Qfull
        close(coeffs(Y, K), cauchy(series(Cr, Cru, K=K), Qo, K), 1e-8)


# -- eigen decompositions --------------------------------------------------------------------------

def test_eigh_identities_and_commuting_path():
    g = gen(15)
    K = 5
    A, U, W = rnd(g, 2, 5, 5), rnd(g, 2, 5, 5), 0.3 * rnd(g, 2, 5, 5)
    A = A + A.mT

    def sym(M):
        return M.tril(-1) + M.tril(-1).mT + torch.diag_embed(torch.diagonal(M, dim1=-2, dim2=-1))
    lam, Q = torch.linalg.eigh(make_jet([A, U, W], K))       # a quadratic path A + tU + t²W
    Ls, Qs = coeffs(lam, K), coeffs(Q, K)
    As = series(A, sym(U), sym(W), K=K)
    close(cauchy(As, Qs, K), cauchy(Qs, torch.diag_embed(Ls), K), 1e-8)
    close(cauchy(Qs.mT, Qs, K), series(eye(5).expand(2, 5, 5), K=K), 1e-8)
    lam, Q = torch.linalg.eigh(jet(A, U, K))
    Ls, Qs = coeffs(lam, K), coeffs(Q, K)
    As = series(A, sym(U), K=K)
    close(cauchy(As, Qs, K), cauchy(Qs, torch.diag_embed(Ls), K), 1e-8)
    close(cauchy(Qs.mT, Qs, K), series(eye(5).expand(2, 5, 5), K=K), 1e-8)
    close(coeffs(torch.linalg.eigvalsh(jet(A, U, K)), K), Ls)
    # A(t) = Q0 diag(λ + tμ) Q0ᵀ: the eigenvalues are exactly λ + tμ
    l0, Q0 = torch.linalg.eigh(A)
    mu = rnd(g, 2, 5)
    path = Q0 @ torch.diag_embed(mu) @ Q0.mT
    ev = coeffs(torch.linalg.eigvalsh(jet(A, path, K)), K)
    close(ev, series(l0, mu, K=K), 1e-9)


@pytest.mark.parametrize("UPLO", ["L", "U"])
def test_eigh_complex_vectors_follow_torch(UPLO):
    g = gen(16)
    H, Uc = rnd(g, 4, 4, dtype=C), rnd(g, 4, 4, dtype=C)
    H = H + H.mH
    lam, Q = torch.linalg.eigh(jet(H, Uc, 3), UPLO=UPLO)
    matches_fd(lambda a: torch.linalg.eigh(a, UPLO=UPLO).eigenvectors, [H], [Uc], coeffs(Q, 3),
               min_conclusive=0.5)
    matches_fd(lambda a: torch.linalg.eigvalsh(a, UPLO=UPLO), [H], [Uc], coeffs(lam, 3))


def test_eigh_repeated_raises():
    with pytest.raises(JetError, match="repeated"):
        torch.linalg.eigvalsh(jet(eye(3), eye(3), 2))


@pytest.mark.parametrize("dtype", [D, C])
def test_eig(dtype):
    g = gen(17)
    K = 3
    A, U = rnd(g, 2, 4, 4, dtype=dtype), rnd(g, 2, 4, 4, dtype=dtype)
    lam, V = torch.linalg.eig(jet(A, U, K))
    Ls, Vs = coeffs(lam, K), coeffs(V, K)
    close(cauchy(series(A, U, K=K).to(C), Vs, K), cauchy(Vs, torch.diag_embed(Ls), K), 1e-8)
    matches_fd(lambda a: torch.linalg.eig(a).eigenvectors, [A], [U], Vs)
    matches_fd(lambda a: torch.linalg.eigvals(a), [A], [U], coeffs(torch.linalg.eigvals(jet(A, U, K)), K))


# -- singular value decomposition ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [D, C])
@pytest.mark.parametrize("shape", [(5, 3), (4, 4), (3, 5)])
def test_svd(dtype, shape):
    g = gen(18)
    K = 4
    A, U, W = (rnd(g, *shape, dtype=dtype) for _ in range(3))
    kk = min(shape)
    Uo, S, Vh = torch.linalg.svd(make_jet([A, U, W], K), full_matrices=False)  # quadratic path
    Us, Ss, Vhs = coeffs(Uo, K), coeffs(S, K), coeffs(Vh, K)
    close(cauchy(cauchy(Us, torch.diag_embed(Ss).to(dtype), K), Vhs, K), series(A, U, W, K=K), 1e-8)
    close(cauchy(Us.mH, Us, K), series(eye(kk, dtype), K=K), 1e-8)
    close(cauchy(Vhs, Vhs.mH, K), series(eye(kk, dtype), K=K), 1e-8)
    Uo, S, Vh = torch.linalg.svd(jet(A, U, K), full_matrices=False)
    Us, Ss, Vhs = coeffs(Uo, K), coeffs(S, K), coeffs(Vh, K)
    close(cauchy(cauchy(Us, torch.diag_embed(Ss).to(dtype), K), Vhs, K), series(A, U, K=K), 1e-8)
    close(cauchy(Us.mH, Us, K), series(eye(kk, dtype), K=K), 1e-8)
    close(cauchy(Vhs, Vhs.mH, K), series(eye(kk, dtype), K=K), 1e-8)
    for i, out in enumerate((Us, Ss, Vhs)):
        matches_fd(lambda a: torch.linalg.svd(a, full_matrices=False)[i], [A], [U], out)
    close(coeffs(torch.linalg.svdvals(jet(A, U, K)), K), Ss)
    old = torch.svd(jet(A, U, K))
    close(coeffs(old.V, K), Vhs.mH)
    close(coeffs(torch.svd(jet(A, U, K), compute_uv=False).S, K), Ss)


def test_svd_refusals():
    g = gen(19)
    A, U = rnd(g, 5, 3), rnd(g, 5, 3)
    with pytest.raises(JetError, match="full_matrices"):
        torch.linalg.svd(jet(A, U, 2))
    Z = torch.zeros(3, 3, dtype=D)
    Z[0, 0], Z[1, 1] = 2.0, 1.0
    with pytest.raises(JetError, match="zero singular value"):
        torch.linalg.svdvals(jet(Z, U[:3], 2))
    with pytest.raises(JetError, match="repeated"):
        torch.linalg.svdvals(jet(eye(3), U[:3], 2))
    for f in (torch.svd_lowrank, torch.pca_lowrank):
        with pytest.raises(JetError, match="randomized"):
            f(jet(A, U, 2), q=2)


# -- pseudo-inverse, least squares -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 3), (4, 4), (3, 5)])
def test_pinv_and_lstsq(shape):
    g = gen(20)
    K = 4
    A, U = rnd(g, *shape), rnd(g, *shape)
    P = coeffs(torch.linalg.pinv(jet(A, U, K)), K)
    As = series(A, U, K=K)
    if shape[0] >= shape[1]:  # (AᵀA) P = Aᵀ
        close(cauchy(cauchy(As.mT, As, K), P, K), As.mT, 1e-8)
    else:                     # P (A Aᵀ) = Aᵀ
        close(cauchy(P, cauchy(As, As.mT, K), K), As.mT, 1e-8)
    close(coeffs(torch.pinverse(jet(A, U, K)), K), P)
    B, V = rnd(g, shape[0], 2), rnd(g, shape[0], 2)
    for driver in ("gelsy", "gelsd", "gels"):
        if driver == "gels" and shape[0] < shape[1]:
            continue
        res = torch.linalg.lstsq(jet(A, U, K), jet(B, V, K), driver=driver)
        close(coeffs(res.solution, K), cauchy(P, series(B, V, K=K), K), 1e-8)
        if res.residuals.numel():
            matches_fd(lambda a, b: torch.linalg.lstsq(a, b, driver=driver).residuals, [A, B], [U, V],
                       coeffs(res.residuals, K))
        if res.singular_values.numel():
            close(coeffs(res.singular_values, K), coeffs(torch.linalg.svdvals(jet(A, U, K)), K))
    x = torch.linalg.lstsq(jet(A, U, K), jet(B[:, 0], V[:, 0], K)).solution
    close(coeffs(x, K), cauchy(P, series(B[:, 0], V[:, 0], K=K), K, op=torch.mv), 1e-8)


def test_pinv_hermitian_rank_deficient_and_cutoff():
    g = gen(21)
    K = 3
    A, U = rnd(g, 4, 4), rnd(g, 4, 4)
    H = A + A.mT
    P = torch.linalg.pinv(jet(H, U, K), hermitian=True)
    matches_fd(lambda a: torch.linalg.pinv(a, hermitian=True), [H], [U], coeffs(P, K))
    low = A[:, :2] @ A[:2, :]
    with pytest.raises(JetError, match="rank-deficient"):
        torch.linalg.pinv(jet(low, U, K))
    with pytest.raises(JetError, match="rank-deficient"):
        torch.linalg.lstsq(jet(low, U, K), rnd(g, 4, 2))
    Z = torch.linalg.pinv(jet(A, U, K), rtol=1.0)  # every singular value is cut off: 0 identically
    close(coeffs(Z, K), torch.zeros(K + 1, 4, 4, dtype=D))


# -- matrix functions and products of matrices -----------------------------------------------------

def test_matrix_exp():
    g = gen(22)
    K = 5
    M = rnd(g, 2, 3, 3)
    a, b = 0.7, -0.4   # A = aM, U = bM commute: exp(A + tU) = exp(aM) Σ (bM)^k t^k / k!
    E = coeffs(torch.linalg.matrix_exp(jet(a * M, b * M, K)), K)
    expected = torch.stack([torch.matrix_exp(a * M) @ torch.linalg.matrix_power(b * M, k) / math.factorial(k)
                            for k in range(K + 1)])
    close(E, expected)
    A, U = rnd(g, 3, 3), rnd(g, 3, 3)
    matches_fd(torch.matrix_exp, [A], [U], coeffs(torch.matrix_exp(jet(A, U, 3)), 3))
    Aj = make_jet([A, U, rnd(g, 3, 3)], 4)           # a quadratic path
    s0, s1 = torch.zeros((), dtype=D), torch.ones((), dtype=D)
    matches_fd(lambda s: torch.matrix_exp(A + s * U + s * s * Aj.coeffs[2]), [s0], [s1],
               coeffs(torch.linalg.matrix_exp(Aj), 4), order=4)


@pytest.mark.parametrize("p", [0, 1, 3, 4, -2])
def test_matrix_power(p):
    g = gen(23)
    K = 4
    A, U = well(g, 2, 3, 3), rnd(g, 2, 3, 3)
    Y = coeffs(torch.linalg.matrix_power(jet(A, U, K), p), K)
    if p >= 0:
        As = series(A, U, K=K)
        expected = series(eye(3).expand(2, 3, 3), K=K)
        for _ in range(p):
            expected = cauchy(expected, As, K)
        close(Y, expected)
    else:
        matches_fd(lambda a: torch.linalg.matrix_power(a, p), [A], [U], Y)
    close(coeffs(torch.matrix_power(jet(A, U, K), p), K), Y)


def test_multi_dot_chain_matmul_mv_addmv_addr():
    g = gen(24)
    K = 3
    a, b, c, d = rnd(g, 3), rnd(g, 3, 4), rnd(g, 4, 2), rnd(g, 2)
    ua, ub, uc, ud = rnd(g, 3), rnd(g, 3, 4), rnd(g, 4, 2), rnd(g, 2)
    out = torch.linalg.multi_dot([jet(a, ua, K), b, jet(c, uc, K), jet(d, ud, K)])
    ref = baseline.jet(lambda s: torch.linalg.multi_dot([a + s * ua, b, c + s * uc, d + s * ud]),
                       torch.zeros((), dtype=D), torch.ones((), dtype=D), K)
    close(coeffs(out, K), ref)
    cm = torch.chain_matmul(jet(b, ub, K), c)
    close(coeffs(cm, K), series(b @ c, ub @ c, K=K))
    mv = torch.mv(jet(b, ub, K), jet(c[:, 0], uc[:, 0], K))
    close(coeffs(mv, K), series(b @ c[:, 0], ub @ c[:, 0] + b @ uc[:, 0], ub @ uc[:, 0], K=K))
    y = torch.addmv(jet(a, ua, K), jet(b, ub, K), c[:, 0], beta=0.5, alpha=2.0)
    close(coeffs(y, K), series(0.5 * a + 2 * b @ c[:, 0], 0.5 * ua + 2 * ub @ c[:, 0], K=K))
    y = torch.addr(b, jet(a, ua, K), jet(c[:, 0], uc[:, 0], K), beta=0)
    close(coeffs(y, K), series(torch.outer(a, c[:, 0]), torch.outer(ua, c[:, 0]) + torch.outer(a, uc[:, 0]),
                               torch.outer(ua, uc[:, 0]), K=K))


# -- bilinear products: f(a + tu, b + tv) = f(a, b) + t (f(u, b) + f(a, v)) + t² f(u, v) -------------

BILINEAR = {
    "kron": (torch.kron, (2, 3), (3, 2)),
    "outer": (torch.outer, (3,), (4,)),
    "ger": (torch.ger, (3,), (4,)),
    "inner_matrix": (torch.inner, (2, 4), (3, 4)),
    "inner_0dim": (torch.inner, (), (3, 4)),
    "cross": (lambda x, y: torch.cross(x, y, dim=-1), (2, 3), (2, 3)),
    "cross_default_dim": (torch.cross, (3, 2), (3, 2)),
    "linalg_cross_broadcast": (lambda x, y: torch.linalg.cross(x, y), (1, 2, 3), (4, 2, 3)),
    "tensordot": (lambda x, y: torch.tensordot(x, y, dims=([1, 2], [0, 1])), (2, 3, 4), (3, 4, 2)),
    "tensordot_int": (lambda x, y: torch.tensordot(x, y, dims=1), (2, 3), (3, 5)),
    "vecdot": (lambda x, y: torch.linalg.vecdot(x, y, dim=0), (3, 2), (3, 1)),
    "vecdot_broadcast": (torch.linalg.vecdot, (4,), (2, 3, 4)),
}


@pytest.mark.parametrize("name", sorted(BILINEAR))
@pytest.mark.parametrize("which", ["both", "first", "second"])
def test_bilinear_exact(name, which):
    f, sa, sb = BILINEAR[name]
    g = gen(25)
    K = 4
    a, u, b, v = rnd(g, *sa), rnd(g, *sa), rnd(g, *sb), rnd(g, *sb)
    if which == "second":
        u = torch.zeros_like(u)
    if which == "first":
        v = torch.zeros_like(v)
    x = jet(a, u, K) if which != "second" else a
    y = jet(b, v, K) if which != "first" else b
    # torch.inner is registered by reductions.py with dot's rule; this module's rule is LA.inner
    out = coeffs((LA.inner if f is torch.inner else f)(x, y), K)
    close(out, series(f(a, b), f(u, b) + f(a, v), f(u, v), K=K))


def test_vander_is_the_polynomial():
    g = gen(26)
    K = 5
    x, u = rnd(g, 2, 4), rnd(g, 2, 4)
    V = coeffs(torch.linalg.vander(jet(x, u, K), N=4), K)
    expected = torch.stack([torch.stack([math.comb(j, k) * x ** (j - k) * u ** k if k <= j else 0 * x
                                         for j in range(4)], -1) for k in range(K + 1)])
    close(V, expected)
    close(coeffs(torch.vander(jet(x[0], u[0], K), N=3), K), expected[:, 0, :, :3].flip(-1))
    close(coeffs(torch.linalg.vander(jet(x[0, 0], u[0, 0], K), N=2), K), expected[:, 0, :1, :2])


def test_diagonal_is_linear():
    g = gen(27)
    A, U = rnd(g, 3, 4, 5), rnd(g, 3, 4, 5)
    d = torch.linalg.diagonal(jet(A, U, 3), offset=1, dim1=0, dim2=2)
    close(coeffs(d, 3), series(torch.linalg.diagonal(A, offset=1, dim1=0, dim2=2),
                               torch.linalg.diagonal(U, offset=1, dim1=0, dim2=2), K=3))


def test_cov_corrcoef():
    g = gen(28)
    K = 3
    x, u = rnd(g, 3, 6), rnd(g, 3, 6)
    fw = torch.tensor([1, 2, 1, 3, 1, 1])
    aw, du = torch.rand(6, generator=g, dtype=D) + 0.5, rnd(g, 6)
    for kw in ({}, {"correction": 0}, {"fweights": fw}, {"aweights": aw}, {"fweights": fw, "aweights": aw}):
        ref = baseline.jet(lambda z: torch.cov(z, **kw), x, u, K)
        close(coeffs(torch.cov(jet(x, u, K), **kw), K), ref)
    matches_fd(lambda z, w: torch.cov(z, aweights=w), [x, aw], [u, du],
               coeffs(torch.cov(jet(x, u, K), aweights=jet(aw, du, K)), K))
    close(coeffs(torch.cov(jet(x[0], u[0], K)), K), baseline.jet(torch.cov, x[0], u[0], K))
    ref = baseline.jet(torch.corrcoef, x, u, K)
    close(coeffs(torch.corrcoef(jet(x, u, K)), K), ref, 1e-8)


# -- norms, condition numbers, tensor solves -------------------------------------------------------

@pytest.mark.parametrize("ord", ["fro", "nuc", 2, -2, 1, -1, float("inf"), float("-inf")])
def test_matrix_norm(ord):
    g = gen(29)
    A, U = rnd(g, 2, 4, 3), rnd(g, 2, 4, 3)
    y = torch.linalg.matrix_norm(jet(A, U, 3), ord=ord)
    matches_fd(lambda a: torch.linalg.matrix_norm(a, ord=ord), [A], [U], coeffs(y, 3))
    yk = torch.linalg.matrix_norm(jet(A, U, 3), ord=ord, dim=(0, 2), keepdim=True)
    matches_fd(lambda a: torch.linalg.matrix_norm(a, ord=ord, dim=(0, 2), keepdim=True), [A], [U],
               coeffs(yk, 3))


def test_linalg_norm_cond_tensorsolve_tensorinv():
    g = gen(30)
    A, U = well(g, 4, 4), rnd(g, 4, 4)
    for kw in ({}, {"ord": "nuc"}, {"ord": 2}, {"ord": 3, "dim": 1}, {"dim": (0, 1)}, {"ord": 1}):
        y = torch.linalg.norm(jet(A, U, 3), **kw)
        matches_fd(lambda a: torch.linalg.norm(a, **kw), [A], [U], coeffs(y, 3))
    for p in (None, 2, -2, "fro", "nuc", 1, float("inf")):
        matches_fd(lambda a: torch.linalg.cond(a, p), [A], [U], coeffs(torch.linalg.cond(jet(A, U, 3), p), 3))
    T, dT = well(g, 6, 6).reshape(2, 3, 2, 3), rnd(g, 2, 3, 2, 3)
    B, V = rnd(g, 2, 3), rnd(g, 2, 3)
    X = torch.linalg.tensorsolve(jet(T, dT, 3), jet(B, V, 3))
    matches_fd(torch.linalg.tensorsolve, [T, B], [dT, V], coeffs(X, 3))
    T4, dT4 = T.permute(2, 0, 1, 3), dT.permute(2, 0, 1, 3)    # (2, 2, 3, 3): dims=(0,) moves it last
    X = torch.linalg.tensorsolve(jet(T4, dT4, 3), jet(B, V, 3), dims=(0,))
    matches_fd(lambda t, b: torch.linalg.tensorsolve(t, b, dims=(0,)), [T4, B], [dT4, V], coeffs(X, 3))
    Ti = torch.linalg.tensorinv(jet(T, dT, 3), ind=2)
    matches_fd(lambda t: torch.linalg.tensorinv(t, ind=2), [T], [dT], coeffs(Ti, 3))
    with pytest.raises(JetError, match="ord=0"):
        torch.linalg.norm(jet(torch.zeros(3, dtype=D), torch.ones(3, dtype=D), 2), 0)


# -- LDLᵀ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hermitian,dtype", [(False, D), (False, C), (True, C)])
def test_ldl(hermitian, dtype):
    g = gen(31)
    K = 3
    A, U = rnd(g, 2, 6, 6, dtype=dtype), rnd(g, 2, 6, 6, dtype=dtype)
    A = A + (A.mH if hermitian else A.mT)
    A[..., 0, 0] = 1e-3                              # forces 2×2 pivot blocks
    res = torch.linalg.ldl_factor(jet(A, U, K), hermitian=hermitian)
    assert bool((res.pivots < 0).any())
    matches_fd(lambda a: torch.linalg.ldl_factor(a, hermitian=hermitian).LD, [A], [U], coeffs(res.LD, K))
    ex = torch.linalg.ldl_factor_ex(jet(A, U, K), hermitian=hermitian)
    close(coeffs(ex.LD, K), coeffs(res.LD, K))
    B, V = rnd(g, 2, 6, 2, dtype=dtype), rnd(g, 2, 6, 2, dtype=dtype)
    LD0, piv = torch.linalg.ldl_factor(A, hermitian=hermitian)
    dLD = rnd(g, 2, 6, 6, dtype=dtype)
    X = torch.linalg.ldl_solve(jet(LD0, dLD, K), piv, jet(B, V, K), hermitian=hermitian)
    matches_fd(lambda ld, b: torch.linalg.ldl_solve(ld, piv, b, hermitian=hermitian), [LD0, B],
               [dLD, V], coeffs(X, K))


# -- parameter gradients ---------------------------------------------------------------------------

GRAD_OPS = {
    "det": lambda a: torch.linalg.det(a),
    "inv": lambda a: torch.linalg.inv(a),
    "solve": lambda a: torch.linalg.solve(a, a[..., :1].mT.mT),
    "cholesky": lambda a: torch.linalg.cholesky(a @ a.mT + 3 * torch.eye(3, dtype=D)),
    "eigh_vectors": lambda a: torch.linalg.eigh(a + a.mT).eigenvectors,
    "svd_U": lambda a: torch.linalg.svd(a, full_matrices=False).U,
    "qr_R": lambda a: torch.linalg.qr(a).R,
    "lu_U": lambda a: torch.linalg.lu(a).U,
    "matrix_exp": torch.linalg.matrix_exp,
    "eigvals": lambda a: torch.linalg.eigvals(a).real,
    "pinv": torch.linalg.pinv,
}


@pytest.mark.parametrize("name", sorted(GRAD_OPS))
def test_parameter_gradient(name):
    """The coefficients are differentiable in everything they depend on: gradcheck (finite
    differences) of a weighted sum of all coefficients with respect to a parameter W entering
    the matrix, A(t) = W + 2 I + t·U."""
    f = GRAD_OPS[name]
    g = gen(32)
    K = 3
    U = rnd(g, 3, 3)
    W = (0.3 * rnd(g, 3, 3)).requires_grad_()

    def fn(w):
        A = w + 2 * torch.eye(3, dtype=D)
        c = coeffs(f(jet(A, U, K)), K)
        c = torch.view_as_real(c) if c.is_complex() else c
        return (c * torch.randn(c.shape, generator=gen(99), dtype=D)).sum()  # a fixed probe
    assert torch.autograd.gradcheck(fn, (W,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_float32_agrees_with_float64():
    g = gen(33)
    A, U, B = well(g, 4, 4), rnd(g, 4, 4), rnd(g, 4, 2)
    X64 = coeffs(torch.linalg.solve(jet(A, U, 3), B), 3)
    X32 = coeffs(torch.linalg.solve(jet(A.float(), U.float(), 3), B.float()), 3)
    assert X32.dtype == torch.float32
    close(X32.double(), X64, 1e-4)
