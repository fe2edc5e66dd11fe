"""The split-over-classes path of the cross-entropy jet kernels (triton_kernels/cross_entropy_jet.py).

Few rows × many classes (a language-model vocabulary) run the forward in two stages (per-split
max and exp-sum jets to a workspace, then one combine per row block) and the backward on a
(row blocks, splits) grid; the launchers pick the split count on CUDA only, so these tests force it
(``num_splits``) with tiny class chunks (``max_block_c=16``) under the interpreter: several chunks
per split, a last split partly past the last class, splits entirely past it (more splits than
chunks: empty splits must combine exactly),
orders 1, 3, 6, stored series shorter than K+1 and complete, class weights, ignored rows,
NaN-poisoned destinations. Accuracy: the criterion of test_triton_kernels.py (1e-5 relative against
the float64 reference), and split vs one-pass agreement. The split-count heuristic is plain Python
and tested on its own.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from test_triton_kernels import DEV, _ce_inputs, assert_jet_close, rand_jet  # noqa: E402

from curvrate_fast.functions import _backend
from curvrate_fast.functions.cross_entropy import reference_cross_entropy_jet

CE = _backend.kernel_module("cross_entropy_jet")

# order, B, C, stored coefficients, class weights, ignore_index, forced splits   (chunks of 16 classes)
SPLIT_CASES = [
    (1, 3, 1, 2, False, -100, 3),     # 1 chunk: splits 0 and 1 empty, split 2 = the chunk
    (3, 5, 37, 2, True, -100, 2),     # 3 chunks as 1 + 2, the last partly past C
    (3, 4, 37, 4, False, -1, 5),      # more splits than chunks: 2 empty
    (6, 3, 301, 7, True, -100, 8),    # 19 chunks as 2 or 3 per split
    (6, 2, 301, 3, False, -100, 4),   # NU < K+1, 4 or 5 chunks per split
    (1, 37, 45, 2, True, -100, 2),    # 3 row blocks of 16 rows
]


_inputs = _ce_inputs  # the same random problems as the one-pass tests


def _reference(z, t, w, gl, order, ii):
    """(loss jet, gradient w.r.t. z) of the pure-PyTorch reference, in z's dtype."""
    zz = z.detach().clone().requires_grad_(True)
    loss = reference_cross_entropy_jet(zz, t, order, ii, None if w is None else w.to(z.dtype))
    (g,) = torch.autograd.grad(loss, zz, gl.to(z.dtype))
    return loss.detach(), g


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[f"K{c[0]}-B{c[1]}-C{c[2]}-NU{c[3]}-S{c[6]}" for c in SPLIT_CASES])
def test_forced_split_matches_reference_and_one_pass(case):
    order, B, C, nu, weighted, ii, ns = case
    z, t, w, gl = _inputs(order, B, C, nu, weighted, ii, seed=10 * order + C)
    # NaN-poisoned destinations with guard bands: every element written, nothing outside
    lbuf = torch.full((order + 1, B + 3), float("nan"), device=DEV)
    ebuf = torch.full((order + 1, B + 3), float("nan"), device=DEV)
    loss, lse = CE.cross_entropy_jet_fwd(z, t, order, ii, w, max_block_c=16, out=lbuf[:, :B],
                                         lse_out=ebuf[:, :B], num_splits=ns)
    assert torch.isfinite(lbuf[:, :B]).all() and torch.isnan(lbuf[:, B:]).all()
    assert torch.isfinite(ebuf[:, :B]).all() and torch.isnan(ebuf[:, B:]).all()
    gbuf = torch.full((nu, B, C + 5), float("nan"), device=DEV)
    gz = CE.cross_entropy_jet_bwd(z, t, lse, gl.float(), order, ii, w, max_block_c=16, out=gbuf[:, :, :C],
                                  num_splits=ns)
    assert torch.isfinite(gbuf[:, :, :C]).all() and torch.isnan(gbuf[:, :, C:]).all()

    l64, g64 = _reference(z.double(), t, w, gl, order, ii)
    l32, g32 = _reference(z, t, w, gl, order, ii)
    assert_jet_close(loss, l64, l32, what=f"split {case} forward")
    assert_jet_close(gz, g64, g32, what=f"split {case} grad")
    ignored = t == ii
    assert (loss[:, ignored] == 0).all() and (gz[:, ignored] == 0).all()

    # against the one-pass kernels (same chunking, no split)
    loss1, lse1 = CE.cross_entropy_jet_fwd(z, t, order, ii, w, max_block_c=16)
    torch.testing.assert_close(loss, loss1, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse1, rtol=2e-6, atol=1e-6)
    gz1 = CE.cross_entropy_jet_bwd(z, t, lse1, gl.float(), order, ii, w, max_block_c=16)
    torch.testing.assert_close(gz, gz1, rtol=2e-6, atol=1e-6)


def test_split_combine_loops_over_split_blocks(monkeypatch):
    """More splits than one combine tile holds (tile shrunk to 16: BLOCK_S = 16 < NS = 40, the
    combine kernel loops over its workspace), one row per program, 21 of the 40 splits empty."""
    monkeypatch.setattr(CE, "_INTERPRET_TILE", 16)
    order, B, C, nu, ii = 3, 3, 301, 4, -100
    z, t, w, gl = _inputs(order, B, C, nu, True, ii, seed=3)
    assert CE.block_sizes(B, 40) == (1, 16, 1)
    loss, lse = CE.cross_entropy_jet_fwd(z, t, order, ii, w, num_splits=40)
    gz = CE.cross_entropy_jet_bwd(z, t, lse, gl.float(), order, ii, w, num_splits=40)
    l64, g64 = _reference(z.double(), t, w, gl, order, ii)
    l32, g32 = _reference(z, t, w, gl, order, ii)
    assert_jet_close(loss, l64, l32, what="40 splits forward")
    assert_jet_close(gz, g64, g32, what="40 splits grad")


def test_split_extreme_logits():
    """Large logits and a −∞ class: the per-split maxima differ by ~1e3, the combine factors
    e^{m_s − M} underflow to 0 for the far splits; the result must stay exact and finite."""
    order, B, C = 2, 2, 64
    gen = torch.Generator().manual_seed(11)
    z = rand_jet(3, (B, C), gen)
    z[0, 0, 40:] += 1000.0      # row 0: only the last splits matter
    z[0, 1, :5] = float("-inf")
    t = torch.tensor([45, 20], device=DEV)
    gl = torch.randn(order + 1, B, generator=gen, dtype=torch.float64).to(DEV)
    loss, lse = CE.cross_entropy_jet_fwd(z, t, order, max_block_c=16, num_splits=4)
    gz = CE.cross_entropy_jet_bwd(z, t, lse, gl.float(), order, max_block_c=16, num_splits=4)
    loss1, lse1 = CE.cross_entropy_jet_fwd(z, t, order, max_block_c=16)
    gz1 = CE.cross_entropy_jet_bwd(z, t, lse1, gl.float(), order, max_block_c=16)
    assert torch.isfinite(loss).all() and torch.isfinite(gz).all()
    torch.testing.assert_close(loss, loss1, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse1, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(gz, gz1, rtol=2e-6, atol=1e-6)


def test_split_arguments():
    z, t, w, gl = _inputs(1, 2, 5, 2, False, -100, seed=1)
    for bad in (0, -1, 70000):
        with pytest.raises(ValueError):
            CE.cross_entropy_jet_fwd(z, t, 1, num_splits=bad)
        with pytest.raises(ValueError):
            CE.cross_entropy_jet_bwd(z, t, gl.float(), gl.float(), 1, num_splits=bad)
    # positional calls of the op wrappers keep working (curvrate_fast/functions/_ops.py)
    _, lse = CE.cross_entropy_jet_fwd(z, t, 1, -100, w)
    assert CE.cross_entropy_jet_bwd(z, t, lse, gl.float(), 1, -100, w).shape == z.shape


# -- the split-count heuristic (pure Python) ------------------------------------------------------
def test_heuristic_no_split():
    H = CE.choose_num_splits
    assert H(264, 1000, 132) == 1          # enough row programs already (≥ 2 × SMs)
    assert H(10_000, 63, 132) == 1
    assert H(8, 7, 132) == 1               # too few chunks for two splits of 4
    assert H(0, 100, 132) == 1
    if CE.INTERPRET or not torch.cuda.is_available():   # default under the interpreter / off CUDA
        assert CE._splits(None, 1, 10_000, torch.device(DEV)) == 1


def test_heuristic_vocabulary_case():
    """8 rows × 128k classes in chunks of 2048 (63 chunks) on an H100 (132 SMs): 15 splits of
    4 or 5 chunks, 120 programs instead of 8."""
    assert CE.choose_num_splits(8, 63, 132) == 15
    assert CE.choose_num_splits(8, 489, 132) == 66        # 1M classes: 4 × SMs programs
    assert CE.choose_num_splits(64, 63, 132) == 9         # ⌈528/64⌉


def test_heuristic_invariants():
    for sm in (1, 16, 108, 132):
        for rows in (1, 2, 3, 7, 8, 33, 100, 2 * sm - 1, 2 * sm, 5000):
            for chunks in (1, 2, 7, 8, 9, 63, 64, 489, 10_000, 1_000_000):
                ns = CE.choose_num_splits(rows, chunks, sm)
                assert 1 <= ns <= CE._MAX_SPLITS
                if rows >= 2 * sm or chunks < 8:
                    assert ns == 1, (rows, chunks, sm, ns)
                if ns > 1:   # the kernels' splits hold ⌊chunks/ns⌋ or ⌈chunks/ns⌉ chunks
                    assert chunks // ns >= CE._MIN_CHUNKS_PER_SPLIT, (rows, chunks, sm, ns)
                    assert rows * ns < CE._SPLIT_TARGET * sm + rows, "more programs than targeted"
