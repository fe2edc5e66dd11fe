"""Small statistics for the reproduction tables: mean and spread over seeds, paired differences,
Pearson's r. Everything returns plain floats (NaN where a quantity needs more values)."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["describe", "paired_difference", "pearson_r", "fmt_mean_sd"]


def describe(values: Sequence[Optional[float]]) -> Dict[str, float]:
    """mean, sd (ddof 1), se, min, max and n of the finite values (None and NaN are skipped)."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(a.size)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "sd": nan, "se": nan, "min": nan, "max": nan, "n": 0}
    sd = float(a.std(ddof=1)) if n > 1 else float("nan")
    return {"mean": float(a.mean()), "sd": sd, "se": sd / math.sqrt(n) if n > 1 else float("nan"),
            "min": float(a.min()), "max": float(a.max()), "n": n}


def paired_difference(a: Dict[int, float], b: Dict[int, float]) -> Dict[str, float]:
    """``describe`` of a[seed] − b[seed] over the seeds both have: a difference measured on the
    same data, initialization and batch order, so seed-to-seed variation largely cancels."""
    seeds = sorted(set(a) & set(b))
    return describe([a[s] - b[s] for s in seeds])


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation coefficient (NaN with fewer than 3 points or no spread)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.size < 3 or xa.std() == 0 or ya.std() == 0:
        return float("nan")
    return float(np.corrcoef(xa, ya)[0, 1])


def fmt_mean_sd(d: Dict[str, float], digits: int = 4) -> str:
    """"mean ± sd" (just the mean with one value, "-" with none)."""
    if not d or d.get("n", 0) == 0 or not math.isfinite(d["mean"]):
        return "-"
    if d["n"] == 1 or not math.isfinite(d["sd"]):
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"
