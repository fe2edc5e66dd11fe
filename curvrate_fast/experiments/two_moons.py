"""The paper's Two Moons protocol (docs/math.md §6), for our Taylor-mode engine and for nested autograd.

Followed from the author's notebook ``notebooks-(temp)/crr_theoretical_validations_and_mlp.ipynb``
(repository ``jacobposchl/flatgrad``), functions ``make_data``, ``MLP``, ``train_model``,
``lambda_regularizer_loss``, ``near_boundary_subset``, ``estimate_lambda_loss`` and
``run_multiseed_experiment``:

- data: ``make_moons(3000, noise=0.2, random_state=seed)``; a ``StandardScaler`` fitted on **all**
  3000 points before anything else; label noise flips ``int(rate·3000)`` labels chosen by
  ``np.random.default_rng(seed + 123).choice(3000, size, replace=False)``, **before** the split;
  ``train_test_split(test_size=0.3, random_state=seed)`` (2100 train, 900 test; test labels noisy).
- model: 2→64→64→2 MLP with tanh, Xavier-uniform weights, zero biases, created right after
  ``random.seed / np.random.seed / torch.manual_seed(model_seed)``.
- training: Adam lr 1e-2, batches of 128 reshuffled every epoch (the ``DataLoader(shuffle=True)``
  order, reproduced here draw for draw from the global torch generator), 25 epochs, mean CE.
- CRR (``lambda_regularizer_loss``): for a batch larger than 64, a random 64 of it
  (``torch.randperm(B)[:64]``), else the whole batch (the last batch has 52); in train mode;
  d_n for n = 1..3 with a **fresh** unit direction per order (mixed derivatives
  Dⁿℓ[u_1,…,u_n]), penalty ``scale · mean_{n=2,3} mean_b |d_n[b]|`` added to the CE.
- λ: test points whose max softmax probability is in [0.45, 0.65] (inclusive), else the 600 test
  points closest to 0.5; in batches of 64, ``K_dirs`` unit directions per batch drawn one after
  the other from the global generator (so the directions continue the training's random
  stream), d_1..d_{n_max} of the per-sample CE with the true (noisy) labels; y_n = mean over all
  samples and directions of log(max(|d_n|, 1e-12)); λ = least-squares slope of y_n on n
  (docs/math.md §3 estimator A). Model in eval mode, float32.
- seeds: data seed 42 + i, model seed 42 + i + 1000.

``engine="ours"`` measures λ with :func:`curvrate_fast.curvature.curvature_rate` and penalizes with
:func:`curvrate_fast.crr.crr_penalty` (``directions="per_order"``: the mixed derivatives by
polarization, one Taylor-mode pass); ``engine="baseline"`` uses nested reverse mode
(:mod:`curvrate_fast.baseline` and :func:`nested_crr_penalty`, the notebook's regularizer). Both
draw the λ directions, the CRR subsets and the CRR directions from the global generator in the
notebook's order, so they see the same random numbers: for the same model the same λ up to
rounding, and CRR runs that stay together up to rounding. One departure: when no test point is in
the band, the 600 fallback points come in index order (``select_band``) rather than by distance,
which pairs them with other (equally random) directions.
"""
from __future__ import annotations

import importlib
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ENGINES", "PAPER", "TwoMoonsData", "MLP", "EpochRecord", "TrainResult",
    "make_moons", "train_test_split", "standardize", "make_data", "set_seed",
    "epoch_batches", "nested_crr_penalty", "crr_term", "boundary_lambda",
    "expected_calibration_error", "test_metrics", "train_model", "resolve_device",
]

ENGINES = ("ours", "baseline")

#: The paper's Two Moons numbers (docs/math.md §6; the notebook's printed output).
PAPER = {
    "noise": {0.0: (0.0342, 1.9773), 0.3: (0.3225, 1.5865), 0.45: (0.4737, 0.7791)},  # (error, λ)
    "sweep": {0.0: (0.3225, 1.5865), 1e-3: (0.3227, 1.3860), 2e-3: (0.3229, 1.2737),
              3e-3: (0.3231, 1.1949), 5e-3: (0.3240, 1.0898), 1e-2: (0.3247, 0.9414)},
    "n_max": {3: 1.3871, 4: 1.6273, 5: 1.8216},  # 15 seeds
}


# --------------------------------------------------------------------------------------------
# data


def _sklearn(module: str, name: str, use_sklearn: Optional[bool]):
    """scikit-learn's ``module.name`` when it should be used (``use_sklearn`` True, or None and
    installed), else None for the built-in replica; True without scikit-learn raises ImportError."""
    if use_sklearn is False:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        if use_sklearn:
            raise
        return None


def make_moons(n_samples: int = 3000, noise: float = 0.2, random_state: int = 0,
               use_sklearn: Optional[bool] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.make_moons(n_samples, noise=noise, random_state=random_state)``.

    With ``use_sklearn=None`` scikit-learn is used when installed, else a built-in replica of the
    same algorithm and random draws (``RandomState(seed)``: shuffle, then Gaussian noise), which
    gives the same points. ``use_sklearn=False`` forces the replica.
    """
    sk_make_moons = _sklearn("sklearn.datasets", "make_moons", use_sklearn)
    if sk_make_moons is not None:
        X, y = sk_make_moons(n_samples=n_samples, noise=noise, random_state=random_state)
        return X, y.astype(np.int64)
    rs = np.random.RandomState(random_state)
    n_out = n_samples // 2
    n_in = n_samples - n_out
    t_out, t_in = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n_in)
    X = np.vstack([np.append(np.cos(t_out), 1 - np.cos(t_in)),
                   np.append(np.sin(t_out), 1 - np.sin(t_in) - 0.5)]).T
    y = np.hstack([np.zeros(n_out, dtype=np.int64), np.ones(n_in, dtype=np.int64)])
    idx = np.arange(n_samples)
    rs.shuffle(idx)
    X, y = X[idx], y[idx]
    X = X + rs.normal(scale=noise, size=X.shape)
    return X, y


def standardize(X: np.ndarray, use_sklearn: Optional[bool] = None) -> np.ndarray:
    """``StandardScaler().fit_transform(X)`` (population std; scikit-learn's when installed)."""
    scaler = _sklearn("sklearn.preprocessing", "StandardScaler", use_sklearn)
    if scaler is not None:
        return scaler().fit_transform(X)
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std[std == 0] = 1.0
    return (X - mean) / std


def train_test_split(n_samples: int, test_size: float = 0.3, random_state: int = 0,
                     use_sklearn: Optional[bool] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Train and test indices of ``sklearn.model_selection.train_test_split(..., test_size,
    random_state)``: test = the first ceil(test_size·n) of ``RandomState(seed).permutation(n)``."""
    sk_split = _sklearn("sklearn.model_selection", "train_test_split", use_sklearn)
    if sk_split is not None:
        tr, te = sk_split(np.arange(n_samples), test_size=test_size, random_state=random_state)
        return tr, te
    n_test = math.ceil(test_size * n_samples)
    perm = np.random.RandomState(random_state).permutation(n_samples)
    return perm[n_test:], perm[:n_test]


class TwoMoonsData(NamedTuple):
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    seed: int
    label_noise: float

    def to(self, device) -> "TwoMoonsData":
        return self._replace(x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                             x_test=self.x_test.to(device), y_test=self.y_test.to(device))


def make_data(seed: int, label_noise: float = 0.3, n: int = 3000, noise: float = 0.2,
              test_size: float = 0.3, use_sklearn: Optional[bool] = None) -> TwoMoonsData:
    """The notebook's ``make_data`` (see the module docstring), float32/int64 CPU tensors.

    Example::

        >>> d = make_data(42, label_noise=0.3)
        >>> d.x_train.shape, d.x_test.shape
        (torch.Size([2100, 2]), torch.Size([900, 2]))
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    X, y = make_moons(n, noise=noise, random_state=seed, use_sklearn=use_sklearn)
    X = standardize(X, use_sklearn=use_sklearn)
    y = y.astype(np.int64)
    if label_noise > 0:
        rng = np.random.default_rng(seed + 123)
        idx = rng.choice(np.arange(n), size=int(label_noise * n), replace=False)
        y = y.copy()
        y[idx] = 1 - y[idx]
    tr, te = train_test_split(n, test_size=test_size, random_state=seed, use_sklearn=use_sklearn)
    return TwoMoonsData(torch.tensor(X[tr], dtype=torch.float32), torch.tensor(y[tr]),
                        torch.tensor(X[te], dtype=torch.float32), torch.tensor(y[te]),
                        seed, float(label_noise))


# --------------------------------------------------------------------------------------------
# model and randomness


class MLP(nn.Module):
    """2→64→64→2 with tanh; Xavier-uniform weights, zero biases (the notebook's ``MLP``)."""

    def __init__(self, d_in: int = 2, d_h: int = 64, d_h2: int = 64, n_out: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_h)
        self.fc2 = nn.Linear(d_h, d_h2)
        self.fc3 = nn.Linear(d_h2, n_out)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return self.fc3(x)


def set_seed(seed: int) -> None:
    """``random``, ``numpy`` and ``torch`` (all devices) seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``None``/"auto": CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def epoch_batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None
                  ) -> List[Tensor]:
    """The index batches of one epoch of ``DataLoader(..., batch_size, shuffle=True)``.

    Draw for draw what the DataLoader does with the global generator (torch 2.x): the iterator
    draws a base seed, the ``RandomSampler`` draws a seed for a private generator that makes the
    permutation. With ``generator`` given, both draws come from it instead.
    """
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # _BaseDataLoaderIter seed
    seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
    g = torch.Generator()
    g.manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return list(perm.split(batch_size))


# --------------------------------------------------------------------------------------------
# CRR


def nested_crr_penalty(model: nn.Module, x: Tensor, y: Tensor, *, orders: Tuple[int, int] = (2, 3),
                       subset: Optional[int] = 64, scale: float = 1.0,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """The notebook's ``lambda_regularizer_loss`` by nested reverse mode (the baseline).

    A random ``subset`` of the batch when it is larger (``torch.randperm``), then for n = 1..hi:
    g_n = ∂(Σ_b d_{n−1}[b])/∂x, d_n[b] = ⟨g_n[b], u_n[b]⟩ with a fresh unit direction u_n per
    order; returns ``scale · mean_{n=lo..hi} mean_b |d_n[b]|``. Orders are inclusive.
    """
    from curvrate_fast.baseline import nested_directional_derivatives, per_sample_cross_entropy
    from curvrate_fast.directions import sample_directions
    lo, hi = orders
    if not 1 <= lo <= hi:
        raise ValueError(f"orders must be (lo, hi) with 1 <= lo <= hi, got {orders}")
    if subset is not None and x.shape[0] > subset:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        sel = torch.randperm(x.shape[0], generator=generator, device=gen_device)[:subset]
        x, y = x[sel.to(x.device)], y[sel.to(y.device)]
    d = nested_directional_derivatives(lambda X: per_sample_cross_entropy(model(X), y), x,
                                       lambda n, X: sample_directions(X, 1, generator=generator)[0], hi)
    return scale * d[lo - 1:].abs().mean(dim=1).mean()


def crr_term(engine: str, model: nn.Module, x: Tensor, y: Tensor, *, scale: float,
             orders: Tuple[int, int] = (2, 3), subset: Optional[int] = 64,
             generator: Optional[torch.Generator] = None, compile: bool = False) -> Tensor:
    """The Two Moons CRR penalty (fresh direction per order, a random ``subset``) by ``engine``;
    ``compile=True``: ours as a captured, compiled program (the same random draws)."""
    if engine == "ours":
        from curvrate_fast.crr import crr_penalty
        return crr_penalty(model, x, y, orders=orders, n_dirs=1, directions="per_order",
                           order_reduction="mean", subset=subset, scale=scale,
                           generator=generator, compile=compile)
    if engine == "baseline":
        return nested_crr_penalty(model, x, y, orders=orders, subset=subset, scale=scale,
                                  generator=generator)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


# --------------------------------------------------------------------------------------------
# λ on the boundary band


def boundary_lambda(model: nn.Module, x: Tensor, y: Tensor, *, engine: str = "ours",
                    n_max: int = 4, k_dirs: int = 2, band: Tuple[float, float] = (0.45, 0.65),
                    batch: int = 64, generator: Optional[torch.Generator] = None):
    """The notebook's λ (``near_boundary_subset`` + ``estimate_lambda_loss``) by ``engine``;
    returns the library's :class:`~curvrate_fast.curvature.CurvatureRate` (estimator A).

    The band (with the fallback to the 600 points closest to it) is
    :func:`curvrate_fast.curvature.select_band`. Directions: for each batch of 64 band points,
    ``k_dirs`` sets of unit directions drawn one after the other from ``generator`` (the global
    generator when None), as the notebook draws them; both engines use the same directions, so
    for the same model they give the same λ up to rounding. ``"ours"`` measures with
    :func:`curvrate_fast.curvature.curvature_rate` (one Taylor-mode pass over all points and
    directions), ``"baseline"`` with nested autograd and the same estimator.
    """
    from curvrate_fast.curvature import CurvatureWarning, curvature_rate, estimate_from_derivatives, select_band
    from curvrate_fast.directions import sample_directions
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CurvatureWarning)   # the fallback is reported below
            sel = select_band(model, x, band)
        idx = sel.indices.to(x.device)
        xs, ys = x[idx], y[idx]
        u = torch.cat([sample_directions(xs[s:s + batch], k_dirs, generator=generator)
                       for s in range(0, xs.shape[0], batch)], dim=1)      # (K, N, *shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CurvatureWarning)   # clamped zeros: kept, as the paper
            if engine == "ours":
                res = curvature_rate(model, xs, ys, max_order=n_max, directions=u)
            else:
                from curvrate_fast import baseline
                d = baseline.loss_directional_derivatives(model, xs, ys, u, order=n_max)
                res = estimate_from_derivatives(d.detach(), "slope")
    finally:
        model.train(was_training)
    res.band, res.band_fallback, res.indices = sel.band, sel.fallback, sel.indices
    res.extra["n_in_band"] = sel.n_in_band
    return res


# --------------------------------------------------------------------------------------------
# metrics and training


def expected_calibration_error(logits: Tensor, y: Tensor, n_bins: int = 10) -> float:
    """ECE with 10 equal-width bins on the max softmax probability (docs/math.md §6), by the
    library's :mod:`curvrate_fast.calibration`."""
    from curvrate_fast.calibration import expected_calibration_error as ece
    return float(ece(logits, y, n_bins=n_bins))


def test_metrics(model: nn.Module, data: TwoMoonsData) -> Dict[str, float]:
    """Test error and ECE on the (noisy) test labels, model in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(data.x_test)
    model.train(was_training)
    err = float((logits.argmax(dim=1) != data.y_test).float().mean())
    return {"test_error": err, "ece": expected_calibration_error(logits, data.y_test)}


@dataclass
class EpochRecord:
    epoch: int
    test_error: float
    lam: float
    mean_log: List[float]


@dataclass
class TrainResult:
    model: nn.Module
    train_time: float                      # seconds spent in the training steps
    history: List[EpochRecord] = field(default_factory=list)


def train_model(data: TwoMoonsData, model_seed: int, *, epochs: int = 25, crr_scale: float = 0.0,
                engine: str = "ours", lr: float = 1e-2, batch_size: int = 128,
                crr_orders: Tuple[int, int] = (2, 3), crr_subset: Optional[int] = 64,
                track_every: int = 0, track_generator: Optional[torch.Generator] = None,
                on_epoch: Optional[Callable[[int], None]] = None, compile: bool = False) -> TrainResult:
    """The notebook's ``train_model``: seed, MLP, Adam, shuffled batches, CE (+ CRR when
    ``crr_scale > 0``), all on ``data``'s device. All randomness comes from the global generator
    seeded with ``model_seed``, in the notebook's order.

    ``track_every=k`` records test error and λ after every k-th epoch (and the first) into
    ``history``; those λ directions come from ``track_generator`` (a private generator when None)
    so tracking does not change the training. ``on_epoch(epoch)`` is called after each epoch.
    ``compile=True`` runs our CRR steps as one captured, compiled program each
    (``CRRLoss(compile=True).train_step``: CE, penalty, gradients and the Adam update; the same
    random draws; equal to the eager engine up to float rounding).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    device = data.x_train.device
    set_seed(model_seed)
    model = MLP().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if track_every and track_generator is None:
        track_generator = torch.Generator(device=device)
        track_generator.manual_seed(model_seed + 7919)
    result = TrainResult(model, 0.0)
    n = data.x_train.shape[0]
    fused = None
    if compile and engine == "ours" and crr_scale > 0:
        # the library's fast path: CE + penalty + gradients + the Adam update as one captured
        # graph (CRRLoss.train_step); the same loss and the same random draws, in the same order
        # (subset, then the directions), as the three calls below
        from curvrate_fast.crr import CRRLoss
        fused = CRRLoss(orders=crr_orders, n_dirs=1, directions="per_order", order_reduction="mean",
                        subset=crr_subset, scale=crr_scale, compile=True)
    for ep in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for bidx in epoch_batches(n, batch_size):
            bidx = bidx.to(device)
            xb, yb = data.x_train[bidx], data.y_train[bidx]
            if fused is not None:
                fused.train_step(model, xb.detach(), yb.detach(), opt)
                continue
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            if crr_scale > 0:
                loss = loss + crr_term(engine, model, xb.detach(), yb.detach(), scale=crr_scale,
                                       orders=crr_orders, subset=crr_subset, compile=compile)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        result.train_time += time.perf_counter() - t0
        if track_every and ((ep + 1) % track_every == 0 or ep == 0):
            lam = boundary_lambda(model, data.x_test, data.y_test, engine=engine,
                                  generator=track_generator)
            err = test_metrics(model, data)["test_error"]
            result.history.append(EpochRecord(ep + 1, err, lam.value, lam.log_norms.tolist()))
        if on_epoch is not None:
            on_epoch(ep + 1)
    model.eval()
    return result
