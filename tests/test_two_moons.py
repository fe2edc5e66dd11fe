"""The Two Moons protocol (curvrate_fast.experiments.two_moons, docs/math.md §6): the data follow
scikit-learn draw for draw, the batch order follows the DataLoader, both engines agree, and CRR
lowers λ."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curvrate_fast.experiments import two_moons as tm


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("seed", [42, 7])
def test_builtin_data_equals_sklearn(seed):
    pytest.importorskip("sklearn")
    a = tm.make_moons(3000, 0.2, seed, use_sklearn=True)
    b = tm.make_moons(3000, 0.2, seed, use_sklearn=False)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert np.allclose(tm.standardize(a[0], True), tm.standardize(a[0], False), rtol=0, atol=1e-12)
    for p, q in zip(tm.train_test_split(3000, 0.3, seed, True),
                    tm.train_test_split(3000, 0.3, seed, False)):
        assert np.array_equal(np.sort(p), np.sort(q)) and np.array_equal(p, q)


def test_make_data_protocol():
    d = tm.make_data(42, 0.3, use_sklearn=False)
    assert d.x_train.shape == (2100, 2) and d.x_test.shape == (900, 2)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    x = torch.cat([d.x_train, d.x_test]).double()
    assert torch.allclose(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-6)   # fit on all
    clean = tm.make_data(42, 0.0, use_sklearn=False)
    assert torch.equal(clean.x_test, d.x_test)                       # flipping does not move points
    flipped = int((clean.y_train != d.y_train).sum() + (clean.y_test != d.y_test).sum())
    assert flipped == int(0.3 * 3000)                                # before the split: test is noisy
    assert int((clean.y_test != d.y_test).sum()) > 0
    with pytest.raises(ValueError):
        tm.make_data(42, 1.5)


def test_epoch_batches_follow_the_dataloader():
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(5)
    dl = DataLoader(TensorDataset(torch.arange(2100)), batch_size=128, shuffle=True)
    ref = [b[0] for _ in range(2) for b in dl]
    state = torch.get_rng_state()
    torch.manual_seed(5)
    ours = [b for _ in range(2) for b in tm.epoch_batches(2100, 128)]
    assert len(ours) == len(ref) == 34 and all(torch.equal(p, q) for p, q in zip(ours, ref))
    assert torch.equal(torch.get_rng_state(), state)                 # same draws from the global RNG


def test_mlp_init():
    tm.set_seed(1)
    m = tm.MLP()
    assert [tuple(p.shape) for p in m.parameters()] == [(64, 2), (64,), (64, 64), (64,), (2, 64), (2,)]
    assert all(float(b.detach().abs().max()) == 0 for n, b in m.named_parameters() if n.endswith("bias"))
    bound = (6 / (64 + 64)) ** 0.5                                   # Xavier-uniform
    assert float(m.fc2.weight.detach().abs().max()) <= bound


def test_crr_engines_agree():
    """Same random stream → our polarized Taylor-mode penalty equals the nested-autograd one
    (mixed derivatives with a fresh direction per order), value and parameter gradients."""
    tm.set_seed(3)
    m = tm.MLP()
    x, y = torch.randn(128, 2), torch.randint(0, 2, (128,))
    out = {}
    for eng in tm.ENGINES:
        m.zero_grad()
        torch.manual_seed(11)
        r = tm.crr_term(eng, m, x, y, scale=1.0)
        r.backward()
        out[eng] = (r.detach(), [p.grad.clone() for p in m.parameters()])
        assert torch.get_rng_state().numel() > 0
    (a, ga), (b, gb) = out["ours"], out["baseline"]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    for p, q in zip(ga, gb):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-6)


def test_nested_crr_small_batch_uses_all():
    tm.set_seed(0)
    m = tm.MLP()
    x, y = torch.randn(52, 2), torch.randint(0, 2, (52,))
    torch.manual_seed(0)
    tm.nested_crr_penalty(m, x, y, subset=64)
    s1 = torch.get_rng_state()
    torch.manual_seed(0)
    torch.randn(52, 2), torch.randn(52, 2), torch.randn(52, 2)     # no randperm: 3 directions only
    assert torch.equal(s1, torch.get_rng_state())
    with pytest.raises(ValueError):
        tm.nested_crr_penalty(m, x, y, orders=(3, 2))


def test_boundary_lambda_engines_agree_and_training_is_deterministic():
    d = tm.make_data(43, 0.3, use_sklearn=False)
    r1 = tm.train_model(d, 1043, epochs=3)
    r2 = tm.train_model(d, 1043, epochs=3)
    for p, q in zip(r1.model.parameters(), r2.model.parameters()):
        assert torch.equal(p, q)
    lams = {}
    for eng in tm.ENGINES:
        torch.manual_seed(9)
        lams[eng] = tm.boundary_lambda(r1.model, d.x_test, d.y_test, engine=eng)
    a, b = lams["ours"], lams["baseline"]
    assert a.n_samples == b.n_samples > 0 and a.max_order == 4 and a.n_dirs == 2
    assert abs(a.value - b.value) < 1e-4
    assert torch.allclose(a.log_norms, b.log_norms, atol=1e-4)
    assert a.extra["n_in_band"] >= 0 and r1.model.training is False
    with pytest.raises(ValueError):
        tm.boundary_lambda(r1.model, d.x_test, d.y_test, engine="nope")


def test_boundary_lambda_fallback():
    """A model that is confident everywhere: no point in the band, the 600 closest are used."""
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[50.0, 0.0], [-50.0, 0.0]]))
        m.bias.zero_()
    x = torch.rand(900, 2) + 0.5
    y = torch.zeros(900, dtype=torch.int64)
    r = tm.boundary_lambda(torch.nn.Sequential(m, torch.nn.Tanh(), torch.nn.Linear(2, 2)), x, y)
    r2 = tm.boundary_lambda(m, x, y)
    assert r2.band_fallback and r2.n_samples == 600
    assert r.n_samples > 0


def test_crr_lowers_lambda():
    """The paper's claim on its own protocol (30 % label noise, 25 epochs), paired by seed:
    CRR 1e-2 lowers λ on the boundary band, with the error nearly unchanged (seed 43; the demo
    test checks seed 42 at 3e-3)."""
    for seed in (43,):
        d = tm.make_data(seed, 0.3, use_sklearn=False)
        lam, err = {}, {}
        for scale in (0.0, 1e-2):
            r = tm.train_model(d, seed + 1000, epochs=25, crr_scale=scale, engine="ours")
            lam[scale] = tm.boundary_lambda(r.model, d.x_test, d.y_test).value
            err[scale] = tm.test_metrics(r.model, d)["test_error"]
        assert lam[1e-2] < lam[0.0] - 0.2, (seed, lam)
        assert abs(err[1e-2] - err[0.0]) < 0.03, (seed, err)


def test_train_model_tracks_without_changing_training():
    d = tm.make_data(44, 0.3, use_sklearn=False)
    seen = []
    a = tm.train_model(d, 1044, epochs=4, track_every=2, on_epoch=seen.append)
    b = tm.train_model(d, 1044, epochs=4)
    assert seen == [1, 2, 3, 4] and [h.epoch for h in a.history] == [1, 2, 4]
    assert all(len(h.mean_log) == 4 and np.isfinite(h.lam) for h in a.history)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError):
        tm.train_model(d, 1, epochs=1, engine="nope")
    logits = a.model(d.x_test)
    assert F.cross_entropy(logits, d.y_test) < 0.75
