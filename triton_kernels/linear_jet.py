"""Linear and convolution layers on stacked jets, with the fused bias + activation epilogue.

docs/math.md §2, linear maps: the map is applied to every coefficient, the bias goes to coefficient 0 only,
and all K+1 coefficients go through ONE call (stacked along the batch axis, so the weight is read
once): a (n+1)·B-row GEMM by cuBLAS (``F.linear``), or one cuDNN convolution of (n+1)·B images
(both run by the engine's rules; this module is their epilogue).
The epilogue (:func:`bias_act_epilogue`) is the activation-jet kernel of :mod:`.activation_jet` with
``HAS_BIAS``: it reads the n+1 stored pre-activation rows once, adds bias[c] to coefficient 0 in
registers (the biased pre-activation is never written), applies the activation jet and writes the
K+1 output rows once. With ``kind=None`` (or "identity") it is the bare bias epilogue.

Fused alternative for linear layers (:func:`linear_act_jet_fused`): ONE Triton GEMM whose epilogue
adds the bias to coefficient 0 and applies the activation jet on the accumulator tiles in registers,
so the pre-activation never reaches memory. A program owns a BLOCK_M × BLOCK_N output tile and keeps
one fp32 accumulator per stored input coefficient (NU of them; rows NU..K of the pre-activation are
known zeros, since the map is linear):  acc_j = X_j W^T  (X_j: (M, D), W: (N, D)),  the weight tile is
loaded once per reduction step and reused by all NU coefficient tiles. Then u = (acc_0 + b, acc_1, …,
acc_{NU−1}, 0, …, 0) goes through the same activation-jet recurrences as the elementwise kernel (docs/math.md
§2) and the K+1 output tiles are written once. Which of the two paths is faster depends on the shape
(docs/design.md §2: fuse only where it measures faster); ``curvrate_fast.functions.linear`` measures both per
shape on the GPU and keeps the winner. Its backward (:func:`linear_act_jet_fused_bwd`) recomputes the
pre-activation tiles by the same GEMM and applies the transposed Cauchy product of the activation
backward in the epilogue, writing only ∂L/∂u (nothing but the input jet is saved, u is never stored).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .activation_jet import (
    AUTOTUNE,
    INTERPRET,
    MAX_ORDER,
    _activation_jet,
    _input_coeff_grad,
    activation_code,
    activation_jet_fwd,
    wrap_triton,
)

__all__ = ["channel_layout", "bias_act_epilogue",
           "linear_act_jet_fused", "linear_act_jet_fused_bwd", "linear_act_jet_fused_kernel",
           "linear_act_jet_fused_bwd_kernel", "GEMM_CONFIGS", "dot_precision"]


def channel_layout(shape: Sequence[int], channel_dim: int) -> Tuple[int, int]:
    """(C, inner) of the primal ``shape`` for a bias broadcast along ``channel_dim``: the flat index
    i of an element has channel (i // inner) % C."""
    nd = len(shape)
    if nd == 0:
        raise ValueError("a bias needs a primal of at least one dimension")
    if not -nd <= channel_dim < nd:
        raise ValueError(f"channel_dim {channel_dim} out of range for a primal of shape {tuple(shape)}")
    cd = channel_dim % nd
    return int(shape[cd]), int(math.prod(shape[cd + 1:]))


def bias_act_epilogue(pre: torch.Tensor, bias: Optional[torch.Tensor], kind: Optional[str], order: int,
                      channel_dim: int = -1, p0: float = 0.0, p1: float = 0.0) -> torch.Tensor:
    """pre (n+1, *S) → (order+1, *S): bias (C,) added to coefficient 0 along ``channel_dim`` of S,
    then the activation jet ``kind`` (None: identity), in one pass."""
    if bias is not None:
        C, inner = channel_layout(pre.shape[1:], channel_dim)
    else:
        C, inner = 1, 1
    return activation_jet_fwd(pre, order, kind or "identity", p0, p1, bias=bias, channels=C, inner=inner)


# -- fused GEMM + activation-jet epilogue ----------------------------------------------------------
# Compute-bound main loop, register-heavy epilogue: the K+1 output tiles, the K+1 tiles of the jet of
# φ' and the input tiles are all live at once, so tiles stay small enough that the epilogue fits in
# registers (BLOCK_M·BLOCK_N / (32·warps) fp32 values per tile and thread).
_GEMM_GPU_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages)
    (32, 64, 32, 4, 4), (32, 64, 32, 8, 3), (64, 64, 32, 8, 3), (32, 128, 32, 8, 3), (64, 128, 32, 8, 3),
    (16, 64, 64, 4, 4),
]
# the backward also holds the K+1 output-gradient tiles: smaller tiles per warp (ptxas, sm_90, K = 4:
# 128×64 and 64×128 at 8 warps spill ~1 KB per thread)
_GEMM_BWD_GPU_CONFIGS = [(32, 64, 32, 8, 3), (32, 32, 32, 4, 3), (16, 64, 32, 4, 3), (32, 128, 32, 8, 3),
                         (16, 128, 32, 8, 3)]
_GEMM_INTERPRET_CONFIGS = [(32, 32, 16, 1, 1)]


def _gemm_configs(gpu_space):
    space = _GEMM_INTERPRET_CONFIGS if INTERPRET else gpu_space if AUTOTUNE else gpu_space[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, d, w, s in space]


GEMM_CONFIGS = _gemm_configs(_GEMM_GPU_CONFIGS)
GEMM_BWD_CONFIGS = _gemm_configs(_GEMM_BWD_GPU_CONFIGS)


@triton.jit
def _gemm_tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M consecutive row tiles sweep the column tiles together, so the
    weight tiles they share stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _pre_activation_tiles(x_ptr, w_ptr, b_ptr, M, N, D, sxk, sxm, sxd, swn, swd,
                          K: tl.constexpr, NU: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's BLOCK_M × BLOCK_N tile of the pre-activation jet u = X Wᵀ (+ b on u_0), as K+1
    fp32 register tiles (rows NU..K zero), with its row and column indices and masks.
    One accumulator per stored coefficient; each weight tile is loaded once per reduction step and
    used by all NU coefficient tiles (the weight reuse of stacking, docs/math.md §2 linear maps).
    UPCAST: fp32 operands for ``tl.dot`` (only the interpreter needs it, for bf16, which it cannot
    multiply; on a GPU fp16/bf16 go to the tensor cores as they are)."""
    pid_m, pid_n = _gemm_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < M
    n_ok = rn < N
    xp = x_ptr + rm[:, None] * sxm + rd[None, :] * sxd
    wp = w_ptr + rd[:, None] * swd + rn[None, :] * swn  # the Wᵀ tile (BLOCK_D, BLOCK_N)
    acc = (tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),)
    for _j in tl.static_range(1, NU):
        acc = acc + (tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + rd) < D
        w = tl.load(wp, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        step = ()
        for j in tl.static_range(NU):
            xj = tl.load(xp + j * sxk, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                xj = xj.to(tl.float32)
            step = step + (tl.dot(xj, w, acc[j], input_precision=DOT_PRECISION),)
        acc = step
        xp += BLOCK_D * sxd
        wp += BLOCK_D * swd
    u0 = acc[0]
    if HAS_BIAS:
        u0 += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    u = (u0,)
    for k in tl.static_range(1, K + 1):
        if k < NU:
            u = u + (acc[k],)
        else:
            u = u + (tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),)
    return u, rm, rn, m_ok, n_ok


@triton.autotune(configs=GEMM_CONFIGS, key=["ACT", "K", "NU", "HAS_BIAS", "M_BUCKET", "N", "D"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def linear_act_jet_fused_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, D, sxk, sxm, sxd, swn, swd, syk, sym,
                                p0, p1, M_BUCKET,
                                ACT: tl.constexpr, K: tl.constexpr, NU: tl.constexpr, HAS_BIAS: tl.constexpr,
                                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr):
    """y = φ(X Wᵀ + b) as jets in one GEMM: X (NU, M, D) strides (sxk, sxm, sxd), W (N, D) strides
    (swn, swd), y (K+1, M, N) strides (syk, sym, 1). Coefficient j < NU of the pre-activation is
    acc_j = X_j Wᵀ (docs/math.md §2, linear maps; the bias joins coefficient 0 only), rows NU..K are zeros;
    the epilogue is the activation-jet recurrence of :mod:`.activation_jet` on the register tiles."""
    u, rm, rn, m_ok, n_ok = _pre_activation_tiles(x_ptr, w_ptr, b_ptr, M, N, D, sxk, sxm, sxd, swn, swd, K, NU,
                                                  HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D,
                                                  GROUP_M)
    y, _g = _activation_jet(u, ACT, K, NU, p0, p1)
    q = y_ptr + rm[:, None] * sym + rn[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    for k in tl.static_range(K + 1):
        tl.store(q, y[k].to(y_ptr.dtype.element_ty), mask=out_ok)
        q += syk


@triton.autotune(configs=GEMM_BWD_CONFIGS, key=["ACT", "K", "NU", "HAS_BIAS", "M_BUCKET", "N", "D"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def linear_act_jet_fused_bwd_kernel(x_ptr, w_ptr, b_ptr, gy_ptr, gu_ptr, M, N, D, sxk, sxm, sxd, swn, swd, sgyk,
                                    sgym, sguk, sgum, p0, p1, M_BUCKET,
                                    ACT: tl.constexpr, K: tl.constexpr, NU: tl.constexpr, HAS_BIAS: tl.constexpr,
                                    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr):
    """The gradient w.r.t. the stored pre-activation coefficients, ∂L/∂u_j = Σ_{k=j..K} (∂L/∂y_k)·g_{k−j}
    (j < NU; g the jet of φ'(u), exact because ∂y_k/∂u_j = g_{k−j}, see :mod:`.activation_jet`), with u
    recomputed by the same GEMM: the forward stored nothing, and u never reaches memory here either.
    gy (K+1, M, N) strides (sgyk, sgym, 1), gu (NU, M, N) strides (sguk, sgum, 1); ∂x = gu·W,
    ∂W = Σ_j gu_jᵀ X_j and ∂b = Σ_rows gu_0 are GEMMs/reductions left to the caller."""
    u, rm, rn, m_ok, n_ok = _pre_activation_tiles(x_ptr, w_ptr, b_ptr, M, N, D, sxk, sxm, sxd, swn, swd, K, NU,
                                                  HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D,
                                                  GROUP_M)
    _y, g = _activation_jet(u, ACT, K, NU, p0, p1)
    out_ok = m_ok[:, None] & n_ok[None, :]
    q = gy_ptr + rm[:, None] * sgym + rn[None, :]
    gy = (tl.load(q, mask=out_ok, other=0.0).to(tl.float32),)
    for _k in tl.static_range(1, K + 1):
        q += sgyk
        gy = gy + (tl.load(q, mask=out_ok, other=0.0).to(tl.float32),)
    o = gu_ptr + rm[:, None] * sgum + rn[None, :]
    for j in tl.static_range(NU):
        tl.store(o, _input_coeff_grad(gy, g, j, K).to(gu_ptr.dtype.element_ty), mask=out_ok)
        o += sguk


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision matching what cuBLAS does for ``F.linear`` here: tf32 for fp32 only
    when ``torch.backends.cuda.matmul.allow_tf32`` allows it, else exact fp32 products ("ieee");
    fp16/bf16 operands always run on the tensor cores (the option is ignored for them)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _gemm_operands(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], order: int):
    """Checked (x as (NU, M, D) rows, batch shape, M, N, D) for the fused GEMM kernels."""
    if not (0 <= order <= MAX_ORDER):
        raise ValueError(f"order must be in 0..{MAX_ORDER} for the fused kernel, got {order}")
    if x.dim() < 2:
        raise ValueError(f"x needs shape (n+1, *batch, in), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (out, {x.shape[-1]}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x is {x.dtype} on {x.device}: "
                         "the fused GEMM needs one dtype and device")
    N, D = weight.shape
    if bias is not None and (bias.shape != (N,) or bias.device != x.device):
        raise ValueError(f"bias must have shape ({N},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    x = x[: order + 1]
    x3 = x.reshape(x.shape[0], -1, D)  # a view whenever the batch axes can merge
    return x3, tuple(x.shape[1:-1]), x3.shape[1], N, D


def _gemm_meta(x3: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kind: Optional[str],
               order: int, M: int, N: int, D: int, p0: float, p1: float) -> dict:
    return dict(x_ptr=x3, w_ptr=weight, b_ptr=bias.contiguous() if bias is not None else weight,  # dummy
                M=M, N=N, D=D, sxk=x3.stride(0), sxm=x3.stride(1), sxd=x3.stride(2), swn=weight.stride(0),
                swd=weight.stride(1), p0=float(p0), p1=float(p1), M_BUCKET=max(M - 1, 0).bit_length(),
                ACT=activation_code(kind or "identity"), K=order, NU=x3.shape[0], HAS_BIAS=bias is not None,
                DOT_PRECISION=dot_precision(x3.dtype), UPCAST=INTERPRET and x3.dtype == torch.bfloat16)


def _destination(out: Optional[torch.Tensor], shape, like: torch.Tensor) -> torch.Tensor:
    """A new (shape) tensor like ``like``, or the caller's ``out`` once checked (contiguous: the
    kernels write rows of unit column stride)."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {tuple(shape)} on {like.device}")
    return out


def _gemm_grid(M: int, N: int):
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    return grid


def linear_act_jet_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kind: Optional[str],
                         order: int, p0: float = 0.0, p1: float = 0.0,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """φ(x Wᵀ + b) as a jet by ONE fused Triton GEMM: x (n+1, *batch, D) with n+1 ≤ order+1 stored
    coefficients, weight (N, D), bias (N,) or None → (order+1, *batch, N); ``kind=None``: no
    activation (bias only). Forward only (the autograd binding is in ``curvrate_fast.functions``).
    ``out``: an optional contiguous (order+1, *batch, N) destination (tests pass NaN-poisoned ones)."""
    x3, batch, M, N, D = _gemm_operands(x, weight, bias, order)
    y = _destination(out, (order + 1,) + batch + (N,), x)
    if M == 0 or N == 0:
        return y
    y3 = y.view(order + 1, M, N)
    wrap_triton(linear_act_jet_fused_kernel)[_gemm_grid(M, N)](
        y_ptr=y3, syk=y3.stride(0), sym=y3.stride(1), **_gemm_meta(x3, weight, bias, kind, order, M, N, D, p0, p1))
    return y


def linear_act_jet_fused_bwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             grad_y: torch.Tensor, kind: Optional[str], order: int, p0: float = 0.0, p1: float = 0.0,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient (n+1, *batch, N) w.r.t. the stored pre-activation coefficients u = x Wᵀ (+ b on
    coefficient 0) of :func:`linear_act_jet_fused`, given grad_y (order+1, *batch, N), recomputing u
    inside the kernel. ``out``: an optional contiguous destination of that shape."""
    x3, batch, M, N, D = _gemm_operands(x, weight, bias, order)
    nu = x3.shape[0]
    if tuple(grad_y.shape) != (order + 1,) + batch + (N,):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, expected {(order + 1,) + batch + (N,)}")
    gu = _destination(out, (nu,) + batch + (N,), x)
    if M == 0 or N == 0:
        return gu
    gy3 = grad_y.reshape(order + 1, M, N)
    if N > 1 and gy3.stride(2) != 1:
        gy3 = gy3.contiguous()
    gu3 = gu.view(nu, M, N)
    wrap_triton(linear_act_jet_fused_bwd_kernel)[_gemm_grid(M, N)](
        gy_ptr=gy3, gu_ptr=gu3, sgyk=gy3.stride(0), sgym=gy3.stride(1), sguk=gu3.stride(0), sgum=gu3.stride(1),
        **_gemm_meta(x3, weight, bias, kind, order, M, N, D, p0, p1))
    return gu
