"""Fused jet of an elementwise activation: all K+1 normalized Taylor coefficients in one pass.

Layout: a jet of a tensor of shape S and order K is one stacked tensor of shape (K+1, *S); the
launchers see it as a 2-D (rows = coefficients, N = numel(S) columns) array with unit column stride.
The input may store fewer coefficients (n+1 ≤ K+1 rows): the missing ones are known zeros and the
kernel skips every term that contains them (``NU`` is a constexpr).

Forward (docs/math.md §2, normalized coefficients, k = 1..K, one program = BLOCK columns, every row):

- tanh      y = tanh u, z = 1 − y²:   y_k = (1/k) Σ_{j=1..k} j u_j z_{k−j},  z_k = −Σ_{j=0..k} y_j y_{k−j}
- sigmoid   s = σ(u), w = s(1 − s):   s_k = (1/k) Σ j u_j w_{k−j},           w_k = s_k − Σ_j s_j s_{k−j}
- softplus  y = log(1 + e^{βu})/β:    y_k = (1/k) Σ j u_j σ(βu)_{k−j}; identity where β·u_0 > threshold
- silu      y = u·σ(u) (Cauchy product with the sigmoid jet)
- gelu      y = u·Φ(u), Φ' = ϕ = e^{−u²/2}/√(2π):  e = exp(−u²/2) via e_k = −(1/k) Σ j u_j (u·e)_{k−j},
            Φ_k = (1/k) Σ j u_j ϕ_{k−j},  Φ_0 = ½(1 + erf(u_0/√2))
- gelu_tanh y = ½u(1 + tanh v), v = √(2/π)(u + 0.044715u³): tanh rule on the jet of v, then Cauchy
- relu / leaky_relu   y_k = u_k·[u_0 > 0] + slope·u_k·[u_0 ≤ 0]  (all k, including k = 0)
- identity  y = u (with a bias this is the plain bias epilogue)

Backward (exact): for any smooth scalar φ, perturbing u_j by ε adds ε·t^j to u(t), hence
y(t) gains ε·t^j·φ'(u(t)):  ∂y_k/∂u_j = g_{k−j}, where g is the jet of φ'(u) (for j = 0 too).
So  ∂L/∂u_j = Σ_{k=j..K} (∂L/∂y_k)·g_{k−j},  a transposed Cauchy product. The kernels recompute the
jet g of φ'(u) with the same recurrences (for tanh g = z, for sigmoid g = w, for softplus g = σ(βu),
for SiLU g = σ + u·w, for GELU g = Φ + u·ϕ, for tanh-GELU g = ½(1 + tanh v) + ½u(1 − tanh² v)v',
for the piecewise-linear ones g = (mask, 0, ..., 0)), so nothing but the input is saved.

Accuracy (fp32, without tl.extra.libdevice): tanh(x) = sign(x)(1 − e^{−2|x|})/(1 + e^{−2|x|}) with an odd Taylor
polynomial for |x| < 0.125 (no cancellation), 1 − tanh² = 4e/(1 + e)², σ and σ(1 − σ) from e^{−|x|},
log1p by the Goldberg trick, erf by ``tl.erf`` (libdevice ``erff`` on CUDA, ``math.erf`` in the
interpreter).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..activation_kinds import ACTIVATIONS as _TABLE
from ..activation_kinds import MAX_KERNEL_ORDER

try:
    from torch.library import wrap_triton
except ImportError:  # a torch without it (setup.py allows torch>=2.4): launch the kernels directly;
    # functions/_ops.py then registers plain custom ops, which torch.compile treats as opaque
    def wrap_triton(kernel):
        return kernel

__all__ = ["ACTIVATIONS", "MAX_ORDER", "activation_code", "activation_jet_fwd", "activation_jet_bwd",
           "INTERPRET", "AUTOTUNE", "FWD_CONFIGS", "BWD_CONFIGS"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: ``CURVRATE_TRITON_AUTOTUNE=0`` (read at import) keeps only the first config of every GPU config
#: space: one compilation per kernel variant instead of one per config. For correctness runs on a GPU
#: with little time (bench/gpu_check.py's test section), where compiling every config of every
#: variant the tests meet would take minutes; the results are the same, only slower kernels may run.
AUTOTUNE = os.environ.get("CURVRATE_TRITON_AUTOTUNE", "1") not in ("0", "false", "False")

#: activation name -> the ``ACT`` constexpr of the kernels
ACTIVATIONS = {name: act.code for name, act in _TABLE.items()}

#: the kernels unroll O(K²) terms; orders above this take the reference path
MAX_ORDER = MAX_KERNEL_ORDER

# -- config space (data) -------------------------------------------------------------------------
# Memory-bound: every program reads NU and writes K+1 rows of BLOCK fp32-computed values; about
# 3(K+1) live fp32 vectors per element, so large K wants fewer elements per thread.
_GPU_CONFIGS = [(256, 2), (512, 4), (1024, 4), (1024, 8), (2048, 8)]
_INTERPRET_CONFIGS = [(128, 1)]  # the interpreter: one config, few programs


def _configs():
    space = _INTERPRET_CONFIGS if INTERPRET else _GPU_CONFIGS if AUTOTUNE else _GPU_CONFIGS[:1]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in space]


FWD_CONFIGS = _configs()
BWD_CONFIGS = _configs()
# tuned once per activation, order, stored length, bias flag, dtypes and size bucket (log2 of N,
# passed as the otherwise unused, unspecialized argument N_BUCKET)
_AUTOTUNE_KEY = ["ACT", "K", "NU", "HAS_BIAS", "N_BUCKET"]


# -- scalar helpers (fp32) -----------------------------------------------------------------------
@triton.jit
def _tanh_parts(x):
    """(tanh x, 1 − tanh² x, 1 + tanh x), each without cancellation."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    d = 1.0 + e
    big = (1.0 - e) / d
    x2 = x * x
    # odd Taylor polynomial, |x| < 0.125: truncation < 1e-11 relative
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                 + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(ax < 0.125, small, tl.where(x < 0.0, -big, big))
    sech2 = 4.0 * e / (d * d)
    one_plus = 2.0 * tl.where(x >= 0.0, 1.0 / d, e / d)  # 1 + tanh x = 2σ(2x)
    return t, sech2, one_plus


@triton.jit
def _sigmoid_parts(x):
    """(σ(x), σ(x)σ(−x)), stable for any sign of x."""
    e = tl.exp(-tl.abs(x))
    d = 1.0 + e
    s = tl.where(x >= 0.0, 1.0 / d, e / d)
    return s, e / (d * d)


@triton.jit
def _log1p(x):
    """log(1 + x) for x ≥ 0 accurate to a few ulp (Goldberg: log(w)·x/(w − 1), w = fl(1 + x))."""
    w = 1.0 + x
    den = tl.where(w == 1.0, 1.0, w - 1.0)
    return tl.where(w == 1.0, x, tl.log(w) * (x / den))


# -- series helpers on tuples of BLOCK vectors ----------------------------------------------------
@triton.jit
def _sum_ju_g(u, g, k: tl.constexpr, NU: tl.constexpr):
    """(1/k) Σ_{j=1..k} j·u_j·g_{k−j}, skipping the known-zero u_j (j ≥ NU)."""
    acc = tl.zeros_like(g[0])
    for j in tl.static_range(1, k + 1):
        if j < NU:
            if j == 1:
                acc += u[j] * g[k - j]
            else:
                acc += (j * u[j]) * g[k - j]
    return acc * (1.0 / k)


@triton.jit
def _cauchy(a, b, k: tl.constexpr, NA: tl.constexpr, NB: tl.constexpr):
    """(ab)_k = Σ_{j=0..k} a_j b_{k−j}, with a_j = 0 for j ≥ NA and b_j = 0 for j ≥ NB."""
    acc = tl.zeros_like(b[0])
    for j in tl.static_range(0, k + 1):
        if j < NA:
            if k - j < NB:
                acc += a[j] * b[k - j]
    return acc


# -- one jet rule per activation: returns (y, g), g the jet of φ'(u), both K+1 long --------------
@triton.jit
def _tanh_jet(u, K: tl.constexpr, NU: tl.constexpr):
    y0, z0, _ = _tanh_parts(u[0])
    y = (y0,)
    z = (z0,)
    for k in tl.static_range(1, K + 1):
        y = y + (_sum_ju_g(u, z, k, NU),)
        z = z + (-_cauchy(y, y, k, k + 1, k + 1),)
    return y, z


@triton.jit
def _sigmoid_jet(u, K: tl.constexpr, NU: tl.constexpr):
    s0, w0 = _sigmoid_parts(u[0])
    s = (s0,)
    w = (w0,)
    for k in tl.static_range(1, K + 1):
        s = s + (_sum_ju_g(u, w, k, NU),)
        w = w + (s[k] - _cauchy(s, s, k, k + 1, k + 1),)
    return s, w


@triton.jit
def _softplus_jet(u, K: tl.constexpr, NU: tl.constexpr, beta, threshold):
    bx = beta * u[0]
    s0, w0 = _sigmoid_parts(bx)
    s = (s0,)  # σ(βu)
    w = (w0,)  # σ(βu)(1 − σ(βu))
    y0 = (tl.maximum(bx, 0.0) + _log1p(tl.exp(-tl.abs(bx)))) / beta
    y = (y0,)
    for k in tl.static_range(1, K + 1):
        y = y + (_sum_ju_g(u, s, k, NU),)
        s = s + (beta * _sum_ju_g(u, w, k, NU),)
        w = w + (s[k] - _cauchy(s, s, k, k + 1, k + 1),)
    linear = bx > threshold
    yo = (tl.where(linear, u[0], y[0]),)
    go = (tl.where(linear, 1.0, s[0]),)
    for k in tl.static_range(1, K + 1):
        yo = yo + (tl.where(linear, u[k], y[k]),)
        go = go + (tl.where(linear, 0.0, s[k]),)
    return yo, go


@triton.jit
def _silu_jet(u, K: tl.constexpr, NU: tl.constexpr):
    s, w = _sigmoid_jet(u, K, NU)
    y = (u[0] * s[0],)
    g = (s[0] + u[0] * w[0],)
    for k in tl.static_range(1, K + 1):
        y = y + (_cauchy(u, s, k, NU, K + 1),)
        g = g + (s[k] + _cauchy(u, w, k, NU, K + 1),)
    return y, g


@triton.jit
def _gelu_jet(u, K: tl.constexpr, NU: tl.constexpr):
    INV_SQRT_2PI: tl.constexpr = 0.3989422804014327
    INV_SQRT2: tl.constexpr = 0.7071067811865476
    e0 = tl.exp(-0.5 * u[0] * u[0])  # exp(−u²/2)
    e = (e0,)
    q = (u[0] * e0,)  # q = u·e
    Phi = (0.5 * (1.0 + tl.erf(u[0] * INV_SQRT2)),)
    for k in tl.static_range(1, K + 1):
        e = e + (-_sum_ju_g(u, q, k, NU),)
        q = q + (_cauchy(u, e, k, NU, k + 1),)
        Phi = Phi + (INV_SQRT_2PI * _sum_ju_g(u, e, k, NU),)
    y = (u[0] * Phi[0],)
    g = (Phi[0] + INV_SQRT_2PI * q[0],)
    for k in tl.static_range(1, K + 1):
        y = y + (_cauchy(u, Phi, k, NU, K + 1),)
        g = g + (Phi[k] + INV_SQRT_2PI * q[k],)
    return y, g


@triton.jit
def _gelu_tanh_jet(u, K: tl.constexpr, NU: tl.constexpr):
    C0: tl.constexpr = 0.7978845608028654  # √(2/π)
    A: tl.constexpr = 0.044715
    # u², u³ and v = C0(u + A u³)
    u2 = (u[0] * u[0],)
    for k in tl.static_range(1, K + 1):
        u2 = u2 + (_cauchy(u, u, k, NU, NU),)
    u3 = (u2[0] * u[0],)
    for k in tl.static_range(1, K + 1):
        u3 = u3 + (_cauchy(u2, u, k, K + 1, NU),)
    v = (C0 * (u[0] + A * u3[0]),)
    for k in tl.static_range(1, K + 1):
        if k < NU:
            v = v + (C0 * (u[k] + A * u3[k]),)
        else:
            v = v + ((C0 * A) * u3[k],)
    th0, z0, one_plus0 = _tanh_parts(v[0])
    th = (th0,)
    z = (z0,)
    for k in tl.static_range(1, K + 1):
        th = th + (_sum_ju_g(v, z, k, K + 1),)
        z = z + (-_cauchy(th, th, k, k + 1, k + 1),)
    # h = ½(1 + tanh v); y = u·h
    h = (0.5 * one_plus0,)
    for k in tl.static_range(1, K + 1):
        h = h + (0.5 * th[k],)
    # g = h + ½ (u·z)·v',  v' = C0(1 + 3A u²)
    uz = (u[0] * z[0],)
    dv = (C0 * (1.0 + 3.0 * A * u2[0]),)
    for k in tl.static_range(1, K + 1):
        uz = uz + (_cauchy(u, z, k, NU, K + 1),)
        dv = dv + ((3.0 * A * C0) * u2[k],)
    y = (u[0] * h[0],)
    g = (h[0] + 0.5 * uz[0] * dv[0],)
    for k in tl.static_range(1, K + 1):
        y = y + (_cauchy(u, h, k, NU, K + 1),)
        g = g + (h[k] + 0.5 * _cauchy(uz, dv, k, K + 1, K + 1),)
    return y, g


@triton.jit
def _piecewise_linear_jet(u, K: tl.constexpr, slope):
    """ReLU (slope 0), leaky ReLU, identity (slope 1): y_k = u_k·m, m = [u_0 > 0] + slope·[u_0 ≤ 0]."""
    m = tl.where(u[0] > 0.0, 1.0, slope)
    y = (u[0] * m,)
    g = (m,)
    for k in tl.static_range(1, K + 1):
        y = y + (u[k] * m,)
        g = g + (tl.zeros_like(m),)
    return y, g


@triton.jit
def _activation_jet(u, ACT: tl.constexpr, K: tl.constexpr, NU: tl.constexpr, p0, p1):
    """Dispatch on the constexpr ACT (see ``ACTIVATIONS``): returns (y, g), K+1 vectors each."""
    if ACT == 0:
        y, g = _tanh_jet(u, K, NU)
    elif ACT == 1:
        y, g = _sigmoid_jet(u, K, NU)
    elif ACT == 2:
        y, g = _gelu_jet(u, K, NU)
    elif ACT == 3:
        y, g = _gelu_tanh_jet(u, K, NU)
    elif ACT == 4:
        y, g = _silu_jet(u, K, NU)
    elif ACT == 5:
        y, g = _softplus_jet(u, K, NU, p0, p1)
    elif ACT == 6:
        y, g = _piecewise_linear_jet(u, K, 0.0)
    elif ACT == 7:
        y, g = _piecewise_linear_jet(u, K, p0)
    else:
        y, g = _piecewise_linear_jet(u, K, 1.0)
    return y, g


@triton.jit
def _input_coeff_grad(gy, g, j: tl.constexpr, K: tl.constexpr):
    """∂L/∂u_j = Σ_{k=j..K} (∂L/∂y_k)·g_{k−j}: the transposed Cauchy product of the backward
    (∂y_k/∂u_j = g_{k−j}, g the jet of φ'(u); module docstring)."""
    acc = gy[j] * g[0]
    for k in tl.static_range(j + 1, K + 1):
        acc += gy[k] * g[k - j]
    return acc


@triton.jit
def _load_input_jet(x_ptr, b_ptr, sx, offs, mask, C, INNER, K: tl.constexpr, NU: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows 0..NU−1 of x (row stride sx) as fp32, zeros for rows NU..K, bias added to row 0."""
    p = x_ptr + offs
    u0 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        ch = (offs // INNER) % C
        u0 += tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    u = (u0,)
    for k in tl.static_range(1, K + 1):
        if k < NU:
            p += sx
            u = u + (tl.load(p, mask=mask, other=0.0).to(tl.float32),)
        else:
            u = u + (tl.zeros([BLOCK], dtype=tl.float32),)
    return u


@triton.autotune(configs=FWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["N_BUCKET"])
def activation_jet_fwd_kernel(x_ptr, b_ptr, y_ptr, N, sx, sy, C, INNER, p0, p1, N_BUCKET,
                              ACT: tl.constexpr, K: tl.constexpr, NU: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = φ(u) as jets: reads the NU stored rows of x (+ bias on row 0), writes K+1 rows of y.

    x: (NU, N) row stride sx, y: (K+1, N) row stride sy, unit column stride. The per-activation
    recurrences are those of docs/math.md §2 (see the module docstring); ``p0, p1`` are the activation's
    parameters (softplus: β, threshold; leaky ReLU: negative slope). Bias (HAS_BIAS): bias[c] with
    c = (col // INNER) % C is added to coefficient 0 only (docs/math.md §2, linear maps).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    u = _load_input_jet(x_ptr, b_ptr, sx, offs, mask, C, INNER, K, NU, HAS_BIAS, BLOCK)
    y, g = _activation_jet(u, ACT, K, NU, p0, p1)
    q = y_ptr + offs
    for k in tl.static_range(K + 1):
        tl.store(q, y[k].to(y_ptr.dtype.element_ty), mask=mask)
        q += sy


@triton.autotune(configs=BWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["N_BUCKET"])
def activation_jet_bwd_kernel(x_ptr, b_ptr, gy_ptr, gx_ptr, N, sx, sgy, sgx, C, INNER, p0, p1, N_BUCKET,
                              ACT: tl.constexpr, K: tl.constexpr, NU: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Gradient of the activation jet: ∂L/∂u_j = Σ_{k=j..K} (∂L/∂y_k)·g_{k−j}, j < NU.

    g is the jet of φ'(u) (recomputed from x with the forward recurrences); exact because
    ∂y_k/∂u_j = g_{k−j} (module docstring). gy: (K+1, N), gx: (NU, N). The gradient of the bias is
    the reduction of row 0 of gx over the non-channel positions (done by the launcher's caller).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    u = _load_input_jet(x_ptr, b_ptr, sx, offs, mask, C, INNER, K, NU, HAS_BIAS, BLOCK)
    y, g = _activation_jet(u, ACT, K, NU, p0, p1)
    q = gy_ptr + offs
    gy = (tl.load(q, mask=mask, other=0.0).to(tl.float32),)
    for _k in tl.static_range(1, K + 1):
        q += sgy
        gy = gy + (tl.load(q, mask=mask, other=0.0).to(tl.float32),)
    o = gx_ptr + offs
    for j in tl.static_range(NU):
        tl.store(o, _input_coeff_grad(gy, g, j, K).to(gx_ptr.dtype.element_ty), mask=mask)
        o += sgx


# -- launchers -----------------------------------------------------------------------------------
def activation_code(kind: str) -> int:
    try:
        return ACTIVATIONS[kind]
    except KeyError:
        raise ValueError(f"unknown activation {kind!r}; the fused kernel supports {sorted(ACTIVATIONS)}") from None


def _bucket(n: int) -> int:
    """Autotuning size bucket: ⌈log2 n⌉."""
    return max(int(n) - 1, 0).bit_length()


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """View (R, *S) as (R, N) with unit column stride (copies only when it must)."""
    if t.dim() < 1:
        raise ValueError(f"{name} needs a leading coefficient axis, got a 0-d tensor")
    r = t.reshape(t.shape[0], -1)
    if r.shape[1] > 1 and r.stride(1) != 1:
        r = r.contiguous()
    return r


def _out_rows(out: torch.Tensor, shape, like: torch.Tensor, name: str) -> torch.Tensor:
    """A caller-supplied output: right shape/dtype/device and viewable as rows with unit column
    stride (any row stride), so the kernel writes straight into it."""
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must be a {like.dtype} tensor of shape {tuple(shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    try:
        r = out.view(shape[0], -1)
    except RuntimeError:
        raise ValueError(f"{name} must be viewable as ({shape[0]}, N) rows") from None
    if r.shape[1] > 1 and r.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride within a coefficient")
    return r


def _check(x: torch.Tensor, order: int, bias: Optional[torch.Tensor], channels: int, inner: int):
    if not (0 <= order <= MAX_ORDER):
        raise ValueError(f"order must be in 0..{MAX_ORDER} for the fused kernel, got {order}")
    if not x.is_floating_point():
        raise TypeError(f"the activation jet needs a floating-point tensor, got {x.dtype}")
    if bias is not None:
        if bias.dim() != 1 or bias.numel() != channels:
            raise ValueError(f"bias must have shape ({channels},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device}, the jet on {x.device}")
        numel = x[0].numel()
        if inner < 1 or numel % (channels * inner) != 0:
            raise ValueError(f"{numel} elements per coefficient do not split into "
                             f"(outer, C={channels}, inner={inner})")


def activation_jet_fwd(x: torch.Tensor, order: int, kind: str, p0: float = 0.0, p1: float = 0.0,
                       bias: Optional[torch.Tensor] = None, channels: int = 1, inner: int = 1,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the forward kernel: x (n+1, *S), n+1 ≤ order+1 stored coefficients → (order+1, *S).

    ``bias`` (C,) is added to coefficient 0 at channel (flat index // inner) % channels. ``out``:
    an optional (order+1, *S) destination (tests pass NaN-poisoned buffers).
    """
    _check(x, order, bias, channels, inner)
    x = x[: order + 1]
    nu = x.shape[0]
    x2 = _as_rows(x, "x")
    N = x2.shape[1]
    shape = (order + 1,) + tuple(x.shape[1:])
    if out is None:
        y = torch.empty(shape, dtype=x.dtype, device=x.device)
        y2 = y.view(order + 1, N)
    else:
        y, y2 = out, _out_rows(out, shape, x, "out")
    if N == 0:
        return y
    b = bias.contiguous() if bias is not None else x2  # dummy pointer when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK"]),)

    wrap_triton(activation_jet_fwd_kernel)[grid](
        x_ptr=x2, b_ptr=b, y_ptr=y2, N=N, sx=x2.stride(0), sy=y2.stride(0), C=channels, INNER=inner,
        p0=float(p0), p1=float(p1), N_BUCKET=_bucket(N), ACT=activation_code(kind), K=order, NU=nu,
        HAS_BIAS=bias is not None)
    return y


def activation_jet_bwd(x: torch.Tensor, grad_y: torch.Tensor, order: int, kind: str, p0: float = 0.0,
                       p1: float = 0.0, bias: Optional[torch.Tensor] = None, channels: int = 1,
                       inner: int = 1, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the backward kernel: the gradient (n+1, *S) w.r.t. the n+1 stored input coefficients
    (w.r.t. x + bias for row 0) given grad_y (order+1, *S)."""
    _check(x, order, bias, channels, inner)
    x = x[: order + 1]
    nu = x.shape[0]
    if grad_y.shape != (order + 1,) + tuple(x.shape[1:]):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, expected {(order + 1,) + tuple(x.shape[1:])}")
    x2 = _as_rows(x, "x")
    gy2 = _as_rows(grad_y, "grad_y")
    N = x2.shape[1]
    if out is None:
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        gx2 = gx.view(nu, N)
    else:
        gx, gx2 = out, _out_rows(out, tuple(x.shape), x, "out")
    if N == 0:
        return gx
    b = bias.contiguous() if bias is not None else x2

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK"]),)

    wrap_triton(activation_jet_bwd_kernel)[grid](
        x_ptr=x2, b_ptr=b, gy_ptr=gy2, gx_ptr=gx2, N=N, sx=x2.stride(0), sgy=gy2.stride(0),
        sgx=gx2.stride(0), C=channels, INNER=inner, p0=float(p0), p1=float(p1), N_BUCKET=_bucket(N),
        ACT=activation_code(kind), K=order, NU=nu, HAS_BIAS=bias is not None)
    return gx
