r"""The curvature rate λ of a network's loss in input space (docs/math.md §3, paper §2.1).

λ(f) = limsup (1/n) log‖Dⁿf‖, estimated from the directional derivatives
d_n[k, b] = dⁿ/dtⁿ ℓ_b(x_b + t·u_{k,b}) at t = 0 of the per-sample loss ℓ_b (default: cross-entropy
with the given labels) along K = ``n_dirs`` random unit directions per sample, n = 1..N
(``max_order``). The network estimators never divide by n! (docs/math.md §3); ``normalize="factorial"``
uses f_n = d_n/n! instead, the analytic convention of docs/math.md §5 (where λ = −log R).

Three estimators, exactly as docs/math.md §3 defines them:

**A, "slope"** (paper: Two Moons and MNIST global λ). Over all samples × directions,
y_n = mean log(max(|d_n|, 1e-12)), and λ is the ordinary least-squares slope of y_n on n; for
n = 1..4 that is λ = (−3y_1 − y_2 + y_3 + 3y_4)/10. No sample is dropped. Values at the 1e-12 clamp
are kept (as the paper does) and counted in ``extra["n_clamped"]``; when every value of an order is
clamped (a loss that is polynomial along the directions, e.g. linear) a :class:`CurvatureWarning`
says that λ then measures the clamp.

**B, "log_ratio"** (paper Table 2). Every (direction, sample) pair with |d_1| > 1e-8 gives
λ_{k,b} = mean_{n=1..N−1} log(|d_{n+1}| / (|d_n| + 1e-12) + 1e-12); pairs with |d_1| ≤ 1e-8 are
skipped; λ is the mean over the kept pairs (with one direction per sample, the paper's setting,
the mean over kept samples).

**C, "per_direction"** (``flatgrad.estimate_lambda_per_direction``). Separately per direction k: a
sample is dropped once |d_1| < 1e-8, or a value is non-finite or |d_n| ≤ 1e-10 (it stays dropped at
higher orders); y_n^{(k)} = mean log |d_n| over the samples still valid (the fit stops at the first
order with none); λ_k = least-squares slope (needs ≥ 2 orders); λ = mean over directions with a
slope, spread = their standard deviation (ddof = 1).

Since the OLS slope is linear in y, estimator A's λ is also the mean of its per-sample slopes and
the mean of its per-direction slopes.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    >>> x, y = torch.randn(256, 2), torch.randint(0, 2, (256,))
    >>> r = curvrate_fast.curvature_rate(model, x, y, band=(0.45, 0.65),
    ...                                  generator=torch.Generator().manual_seed(0))
    >>> r.value, r.std, r.n_samples, r.log_norms       # λ, spread over directions, …
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .api import loss_directional_derivatives
from .directions import _check_positive_int, check_directions, sample_directions
from .finite import require_finite

__all__ = ["CurvatureRate", "CurvatureWarning", "Band", "BandSelection", "curvature_rate",
           "estimate_from_derivatives", "ols_slope", "select_band", "band_indices",
           "max_softmax_confidence", "ESTIMATORS", "LOG_CLAMP", "D1_SKIP", "D_MIN_PER_DIRECTION"]

#: estimator names (docs/math.md §3 A, B, C)
ESTIMATORS = ("slope", "log_ratio", "per_direction")
#: the clamp max(|d_n|, 1e-12) of estimator A and the ε of the ratios in estimator B
LOG_CLAMP = 1e-12
#: estimators B and C skip a sample whose first derivative is this small (B: ≤, C: <)
D1_SKIP = 1e-8
#: estimator C drops a value |d_n| ≤ 1e-10
D_MIN_PER_DIRECTION = 1e-10


class CurvatureWarning(UserWarning):
    """A λ estimate was formed from degenerate input (clamped zeros, a band fallback, no valid
    sample): the number is returned, but read it with care."""


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class BandSelection:
    """Which samples lie in a confidence band (docs/math.md §3 "Where").

    ``indices``: the selected samples (ascending); ``confidence``: the max softmax probability of
    every sample; ``n_in_band``: how many lay in [lo, hi]; ``fallback``: True when fewer than
    ``min_count`` did and the ``fallback_count`` samples closest to the band were taken instead."""

    indices: Tensor
    confidence: Tensor
    band: Tuple[float, float]
    n_in_band: int
    fallback: bool

    def __len__(self) -> int:
        return int(self.indices.numel())


@dataclass(frozen=True)
class Band:
    """A confidence band with the paper's fallback: keep samples whose max softmax probability
    lies in [lo, hi]; if fewer than ``min_count`` do, take the ``fallback_count`` samples closest
    to the band instead (Two Moons: [0.45, 0.65], fallback to the 600 points closest to 0.5)."""

    lo: float
    hi: float
    min_count: int = 1
    fallback_count: int = 600


@dataclass
class CurvatureRate:
    """The result of :func:`curvature_rate` / :func:`estimate_from_derivatives`.

    - ``value``: λ (a float; NaN only with a :class:`CurvatureWarning` when no sample is usable)
    - ``log_norms``: y_n, n = 1..N, the per-order mean log |d_n| of the estimator (A: over all
      values, clamped at 1e-12; B: over the kept pairs; C: the mean over directions of y_n^{(k)},
      NaN for an order no direction reached)
    - ``per_sample``: λ of each sample used (A: OLS slope of the sample's mean-over-directions
      log|d_n|; B: mean of its kept λ_{k,b}; C: mean over directions of the slope over the orders
      where the sample stayed valid; NaN where a sample has nothing to contribute)
    - ``per_direction``: λ_k of each direction (NaN for a direction without a slope in C or without
      a kept pair in B); ``std``: their standard deviation (ddof = 1; 0 with one direction)
    - ``n_samples``: samples that entered the estimate; ``valid``: (K, B) mask of the
      (direction, sample) pairs used
    - ``derivatives``: the d_n (or f_n) themselves, shape (N, K, B), float64, detached
    - settings: ``estimator``, ``max_order``, ``n_dirs``, ``normalize``, ``band``,
      ``band_fallback``, ``indices`` (the samples of x that were used, None = all)
    - ``extra``: ``n_clamped`` (A, B: values |d_n| ≤ 1e-12 that met the clamp/ε), ``n_dropped``
      (C: (order, direction, sample) values excluded by the validity mask), ``n_in_band``
    """

    value: float
    log_norms: Tensor
    per_sample: Tensor
    per_direction: Tensor
    std: float
    n_samples: int
    valid: Tensor
    derivatives: Tensor
    estimator: str
    max_order: int
    n_dirs: int
    normalize: Optional[str] = None
    band: Optional[Tuple[float, float]] = None
    band_fallback: bool = False
    indices: Optional[Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def orders(self) -> Tuple[int, ...]:
        return tuple(range(1, self.max_order + 1))

    @property
    def settings(self) -> Dict[str, Any]:
        return {"estimator": self.estimator, "max_order": self.max_order, "n_dirs": self.n_dirs,
                "normalize": self.normalize, "band": self.band, "band_fallback": self.band_fallback}

    def __float__(self) -> float:
        return float(self.value)

    def summary(self) -> str:
        ys = ", ".join(f"{v:.4f}" for v in self.log_norms.tolist())
        fb = " (band fallback)" if self.band_fallback else ""
        return (f"λ = {self.value:.4f} ± {self.std:.4f} [{self.estimator}, n = 1..{self.max_order}, "
                f"{self.n_dirs} dirs, {self.n_samples} samples{fb}]; mean log|d_n| = [{ys}]")


# ---------------------------------------------------------------------------------------------
# estimators on derivative arrays
# ---------------------------------------------------------------------------------------------
def ols_slope(y: Tensor, orders: Optional[Sequence[float]] = None) -> Tensor:
    """Ordinary least-squares slope of ``y`` (last axis) on ``orders`` (default 1..N).

    For n = 1..4 the weights are (−3, −1, 1, 3)/10 (docs/math.md §3, estimator A).

    Example::

        >>> ols_slope(torch.tensor([0., 1., 2., 3.]))
        tensor(1.)
    """
    y = torch.as_tensor(y)
    if not (y.is_floating_point() or y.is_complex()):
        y = y.to(torch.get_default_dtype())            # integer values (a list of ints)
    if y.dim() < 1:
        raise ValueError("ols_slope needs the values along a last axis (one per order), got a 0-d tensor")
    N = y.shape[-1]
    if N < 2:
        raise ValueError(f"a slope needs at least 2 orders, got {N}")
    require_finite(y, "ols_slope: y")
    n = (torch.arange(1, N + 1, dtype=y.dtype, device=y.device) if orders is None
         else torch.as_tensor(orders, dtype=y.dtype, device=y.device))
    if orders is not None:
        if n.shape != (N,):
            raise ValueError(f"ols_slope: orders must hold one value per entry of y's last axis ({N}), "
                             f"got shape {tuple(n.shape)}")
        require_finite(n, "ols_slope: orders")
        if bool((n == n[0]).all()):     # no spread: the slope is 0/0
            raise ValueError("ols_slope: the orders must not all be equal (a slope needs two distinct x values)")
    c = n - n.mean()
    w = c / (c * c).sum()
    return (y * w).sum(-1)


def _std(v: Tensor) -> float:
    v = v[torch.isfinite(v)]
    if v.numel() <= 1:
        return 0.0
    return float(v.std(unbiased=True))


def _as_ndb(d: Tensor) -> Tensor:
    d = torch.as_tensor(d).detach()
    if d.dim() == 2:
        d = d.unsqueeze(1)
    if d.dim() != 3:
        raise ValueError(f"derivatives must have shape (N, B) or (N, K, B), got {tuple(d.shape)}")
    if d.shape[0] < 2:
        raise ValueError(f"λ needs derivatives of at least 2 orders (max_order ≥ 2), got {d.shape[0]}")
    if d.shape[2] < 1 or d.shape[1] < 1:
        raise ValueError("no sample or no direction in the derivatives")
    return d.to(torch.float64)


def _require_finite(a: Tensor, estimator: str) -> None:
    bad = ~torch.isfinite(a)
    if bool(bad.any()):
        n, k, b = bad.nonzero()[0].tolist()
        raise ValueError(f"estimator {estimator!r}: {int(bad.sum())} derivative value(s) are NaN or "
                         f"Inf (first: order {n + 1}, direction {k}, sample {b}); the derivatives "
                         "overflowed (try float64 or a lower max_order) or the model produced NaN")


def _estimate_slope(a: Tensor):
    N, K, B = a.shape
    _require_finite(a, "slope")
    clamped = a <= LOG_CLAMP
    whole = [n + 1 for n in range(N) if bool(clamped[n].all())]
    if whole:
        warnings.warn(f"estimator 'slope': every value of order(s) {whole} is |d_n| ≤ 1e-12 and was "
                      "clamped to 1e-12 before the log (as the paper does): the loss is polynomial "
                      "(e.g. linear) along these directions, so λ reflects the clamp, not curvature",
                      CurvatureWarning, stacklevel=4)
    L = torch.log(a.clamp_min(LOG_CLAMP))
    log_norms = L.mean(dim=(1, 2))
    value = float(ols_slope(log_norms))
    per_direction = ols_slope(L.mean(dim=2).transpose(0, 1))
    per_sample = ols_slope(L.mean(dim=1).transpose(0, 1))
    valid = torch.ones(K, B, dtype=torch.bool)
    return value, log_norms, per_sample, per_direction, valid, B, int(clamped.sum())


def _estimate_log_ratio(a: Tensor):
    N, K, B = a.shape
    _require_finite(a, "log_ratio")
    keep = a[0] > D1_SKIP                                              # (K, B)
    r = torch.log(a[1:] / (a[:-1] + LOG_CLAMP) + LOG_CLAMP)             # (N−1, K, B)
    lam = r.mean(dim=0)                                                 # (K, B)
    kf = keep.to(a.dtype)
    nan = torch.tensor(float("nan"), dtype=a.dtype)
    cnt_k, cnt_b = kf.sum(1), kf.sum(0)
    per_direction = torch.where(cnt_k > 0, (lam * kf).sum(1) / cnt_k.clamp_min(1), nan)
    per_sample = torch.where(cnt_b > 0, (lam * kf).sum(0) / cnt_b.clamp_min(1), nan)
    n_keep = int(keep.sum())
    L = torch.log(a.clamp_min(LOG_CLAMP))
    if n_keep == 0:
        warnings.warn(f"estimator 'log_ratio': every one of the {K * B} (direction, sample) pairs has "
                      "|d_1| ≤ 1e-8 and is skipped; λ is NaN (is the loss flat here, e.g. saturated "
                      "or linear?)", CurvatureWarning, stacklevel=4)
        value = float("nan")
        log_norms = torch.full((N,), float("nan"), dtype=a.dtype)
    else:
        zero = (a[1:] <= LOG_CLAMP) | ~keep
        whole = [n + 2 for n in range(N - 1) if bool(zero[n].all())]
        if whole:
            warnings.warn(f"estimator 'log_ratio': every kept value of order(s) {whole} is |d_n| ≤ "
                          "1e-12, so those log ratios are set by the 1e-12 ε, not by curvature (the "
                          "loss is polynomial, e.g. linear, along these directions)",
                          CurvatureWarning, stacklevel=4)
        value = float(lam[keep].mean())
        log_norms = (L * kf).sum(dim=(1, 2)) / n_keep
    return (value, log_norms, per_sample, per_direction, keep, int(keep.any(0).sum()),
            int(((a <= LOG_CLAMP) & keep).sum()))


def _estimate_per_direction(a: Tensor):
    N, K, B = a.shape
    ok = torch.isfinite(a) & (a > D_MIN_PER_DIRECTION)
    ok[0] &= a[0] >= D1_SKIP
    V = torch.cumprod(ok.to(torch.int64), dim=0).bool()                 # valid at orders 1..n
    L = torch.log(torch.where(V, a, torch.ones_like(a)))                # log|d| where valid
    cnt = V.sum(dim=2)                                                  # (N, K)
    nan = torch.tensor(float("nan"), dtype=a.dtype)
    ys = torch.where(cnt > 0, (L * V).sum(dim=2) / cnt.clamp_min(1), nan)   # (N, K)
    per_direction = torch.full((K,), float("nan"), dtype=a.dtype)
    m_k = (cnt > 0).sum(dim=0)                                          # orders reached per dir
    for k in range(K):
        m = int(m_k[k])
        if m >= 2:
            per_direction[k] = ols_slope(ys[:m, k])
    # per sample: slope over the orders where the (direction, sample) pair stayed valid
    m_kb = V.sum(dim=0)                                                 # (K, B)
    slopes = torch.full((K, B), float("nan"), dtype=a.dtype)
    for m in range(2, N + 1):
        sel = m_kb == m
        if bool(sel.any()):
            slopes[sel] = ols_slope(L[:m].permute(1, 2, 0)[sel])
    fin = torch.isfinite(slopes)
    cnt_b = fin.sum(0)
    per_sample = torch.where(cnt_b > 0, torch.where(fin, slopes, 0.0).sum(0) / cnt_b.clamp_min(1),
                             nan)
    good = torch.isfinite(per_direction)
    if not bool(good.any()):
        warnings.warn(f"estimator 'per_direction': none of the {K} directions has valid samples at two "
                      "or more orders (|d_1| < 1e-8, |d_n| ≤ 1e-10 or non-finite values); λ is NaN",
                      CurvatureWarning, stacklevel=4)
        value = float("nan")
    else:
        value = float(per_direction[good].mean())
    log_norms = torch.nanmean(ys, dim=1)
    valid = V[0]
    return (value, log_norms, per_sample, per_direction, valid, int(valid.any(0).sum()),
            int((~V).sum()))


_IMPL = {"slope": _estimate_slope, "log_ratio": _estimate_log_ratio,
         "per_direction": _estimate_per_direction}


def estimate_from_derivatives(derivatives: Tensor, estimator: str = "slope", *,
                              normalize: Optional[str] = None) -> CurvatureRate:
    """λ from derivatives you already have: ``derivatives`` of shape (N, B) (one direction per
    sample) or (N, K, B), entry [n−1, k, b] = d_n of sample b along direction k (docs/math.md §3).

    ``normalize`` is only recorded in the result (pass it if your values are f_n = d_n/n!).

    Example::

        >>> d = torch.tensor([[1.0], [2.0], [4.0], [8.0]])          # |d_n| = 2^{n−1}
        >>> estimate_from_derivatives(d).value                       # log 2
        0.6931471805599453
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    a = _as_ndb(derivatives).abs()
    value, log_norms, per_sample, per_direction, valid, n_samples, n_low = _IMPL[estimator](a)
    return CurvatureRate(value=value, log_norms=log_norms, per_sample=per_sample,
                         per_direction=per_direction, std=_std(per_direction), n_samples=n_samples,
                         valid=valid, derivatives=_as_ndb(derivatives), estimator=estimator,
                         max_order=a.shape[0], n_dirs=a.shape[1], normalize=normalize,
                         extra={"n_clamped" if estimator != "per_direction" else "n_dropped": n_low})


# ---------------------------------------------------------------------------------------------
# the confidence band
# ---------------------------------------------------------------------------------------------
def max_softmax_confidence(model: Callable[[Tensor], Tensor], x: Tensor, *,
                           batch_size: Optional[int] = None) -> Tensor:
    """max_c softmax(model(x))_c for every sample (no gradient), shape (B,)."""
    with torch.no_grad():
        if batch_size is None:
            logits = model(x)
        else:
            logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        return F.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                         dim=-1).amax(dim=-1)


def _as_band(band) -> Band:
    if isinstance(band, Band):
        b = band
    else:
        try:
            lo, hi = band
        except (TypeError, ValueError):
            raise TypeError(f"band must be a pair (lo, hi) or a Band, got {band!r}") from None
        b = Band(float(lo), float(hi))
    if not (math.isfinite(b.lo) and math.isfinite(b.hi)) or b.lo > b.hi:
        raise ValueError(f"band needs finite lo ≤ hi, got ({b.lo}, {b.hi})")
    _check_positive_int("min_count", b.min_count)
    _check_positive_int("fallback_count", b.fallback_count)
    return b


def band_indices(confidence: Tensor, band: Union[Tuple[float, float], Band] = (0.45, 0.65), *,
                 min_count: Optional[int] = None, fallback_count: Optional[int] = None
                 ) -> BandSelection:
    """Samples whose confidence lies in the closed band [lo, hi] (docs/math.md §3 "Where").

    When fewer than ``min_count`` (default 1) qualify, the paper's fallback takes the
    ``fallback_count`` (default 600) samples closest to the band, by the distance
    max(lo − p, p − hi, 0) (for the binary Two Moons band [0.45, 0.65] with nothing inside: the
    points closest to 0.5), and warns with a :class:`CurvatureWarning`; ``fallback`` is set in
    the result.

    Example::

        >>> sel = band_indices(torch.tensor([0.5, 0.9, 0.6, 0.99]), (0.45, 0.65))
        >>> sel.indices
        tensor([0, 2])
    """
    b = _as_band(band)
    if min_count is not None or fallback_count is not None:
        b = Band(b.lo, b.hi, min_count if min_count is not None else b.min_count,
                 fallback_count if fallback_count is not None else b.fallback_count)
        _as_band(b)
    p = torch.as_tensor(confidence).detach().reshape(-1)
    if p.numel() == 0:
        raise ValueError("no samples to select from")
    inside = (p >= b.lo) & (p <= b.hi)
    n_in = int(inside.sum())
    if n_in >= b.min_count:
        return BandSelection(inside.nonzero().reshape(-1), p, (b.lo, b.hi), n_in, False)
    dist = (b.lo - p).clamp_min(0) + (p - b.hi).clamp_min(0)
    k = min(b.fallback_count, p.numel())
    idx = torch.sort(torch.argsort(dist, stable=True)[:k]).values
    warnings.warn(f"only {n_in} of {p.numel()} samples have max softmax probability in "
                  f"[{b.lo}, {b.hi}] (fewer than {b.min_count}); falling back to the {k} samples "
                  f"closest to the band (confidence {float(p[idx].min()):.4f}..{float(p[idx].max()):.4f})",
                  CurvatureWarning, stacklevel=3)
    return BandSelection(idx, p, (b.lo, b.hi), n_in, True)


def select_band(model: Callable[[Tensor], Tensor], x: Tensor,
                band: Union[Tuple[float, float], Band] = (0.45, 0.65), *,
                min_count: Optional[int] = None, fallback_count: Optional[int] = None,
                batch_size: Optional[int] = None) -> BandSelection:
    """The boundary band of docs/math.md §3: samples of ``x`` whose max softmax probability under
    ``model`` lies in ``band``, with the paper's fallback (see :func:`band_indices`). Call it with
    the model in the mode you measure in (eval).

    Example::

        >>> sel = select_band(model.eval(), x_test, (0.45, 0.65))
        >>> x_band, y_band = x_test[sel.indices], y_test[sel.indices]
    """
    conf = max_softmax_confidence(model, x, batch_size=batch_size)
    return band_indices(conf, band, min_count=min_count, fallback_count=fallback_count)


# ---------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def model_mode(model, eval_mode: Optional[bool]) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode (``eval_mode=True``) or train mode (False) inside the
    block and restore every submodule's own flag afterwards; ``None`` leaves it alone."""
    if eval_mode is None or not isinstance(model, torch.nn.Module):
        yield
        return
    saved = [(m, m.training) for m in model.modules()]
    model.train(not eval_mode)
    try:
        yield
    finally:
        for m, t in saved:
            m.training = t


def check_labels(y, B: int, loss_fn, values: bool = True) -> None:
    """Labels for the default per-sample cross-entropy: class indices (B,) ≥ 0 or class
    probabilities (B, C). Negative indices would silently hit ``ignore_index`` (loss 0, every
    derivative 0); indices ≥ C are rejected by the cross-entropy rule. ``values=False`` checks
    shapes and dtypes only: the caller checks the values where they can be read (a captured
    program before its graph, docs/design.md §6), not inside a trace."""
    if loss_fn is not None:
        if isinstance(y, Tensor) and y.dim() >= 1 and y.shape[0] != B:
            raise ValueError(f"y has {y.shape[0]} entries but x has batch size {B}")
        return
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a tensor of class labels, got {type(y).__name__}")
    if y.dim() < 1 or y.shape[0] != B:
        raise ValueError(f"y must have one entry per sample ({B}), got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if y.dim() != 2:
            raise ValueError("floating-point y is read as class probabilities and must be (B, C); "
                             "pass integer class indices otherwise")
        return
    if y.dim() != 1:
        raise ValueError(f"class indices y must have shape ({B},), got {tuple(y.shape)}")
    if values and B and int(y.min()) < 0:
        raise ValueError(f"labels must be class indices ≥ 0, got {int(y.min())} (a negative label "
                         "would be ignored by cross-entropy and give zero derivatives)")


def curvature_rate(model: Callable[[Tensor], Tensor], x: Tensor, y: Optional[Tensor], *,
                   loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, max_order: int = 4,
                   n_dirs: int = 2, estimator: str = "slope",
                   band: Optional[Union[Tuple[float, float], Band]] = None,
                   normalize: Optional[str] = None, generator: Optional[torch.Generator] = None,
                   directions: Optional[Tensor] = None, batch_size: Optional[int] = None,
                   eval_mode: Optional[bool] = True) -> CurvatureRate:
    r"""The curvature rate λ of ``model`` at the samples ``x`` (docs/math.md §3).

    d_n[k, b] = dⁿ/dtⁿ loss_fn(model(x_b + t·u_{k,b}), y_b) at t = 0 for n = 1..``max_order`` and
    ``n_dirs`` random unit directions u_{k,b} per sample (u = randn/(‖randn‖₂ + 1e-12) per sample,
    docs/math.md §1; from ``generator`` if given, else the global RNG), all directions of all samples
    in ONE batched Taylor-mode pass, then λ by ``estimator``:

    - ``"slope"`` (A): OLS slope of y_n = mean log(max(|d_n|, 1e-12)) on n; n = 1..4:
      λ = (−3y_1 − y_2 + y_3 + 3y_4)/10.
    - ``"log_ratio"`` (B): mean over pairs with |d_1| > 1e-8 of
      mean_n log(|d_{n+1}|/(|d_n| + 1e-12) + 1e-12).
    - ``"per_direction"`` (C): per direction, slope of the mean log |d_n| over the samples still
      valid (|d_1| ≥ 1e-8, finite, |d_n| > 1e-10); mean and std (ddof 1) over directions.

    Arguments:
        loss_fn: per-sample loss ``loss_fn(logits, y) -> (B,)``; default cross-entropy with ``y``.
        band: ``(lo, hi)`` or :class:`Band`: measure only on samples whose max softmax probability
            lies in [lo, hi]; with fewer than ``min_count`` (1) such samples, the ``fallback_count``
            (600) closest ones are used instead, with a :class:`CurvatureWarning` and
            ``band_fallback=True`` in the result.
        normalize: ``"factorial"`` uses f_n = d_n/n! (docs/math.md §5's analytic convention; λ ≈ −log R).
            The thresholds 1e-12 / 1e-8 / 1e-10 then apply to f_n.
        directions: explicit directions instead of random ones, shape ``x.shape`` or
            ``(K, *x.shape)`` (then ``n_dirs`` is ignored); with a band, they are indexed with it.
        batch_size: split the samples into chunks of this many (each chunk still one pass over all
            its directions) to bound memory; None: everything in one pass.
        eval_mode: put the model in eval mode while measuring (the paper's setting) and restore
            every submodule's mode afterwards; None leaves the mode alone.

    Returns a :class:`CurvatureRate` (λ, per-order mean log norms, per-sample and per-direction
    values, spread, number of samples, derivatives and settings). Degenerate inputs never pass NaN
    on silently: non-finite derivatives raise (A, B); clamped zeros (A), no usable sample (B, C)
    and a band fallback warn with a :class:`CurvatureWarning`.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> r = curvrate_fast.curvature_rate(model, x, y, max_order=4, n_dirs=2, generator=g)
        >>> print(r.summary())
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(max_order, bool) or not isinstance(max_order, int):
        raise TypeError(f"max_order must be an int ≥ 2, got {max_order!r}")
    if max_order < 2:
        raise ValueError(f"estimator {estimator!r} fits/forms ratios over orders 1..max_order and needs "
                         f"max_order ≥ 2, got {max_order}")
    _check_positive_int("n_dirs", n_dirs)
    if normalize not in (None, "factorial"):
        raise ValueError(f"normalize must be None or 'factorial', got {normalize!r}")
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a tensor with a batch dimension")
    B = x.shape[0]
    if B < 1:
        raise ValueError("x holds no sample")
    check_labels(y, B, loss_fn)
    if directions is not None:
        directions = check_directions(directions, x)
    sel: Optional[BandSelection] = None
    with model_mode(model, eval_mode):
        if band is not None:
            sel = select_band(model, x, band, batch_size=batch_size)
            idx = sel.indices.to(x.device)
            x = x[idx]
            if isinstance(y, Tensor) and y.dim() >= 1:
                y = y[idx.to(y.device)]
            if directions is not None:
                directions = directions[:, idx]
        u = directions if directions is not None else sample_directions(x, n_dirs, generator=generator)
        with torch.no_grad():
            if batch_size is None or batch_size >= x.shape[0]:
                d = loss_directional_derivatives(model, x, y, u, max_order, loss_fn, normalize=normalize)
            else:
                parts = []
                for i in range(0, x.shape[0], batch_size):
                    yi = y[i:i + batch_size] if isinstance(y, Tensor) and y.dim() >= 1 else y
                    parts.append(loss_directional_derivatives(model, x[i:i + batch_size], yi,
                                                              u[:, i:i + batch_size], max_order,
                                                              loss_fn, normalize=normalize))
                d = torch.cat(parts, dim=2)
    res = estimate_from_derivatives(d, estimator, normalize=normalize)
    if sel is not None:
        res.band = sel.band
        res.band_fallback = sel.fallback
        res.indices = sel.indices
        res.extra["n_in_band"] = sel.n_in_band
    return res
