"""Per-sample cross-entropy jet ℓ_b = w_{y_b}·(logsumexp_c z_{b,c} − z_{b,y_b}) (SPEC.md §2, last rules).

Input: the logits jet z of shape (NU, B, C) (NU ≤ K+1 stored coefficients, the rest are zeros),
integer targets y (B,), optional class weights w (C,). Output: the loss jet (K+1, B), and the
logsumexp jet L (K+1, B) in fp32, kept for the backward.

Forward, one program per block of BLOCK_B rows, one pass over the classes in chunks of BLOCK_C:
  shift by the (constant) max of z_0 — kept online per lane, flash-style: when a lane's max grows
  from m to m', its partial sums are rescaled by e^{m−m'}, exact because the exp jet is linear in
  the constant factor e^{−m};
  exp jet  e_0 = e^{z_0 − m},  e_k = (1/k) Σ_{j=1..k} j z_j e_{k−j};
  class sum S_k = Σ_c e_{c,k};
  log jet  L_0 = log S_0 + m,  L_k = (S_k − (1/k) Σ_{j=1..k−1} j L_j S_{k−j}) / S_0;
  ℓ_k = w_y (L_k − z_{y,k}), and ℓ = 0 where y = ignore_index.

Backward (exact, one pass): perturbing z_{c,j} by ε adds ε t^j to z_c(t), and
d logsumexp(z(t)) = Σ_c p_c(t) dz_c(t) with the softmax p_c = exp(z_c − L), so
  ∂L_k/∂z_{c,j} = p_{c,k−j},  ∂ℓ/∂z_{c,j} = Σ_{k=j..K} G_k p_{c,k−j} − [c = y] G_j,  G_k = w_y ∂ℓ_k.
The softmax jet comes from the exp rule on d = z − L:  p_0 = e^{z_0 − L_0},  p_k = (1/k) Σ j d_j p_{k−j}.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

__all__ = ["cross_entropy_jet_fwd", "cross_entropy_jet_bwd", "MAX_ORDER", "INTERPRET", "block_sizes"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_ORDER = 8

# -- config space (data) -------------------------------------------------------------------------
# A program holds (K+1) accumulators, K+1 logits and K+1 exp coefficients per lane of a
# BLOCK_B × BLOCK_C tile: TILE elements per program, warps by tile size.
_GPU_TILE = 2048          # elements of a BLOCK_B × BLOCK_C tile
_GPU_WARPS = {1024: 4, 2048: 8, 4096: 8}
_INTERPRET_TILE = 256     # the interpreter: few, large programs


def block_sizes(B: int, C: int, max_block_c: Optional[int] = None) -> Tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, num_warps) for B rows of C classes: rows of many classes loop over chunks
    of BLOCK_C (one row per program); rows of few classes are packed BLOCK_B to a program."""
    B, C = int(B), int(C)   # symbolic sizes under torch.compile specialize here
    tile = _INTERPRET_TILE if INTERPRET else _GPU_TILE
    block_c = min(triton.next_power_of_2(max(C, 1)), tile)
    if max_block_c is not None:
        block_c = min(block_c, triton.next_power_of_2(max_block_c))
    block_b = max(1, min(triton.next_power_of_2(max(B, 1)), tile // block_c))
    warps = 1 if INTERPRET else _GPU_WARPS.get(block_b * block_c, 4)
    return block_b, block_c, warps


@triton.jit
def _exp_jet(z, m, K: tl.constexpr, NU: tl.constexpr):
    """exp(z − m) as a jet: e_0 = exp(z_0 − m), e_k = (1/k) Σ_{j=1..k} j z_j e_{k−j} (z_j = 0, j ≥ NU)."""
    e = (tl.exp(z[0] - m),)
    for k in tl.static_range(1, K + 1):
        acc = tl.zeros_like(e[0])
        for j in tl.static_range(1, k + 1):
            if j < NU:
                acc += (j * z[j]) * e[k - j]
        e = e + (acc * (1.0 / k),)
    return e


@triton.jit
def ce_jet_fwd_kernel(z_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, B, C, szk, szb, slk, sek, ignore_index,
                      K: tl.constexpr, NU: tl.constexpr, HAS_W: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Loss jet ℓ (K+1, B) and logsumexp jet L (K+1, B) of logits z (NU, B, C), strides
    (szk, szb, 1); see the module docstring for the recurrences (SPEC.md §2, cross-entropy)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols0 = tl.arange(0, BLOCK_C)
    NEG: tl.constexpr = -3.0e38
    m = tl.full([BLOCK_B, BLOCK_C], NEG, tl.float32)   # per-lane running max of z_0
    S = ()                                              # per-lane partial sums of e_k
    for k in tl.static_range(K + 1):
        S = S + (tl.zeros([BLOCK_B, BLOCK_C], tl.float32),)
    row_base = z_ptr + rows[:, None] * szb
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = rmask[:, None] & (cols < C)[None, :]
        p = row_base + cols[None, :]
        z = (tl.load(p, mask=mask, other=float("-inf")).to(tl.float32),)
        for k in tl.static_range(1, K + 1):
            if k < NU:
                p += szk
                z = z + (tl.load(p, mask=mask, other=0.0).to(tl.float32),)
            else:
                z = z + (tl.zeros([BLOCK_B, BLOCK_C], tl.float32),)
        m_new = tl.maximum(m, z[0])
        alpha = tl.exp(m - m_new)
        e = _exp_jet(z, m_new, K, NU)
        S_new = ()
        for k in tl.static_range(K + 1):
            S_new = S_new + (S[k] * alpha + e[k],)
        S = S_new
        m = m_new
    # combine the lanes of each row
    M = tl.max(m, axis=1)
    scale = tl.exp(m - M[:, None])
    s0 = tl.sum(S[0] * scale, axis=1)
    s0 = tl.where(rmask, s0, 1.0)
    inv0 = 1.0 / s0
    Ssum = (s0,)
    L = (tl.log(s0) + M,)
    for k in tl.static_range(1, K + 1):
        Ssum = Ssum + (tl.sum(S[k] * scale, axis=1),)
        acc = tl.zeros_like(s0)
        for j in tl.static_range(1, k):
            acc += (j * L[j]) * Ssum[k - j]
        L = L + ((Ssum[k] - acc * (1.0 / k)) * inv0,)
    # the target's jet and weight
    t = tl.load(t_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = rmask & (t != ignore_index)
    inb = valid & (t >= 0) & (t < C)
    tc = tl.where(inb, t, 0)
    if HAS_W:
        wt = tl.load(w_ptr + tc, mask=inb, other=0.0).to(tl.float32)
    else:
        wt = tl.full([BLOCK_B], 1.0, tl.float32)
    pz = z_ptr + rows * szb + tc
    po = loss_ptr + rows
    pl = lse_ptr + rows
    for k in tl.static_range(K + 1):
        if k < NU:
            zy = tl.load(pz, mask=inb, other=0.0).to(tl.float32)
            pz += szk
            lk = tl.where(valid, wt * (L[k] - zy), 0.0)
        else:
            lk = tl.where(valid, wt * L[k], 0.0)
        tl.store(po, lk.to(loss_ptr.dtype.element_ty), mask=rmask)
        tl.store(pl, L[k], mask=rmask)
        po += slk
        pl += sek


@triton.jit
def ce_jet_bwd_kernel(z_ptr, t_ptr, w_ptr, lse_ptr, gl_ptr, gz_ptr, B, C, szk, szb, sek, sgk, sgzk,
                      sgzb, ignore_index, K: tl.constexpr, NU: tl.constexpr, HAS_W: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """∂ℓ/∂z_{c,j} = Σ_{k=j..K} G_k p_{c,k−j} − [c = y] G_j for the NU stored coefficients,
    G_k = w_y ∂ℓ_k (0 on ignored rows), p the softmax jet exp(z − L) (module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols0 = tl.arange(0, BLOCK_C)
    t = tl.load(t_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = rmask & (t != ignore_index)
    inb = valid & (t >= 0) & (t < C)
    tc = tl.where(inb, t, -1)
    if HAS_W:
        wt = tl.load(w_ptr + tl.where(inb, t, 0), mask=inb, other=0.0).to(tl.float32)
    else:
        wt = tl.full([BLOCK_B], 1.0, tl.float32)
    L = ()
    G = ()
    pl = lse_ptr + rows
    pg = gl_ptr + rows
    for k in tl.static_range(K + 1):
        L = L + (tl.load(pl, mask=rmask, other=0.0),)
        gk = tl.load(pg, mask=rmask, other=0.0).to(tl.float32)
        G = G + (tl.where(valid, wt * gk, 0.0)[:, None],)
        pl += sek
        pg += sgk
    row_base = z_ptr + rows[:, None] * szb
    out_base = gz_ptr + rows[:, None] * sgzb
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = rmask[:, None] & (cols < C)[None, :]
        p = row_base + cols[None, :]
        # softmax jet p = exp(z − L)
        z0 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
        d = (z0,)
        for k in tl.static_range(1, K + 1):
            if k < NU:
                p += szk
                d = d + (tl.load(p, mask=mask, other=0.0).to(tl.float32) - L[k][:, None],)
            else:
                d = d + (tl.zeros([BLOCK_B, BLOCK_C], tl.float32) - L[k][:, None],)
        sm = (tl.exp(z0 - L[0][:, None]),)
        for k in tl.static_range(1, K + 1):
            acc = tl.zeros_like(sm[0])
            for j in tl.static_range(1, k + 1):
                acc += (j * d[j]) * sm[k - j]
            sm = sm + (acc * (1.0 / k),)
        is_t = cols[None, :] == tc[:, None]
        q = out_base + cols[None, :]
        for j in tl.static_range(NU):
            acc = G[j] * sm[0]
            for k in tl.static_range(j + 1, K + 1):
                acc += G[k] * sm[k - j]
            acc = tl.where(is_t, acc - G[j], acc)
            tl.store(q, acc.to(gz_ptr.dtype.element_ty), mask=mask)
            q += sgzk


# -- launchers -----------------------------------------------------------------------------------
def _check(z: torch.Tensor, target: torch.Tensor, order: int, weight: Optional[torch.Tensor]):
    if not (0 <= order <= MAX_ORDER):
        raise ValueError(f"order must be in 0..{MAX_ORDER} for the fused kernel, got {order}")
    if z.dim() != 3:
        raise ValueError(f"logits jet must have shape (n+1, B, C), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"logits must be floating point, got {z.dtype}")
    if target.shape != (z.shape[1],):
        raise ValueError(f"target must have shape ({z.shape[1]},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32 class indices, got {target.dtype}")
    if weight is not None and weight.shape != (z.shape[2],):
        raise ValueError(f"weight must have shape ({z.shape[2]},), got {tuple(weight.shape)}")


def _dest(out: Optional[torch.Tensor], shape, dtype, device, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension")
    return out


def _rows(z: torch.Tensor) -> torch.Tensor:
    return z if (z.shape[2] <= 1 or z.stride(2) == 1) else z.contiguous()


def cross_entropy_jet_fwd(z: torch.Tensor, target: torch.Tensor, order: int, ignore_index: int = -100,
                          weight: Optional[torch.Tensor] = None,
                          max_block_c: Optional[int] = None, out: Optional[torch.Tensor] = None,
                          lse_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns (loss jet (order+1, B) in z's dtype, logsumexp jet
    (order+1, B) fp32). ``max_block_c`` caps the class chunk (tests use it to force many chunks);
    ``out``/``lse_out``: optional destinations with unit stride along B (tests poison them)."""
    _check(z, target, order, weight)
    z = _rows(z[: order + 1])
    nu, B, C = z.shape
    loss = _dest(out, (order + 1, B), z.dtype, z.device, "out")
    lse = _dest(lse_out, (order + 1, B), torch.float32, z.device, "lse_out")
    if B == 0:
        return loss, lse
    if C == 0:
        raise ValueError("cross-entropy needs at least one class")
    target = target.contiguous()
    w = weight.contiguous() if weight is not None else z
    BLOCK_B, BLOCK_C, num_warps = block_sizes(B, C, max_block_c)
    grid = (triton.cdiv(B, BLOCK_B),)
    wrap_triton(ce_jet_fwd_kernel)[grid](
        z_ptr=z, t_ptr=target, w_ptr=w, loss_ptr=loss, lse_ptr=lse, B=B, C=C, szk=z.stride(0),
        szb=z.stride(1), slk=loss.stride(0), sek=lse.stride(0), ignore_index=int(ignore_index),
        K=order, NU=nu, HAS_W=weight is not None, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C,
        num_warps=num_warps)
    return loss, lse


def cross_entropy_jet_bwd(z: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                          order: int, ignore_index: int = -100, weight: Optional[torch.Tensor] = None,
                          max_block_c: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the backward kernel: the gradient w.r.t. the n+1 stored logit coefficients
    (``out``: optional (n+1, B, C) destination with unit class stride)."""
    _check(z, target, order, weight)
    z = _rows(z[: order + 1])
    nu, B, C = z.shape
    if grad_loss.shape != (order + 1, B) or lse.shape != (order + 1, B):
        raise ValueError(f"grad_loss {tuple(grad_loss.shape)} and lse {tuple(lse.shape)} must be {(order + 1, B)}")
    gz = _dest(out, (nu, B, C), z.dtype, z.device, "out")
    if B == 0 or C == 0:
        return gz
    target = target.contiguous()
    grad_loss = grad_loss.contiguous()  # autograd hands expanded (stride-0) gradients of sums
    lse = lse.contiguous()
    w = weight.contiguous() if weight is not None else z
    BLOCK_B, BLOCK_C, num_warps = block_sizes(B, C, max_block_c)
    grid = (triton.cdiv(B, BLOCK_B),)
    wrap_triton(ce_jet_bwd_kernel)[grid](
        z_ptr=z, t_ptr=target, w_ptr=w, lse_ptr=lse, gl_ptr=grad_loss, gz_ptr=gz, B=B, C=C,
        szk=z.stride(0), szb=z.stride(1), sek=lse.stride(0), sgk=grad_loss.stride(0),
        sgzk=gz.stride(0), sgzb=gz.stride(1), ignore_index=int(ignore_index), K=order, NU=nu,
        HAS_W=weight is not None, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return gz
