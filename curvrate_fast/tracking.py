r"""Record the curvature rate λ (docs/math.md §3) and the per-order mean log norms y_n over training,
write them to CSV and plot them (the paper's λ-dynamics figures, e.g. Two Moons with CRR 3e-3).

Each record is one row: ``step``, ``lambda``, ``lambda_std`` (spread over directions),
``n_samples``, ``estimator``, ``band_fallback``, ``log_norm_1`` … ``log_norm_N`` (y_n) and any extra
columns you pass (epoch, test error, ECE, ...). Plots are drawn with matplotlib's Agg canvas
(no display and no change of the global pyplot backend).

Example::

    >>> tracker = LambdaTracker("lambda.csv", band=(0.45, 0.65), n_dirs=2, max_order=4)
    >>> for epoch in range(25):
    ...     train_one_epoch(model)
    ...     tracker.measure(model, x_test, y_test, step=epoch, test_error=err(model))
    >>> tracker.plot("lambda.png")
"""
from __future__ import annotations

import csv
import inspect
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .curvature import CurvatureRate, curvature_rate

__all__ = ["LambdaTracker"]

PathLike = Union[str, "os.PathLike[str]"]
_BASE = ["step", "lambda", "lambda_std", "n_samples", "estimator", "band_fallback"]


def _num(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


class LambdaTracker:
    """Collect λ over training; write CSV; plot λ and the log norms against the step.

    ``csv_path``: when given, the CSV is rewritten after every record (``autosave=True``), so a
    crashed run keeps its history. ``curvature_kwargs`` (``max_order``, ``n_dirs``, ``estimator``,
    ``band``, ``loss_fn``, ``normalize``, ``generator``, ``batch_size``) go to
    :func:`curvrate_fast.curvature_rate` in :meth:`measure`.

    Example::

        >>> tr = LambdaTracker(max_order=4, n_dirs=2)
        >>> tr.record(0, 1.93, std=0.05, log_norms=[-1.0, 0.8, 2.9, 4.8])
        >>> tr.measure(model, x, y, step=1)
        >>> tr.to_csv("lam.csv"); tr.plot("lam.png")
    """

    def __init__(self, csv_path: Optional[PathLike] = None, plot_path: Optional[PathLike] = None, *,
                 autosave: bool = True, **curvature_kwargs: Any):
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.autosave = autosave
        # a misspelt setting fails here, not at the first measure() hours into a run
        known = set(inspect.signature(curvature_rate).parameters) - {"model", "x", "y"}
        unknown = sorted(set(curvature_kwargs) - known)
        if unknown:
            raise TypeError(f"LambdaTracker: unknown curvature_rate setting(s) {unknown}; known: {sorted(known)}")
        self.curvature_kwargs = curvature_kwargs
        self.rows: List[Dict[str, Any]] = []

    # -- recording ----------------------------------------------------------------------------
    def measure(self, model, x, y, step: Union[int, float], **extra: Any) -> CurvatureRate:
        """Compute λ with :func:`curvature_rate` (the tracker's settings) and record it."""
        res = curvature_rate(model, x, y, **self.curvature_kwargs)
        self.record(step, res, **extra)
        return res

    def record(self, step: Union[int, float], result: Union[CurvatureRate, float], *,
               std: Optional[float] = None, log_norms: Optional[Sequence[float]] = None,
               n_samples: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
        """Add a row from a :class:`CurvatureRate` or from a plain λ value (with optional ``std``,
        ``log_norms`` y_1..y_N and ``n_samples``); ``extra`` become further columns."""
        if isinstance(result, CurvatureRate):
            row: Dict[str, Any] = {"step": _num(step), "lambda": float(result.value),
                                   "lambda_std": float(result.std), "n_samples": result.n_samples,
                                   "estimator": result.estimator,
                                   "band_fallback": bool(result.band_fallback)}
            ys = result.log_norms.tolist()
        else:
            row = {"step": _num(step), "lambda": float(_num(result)),
                   "lambda_std": float("nan") if std is None else float(std),
                   "n_samples": "" if n_samples is None else int(n_samples), "estimator": "",
                   "band_fallback": ""}
            ys = [] if log_norms is None else [float(_num(v)) for v in log_norms]
        for n, v in enumerate(ys, start=1):
            row[f"log_norm_{n}"] = float(v)
        for k, v in extra.items():
            if k in row:
                raise ValueError(f"extra column {k!r} collides with a built-in column")
            row[k] = _num(v)
        self.rows.append(row)
        if self.autosave and self.csv_path is not None:
            self.to_csv(self.csv_path)
        return row

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> List[str]:
        cols = list(_BASE)
        norms = sorted({k for r in self.rows for k in r if k.startswith("log_norm_")},
                       key=lambda k: int(k.rsplit("_", 1)[1]))
        cols += norms
        for r in self.rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        return cols

    @property
    def history(self) -> Dict[str, List[Any]]:
        """Column name → list of values (missing entries are NaN)."""
        return {c: [r.get(c, float("nan")) for r in self.rows] for c in self.columns}

    @property
    def latest(self) -> Optional[Dict[str, Any]]:
        return self.rows[-1] if self.rows else None

    # -- files --------------------------------------------------------------------------------
    def to_csv(self, path: Optional[PathLike] = None) -> Path:
        """Write every row to ``path`` (default: ``csv_path``); returns the path."""
        p = Path(path) if path is not None else self.csv_path
        if p is None:
            raise ValueError("no CSV path: pass one here or to LambdaTracker(csv_path=...)")
        p.parent.mkdir(parents=True, exist_ok=True)
        cols = self.columns
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, restval="")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
        os.replace(tmp, p)
        return p

    @classmethod
    def from_csv(cls, path: PathLike, **kwargs: Any) -> "LambdaTracker":
        """Read a CSV written by :meth:`to_csv` (numbers come back as floats/ints)."""
        tr = cls(**kwargs)
        with open(path, newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                row: Dict[str, Any] = {}
                for k, v in r.items():
                    if v == "":
                        continue
                    if k in ("estimator",):
                        row[k] = v
                    elif k == "band_fallback":
                        row[k] = v == "True"
                    else:
                        try:
                            f = float(v)
                            row[k] = int(f) if f.is_integer() and k in ("step", "n_samples") else f
                        except ValueError:
                            row[k] = v
                tr.rows.append(row)
        return tr

    def plot(self, path: Optional[PathLike] = None, *, title: Optional[str] = None,
             log_norms: bool = True) -> Path:
        """Save a PNG: λ ± std against the step (left) and y_n = mean log|d_n| per order
        (right, if recorded and ``log_norms``). Uses the Agg canvas directly."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        p = Path(path) if path is not None else self.plot_path
        if p is None:
            raise ValueError("no plot path: pass one here or to LambdaTracker(plot_path=...)")
        if not self.rows:
            raise ValueError("nothing recorded yet")
        h = self.history
        steps = [float(s) for s in h["step"]]
        lam = [float(v) for v in h["lambda"]]
        std = [float(v) if v != "" else float("nan") for v in h["lambda_std"]]
        norm_cols = [c for c in h if c.startswith("log_norm_")] if log_norms else []
        fig = Figure(figsize=(11 if norm_cols else 6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 2 if norm_cols else 1, 1)
        ax.plot(steps, lam, "o-", color="C0", label="λ")
        lo = [a - s if math.isfinite(s) else a for a, s in zip(lam, std)]
        hi = [a + s if math.isfinite(s) else a for a, s in zip(lam, std)]
        ax.fill_between(steps, lo, hi, color="C0", alpha=0.2, label="± std over directions")
        ax.set_xlabel("step")
        ax.set_ylabel("curvature rate λ")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
        if title:
            ax.set_title(title)
        if norm_cols:
            ax2 = fig.add_subplot(1, 2, 2)
            for c in norm_cols:
                ax2.plot(steps, [float(v) for v in h[c]], "o-", ms=3, label=f"n = {c.rsplit('_', 1)[1]}")
            ax2.set_xlabel("step")
            ax2.set_ylabel("mean log |dⁿℓ|")
            ax2.grid(True, alpha=0.3)
            ax2.legend(loc="best")
        fig.tight_layout()
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, format="png")
        return p
