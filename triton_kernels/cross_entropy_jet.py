"""Per-sample cross-entropy jet ℓ_b = w_{y_b}·(logsumexp_c z_{b,c} − z_{b,y_b}) (docs/math.md §2, last rules).

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

Split forward (few rows × many classes, e.g. 8 rows of a 128k vocabulary: one program per row
would leave most SMs idle). The n = ⌈C/BLOCK_C⌉ class chunks are cut into NS splits, split s
holding chunks [a_s, a_{s+1}), a_s = ⌊s·n/NS⌋, i.e. the classes [a_s·BLOCK_C, min(a_{s+1}·BLOCK_C, C))
(chunk-aligned; ⌊n/NS⌋ or ⌈n/NS⌉ chunks each, so no split is empty while NS ≤ n, and the splits
are balanced). The sum S_k = Σ_c e_{c,k} is split the same way; the rescaling argument above makes
the split exact:
  stage 1, grid (row blocks, NS): program (r, s) runs the pass above over the classes of split s
    and writes its max m_s (of z_0) and its sums S_{s,k}, taken relative to m_s, to an fp32
    workspace (K+2, B, NS). A split without classes (NS > n, forced) writes m_s = −3e38 (a finite
    "−∞": no inf − inf = NaN below) and S_{s,k} = 0;
  stage 2, one program per row block: M = max_s m_s,  S_k = Σ_s e^{m_s − M} S_{s,k}
    (e^{m_s − M} is a constant factor of the jet e_{c,·} of every class of split s, and the exp
    jet is linear in it; an empty split adds 0·e^{−3e38 − M} = 0 exactly), then the log jet and
    the target as above (z_{y,·} loaded directly): the one-pass kernel's outputs, up to the
    order of the fp32 additions.
Both paths share the helpers _scan_classes (the online pass over a class range), _reduce_lanes
(the lane → row combination) and _lse_loss_store (log jet, target, weight, stores).

Backward (exact, one pass): perturbing z_{c,j} by ε adds ε t^j to z_c(t), and
d logsumexp(z(t)) = Σ_c p_c(t) dz_c(t) with the softmax p_c = exp(z_c − L), so
  ∂L_k/∂z_{c,j} = p_{c,k−j},  ∂ℓ/∂z_{c,j} = Σ_{k=j..K} G_k p_{c,k−j} − [c = y] G_j,  G_k = w_y ∂ℓ_k.
The softmax jet comes from the exp rule on d = z − L:  p_0 = e^{z_0 − L_0},  p_k = (1/k) Σ j d_j p_{k−j}.
Each class only needs the (already reduced) L jet, so the backward splits over classes without any
reduction: grid (row blocks, NS), program (r, s) writes the classes of split s (NS = 1: all).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..activation_kinds import MAX_KERNEL_ORDER
from .activation_jet import wrap_triton  # guarded import (older torch)

__all__ = ["INTERPRET", "MAX_ORDER", "block_sizes", "choose_num_splits", "cross_entropy_jet_bwd",
           "cross_entropy_jet_fwd"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_ORDER = MAX_KERNEL_ORDER

# -- config space (data) -------------------------------------------------------------------------
# A program holds (K+1) accumulators, K+1 logits and K+1 exp coefficients per lane of a
# BLOCK_B × BLOCK_C tile: TILE elements per program, warps by tile size.
_GPU_TILE = 2048          # elements of a BLOCK_B × BLOCK_C tile
_GPU_WARPS = {1024: 4, 2048: 8, 4096: 8}
_INTERPRET_TILE = 256     # the interpreter: few, large programs

# Class splits (see choose_num_splits). Split only while the row-block programs alone fill fewer
# than _SPLIT_BELOW × SMs; aim at about _SPLIT_TARGET × SMs programs in all (more than one wave, so
# the last partial wave costs little); but give every split at least _MIN_CHUNKS_PER_SPLIT class
# chunks: each split pays a fixed cost of roughly one chunk (program start, the lane reduction of
# its K+2 tile accumulators, K+2 workspace stores, and its share of the combine kernel), so four
# chunks keep that overhead at ≲ 25 %, and the combine kernel's work (∝ NS) small against the scan.
# (Estimates from the kernels' structure, not yet timed on a GPU; e.g. 8 rows × 128k classes =
# 63 chunks of 2048 on 132 SMs: NS = 15, 120 programs instead of 8.)
_SPLIT_BELOW = 2
_SPLIT_TARGET = 4
_MIN_CHUNKS_PER_SPLIT = 4
_MAX_SPLITS = 65535       # CUDA's limit on grid dimension 1


def block_sizes(B: int, C: int, max_block_c: int | None = None) -> tuple[int, int, int]:
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


def choose_num_splits(n_row_programs: int, n_chunks: int, sm_count: int) -> int:
    """Number of class splits NS for n_row_programs row blocks of n_chunks BLOCK_C chunks each on a
    GPU of sm_count SMs (constants and their why above); 1 = no split. NS = min(⌈_SPLIT_TARGET·SMs /
    n_row_programs⌉, ⌊n_chunks / _MIN_CHUNKS_PER_SPLIT⌋): the kernels' balanced splits then hold
    ≥ ⌊n_chunks/NS⌋ ≥ _MIN_CHUNKS_PER_SPLIT chunks each, none empty."""
    n_row_programs, n_chunks, sm_count = int(n_row_programs), int(n_chunks), max(int(sm_count), 1)
    if n_row_programs <= 0 or n_row_programs >= _SPLIT_BELOW * sm_count:
        return 1
    wanted = -(-_SPLIT_TARGET * sm_count // n_row_programs)
    return max(1, min(wanted, n_chunks // _MIN_CHUNKS_PER_SPLIT, _MAX_SPLITS))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(num_splits: int | None, n_row_programs: int, n_chunks: int, device: torch.device) -> int:
    """The forced NS (used as given: splits beyond the number of chunks are empty and harmless),
    else the heuristic on CUDA, else 1 (the interpreter and other devices)."""
    if num_splits is not None:
        num_splits = int(num_splits)
        if not 1 <= num_splits <= _MAX_SPLITS:
            raise ValueError(f"num_splits must be in 1..{_MAX_SPLITS}, got {num_splits}")
        return num_splits
    if INTERPRET or device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return choose_num_splits(n_row_programs, n_chunks, _sm_count(index))


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
def _split_range(C, BLOCK_C: tl.constexpr):
    """Chunks [⌊s·n/NS⌋, ⌊(s+1)·n/NS⌋) of split s = program_id(1) of NS = num_programs(1),
    n = ⌈C/BLOCK_C⌉ (s·n in int64, it may pass 2^31; the chunk indices ≤ n fit int32). The loops
    over them keep the register counts of the unsplit kernels (ptxas, sm_90, K = 2..8)."""
    n_chunks = tl.cdiv(C, BLOCK_C)
    s = tl.program_id(1).to(tl.int64)
    ns = tl.num_programs(1)
    return (s * n_chunks // ns).to(tl.int32), ((s + 1) * n_chunks // ns).to(tl.int32)


@triton.jit
def _scan_classes(z_ptr, rows, rmask, c_lo, c_hi, C, szk, szb, K: tl.constexpr, NU: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Online pass over the classes [c_lo, c_hi) (c_lo a multiple of BLOCK_C) in chunks of BLOCK_C:
    per-lane max m of z_0 and per-lane sums S_k of the exp jet relative to m (a lane that saw no
    class: m = −3e38, S = 0)."""
    cols0 = tl.arange(0, BLOCK_C)
    NEG: tl.constexpr = -3.0e38
    m = tl.full([BLOCK_B, BLOCK_C], NEG, tl.float32)   # per-lane running max of z_0
    S = ()                                              # per-lane partial sums of e_k
    for _k in tl.static_range(K + 1):
        S = S + (tl.zeros([BLOCK_B, BLOCK_C], tl.float32),)
    row_base = z_ptr + rows[:, None] * szb
    for c0 in range(c_lo, c_hi, BLOCK_C):
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
    return m, S


@triton.jit
def _reduce_lanes(m, S, K: tl.constexpr):
    """Per-row max M = max_lanes m and sums Σ_lanes e^{m − M} S_k (exact rescaling, see docstring)."""
    M = tl.max(m, axis=1)
    scale = tl.exp(m - M[:, None])
    Srow = ()
    for k in tl.static_range(K + 1):
        Srow = Srow + (tl.sum(S[k] * scale, axis=1),)
    return M, Srow


@triton.jit
def _lse_loss_store(M, S, rows, rmask, z_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, C, szk, szb, slk, sek,
                    ignore_index, K: tl.constexpr, NU: tl.constexpr, HAS_W: tl.constexpr,
                    BLOCK_B: tl.constexpr):
    """From the row max M and the class sums S_k (relative to M): the log jet L, the loss jet
    ℓ_k = w_y (L_k − z_{y,k}) (0 where y = ignore_index); stores ℓ and L of the rows."""
    s0 = tl.where(rmask, S[0], 1.0)
    inv0 = 1.0 / s0
    L = (tl.log(s0) + M,)
    for k in tl.static_range(1, K + 1):
        acc = tl.zeros_like(s0)
        for j in tl.static_range(1, k):
            acc += (j * L[j]) * S[k - j]
        L = L + ((S[k] - acc * (1.0 / k)) * inv0,)
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
def ce_jet_fwd_kernel(z_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, B, C, szk, szb, slk, sek, ignore_index,
                      K: tl.constexpr, NU: tl.constexpr, HAS_W: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass: loss jet ℓ (K+1, B) and logsumexp jet L (K+1, B) of logits z (NU, B, C), strides
    (szk, szb, 1); see the module docstring for the recurrences (docs/math.md §2, cross-entropy)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    m, S = _scan_classes(z_ptr, rows, rmask, 0, C, C, szk, szb, K, NU, BLOCK_B, BLOCK_C)
    M, Srow = _reduce_lanes(m, S, K)
    _lse_loss_store(M, Srow, rows, rmask, z_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, C, szk, szb, slk, sek,
                    ignore_index, K, NU, HAS_W, BLOCK_B)


@triton.jit
def ce_jet_partial_kernel(z_ptr, ws_ptr, B, C, szk, szb, swk, swb, K: tl.constexpr, NU: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Split forward, stage 1, grid (row blocks, NS): the max m_s and the sums S_{s,k} (relative to
    m_s) of class split s = program_id(1), to the workspace ws[0, b, s] = m_s, ws[1+k, b, s] = S_{s,k}
    (strides swk, swb, 1)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    lo, hi = _split_range(C, BLOCK_C)
    # class bounds in int64: the form measured to need no more registers than the one-pass kernel
    c_lo = lo.to(tl.int64) * BLOCK_C
    c_hi = tl.minimum(hi.to(tl.int64) * BLOCK_C, C)
    m, S = _scan_classes(z_ptr, rows, rmask, c_lo, c_hi, C, szk, szb, K, NU, BLOCK_B, BLOCK_C)
    M, Srow = _reduce_lanes(m, S, K)
    p = ws_ptr + rows * swb + tl.program_id(1)
    tl.store(p, M, mask=rmask)
    for k in tl.static_range(K + 1):
        p += swk
        tl.store(p, Srow[k], mask=rmask)


@triton.jit
def ce_jet_combine_kernel(ws_ptr, z_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, B, C, NS, szk, szb, swk, swb,
                          slk, sek, ignore_index, K: tl.constexpr, NU: tl.constexpr, HAS_W: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """Split forward, stage 2, one program per BLOCK_B rows: M = max_s m_s, S_k = Σ_s e^{m_s − M} S_{s,k}
    over the NS splits of the workspace (two passes over it, BLOCK_S splits at a time), then the
    same log jet / loss / stores as the one-pass kernel."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    s0 = tl.arange(0, BLOCK_S)
    NEG: tl.constexpr = -3.0e38
    base = ws_ptr + rows[:, None] * swb
    mx = tl.full([BLOCK_B, BLOCK_S], NEG, tl.float32)
    for s in range(0, NS, BLOCK_S):
        mask = rmask[:, None] & ((s + s0) < NS)[None, :]
        mx = tl.maximum(mx, tl.load(base + (s + s0)[None, :], mask=mask, other=NEG))
    M = tl.max(mx, axis=1)
    acc = ()
    for _k in tl.static_range(K + 1):
        acc = acc + (tl.zeros([BLOCK_B, BLOCK_S], tl.float32),)
    for s in range(0, NS, BLOCK_S):
        mask = rmask[:, None] & ((s + s0) < NS)[None, :]
        p = base + (s + s0)[None, :]
        f = tl.exp(tl.load(p, mask=mask, other=NEG) - M[:, None])
        acc_new = ()
        for k in tl.static_range(K + 1):
            p += swk
            acc_new = acc_new + (acc[k] + f * tl.load(p, mask=mask, other=0.0),)
        acc = acc_new
    Srow = ()
    for k in tl.static_range(K + 1):
        Srow = Srow + (tl.sum(acc[k], axis=1),)
    _lse_loss_store(M, Srow, rows, rmask, z_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, C, szk, szb, slk, sek,
                    ignore_index, K, NU, HAS_W, BLOCK_B)


@triton.jit
def ce_jet_bwd_kernel(z_ptr, t_ptr, w_ptr, lse_ptr, gl_ptr, gz_ptr, B, C, szk, szb, sek, sgk, sgzk,
                      sgzb, ignore_index, K: tl.constexpr, NU: tl.constexpr, HAS_W: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """∂ℓ/∂z_{c,j} = Σ_{k=j..K} G_k p_{c,k−j} − [c = y] G_j for the NU stored coefficients,
    G_k = w_y ∂ℓ_k (0 on ignored rows), p the softmax jet exp(z − L) (module docstring).
    Grid (row blocks, NS): program (r, s) writes the classes of split s (NS = 1: all classes)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols0 = tl.arange(0, BLOCK_C)
    lo, hi = _split_range(C, BLOCK_C)
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
    for _k in tl.static_range(K + 1):
        L = L + (tl.load(pl, mask=rmask, other=0.0),)
        gk = tl.load(pg, mask=rmask, other=0.0).to(tl.float32)
        G = G + (tl.where(valid, wt * gk, 0.0)[:, None],)
        pl += sek
        pg += sgk
    row_base = z_ptr + rows[:, None] * szb
    out_base = gz_ptr + rows[:, None] * sgzb
    for ci in range(lo, hi):
        cols = ci * BLOCK_C + cols0
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
def _check(z: torch.Tensor, target: torch.Tensor, order: int, weight: torch.Tensor | None):
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


def _dest(out: torch.Tensor | None, shape, dtype, device, name: str) -> torch.Tensor:
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
                          weight: torch.Tensor | None = None,
                          max_block_c: int | None = None, out: torch.Tensor | None = None,
                          lse_out: torch.Tensor | None = None, *,
                          num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel(s): returns (loss jet (order+1, B) in z's dtype, logsumexp jet
    (order+1, B) fp32). ``max_block_c`` caps the class chunk (tests use it to force many chunks);
    ``out``/``lse_out``: optional destinations with unit stride along B (tests poison them);
    ``num_splits``: class splits NS (None: choose_num_splits on CUDA, 1 otherwise; NS > 1 runs the
    two-stage split forward of the module docstring)."""
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
    n_rb = triton.cdiv(B, BLOCK_B)
    ns = _splits(num_splits, n_rb, triton.cdiv(C, BLOCK_C), z.device)
    # the arguments of the final stage (one-pass kernel, or the combine kernel of the split)
    common = {"z_ptr": z, "t_ptr": target, "w_ptr": w, "loss_ptr": loss, "lse_ptr": lse, "B": B, "C": C,
              "szk": z.stride(0), "szb": z.stride(1), "slk": loss.stride(0), "sek": lse.stride(0),
              "ignore_index": int(ignore_index), "K": order, "NU": nu, "HAS_W": weight is not None,
              "BLOCK_B": BLOCK_B}
    if ns == 1:
        wrap_triton(ce_jet_fwd_kernel)[(n_rb,)](**common, BLOCK_C=BLOCK_C, num_warps=num_warps)
        return loss, lse
    ws = torch.empty((order + 2, B, ns), dtype=torch.float32, device=z.device)
    wrap_triton(ce_jet_partial_kernel)[(n_rb, ns)](
        z_ptr=z, ws_ptr=ws, B=B, C=C, szk=z.stride(0), szb=z.stride(1), swk=B * ns, swb=ns, K=order,
        NU=nu, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, num_warps=num_warps)
    BB2, BLOCK_S, warps2 = block_sizes(B, ns)     # the combine: a (rows × splits) tile
    common["BLOCK_B"] = BB2
    wrap_triton(ce_jet_combine_kernel)[(triton.cdiv(B, BB2),)](
        ws_ptr=ws, NS=ns, swk=B * ns, swb=ns, **common, BLOCK_S=BLOCK_S, num_warps=warps2)
    return loss, lse


def cross_entropy_jet_bwd(z: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                          order: int, ignore_index: int = -100, weight: torch.Tensor | None = None,
                          max_block_c: int | None = None, out: torch.Tensor | None = None, *,
                          num_splits: int | None = None) -> torch.Tensor:
    """Launch the backward kernel: the gradient w.r.t. the n+1 stored logit coefficients
    (``out``: optional (n+1, B, C) destination with unit class stride; ``num_splits`` as in the
    forward: grid (row blocks, NS), each program writing its class split)."""
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
    n_rb = triton.cdiv(B, BLOCK_B)
    grid = (n_rb, _splits(num_splits, n_rb, triton.cdiv(C, BLOCK_C), z.device))
    wrap_triton(ce_jet_bwd_kernel)[grid](
        z_ptr=z, t_ptr=target, w_ptr=w, lse_ptr=lse, gl_ptr=grad_loss, gz_ptr=gz, B=B, C=C,
        szk=z.stride(0), szb=z.stride(1), sek=lse.stride(0), sgk=grad_loss.stride(0),
        sgzk=gz.stride(0), sgzb=gz.stride(1), ignore_index=int(ignore_index), K=order, NU=nu,
        HAS_W=weight is not None, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return gz
