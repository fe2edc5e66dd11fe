"""Taylor rules for linear algebra: solves and inverses, determinants, the factorizations
(Cholesky, LU, QR, LDLᵀ, Householder), eigen- and singular value decompositions, pseudo-inverses
and least squares, matrix functions and powers, matrix norms, and the bilinear products (kron,
outer, cross, tensordot, ...).

Every rule works on the lists of matrix coefficients A_0..A_K of its operands (a constant
operand has A_0 only; missing coefficients are zero) and builds the output coefficients order by
order from a recurrence that uses ONE factorization of the primal A_0 (the expensive part) and
matrix products for everything else. All of them are plain differentiable torch ops, so gradients
reach everything the coefficients depend on; only what the primal alone decides (pivots, the
permutation of an LU, the sign pattern of a QR, the phase convention of an eigenvector) is held
constant along the path, which is exact wherever the op is smooth.

Where the op is not smooth at the primal point, or its result is not a function of the input (an
eigenvector basis of a repeated eigenvalue, the complement columns of a full SVD or QR, a
rank-deficient pseudo-inverse), the rule raises a ``JetError`` that names the op and the reason:
no silently wrong coefficients.

Several rules are compositions of others (cholesky_solve, tensorsolve, cond, matrix_norm, ...):
they call the torch functions on jets, which come back here through the dispatcher.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import series as S
from ..jets.registry import register
from ..jets.tensor import primals
from ._common import (
    JetError,
    aliases,
    beta_input_plus_alpha_prod,
    cauchy_op,
    is_jet,
    make_jet,
    order_of,
    per_coefficient,
    primal,
)

Series = List[Optional[Tensor]]

__all__ = ["inner"]


# ----------------------------------------------------------------------------------------------
# series helpers: a series is a list of K + 1 entries, None standing for a known zero coefficient
# ----------------------------------------------------------------------------------------------

def _coeffs(x, K: int) -> Series:
    """The K + 1 coefficients of a jet or a constant (None = known zero)."""
    if is_jet(x):
        c: Series = list(x._coeffs.unbind(0))[: K + 1]
    elif isinstance(x, Tensor):
        c = [x]
    else:
        c = [torch.as_tensor(x)]
    return c + [None] * (K + 1 - len(c))


def _length(s: Series) -> int:
    """Number of entries up to the last non-zero one."""
    n = len(s)
    while n > 1 and s[n - 1] is None:
        n -= 1
    return n


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _sub(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if b is None:
        return a
    if a is None:
        return -b
    return a - b


def _cauchy(a: Series, b: Series, K: int, op: Callable = torch.matmul) -> Series:
    """(a ⋆ b)_k = Σ_j op(a_j, b_{k−j}), k = 0..K (op: matmul by default), known zeros skipped."""
    return [_conv_sum(a, b, k, op, 0, k) for k in range(K + 1)]


def _conv_sum(a: Series, b: Series, k: int, op: Callable, lo: int, hi: int) -> Optional[Tensor]:
    """Σ_{j=lo..hi} op(a_j, b_{k−j}), skipping known zeros (None if every term is zero)."""
    acc = None
    for j in range(max(lo, 0), hi + 1):
        if j < len(a) and 0 <= k - j < len(b) and a[j] is not None and b[k - j] is not None:
            acc = _add(acc, op(a[j], b[k - j]))
    return acc


def _jet(s: Series, K: int, like: Optional[Tensor] = None):
    """A jet from a series (known zeros filled in, trailing ones dropped)."""
    n = _length(s)
    first = next((x for x in s[:n] if x is not None), None)
    if first is None:
        first = torch.zeros_like(like)
    return make_jet([torch.zeros_like(first) if x is None else x for x in s[:n]], K)


def _map(s: Series, fn: Callable) -> Series:
    return [None if x is None else fn(x) for x in s]


def _eps(t: Tensor) -> float:
    return torch.finfo(t.real.dtype if t.is_complex() else t.dtype).eps


def _real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def _H(x: Tensor) -> Tensor:
    return x.mH


def _any(mask: Tensor) -> bool:
    return bool(mask.any()) if mask.numel() else False


def _return(template, items):
    """The op's own return type (a torch.return_types structseq or a tuple) holding ``items``."""
    if isinstance(template, tuple) and type(template) is not tuple:
        return type(template)(items)
    return tuple(items)


def _hermitian_part(A: Tensor, upper: bool) -> Tensor:
    """The Hermitian matrix that LAPACK sees when it reads only one triangle of A (the diagonal's
    imaginary part is ignored), as cholesky/eigh/ldl do: the other triangle of the input never
    enters the result, so it must not enter the coefficients either."""
    T = A.triu(1) if upper else A.tril(-1)
    d = torch.diagonal(A, dim1=-2, dim2=-1)
    if A.is_complex():
        d = d.real.to(A.dtype)
    return T + _H(T) + torch.diag_embed(d)


def _check_gaps(vals: Tensor, op: str, what: str) -> None:
    """Raise when two of ``vals`` (..., n) coincide to within the accuracy they are computed with.

    The eigen/singular vectors of a repeated value are not functions of the matrix (any basis of
    the eigenspace is one), and the sorted values themselves have kinks where two branches cross,
    so no Taylor expansion exists there. LAPACK computes the values with an absolute error of
    about n·eps·‖A‖₂ (backward stability), so gaps below 16·n·eps·max|λ| cannot be told apart
    from zero; above it the expansion exists (its coefficients grow like 1/gap^k, as the
    conditioning of the problem demands)."""
    n = vals.shape[-1]
    if n < 2:
        return
    v = vals.detach()
    d = (v.unsqueeze(-1) - v.unsqueeze(-2)).abs()
    d = d + torch.diag_embed(torch.full(v.shape, float("inf"), dtype=d.dtype, device=d.device))
    gap = d.amin((-2, -1))
    scale = v.abs().amax(-1)
    tol = 16 * n * _eps(v) * scale
    if _any(gap <= tol):
        raise JetError(
            f"{op}: the matrix has (numerically) repeated {what} at the expansion point (gap "
            f"{float(gap.min()):.3g} ≤ {float(tol.max()):.3g}); there the {what} are not smooth "
            "functions of the matrix (sorted branches cross) and the vectors are not unique, so "
            "no Taylor expansion exists")


def _wrap_constant(out, K: int):
    """Floating tensors of a plain result as jets with no higher coefficients."""
    if isinstance(out, Tensor):
        return make_jet(out.unsqueeze(0), K) if (out.is_floating_point() or out.is_complex()) else out
    if isinstance(out, tuple):
        items = [_wrap_constant(o, K) for o in out]
        return _return(out, items)
    return out


def _rule(*funcs):
    """``register`` for the matrix rules, which assume non-empty matrices: when a jet operand has
    no elements, every coefficient is empty (or the op's constant value on empty input, like
    det of a 0×0 matrix = 1), so the op runs on the primals and its result is a constant."""
    def deco(fn):
        @functools.wraps(fn)
        def rule(*args, **kwargs):
            flat = [a for a in list(args) + list(kwargs.values()) if is_jet(a)]
            if any(a.numel() == 0 for a in flat):
                K = order_of(args, kwargs)
                return _wrap_constant(funcs[0](*primals(args), **primals(kwargs)), K)
            return fn(*args, **kwargs)
        register(*funcs)(rule)
        return rule
    return deco


# ----------------------------------------------------------------------------------------------
# linear solves: one factorization of A_0, reused for every order
# ----------------------------------------------------------------------------------------------

def _solve_series(A: Series, B: Series, K: int, solve0: Callable[[Tensor], Tensor],
                  amul: Callable[[Tensor, Tensor], Tensor], like: Tensor) -> Series:
    """X with A(t) ⋆ X(t) = B(t) (amul(A_j, X_i) the product in the op's order):

        A_0 X_k = B_k − Σ_{j=1..k} A_j X_{k−j}      (solve0 applies A_0^{-1}).

    A constant A leaves X as long as B (the map is linear then)."""
    nA = _length(A)
    n = _length(B) if nA == 1 else K + 1
    X: Series = []
    for k in range(n):
        r = B[k] if k < len(B) else None
        for j in range(1, min(k, nA - 1) + 1):
            if A[j] is not None and X[k - j] is not None:
                r = _sub(r, amul(A[j], X[k - j]))
        X.append(None if r is None else solve0(r))
    if X[0] is None:
        X[0] = torch.zeros_like(like)
    return X


def _inverse_series(A: Series, K: int, X0: Tensor) -> Series:
    """X = A^{-1}: X_k = −X_0 Σ_{j=1..k} A_j X_{k−j} (the solve recurrence with B = I)."""
    nA = _length(A)
    X: Series = [X0]
    for k in range(1, K + 1 if nA > 1 else 1):
        r = _conv_sum(A, X, k, torch.matmul, 1, k)
        X.append(None if r is None else -(X0 @ r))
    return X


def _lu_check(info: Tensor, op: str) -> None:
    if _any(info > 0):
        raise JetError(f"{op}: the matrix is singular at the expansion point (a zero pivot in its "
                       "LU factorization), so the solution has no Taylor expansion")


def _is_vector_rhs(A: Tensor, B: Tensor) -> bool:
    """torch.linalg.solve's rule: B is a (batch of) vector(s) if it is 1-D, or if it has one
    dimension less than A and the shape of A without its last dimension."""
    return B.dim() == 1 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1])


def _solve_general(op: str, A, B, K: int, left: bool, value: Tensor) -> Series:
    """X = A^{-1} B (left) or B A^{-1} (right) for jets or constants A, B."""
    As, Bs = _coeffs(A, K), _coeffs(B, K)
    A0 = As[0]
    vec = _is_vector_rhs(A0, primal(B))
    LU, piv, info = torch.linalg.lu_factor_ex(A0)
    _lu_check(info, op)
    if vec:
        Bs = _map(Bs, lambda b: b.unsqueeze(-1))
        # x A = b for a vector is refused by torch (checked on the primal before we get here)

    def solve0(r):
        return torch.linalg.lu_solve(LU, piv, r, left=left)

    amul = torch.matmul if left else (lambda a, x: x @ a)
    X = _solve_series(As, Bs, K, solve0, amul, value.unsqueeze(-1) if vec else value)
    if vec:
        X = _map(X, lambda x: x.squeeze(-1))
    return X


@_rule(torch.linalg.solve)
def linalg_solve(A, B, *, left=True, out=None):
    """X = A^{-1} B (or B A^{-1} with left=False): A_0 X_k = B_k − Σ_{j≥1} A_j X_{k−j}, with one LU
    factorization of A_0 reused for every order. A 1-D (batch of vectors) B is torch's vector
    case."""
    K = order_of(A, B)
    X0 = torch.linalg.solve(primal(A), primal(B), left=left)  # torch's own checks and shapes
    return _jet(_solve_general("torch.linalg.solve", A, B, K, left, X0), K)


@_rule(torch.linalg.solve_ex)
def linalg_solve_ex(A, B, *, left=True, check_errors=False, out=None):
    """(X, info) of linalg.solve: X as in linalg.solve, info (an integer) constant."""
    K = order_of(A, B)
    res = torch.linalg.solve_ex(primal(A), primal(B), left=left, check_errors=check_errors)
    X = _solve_general("torch.linalg.solve_ex", A, B, K, left, res.result)
    return _return(res, (_jet(X, K), res.info))


def _inv(op: str, A) -> Series:
    K = A._order
    As = _coeffs(A, K)
    X0, info = torch.linalg.inv_ex(As[0])
    _lu_check(info, op)
    return _inverse_series(As, K, X0)


@_rule(torch.linalg.inv, *aliases("inverse"))
def linalg_inv(A, *, out=None):
    """X = A^{-1}: X_k = −X_0 Σ_{j=1..k} A_j X_{k−j} (the solve recurrence with B = I), i.e.
    (A_0 + tU)^{-1} = Σ_k (−A_0^{-1}U)^k A_0^{-1} t^k for a linear path."""
    return _jet(_inv("torch.linalg.inv", A), A._order)


@_rule(torch.linalg.inv_ex)
def linalg_inv_ex(A, *, check_errors=False, out=None):
    """(X, info) of linalg.inv: X as in linalg.inv, info (an integer) constant."""
    res = torch.linalg.inv_ex(primal(A), check_errors=check_errors)
    return _return(res, (_jet(_inv("torch.linalg.inv_ex", A), A._order), res.info))


# ----------------------------------------------------------------------------------------------
# determinants
# ----------------------------------------------------------------------------------------------

def _pivot_series(op: str, A):
    """(det P, the series of U's diagonal (…, n)) of A(t) = P L(t) U(t) with the primal's pivots
    held fixed (``_lu_series``): det A(t) = det P · Π_i U_ii(t). The last pivot may be zero (the
    block recurrence never divides by it), so a matrix of rank n − 1 is fine; rank ≤ n − 2
    raises."""
    K = A._order
    As = _coeffs(A, K)
    LU0, piv, info = torch.linalg.lu_factor_ex(As[0])
    P, L0, U0 = torch.lu_unpack(LU0, piv)
    # a pivot at the rounding level of the elimination (n·eps·max|U|) cannot be told from zero:
    # dividing by it would leave no correct digit
    tol = 4 * U0.shape[-1] * _eps(U0)
    try:
        _, Us = _lu_series(op, _permuted(As, P), K, L0, U0, pivot_tol=tol)
    except JetError:
        raise JetError(f"{op}: the matrix has (numerically) rank ≤ n − 2 at the expansion point (a "
                       "zero pivot before the last one in its LU factorization), where this rule, "
                       "which expands det through the LU factors, does not apply") from None
    d = [None if u is None else torch.diagonal(u, dim1=-2, dim2=-1) for u in Us]
    return torch.linalg.det(P), [torch.zeros_like(d[0]) if x is None else x for x in d]


def _log_pivots(op: str, A, what: str) -> Series:
    """The coefficients k ≥ 1 of L(t) = Σ_i log U_ii(t) = log det A(t) − log det P (entry 0 is
    None), each log by its recurrence (S.log, valid over ℂ and for negative pivots: only
    coefficients k ≥ 1 are used, which do not see the branch)."""
    K = A._order
    msg = f"{op}: det A = 0 at the expansion point, where {what} has no Taylor expansion"
    try:
        sign, d = _pivot_series(op, A)
    except JetError:
        raise JetError(msg) from None
    if _any(d[0] == 0):
        raise JetError(msg)
    cols = [S.log([x[..., i] for x in d], K) for i in range(d[0].shape[-1])]
    L: Series = [None]
    for k in range(1, K + 1):
        acc = cols[0][k] if k < len(cols[0]) else None
        for c in cols[1:]:
            acc = _add(acc, c[k] if k < len(c) else None)
        L.append(acc)
    return L


def _exp_from(L: Series, y0: Tensor, K: int) -> Series:
    """y = y_0·exp(L(t) − L_0): y_k = (1/k) Σ_{j=1..k} j L_j y_{k−j} (y′ = y L′)."""
    y: Series = [y0]
    for k in range(1, K + 1):
        acc = None
        for j in range(1, k + 1):
            if L[j] is not None and y[k - j] is not None:
                term = L[j] * y[k - j]
                acc = _add(acc, term if j == 1 else j * term)
        y.append(None if acc is None else (acc if k == 1 else acc / k))
    return y


@_rule(torch.linalg.det, *aliases("det"))
def linalg_det(A, *, out=None):
    """det A(t) = det P · Π_i U_ii(t): the product (Cauchy products) of the pivot series of the LU
    factorization with the primal's pivots held fixed (``_pivot_series``). This is exact as a
    polynomial identity, holds for negative and complex determinants and for a matrix of rank
    n − 1 (det = 0 at the expansion point); it avoids exp(log det), whose Newton-type recurrence
    d_k = (1/k) Σ j L_j d_{k−j} loses digits to cancellation when ‖A^{-1}U‖ is large."""
    K = A._order
    sign, d = _pivot_series("torch.linalg.det", A)
    prod = [x[..., 0] for x in d]
    for i in range(1, d[0].shape[-1]):
        prod = S.mul(prod, [x[..., i] for x in d], K)
    out = [x * sign for x in prod]
    out[0] = torch.linalg.det(A._coeffs[0])
    return _jet(out, K)


@_rule(torch.linalg.slogdet, *aliases("slogdet"))
def linalg_slogdet(A, *, out=None):
    """(sign, log|det|): log|det A(t)| has coefficients Re L_k (k ≥ 1) with L = Σ_i log U_ii(t)
    over the LU pivots (``_log_pivots``); the sign is constant for real A (det ≠ 0 keeps its sign
    nearby) and sign_0·exp(i·Im(L(t) − L_0)) for complex A (the exp recurrence)."""
    K = A._order
    res = torch.linalg.slogdet(A._coeffs[0])
    L = _log_pivots("torch.linalg.slogdet", A, "log|det|")
    logabs = _jet([res.logabsdet] + _map(L[1:], lambda x: x.real if x.is_complex() else x), K)
    if A.is_complex():
        sign = _jet(_exp_from([None] + _map(L[1:], lambda x: 1j * x.imag), res.sign, K), K)
    else:
        sign = res.sign
    return _return(res, (sign, logabs))


@_rule(*aliases("logdet"))
def logdet(A):
    """log det A: coefficient 0 from torch (NaN for a real matrix with det < 0, the complex log for
    complex A), coefficients k ≥ 1 those of Σ_i log U_ii(t) over the LU pivots (``_log_pivots``).
    Where det A_0 < 0 the real logarithm is NaN on a whole neighbourhood, so every coefficient is
    NaN there."""
    K = A._order
    y0 = torch.logdet(A._coeffs[0])
    L = [y0] + _log_pivots("torch.logdet", A, "log det")[1:]
    if not A.is_complex():
        bad = torch.isnan(y0)
        if _any(bad):
            L = [L[0]] + _map(L[1:], lambda x: torch.where(bad, torch.full_like(x, float("nan")), x))
    return _jet(L, K)


# ----------------------------------------------------------------------------------------------
# triangular solves
# ----------------------------------------------------------------------------------------------

def _triangle(A: Tensor, upper: bool, unit: bool) -> Tensor:
    """The part of A a triangular solver reads (unit: the diagonal is taken as 1, so its
    coefficients of order ≥ 1 are zero)."""
    T = A.triu() if upper else A.tril()
    if unit:
        T = T - torch.diag_embed(torch.diagonal(T, dim1=-2, dim2=-1))
    return T


def _solve_triangular_series(A, B, K: int, upper: bool, left: bool, unit: bool, like: Tensor) -> Series:
    As, Bs = _coeffs(A, K), _coeffs(B, K)
    A0 = As[0]
    As = [A0] + _map(As[1:], lambda a: _triangle(a, upper, unit))

    def solve0(r):
        return torch.linalg.solve_triangular(A0, r, upper=upper, left=left, unitriangular=unit)

    amul = torch.matmul if left else (lambda a, x: x @ a)
    return _solve_series(As, Bs, K, solve0, amul, like)


@_rule(torch.linalg.solve_triangular)
def linalg_solve_triangular(A, B, *, upper, left=True, unitriangular=False, out=None):
    """X = A^{-1} B (left) or B A^{-1} for triangular A: the solve recurrence
    A_0 X_k = B_k − Σ_{j≥1} A_j X_{k−j}, where A_j is the triangle the solver reads (with a zero
    diagonal when unitriangular: the diagonal is the constant 1)."""
    K = order_of(A, B)
    X0 = torch.linalg.solve_triangular(primal(A), primal(B), upper=upper, left=left,
                                       unitriangular=unitriangular)
    return _jet(_solve_triangular_series(A, B, K, upper, left, unitriangular, X0), K)


@_rule(*aliases("triangular_solve"))
def triangular_solve(b, A, upper=True, transpose=False, unitriangular=False, *, out=None):
    """(X, A) with op(A) X = b, op(A) = Aᵀ if transpose: linalg.solve_triangular's recurrence on
    op(A); the second output is a copy of A (the identity map)."""
    K = order_of(b, A)
    res = torch.triangular_solve(primal(b), primal(A), upper=upper, transpose=transpose,
                                 unitriangular=unitriangular)
    At = A.transpose(-2, -1) if transpose else A
    X = _solve_triangular_series(At, b, K, upper != transpose, True, unitriangular, res.solution)
    return _return(res, (_jet(X, K), A.clone() if is_jet(A) else res.cloned_coefficient))


# ----------------------------------------------------------------------------------------------
# Cholesky
# ----------------------------------------------------------------------------------------------

def _cholesky_series(op: str, A, K: int, upper: bool):
    """L with L Lᴴ = A(t) (A Hermitian positive definite, read from one triangle as LAPACK does).

    Order k: L_0 L_kᴴ + L_k L_0ᴴ = A_k − Σ_{j=1..k−1} L_j L_{k−j}ᴴ =: M_k, so with
    Z = L_0^{-1} M_k L_0^{-ᴴ} (Hermitian), L_0^{-1} L_k = Φ(Z), Φ = the lower triangle with the
    diagonal halved (L_0^{-1} L_k is lower triangular with a real diagonal):

        L_k = L_0 Φ(L_0^{-1} M_k L_0^{-ᴴ}).

    Returns (the lower factor's series, info)."""
    As = _map(_coeffs(A, K), lambda a: _hermitian_part(a, upper))
    L0, info = torch.linalg.cholesky_ex(As[0])
    if _any(info > 0):
        raise JetError(f"{op}: the matrix is not positive definite at the expansion point")
    nA = _length(As)
    L: Series = [L0]
    for k in range(1, K + 1 if nA > 1 else 1):
        M = As[k] if k < len(As) else None
        M = _sub(M, _conv_sum(L, [None] + _map(L[1:], _H), k, torch.matmul, 1, k - 1))
        if M is None:
            L.append(None)
            continue
        Y = torch.linalg.solve_triangular(L0, M, upper=False)
        Z = torch.linalg.solve_triangular(L0, _H(Y), upper=False)
        d = torch.diagonal(Z, dim1=-2, dim2=-1)
        d = (d.real if Z.is_complex() else d) / 2
        Phi = Z.tril(-1) + torch.diag_embed(d.to(Z.dtype))
        L.append(L0 @ Phi)
    return L, info


def _chol_out(L: Series, upper: bool) -> Series:
    return _map(L, _H) if upper else L


@_rule(torch.linalg.cholesky, *aliases("cholesky"))
def linalg_cholesky(A, upper=False, *, out=None):
    """L (or U = Lᴴ with upper=True) of A = L Lᴴ: L_k = L_0 Φ(L_0^{-1} M_k L_0^{-ᴴ}), see
    ``_cholesky_series``."""
    L, _ = _cholesky_series("torch.linalg.cholesky", A, A._order, upper)
    return _jet(_chol_out(L, upper), A._order)


@_rule(torch.linalg.cholesky_ex)
def linalg_cholesky_ex(A, *, upper=False, check_errors=False, out=None):
    """(L, info) of linalg.cholesky: L as there, info (an integer) constant."""
    res = torch.linalg.cholesky_ex(primal(A), upper=upper, check_errors=check_errors)
    L, _ = _cholesky_series("torch.linalg.cholesky_ex", A, A._order, upper)
    return _return(res, (_jet(_chol_out(L, upper), A._order), res.info))


def _gram_from_factor(Lf, K: int, upper: bool) -> Series:
    """A = L Lᴴ (or Uᴴ U) from the triangle of a Cholesky factor jet (the part the solver reads)."""
    Ls = _map(_coeffs(Lf, K), lambda x: x.triu() if upper else x.tril())
    if upper:
        return _cauchy(_map(Ls, _H), Ls, K)
    return _cauchy(Ls, _map(Ls, _H), K)


@_rule(*aliases("cholesky_solve"))
def cholesky_solve(input, input2, upper=False, *, out=None):
    """X = A^{-1} B with A = L Lᴴ (Uᴴ U): the solve recurrence A_0 X_k = B_k − Σ_{j≥1} A_j X_{k−j}
    with A(t) = L(t) L(t)ᴴ (a Cauchy product of the factor's triangle), A_0^{-1} applied by
    cholesky_solve with the primal factor."""
    B, L = input, input2     # torch's names: cholesky_solve(input, input2)
    K = order_of(B, L)
    X0 = torch.cholesky_solve(primal(B), primal(L), upper=upper)
    As = _gram_from_factor(L, K, upper)
    L0 = primal(L)
    X = _solve_series(As, _coeffs(B, K), K, lambda r: torch.cholesky_solve(r, L0, upper=upper),
                      torch.matmul, X0)
    return _jet(X, K)


@_rule(*aliases("cholesky_inverse"))
def cholesky_inverse(L, upper=False, *, out=None):
    """(L Lᴴ)^{-1} (or (Uᴴ U)^{-1}): the inverse recurrence X_k = −X_0 Σ_{j≥1} A_j X_{k−j} with
    A(t) = L(t) L(t)ᴴ, X_0 = cholesky_inverse(L_0)."""
    K = L._order
    X0 = torch.cholesky_inverse(L._coeffs[0], upper=upper)
    return _jet(_inverse_series(_gram_from_factor(L, K, upper), K, X0), K)


# ----------------------------------------------------------------------------------------------
# LU with the primal's pivots held constant
# ----------------------------------------------------------------------------------------------

def _lu_series(op: str, As: Series, K: int, L0: Tensor, U0: Tensor, pivot_tol: float = 0.0):
    """L(t), U(t) with L U = A(t) (A already row-permuted by the primal's pivots), L unit lower
    (m×kk), U upper (kk×n), kk = min(m, n), from the primal factors L_0, U_0.

    Blocks with r = n for m > n (every pivot is used) and r = m − 1 otherwise (the last pivot
    only scales U's last row, which may be zero): A = [[A11, A12], [A21, A22]] with A11 r×r,

        A11 = L11 U11,  A21 = L21 U11,  A12 = L11 U12,  A22 = L21 U12 + U22  (L22 = 1).

    With M_k = A11_k − Σ_{j=1..k−1} L11_j U11_{k−j} and W = L11_0^{-1} M_k U11_0^{-1}: L11_0^{-1}L11_k
    is strictly lower and U11_k U11_0^{-1} upper, so L11_k = L11_0 tril(W, −1), U11_k = triu(W) U11_0;
    then L21_k = (A21_k − Σ_{j<k} L21_j U11_{k−j}) U11_0^{-1},
    U12_k = L11_0^{-1}(A12_k − Σ_{j≥1} L11_j U12_{k−j}), U22_k = A22_k − Σ_j L21_j U12_{k−j}."""
    m, n = L0.shape[-2], U0.shape[-1]
    r = n if m > n else m - 1
    tall = m > n
    L11_0, U11_0 = L0[..., :r, :r], U0[..., :r, :r]
    dU = torch.diagonal(U11_0, dim1=-2, dim2=-1).abs()
    if r > 0 and _any(dU <= pivot_tol * U0.abs().amax((-2, -1)).unsqueeze(-1)):
        raise JetError(f"{op}: a zero pivot in the LU factorization at the expansion point, where "
                       "the factors (with the pivots held fixed) are not differentiable")
    L21_0 = L0[..., r:, :r]
    U12_0 = U0[..., :r, r:]
    nA = _length(As)
    L11, U11, L21, U12, U22 = [L11_0], [U11_0], [L21_0], [U12_0], [U0[..., r:, r:]]

    def usolve_right(X):  # X U11_0^{-1}
        return torch.linalg.solve_triangular(U11_0, X, upper=True, left=False)

    def lsolve_left(X):   # L11_0^{-1} X
        return torch.linalg.solve_triangular(L11_0, X, upper=False, unitriangular=True)

    for k in range(1, K + 1 if nA > 1 else 1):
        Ak = As[k] if k < len(As) else None
        if r > 0:
            M = _sub(None if Ak is None else Ak[..., :r, :r],
                     _conv_sum(L11, U11, k, torch.matmul, 1, k - 1))
            if M is None:
                L11.append(None)
                U11.append(None)
            else:
                W = usolve_right(lsolve_left(M))
                L11.append(L11_0 @ W.tril(-1))
                U11.append(W.triu() @ U11_0)
            if m > r:
                R = _sub(None if Ak is None else Ak[..., r:, :r],
                         _conv_sum(L21, U11, k, torch.matmul, 0, k - 1))
                L21.append(None if R is None else usolve_right(R))
            if not tall and n > r:
                R = _sub(None if Ak is None else Ak[..., :r, r:],
                         _conv_sum(L11, U12, k, torch.matmul, 1, k))
                U12.append(None if R is None else lsolve_left(R))
        if not tall:
            R = _sub(None if Ak is None else Ak[..., r:, r:],
                     _conv_sum(L21, U12, k, torch.matmul, 0, k) if r > 0 else None)
            U22.append(R)
    n_out = K + 1 if nA > 1 else 1

    def get(s, k):
        return s[k] if k < len(s) else None

    Ls: Series = []
    Us: Series = []
    for k in range(n_out):
        zero_L = k > 0
        if tall:
            l11, l21 = get(L11, k), get(L21, k)
            if l11 is None and l21 is None:
                Ls.append(None)
            else:
                l11 = torch.zeros_like(L11_0) if l11 is None else l11
                l21 = torch.zeros_like(L21_0) if l21 is None else l21
                Ls.append(torch.cat([l11, l21], -2))
            Us.append(get(U11, k))
        else:
            l11, l21 = get(L11, k), get(L21, k)
            u11, u12, u22 = get(U11, k), get(U12, k), get(U22, k)
            if l11 is None and l21 is None:
                Ls.append(None)
            else:
                l11 = torch.zeros_like(L11_0) if l11 is None else l11
                l21 = torch.zeros_like(L21_0) if l21 is None else l21
                top = torch.cat([l11, L0.new_zeros(L0.shape[:-2] + (r, m - r))], -1)
                bot = torch.cat([l21, L0.new_zeros(L0.shape[:-2] + (m - r, m - r)) if zero_L
                                 else L0[..., r:, r:]], -1)
                Ls.append(torch.cat([top, bot], -2))
            if u11 is None and u12 is None and u22 is None:
                Us.append(None)
            else:
                u11 = torch.zeros_like(U11_0) if u11 is None else u11
                u12 = torch.zeros_like(U12_0) if u12 is None else u12
                u22 = torch.zeros_like(U0[..., r:, r:]) if u22 is None else u22
                top = torch.cat([u11, u12], -1)
                bot = torch.cat([U0.new_zeros(U0.shape[:-2] + (m - r, r)), u22], -1)
                Us.append(torch.cat([top, bot], -2))
    Ls[0], Us[0] = L0, U0
    return Ls, Us


def _permuted(As: Series, P: Tensor) -> Series:
    """Pᵀ A_k: the rows in the order the primal's pivoting chose."""
    Pt = P.transpose(-2, -1)
    return _map(As, lambda a: Pt @ a)


def _pack_lu(L: Tensor, U: Tensor, m: int, n: int, first: bool) -> Tensor:
    """LAPACK's packed LU (strictly lower part of L, upper part of U) of one coefficient."""
    kk = min(m, n)
    Lp = L.tril(-1)
    Up = U.triu()
    if m > n:
        return Lp + F.pad(Up, (0, 0, 0, m - kk))
    return F.pad(Lp, (0, n - kk)) + Up


def _lu_factor_jets(op: str, A, pivot: bool = True):
    """(P, pivots, info, L series, U series) of A(t) = P L(t) U(t), pivots of the primal."""
    K = A._order
    As = _coeffs(A, K)
    LU0, piv, info = torch.linalg.lu_factor_ex(As[0], pivot=pivot)
    P, L0, U0 = torch.lu_unpack(LU0, piv)
    Ls, Us = _lu_series(op, _permuted(As, P), K, L0, U0)
    return P, LU0, piv, info, Ls, Us


def _packed_series(Ls: Series, Us: Series, LU0: Tensor, m: int, n: int) -> Series:
    out: Series = [LU0]
    for k in range(1, len(Ls)):
        if Ls[k] is None and Us[k] is None:
            out.append(None)
            continue
        L = Ls[k] if Ls[k] is not None else torch.zeros(LU0.shape[:-2] + (m, min(m, n)),
                                                         dtype=LU0.dtype, device=LU0.device)
        U = Us[k] if Us[k] is not None else torch.zeros(LU0.shape[:-2] + (min(m, n), n),
                                                         dtype=LU0.dtype, device=LU0.device)
        out.append(_pack_lu(L, U, m, n, False))
    return out


@_rule(torch.linalg.lu_factor_ex)
def linalg_lu_factor_ex(A, *, pivot=True, check_errors=False, out=None):
    """(LU, pivots, info): the packed factors of A(t) = P L(t) U(t) with the primal's pivots held
    fixed (the permutation is locally constant where no pivot ties), L(t), U(t) from the block
    recurrence of ``_lu_series``; pivots and info constant."""
    res = torch.linalg.lu_factor_ex(primal(A), pivot=pivot, check_errors=check_errors)
    P, LU0, piv, info, Ls, Us = _lu_factor_jets("torch.linalg.lu_factor_ex", A, pivot)
    m, n = A.shape[-2], A.shape[-1]
    return _return(res, (_jet(_packed_series(Ls, Us, LU0, m, n), A._order), res.pivots, res.info))


@_rule(torch.linalg.lu_factor)
def linalg_lu_factor(A, *, pivot=True, out=None):
    """(LU, pivots): see linalg.lu_factor_ex."""
    res = torch.linalg.lu_factor(primal(A), pivot=pivot)
    P, LU0, piv, info, Ls, Us = _lu_factor_jets("torch.linalg.lu_factor", A, pivot)
    m, n = A.shape[-2], A.shape[-1]
    return _return(res, (_jet(_packed_series(Ls, Us, LU0, m, n), A._order), res.pivots))


@_rule(torch.linalg.lu)
def linalg_lu(A, *, pivot=True, out=None):
    """(P, L, U) of A(t) = P L(t) U(t): P constant (the primal's pivoting), L and U from the block
    recurrence of ``_lu_series``."""
    res = torch.linalg.lu(primal(A), pivot=pivot)
    P, LU0, piv, info, Ls, Us = _lu_factor_jets("torch.linalg.lu", A, pivot)
    K = A._order
    return _return(res, (res.P, _jet(Ls, K), _jet(Us, K)))


@_rule(torch._lu_with_info)
def lu_with_info(A, pivot=True, check_errors=True):
    """(LU, pivots, infos) of torch.lu: see linalg.lu_factor_ex."""
    res = torch._lu_with_info(primal(A), pivot=pivot, check_errors=check_errors)
    P, LU0, piv, info, Ls, Us = _lu_factor_jets("torch.lu", A, pivot)
    m, n = A.shape[-2], A.shape[-1]
    return (_jet(_packed_series(Ls, Us, LU0, m, n), A._order), res[1], res[2])


@_rule(torch.lu, torch.Tensor.lu)
def lu(A, pivot=True, get_infos=False, out=None):
    """torch.lu: (LU, pivots[, infos]) as linalg.lu_factor_ex (see there)."""
    LU, piv, infos = lu_with_info(A, pivot=pivot, check_errors=not get_infos)
    return (LU, piv, infos) if get_infos else (LU, piv)


def _unpack_series(LUs: Series, m: int, n: int) -> tuple:
    kk = min(m, n)
    Ls = _map(LUs, lambda x: x[..., :, :kk].tril(-1))
    Us = _map(LUs, lambda x: x[..., :kk, :].triu())
    Ls[0] = Ls[0] + torch.eye(m, kk, dtype=LUs[0].dtype, device=LUs[0].device)
    return Ls, Us


@_rule(torch.lu_unpack)
def lu_unpack(LU_data, LU_pivots, unpack_data=True, unpack_pivots=True, *, out=None):
    """(P, L, U) from packed LU factors: linear in LU_data for fixed pivots (L = its strictly lower
    part plus I, U its upper part); P depends on the pivots only (constant)."""
    res = torch.lu_unpack(primal(LU_data), LU_pivots, unpack_data=unpack_data,
                          unpack_pivots=unpack_pivots)
    if not unpack_data:
        return res
    K = LU_data._order
    m, n = LU_data.shape[-2], LU_data.shape[-1]
    Ls, Us = _unpack_series(_coeffs(LU_data, K), m, n)
    return _return(res, (res.P, _jet(Ls, K), _jet(Us, K)))


def _lu_solve_series(op: str, LU, pivots, B, K: int, left: bool, adjoint: bool, like: Tensor):
    """X with op(A) X = B (left) or X op(A) = B, A(t) = P L(t) U(t) from the packed factors
    (op = ᴴ with adjoint): the solve recurrence, A_0^{-1} applied by lu_solve."""
    LU0 = primal(LU)
    m = LU0.shape[-1]
    P = torch.lu_unpack(LU0, pivots, unpack_data=False).P
    Ls, Us = _unpack_series(_coeffs(LU, K), m, m)
    As = _map(_cauchy(Ls, Us, K), lambda a: P @ a) if is_jet(LU) else [None]
    As[0] = LU0  # not used by the recurrence (A_0^{-1} is applied through the factors)
    if adjoint:
        As = _map(As, _H)
    Bs = _coeffs(B, K)

    def solve0(r):
        return torch.linalg.lu_solve(LU0, pivots, r, left=left, adjoint=adjoint)

    amul = torch.matmul if left else (lambda a, x: x @ a)
    return _solve_series(As, Bs, K, solve0, amul, like)


@_rule(torch.linalg.lu_solve)
def linalg_lu_solve(LU, pivots, B, *, left=True, adjoint=False, out=None):
    """X = A^{-1} B (or B A^{-1}; Aᴴ with adjoint) for A = P L U given by packed factors: the solve
    recurrence A_0 X_k = B_k − Σ_{j≥1} A_j X_{k−j}, A(t) = P L(t) U(t) from the factor jet."""
    K = order_of(LU, B)
    X0 = torch.linalg.lu_solve(primal(LU), pivots, primal(B), left=left, adjoint=adjoint)
    return _jet(_lu_solve_series("torch.linalg.lu_solve", LU, pivots, B, K, left, adjoint, X0), K)


@_rule(*aliases("lu_solve"))
def lu_solve(b, LU_data, LU_pivots, *, out=None):
    """torch.lu_solve(b, LU, pivots) = linalg.lu_solve(LU, pivots, b)."""
    K = order_of(b, LU_data)
    X0 = torch.lu_solve(primal(b), primal(LU_data), LU_pivots)
    return _jet(_lu_solve_series("torch.lu_solve", LU_data, LU_pivots, b, K, True, False, X0), K)


# ----------------------------------------------------------------------------------------------
# QR and the Householder representation
# ----------------------------------------------------------------------------------------------

def _qr_tall_series(op: str, As: Series, K: int, Q0: Tensor, R0: Tensor):
    """Q(t), R(t) with Q R = A(t), m ≥ n, Qᴴ Q = I, R upper with the real diagonal of R_0's signs
    (LAPACK's Householder QR keeps each sign while the pivot element keeps its sign, and the QR
    with a fixed diagonal sign pattern is unique for full column rank, hence smooth).

    Order k: Q_k R_0 + Q_0 R_k = M_k := A_k − Σ_{j=1..k−1} Q_j R_{k−j}. With G = Q_0ᴴ M_k R_0^{-1}
    and C = Q_0ᴴ Q_k: G = C + R_k R_0^{-1} (upper), and orthogonality gives
    C + Cᴴ = S := −Σ_{j=1..k−1} Q_jᴴ Q_{k−j}. So C's strict lower part is G's, its strict upper
    part triu(S, 1) − (tril(G, −1))ᴴ, Re diag C = diag S / 2, Im diag C = Im diag G (R_k's diagonal
    is real); then R_k = triu(G − C) R_0 and Q_k = (M_k − Q_0 R_k) R_0^{-1}."""
    dR = torch.diagonal(R0, dim1=-2, dim2=-1).abs()
    if dR.numel() and _any(dR <= _eps(R0) * R0.shape[-1] * dR.amax(-1, keepdim=True)):
        raise JetError(f"{op}: the matrix does not have full column rank at the expansion point "
                       "(a zero on R's diagonal), where its QR factors are not unique")
    nA = _length(As)
    Q: Series = [Q0]
    R: Series = [R0]

    def right_rinv(X):
        return torch.linalg.solve_triangular(R0, X, upper=True, left=False)

    for k in range(1, K + 1 if nA > 1 else 1):
        M = _sub(As[k] if k < len(As) else None, _conv_sum(Q, R, k, torch.matmul, 1, k - 1))
        Sk = _conv_sum(_map(Q, _H), Q, k, torch.matmul, 1, k - 1)
        if M is None and Sk is None:
            Q.append(None)
            R.append(None)
            continue
        G = right_rinv(_H(Q0) @ M) if M is not None else torch.zeros_like(R0)
        Sk = -Sk if Sk is not None else torch.zeros_like(R0)
        Lg = G.tril(-1)
        dS = torch.diagonal(Sk, dim1=-2, dim2=-1)
        dG = torch.diagonal(G, dim1=-2, dim2=-1)
        if G.is_complex():
            d = (dS.real / 2).to(G.dtype) + 1j * dG.imag
        else:
            d = dS / 2
        C = Lg + Sk.triu(1) - _H(Lg) + torch.diag_embed(d)
        Rk = (G - C).triu() @ R0
        R.append(Rk)
        Q.append(right_rinv((M if M is not None else 0) - Q0 @ Rk))
    return Q, R


def _qr_jets(op: str, A, mode: str):
    """(Q series, R series) of torch.linalg.qr(A(t), mode) (Q = None for mode 'r')."""
    K = A._order
    As = _coeffs(A, K)
    A0 = As[0]
    m, n = A0.shape[-2], A0.shape[-1]
    if mode == "complete" and m > n:
        raise JetError(f"{op}: mode='complete' of a tall matrix returns m − n columns of Q that "
                       "span the orthogonal complement of A's range in a basis A does not "
                       "determine, so they have no Taylor expansion; use mode='reduced'")
    Q0, R0 = torch.linalg.qr(A0, mode="reduced")
    if m >= n:
        return _qr_tall_series(op, As, K, Q0, R0)
    # wide: Q R11 = A[:, :m] (square), R12 = Qᴴ A[:, m:]
    Q, R11 = _qr_tall_series(op, _map(As, lambda a: a[..., :, :m]), K, Q0, R0[..., :, :m])
    R12 = _cauchy(_map(Q, _H), _map(As, lambda a: a[..., :, m:]), K)
    R: Series = []
    for k in range(K + 1):
        a = R11[k] if k < len(R11) else None
        b = R12[k]
        if a is None and b is None:
            R.append(None)
        else:
            a = torch.zeros_like(R0[..., :, :m]) if a is None else a
            b = torch.zeros_like(R0[..., :, m:]) if b is None else b
            R.append(torch.cat([a, b], -1))
    return Q, R


@_rule(torch.linalg.qr)
def linalg_qr(A, mode="reduced", *, out=None):
    """(Q, R) of A(t) = Q(t) R(t), see ``_qr_tall_series``; a wide A is [Q R11, Q R12] with the
    square recurrence for A[:, :m] and R12 = Qᴴ A[:, m:] (a Cauchy product). mode='complete' of a
    tall matrix raises (its extra columns are not determined by A); mode='r' gives an empty Q."""
    res = torch.linalg.qr(primal(A), mode=mode)
    Q, R = _qr_jets("torch.linalg.qr", A, mode)
    K = A._order
    Qout = res.Q if mode == "r" else _jet(Q, K)
    return _return(res, (Qout, _jet(R, K)))


@_rule(*aliases("qr"))
def qr(A, some=True, *, out=None):
    """torch.qr(A, some) = linalg.qr(A, 'reduced' if some else 'complete')."""
    res = torch.qr(primal(A), some=some)
    Q, R = _qr_jets("torch.qr", A, "reduced" if some else "complete")
    return _return(res, (_jet(Q, A._order), _jet(R, A._order)))


def _householder_apply(V: Series, tau: Series, C: Series, K: int, left: bool, adjoint: bool,
                       nrefl: int) -> Series:
    """op(Q) C or C op(Q) for Q = H_1 ⋯ H_r, H_i = I − τ_i v_i v_iᴴ (op = ᴴ with adjoint, where
    H_iᴴ = I − conj(τ_i) v_i v_iᴴ): each reflector applied as C − τ v (vᴴ C) (or
    C − τ (C v) vᴴ) with Cauchy products of the series; exact, as a polynomial in (V, τ, C)."""
    order = range(nrefl - 1, -1, -1) if (left != adjoint) else range(nrefl)
    for i in order:
        v = _map(V, lambda x: x[..., :, i:i + 1])
        t = _map(tau, lambda x: x[..., i, None, None])
        if adjoint:
            t = _map(t, torch.conj)
        vH = _map(v, _H)
        if left:
            w = _cauchy(vH, C, K)                                         # vᴴ C
            upd = _cauchy(_cauchy(t, v, K, op=torch.mul), w, K)           # τ v (vᴴ C)
        else:
            w = _cauchy(C, v, K)                                          # C v
            upd = _cauchy(_cauchy(t, w, K, op=torch.mul), vH, K)          # τ (C v) vᴴ
        C = [_sub(c, u) for c, u in zip(C + [None] * (K + 1 - len(C)), upd)]
    return C


def _reflectors(A, tau, K: int, nrefl: int):
    """The series of V (unit lower trapezoidal: the Householder vectors stored below A's diagonal,
    an implicit 1 on it) and of τ."""
    As = _coeffs(A, K)
    m = As[0].shape[-2]
    V = _map(As, lambda a: a[..., :, :nrefl].tril(-1))
    V[0] = V[0] + torch.eye(m, nrefl, dtype=As[0].dtype, device=As[0].device)
    return V, _coeffs(tau, K)


@_rule(torch.linalg.householder_product)
def householder_product(A, tau, *, out=None):
    """The first n columns of H_1 ⋯ H_k, H_i = I − τ_i v_i v_iᴴ (v_i: column i of A below the
    diagonal, 1 on it): the reflectors applied to I_{m×n} one by one with Cauchy products (a
    polynomial in A and τ, so exact)."""
    K = order_of(A, tau)
    Q0 = torch.linalg.householder_product(primal(A), primal(tau))
    m, n = Q0.shape[-2], Q0.shape[-1]
    nrefl = primal(tau).shape[-1]
    V, T = _reflectors(A, tau, K, nrefl)
    C: Series = [torch.eye(m, n, dtype=Q0.dtype, device=Q0.device).expand_as(Q0)]
    out = _householder_apply(V, T, C, K, True, False, nrefl)
    out[0] = Q0
    return _jet(out, K)


@_rule(*aliases("orgqr"))
def orgqr(input, input2):
    """torch.orgqr(input, input2): householder_product(A, tau) under its older names."""
    return householder_product(input, input2)


@_rule(*aliases("ormqr"))
def ormqr(input, input2, input3, left=True, transpose=False, *, out=None):
    """op(Q)·C (left) or C·op(Q) with Q = H_1 ⋯ H_k from geqrf's reflectors (op = ᴴ with
    transpose): the reflectors applied to C one by one with Cauchy products (exact: a polynomial
    in the reflectors, τ and C)."""
    tau, other = input2, input3     # torch's names: ormqr(input, input2, input3)
    K = order_of(input, tau, other)
    Y0 = torch.ormqr(primal(input), primal(tau), primal(other), left=left, transpose=transpose)
    nrefl = primal(tau).shape[-1]
    V, T = _reflectors(input, tau, K, nrefl)
    out = _householder_apply(V, T, _coeffs(other, K), K, left, transpose, nrefl)
    out[0] = Y0
    return _jet(out, K)


@_rule(*aliases("geqrf"))
def geqrf(A, *, out=None):
    """(a, τ) of LAPACK's geqrf: R above the diagonal of a, the Householder vectors V below it.

    With Q = H_1 ⋯ H_kk = I − V T Vᴴ (compact WY, T upper triangular with diagonal τ), the
    first kk = min(m, n) columns give I − Q[:, :kk] = V (T V_1ᴴ), V_1 = V[:kk]: an LU
    factorization without pivoting of I − Q[:, :kk] (V unit lower, T V_1ᴴ upper with diagonal τ).
    So V(t) and τ(t) are the LU series (``_lu_series``, no permutation) of I − Q(t) with Q(t) the
    QR series, and R(t) that of the QR; exact where every τ ≠ 0 (else the reflector is the
    identity and V's column is not determined)."""
    K = A._order
    a0, tau0 = torch.geqrf(A._coeffs[0])
    m, n = a0.shape[-2], a0.shape[-1]
    kk = min(m, n)
    Q, R = _qr_jets("torch.geqrf", A, "reduced")
    # the LU of I − Q[:, :kk] uses the pivots τ_i of all but the last reflector when m ≤ n (the
    # last one acts on one entry: for real A it is the identity, τ = 0, all along the path)
    r = kk if m > kk else kk - 1
    if _any(tau0[..., :r] == 0):
        raise JetError("torch.geqrf: a Householder reflector is the identity (τ = 0: the column "
                       "below the diagonal is zero) at the expansion point, where the stored "
                       "vector is not determined by A")
    V0 = a0[..., :, :kk].tril(-1) + torch.eye(m, kk, dtype=a0.dtype, device=a0.device)
    Iq = torch.eye(m, kk, dtype=a0.dtype, device=a0.device) - Q[0][..., :, :kk]
    U0 = torch.linalg.solve_triangular(V0[..., :kk, :], Iq[..., :kk, :], upper=False,
                                       unitriangular=True)
    Es = [Iq] + _map(Q[1:], lambda q: -q[..., :, :kk])
    Vs, Us = _lu_series("torch.geqrf", Es, K, V0, U0)
    a_s: Series = [a0]
    t_s: Series = [tau0]
    for k in range(1, K + 1):
        v = Vs[k] if k < len(Vs) else None
        r = R[k] if k < len(R) else None
        if v is None and r is None:
            a_s.append(None)
        else:
            lower = F.pad(v.tril(-1), (0, n - kk)) if v is not None else 0
            upper = r.triu() if r is not None else 0
            if m > n and r is not None:
                upper = F.pad(upper, (0, 0, 0, m - kk))
            a_s.append(lower + upper)
        u = Us[k] if k < len(Us) else None
        t_s.append(None if u is None else torch.diagonal(u, dim1=-2, dim2=-1))
    return _return(torch.geqrf(A._coeffs[0]), (_jet(a_s, K), _jet(t_s, K)))


# ----------------------------------------------------------------------------------------------
# eigenvalues and eigenvectors
# ----------------------------------------------------------------------------------------------

def _eig_series(At: Series, lam0: Tensor, K: int, unitary: bool):
    """Eigenvalues Λ(t) and W(t) with Ã(t) W = W Λ, W_0 = I, for Ã = V_0^{-1} A V_0 (Ã_0 = Λ_0).

    Order k: with R_k = Σ_{j=1..k} Ã_j W_{k−j} − Σ_{j=1..k−1} W_j Λ_{k−j},
    (λ_i − λ_l) W_k[i, l] + R_k[i, l] = Λ_k δ_il, so Λ_k = diag R_k and W_k[i, l] = R_k[i, l]/(λ_l − λ_i)
    off the diagonal. The diagonal is a gauge (a rescaling of each eigenvector): 0 for a general
    matrix; for a Hermitian one (``unitary``, Ã = Q_0ᴴ A Q_0) the one that keeps W unitary with a
    real diagonal, W_k[i, i] = −½ (Σ_{j=1..k−1} W_jᴴ W_{k−j})[i, i]."""
    n = lam0.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=lam0.device)
    diff = lam0.unsqueeze(-2) - lam0.unsqueeze(-1)             # [i, l] = λ_l − λ_i
    inv_diff = torch.where(eye, torch.zeros_like(diff), 1 / torch.where(eye, torch.ones_like(diff), diff))
    dtype = At[0].dtype
    W: Series = [torch.eye(n, dtype=dtype, device=lam0.device).expand(At[0].shape)]
    Lam: Series = [lam0]
    nA = _length(At)
    for k in range(1, K + 1 if nA > 1 else 1):
        R = _conv_sum(At, W, k, torch.matmul, 1, k)
        WL = _conv_sum(W, Lam, k, lambda w, l: w * l.unsqueeze(-2), 1, k - 1)
        R = _sub(R, WL)
        if R is None:
            W.append(None)
            Lam.append(None)
            continue
        d = torch.diagonal(R, dim1=-2, dim2=-1)
        Lam.append(d.real if unitary and d.is_complex() else d)
        Wk = R * inv_diff.to(R.dtype)
        if unitary:
            G = _conv_sum(_map(W, _H), W, k, torch.matmul, 1, k - 1)
            if G is not None:
                gd = torch.diagonal(G, dim1=-2, dim2=-1)
                gd = gd.real if gd.is_complex() else gd
                Wk = Wk + torch.diag_embed((-gd / 2).to(Wk.dtype))
        W.append(Wk)
    return Lam, W


def _eigh_jets(op: str, A, UPLO: str, vectors: bool):
    K = A._order
    As = _map(_coeffs(A, K), lambda a: _hermitian_part(a, UPLO.upper() == "U"))
    lam0, Q0 = torch.linalg.eigh(As[0], UPLO=UPLO)
    _check_gaps(lam0, op, "eigenvalues")
    At = [None] + _map(As[1:], lambda a: _H(Q0) @ a @ Q0)
    At[0] = torch.diag_embed(lam0).to(Q0.dtype)
    Lam, W = _eig_series(At, lam0, K, unitary=True)
    if not vectors:
        return Lam, None
    Q = [Q0] + _map(W[1:], lambda w: Q0 @ w)
    if Q0.is_complex():
        _, row = _real_row(op, [Q0], (0,) if UPLO.upper() == "L" else (-1,))
        Q = _fix_phase(Q, K, row, unit_norm=True)
    return Lam, Q


def _real_row(op: str, mats, rows=(0, -1)):
    """(index into ``mats``, row) of the first primal matrix with a row that is real in every
    column up to rounding: the phase convention of the LAPACK routine in use (eigh and a tall
    svd return a real first (UPLO='L') or last (UPLO='U') row of the unitary factor). Raises if
    there is none: then the phases are not a function this rule can reproduce."""
    for i, M in enumerate(mats):
        tol = 8 * _eps(M) * float(M.abs().amax()) if M.numel() else 0.0
        for row in rows:
            r = row % M.shape[-2]
            if bool((M[..., r, :].imag.abs() <= tol).all()):
                return i, r
    raise JetError(
        f"{op}: the complex vectors are unique only up to a phase each, which the LAPACK routine "
        "in use fixes by a convention this rule does not recognise, so their Taylor coefficients "
        "are not defined by the matrix; the values (eigenvalues, singular values) and "
        "phase-invariant quantities are")


def _phase_factor(V: Series, K: int, p, unit_norm: bool) -> Series:
    """The series c(t) (…, 1, n) with v = w·c in torch's convention: unit norm and component p real
    with the sign it has at the expansion point,

        c = s·conj(w_p) / (|w_p|·‖w‖),   s = sign(Re v_0[p]),

    with |w_p|·‖w‖ = (|w_p|² ‖w‖²)^{1/2} by the power recurrence (‖w‖ = 1 when w stays unit).
    p: one row for all columns, or an index per column (…, n)."""
    V0 = V[0]
    if isinstance(p, int):
        idx = torch.full(V0.shape[:-2] + (1, V0.shape[-1]), p, dtype=torch.long, device=V0.device)
    else:
        idx = p.unsqueeze(-2)
    Vf = [torch.zeros_like(V0) if v is None else v for v in V]
    wp = [v.gather(-2, idx) for v in Vf]                                  # (…, 1, n)
    wpc = [x.conj() for x in wp]
    s = torch.sgn(V0.gather(-2, idx).real)                               # ±1
    mod2 = [x.real for x in S.mul(wp, wpc, K)]
    if not unit_norm:
        norm2 = [x.real.sum(-2, keepdim=True) for x in S.mul([v.conj() for v in Vf], Vf, K)]
        mod2 = S.mul(mod2, norm2, K)
    inv = S.pow_scalar(mod2, -0.5, K)
    return S.mul([x * s for x in wpc], [x.to(V0.dtype) for x in inv], K)


def _fix_phase(V: Series, K: int, p, unit_norm: bool) -> Series:
    """The vector series w(t) rescaled to torch's phase convention (``_phase_factor``)."""
    c = _phase_factor(V, K, p, unit_norm)
    out = S.mul([torch.zeros_like(V[0]) if v is None else v for v in V], c, K)
    out[0] = V[0]
    return out


@_rule(torch.linalg.eigh)
def linalg_eigh(A, UPLO="L", *, out=None):
    """(Λ, Q) of a Hermitian A(t) (one triangle read, as LAPACK): Q = Q_0 W with the recurrence of
    ``_eig_series`` on Ã = Q_0ᴴ A Q_0 (distinct eigenvalues; repeated ones raise). Real Q is unique
    up to the signs of its columns, which are kept; complex Q is brought to the phase convention
    of the primal (a row that is real) by ``_fix_phase``, or raises if there is none."""
    lam, Q = _eigh_jets("torch.linalg.eigh", A, UPLO, True)
    res = torch.linalg.eigh(primal(A), UPLO=UPLO)
    return _return(res, (_jet(lam, A._order), _jet(Q, A._order)))


@_rule(torch.linalg.eigvalsh)
def linalg_eigvalsh(A, UPLO="L", *, out=None):
    """Eigenvalues of a Hermitian A(t): Λ_k = diag R_k of ``_eig_series`` (distinct eigenvalues;
    at a repeated one the sorted eigenvalues have a kink, which raises)."""
    lam, _ = _eigh_jets("torch.linalg.eigvalsh", A, UPLO, False)
    return _jet(lam, A._order)


def _eig_jets(op: str, A, vectors: bool):
    K = A._order
    As = _coeffs(A, K)
    lam0, V0 = torch.linalg.eig(As[0])
    _check_gaps(lam0, op, "eigenvalues")
    LUv, piv, info = torch.linalg.lu_factor_ex(V0)
    if _any(info > 0):
        raise JetError(f"{op}: the matrix is not diagonalizable at the expansion point")
    ctype = V0.dtype

    def sim(a):
        return torch.linalg.lu_solve(LUv, piv, a.to(ctype) @ V0)

    At = [torch.diag_embed(lam0)] + _map(As[1:], sim)
    Lam, W = _eig_series(At, lam0, K, unitary=False)
    if not vectors:
        return Lam, None
    V = [V0] + _map(W[1:], lambda w: V0 @ w)
    p = (V0.real ** 2 + V0.imag ** 2).argmax(-2)                        # LAPACK: IDAMAX of |v_i|²
    if not bool((V0.gather(-2, p.unsqueeze(-2)).imag == 0).all()):
        raise JetError(f"{op}: the eigenvectors do not follow LAPACK geev's convention (largest "
                       "component real), the only one this rule reproduces; their phases are "
                       "not a function of the matrix, the eigenvalues are")
    return Lam, _fix_phase(V, K, p, unit_norm=False)


@_rule(torch.linalg.eig)
def linalg_eig(A, *, out=None):
    """(λ, V) of a diagonalizable A(t) with distinct eigenvalues: λ_k = diag R_k of
    ``_eig_series`` on Ã = V_0^{-1} A V_0, and V = V_0 W rescaled to LAPACK geev's convention (unit
    norm, the largest component of the primal real) by ``_fix_phase``: exact while that component
    stays the largest, which holds near the expansion point unless two components tie."""
    lam, V = _eig_jets("torch.linalg.eig", A, True)
    res = torch.linalg.eig(primal(A))
    return _return(res, (_jet(lam, A._order), _jet(V, A._order)))


@_rule(torch.linalg.eigvals)
def linalg_eigvals(A, *, out=None):
    """Eigenvalues of A(t) (distinct): λ_k = diag R_k of ``_eig_series`` on V_0^{-1} A V_0."""
    lam, _ = _eig_jets("torch.linalg.eigvals", A, False)
    return _jet(lam, A._order)


# ----------------------------------------------------------------------------------------------
# singular value decomposition
# ----------------------------------------------------------------------------------------------

def _svd_tall_series(op: str, As: Series, K: int, U0: Tensor, s0: Tensor, V0: Tensor,
                     vectors: bool):
    """U(t), s(t), V(t) with A = U diag(s) Vᴴ for m ≥ n, reduced, distinct nonzero s.

    Write V = V_0 W (n×n) and U = U_0 X + Z with U_0ᴴ Z = 0, Ã = U_0ᴴ A V_0 (Ã_0 = diag s_0).
    From A V = U S, Aᴴ U = V S and the orthogonality of U and V, at order k (W_0 = X_0 = I, Z_0 = 0):

        Z_k = (P⊥ Σ_{j=1..k} A_j V_{k−j} − Σ_{j=1..k−1} Z_{k−j} S_j) S_0^{-1}      (P⊥ = I − U_0U_0ᴴ)
        R1 = Σ_{j=1..k} Ã_j W_{k−j} − Σ_{j=1..k−1} X_j S_{k−j}
        R2 = Σ_{j=1..k} Ã_jᴴ X_{k−j} + Σ_{j=1..k−1} V_0ᴴ A_jᴴ Z_{k−j} − Σ_{j=1..k−1} W_j S_{k−j}
        S_0 W_k − X_k S_0 + R1 = S_k,   S_0 X_k − W_k S_0 + R2 = S_k    (S_k diagonal)

    so s_k = Re(diag R1 + diag R2)/2 and, off the diagonal, the 2×2 systems
    W[i,l] = −(s_i R1 + s_l R2)/(s_i² − s_l²), X[i,l] = −(s_l R1 + s_i R2)/(s_i² − s_l²); the diagonals
    of W and X follow from WᴴW = I and XᴴX + ZᴴZ = I (real parts; for complex A the common phase is
    a gauge: Im W_ii = 0, Im X_ii = Im R1_ii / s_i)."""
    m, n = U0.shape[-2], V0.shape[-1]
    _check_gaps(s0, op, "singular values")
    if n and _any(s0[..., -1] <= 16 * max(m, n) * _eps(s0) * s0[..., 0]):
        raise JetError(f"{op}: a zero singular value at the expansion point, where the singular "
                       "values (|·| of a smooth branch) have a kink and the vectors are not unique")
    dtype = U0.dtype
    eye = torch.eye(n, dtype=torch.bool, device=s0.device)
    si, sl = s0.unsqueeze(-1), s0.unsqueeze(-2)
    den = torch.where(eye, torch.ones_like(si * sl), si * si - sl * sl)
    inv_den = torch.where(eye, torch.zeros_like(den), 1 / den).to(dtype)
    si, sl = si.to(dtype), sl.to(dtype)
    nA = _length(As)
    tall = m > n
    W: Series = [torch.eye(n, dtype=dtype, device=s0.device).expand(V0.shape)]
    X: Series = [W[0]]
    Z: Series = [None]
    Sv: Series = [s0]
    Vs: Series = [V0]
    At = [None] + _map(As[1:], lambda a: _H(U0) @ a @ V0)
    AtH = _map(At, _H)
    AH = _map(As, _H)

    def times_s(x, s):  # x diag(s)
        return x * s.to(x.dtype).unsqueeze(-2)

    for k in range(1, K + 1 if nA > 1 else 1):
        if tall:
            Pz = _conv_sum(As, Vs, k, torch.matmul, 1, k)
            if Pz is not None:
                Pz = Pz - U0 @ (_H(U0) @ Pz)
            Pz = _sub(Pz, _conv_sum(Z, Sv, k, times_s, 1, k - 1))
            Z.append(None if Pz is None else Pz / s0.to(dtype).unsqueeze(-2))
        else:
            Z.append(None)
        R1 = _sub(_conv_sum(At, W, k, torch.matmul, 1, k), _conv_sum(X, Sv, k, times_s, 1, k - 1))
        E = _conv_sum(AH, Z, k, lambda a, z: _H(V0) @ (a @ z), 1, k - 1) if tall else None
        R2 = _sub(_add(_conv_sum(AtH, X, k, torch.matmul, 1, k), E),
                  _conv_sum(W, Sv, k, times_s, 1, k - 1))
        R1 = torch.zeros_like(W[0]) if R1 is None else R1
        R2 = torch.zeros_like(W[0]) if R2 is None else R2
        d1 = torch.diagonal(R1, dim1=-2, dim2=-1)
        d2 = torch.diagonal(R2, dim1=-2, dim2=-1)
        sk = (d1 + d2) / 2
        Sv.append(sk.real if sk.is_complex() else sk)
        Wk = -(si * R1 + sl * R2) * inv_den
        Xk = -(sl * R1 + si * R2) * inv_den
        GW = _conv_sum(_map(W, _H), W, k, torch.matmul, 1, k - 1)
        GX = _add(_conv_sum(_map(X, _H), X, k, torch.matmul, 1, k - 1),
                  _conv_sum(_map(Z, _H), Z, k, torch.matmul, 1, k - 1))

        def half_diag(G):
            if G is None:
                return 0
            g = torch.diagonal(G, dim1=-2, dim2=-1)
            return torch.diag_embed((-(g.real if g.is_complex() else g) / 2).to(dtype))

        Wk = Wk + half_diag(GW)
        Xk = Xk + half_diag(GX)
        if dtype.is_complex:
            Xk = Xk + torch.diag_embed(1j * (d1.imag / s0).to(dtype))
        W.append(Wk)
        X.append(Xk)
        Vs.append(V0 @ Wk)
    if not vectors:
        return None, Sv, None
    Us = [U0] + [_add(U0 @ X[k], Z[k]) for k in range(1, len(X))]
    return Us, Sv, Vs


def _svd_jets(op: str, A, full_matrices: bool, vectors: bool):
    """(U, S, Vh) series of torch.linalg.svd(A(t)) (U, Vh None without vectors)."""
    K = A._order
    As = _coeffs(A, K)
    A0 = As[0]
    m, n = A0.shape[-2], A0.shape[-1]
    if vectors and full_matrices and m != n:
        raise JetError(f"{op}: full_matrices=True with a non-square matrix returns |m − n| extra "
                       "singular vectors spanning a complement in a basis the matrix does not "
                       "determine, so they have no Taylor expansion; use full_matrices=False")
    U0, s0, Vh0 = torch.linalg.svd(A0, full_matrices=False)
    if m >= n:
        U, Sv, V = _svd_tall_series(op, As, K, U0, s0, _H(Vh0), vectors)
    else:  # wide: Aᴴ = V S Uᴴ is tall
        V, Sv, U = _svd_tall_series(op, _map(As, _H), K, _H(Vh0), s0, U0, vectors)
    if not vectors:
        return None, Sv, None
    if A0.is_complex():
        # each pair (u_i, v_i) is unique up to a common phase: LAPACK's convention makes one row
        # of V (or U) real; the same factor c_i(t) rotates both, which leaves A = U S Vᴴ unchanged
        which, row = _real_row(op, [V[0], U[0]])
        c = _phase_factor(V if which == 0 else U, K, row, unit_norm=True)
        U = S.mul([torch.zeros_like(U[0]) if x is None else x for x in U], c, K)
        V = S.mul([torch.zeros_like(V[0]) if x is None else x for x in V], c, K)
        U[0], V[0] = U0, _H(Vh0)
    return U, Sv, _map(V, _H)


@_rule(torch.linalg.svd)
def linalg_svd(A, full_matrices=True, *, driver=None, out=None):
    """(U, S, Vh) of A(t), distinct nonzero singular values: the recurrence of
    ``_svd_tall_series`` (a wide A through Aᴴ). The singular vector pairs' signs are those of the
    primal; complex pairs get LAPACK's phase convention (a real row of V or U, ``_phase_factor``);
    full_matrices=True with m ≠ n raises (the extra vectors are not determined by A)."""
    res = torch.linalg.svd(primal(A), full_matrices=full_matrices, driver=driver)
    U, Sv, Vh = _svd_jets("torch.linalg.svd", A, full_matrices, True)
    K = A._order
    return _return(res, (_jet(U, K), _jet(Sv, K), _jet(Vh, K)))


@_rule(torch.linalg.svdvals)
def linalg_svdvals(A, *, driver=None, out=None):
    """Singular values of A(t) (distinct, nonzero): s_k = Re(diag R1 + diag R2)/2 of
    ``_svd_tall_series``."""
    _, Sv, _ = _svd_jets("torch.linalg.svdvals", A, False, False)
    return _jet(Sv, A._order)


@_rule(*aliases("svd"))
def svd(A, some=True, compute_uv=True, *, out=None):
    """torch.svd: (U, S, V) = linalg.svd(A, full_matrices=not some) with V = Vhᴴ; without
    compute_uv, U and V are zero matrices (constants)."""
    res = torch.svd(primal(A), some=some, compute_uv=compute_uv)
    K = A._order
    if not compute_uv:
        _, Sv, _ = _svd_jets("torch.svd", A, False, False)
        return _return(res, (res.U, _jet(Sv, K), res.V))
    U, Sv, Vh = _svd_jets("torch.svd", A, not some, True)
    return _return(res, (_jet(U, K), _jet(Sv, K), _jet(_map(Vh, _H), K)))


# ----------------------------------------------------------------------------------------------
# pseudo-inverse and least squares (full rank)
# ----------------------------------------------------------------------------------------------

def _pinv_series(op: str, As: Series, K: int) -> Series:
    """pinv of a full-rank A(t): A^{-1} (square); for m > n, A = Q R gives pinv A = R^{-1} Qᴴ, the
    solve recurrence R_0 X_k = Qᴴ_k − Σ_{j≥1} R_j X_{k−j} on the QR series; for m < n,
    pinv A = (pinv Aᴴ)ᴴ."""
    A0 = As[0]
    m, n = A0.shape[-2], A0.shape[-1]
    if m == n:
        X0, info = torch.linalg.inv_ex(A0)
        _lu_check(info, op)
        return _inverse_series(As, K, X0)
    if m < n:
        return _map(_pinv_series(op, _map(As, _H), K), _H)
    Q0, R0 = torch.linalg.qr(A0)
    Q, R = _qr_tall_series(op, As, K, Q0, R0)
    return _solve_series(R, _map(Q, _H), K,
                         lambda r: torch.linalg.solve_triangular(R0, r, upper=True),
                         torch.matmul, _H(Q0))


def _full_rank_check(op: str, s: Tensor, thresh: Tensor, m: int, n: int) -> None:
    if _any((s > thresh.unsqueeze(-1)).sum(-1) < min(m, n)):
        raise JetError(
            f"{op}: the matrix is rank-deficient at the expansion point (singular values at or "
            "below the cut-off); the pseudo-inverse jumps where a singular value crosses the "
            "cut-off, which a generic perturbation makes it do, so it has no Taylor expansion there")


def _pinv_tolerances(A0: Tensor, atol, rtol):
    """torch.linalg.pinv's cut-off: max(atol, rtol·σ_max), rtol defaulting to eps·max(m, n) (0 when
    a positive atol is given)."""
    m, n = A0.shape[-2], A0.shape[-1]
    rdt = _real_dtype(A0)
    default = _eps(A0) * max(m, n)
    if atol is None:
        a = torch.zeros((), dtype=rdt, device=A0.device)
    else:
        a = torch.as_tensor(primal(atol), dtype=rdt, device=A0.device)
    if rtol is not None:
        r = torch.as_tensor(primal(rtol), dtype=rdt, device=A0.device)
    elif atol is not None:
        r = torch.where(a > 0, torch.zeros_like(a), torch.full_like(a, default))
    else:
        r = torch.full((), default, dtype=rdt, device=A0.device)
    return a, r


@_rule(torch.linalg.pinv)
def linalg_pinv(input, rcond=None, hermitian=False, *, atol=None, rtol=None, out=None):
    """Moore–Penrose pseudo-inverse of a full-rank A(t) (``_pinv_series``); hermitian=True reads
    one triangle (eigh) and is then the inverse of that Hermitian matrix. A rank-deficient A
    (singular values at or below torch's cut-off) raises: the pseudo-inverse is discontinuous
    there."""
    A = input   # torch's Python binding names the matrix input (the docs call it A)
    if rcond is not None:
        rtol = rcond
    K = A._order
    A0 = A._coeffs[0]
    m, n = A0.shape[-2], A0.shape[-1]
    a, r = _pinv_tolerances(A0, atol, rtol)
    As = _coeffs(A, K)
    if hermitian:
        As = _map(As, lambda x: _hermitian_part(x, False))
        s = torch.linalg.eigvalsh(As[0]).abs()
    else:
        s = torch.linalg.svdvals(A0)
    smax = s.amax(-1) if s.shape[-1] else torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device)
    if bool((r >= 1).all()):
        # every σ_i(t) ≤ σ_max(t) ≤ rtol·σ_max(t) ≤ the cut-off all along the path: torch drops all
        # of them and the pseudo-inverse is the zero matrix, identically
        return _jet([torch.zeros_like(_H(A0))], K)
    _full_rank_check("torch.linalg.pinv", s, torch.maximum(a, r * smax), m, n)
    return _jet(_pinv_series("torch.linalg.pinv", As, K), K)


@_rule(*aliases("pinverse"))
def pinverse(input, rcond=1e-15):
    """torch.pinverse(A, rcond) = linalg.pinv(A, rtol=rcond)."""
    return linalg_pinv(input, rtol=rcond)


@_rule(torch.linalg.lstsq)
def linalg_lstsq(A, B, rcond=None, *, driver=None):
    """(X, residuals, rank, singular values) of min ‖A X − B‖ for a full-rank A(t): X = pinv(A) B
    (the least-squares solution for m ≥ n, the minimum-norm one for m < n, which every driver
    returns at full rank), a Cauchy product with the pseudo-inverse series; residuals
    Σ_rows |A X − B|² when torch returns them; singular values the svdvals series; rank constant.
    A rank-deficient A raises (the solution jumps with the rank)."""
    K = order_of(A, B)
    A0, B0 = primal(A), primal(B)
    res = torch.linalg.lstsq(A0, B0, rcond=rcond, driver=driver)
    m, n = A0.shape[-2], A0.shape[-1]
    if res.rank.numel():
        if _any(res.rank < min(m, n)):
            raise JetError("torch.linalg.lstsq: the matrix is rank-deficient at the expansion point "
                           "(rank below min(m, n)); the solution jumps with the numerical rank, so "
                           "it has no Taylor expansion there")
    else:  # driver 'gels' assumes full rank: check it as linalg.pinv would
        s = torch.linalg.svdvals(A0)
        _full_rank_check("torch.linalg.lstsq", s, _eps(A0) * max(m, n) * s.amax(-1), m, n)
    As, Bs = _coeffs(A, K), _coeffs(B, K)
    vec = _is_vector_rhs(A0, B0)
    if vec:
        Bs = _map(Bs, lambda b: b.unsqueeze(-1))
    P = _pinv_series("torch.linalg.lstsq", As, K)
    X = _cauchy(P, Bs, K)
    outs = [_jet(_map(X, lambda x: x.squeeze(-1)) if vec else X, K)]
    if res.residuals.numel():
        Rr = [_sub(a, b) for a, b in zip(_cauchy(As, X, K), Bs + [None] * (K + 1 - len(Bs)))]
        if A0.is_complex():
            sq = [None if x is None else x.real for x in _cauchy(_map(Rr, torch.conj), Rr, K, op=torch.mul)]
        else:
            sq = _cauchy(Rr, Rr, K, op=torch.mul)
        outs.append(_jet(_map(sq, lambda x: x.sum(-2)), K, res.residuals))
    else:
        outs.append(res.residuals)
    outs.append(res.rank)
    if res.singular_values.numel():
        _, Sv, _ = _svd_jets("torch.linalg.lstsq", A if is_jet(A) else make_jet(A0.unsqueeze(0), K),
                             False, False)
        outs.append(_jet(Sv, K))
    else:
        outs.append(res.singular_values)
    return _return(res, outs)


# ----------------------------------------------------------------------------------------------
# matrix functions, powers and products of several matrices
# ----------------------------------------------------------------------------------------------

@_rule(torch.linalg.matrix_exp, *aliases("matrix_exp"))
def matrix_exp(A):
    """exp A(t) through the block-Toeplitz representation of truncated series: A(t) mod t^{K+1}
    ↦ T = [[A_0, A_1, …, A_K], [0, A_0, …, A_{K−1}], …, [0, …, 0, A_0]] is an algebra homomorphism
    (products of series are products of such matrices), so exp(T) = T of exp(A(t)), and its first
    block row holds the Taylor coefficients: exact, one matrix_exp of size (K+1)n."""
    K = A._order
    As = _coeffs(A, K)
    nA = _length(As)
    if nA == 1:
        return _jet([torch.matrix_exp(As[0])], K)
    n = As[0].shape[-1]
    Kp = K + 1
    Z = torch.zeros_like(As[0])
    blocks = [torch.cat([As[j - i] if j >= i and As[j - i] is not None else Z for j in range(Kp)], -1)
              for i in range(Kp)]
    E = torch.matrix_exp(torch.cat(blocks, -2))
    return _jet([E[..., :n, k * n:(k + 1) * n] for k in range(Kp)], K)


def _power_series(As: Series, p: int, K: int) -> Series:
    """A(t)^p, p ≥ 1, by repeated squaring with Cauchy products of matrices."""
    result = None
    base = As
    while p:
        if p & 1:
            result = base if result is None else _cauchy(result, base, K)
        p >>= 1
        if p:
            base = _cauchy(base, base, K)
    return result


@_rule(torch.linalg.matrix_power, *aliases("matrix_power"))
def matrix_power(A, n, *, out=None):
    """A(t)^n: repeated squaring with Cauchy products; n < 0 through the inverse series
    (``linalg.inv``'s recurrence); n = 0 the identity (a constant)."""
    K = A._order
    P0 = torch.linalg.matrix_power(A._coeffs[0], n)
    if n == 0:
        return _jet([P0], K)
    As = _coeffs(A, K)
    if n < 0:
        X0, info = torch.linalg.inv_ex(As[0])
        _lu_check(info, "torch.linalg.matrix_power")
        As = _inverse_series(As, K, X0)
    out = _power_series(As, abs(n), K)
    out[0] = P0
    return _jet(out, K)


@register(torch.linalg.multi_dot)
def multi_dot(tensors, *, out=None):
    """A chain of matmuls left to right (each a Cauchy product when both sides are jets); a 1-D
    first/last operand is a row/column vector, as torch.matmul treats it."""
    torch.linalg.multi_dot(primals(list(tensors)))  # torch's own checks
    return functools.reduce(torch.matmul, tensors)


@register(torch.chain_matmul)
def chain_matmul(*matrices, out=None):
    """torch.chain_matmul(A, B, ...) = A @ B @ ... (matmul rules)."""
    if len(matrices) == 1 and isinstance(matrices[0], (list, tuple)):
        matrices = tuple(matrices[0])
    torch.linalg.multi_dot(primals(list(matrices)))
    return functools.reduce(torch.matmul, matrices)


@register(torch.linalg.tensorinv)
def tensorinv(A, ind=2, *, out=None):
    """The inverse of A seen as a matrix (prod(shape[:ind]) × prod(shape[ind:])), reshaped to
    shape[ind:] + shape[:ind]: linalg.inv's rule between two reshapes."""
    torch.linalg.tensorinv(primal(A), ind=ind)  # torch's checks
    shape = tuple(A.shape)
    rows = math.prod(shape[:ind])
    inv = torch.linalg.inv(A.reshape(rows, -1))
    return inv.reshape(shape[ind:] + shape[:ind])


@register(torch.linalg.tensorsolve)
def tensorsolve(A, B, dims=None, *, out=None):
    """X with tensordot(A, X, X.ndim) = B: A's dims moved last, A reshaped to a square matrix
    (B.numel() × prod(shape[B.ndim:])), linalg.solve's rule on B flattened, reshaped back (as
    torch's own implementation)."""
    torch.linalg.tensorsolve(primal(A), primal(B), dims=dims)  # torch's checks
    if dims is not None:
        nd = A.dim()
        dims = [dims] if isinstance(dims, int) else list(dims)
        A = torch.movedim(A, dims, list(range(nd - len(dims), nd)))
    out_shape = tuple(A.shape[B.dim():])
    Am = A.reshape(math.prod(tuple(B.shape)), math.prod(out_shape))
    return torch.linalg.solve(Am, B.reshape(-1)).reshape(out_shape)


# ----------------------------------------------------------------------------------------------
# norms and condition numbers
# ----------------------------------------------------------------------------------------------

def _sq_abs(A):
    """|a|² elementwise, smooth also at a = 0 (no |·| kink: a² for real, Re² + Im² for complex)."""
    if A.is_complex():
        return torch.real(A) * torch.real(A) + torch.imag(A) * torch.imag(A)
    return A * A


@register(torch.linalg.matrix_norm)
def matrix_norm(A, ord="fro", dim=(-2, -1), keepdim=False, *, dtype=None, out=None):
    """'fro': sqrt(Σ|a|²) (the square kept smooth at zero entries); 'nuc', 2, −2: sum, max, min of
    the singular values (their rule: distinct, nonzero); 1, −1, inf, −inf: max/min of the column or
    row sums of |a| (the abs and max rules: piecewise). Computed in ``dtype`` when given."""
    ref = torch.linalg.matrix_norm(primal(A), ord=ord, dim=dim, keepdim=keepdim, dtype=dtype)
    if dtype is not None:
        A = A.to(dtype)
    nd = A.dim()
    d0, d1 = dim[0] % nd, dim[1] % nd
    if ord == "fro":
        out = torch.sqrt(_sq_abs(A).sum(dim=(d0, d1), keepdim=keepdim))
    elif ord in ("nuc", 2, -2):
        s = torch.linalg.svdvals(torch.movedim(A, (d0, d1), (-2, -1)))
        out = s.sum(-1) if ord == "nuc" else (s[..., 0] if ord == 2 else s[..., -1])
        if keepdim:
            for d in sorted((d0, d1)):
                out = out.unsqueeze(d)
    elif ord in (1, -1, float("inf"), float("-inf")):
        sum_dim, red_dim = (d0, d1) if ord in (1, -1) else (d1, d0)
        sums = torch.abs(A).sum(dim=sum_dim, keepdim=True)
        out = sums.amax(dim=red_dim, keepdim=True) if ord > 0 else sums.amin(dim=red_dim, keepdim=True)
        if not keepdim:
            out = out.squeeze((d0, d1))
    else:
        raise JetError(f"torch.linalg.matrix_norm: ord={ord!r} is not handled")
    if out.shape != ref.shape:
        raise JetError(f"torch.linalg.matrix_norm: internal shape mismatch {tuple(out.shape)} vs "
                       f"{tuple(ref.shape)}")
    return out


@register(torch.linalg.norm)
def linalg_norm(A, ord=None, dim=None, keepdim=False, *, dtype=None, out=None):
    """torch's dispatch: a matrix norm (linalg.matrix_norm's rule) when ord is given and dim has two
    entries (or A is 2-D without dim), else the vector norm (linalg.vector_norm's rule, ord 2 by
    default)."""
    ref = torch.linalg.norm(primal(A), ord=ord, dim=dim, keepdim=keepdim, dtype=dtype)  # checks
    if ord == 0 and not isinstance(ord, str) and not (dim is not None and not isinstance(dim, int)
                                                      and len(dim) == 2):
        # the number of nonzero entries: piecewise constant, but it jumps at an entry that is
        # exactly zero (nonzero for every t ≠ 0 along a generic direction)
        if _any(primal(A) == 0):
            raise JetError("torch.linalg.norm: ord=0 counts the nonzero entries, which jumps at an "
                           "entry that is exactly zero at the expansion point (no Taylor expansion)")
        return ref
    if isinstance(dim, int):
        dim = (dim,)
    if isinstance(ord, str) or (ord is not None and ((dim is not None and len(dim) == 2)
                                                     or (dim is None and A.dim() == 2))):
        return torch.linalg.matrix_norm(A, ord="fro" if ord is None else ord,
                                        dim=(-2, -1) if dim is None else dim,
                                        keepdim=keepdim, dtype=dtype)
    return torch.linalg.vector_norm(A, 2 if ord is None else ord, dim=dim, keepdim=keepdim,
                                    dtype=dtype)


@register(torch.linalg.cond)
def cond(A, p=None, *, out=None):
    """κ(A): σ_max/σ_min (p = None, 2) or σ_min/σ_max (p = −2) from the svdvals rule; other p:
    ‖A‖_p ‖A^{-1}‖_p from the matrix_norm and inv rules."""
    torch.linalg.cond(primal(A), p=p)  # torch's checks
    if p is None or p in (2, -2):
        s = torch.linalg.svdvals(A)
        hi, lo = s[..., 0], s[..., -1]
        return hi / lo if p != -2 else lo / hi
    return torch.linalg.matrix_norm(A, ord=p) * torch.linalg.matrix_norm(torch.linalg.inv(A), ord=p)


# ----------------------------------------------------------------------------------------------
# bilinear products
# ----------------------------------------------------------------------------------------------

def _bilinear(op: Callable, a, b):
    """A map bilinear in (a, b): (a ⋆ b)_k = Σ_j op(a_j, b_{k−j}) (a constant operand has one
    coefficient, so the product is linear in the other)."""
    K = order_of(a, b)
    op(primal(a), primal(b))  # torch's own checks and errors
    return make_jet(cauchy_op(op, a, b, K), K)


@register(*aliases("kron"))
def kron(input, other, *, out=None):
    """kron(a, b): bilinear, the Cauchy product Σ_j kron(a_j, b_{k−j})."""
    return _bilinear(torch.kron, input, other)


@register(*aliases("outer"), *aliases("ger"))
def outer(input, vec2, *, out=None):
    """outer(a, b) = a bᵀ: bilinear, the Cauchy product Σ_j outer(a_j, b_{k−j})."""
    return _bilinear(torch.outer, input, vec2)


@register(*aliases("inner"))
def inner(input, other, *, out=None):
    """torch.inner(a, b): Σ over the last axes of a_{…i} b_{…i} (a 0-dim operand multiplies):
    bilinear, the Cauchy product Σ_j inner(a_j, b_{k−j})."""
    return _bilinear(torch.inner, input, other)


@register(torch.linalg.vecdot)
def vecdot(x, y, *, dim=-1, out=None):
    """Σ_dim conj(x)·y: sesquilinear, i.e. bilinear over ℝ (the path parameter is real), the
    Cauchy product Σ_j vecdot(x_j, y_{k−j})."""
    return _bilinear(lambda a, b: torch.linalg.vecdot(a, b, dim=dim), x, y)


@register(torch.linalg.cross)
def linalg_cross(input, other, *, dim=-1, out=None):
    """a × b: bilinear, the Cauchy product Σ_j a_j × b_{k−j}."""
    return _bilinear(lambda a, b: torch.linalg.cross(a, b, dim=dim), input, other)


@register(*aliases("cross"))
def cross(input, other, dim=None, *, out=None):
    """torch.cross (dim=None: the first axis of size 3): bilinear, a Cauchy product."""
    if dim is None:
        return _bilinear(lambda a, b: torch.cross(a, b), input, other)
    return _bilinear(lambda a, b: torch.cross(a, b, dim=dim), input, other)


@register(torch.tensordot)
def tensordot(a, b, dims=2, out=None):
    """tensordot(a, b, dims): bilinear, the Cauchy product Σ_j tensordot(a_j, b_{k−j})."""
    return _bilinear(lambda x, y: torch.tensordot(x, y, dims=dims), a, b)


@register(torch._VF.tensordot)
def _vf_tensordot(a, b, dims_a, dims_b, *args, **kwargs):
    """The ATen tensordot behind torch.tensordot: bilinear, a Cauchy product."""
    return _bilinear(lambda x, y: torch._VF.tensordot(x, y, dims_a, dims_b), a, b)


@register(*aliases("mv"))
def mv(input, vec, *, out=None):
    """A v: torch.matmul's rule (linear in each operand, a Cauchy product if both are jets)."""
    torch.mv(primal(input), primal(vec))  # torch's checks (2-D times 1-D)
    return torch.matmul(input, vec)


@register(*aliases("addmv"))
def addmv(input, mat, vec, *, beta=1, alpha=1, out=None):
    """β·input + α·(mat @ vec) (input ignored when β = 0, as torch)."""
    torch.addmv(primal(input), primal(mat), primal(vec), beta=beta, alpha=alpha)  # torch's checks
    return beta_input_plus_alpha_prod(input, torch.matmul(mat, vec), beta, alpha)


@register(*aliases("addr"))
def addr(input, vec1, vec2, *, beta=1, alpha=1, out=None):
    """β·input + α·outer(vec1, vec2) (input ignored when β = 0, as torch)."""
    torch.addr(primal(input), primal(vec1), primal(vec2), beta=beta, alpha=alpha)  # torch's checks
    return beta_input_plus_alpha_prod(input, torch.outer(vec1, vec2), beta, alpha)


# ----------------------------------------------------------------------------------------------
# Vandermonde, diagonal, covariance
# ----------------------------------------------------------------------------------------------

def _vander(x, N: int, increasing: bool):
    K = x._order
    xs = x.series()
    one = torch.ones_like(xs[0])
    powers = [[one]]
    for _ in range(1, N):
        powers.append(S.mul(powers[-1], xs, K))
    if not increasing:
        powers = powers[::-1]
    n = max(len(p) for p in powers)
    cols = []
    for k in range(n):
        cols.append(torch.stack([p[k] if k < len(p) else torch.zeros_like(one) for p in powers], -1))
    return make_jet(cols, K)


@register(torch.linalg.vander)
def linalg_vander(x, *, N=None):
    """Columns x⁰, x¹, …, x^{N−1}: the powers by repeated Cauchy products with x."""
    ref = torch.linalg.vander(primal(x), N=N)
    if x.dim() == 0:  # torch treats a 0-dim x as one point
        x = x.reshape(1)
    return _vander(x, ref.shape[-1], True)


@register(torch.vander)
def vander(x, N=None, increasing=False):
    """torch.vander: the columns x^{N−1}, …, x⁰ (or increasing), by repeated Cauchy products."""
    ref = torch.vander(primal(x), N=N, increasing=increasing)
    return _vander(x, ref.shape[-1], increasing)


@register(torch.linalg.diagonal)
def linalg_diagonal(A, *, offset=0, dim1=-2, dim2=-1):
    """A diagonal: linear, every coefficient."""
    return per_coefficient(lambda a: torch.linalg.diagonal(a, offset=offset, dim1=dim1, dim2=dim2),
                           (A,), {})


@register(*aliases("cov"))
def cov(input, *, correction=1, fweights=None, aweights=None):
    """torch.cov as ATen computes it (weights w = fweights·aweights, weighted mean, centring, the
    correction's normalization factor), composed of ops with rules: (x − x̄)(w·(x − x̄))ᴴ / f. A
    complex result keeps its real part only, as ATen does."""
    torch.cov(primal(input), correction=correction, fweights=primal(fweights),
              aweights=primal(aweights))  # torch's checks
    x = input if input.dim() == 2 else input.reshape(1, -1)
    N = x.shape[1]
    w = fweights
    if aweights is not None:
        w = aweights if w is None else w * aweights
    if w is None:
        w_sum = N
        avg = x.sum(1) / N
    else:
        w_sum = w.sum()
        avg = (x * w).sum(1) / w_sum
    if w is None:
        norm = N - correction
    elif correction == 0:
        norm = w_sum
    elif aweights is None:
        norm = w_sum - correction
    elif fweights is None and N == 1 and correction == 1:
        norm = 0
    else:
        norm = w_sum - correction * (w * aweights).sum() / w_sum
    if bool(torch.as_tensor(primal(norm)) <= 0):
        norm = 0
    if N == 1 and (fweights is None) != (aweights is None):
        xc = torch.zeros_like(primal(x))
    else:
        xc = x - avg.unsqueeze(1)
    c = torch.matmul(xc, (xc if w is None else xc * w).t().conj())
    if c.is_complex():
        c = torch.complex(torch.real(c), torch.zeros_like(primal(torch.real(c))))
    if isinstance(norm, (int, float)):
        norm = torch.tensor(norm, dtype=torch.long)
    return torch.true_divide(c, norm).squeeze()


@register(*aliases("corrcoef"))
def corrcoef(input):
    """torch.corrcoef as ATen computes it: cov, divided by the standard deviations on both sides,
    clipped to [−1, 1] (the clip is inactive off the diagonal except at perfect correlation; the
    diagonal is identically 1)."""
    c = torch.cov(input)
    if c.dim() == 0:
        return c / c
    d = torch.diagonal(c)
    std = torch.sqrt(torch.real(d) if d.is_complex() else d)
    c = c / std.reshape(-1, 1)
    c = c / std.reshape(1, -1)
    if c.is_complex():
        return torch.complex(torch.real(c).clip(-1, 1), torch.imag(c).clip(-1, 1))
    return c.clip(-1, 1)


# ----------------------------------------------------------------------------------------------
# randomized low-rank methods
# ----------------------------------------------------------------------------------------------

def _random_lowrank(name: str):
    def rule(*args, **kwargs):
        raise JetError(
            f"torch.{name} is a randomized algorithm: its result depends on a random test matrix "
            "and, below full rank, only approximates the SVD, so its Taylor coefficients are those "
            "of one random draw, not a function of the input; use torch.linalg.svd (exact, with a "
            "Taylor rule) or torch.linalg.svdvals instead")
    rule.__doc__ = f"torch.{name}: randomized, refused (see the error message)."
    return rule


register(torch.svd_lowrank)(_random_lowrank("svd_lowrank"))
register(torch.pca_lowrank)(_random_lowrank("pca_lowrank"))


# ----------------------------------------------------------------------------------------------
# LDLᵀ (Bunch–Kaufman) with the primal's pivots held constant
# ----------------------------------------------------------------------------------------------

def _ldl_structure(pivots: Tensor, n: int, dtype, device):
    """From LAPACK sytrf/hetrf pivots (lower, 1-based; a 2×2 block at k, k+1 when
    pivots[k] = pivots[k+1] < 0), per batch element:

    - Pi: the permutation Π = P_1 ⋯ P_s of the interchanges of the steps;
    - fwd, bwd: gather indices between LAPACK's stored multipliers and L̃ = Πᵀ L (L = P_1 L_1 ⋯
      P_s L_s as documented): column c of step i is L̃[:, c] = P_s ⋯ P_{i+1} L_stored[:, c] (later
      interchanges applied to earlier columns), L̃[r, c] = L_stored[fwd[r, c], c], and back;
    - blk: the mask of D's diagonal blocks.
    Then A = Π L̃ D L̃ᵀ Π^T with L̃ unit lower and zero inside D's blocks."""
    batch = pivots.shape[:-1]
    flat = pivots.reshape(-1, n).tolist()
    Pis, fwds, bwds, blks = [], [], [], []
    for piv in flat:
        steps = []
        k = 0
        while k < n:
            if piv[k] > 0:
                steps.append((k, 1, k, piv[k] - 1))
                k += 1
            else:
                steps.append((k, 2, k + 1, -piv[k] - 1))
                k += 2
        fwd = [[0] * n for _ in range(n)]
        bwd = [[0] * n for _ in range(n)]
        blk = [[False] * n for _ in range(n)]
        for i, (b, sz, _, _) in enumerate(steps):
            idx = list(range(n))
            for (_, _, a, p) in steps[i + 1:]:
                idx[a], idx[p] = idx[p], idx[a]
            idb = list(range(n))
            for (_, _, a, p) in reversed(steps[i + 1:]):
                idb[a], idb[p] = idb[p], idb[a]
            for c in range(b, b + sz):
                for r in range(n):
                    fwd[r][c] = idx[r]
                    bwd[r][c] = idb[r]
            for r in range(b, b + sz):
                for c in range(b, b + sz):
                    blk[r][c] = True
        perm = list(range(n))  # Π e_j = e_{perm[j]}: Π = P_1 ⋯ P_s applied to the identity
        for (_, _, a, p) in reversed(steps):
            perm = [p if v == a else a if v == p else v for v in perm]
        Pi = [[0.0] * n for _ in range(n)]
        for j in range(n):
            Pi[perm[j]][j] = 1.0
        Pis.append(Pi)
        fwds.append(fwd)
        bwds.append(bwd)
        blks.append(blk)
    shape = tuple(batch) + (n, n)
    return (torch.tensor(Pis, dtype=dtype, device=device).reshape(shape),
            torch.tensor(fwds, dtype=torch.long, device=device).reshape(shape),
            torch.tensor(bwds, dtype=torch.long, device=device).reshape(shape),
            torch.tensor(blks, dtype=torch.bool, device=device).reshape(shape))


def _ldl_parts(LD: Tensor, fwd: Tensor, blk: Tensor, hermitian: bool, first: bool):
    """(L̃, D) of one coefficient of the packed LD (L̃ with the unit diagonal only for the primal)."""
    n = LD.shape[-1]
    strict = torch.ones(n, n, dtype=torch.bool, device=LD.device).tril(-1)
    Lst = torch.where(strict & ~blk, LD, torch.zeros_like(LD))
    Lt = Lst.gather(-2, fwd.expand(Lst.shape))
    Dl = torch.where(blk, LD, torch.zeros_like(LD)).tril()
    if hermitian and LD.is_complex():
        # hetrs reads only the real part of a 1×1 block (it is real in any Hermitian D); the
        # diagonal of a 2×2 block it uses as stored
        single = torch.diag_embed(blk.sum(-1) == 1)
        Dl = torch.where(single, Dl.real.to(Dl.dtype), Dl)
    off = Dl.tril(-1)
    offT = off.mH if hermitian else off.mT
    D = Dl + offT
    if first:
        Lt = Lt + torch.eye(n, dtype=LD.dtype, device=LD.device)
    return Lt, D


def _tr(x: Tensor, hermitian: bool) -> Tensor:
    return x.mH if hermitian else x.mT


def _ldl_product(Ls: Series, Ds: Series, K: int, hermitian: bool) -> Series:
    return _cauchy(_cauchy(Ls, Ds, K), _map(Ls, lambda x: _tr(x, hermitian)), K)


def _symmetric_part(A: Tensor, hermitian: bool) -> Tensor:
    """The matrix that sytrf (symmetric) or hetrf (Hermitian) sees: the lower triangle mirrored."""
    if hermitian:
        return _hermitian_part(A, False)
    T = A.tril(-1)
    return T + T.mT + torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1))


def _ldl_jets(op: str, A, hermitian: bool):
    K = A._order
    As = _map(_coeffs(A, K), lambda a: _symmetric_part(a, hermitian))
    LD0, piv, info = torch.linalg.ldl_factor_ex(As[0], hermitian=hermitian)
    n = LD0.shape[-1]
    Pi, fwd, bwd, blk = _ldl_structure(piv, n, LD0.dtype, LD0.device)
    L0, D0 = _ldl_parts(LD0, fwd, blk, hermitian, True)
    D0inv, dinfo = torch.linalg.inv_ex(D0)
    if _any(info > 0) or _any(dinfo > 0):
        raise JetError(f"{op}: the matrix is singular at the expansion point (a singular block of "
                       "D), where the LDLᵀ factors with fixed pivots are not differentiable")
    Ap = _map(As, lambda a: Pi.mT @ a @ Pi)
    strict_blk = torch.ones(n, n, dtype=torch.bool, device=LD0.device).tril(-1) & ~blk
    Ls: Series = [L0]
    Ds: Series = [D0]
    for k in range(1, K + 1 if _length(As) > 1 else 1):
        prod = _ldl_product(Ls + [None], Ds + [None], k, hermitian)[k]
        M = _sub(Ap[k] if k < len(Ap) else None, prod)
        if M is None:
            Ls.append(None)
            Ds.append(None)
            continue
        Y = torch.linalg.solve_triangular(L0, M, upper=False, unitriangular=True)
        G = _tr(torch.linalg.solve_triangular(L0, _tr(Y, hermitian), upper=False, unitriangular=True),
                hermitian)
        Dk = torch.where(blk, G, torch.zeros_like(G))
        ND = torch.where(strict_blk, G, torch.zeros_like(G))
        Ds.append(Dk)
        Ls.append(L0 @ (ND @ D0inv).tril(-1))
    return LD0, piv, info, Ls, Ds, bwd, blk


@_rule(torch.linalg.ldl_factor_ex)
def linalg_ldl_factor_ex(A, *, hermitian=False, check_errors=False, out=None):
    """(LD, pivots, info) of the Bunch–Kaufman factorization Πᵀ A Π = L̃ D L̃ᵀ (ᴴ if hermitian) with
    the primal's pivots (Π, D's block structure) held fixed. With
    M_k = Πᵀ A_k Π − Σ_{a+b+c=k, all<k} L̃_a D_b L̃_cᵀ and G = L̃_0^{-1} M_k L̃_0^{-ᵀ}:
    G = D_k + N D_0 + (N D_0)ᵀ with N = L̃_0^{-1} L̃_k block-strictly lower, so D_k is G's
    block-diagonal part and L̃_k = L̃_0 (G's block-strictly-lower part) D_0^{-1}; the packed output
    stores L̃_k's columns in LAPACK's interchange order (``_ldl_structure``)."""
    res = torch.linalg.ldl_factor_ex(primal(A), hermitian=hermitian, check_errors=check_errors)
    LD0, piv, info, Ls, Ds, bwd, blk = _ldl_jets("torch.linalg.ldl_factor_ex", A, hermitian)
    return _return(res, (_jet(_ldl_pack(LD0, Ls, Ds, bwd, blk), A._order), res.pivots, res.info))


@_rule(torch.linalg.ldl_factor)
def linalg_ldl_factor(A, *, hermitian=False, out=None):
    """(LD, pivots): see linalg.ldl_factor_ex."""
    res = torch.linalg.ldl_factor(primal(A), hermitian=hermitian)
    LD0, piv, info, Ls, Ds, bwd, blk = _ldl_jets("torch.linalg.ldl_factor", A, hermitian)
    return _return(res, (_jet(_ldl_pack(LD0, Ls, Ds, bwd, blk), A._order), res.pivots))


def _ldl_pack(LD0: Tensor, Ls: Series, Ds: Series, bwd: Tensor, blk: Tensor) -> Series:
    """LAPACK's packed LD of each coefficient: L̃_k's multipliers moved back to the stored order
    (``bwd``), D_k's lower part on and below the diagonal of its blocks."""
    out: Series = [LD0]
    for k in range(1, len(Ls)):
        if Ls[k] is None and Ds[k] is None:
            out.append(None)
            continue
        L = Ls[k] if Ls[k] is not None else torch.zeros_like(LD0)
        D = Ds[k] if Ds[k] is not None else torch.zeros_like(LD0)
        Lst = L.gather(-2, bwd.expand(L.shape)).tril(-1)
        Lst = torch.where(blk, torch.zeros_like(Lst), Lst)
        out.append(Lst + D.tril())
    return out


@_rule(torch.linalg.ldl_solve)
def linalg_ldl_solve(LD, pivots, B, *, hermitian=False, out=None):
    """X = A^{-1} B for A = Π L̃ D L̃ᵀ Πᵀ given by packed LDLᵀ factors: the solve recurrence
    A_0 X_k = B_k − Σ_{j≥1} A_j X_{k−j}, with A(t) from the factor jet (a triple Cauchy product)
    and A_0^{-1} applied by ldl_solve with the primal factors."""
    K = order_of(LD, B)
    LD0 = primal(LD)
    X0 = torch.linalg.ldl_solve(LD0, pivots, primal(B), hermitian=hermitian)
    n = LD0.shape[-1]
    As: Series = [LD0]
    if is_jet(LD):
        Pi, fwd, bwd, blk = _ldl_structure(pivots, n, LD0.dtype, LD0.device)
        parts = [None if c is None else _ldl_parts(c, fwd, blk, hermitian, k == 0)
                 for k, c in enumerate(_coeffs(LD, K))]
        Ls = [None if p is None else p[0] for p in parts]
        Ds = [None if p is None else p[1] for p in parts]
        As = _map(_ldl_product(Ls, Ds, K, hermitian), lambda a: Pi @ a @ Pi.mT)

    def solve0(r):
        return torch.linalg.ldl_solve(LD0, pivots, r, hermitian=hermitian)

    return _jet(_solve_series(As, _coeffs(B, K), K, solve0, torch.matmul, X0), K)
