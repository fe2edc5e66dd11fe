"""Figures of the MNIST reproduction and the frontier (matplotlib, Agg backend)."""
from __future__ import annotations

import math
import os
from typing import Dict

from .plotting import _pyplot
from .stats import describe

__all__ = ["plot_frontier", "plot_label_noise", "plot_sweep"]


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_frontier(frontiers: Dict[str, Dict], path: str) -> str:
    """Overhead (x) against the λ reduction (y, mean ± s.e. over the reported seeds), one panel
    per problem, each setting a labelled point; the full-batch reduction and 80 % of it as
    horizontal lines and 1.15× as a vertical one mark the region the frontier looks for."""
    from matplotlib.ticker import FormatStrFormatter

    from .frontier import OVERHEAD_LIMIT, RETAIN_TARGET, summarize_frontier
    plt = _pyplot()
    names = list(frontiers)
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.8), squeeze=False)
    colors = {1: "#1f77b4", 2: "#2ca02c", 4: "#ff7f0e", 10: "#d62728"}
    for ax, name in zip(axes[0], names):
        rows = summarize_frontier(frontiers[name])
        ref = next(r for r in rows if r["fraction"] == 1.0 and r["every"] == 1)
        ref_mean = ref["reduction"]["mean"]
        for r in rows:
            y, se = r["reduction"]["mean"], r["reduction"]["se"]
            c = colors.get(r["every"], "k")
            ax.errorbar([r["overhead"]], [y], yerr=[se if math.isfinite(se) else 0.0],
                        fmt="*" if r["qualifies"] else "o", color=c,
                        ms=13 if r["qualifies"] else 6, capsize=3)
            ax.annotate(r["label"].replace(", ", "\n"), (r["overhead"], y), fontsize=6.5,
                        xytext=(4, 3), textcoords="offset points")
        for k in sorted({r["every"] for r in rows}):
            ax.plot([], [], "o", color=colors.get(k, "k"), label=f"penalty every k = {k} steps")
        ax.axvline(OVERHEAD_LIMIT, color="k", ls="--", lw=1, label=f"{OVERHEAD_LIMIT:.2f}×")
        ax.axhline(ref_mean, color="grey", ls="-", lw=1, label="full-batch CRR")
        ax.axhline(RETAIN_TARGET * ref_mean, color="k", ls=":", lw=1,
                   label=f"{RETAIN_TARGET:.0%} of full-batch")
        if max(r["overhead"] for r in rows) > 3:   # Two Moons spans 1-6×: log; MNIST 1-2.5×
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(FormatStrFormatter("%.2g×"))
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlim(left=0.98)                     # 1× (no overhead) in view
        ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g×"))
        ax.set_xlabel("training-time overhead over plain steps (interleaved median)")
        ax.set_ylabel("λ reduction: λ(plain) − λ(CRR setting)")
        ax.set_title(f"{name} ({len(frontiers[name]['eval_seeds'])} seeds)", fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("CRR: overhead against λ reduction (★: ≤ 1.15× and ≥ 80 % of the full-batch "
                 "reduction at equal accuracy and ECE)", fontsize=10)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_label_noise(exp: Dict, paper: Dict, path: str) -> str:
    """Test error against global λ per run, coloured by the noise rate; the paper's means."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    noises = sorted({r["label_noise"] for r in exp["records"]})
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(noises):
        rs = [r for r in exp["records"] if r["label_noise"] == n]
        c = cmap(i / max(1, len(noises) - 1))
        ax.plot([r["lam"] for r in rs], [1 - r["accuracy"] for r in rs], "o", color=c,
                label=f"ours, {n:.0%} noise")
        if n in paper["lam"]:
            ax.plot([paper["lam"][n]], [1 - paper["accuracy"][n]], "^", color=c, mec="k", ms=10,
                    label=f"paper, {n:.0%}")
    ax.set_xlabel("global λ (test set)")
    ax.set_ylabel("test error")
    ax.set_title(f"Label noise and λ ({len(exp['seeds'])} seeds, {exp['epochs']} epochs)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_sweep(exp: Dict, paper: Dict, path: str) -> str:
    """λ and ECE against the CRR scale (mean ± sd over seeds), the paper's values beside."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    scales = sorted({r["scale"] for r in exp["records"]})
    for ax, key in ((a1, "lam"), (a2, "ece")):
        st = [describe([r[key] for r in exp["records"] if r["scale"] == s]) for s in scales]
        ax.errorbar(scales, [d["mean"] for d in st],
                    yerr=[0 if not math.isfinite(d["sd"]) else d["sd"] for d in st],
                    fmt="o-", capsize=4, label=f"ours ({len(exp['seeds'])} seeds)")
        ps = sorted(paper[key])
        ax.plot(ps, [paper[key][s] for s in ps], "k^--", label="paper")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("CRR scale")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    a1.set_ylabel("global λ")
    a2.set_ylabel("ECE")
    a1.set_title("λ against the CRR scale (clean MNIST, orders 1-3)")
    a2.set_title("ECE against the CRR scale")
    out = _save(fig, path)
    plt.close(fig)
    return out
