"""curvrate_fast.crr: the CRR penalty (docs/math.md §4) against nested autograd in float64 — values and
parameter gradients, fixed and per-order (polarization) directions, subset, reductions, scale —
and CRRLoss with every-k-th-step application."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _curv_oracle import data, nested_fixed, nested_mixed, tiny_mlp, unit

import curvrate_fast
from curvrate_fast.crr import CRRLoss, crr_penalty, parse_orders, subset_indices
from curvrate_fast.directions import sample_directions


def _grads(model, value):
    return torch.autograd.grad(value, list(model.parameters()))


def _close(a, b, tol=1e-9):
    return all(torch.allclose(x, y, rtol=tol, atol=tol * 1e-2) for x, y in zip(a, b))


# --- orders and subsets -------------------------------------------------------------------------
def test_parse_orders():
    assert parse_orders((2, 4)) == (2, 3, 4)
    assert parse_orders((1, 3)) == (1, 2, 3)
    assert parse_orders((2, 2)) == (2,)
    assert parse_orders([2, 4]) == (2, 4)
    assert parse_orders(range(1, 4)) == (1, 2, 3)
    assert parse_orders((1, 2, 4)) == (1, 2, 4)
    assert parse_orders(3) == (3,)
    for bad in [(3, 2), 0, [0, 1], [], "12", True]:
        with pytest.raises((ValueError, TypeError)):
            parse_orders(bad)


def test_subset_indices():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    idx = subset_indices(64, 128, g1)
    assert torch.equal(idx, torch.randperm(128, generator=g2)[:64])
    assert len(set(idx.tolist())) == 64
    assert subset_indices(0.25, 10, torch.Generator().manual_seed(0)).numel() == 2   # round(2.5)=2
    assert subset_indices(0.01, 10, torch.Generator().manual_seed(0)).numel() == 1
    assert subset_indices(None, 10) is None and subset_indices(10, 10) is None
    assert subset_indices(1.0, 10) is None
    for bad in [0, -3, 0.0, 1.5, "half", True]:
        with pytest.raises((ValueError, TypeError)):
            subset_indices(bad, 10)


# --- fixed directions -----------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fixed_penalty_value_and_gradient_match_oracle(reduction):
    m = tiny_mlp(0)
    x, y = data(0, B=9)
    U = unit((2, 9, 3), 1)
    R = crr_penalty(m, x, y, orders=(2, 4), n_dirs=2, directions=U, order_reduction=reduction,
                    scale=0.37)
    d = nested_fixed(m, x, y, U, 4)                                  # (4, 2, 9)
    terms = torch.stack([d[n - 1].abs().mean() for n in (2, 3, 4)])
    ref = 0.37 * (terms.mean() if reduction == "mean" else terms.sum())
    assert R.item() == pytest.approx(ref.item(), rel=1e-11)
    assert R.dim() == 0
    assert _close(_grads(m, R), _grads(m, ref))


def test_fixed_single_direction_tensor_and_sum_is_orders_times_mean():
    m = tiny_mlp(1)
    x, y = data(1, B=7)
    u = unit((7, 3), 2)
    Rm = crr_penalty(m, x, y, orders=(1, 3), directions=u)
    Rs = crr_penalty(m, x, y, orders=(1, 3), directions=u, order_reduction="sum")
    assert Rs.item() == pytest.approx(3 * Rm.item(), rel=1e-13)
    d = torch.stack(nested_mixed(m, x, y, [u] * 3))
    assert Rm.item() == pytest.approx(d.abs().mean(1).mean().item(), rel=1e-11)
    # explicit list of orders: exactly orders 1 and 3
    R13 = crr_penalty(m, x, y, orders=[1, 3], directions=u)
    assert R13.item() == pytest.approx(((d[0].abs().mean() + d[2].abs().mean()) / 2).item(),
                                       rel=1e-11)


def test_generator_draws_directions_like_sample_directions():
    m = tiny_mlp(2)
    x, y = data(2, B=6)
    R = crr_penalty(m, x, y, orders=(2, 3), n_dirs=3, generator=torch.Generator().manual_seed(9))
    U = sample_directions(x, 3, generator=torch.Generator().manual_seed(9))
    assert R.item() == pytest.approx(crr_penalty(m, x, y, orders=(2, 3), directions=U).item(),
                                     rel=1e-14)
    torch.manual_seed(4)
    a = crr_penalty(m, x, y).item()
    torch.manual_seed(4)
    assert crr_penalty(m, x, y).item() == a


def test_draw_directions_are_the_draws_of_sample_directions():
    """A captured program normalizes the raw draws inside its graph: the draws must be the very
    numbers sample_directions normalizes (same generator calls, same order)."""
    from curvrate_fast.directions import draw_directions, normalize_directions
    x = torch.randn(7, 3, 2, dtype=torch.float64)
    d = draw_directions(x, 3, generator=torch.Generator().manual_seed(5))
    u = sample_directions(x, 3, generator=torch.Generator().manual_seed(5))
    assert d.shape == u.shape == (3, 7, 3, 2)
    assert torch.equal(normalize_directions(d, batch_dims=2), u)
    assert not torch.allclose(d, u)            # raw: not unit vectors
    torch.manual_seed(2)
    a = draw_directions(x, 2)
    torch.manual_seed(2)
    assert torch.equal(normalize_directions(a, batch_dims=2), sample_directions(x, 2))


# --- per-order directions (polarization) ----------------------------------------------------------
@pytest.mark.parametrize("orders", [(2, 3), (1, 4)])
def test_per_order_matches_notebook_nested_mixed_derivatives(orders):
    m = tiny_mlp(3)
    x, y = data(3, B=8)
    us = [unit((8, 3), 10 + i) for i in range(orders[1])]
    R = crr_penalty(m, x, y, orders=orders, directions=us, scale=2.0)
    d = nested_mixed(m, x, y, us)                                     # Dⁿℓ[u_1..u_n]
    ref = 2.0 * torch.stack([d[n - 1].abs().mean() for n in range(orders[0], orders[1] + 1)]).mean()
    assert R.item() == pytest.approx(ref.item(), rel=1e-9)
    assert _close(_grads(m, R), _grads(m, ref))
    # the mixed derivative differs from the fixed-direction one
    Rf = crr_penalty(m, x, y, orders=orders, directions=us[0], scale=2.0)
    assert abs(Rf.item() - R.item()) > 1e-3 * abs(R.item())


def test_per_order_terms_are_the_mixed_derivatives_themselves():
    # compare each order separately (not only the mean) with several direction sets
    m = tiny_mlp(4)
    x, y = data(4, B=5)
    us = [unit((2, 5, 3), 20 + i) for i in range(3)]                  # 2 direction sets
    for n in (1, 2, 3):
        R = crr_penalty(m, x, y, orders=n, directions=us[:n] if n > 1 else [us[0]])
        ref = torch.stack([torch.stack(nested_mixed(m, x, y, [u[k] for u in us[:n]]))[n - 1]
                           for k in range(2)]).abs().mean()
        assert R.item() == pytest.approx(ref.item(), rel=1e-9), n


def test_per_order_generator_draw_order():
    m = tiny_mlp(5)
    x, y = data(5, B=6)
    R = crr_penalty(m, x, y, orders=(2, 3), n_dirs=2, directions="per_order",
                    generator=torch.Generator().manual_seed(1))
    U = sample_directions(x, 2 * 3, generator=torch.Generator().manual_seed(1)).reshape(2, 3, 6, 3)
    R2 = crr_penalty(m, x, y, orders=(2, 3), directions=[U[:, i] for i in range(3)])
    assert R.item() == pytest.approx(R2.item(), rel=1e-14)


# --- subset -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("directions", ["fixed", "per_order"])
def test_subset_penalizes_the_drawn_samples(directions):
    m = tiny_mlp(6)
    x, y = data(6, B=12)
    R = crr_penalty(m, x, y, orders=(2, 3), directions=directions, subset=0.5,
                    generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    idx = torch.randperm(12, generator=g)[:6]
    xs, ys = x[idx], y[idx]
    if directions == "fixed":
        U = sample_directions(xs, 1, generator=g)
        d = nested_fixed(m, xs, ys, U, 3)[:, 0]
    else:
        U = sample_directions(xs, 3, generator=g)
        d = torch.stack(nested_mixed(m, xs, ys, list(U)))
    ref = torch.stack([d[1].abs().mean(), d[2].abs().mean()]).mean()
    assert R.item() == pytest.approx(ref.item(), rel=1e-9)
    assert _close(_grads(m, R), _grads(m, ref))


def test_subset_with_explicit_full_batch_directions():
    m = tiny_mlp(7)
    x, y = data(7, B=10)
    U = unit((10, 3), 3)
    R = crr_penalty(m, x, y, orders=(2, 2), directions=U, subset=4,
                    generator=torch.Generator().manual_seed(8))
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(8))[:4]
    d = nested_mixed(m, x[idx], y[idx], [U[idx]] * 2)
    assert R.item() == pytest.approx(d[1].abs().mean().item(), rel=1e-9)


# --- CRRLoss --------------------------------------------------------------------------------------
def test_crrloss_every_k_and_values():
    m = tiny_mlp(8)
    x, y = data(8, B=8)
    U = unit((8, 3), 4)
    crit = CRRLoss(orders=(2, 3), directions=U, scale=0.5, every=3)
    ce = F.cross_entropy(m(x), y)
    R = crr_penalty(m, x, y, orders=(2, 3), directions=U, scale=0.5)
    applied = []
    for step in range(7):
        assert crit.penalty_due() == (step % 3 == 0)
        loss = crit(m, x, y)
        applied.append(crit.last_penalty is not None)
        target = ce + R if step % 3 == 0 else ce
        assert loss.item() == pytest.approx(target.item(), rel=1e-12)
        assert crit.last_task_loss.item() == pytest.approx(ce.item(), rel=1e-12)
    assert applied == [True, False, False, True, False, False, True] and crit.step == 7
    # gradient of the combined loss = gradient of CE + gradient of the penalty
    crit.step = 0
    g = _grads(m, crit(m, x, y))
    assert _close(g, _grads(m, ce + R))
    assert crit.last_terms.shape == (2,)
    # eval mode: always penalized, the step counter stays
    crit.eval()
    crit.step = 1
    assert crit(m, x, y).item() == pytest.approx((ce + R).item(), rel=1e-12) and crit.step == 1


def test_crrloss_subset_uses_full_batch_task_loss_and_trains():
    torch.manual_seed(0)
    m = tiny_mlp(9)
    x, y = data(9, B=16)
    crit = CRRLoss(orders=(2, 3), directions="per_order", subset=8, scale=1e-2,
                   generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    first = None
    for _ in range(5):
        opt.zero_grad()
        loss = crit(m, x, y)
        assert crit.last_task_loss.item() == pytest.approx(F.cross_entropy(m(x), y).item(), rel=1e-12)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert "every=1" in repr(crit)


@pytest.mark.parametrize("compile", [False, "eager"])
def test_crrloss_subset_task_loss_reads_penalized_samples_off_the_jet_pass(compile):
    """With a subset, the penalized samples' task losses come from the jet pass (coefficient 0):
    only the other samples get a plain forward. Value and gradients equal CE over the whole batch
    plus the penalty with the same draws (float64), and the plain forward sees B − k rows."""
    torch.manual_seed(0)
    m = tiny_mlp(11)
    x, y = data(11, B=12)
    seen = []
    m.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape[0]) if type(args[0]) is torch.Tensor else None)
    kw = dict(orders=(2, 3), directions="per_order", subset=5, scale=0.3)
    if compile:   # a captured program refuses hooks: count the rows without one
        m._forward_pre_hooks.clear()
    crit = CRRLoss(**kw, generator=torch.Generator().manual_seed(3), compile=compile)
    crit(m, x, y)                       # the first call of a configuration (probe, capture)
    seen.clear()
    loss = crit(m, x, y)
    if not compile:
        assert seen == [12 - 5]
    R = crr_penalty(m, x, y, **kw, generator=_state_after_draws(3, 2))
    target = F.cross_entropy(m(x), y) + R
    assert loss.item() == pytest.approx(target.item(), rel=1e-12)
    assert _close(_grads(m, loss), _grads(m, target), tol=1e-12)


def _state_after_draws(seed: int, calls: int) -> torch.Generator:
    """A generator seeded like CRRLoss's, advanced past ``calls - 1`` CRR draws (subset + the per-order
    directions), so its next draws are those of call number ``calls``."""
    g = torch.Generator().manual_seed(seed)
    from curvrate_fast.crr import _crr_plan
    x, y = data(11, B=12)
    for _ in range(calls - 1):
        _crr_plan(x, y, loss_fn=None, orders=(2, 3), n_dirs=1, directions="per_order",
                  order_reduction="mean", subset=5, scale=0.3, generator=g)
    return g


# --- bad input --------------------------------------------------------------------------------------
def test_bad_inputs():
    m = tiny_mlp(10)
    x, y = data(10, B=5)
    with pytest.raises(ValueError, match="n_dirs"):
        crr_penalty(m, x, y, n_dirs=0)
    with pytest.raises(ValueError, match="order_reduction"):
        crr_penalty(m, x, y, order_reduction="max")
    with pytest.raises(ValueError, match="directions"):
        crr_penalty(m, x, y, directions="random")
    with pytest.raises(TypeError, match="directions"):
        crr_penalty(m, x, y, directions=3)
    with pytest.raises(ValueError, match="orders"):
        crr_penalty(m, x, y, orders=(0, 2))
    with pytest.raises(ValueError, match="one loss per sample"):
        crr_penalty(m, x, y, loss_fn=lambda z, t: F.cross_entropy(z, t))
    with pytest.raises(TypeError, match="default loss .* logits as one tensor, got tuple"):
        crr_penalty(lambda x: (m(x), x), x, y)         # a tuple output needs a loss_fn that picks
    with pytest.raises(TypeError, match="logits as one tensor, got tuple"):
        curvrate_fast.curvature_rate(lambda x: (m(x), x), x, y)
    with pytest.raises(ValueError, match=r"logits of shape \(B, C, ...\).* got shape \(5,\)"):
        crr_penalty(lambda x: m(x).sum(1), x, y)          # one value per sample: a regression needs a loss_fn
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        crr_penalty(m, x, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="≥ 0"):
        crr_penalty(m, x, torch.tensor([0, 1, 2, -1, 0]))
    u = unit((5, 3), 0)
    u[3] = 0
    with pytest.raises(ValueError, match="zero for sample 3"):
        crr_penalty(m, x, y, directions=u)
    with pytest.raises(ValueError, match="u_1..u_3"):
        crr_penalty(m, x, y, orders=(2, 3), directions=[unit((5, 3), 1)] * 2)
    with pytest.raises(ValueError, match="finite"):
        crr_penalty(m, x, y, scale=float("nan"))
    with pytest.raises(ValueError, match="every"):
        CRRLoss(every=0)
    R = crr_penalty(m, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(R) and R.item() > 0


def test_per_order_on_a_small_cnn_with_image_inputs():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
                            torch.nn.Flatten(), torch.nn.Linear(12, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=g)
    R = crr_penalty(m, x, y, orders=(2, 3), directions="per_order",
                    generator=torch.Generator().manual_seed(3))
    us = list(sample_directions(x, 3, generator=torch.Generator().manual_seed(3)))
    assert torch.allclose(us[0].reshape(5, -1).norm(dim=1), torch.ones(5, dtype=torch.float64))
    d = nested_mixed(m, x, y, us)
    ref = (d[1].abs().mean() + d[2].abs().mean()) / 2
    assert R.item() == pytest.approx(ref.item(), rel=1e-9)
    assert _close(_grads(m, R), _grads(m, ref))


def test_per_order_every_order_from_the_shared_top_order_rows():
    # orders 1–4 in one call: each per-order term must equal the notebooks' Dⁿℓ[u_1..u_n]
    m = tiny_mlp(11)
    x, y = data(11, B=6)
    us = [unit((6, 3), 40 + i) for i in range(4)]
    crit = CRRLoss(orders=(1, 4), directions=us, scale=1.0)
    crit(m, x, y)
    d = nested_mixed(m, x, y, us)
    ref = torch.stack([v.abs().mean() for v in d]).detach()
    assert torch.allclose(crit.last_terms, ref, rtol=1e-9)


# --- random ops with per-order (polarization) directions ------------------------------------------
class _NoisyNet(torch.nn.Module):
    """Dropout, alpha dropout, rrelu and a noise layer drawn from an activation: every kind of random
    rule the engine has, in train mode."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(3, 12).double(), torch.nn.Linear(12, 12).double(),
                                  torch.nn.Linear(12, 3).double())

    def forward(self, x):
        h = torch.nn.functional.dropout(torch.tanh(self.a(x)), 0.3, self.training)
        h = torch.nn.functional.rrelu(self.b(h), training=self.training)
        h = torch.nn.functional.alpha_dropout(h, 0.2, self.training)
        return self.c(h + 0.1 * torch.randn_like(h))


def test_per_order_directions_share_the_random_draws_of_a_sample():
    """Polarization combines M jets of one sample: in train mode they must see one function (one
    dropout mask...), the one the paper's nested-autograd forward draws. Against nested autograd
    with a fresh direction per order and the same seed: the penalty and its gradients agree
    (before: every polarization row drew its own masks, the penalty was the derivative of no
    function: 0.0062 against 0.0081 here)."""
    torch.manual_seed(0)
    model = _NoisyNet().train()
    x, y = data(3, B=5)
    us = [unit((5, 3), 20 + i) for i in range(3)]
    torch.manual_seed(11)
    R = crr_penalty(model, x, y, orders=(2, 3), directions=us, order_reduction="sum")
    g = _grads(model, R)
    torch.manual_seed(11)
    d = nested_mixed(model, x, y, us)                      # [D¹ℓ[u_1], D²ℓ[u_1,u_2], D³ℓ[u_1,u_2,u_3]]
    R_ref = d[1].abs().mean() + d[2].abs().mean()
    assert R.item() == pytest.approx(R_ref.item(), rel=1e-10)
    assert _close(g, _grads(model, R_ref), tol=1e-9)


def test_per_order_directions_refuse_a_plain_per_row_draw(monkeypatch):
    """A random plain tensor with one row per jet row (a hand-written dropout mask) is not seen by
    any rule, so it cannot be shared: refused with its name. A draw not tied to the rows passes.
    (The polarization pass; a multilinear one has one row per sample: tests/test_multilinear.py.)"""
    from curvrate_fast.jets import multilinear
    monkeypatch.setattr(multilinear, "probe", lambda *a, **k: multilinear.Probe(False))
    torch.manual_seed(1)
    lin = torch.nn.Linear(3, 3).double()
    x, y = data(4, B=4)

    def hand_dropout(z):
        h = lin(z)
        return h * (torch.rand(h.shape, dtype=h.dtype) > 0.2)

    def scalar_noise(z):
        return lin(z) * (1 + 0.1 * torch.rand(()).item())
    with pytest.raises(curvrate_fast.JetError, match="torch.rand drew a plain tensor"):
        crr_penalty(hand_dropout, x, y, orders=(2, 3), directions="per_order")
    crr_penalty(scalar_noise, x, y, orders=(2, 3), directions="per_order")
    crr_penalty(hand_dropout, x, y, orders=(2, 3), directions="fixed")      # one row per sample: fine


@pytest.mark.parametrize("fixed", [False, True], ids=["per_order", "fixed"])
@pytest.mark.parametrize("kind", ["normal", "bernoulli_of_a_jet", "uniform_fill", "rrelu_with_noise"])
def test_per_order_directions_share_the_other_random_rules(kind, fixed):
    """The other random rules in a per-order pass: torch.normal with a jet mean, bernoulli of a jet
    (a constant draw), an in-place uniform_ fill of a jet (a constant), rrelu_with_noise (its noise
    buffer written as torch writes it): against nested autograd with the same seed. (PyTorch's
    autograd gives torch.normal no derivative in its mean; the engine's is the pathwise one,
    mean + std·z for the draw z, so the oracle runs that form with the same z; the primal's
    parameter gradient followed autograd's zero before, in fixed and per-order passes alike.)"""
    torch.manual_seed(2)
    lin, out = torch.nn.Linear(3, 8).double(), torch.nn.Linear(8, 3).double()

    def model(z, oracle=False):
        h = torch.tanh(lin(z))
        if kind == "normal" and oracle:
            h = h + 0.1 * torch.normal(torch.zeros_like(h), torch.ones_like(h))
        elif kind == "normal":
            h = torch.normal(h, 0.1)
        elif kind == "bernoulli_of_a_jet":
            h = h * torch.bernoulli(torch.sigmoid(h))
        elif kind == "uniform_fill":
            h = h + 0.1 * (h * 1.0).uniform_()
        else:
            noise = torch.empty(h.shape, dtype=h.dtype)
            h = torch._C._nn.rrelu_with_noise(h - 0.3, noise, 0.1, 0.3, True)
        return out(h)
    x, y = data(5, B=4)
    us = [unit((4, 3), 30 + i) for i in range(3)]
    if fixed:
        us = [us[0]] * 3
    params = list(lin.parameters()) + list(out.parameters())
    torch.manual_seed(12)
    R = crr_penalty(model, x, y, orders=(2, 3), directions=us[0] if fixed else us, order_reduction="sum")
    torch.manual_seed(12)
    d = nested_mixed(lambda z: model(z, oracle=True), x, y, us)
    R_ref = d[1].abs().mean() + d[2].abs().mean()
    assert R.item() == pytest.approx(R_ref.item(), rel=1e-10)
    g, g_ref = torch.autograd.grad(R, params), torch.autograd.grad(R_ref, params)
    assert _close(g, g_ref, tol=1e-9)
