"""Figures for the demo and the reproduction (matplotlib with the Agg backend, no display)."""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

__all__ = ["have_matplotlib", "plot_demo", "plot_sweep"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_demo(runs: Sequence[Dict], path: str, title: Optional[str] = None) -> str:
    """Two panels: mean log|d_n| against n on the boundary band for each final model (with its
    least-squares line, whose slope is λ), and λ over the epochs.

    ``runs``: dicts with ``label``, ``log_norms`` (y_1..y_N), ``lam`` and ``history`` (a list of
    dicts with ``epoch``, ``lam`` and optionally ``lam_sd``, drawn as a ± band: the demo passes
    means over seeds). Returns ``path``.
    """
    import numpy as np
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for run, c in zip(runs, colors):
        y = np.asarray(run["log_norms"], dtype=float)
        n = np.arange(1, len(y) + 1)
        b = y.mean() - run["lam"] * n.mean()
        ax1.plot(n, y, "o", color=c, ms=7, label=f"{run['label']}: λ = {run['lam']:.3f}")
        ax1.plot(n, b + run["lam"] * n, "-", color=c, alpha=0.6)
        hist = run.get("history") or []
        if hist:
            ep = np.array([h["epoch"] for h in hist], dtype=float)
            lam = np.array([h["lam"] for h in hist], dtype=float)
            ax2.plot(ep, lam, "o-", color=c, ms=3, label=run["label"])
            sd = np.array([h.get("lam_sd", np.nan) for h in hist], dtype=float)
            if np.isfinite(sd).any():                      # several seeds: ± 1 sd band
                ax2.fill_between(ep, lam - sd, lam + sd, color=c, alpha=0.15, lw=0)
    ax1.set_xlabel("order n")
    ax1.set_ylabel("mean log |d_n|  (boundary band)")
    ax1.set_xticks(range(1, max(len(r["log_norms"]) for r in runs) + 1))
    ax1.set_title("log|d_n| against n (slope = λ)")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=9)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("λ on the boundary band")
    ax2.set_title("λ over the epochs")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(summary: Dict, path: str, paper: Optional[Dict] = None) -> str:
    """λ and test error against the CRR scale (mean ± 2 s.e. over seeds), the paper's beside."""
    import numpy as np
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for eng, marker in (("ours", "o"), ("baseline", "s")):
        rows = sorted((r for r in summary.get("sweep", []) if r["engine"] == eng),
                      key=lambda r: r["scale"])
        if not rows:
            continue
        s = np.array([r["scale"] for r in rows])
        for ax, key in ((ax1, "lam"), (ax2, "test_error")):
            m = np.array([r[key]["mean"] for r in rows])
            se = np.array([r[key]["se"] for r in rows])
            ax.errorbar(s, m, yerr=2 * np.nan_to_num(se), fmt=marker + "-", capsize=4,
                        label=f"{eng} ({rows[0][key]['n']} seed{'s' if rows[0][key]['n'] != 1 else ''})")
    if paper:
        s = sorted(paper)
        ax1.plot(s, [paper[k][1] for k in s], "k^--", label="paper")
        ax2.plot(s, [paper[k][0] for k in s], "k^--", label="paper")
    ax1.set_ylabel("λ on the boundary band")
    ax2.set_ylabel("test error (noisy labels)")
    for ax in (ax1, ax2):
        ax.set_xlabel("CRR scale")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    ax1.set_title("λ against the CRR scale (30 % label noise)")
    ax2.set_title("test error against the CRR scale")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
