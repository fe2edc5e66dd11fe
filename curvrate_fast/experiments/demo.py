"""``python -m curvrate_fast demo``: Two Moons with 30 % label noise, trained once without and
once with CRR (orders 2-3, a fresh direction per order, 64 of each 128, scale 3e-3), λ tracked
over the epochs; then the CRR training step timed with our Taylor-mode engine against nested
autograd on the same model. Prints a table, writes ``demo_two_moons.png`` and
``demo_two_moons.json`` into the output folder.

The protocol is :mod:`curvrate_fast.experiments.two_moons` (the paper's, SPEC.md §6) with data seed
``seed`` and model seed ``seed + 1000``; the final λ of each run is the same number the
reproduction reports for that seed.
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

__all__ = ["run_demo", "crr_step_timing", "format_demo"]


def crr_step_timing(model: torch.nn.Module, data: tm.TwoMoonsData, *, scale: float = 3e-3,
                    steps: int = 10, rounds: int = 5, warmup: int = 3,
                    batch_size: int = 128) -> Dict[str, float]:
    """Seconds per training step (CE on a batch of 128 + CRR penalty, backward, Adam step) for
    plain training, our engine and nested autograd, each on its own copy of ``model``; rounds are
    interleaved and the median per-step time is reported (robust to other load on the machine).
    """
    device = data.x_train.device
    xb, yb = data.x_train[:batch_size], data.y_train[:batch_size]
    kinds = ("plain",) + tm.ENGINES
    models = {k: copy.deepcopy(model).train() for k in kinds}
    opts = {k: torch.optim.Adam(models[k].parameters(), lr=1e-2) for k in kinds}
    gens = {k: torch.Generator(device=device).manual_seed(1234) for k in kinds}

    def step(k: str) -> None:
        m, opt = models[k], opts[k]
        opt.zero_grad()
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
    for _ in range(rounds):
        for k in kinds:
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(k)
            sync()
            per[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in per.items()}


def run_demo(*, seed: int = 42, epochs: int = 25, scale: float = 3e-3, label_noise: float = 0.3,
             device=None, out_dir: Optional[str] = "curvrate_out", plot: bool = True,
             progress: bool = True, timing_rounds: int = 5,
             use_sklearn: Optional[bool] = None) -> Dict:
    """Run the demo; returns a dict with both runs, the step timings and the written files."""
    device = tm.resolve_device(device)
    data = tm.make_data(seed, label_noise, use_sklearn=use_sklearn).to(device)
    bar = _progress(2 * epochs + 1, progress, "demo")
    runs = []
    t_start = time.perf_counter()
    for label, sc in (("no CRR", 0.0), (f"CRR {scale:g}", scale)):
        tr = tm.train_model(data, seed + 1000, epochs=epochs, crr_scale=sc, engine="ours",
                            track_every=1, on_epoch=lambda ep: bar.update(1))
        metrics = tm.test_metrics(tr.model, data)
        lam = tm.boundary_lambda(tr.model, data.x_test, data.y_test, engine="ours")
        runs.append({"label": label, "scale": sc, "test_error": metrics["test_error"],
                     "ece": metrics["ece"], "lam": lam.value,
                     "log_norms": [float(v) for v in lam.log_norms],
                     "n_band": lam.n_samples, "band_fallback": bool(lam.band_fallback),
                     "train_time": tr.train_time,
                     "history": [{"epoch": h.epoch, "lam": h.lam, "test_error": h.test_error}
                                 for h in tr.history],
                     "model": tr.model})
    timing = crr_step_timing(runs[1]["model"], data, scale=scale if scale > 0 else 3e-3,
                             rounds=timing_rounds)
    bar.update(1)
    bar.close()
    result = {"seed": seed, "model_seed": seed + 1000, "epochs": epochs, "scale": scale,
              "label_noise": label_noise, "device": str(device), "timing_s_per_step": timing,
              "runs": [{k: v for k, v in r.items() if k != "model"} for r in runs],
              "wall_time_s": None, "files": {}}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if plot:
            from .plotting import have_matplotlib, plot_demo
            if have_matplotlib():
                png = os.path.abspath(os.path.join(out_dir, "demo_two_moons.png"))
                plot_demo(result["runs"], png,
                          title=f"Two Moons, {label_noise:.0%} label noise, seed {seed}, "
                                f"{epochs} epochs")
                result["files"]["png"] = png
            else:
                result["files"]["png"] = None
    result["wall_time_s"] = time.perf_counter() - t_start
    if out_dir:
        js = os.path.abspath(os.path.join(out_dir, "demo_two_moons.json"))
        result["files"]["json"] = js
        with open(js, "w", encoding="utf-8") as f:
            json.dump({**result, "environment": environment(device)}, f, indent=1)
    return result


def format_demo(result: Dict) -> str:
    """The demo's printed table and speed line."""
    lines = [f"Two Moons, {result['label_noise']:.0%} label noise, data seed {result['seed']} "
             f"(model seed {result['model_seed']}), {result['epochs']} epochs, on "
             f"{result['device']}", "",
             f"{'run':<12} {'test error':>10} {'ECE':>8} {'λ (band)':>9} {'band pts':>9} "
             f"{'train time':>11}"]
    for r in result["runs"]:
        fb = "*" if r["band_fallback"] else ""
        lines.append(f"{r['label']:<12} {r['test_error']:>10.4f} {r['ece']:>8.4f} "
                     f"{r['lam']:>9.3f} {str(r['n_band']) + fb:>9} {r['train_time']:>10.2f}s")
    if any(r["band_fallback"] for r in result["runs"]):
        lines.append("* no test point in the band [0.45, 0.65]: the 600 closest were used")
    a, b = result["runs"]
    lines.append("")
    lines.append(f"CRR moved λ from {a['lam']:.3f} to {b['lam']:.3f} ({b['lam'] - a['lam']:+.3f}); "
                 f"test error {(b['test_error'] - a['test_error']) * 100:+.2f} points, ECE "
                 f"{b['ece'] - a['ece']:+.4f}.")
    t = result["timing_s_per_step"]
    lines += ["",
              "CRR training step (batch 128; CE + CRR on 64 samples, orders 2-3, fresh directions; "
              "backward; Adam), median:",
              f"  plain step {t['plain'] * 1e3:.2f} ms | ours (Taylor mode) {t['ours'] * 1e3:.2f} ms"
              f" | nested autograd {t['baseline'] * 1e3:.2f} ms",
              f"  ours is {t['baseline'] / t['ours']:.2f}x the speed of nested autograd; CRR costs "
              f"{t['ours'] / t['plain']:.1f}x a plain step with ours, "
              f"{t['baseline'] / t['plain']:.1f}x with nested autograd"]
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
