"""``python -m curvrate_fast demo``: Two Moons with 30 % label noise, trained without and with
CRR (orders 2-3, a fresh direction per order, 64 of each 128, scale 3e-3) on several data seeds
(10 by default), λ tracked over the epochs; then the CRR training step timed with our Taylor-mode
engine against nested autograd on the same model.

The CRR runs train on the library's recommended fast path: each training step as one captured
program (``CRRLoss(..., compile=True).train_step``: the CE, the penalty, their gradients and the
Adam update recorded once per batch shape as one graph, compiled by inductor; docs/design.md §6).
Its first calls per shape cost the capture and inductor's compile (a few seconds on 2 CPU cores
the first time; inductor caches on disk, so later runs start faster). The speed line compares a
whole training step (CE + CRR, backward, Adam) on that path, on ``CRRLoss(compile=True)``
followed by ``backward()`` and ``opt.step()``, on the eager engine, with nested autograd and a
plain step. Prints a table of means ± standard deviations
over the seeds and the CRR effect paired by seed (mean ± standard error): on Two Moons λ varies
a lot from seed to seed (0.2 to 1.5 at this noise level), so one seed can show CRR doing almost
anything; the paired mean over seeds shows what it does. Writes ``demo_two_moons.png`` (means
over seeds) and ``demo_two_moons.json`` (with every seed's numbers) into the output folder.

The protocol is :mod:`curvrate_fast.experiments.two_moons` (the paper's, docs/math.md §6) with data seeds
``seed, seed + 1, …`` and model seed = data seed + 1000, the same random draws as the reproduction;
``compile=False`` trains on the eager engine, whose final λ is the number the reproduction reports
for that seed (the compiled graph sums in another order: its runs agree up to float rounding,
which 25 epochs of training can grow to a visible difference in the last digits of λ).
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import two_moons as tm
from .reproduce import _progress, environment
from .stats import describe, paired_difference

__all__ = ["run_demo", "crr_step_timing", "format_demo", "DEMO_SEEDS"]

#: seeds of the demo: enough for a mean ± spread on Two Moons (whose λ varies a lot from seed to
#: seed), still about half a minute on 2 CPU cores
DEMO_SEEDS = 10


#: the timed training steps: a plain one, ours as one captured training step (the fast path), ours
#: captured loss + backward + Adam, ours eager, nested autograd
TIMED = ("plain", "captured_step", "captured", "ours", "baseline")


def crr_step_timing(model: torch.nn.Module, data: tm.TwoMoonsData, *, scale: float = 3e-3,
                    steps: int = 10, rounds: int = 5, warmup: int = 3,
                    batch_size: int = 128) -> Dict[str, float]:
    """Seconds per training step (CE on a batch of 128 + CRR penalty, backward, Adam step) for
    plain training, our captured training step (``CRRLoss(compile=True).train_step``: CE, penalty,
    gradients and the Adam update in one compiled graph), our captured loss (``CRRLoss(compile=True)``
    then ``backward()`` and ``opt.step()``), our eager engine and nested autograd, each on its own
    copy of ``model``;
    rounds are interleaved, in a new order every round, and the median per-step time is
    reported (robust to other load on the machine). The capture's first call is in the warm-up."""
    import random

    from ..crr import CRRLoss
    device = data.x_train.device
    xb, yb = data.x_train[:batch_size], data.y_train[:batch_size]
    kinds = TIMED
    models = {k: copy.deepcopy(model).train() for k in kinds}
    opts = {k: torch.optim.Adam(models[k].parameters(), lr=1e-2) for k in kinds}
    gens = {k: torch.Generator(device=device).manual_seed(1234) for k in kinds}
    crits = {k: CRRLoss(orders=(2, 3), n_dirs=1, directions="per_order", subset=64, scale=scale,
                        generator=gens[k], compile=True) for k in ("captured", "captured_step")}

    def step(k: str) -> None:
        m, opt = models[k], opts[k]
        if k == "captured_step":
            crits[k].train_step(m, xb, yb, opt)
            return
        crit = crits.get(k)
        opt.zero_grad()
        if k == "captured":
            loss = crit(m, xb, yb)
        else:
            loss = F.cross_entropy(m(xb), yb)
            if k != "plain":
                loss = loss + tm.crr_term(k, m, xb, yb, scale=scale, generator=gens[k])
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for k in kinds:
        for _ in range(warmup):
            step(k)
    per: Dict[str, List[float]] = {k: [] for k in kinds}
    order = list(kinds)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(k)
            sync()
            per[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in per.items()}


def _demo_seed(seed: int, *, epochs: int, scale: float, label_noise: float, device,
               use_sklearn, on_epoch, compile: bool = True) -> List[Dict]:
    """One data seed: a run without and one with CRR (λ tracked every epoch)."""
    data = tm.make_data(seed, label_noise, use_sklearn=use_sklearn).to(device)
    runs = []
    for sc in (0.0, scale):
        tr = tm.train_model(data, seed + 1000, epochs=epochs, crr_scale=sc, engine="ours",
                            track_every=1, on_epoch=on_epoch, compile=compile)
        metrics = tm.test_metrics(tr.model, data)
        lam = tm.boundary_lambda(tr.model, data.x_test, data.y_test, engine="ours")
        runs.append({"seed": seed, "test_error": metrics["test_error"], "ece": metrics["ece"],
                     "lam": lam.value, "log_norms": [float(v) for v in lam.log_norms],
                     "n_band": lam.n_samples, "band_fallback": bool(lam.band_fallback),
                     "train_time": tr.train_time,
                     "history": [{"epoch": h.epoch, "lam": h.lam, "test_error": h.test_error}
                                 for h in tr.history],
                     "model": tr.model, "data": data})
    return runs


def _summarize_runs(label: str, scale: float, per_seed: List[Dict]) -> Dict:
    """Means over seeds (the keys of a single run), their spreads, and the per-seed numbers."""
    import numpy as np
    keys = ("test_error", "ece", "lam", "train_time", "n_band")
    out = {"label": label, "scale": scale}
    out.update({k: float(np.mean([r[k] for r in per_seed])) for k in keys})
    out["sd"] = {k: describe([r[k] for r in per_seed])["sd"] for k in keys}
    out["log_norms"] = [float(v) for v in np.mean([r["log_norms"] for r in per_seed], axis=0)]
    out["band_fallback"] = any(r["band_fallback"] for r in per_seed)
    out["n_band_fallbacks"] = sum(r["band_fallback"] for r in per_seed)
    epochs = [h["epoch"] for h in per_seed[0]["history"]]
    out["history"] = [{"epoch": e,
                       "lam": float(np.mean([r["history"][i]["lam"] for r in per_seed])),
                       "lam_sd": describe([r["history"][i]["lam"] for r in per_seed])["sd"],
                       "test_error": float(np.mean([r["history"][i]["test_error"]
                                                    for r in per_seed]))}
                      for i, e in enumerate(epochs)]
    out["per_seed"] = [{k: v for k, v in r.items() if k not in ("model", "data", "history")}
                       for r in per_seed]
    return out


def run_demo(*, seed: int = 42, n_seeds: int = DEMO_SEEDS, epochs: int = 25, scale: float = 3e-3,
             label_noise: float = 0.3, device=None, out_dir: Optional[str] = "curvrate_out",
             plot: bool = True, progress: bool = True, timing_rounds: int = 5,
             use_sklearn: Optional[bool] = None, compile: bool = True) -> Dict:
    """Run the demo on data seeds ``seed .. seed + n_seeds − 1``; returns a dict with both
    configurations (means over seeds, spreads, per-seed numbers), the paired CRR effect, the
    step timings and the written files."""
    if n_seeds < 1:
        raise ValueError("n_seeds must be ≥ 1")
    device = tm.resolve_device(device)
    seeds = list(range(seed, seed + n_seeds))
    bar = _progress(2 * epochs * n_seeds + 1, progress, "demo")
    t_start = time.perf_counter()
    plain, crr = [], []
    for s in seeds:
        a, b = _demo_seed(s, epochs=epochs, scale=scale, label_noise=label_noise, device=device,
                          use_sklearn=use_sklearn, on_epoch=lambda ep: bar.update(1), compile=compile)
        plain.append(a)
        crr.append(b)
    timing = crr_step_timing(crr[0]["model"], crr[0]["data"], scale=scale if scale > 0 else 3e-3,
                             rounds=timing_rounds)
    bar.update(1)
    bar.close()
    runs = [_summarize_runs("no CRR", 0.0, plain), _summarize_runs(f"CRR {scale:g}", scale, crr)]
    paired = {k: paired_difference({r["seed"]: r[k] for r in crr}, {r["seed"]: r[k] for r in plain})
              for k in ("lam", "test_error", "ece")}
    paired["lam_lower_in"] = sum(b["lam"] < a["lam"] for a, b in zip(plain, crr))
    result = {"seed": seed, "model_seed": seed + 1000, "seeds": seeds, "epochs": epochs,
              "scale": scale, "label_noise": label_noise, "device": str(device),
              "engine": "captured (CRRLoss(compile=True).train_step)" if compile else "eager",
              "timing_s_per_step": timing, "runs": runs, "paired": paired,
              "wall_time_s": None, "files": {}}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if plot:
            from .plotting import have_matplotlib, plot_demo
            if have_matplotlib():
                png = os.path.abspath(os.path.join(out_dir, "demo_two_moons.png"))
                plot_demo(result["runs"], png,
                          title=f"Two Moons, {label_noise:.0%} label noise, {n_seeds} seed(s) "
                                f"({seeds[0]}-{seeds[-1]}), {epochs} epochs: means over seeds")
                result["files"]["png"] = png
            else:
                result["files"]["png"] = None
    result["wall_time_s"] = time.perf_counter() - t_start
    if out_dir:
        js = os.path.abspath(os.path.join(out_dir, "demo_two_moons.json"))
        result["files"]["json"] = js
        with open(js, "w", encoding="utf-8") as f:
            # file names only in the JSON: it is committed, and a path would name the checkout
            names = {k: (os.path.basename(v) if v else v) for k, v in result["files"].items()}
            json.dump({**result, "files": names, "environment": environment(device)}, f, indent=1)
    return result


def format_demo(result: Dict) -> str:
    """The demo's printed table (mean ± sd over seeds), the paired CRR effect and speed line."""
    n = len(result.get("seeds", [result["seed"]]))
    seeds = result.get("seeds", [result["seed"]])
    lines = [f"Two Moons, {result['label_noise']:.0%} label noise, {n} data seed(s) "
             f"{seeds[0]}-{seeds[-1]} (model seed = data seed + 1000), {result['epochs']} epochs, "
             f"on {result['device']}; mean ± sd over seeds", "",
             f"{'run':<12} {'test error':>17} {'ECE':>17} {'λ (band)':>15} {'band pts':>9} "
             f"{'train time':>11}"]

    def pm(r, k, d):
        sd = r.get("sd", {}).get(k, float("nan"))
        return f"{r[k]:.{d}f}" + (f" ± {sd:.{d}f}" if sd == sd else "")
    for r in result["runs"]:
        band = f"{r['n_band']:.0f}" + ("*" if r["band_fallback"] else "")
        lines.append(f"{r['label']:<12} {pm(r, 'test_error', 4):>17} {pm(r, 'ece', 4):>17} "
                     f"{pm(r, 'lam', 3):>15} {band:>9} {r['train_time']:>10.2f}s")
    if any(r["band_fallback"] for r in result["runs"]):
        lines.append("* some seed had no test point in the band [0.45, 0.65]: its 600 closest "
                     "were used")
    p = result.get("paired")
    lines.append("")
    if p:
        def eff(k, d, scale=1.0, unit=""):
            e = p[k]
            mean, se = e["mean"] * scale, e["se"] * scale
            if se != se:                                       # one seed: no spread
                return f"{mean:+.{d}f}{unit}"
            clear = "" if abs(mean) > 2 * se else ", within 2 s.e. of no change"
            return f"{mean:+.{d}f} ± {se:.{d}f}{unit} (s.e.{clear})"
        lines.append(f"CRR changed λ by {eff('lam', 3)}, lower in {p['lam_lower_in']} of {n} "
                     f"seeds; test error by {eff('test_error', 2, 100, ' points')}; ECE by "
                     f"{eff('ece', 4)}. Paired by seed: same data and initialization.")
    t = result["timing_s_per_step"]
    lines += ["",
              "CRR training step (batch 128; CE + CRR on 64 samples, orders 2-3, fresh directions; "
              "backward; Adam), median:",
              f"  plain step {t['plain'] * 1e3:.2f} ms | ours, one captured step "
              f"(CRRLoss(compile=True).train_step) {t['captured_step'] * 1e3:.2f} ms | ours captured loss "
              f"+ backward + Adam {t['captured'] * 1e3:.2f} ms | ours eager {t['ours'] * 1e3:.2f} ms | "
              f"nested autograd {t['baseline'] * 1e3:.2f} ms",
              f"  captured step: {t['baseline'] / t['captured_step']:.2f}x the speed of nested autograd "
              f"(captured loss: {t['baseline'] / t['captured']:.2f}x, eager engine: "
              f"{t['baseline'] / t['ours']:.2f}x); CRR costs {t['captured_step'] / t['plain']:.1f}x a "
              f"plain step captured, {t['baseline'] / t['plain']:.1f}x with nested autograd"]
    files = result.get("files", {})
    if files.get("png"):
        lines.append(f"\nFigure (log|d_n| against n, λ over the epochs): {files['png']}")
    elif "png" in files:
        lines.append("\nNo figure: matplotlib is not installed (pip install curvrate-fast[experiments])")
    if files.get("json"):
        lines.append(f"Numbers: {files['json']}")
    if result.get("wall_time_s") is not None:
        lines.append(f"Demo wall time: {result['wall_time_s']:.1f} s")
    return "\n".join(lines)
