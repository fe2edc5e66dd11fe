r"""Drop-in replacement for the public functions of the reference package ``flatgrad``
(repository ``jacobposchl/flatgrad``: ``flatgrad/derivatives.py``,
``flatgrad/sampling/lambda_estimation.py``, ``flatgrad/sampling/regularizers.py``,
``flatgrad/sampling/training.py``), with the same names, signatures, return types and values,
but the derivatives computed in ONE batched Taylor-mode pass (docs/math.md §2) instead of nested
``autograd.grad`` loops over directions and orders.

Random numbers: every function draws its directions exactly as the reference does, one
``torch.randn(batch_size, *input_shape, device=device)`` call per direction (default dtype), in
the same order, normalized by ``/(‖·‖₂ + 1e-12)`` per sample; the reference draws nothing else
(its models run in eval mode). So after ``torch.manual_seed(s)`` the directions are bit-identical
and the global RNG ends in the same state; the returned numbers agree with the reference up to
floating-point rounding of the derivatives (Taylor mode and nested autograd round differently).

Conventions kept from the reference (docs/math.md §3–4):

- ``compute_directional_derivatives`` and ``estimate_lambda_per_direction`` call
  ``loss_fn(logits, labels)``, which must return per-sample losses; the regularizers call
  ``loss_fn(logits, labels, reduction='none')``.
- ``compute_lambda_regularizer`` **sums** over orders start_n..end_n and averages over K_dirs.
- the estimators, regularizers and ``compute_ece`` reproduce the reference's clamps (1e-12 ratio ε,
  1e-10 log clamp, 1e-8 first-derivative threshold, 1e-10 validity threshold), its float32/numpy
  arithmetic and its ``None`` results.
- the model is switched to eval mode inside the λ functions and regularizers, as the reference
  does; afterwards every submodule gets its own previous mode back (the reference calls
  ``model.train()`` on the whole model).

Deliberate differences (bad input gets a clear error or a warning, never a silent NaN):

- A loss that is *not* per-sample (e.g. ``F.cross_entropy`` with its default ``mean``) cannot be
  split per sample by a jet. The reference then silently differentiates the batch loss (for a
  mean: every d_n divided by B); here the same nested-autograd computation is run as a fallback
  (slow, identical numbers) with a ``UserWarning``.
- Errors in the derivative pass raise instead of being printed and skipped per direction;
  ``K_dirs < 1`` and empty order ranges raise ``ValueError``.
- Results that the reference returns as ``None`` (no valid sample/direction, fewer than 2 orders)
  come with a :class:`~curvrate_fast.curvature.CurvatureWarning`.

Example::

    >>> from curvrate_fast.compat.flatgrad import estimate_lambda_per_direction
    >>> torch.manual_seed(0)
    >>> out = estimate_lambda_per_direction(model, x, y,
    ...                                     lambda z, t: F.cross_entropy(z, t, reduction="none"))
    >>> out["lambda_mean"], out["lambda_std"]
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import loss_directional_derivatives
from ..curvature import CurvatureWarning, model_mode

__all__ = ["sample_unit_directions", "compute_directional_derivatives", "compute_derivative_ratios",
           "estimate_lambda_from_derivatives", "estimate_lambda_per_direction",
           "compute_lambda_regularizer", "compute_lambda_target_regularizer", "compute_ece"]

_RATIO_EPS = 1e-12
_LOG_FLOOR = 1e-10


# ---------------------------------------------------------------------------------------------
# directions and derivatives
# ---------------------------------------------------------------------------------------------
def sample_unit_directions(batch_size: int, input_shape: Tuple[int, ...],
                           device: torch.device) -> Tensor:
    """``batch_size`` random unit-norm directions of shape ``input_shape``:
    u_b = g_b / (‖g_b‖₂ + 1e-12), g = ``torch.randn(batch_size, *input_shape, device=device)``
    (one call, default dtype; docs/math.md §1). Returns shape ``(batch_size, *input_shape)``.

    Example::

        >>> u = sample_unit_directions(8, (1, 28, 28), torch.device("cpu"))
    """
    g = torch.randn(batch_size, *input_shape, device=device)
    rows = g.view(batch_size, -1)
    return (rows / (rows.norm(dim=1, keepdim=True) + 1e-12)).view(batch_size, *input_shape)


def _draw(K: int, inputs: Tensor) -> Tensor:
    """K direction sets in the reference's order: K calls of sample_unit_directions."""
    return torch.stack([sample_unit_directions(inputs.shape[0], tuple(inputs.shape[1:]), inputs.device)
                        for _ in range(K)])


class _NotPerSample(Exception):
    pass


def _nested(model, inputs: Tensor, labels, u: Tensor, max_order: int, call_loss) -> Tensor:
    """The reference's nested reverse mode for one direction set: (max_order, B)."""
    from ..baseline import nested_directional_derivatives
    return nested_directional_derivatives(lambda X: call_loss(model(X), labels), inputs, u, max_order)


def _derivatives(model, inputs: Tensor, labels, U: Tensor, max_order: int,
                 call_loss: Callable) -> Tensor:
    """d_n[k, b] for the direction sets U (K, B, ...), shape (max_order, K, B), in one Taylor pass.
    The jet runs in ``inputs``' dtype; the result has the dtype the reference's
    ⟨grad, direction⟩ products would have."""
    out_dtype = torch.promote_types(inputs.dtype, U.dtype) if inputs.is_floating_point() else U.dtype

    def loss(z, t):
        v = call_loss(z, t)
        if isinstance(v, Tensor) and v.dim() == 0:
            raise _NotPerSample
        return v

    try:
        d = loss_directional_derivatives(model, inputs, labels, U.to(inputs.dtype), max_order, loss)
    except _NotPerSample:
        warnings.warn("loss_fn returned a scalar, not one loss per sample (pass reduction='none'); "
                      "like the reference, the derivatives of the batch loss are computed by nested "
                      "autograd (slow; for a mean-reduced loss every d_n is the per-sample value / B)",
                      UserWarning, stacklevel=3)
        with torch.enable_grad():
            d = torch.stack([_nested(model, inputs, labels, U[k], max_order, call_loss)
                             for k in range(U.shape[0])], dim=1)
    return d.to(out_dtype)


def compute_directional_derivatives(model: torch.nn.Module, inputs: Tensor, labels: Tensor,
                                    directions: Tensor, loss_fn: Callable, min_order: int,
                                    max_order: int, create_graph: bool = True) -> List[Tensor]:
    """Directional derivatives d_n[b] = dⁿ/dtⁿ loss_fn(model(x + t·u), y)[b], n = min_order..max_order,
    as a list of (B,) tensors (docs/math.md §3), differentiable to the parameters when
    ``create_graph``. ``loss_fn(logits, labels)`` must return per-sample losses.

    Example::

        >>> u = sample_unit_directions(x.shape[0], x.shape[1:], x.device)
        >>> d1, d2, d3, d4 = compute_directional_derivatives(model, x, y, u, ce_none, 1, 4)
    """
    if min_order < 1:
        raise ValueError(f"min_order must be >= 1, got {min_order}")
    if max_order < min_order:
        raise ValueError(f"max_order ({max_order}) must be >= min_order ({min_order})")
    if inputs.shape[0] != directions.shape[0]:
        raise ValueError(f"Batch size mismatch: inputs has {inputs.shape[0]}, directions has "
                         f"{directions.shape[0]}")
    if inputs.shape[1:] != directions.shape[1:]:
        raise ValueError(f"Shape mismatch: inputs shape {inputs.shape[1:]}, directions shape "
                         f"{directions.shape[1:]}")
    if max_order > 1 and not create_graph:
        raise ValueError("create_graph must be True to compute derivatives of order > 1")
    inputs = inputs.to(directions.device)
    labels = labels.to(directions.device)
    d = _derivatives(model, inputs, labels, directions.unsqueeze(0), max_order, loss_fn)[:, 0]
    if not create_graph:
        d = d.detach()
    return [d[n - 1] for n in range(min_order, max_order + 1)]


# ---------------------------------------------------------------------------------------------
# λ estimators
# ---------------------------------------------------------------------------------------------
def compute_derivative_ratios(derivatives: List[Tensor]) -> Tensor:
    """ratios[b, i] = d_{i+2}[b] / (d_{i+1}[b] + 1e-12), shape (B, len(derivatives) − 1).

    Example::

        >>> compute_derivative_ratios([torch.tensor([1.0]), torch.tensor([2.0])])
        tensor([[2.]])
    """
    if len(derivatives) < 2:
        raise ValueError(f"Need at least 2 derivatives to compute ratios, got {len(derivatives)}")
    S = torch.stack(list(derivatives), dim=1)
    return S[:, 1:] / (S[:, :-1] + _RATIO_EPS)


def estimate_lambda_from_derivatives(derivatives: List[Tensor], abs_derivatives: bool = True,
                                     min_first_derivative: float = 1e-8) -> Optional[float]:
    """Mean over samples of mean_n log(max(d_{n+1}/(d_n + 1e-12), 1e-10)) (with |·| when
    ``abs_derivatives``), skipping samples with d_1 < ``min_first_derivative`` and non-finite
    values (docs/math.md §3, estimator B as the package implements it). ``None`` (with a warning) when
    fewer than 2 orders or no valid sample.

    Example::

        >>> estimate_lambda_from_derivatives([torch.tensor([1.0]), torch.tensor([2.0])])   # log 2
    """
    if len(derivatives) < 2:
        warnings.warn("estimate_lambda_from_derivatives needs at least 2 orders; returning None",
                      CurvatureWarning, stacklevel=2)
        return None
    if abs_derivatives:
        derivatives = [d.abs() for d in derivatives]
    ratios = compute_derivative_ratios(derivatives).detach().cpu()
    first = derivatives[0].detach().cpu()
    kept = []
    for b in range(ratios.shape[0]):
        if first[b].item() < min_first_derivative:
            continue
        lam = np.mean(np.log(np.maximum(ratios[b].numpy(), _LOG_FLOOR)))
        if np.isfinite(lam):
            kept.append(lam)
    if not kept:
        warnings.warn("estimate_lambda_from_derivatives: no sample has a first derivative ≥ "
                      f"{min_first_derivative} and a finite λ; returning None", CurvatureWarning,
                      stacklevel=2)
        return None
    return float(np.mean(kept))


def estimate_lambda_per_direction(model: torch.nn.Module, inputs: Tensor, labels: Tensor,
                                  loss_fn: Callable, max_order: int = 4, K_dirs: int = 5,
                                  min_first_derivative: float = 1e-8,
                                  return_derivatives: bool = False) -> dict:
    """λ per random direction, then mean and spread (docs/math.md §3, estimator C): per direction, a
    sample is valid while |d_1| ≥ ``min_first_derivative`` and every |d_n| is finite and > 1e-10;
    y_n = mean log |d_n| over the valid samples (stop at the first order with none); the slope of
    ``np.polyfit`` of y_n on n. All K_dirs directions run in one batched pass, in eval mode.

    Returns ``{'lambda_mean', 'lambda_std' (ddof 1, or 0 with one direction), 'lambda_values',
    'n_valid_directions'}`` and, with ``return_derivatives``, ``'derivatives_per_dir'`` (per valid
    direction, the mean |d_n| over its final valid samples, n = 1..max_order).

    Example::

        >>> torch.manual_seed(0)
        >>> estimate_lambda_per_direction(model, x, y, ce_none, max_order=4, K_dirs=5)["lambda_mean"]
    """
    if K_dirs < 1:
        raise ValueError(f"K_dirs must be >= 1, got {K_dirs}")
    if max_order < 1:
        raise ValueError(f"max_order must be >= 1, got {max_order}")
    B = inputs.shape[0]
    with model_mode(model, True):
        U = _draw(K_dirs, inputs)
        with torch.no_grad():
            d = _derivatives(model, inputs, labels.to(inputs.device), U, max_order, loss_fn)
    values: List[float] = []
    per_dir: List[List[float]] = []
    for k in range(K_dirs):
        ds = [d[n, k].abs() for n in range(max_order)]
        valid = torch.ones(B, dtype=torch.bool, device=d.device)
        logs: List[float] = []
        for n, dn in enumerate(ds):
            if n == 0:
                valid &= dn >= min_first_derivative
            valid &= torch.isfinite(dn) & (dn > 1e-10)
            if int(valid.sum()) == 0:
                break
            logs.append(torch.log(dn[valid]).mean().item())
        if len(logs) < 2:
            continue
        slope = np.polyfit(np.arange(1, len(logs) + 1), np.array(logs), 1)[0]
        if not np.isfinite(slope):
            continue
        values.append(slope)
        if return_derivatives:
            nv = int(valid.sum())
            per_dir.append([dn[valid].mean().item() if nv > 0 else float("nan") for dn in ds])
    if not values:
        warnings.warn(f"estimate_lambda_per_direction: none of the {K_dirs} directions has valid "
                      "samples at 2 or more orders (max_order ≥ 2, |d_1| ≥ min_first_derivative, "
                      "|d_n| > 1e-10); lambda_mean is None", CurvatureWarning, stacklevel=2)
        result = {"lambda_mean": None, "lambda_std": None, "lambda_values": [],
                  "n_valid_directions": 0}
    else:
        arr = np.array(values)
        result = {"lambda_mean": float(np.mean(arr)),
                  "lambda_std": float(np.std(arr, ddof=1 if len(arr) > 1 else 0)),
                  "lambda_values": values, "n_valid_directions": len(values)}
    if return_derivatives:
        result["derivatives_per_dir"] = per_dir
    return result


# ---------------------------------------------------------------------------------------------
# regularizers
# ---------------------------------------------------------------------------------------------
def _reduction_none(loss_fn: Callable) -> Callable:
    return lambda z, t: loss_fn(z, t, reduction="none")


def compute_lambda_regularizer(model: torch.nn.Module, inputs: Tensor, labels: Tensor,
                               loss_fn: Callable, start_n: int = 1, end_n: int = 4, K_dirs: int = 5,
                               scale: float = 1e-3) -> Tensor:
    """CRR as the package defines it (docs/math.md §4): scale · (1/K_dirs) Σ_k Σ_{n=start_n..end_n}
    mean_b |d_n[k, b]|, one fixed direction per sample and per k, model in eval mode, the
    inputs detached; differentiable to the parameters. ``loss_fn(logits, labels,
    reduction='none')``.

    Example::

        >>> loss = F.cross_entropy(model(x), y) + compute_lambda_regularizer(model, x, y, F.cross_entropy)
    """
    if K_dirs < 1:
        raise ValueError(f"K_dirs must be >= 1, got {K_dirs}")
    if end_n < 1 or end_n < start_n:
        raise ValueError(f"need 1 <= end_n and start_n <= end_n, got start_n={start_n}, end_n={end_n}")
    with model_mode(model, True):
        U = _draw(K_dirs, inputs)
        d = _derivatives(model, inputs.detach(), labels, U, end_n, _reduction_none(loss_fn))
    total = 0.0
    for k in range(K_dirs):
        for n in range(max(start_n, 1), end_n + 1):
            total = total + d[n - 1, k].abs().mean()
    return scale * (total / K_dirs)


def compute_lambda_target_regularizer(model: torch.nn.Module, inputs: Tensor, labels: Tensor,
                                      loss_fn: Callable, target_lambda: float, max_order: int = 4,
                                      K_dirs: int = 5, scale: float = 1.0) -> Tensor:
    """scale · (λ − target_lambda)², λ = mean over directions of the batch mean of
    mean_n log(clamp((|d_{n+1}| + 1e-12)/(|d_n| + 1e-12), min=1e-10)) (docs/math.md §4);
    differentiable. With max_order < 2 the reference returns a zero tensor (requires_grad), and so
    does this.

    Example::

        >>> R = compute_lambda_target_regularizer(model, x, y, F.cross_entropy, target_lambda=1.0)
    """
    if K_dirs < 1:
        raise ValueError(f"K_dirs must be >= 1, got {K_dirs}")
    with model_mode(model, True):
        U = _draw(K_dirs, inputs)
        if max_order < 2:
            warnings.warn("compute_lambda_target_regularizer: max_order < 2 gives no ratio; "
                          "returning a zero penalty, as the reference does", CurvatureWarning,
                          stacklevel=2)
            return torch.tensor(0.0, device=inputs.device, requires_grad=True)
        d = _derivatives(model, inputs.detach(), labels, U, max_order, _reduction_none(loss_fn))
    lams = []
    for k in range(K_dirs):
        a = [d[n, k].abs() for n in range(max_order)]
        r = torch.stack([(a[i + 1] + _RATIO_EPS) / (a[i] + _RATIO_EPS) for i in range(max_order - 1)],
                        dim=1)
        lams.append(torch.log(torch.clamp(r, min=_LOG_FLOOR)).mean(dim=1).mean())
    current = torch.stack(lams).mean()
    return scale * (current - target_lambda) ** 2


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------
def compute_ece(logits: Tensor, labels: Tensor, n_bins: int = 10) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins (lower < conf ≤ upper) of the
    max softmax probability (docs/math.md §6), with the reference's float32 bin edges
    (``torch.linspace(0, 1, n_bins + 1)``). See :func:`curvrate_fast.expected_calibration_error`
    for the float64 version.

    Example::

        >>> compute_ece(model(x_test), y_test)
    """
    probs = F.softmax(logits, dim=1)
    conf, pred = torch.max(probs, dim=1)
    correct = pred.eq(labels)
    edges = torch.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        frac = m.float().mean().item()
        if frac > 0:
            ece += abs(conf[m].mean().item() - correct[m].float().mean().item()) * frac
    return ece
