r"""Calibration metrics of the paper's MNIST experiments (docs/math.md §6).

**ECE.** With confidence c_i = max_k softmax(z_i)_k, prediction ŷ_i = argmax_k z_ik and
M = 10 equal-width bins B_m = (m/M, (m+1)/M] (a sample falls in the bin with lower < c ≤ upper):

    ECE = Σ_m (|B_m|/N) · |acc(B_m) − conf(B_m)|,

acc the fraction of correct predictions and conf the mean confidence in the bin; empty bins
contribute nothing.

**Hard-20 %.** The accuracy on the 20 % least confident samples (the k = round(0.2·N) samples with
the smallest c_i, ties broken by position).

Example::

    >>> logits, labels = model(x_test), y_test
    >>> expected_calibration_error(logits, labels), hard_fraction_accuracy(logits, labels)
"""
from __future__ import annotations

from typing import Dict, List, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .finite import require_finite

__all__ = ["expected_calibration_error", "hard_fraction_accuracy", "reliability_bins",
           "confidence_and_correct"]

ArrayLike = Union[Tensor, np.ndarray]


def confidence_and_correct(logits: ArrayLike, labels: ArrayLike, *, probs: bool = False
                           ) -> Tuple[Tensor, Tensor]:
    """(confidence, correct) per sample, float64 and bool. ``logits`` (N, C) are turned into
    probabilities by softmax unless ``probs=True``."""
    z = torch.as_tensor(logits).detach().to(torch.float64).cpu()
    t = torch.as_tensor(labels).detach().cpu()
    if z.dim() != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(z.shape)}")
    if t.dim() != 1 or t.shape[0] != z.shape[0]:
        raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(t.shape)}")
    if z.shape[0] == 0:
        raise ValueError("no samples")
    if t.is_floating_point():
        raise TypeError("labels must be integer class indices")
    if bool((t < 0).any()) or bool((t >= z.shape[1]).any()):
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got [{int(t.min())}, {int(t.max())}]")
    require_finite(z, "logits/probabilities")
    if probs:
        _require_probabilities(z)
    p = z if probs else torch.softmax(z, dim=1)
    conf, pred = p.max(dim=1)
    return conf, pred.eq(t)


# how far a row of given probabilities may be from summing to 1, or an entry outside [0, 1]: the
# rounding of a softmax in half precision (float16 keeps ~3 decimal digits)
PROBABILITY_TOLERANCE = 1e-3


def _require_probabilities(p: Tensor) -> None:
    """``probs=True``: every row a probability vector, else a clear error (logits passed as
    probabilities would give a confidence above 1 or below 0 and a meaningless ECE)."""
    tol = PROBABILITY_TOLERANCE
    low, high = float(p.min()), float(p.max())
    if low < -tol or high > 1 + tol:
        raise ValueError(f"probs=True expects probabilities in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                         "pass logits with probs=False")
    sums = p.sum(dim=1)
    worst = int((sums - 1).abs().argmax())
    if abs(float(sums[worst]) - 1) > tol:
        raise ValueError(f"probs=True expects each row to sum to 1, row {worst} sums to {float(sums[worst]):.6g}; "
                         "pass logits with probs=False")


def reliability_bins(logits: ArrayLike, labels: ArrayLike, n_bins: int = 10, *,
                     probs: bool = False) -> List[Dict[str, float]]:
    """Per-bin statistics of the ECE (docs/math.md §6): for each bin (lower, upper], its count,
    accuracy and mean confidence (NaN for an empty bin).

    Example::

        >>> [b["count"] for b in reliability_bins(logits, labels)]
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int ≥ 1, got {n_bins!r}")
    conf, correct = confidence_and_correct(logits, labels, probs=probs)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    out = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        m = (conf > lo) & (conf <= hi)
        n = int(m.sum())
        out.append({"lower": lo, "upper": hi, "count": n,
                    "accuracy": float(correct[m].double().mean()) if n else float("nan"),
                    "confidence": float(conf[m].mean()) if n else float("nan")})
    return out


def expected_calibration_error(logits: ArrayLike, labels: ArrayLike, n_bins: int = 10, *,
                               probs: bool = False) -> float:
    """ECE = Σ_m (|B_m|/N)·|acc(B_m) − conf(B_m)| over ``n_bins`` equal-width bins of the max
    softmax probability, a sample in the bin with lower < c ≤ upper (docs/math.md §6). Computed in
    float64. Pass ``probs=True`` if you give probabilities instead of logits.

    Example::

        >>> expected_calibration_error(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    """
    conf, _ = confidence_and_correct(logits, labels, probs=probs)
    N = conf.shape[0]
    ece = 0.0
    for b in reliability_bins(logits, labels, n_bins, probs=probs):
        if b["count"]:
            ece += b["count"] / N * abs(b["accuracy"] - b["confidence"])
    return float(ece)


def hard_fraction_accuracy(logits: ArrayLike, labels: ArrayLike, fraction: float = 0.2, *,
                           probs: bool = False) -> float:
    """Accuracy on the ``fraction`` (default 20 %, the paper's "hard-20 %") least confident
    samples: the k = max(1, round(fraction·N)) smallest max softmax probabilities (stable order).

    Example::

        >>> hard_fraction_accuracy(model(x_test), y_test)     # accuracy on the hardest 20 %
    """
    if not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    conf, correct = confidence_and_correct(logits, labels, probs=probs)
    k = max(1, int(round(float(fraction) * conf.shape[0])))
    idx = torch.argsort(conf, stable=True)[:k]
    return float(correct[idx].double().mean())
