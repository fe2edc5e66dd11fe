"""Taylor arithmetic on truncated series of normalized coefficients (docs/math.md §1–2).

A series is a Python list ``a = [a_0, a_1, ..., a_n]`` of tensors of one shape, standing for
``a(t) = Σ_k a_k t^k``; coefficients past the end of the list are known to be zero (the input jet
``(x, u)`` has n = 1). Every function takes the order ``K`` it must produce and returns a list of
at most ``K + 1`` coefficients; where the result is known to have fewer non-zero coefficients
(a product of two short series, a linear map) the list is shorter.

These are the pure-PyTorch reference rules: differentiable, any device, any float dtype. They are
the CPU backend, the oracle of the fused kernels, and the building blocks of the composite rules.
The recurrences are those of docs/math.md §2 (Griewank & Walther, *Evaluating Derivatives*, ch. 13);
sums skip the terms that are known to be zero, which makes the common case of an input jet with
two coefficients cheap.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

Series = List[Tensor]

__all__ = [
    "Series", "add", "sub", "neg", "scale", "mul", "square", "div", "reciprocal", "exp", "log",
    "pow_scalar", "pow_int", "pow_tensor", "sqrt", "rsqrt", "tanh", "tanh_with_derivative", "sigmoid",
    "sigmoid_with_derivative", "sin_cos", "sin", "cos", "softplus", "erf",
    "gelu", "gelu_tanh", "silu", "elu", "log1p", "expm1",
    "atan", "integrate",
]


def _len(a: Sequence[Tensor], K: int) -> int:
    return min(len(a), K + 1)


def _get(a: Sequence[Tensor], k: int) -> Optional[Tensor]:
    return a[k] if k < len(a) else None


def add(a: Series, b: Series, K: int, alpha: float = 1.0) -> Series:
    """(a + alpha·b)_k = a_k + alpha·b_k."""
    n = max(_len(a, K), _len(b, K))
    out = []
    for k in range(n):
        x, y = _get(a, k), _get(b, k)
        if y is None:
            out.append(x)
        elif x is None:
            out.append(y if alpha == 1.0 else alpha * y)
        else:
            out.append(x + y if alpha == 1.0 else x + alpha * y)
    return out


def sub(a: Series, b: Series, K: int) -> Series:
    return add(a, b, K, alpha=-1.0)


def neg(a: Series, K: int) -> Series:
    return [-x for x in a[: K + 1]]


def scale(a: Series, c, K: int) -> Series:
    """Product with a constant (tensor or number) c: linear, applied to every coefficient."""
    return [x * c for x in a[: K + 1]]


def mul(a: Series, b: Series, K: int) -> Series:
    """Cauchy product (ab)_k = Σ_{j=0..k} a_j b_{k−j} (docs/math.md §2, bilinear)."""
    na, nb = _len(a, K), _len(b, K)
    n = min(K + 1, na + nb - 1)
    return [_dot((a[j], b[k - j]) for j in range(max(0, k - nb + 1), min(k, na - 1) + 1))
            for k in range(n)]


def square(a: Series, K: int) -> Series:
    """(a²)_k using the symmetry of the Cauchy product: about half the products."""
    na = _len(a, K)
    a = a[:na]
    return [square_coefficient(a, k) for k in range(min(K + 1, 2 * na - 1))]


def div(a: Series, b: Series, K: int) -> Series:
    """y = a/b: y_k = (a_k − Σ_{j=1..k} b_j y_{k−j}) / b_0 (docs/math.md §2, division)."""
    nb = _len(b, K)
    inv0 = 1.0 / b[0]
    y: Series = []
    for k in range(K + 1):
        acc = _get(a, k)
        for j in range(1, min(k, nb - 1) + 1):
            term = b[j] * y[k - j]
            acc = -term if acc is None else acc - term
        y.append(torch.zeros_like(inv0) if acc is None else acc * inv0)
    if nb == 1:  # division by a constant stays as short as a
        return y[: _len(a, K)]
    return y


def reciprocal(b: Series, K: int) -> Series:
    return div([torch.ones_like(b[0])], b, K)


def integrate(u: Series, g: Series, K: int, y0: Tensor) -> Series:
    """y with y' = g·u' and y_0 = y0: y_k = (1/k) Σ_{j=1..k} j u_j g_{k−j}.

    ``g`` must hold at least K coefficients (g_0..g_{K−1}); this is the pattern behind exp, log,
    tanh, sigmoid, softplus, erf and atan when g is known in advance.
    """
    nu = _len(u, K)
    ju = _scaled_terms(u, nu)
    out = [y0]
    for k in range(1, K + 1):
        acc = _dot((ju[j], g[k - j]) for j in range(1, min(k, nu - 1) + 1))
        out.append(torch.zeros_like(y0) if acc is None else (acc if k == 1 else acc / k))
    return out


def _dot(pairs) -> Optional[Tensor]:
    """Σ a·b over (a, b) pairs, with the products fused into the sums (torch.addcmul)."""
    acc = None
    for a, b in pairs:
        acc = a * b if acc is None else torch.addcmul(acc, a, b)
    return acc


def _scaled_terms(u: Series, nu: int) -> List[Optional[Tensor]]:
    """[None, u_1, 2u_2, 3u_3, …]: the j·u_j factors, computed once for all k."""
    return [None] + [u[j] if j == 1 else j * u[j] for j in range(1, nu)]


def _self_integrate(u: Series, K: int, y0: Tensor, g_of: Callable[[Series, int], Tensor],
                    with_g: bool = False):
    """y with y' = g(y)·u', where g_k depends on y_0..y_k only: interleave y and g coefficients.
    y_k = (1/k) Σ_{j=1..k} j u_j g_{k−j} (docs/math.md §2, the pattern of exp, tanh, sigmoid).
    ``with_g=True`` returns (y, g) with g to order K too (g is φ′(u(t)) for tanh and sigmoid)."""
    nu = _len(u, K)
    ju = _scaled_terms(u, nu)
    y = [y0]
    g: Series = [g_of(y, 0)]
    for k in range(1, K + 1):
        acc = _dot((ju[j], g[k - j]) for j in range(1, min(k, nu - 1) + 1))
        y.append(torch.zeros_like(y0) if acc is None else (acc if k == 1 else acc / k))
        if k < K or with_g:
            g.append(g_of(y, k))
    return (y, g) if with_g else y


def square_coefficient(y: Series, k: int) -> Tensor:
    """(y²)_k = 2 Σ_{j<k/2} y_j y_{k−j} + y_{k/2}² (k even), from the available y_0..y_k."""
    n = len(y)
    acc = _dot((y[j], y[k - j]) for j in range(max(0, k - n + 1), (k - 1) // 2 + 1))
    if acc is not None:
        acc = 2 * acc
    if k % 2 == 0 and k // 2 < n:
        mid = y[k // 2]
        acc = mid * mid if acc is None else torch.addcmul(acc, mid, mid)
    return acc


def exp(u: Series, K: int) -> Series:
    """y = e^u: y_0 = e^{u_0}, y_k = (1/k) Σ_{j=1..k} j u_j y_{k−j} (docs/math.md §2)."""
    return _self_integrate(u, K, torch.exp(u[0]), lambda y, k: y[k])


def expm1(u: Series, K: int) -> Series:
    y = exp(u, K)
    return [torch.expm1(u[0])] + y[1:]


def log(u: Series, K: int) -> Series:
    """y = ln u: y_k = (u_k − (1/k) Σ_{j=1..k−1} j y_j u_{k−j}) / u_0 (docs/math.md §2)."""
    nu = _len(u, K)
    inv0 = 1.0 / u[0]
    y = [torch.log(u[0])]
    for k in range(1, K + 1):
        acc = None
        for j in range(max(1, k - nu + 1), k):
            term = (j * y[j]) * u[k - j]
            acc = term if acc is None else acc + term
        uk = _get(u, k)
        if acc is not None:
            acc = acc / k
            num = -acc if uk is None else uk - acc
        else:
            num = uk
        y.append(torch.zeros_like(inv0) if num is None else num * inv0)
    return y


def log1p(u: Series, K: int) -> Series:
    one_plus = [1 + u[0]] + list(u[1:])
    y = log(one_plus, K)
    return [torch.log1p(u[0])] + y[1:]


def pow_scalar(u: Series, r: float, K: int, y0: Optional[Tensor] = None) -> Series:
    """y = u^r: y_k = (1/(k·u_0)) Σ_{j=0..k−1} (r(k−j) − j) u_{k−j} y_j (docs/math.md §2, power).

    Integer r ≥ 0 uses repeated Cauchy products instead (exact at u_0 = 0, e.g. x² at 0).
    """
    r = float(r)
    if r == 0.0:
        return [torch.ones_like(u[0])]
    if r == 1.0:
        return list(u[: K + 1])
    if r == 2.0:
        return square(u, K)
    if r.is_integer() and 0 < r <= 8:
        return pow_int(u, int(r), K)
    nu = _len(u, K)
    inv0 = 1.0 / u[0]
    y = [torch.pow(u[0], r) if y0 is None else y0]
    for k in range(1, K + 1):
        acc = None
        for j in range(max(0, k - nu + 1), k):
            c = r * (k - j) - j
            if c == 0:
                continue
            term = (c * u[k - j]) * y[j]
            acc = term if acc is None else acc + term
        y.append(torch.zeros_like(inv0) if acc is None else acc * inv0 / k)
    return y


def pow_int(u: Series, e: int, K: int) -> Series:
    """y = u^e for an integer e ≥ 0 by binary exponentiation with Cauchy products: exact at
    u_0 = 0, where the recurrence of :func:`pow_scalar` would divide by zero."""
    if e == 0:
        return [torch.ones_like(u[0])]
    result: Optional[Series] = None
    base = list(u[: K + 1])
    while e:
        if e & 1:
            result = base if result is None else mul(result, base, K)
        e >>= 1
        if e:
            base = square(base, K)
    return result  # type: ignore[return-value]


def pow_tensor(u: Series, r: Tensor, K: int) -> Series:
    """y = u^r for a tensor of exponents r (elementwise, u_0 ≠ 0): the recurrence of
    :func:`pow_scalar`, y_k = (1/(k·u_0)) Σ_{j=0..k−1} (r(k−j) − j) u_{k−j} y_j."""
    nu = _len(u, K)
    inv0 = 1.0 / u[0]
    y = [torch.pow(u[0], r)]
    for k in range(1, K + 1):
        acc = None
        for j in range(max(0, k - nu + 1), k):
            term = ((r * (k - j) - j) * u[k - j]) * y[j]
            acc = term if acc is None else acc + term
        y.append(torch.zeros_like(y[0]) if acc is None else acc * inv0 / k)
    return y


def sqrt(u: Series, K: int) -> Series:
    return pow_scalar(u, 0.5, K, y0=torch.sqrt(u[0]))


def rsqrt(u: Series, K: int) -> Series:
    return pow_scalar(u, -0.5, K, y0=torch.rsqrt(u[0]))


def _tanh_z(y: Series, k: int) -> Tensor:
    return 1 - y[0] * y[0] if k == 0 else -square_coefficient(y, k)


def _sigmoid_w(s: Series, k: int) -> Tensor:
    return s[0] * (1 - s[0]) if k == 0 else s[k] - square_coefficient(s, k)


def tanh(u: Series, K: int) -> Series:
    """y = tanh u, z = 1 − y²: y_k = (1/k) Σ j u_j z_{k−j}, z_k = −Σ_j y_j y_{k−j} (docs/math.md §2)."""
    return _self_integrate(u, K, torch.tanh(u[0]), _tanh_z)


def tanh_with_derivative(u: Series, K: int) -> tuple:
    """(tanh u, 1 − tanh² u) jets, both to order K, from one recurrence."""
    return _self_integrate(u, K, torch.tanh(u[0]), _tanh_z, with_g=True)


def sigmoid(u: Series, K: int) -> Series:
    """s = σ(u), w = s(1 − s): s_k = (1/k) Σ j u_j w_{k−j}, w_k = s_k − Σ_j s_j s_{k−j} (docs/math.md §2)."""
    return _self_integrate(u, K, torch.sigmoid(u[0]), _sigmoid_w)


def sigmoid_with_derivative(u: Series, K: int) -> tuple:
    """(σ(u), σ(u)(1 − σ(u))) jets, both to order K, from one recurrence."""
    return _self_integrate(u, K, torch.sigmoid(u[0]), _sigmoid_w, with_g=True)


def sin_cos(u: Series, K: int):
    """s_k = (1/k) Σ j u_j c_{k−j}, c_k = −(1/k) Σ j u_j s_{k−j} (docs/math.md §2)."""
    nu = _len(u, K)
    s, c = [torch.sin(u[0])], [torch.cos(u[0])]
    for k in range(1, K + 1):
        sa = ca = None
        for j in range(1, min(k, nu - 1) + 1):
            ju = u[j] if j == 1 else j * u[j]
            ts, tc = ju * c[k - j], ju * s[k - j]
            sa = ts if sa is None else sa + ts
            ca = tc if ca is None else ca + tc
        zero = torch.zeros_like(s[0])
        s.append(zero if sa is None else sa / k)
        c.append(zero if ca is None else -ca / k)
    return s, c


def sin(u: Series, K: int) -> Series:
    return sin_cos(u, K)[0]


def cos(u: Series, K: int) -> Series:
    return sin_cos(u, K)[1]


def softplus(u: Series, K: int, beta: float = 1.0, threshold: float = 20.0) -> Series:
    """y = (1/β) log(1 + e^{βu}): y_k = (1/k) Σ j u_j σ(βu)_{k−j} (docs/math.md §2).

    Like torch, the function is the identity where β·u_0 > threshold (all coefficients pass).
    """
    bu = scale(u, beta, K) if beta != 1.0 else u
    sig = sigmoid(bu, K - 1) if K >= 1 else []
    y0 = torch.nn.functional.softplus(u[0], beta=beta, threshold=threshold)
    y = integrate(u, sig, K, y0)
    linear = (beta * u[0]) > threshold
    return [torch.where(linear, _get(u, k) if _get(u, k) is not None else torch.zeros_like(u[0]), yk)
            if k > 0 else yk for k, yk in enumerate(y)]


def erf(u: Series, K: int) -> Series:
    """g = exp(−u²), e_k = (2/√π)(1/k) Σ j u_j g_{k−j} (docs/math.md §2)."""
    if K == 0:
        return [torch.erf(u[0])]
    g = exp(neg(square(u, K - 1), K - 1), K - 1)
    g = scale(g, 2.0 / math.sqrt(math.pi), K - 1)
    return integrate(u, g, K, torch.erf(u[0]))


def atan(u: Series, K: int) -> Series:
    """y' = u'/(1 + u²)."""
    if K == 0:
        return [torch.atan(u[0])]
    one_plus_sq = add([torch.ones_like(u[0])], square(u, K - 1), K - 1)
    g = reciprocal(one_plus_sq, K - 1)
    return integrate(u, g, K, torch.atan(u[0]))


def gelu(u: Series, K: int) -> Series:
    """GELU = u·Φ(u), Φ = ½(1 + erf(u/√2)) (docs/math.md §2)."""
    e = erf(scale(u, 1.0 / math.sqrt(2.0), K), K)
    phi = [0.5 * (1 + e[0])] + [0.5 * x for x in e[1:]]
    y = mul(u, phi, K)
    y[0] = torch.nn.functional.gelu(u[0])
    return y


def gelu_tanh(u: Series, K: int) -> Series:
    """tanh-GELU = ½u(1 + tanh(√(2/π)(u + 0.044715u³))) (docs/math.md §2)."""
    c = math.sqrt(2.0 / math.pi)
    cube = mul(square(u, K), u, K)
    inner = scale(add(u, cube, K, alpha=0.044715), c, K)
    th = tanh(inner, K)
    half = [0.5 * (1 + th[0])] + [0.5 * x for x in th[1:]]
    y = mul(u, half, K)
    y[0] = torch.nn.functional.gelu(u[0], approximate="tanh")
    return y


def silu(u: Series, K: int) -> Series:
    """SiLU = u·σ(u) (docs/math.md §2, Cauchy product with the sigmoid jet)."""
    y = mul(u, sigmoid(u, K), K)
    y[0] = torch.nn.functional.silu(u[0])
    return y


def elu(u: Series, K: int, alpha: float = 1.0, scale_: float = 1.0, input_scale: float = 1.0) -> Series:
    """ELU/SELU/CELU family: scale·u for u_0 > 0, scale·α(e^{input_scale·u} − 1) otherwise."""
    ex = exp(scale(u, input_scale, K) if input_scale != 1.0 else u, K)
    pos = u[0] > 0
    y0 = torch.where(pos, u[0], alpha * torch.expm1(input_scale * u[0]))
    out = [y0 * scale_]
    for k in range(1, len(ex)):
        lin = _get(u, k)
        lin = torch.zeros_like(u[0]) if lin is None else lin
        out.append(scale_ * torch.where(pos, lin, alpha * ex[k]))
    return out


def sinh_cosh(u: Series, K: int):
    """sh_k = (1/k) Σ_{j=1..k} j u_j ch_{k−j}, ch_k = (1/k) Σ j u_j sh_{k−j} from sinh(u_0),
    cosh(u_0): no cancellation near u_0 = 0 (unlike (e^u − e^{−u})/2)."""
    nu = _len(u, K)
    ju = _scaled_terms(u, nu)
    s, c = [torch.sinh(u[0])], [torch.cosh(u[0])]
    for k in range(1, K + 1):
        sa = _dot((ju[j], c[k - j]) for j in range(1, min(k, nu - 1) + 1))
        ca = _dot((ju[j], s[k - j]) for j in range(1, min(k, nu - 1) + 1))
        zero = torch.zeros_like(s[0])
        s.append(zero if sa is None else sa / k)
        c.append(zero if ca is None else ca / k)
    return s, c


def tan(u: Series, K: int) -> Series:
    """y = tan u: y′ = (1 + y²)·u′, g_k = [k = 0] + (y²)_k interleaved with y (docs/math.md §2)."""
    return _self_integrate(u, K, torch.tan(u[0]),
                           lambda y, k: 1 + y[0] * y[0] if k == 0 else square_coefficient(y, k))
