"""Sorting, selection, scatter/index ops and multiplicative reductions (rules/sorting.py,
rules/scatter.py and the fixes in rules/reductions.py) against oracles that share no code with the
engine: float64 nested autograd (curvrate_fast.baseline.jet), finite-difference Chebyshev fits
(_oracle.fd_jet) where PyTorch has no higher derivatives, and exact polynomial products where the
inputs contain zeros."""

import math

import pytest
import torch
import torch.nn.functional as F
from _oracle import assert_matches_fd

import curvrate_fast as cf
from curvrate_fast import baseline
from curvrate_fast.jets.tensor import JetError, JetTensor

D64 = torch.float64


def rnd(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D64) * scale


def packed(fn, shapes):
    """fn of several tensors as a function of one flat vector (so every operand is a jet)."""
    sizes = [math.prod(s) for s in shapes]

    def g(z):
        parts, o = [], 0
        for s, n in zip(shapes, sizes):
            parts.append(z[o : o + n].reshape(s))
            o += n
        return fn(*parts)

    return g


def flat(*xs):
    return torch.cat([x.reshape(-1) for x in xs])


def close(a, b, tol=1e-9):
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().amax() if b.numel() else torch.tensor(0.0)
    err = (a - b).abs().amax() if b.numel() else torch.tensor(0.0)
    assert float(err) <= tol * (1.0 + float(scale)), f"max err {float(err):.3g} (scale {float(scale):.3g})"


def smooth(x):
    """A non-linear pre-map, so that the op meets a jet with all K+1 coefficients non-zero."""
    return x + 0.3 * torch.sin(x)


def check(fn, inputs, K=5, seed=1, tol=1e-9, oracle_fn=None):
    """Our jet of fn along random directions of every input vs nested autograd (of ``oracle_fn``,
    the same function written with ops whose higher derivatives PyTorch has, when given)."""
    shapes = [tuple(x.shape) for x in inputs]
    g = packed(fn, shapes)
    z = flat(*inputs)
    u = rnd(z.numel(), seed=seed)
    ours = cf.jet(g, z, u, K)
    oracle = baseline.jet(packed(oracle_fn or fn, shapes), z, u, K)
    close(ours, oracle, tol)
    close(ours[0], g(z), 1e-12)
    return ours


def check_fd(fn, inputs, K=4, seed=1):
    shapes = [tuple(x.shape) for x in inputs]
    g = packed(fn, shapes)
    z = flat(*inputs)
    u = rnd(z.numel(), seed=seed)
    ours = cf.jet(g, z, u, K)
    close(ours[0], g(z), 1e-12)
    assert_matches_fd(ours, g, [z], [u], order=K)
    return ours


X = rnd(4, 7, seed=11)
X3 = rnd(3, 4, 5, seed=12)

# -- selection --------------------------------------------------------------------------------

SELECTION = {
    "sort_last": (lambda x: torch.sort(smooth(x)).values, [X]),
    "sort_dim0_desc_stable": (lambda x: torch.sort(x, dim=0, descending=True, stable=True).values, [X]),
    "sort_method": (lambda x: smooth(x).sort(1)[0] * x, [X]),
    "msort": (lambda x: torch.msort(smooth(x)), [X]),
    "topk": (lambda x: torch.topk(smooth(x), 3, dim=1).values, [X]),
    "topk_smallest_unsorted": (lambda x: x.topk(2, 0, largest=False, sorted=False)[0], [X]),
    "kthvalue_keepdim": (lambda x: torch.kthvalue(smooth(x), 3, 0, keepdim=True).values, [X]),
    "kthvalue": (lambda x: torch.kthvalue(x, 2).values, [X3]),
    "median_all": (lambda x: torch.median(smooth(x)), [X]),
    "median_dim": (lambda x: torch.median(x, 1).values, [X3]),
    "nanmedian": (
        lambda x: torch.nanmedian(torch.where(torch.arange(7) % 3 == 0, float("nan"), smooth(x)), 1).values,
        [X],
    ),
    "nanmedian_all": (lambda x: torch.nanmedian(torch.where(torch.arange(7) == 2, float("nan"), x)), [X]),
    "mode_unique_values": (lambda x: torch.mode(smooth(x), 1).values, [X]),
    "mode_copies_move_together": (lambda x: torch.mode(torch.cat([x, x[:, 5:]], 1), 1).values, [X]),
    "cummax": (lambda x: torch.cummax(smooth(x), 1).values, [X]),
    "cummin": (lambda x: torch.cummin(x, dim=0).values, [X3]),
    "aminmax": (lambda x: torch.stack(torch.aminmax(smooth(x), dim=1)), [X]),
    "aminmax_all": (lambda x: torch.stack(torch.aminmax(x)), [X3]),
    "max_dim_0d": (lambda x: torch.max(smooth(x[0, 0]), 0).values + torch.min(x[1, 1], dim=-1, keepdim=True)[0], [X]),
    "quantile_scalar": (lambda x: torch.quantile(smooth(x), 0.3, dim=1), [X]),
    "quantile_vec_keepdim": (
        lambda x: torch.quantile(x, torch.tensor([0.1, 0.5, 0.95], dtype=D64), dim=0, keepdim=True),
        [X],
    ),
    "quantile_all": (lambda x: torch.quantile(smooth(x), 0.7), [X]),
    "quantile_midpoint": (lambda x: torch.quantile(x, 0.4, dim=2, interpolation="midpoint"), [X3]),
    "quantile_lower_higher_nearest": (
        lambda x: torch.stack([torch.quantile(x, 0.45, 1, interpolation=m) for m in ("lower", "higher", "nearest")]),
        [X],
    ),
    "quantile_q_jet": (lambda x, q: torch.quantile(smooth(x), q, dim=1), [X, torch.tensor([0.2, 0.6], dtype=D64)]),
    "nanquantile": (
        lambda x: torch.nanquantile(torch.where(torch.arange(7) % 4 == 1, float("nan"), smooth(x)), 0.35, dim=1),
        [X],
    ),
}


@pytest.mark.parametrize("name", sorted(SELECTION))
def test_selection(name):
    fn, inputs = SELECTION[name]
    check(fn, inputs, K=5)


UNIQUE = {  # no autograd through unique: the FD oracle
    "unique_copies": (lambda x: torch.unique(torch.cat([smooth(x), smooth(x)[:, :3]], 1)), [X]),
    "unique_dim_inverse": (lambda x: torch.unique(torch.cat([x, x[:2]]), dim=0, return_inverse=True)[0], [X]),
    "unique_consecutive": (lambda x: torch.unique_consecutive(x.repeat_interleave(2, 1), dim=1), [X]),
    "unique_consecutive_flat": (
        lambda x: torch.unique_consecutive(smooth(x).repeat_interleave(3), return_counts=True)[0],
        [X],
    ),
}


@pytest.mark.parametrize("name", sorted(UNIQUE))
def test_unique(name):
    fn, inputs = UNIQUE[name]
    check_fd(fn, inputs, K=4)


def test_sort_ties_pick_torchs_index():
    """At a tie the value is not differentiable; the rule follows the element torch returns."""
    x = torch.tensor([1.0, 0.5, 1.0, -2.0], dtype=D64)
    u = torch.tensor([3.0, 0.0, -1.0, 0.0], dtype=D64)
    res = torch.sort(x, stable=True)
    ours = cf.jet(lambda z: torch.sort(z, stable=True).values, x, u, 3)
    assert torch.equal(ours[1], u[res.indices])
    top = cf.jet(lambda z: torch.max(z, 0).values, x, u, 2)
    assert float(top[1]) == float(u[torch.max(x, 0).indices])


def test_unique_raises_when_equal_values_separate():
    x = torch.tensor([1.0, 2.0, 1.0], dtype=D64)
    u = torch.tensor([1.0, 0.0, -1.0], dtype=D64)
    with pytest.raises(JetError, match="unique"):
        cf.jet(lambda z: torch.unique(z), x, u, 2)
    with pytest.raises(JetError, match="unique_consecutive"):
        cf.jet(lambda z: torch.unique_consecutive(z.sort().values), x, u, 2)
    # copies that move together are fine, and the counts/inverse are constants
    out = cf.jet(lambda z: torch.unique(z, return_counts=True)[0], x, torch.tensor([1.0, 0.0, 1.0], dtype=D64), 2)
    assert torch.equal(out[1], torch.tensor([1.0, 0.0], dtype=D64))


def test_mode_raises_when_copies_separate():
    x = torch.tensor([[1.0, 3.0, 1.0, 2.0]], dtype=D64)
    u = torch.tensor([[1.0, 0.0, 2.0, 0.0]], dtype=D64)
    with pytest.raises(JetError, match="mode"):
        cf.jet(lambda z: torch.mode(z, 1).values, x, u, 2)


# -- products and scans -------------------------------------------------------------------------


def poly_prod(xs, us, K):
    """Exact Taylor coefficients of Π_i (x_i + t u_i) (polynomial multiplication; zeros allowed)."""
    c = torch.zeros(K + 1, dtype=D64)
    c[0] = 1.0
    for x, u in zip(xs.tolist(), us.tolist()):
        nxt = c * x
        nxt[1:] += c[:-1] * u
        c = nxt
    return c


def test_prod_with_zeros_exact():
    x = torch.tensor([[0.0, 2.0, 0.0, -1.5, 0.7], [1.0, 0.0, 3.0, 0.5, 2.0]], dtype=D64)
    u = rnd(2, 5, seed=3)
    K = 6
    ours = cf.jet(lambda z: torch.prod(z, 1), x, u, K)
    for r in range(2):
        close(ours[:, r], poly_prod(x[r], u[r], K), 1e-12)
    allp = cf.jet(lambda z: z.prod(), x, u, K)
    close(allp, poly_prod(x.reshape(-1), u.reshape(-1), K), 1e-12)
    cp = cf.jet(lambda z: torch.cumprod(z, dim=1), x, u, K)
    for r in range(2):
        for i in range(5):
            close(cp[:, r, i], poly_prod(x[r, : i + 1], u[r, : i + 1], K), 1e-12)


PRODUCTS = {
    "prod_dim_keepdim": (lambda x: torch.prod(smooth(x), 0, keepdim=True), [X]),
    "prod_odd_length": (lambda x: smooth(x).prod(dim=-1), [rnd(3, 11, seed=4)]),
    "prod_0d": (lambda x: torch.prod(x[0, 0], 0) * torch.prod(x[1, 1]), [X]),
    "cumprod": (lambda x: torch.cumprod(smooth(x), 2), [X3]),
    "var_mean": (lambda x: torch.stack(torch.var_mean(smooth(x), 1)), [X]),
    "var_mean_correction": (lambda x: torch.stack(torch.var_mean(x, dim=(0, 2), correction=0, keepdim=True)), [X3]),
    "std_mean": (lambda x: torch.stack(torch.std_mean(smooth(x), dim=0, unbiased=False)), [X]),
    "std_mean_all": (lambda x: torch.stack(torch.std_mean(x)), [X]),
    "nansum": (lambda x: torch.nansum(torch.where(torch.arange(7) % 3 == 0, float("nan"), smooth(x)), dim=1), [X]),
    "nanmean": (
        lambda x: torch.nanmean(torch.where(torch.arange(7) % 3 == 0, float("nan"), smooth(x)), dim=1, keepdim=True),
        [X],
    ),
    "nansum_all": (lambda x: torch.nansum(torch.where(torch.arange(7) == 1, float("nan"), x)), [X]),
    "norm_inf": (lambda x: torch.norm(smooth(x), float("inf"), dim=1) + torch.norm(x, float("-inf"), dim=1), [X]),
    "norm_p": (lambda x: torch.norm(smooth(x), 3, dim=1) + torch.linalg.vector_norm(x, -1.5, dim=1), [X]),
    "norm_0d": (lambda x: torch.norm(x[0, 0], float("-inf")) + torch.norm(x[0, 1], 2) + torch.norm(x[0, 2], 3), [X]),
    "vector_norm_all": (
        lambda x: torch.linalg.vector_norm(x, float("-inf")) + torch.linalg.vector_norm(x, 2.5, keepdim=True),
        [X3],
    ),
    "dist": (
        lambda x, y: torch.stack([torch.dist(x, y), torch.dist(x, y, float("inf")), torch.dist(x, y, 1.5)]),
        [X, rnd(7, seed=5)],
    ),
}


@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_products_and_norms(name):
    fn, inputs = PRODUCTS[name]
    check(fn, inputs, K=5)


def _lcse(z, dim):
    """log Σ_{j≤i} e^{z_j} by cumsum (PyTorch's own logcumsumexp double backward gives NaN)."""
    c = z.detach().amax(dim, keepdim=True)
    return torch.log(torch.cumsum(torch.exp(z - c), dim)) + c


def test_logcumsumexp():
    check(lambda x: torch.logcumsumexp(30.0 * smooth(x), 1), [X], oracle_fn=lambda x: _lcse(30.0 * smooth(x), 1))
    check(lambda x: torch.logcumsumexp(x, dim=0), [X3], oracle_fn=lambda x: _lcse(x, 0))
    x = torch.tensor([-800.0, 0.0, -1000.0, 3.0], dtype=D64)  # prefixes far below the row's max
    out = cf.jet(lambda z: torch.logcumsumexp(z, 0), x, torch.ones(4, dtype=D64), 3)
    assert torch.isfinite(out).all() and float(out[0, 0]) == -800.0 and float(out[1, 0]) == 1.0


def test_norm_p0_is_a_constant():
    out = cf.jet(lambda z: torch.norm(z, 0) + torch.linalg.vector_norm(z, 0, dim=1).sum(), X, rnd(4, 7, seed=2), 3)
    assert float(out[0]) == float(torch.norm(X, 0) + torch.linalg.vector_norm(X, 0, dim=1).sum())
    assert bool((out[1:] == 0).all())


# -- scatter and index ops ---------------------------------------------------------------------

IDX = torch.tensor([[0, 1, 2, 0, 3], [3, 2, 1, 0, 0]])  # repeats: several sources per place
IDX1 = torch.tensor([0, 2, 2, 4, 1, 0])


def _segments(reduce, **kw):
    return lambda x: torch.segment_reduce(smooth(x), reduce, **kw)


SCATTER_FD = {  # PyTorch has no (higher) derivatives for some of these: the FD oracle
    "scatter_multiply": (
        lambda x, s: torch.scatter(x, 1, IDX, s, reduce="multiply"),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "scatter_value_multiply": (lambda x: torch.scatter(x, 1, IDX, 1.7, reduce="multiply"), [rnd(2, 6, seed=5)]),
    "scatter_value_add": (lambda x: torch.scatter(x, 0, IDX[:, :4] % 2, -0.5, reduce="add"), [rnd(2, 6, seed=5)]),
    "scatter_reduce_prod_self": (
        lambda x, s: torch.scatter_reduce(x, 1, IDX, s, "prod"),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "scatter_reduce_prod_noself": (
        lambda x, s: torch.scatter_reduce(x, 1, IDX, s, "prod", include_self=False),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "index_reduce_prod": (
        lambda x, s: torch.index_reduce(x, 0, IDX1, s, "prod"),
        [rnd(5, 3, seed=7), rnd(6, 3, seed=8)],
    ),
    "index_reduce_prod_noself": (
        lambda x, s: x.index_reduce(1, IDX1 % 3, s, "prod", include_self=False),
        [rnd(2, 3, seed=7), rnd(2, 6, seed=8)],
    ),
    "segment_prod_lengths": (
        lambda x: torch.segment_reduce(x, "prod", lengths=torch.tensor([[2, 0, 3], [1, 4, 0]]), axis=1, initial=1.5),
        [rnd(2, 5, 2, seed=9)],
    ),
    "segment_prod_offsets": (
        lambda x: torch.segment_reduce(x, "prod", offsets=torch.tensor([0, 2, 2, 5]), axis=0),
        [rnd(5, 3, seed=9)],
    ),
    "scatter_reduce_prod_zeros": (
        lambda x, s: torch.scatter_reduce(
            x * torch.tensor([1.0, 0, 1, 1, 1, 1], dtype=D64),
            1,
            IDX,
            s * torch.tensor([1.0, 1, 0, 1, 0], dtype=D64),
            "prod",
        ),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "segment_prod_zeros": (
        lambda x: torch.segment_reduce(
            x * torch.tensor([1.0, 0, 1, 1, 0], dtype=D64), "prod", lengths=torch.tensor([2, 3])
        ),
        [rnd(5, seed=9)],
    ),
    "scatter_add_reduce": (
        lambda x, s: torch.scatter(x, 1, IDX, s, reduce="add"),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "segment_sum_2d": (
        _segments("sum", lengths=torch.tensor([[2, 0, 3], [1, 4, 0]]), axis=1, initial=0.5),
        [rnd(2, 5, 3, seed=9)],
    ),
    "segment_mean": (_segments("mean", lengths=torch.tensor([1, 1, 2, 1])), [rnd(5, 2, seed=9)]),
    "segment_mean_initial": (_segments("mean", offsets=torch.tensor([0, 2, 2, 5]), initial=1.0), [rnd(5, seed=9)]),
    "segment_max_initial_wins": (_segments("max", lengths=torch.tensor([2, 0, 3]), initial=0.2), [rnd(5, 4, seed=9)]),
    "segment_min": (_segments("min", lengths=torch.tensor([[2, 3], [4, 1]]), axis=1), [rnd(2, 5, seed=9)]),
    "as_strided_scatter":  # PyTorch's own backward is wrong here (src a view at an offset)
    (lambda x, s: torch.as_strided_scatter(x, s, (2, 3), (7, 2), 1), [X, rnd(2, 3, seed=3)]),
    "chunk_cat": (lambda a, b: torch._chunk_cat([a, b], 1, 3), [rnd(2, 5, seed=1), rnd(2, 3, 2, seed=2)]),
}


@pytest.mark.parametrize("name", sorted(SCATTER_FD))
def test_scatter_fd(name):
    fn, inputs = SCATTER_FD[name]
    check_fd(fn, inputs, K=4)


SCATTER = {
    "scatter_src": (
        lambda x, s: torch.scatter(x, 1, torch.tensor([[0, 2, 4], [5, 1, 3]]), s),
        [rnd(2, 6, seed=5), rnd(2, 3, seed=6)],
    ),
    "scatter_value": (lambda x: x.scatter(0, torch.tensor([[1, 0, 1]]), -2.5) * x, [rnd(2, 6, seed=5)]),
    "scatter_0d": (
        lambda x, s: torch.scatter(x[0, 0], 0, torch.tensor(0), s[0, 0]) * x[0, 1],
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "scatter_reduce_sum": (
        lambda x, s: torch.scatter_reduce(smooth(x), 1, IDX, s, "sum", include_self=False),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "scatter_reduce_mean": (
        lambda x, s: torch.scatter_reduce(x, 1, IDX, smooth(s), "mean"),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "scatter_reduce_mean_noself": (
        lambda x, s: torch.scatter_reduce(x, 1, IDX, s, "mean", include_self=False),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "scatter_reduce_amax": (
        lambda x, s: torch.scatter_reduce(smooth(x), 1, IDX, s, "amax"),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "scatter_reduce_amin_noself": (
        lambda x, s: torch.scatter_reduce(x, 1, IDX, smooth(s), "amin", include_self=False),
        [rnd(2, 6, seed=5), rnd(2, 5, seed=6)],
    ),
    "index_reduce_mean": (
        lambda x, s: torch.index_reduce(x, 0, IDX1, s, "mean", include_self=False),
        [rnd(5, 3, seed=7), rnd(6, 3, seed=8)],
    ),
    "index_reduce_amax": (
        lambda x, s: torch.index_reduce(x, 0, IDX1, smooth(s), "amax"),
        [rnd(5, 3, seed=7), rnd(6, 3, seed=8)],
    ),
    "index_reduce_amin_0d": (
        lambda x, s: torch.index_reduce(x[0, 0], 0, torch.tensor([0]), s[0, 0], "amin"),
        [rnd(5, 3, seed=7), rnd(6, 3, seed=8)],
    ),
    "index_put": (
        lambda x, v: x.index_put((torch.tensor([0, 2]), torch.tensor([1, 1])), v),
        [rnd(3, 4, seed=7), rnd(2, seed=8)],
    ),
    "index_put_acc_bool": (
        lambda x, v: torch.index_put(x, (torch.tensor([True, False, True]),), v, accumulate=True),
        [rnd(3, 4, seed=7), rnd(4, seed=8)],
    ),
    "index_put_acc_repeat": (
        lambda x, v: torch.index_put(x, (torch.tensor([[0], [2]]), torch.tensor([1, 1, 3])), v, True),
        [rnd(3, 4, seed=7), rnd(2, 3, seed=8)],
    ),
    "index_put_const_values": (
        lambda x: torch.index_put(x, (torch.tensor([1]),), torch.tensor(0.5, dtype=D64)),
        [rnd(3, 4, seed=7)],
    ),
    "put": (lambda x, s: torch.put(x, torch.tensor([5, -1, 0]), s), [rnd(3, 4, seed=7), rnd(3, seed=8)]),
    "put_accumulate": (
        lambda x, s: x.put(torch.tensor([5, 5, 0]), s, accumulate=True),
        [rnd(3, 4, seed=7), rnd(3, seed=8)],
    ),
    "index_fill": (lambda x: torch.index_fill(x, 1, torch.tensor([0, 2]), -1.25) * x, [rnd(3, 4, seed=7)]),
    "index_fill_0d_jet_value": (
        lambda x, v: (
            torch.index_fill(x[0, 0], 0, torch.tensor([0]), v[0]) + x.index_fill(0, torch.tensor([1]), v[1]).sum()
        ),
        [rnd(3, 4, seed=7), rnd(2, seed=8)],
    ),
    "masked_scatter": (
        lambda x, s: torch.masked_scatter(x, torch.tensor([True, False, True, True]), s),
        [rnd(3, 4, seed=7), rnd(13, seed=8)],
    ),
    "masked_scatter_broadcast_input": (
        lambda x, s: torch.masked_scatter(x, torch.tensor([[True, False, True, True], [False] * 4, [True] * 4]), s),
        [rnd(4, seed=7), rnd(2, 4, seed=8)],
    ),
    "unsafe_masked_index": (
        lambda x: torch._unsafe_masked_index(
            x, torch.tensor([[True, False, True]]), [torch.tensor([[0, 5, 2]]), torch.tensor([[1], [3]])], 0.25
        ),
        [rnd(3, 4, seed=7)],
    ),
    "unsafe_masked_index_put_acc": (
        lambda x, v: torch._unsafe_masked_index_put_accumulate(
            x, torch.tensor([[True], [False], [True]]), [torch.tensor([0, 9, 0])], v
        ),
        [rnd(3, 4, seed=7), rnd(3, 4, seed=8)],
    ),
}


@pytest.mark.parametrize("name", sorted(SCATTER))
def test_scatter(name):
    fn, inputs = SCATTER[name]
    check(fn, inputs, K=4)


def test_scatter_repeated_places_take_one_source_whole():
    """Several sources for one place (no reduction): one of them is chosen, all of its coefficients."""
    x, s = rnd(2, 6, seed=1), rnd(2, 5, seed=2)
    xj = JetTensor(torch.stack([x, rnd(2, 6, seed=3)]), 3)
    sj = JetTensor(torch.stack([s, rnd(2, 5, seed=4)]), 3)
    out = torch.scatter(xj, 1, IDX, sj).coeffs
    plain = torch.scatter(x, 1, IDX, s)
    assert torch.equal(out[0], plain)
    for r in range(2):
        for p in range(6):
            if (IDX[r] == p).any():
                src = [j for j in range(5) if IDX[r, j] == p and s[r, j] == plain[r, p]]
                assert any(torch.equal(out[:, r, p], sj.coeffs[:, r, j]) for j in src)
            else:
                assert torch.equal(out[:, r, p], xj.coeffs[:, r, p])


# -- structural ops -----------------------------------------------------------------------------

STRUCTURAL = {
    "narrow_tensor_start": (lambda x: torch.narrow(smooth(x), 1, torch.tensor(2), 3), [X]),
    "narrow_copy": (lambda x: torch.narrow_copy(x, 0, 1, 2), [X]),
    "tensor_split_tensor": (
        lambda x: torch.cat([p.sum(1) for p in torch.tensor_split(smooth(x), torch.tensor([1, 4]), dim=1)]),
        [X],
    ),
    "tensor_split_0d_sections": (lambda x: torch.stack([p.sum() for p in x.tensor_split(torch.tensor(3), 1)]), [X]),
    "aten_slice": (lambda x: torch.ops.aten.slice.Tensor(smooth(x), 1, 1, 6, 2), [X]),
    "as_strided_copy": (lambda x: torch.as_strided_copy(smooth(x), (3, 3), (1, 3), 2), [X]),
    "as_strided": (lambda x: smooth(x).as_strided((2, 2, 2), (7, 1, 3)), [X]),
    "combinations": (
        lambda x: torch.combinations(smooth(x), 3) * torch.combinations(x, 2, with_replacement=True).sum(),
        [rnd(5, seed=1)],
    ),
    "cartesian_prod": (lambda a, b: torch.cartesian_prod(smooth(a), b, a), [rnd(3, seed=1), rnd(2, seed=2)]),
    "meshgrid_xy": (
        lambda a, b: torch.stack(torch.meshgrid(smooth(a), b, indexing="xy")),
        [rnd(3, seed=1), rnd(4, seed=2)],
    ),
    "meshgrid_ij_const": (
        lambda a: torch.stack(torch.meshgrid([a, torch.ones(2, dtype=D64)], indexing="ij")),
        [rnd(3, seed=1)],
    ),
    "broadcast_tensors": (
        lambda a, b: torch.stack(torch.broadcast_tensors(a, smooth(b))),
        [rnd(3, 1, seed=1), rnd(4, seed=2)],
    ),
    "atleast_3d": (
        lambda a, b: torch.atleast_3d(a, b)[0] * torch.atleast_3d(b)[..., :1].sum(),
        [rnd(3, seed=1), rnd(2, 3, seed=2)],
    ),
    "atleast_1d_2d": (lambda a: torch.atleast_1d(a[0]) * torch.atleast_2d(a), [rnd(3, seed=1)]),
    "column_stack": (
        lambda a, b, c: torch.column_stack([a, smooth(b), c]) * torch.column_stack([c[0]]),
        [rnd(3, seed=1), rnd(3, 2, seed=2), rnd(3, seed=3)],
    ),
    "splits": (
        lambda x: torch.cat(
            [
                p.reshape(-1)
                for p in (
                    *torch.hsplit(x, 2),
                    *torch.vsplit(x, [1]),
                    *torch.split_with_sizes(x, [1, 3]),
                    *torch.unsafe_split(x, 3, 1),
                    *torch.unsafe_chunk(x, 2),
                )
            ]
        ),
        [rnd(4, 6, seed=1)],
    ),
    "dsplit": (lambda x: torch.stack(torch.dsplit(smooth(x), 5)), [X3]),
    "copies": (
        lambda x: torch.cat(
            [
                t.reshape(-1)
                for t in (
                    torch.view_copy(x, (2, 14)),
                    torch.permute_copy(x, (1, 0)),
                    torch.t_copy(x),
                    torch.transpose_copy(x, 0, 1),
                    torch.unsqueeze_copy(x, 1),
                    torch.squeeze_copy(x[:1]),
                    torch.expand_copy(x[:1], (3, 7)),
                    torch.diagonal_copy(x, 1),
                    *torch.unbind_copy(x, 1),
                    torch.unfold_copy(x, 1, 3, 2),
                    torch.alias_copy(x),
                    *torch.split_with_sizes_copy(x, [3, 4], 1),
                    torch.select_copy(x, 0, 2),
                    torch.slice_copy(x, 1, 0, 5, 2),
                )
            ]
        ),
        [X],
    ),
    "sum_to_size": (lambda x: smooth(x).sum_to_size(1, 5) + x.sum_to_size((4, 1)).sum(), [X3]),
    "fill_jet_value": (lambda x, v: torch.fill(x, v[0]) * x, [X, rnd(1, seed=3)]),
    "zero_": (lambda x: (x * 1).zero_() + smooth(x), [X]),
    "fill_": (lambda x: (x * 1).fill_(2.0) * x, [X]),
    "diff_prepend": (
        lambda x: torch.diff(smooth(x), n=2, dim=1, prepend=torch.ones(4, 1, dtype=D64), append=x[:, :2]),
        [X],
    ),
    "gradient_coords": (
        lambda x, c0, c1: torch.stack(
            torch.gradient(smooth(x), spacing=[c0.cumsum(0) * 0.1 + torch.arange(4), c1.exp().cumsum(0)], edge_order=2)
        ),
        [X[:, :5], rnd(4, seed=2), rnd(5, seed=3)],
    ),
    "gradient_coords_order1": (
        lambda x, c: torch.gradient(x, spacing=[c.exp().cumsum(0)], dim=1)[0],
        [X, rnd(7, seed=2)],
    ),
    "gradient_scalar": (
        lambda x: torch.cat([g.reshape(-1) for g in torch.gradient(smooth(x), spacing=0.7, dim=[0, 2], edge_order=2)]),
        [X3],
    ),
    "gradient_default": (lambda x: torch.stack(torch.gradient(x)), [X]),
    "trapezoid_x_jet": (lambda y, x: torch.trapezoid(smooth(y), x.exp().cumsum(0)), [X, rnd(7, seed=2)]),
    "trapz_dx": (lambda y: torch.trapz(smooth(y), dx=0.3, dim=0), [X]),
    "trapezoid_x_2d": (lambda y, x: torch.trapezoid(y, x, dim=0), [X, rnd(4, 7, seed=3)]),
    "trapezoid_x_broadcast": (
        lambda y, x: torch.trapezoid(smooth(y), x) + torch.cumulative_trapezoid(y, x, dim=-1).sum(1),
        [X3, rnd(1, 5, seed=3)],
    ),
    "cumulative_trapezoid": (
        lambda y, x: torch.cumulative_trapezoid(smooth(y), x) + torch.cumulative_trapezoid(y, dx=2.0),
        [X, rnd(7, seed=2)],
    ),
    "renorm": (lambda x: torch.renorm(smooth(x), 2, 0, 1.5), [X]),
    "renorm_inf": (lambda x: x.renorm(float("inf"), 1, 1.0), [X3]),
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_structural(name):
    fn, inputs = STRUCTURAL[name]
    check(fn, inputs, K=4)


def test_as_strided_outside_the_tensor_raises():
    with pytest.raises(JetError, match="as_strided"):
        cf.jet(lambda z: z[1:].as_strided((2,), (1,), 0), X, rnd(4, 7, seed=1), 2)


def test_max_pool_backward_linear_in_grad():
    x = rnd(1, 2, 5, 6, seed=1)
    out, idx = F.max_pool2d_with_indices(x, 2, 2)

    def fn(g):
        return torch.ops.aten.max_pool2d_with_indices_backward(g, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)

    g = rnd(*out.shape, seed=2)
    check(lambda z: fn(torch.sin(z)), [g], K=3)


# -- jets that store few coefficients, high orders, parameter gradients ------------------------


def test_short_jets_and_order_six():
    x, u = rnd(2, 5, seed=1), rnd(2, 5, seed=2)
    for fn in (
        lambda z: torch.prod(z, 1),
        lambda z: torch.cumprod(z, 0),
        lambda z: torch.sort(z, 1).values,
        lambda z: torch.quantile(z, 0.3, 1),
        lambda z: torch.scatter_reduce(z, 1, IDX[:, :3] % 5, z[:, :3], "amin"),
    ):
        close(cf.jet(fn, x, u, 6), baseline.jet(fn, x, u, 6), 1e-9)
    close(cf.jet(lambda z: torch.logcumsumexp(z, 1), x, u, 6), baseline.jet(lambda z: _lcse(z, 1), x, u, 6), 1e-9)


PARAM_CASES = {  # (fn, the same function for the nested-autograd oracle where it differs)
    "prod": (lambda z, w: torch.prod(z * w, 1), None),
    "cumprod": (lambda z, w: torch.cumprod(torch.sin(z) + w, 1), None),
    "logcumsumexp": (lambda z, w: torch.logcumsumexp(z * w, 1), lambda z, w: _lcse(z * w, 1)),
    "sort_quantile": (lambda z, w: torch.sort(z * w, 1).values[:, 1] + torch.quantile(z + w, 0.4, dim=1), None),
    "scatter_reduce_amax": (
        lambda z, w: torch.scatter_reduce(z, 1, IDX[:, :5] % 5, z * w, "amax", include_self=False),
        None,
    ),
    "scatter_reduce_mean": (lambda z, w: torch.scatter_reduce(z * w, 1, IDX % 5, torch.sin(z * w), "mean"), None),
    "gradient": (lambda z, w: torch.gradient(torch.tanh(z * w), dim=1)[0], None),
}


@pytest.mark.parametrize("name", sorted(PARAM_CASES))
def test_parameter_gradient(name):
    """The coefficients are differentiable in a parameter: their gradient matches nested autograd's."""
    fn, oracle_fn = PARAM_CASES[name]
    x, u = rnd(2, 5, seed=1), rnd(2, 5, seed=2)
    w = (rnd(5, seed=3) * 0.5 + 1.0).requires_grad_(True)
    weights = rnd(5, 2, seed=4)
    K = 4
    ours = cf.jet(lambda z: fn(z, w), x, u, K)
    ref = baseline.jet(lambda z: (oracle_fn or fn)(z, w), x, u, K)
    close(ours, ref)
    (ga,) = torch.autograd.grad((ours.reshape(K + 1, -1)[:, :2] * weights).sum(), w)
    (gb,) = torch.autograd.grad((ref.reshape(K + 1, -1)[:, :2] * weights).sum(), w)
    close(ga, gb, 1e-8)
