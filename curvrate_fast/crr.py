r"""Curvature Rate Regularization (CRR), docs/math.md §4.

R = scale · reduce_{n ∈ orders} [ mean_k mean_b |d_n[k, b]| ],

an L1 penalty on the directional derivatives d_n = Dⁿℓ_b(x_b)[u, …, u] of the per-sample loss with
respect to the input (absolute value, not squared, no n!), averaged over the batch (or a random
subset of it) and over ``n_dirs`` directions per sample; ``reduce`` is the mean over orders (the
paper's notebooks) or the sum (the ``flatgrad`` package). The training loss is CE_mean + R and R is
backpropagated to the parameters: everything here is differentiable, computed in ONE batched
Taylor-mode pass over all directions (docs/math.md §2), with only first-order backward.

Directions (docs/math.md §4 table):

- ``"fixed"``: one direction per sample (and per k), the same at every order: d_n = Dⁿℓ[uⁿ]
  (MNIST vs SAM, Table 2; ``flatgrad.compute_lambda_regularizer``).
- ``"per_order"``: a fresh direction at every order, as the notebooks' nested loop does
  (g_1 = ∇ℓ, d_1 = ⟨g_1, u_1⟩, g_2 = ∇Σd_1, d_2 = ⟨g_2, u_2⟩, …), i.e. the mixed derivative
  d_n = Dⁿℓ[u_1, …, u_n] (Two Moons, MNIST sweep). It is computed exactly by polarization
  (:func:`curvrate_fast.directions.polarization`) from 2^{N−1} pure-direction jets along
  u_1 ± u_2 ± … ± u_N (N the highest order), which give every lower order too; all are rows of the
  same batched pass (orders 2–3: 4 rows per sample and direction set; 1–4: 8). Where every op of
  the model and loss has a multilinear rule (MLPs and CNNs of linear maps, convolutions, pooling,
  dropout, smooth or ReLU activations, cross-entropy: probed once per configuration), the pass is instead one
  multilinear jet x + Σ ε_i·u_i with ε_i² = 0 (:mod:`curvrate_fast.jets.multilinear`), whose
  component {1..n} is d_n exactly: 2^N coefficient rows per sample instead of 2^{N−1}·(N + 1)
  (orders 2–3: 8 instead of 16).

Example::

    >>> crit = curvrate_fast.CRRLoss(orders=(2, 4), scale=200.0)        # CE + CRR 2–4
    >>> for x, y in loader:
    ...     opt.zero_grad(); crit(model, x, y).backward(); opt.step()
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .api import jet_of_rows
from .baseline import per_sample_cross_entropy
from .capture import CompiledLoss, backend_of
from .curvature import check_labels
from .directions import (
    _check_positive_int,
    check_directions,
    draw_directions,
    normalize_directions,
    polarization,
    polarization_weights,
    sample_directions,
)
from .finite import require_finite
from .jets import multilinear
from .jets.dispatcher import model_call
from .jets.draws import shared_draws
from .jets.registry import settings, tracing
from .jets.tensor import is_jet, pad_coeffs
from .mixing import require_per_sample, tile_batch

__all__ = ["crr_penalty", "CRRLoss", "parse_orders", "subset_indices"]

OrdersLike = Union[int, Tuple[int, int], Sequence[int], range]
DirectionsLike = Union[str, Tensor, Sequence[Tensor]]


_default_loss = per_sample_cross_entropy


def parse_orders(orders: OrdersLike) -> Tuple[int, ...]:
    """The penalized orders.

    - an int n: order n alone;
    - a **tuple of two** ints (first, last): the inclusive range first..last, the paper's
      notation "CRR 2–4" (``(2, 4)`` → 2, 3, 4; ``(1, 3)`` → 1, 2, 3);
    - a list, range, set or longer tuple: exactly those orders (``[2, 4]`` → 2 and 4).

    Example::

        >>> parse_orders((2, 4)), parse_orders([2, 4]), parse_orders(3)
        ((2, 3, 4), (2, 4), (3,))
    """
    if type(orders) is int or (type(orders) is tuple and all(type(v) is int for v in orders)):
        return _parse_hashable_orders(orders)     # the usual forms, parsed once
    return _parse_orders(orders)


@functools.lru_cache(maxsize=64)
def _parse_hashable_orders(orders) -> Tuple[int, ...]:
    return _parse_orders(orders)


def _parse_orders(orders: OrdersLike) -> Tuple[int, ...]:
    if isinstance(orders, bool):
        raise TypeError("orders must be an int, a (first, last) pair or a list of ints")
    if isinstance(orders, int):
        out = (orders,)
    elif isinstance(orders, tuple) and len(orders) == 2:
        a, b = orders
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b)):
            raise TypeError(f"orders (first, last) must be ints, got {orders!r}")
        if b < a:
            raise ValueError(f"orders (first, last) needs first ≤ last, got {orders!r}")
        out = tuple(range(a, b + 1))
    else:
        try:
            vals = list(orders)
        except TypeError:
            raise TypeError(f"orders must be an int, a (first, last) pair or a list of ints, "
                            f"got {orders!r}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise TypeError(f"orders must be ints, got {orders!r}")
        out = tuple(sorted(set(vals)))
    if not out:
        raise ValueError("orders is empty")
    if out[0] < 1:
        raise ValueError(f"orders must be ≥ 1, got {out}")
    return out


def subset_indices(subset: Optional[Union[int, float]], B: int,
                   generator: Optional[torch.Generator] = None,
                   device: Optional[torch.device] = None) -> Optional[Tensor]:
    """Indices of the random subset of a batch of B samples that CRR penalizes (docs/math.md §4:
    "random 64 of each 128"): ``None`` → the whole batch (None returned); an int k → k samples; a
    float in (0, 1] → round(frac·B) samples (at least 1). Drawn as ``torch.randperm(B)[:k]`` (with
    ``generator`` if given); nothing is drawn when k ≥ B.

    Example::

        >>> subset_indices(64, 128, torch.Generator().manual_seed(0)).shape
        torch.Size([64])
    """
    split = _subset_split(subset, B, generator, device)
    return None if split is None else split[0]


def _subset_split(subset: Optional[Union[int, float]], B: int,
                  generator: Optional[torch.Generator] = None,
                  device: Optional[torch.device] = None) -> Optional[Tuple[Tensor, Tensor]]:
    """(the penalized samples' indices, the other samples' indices) of one draw
    ``perm = torch.randperm(B)``: ``perm[:k]`` and ``perm[k:]`` (None where the whole batch is
    penalized). :func:`subset_indices` returns the first; CRRLoss also reads the second: the task
    loss of the penalized samples comes off the jet pass, and only the others need a forward
    of their own."""
    if subset is None:
        return None
    if isinstance(subset, bool):
        raise TypeError("subset must be None, an int ≥ 1 or a fraction in (0, 1]")
    if isinstance(subset, int):
        if subset < 1:
            raise ValueError(f"subset must be ≥ 1 samples, got {subset}")
        k = subset
    elif isinstance(subset, float):
        if not (0.0 < subset <= 1.0):
            raise ValueError(f"a fractional subset must lie in (0, 1], got {subset}")
        k = max(1, int(round(subset * B)))
    else:
        raise TypeError(f"subset must be None, an int or a float, got {type(subset).__name__}")
    if k >= B:
        return None
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(B, generator=generator, device=gen_device)
    if device is not None:
        perm = perm.to(device)
    return perm[:k], perm[k:]


def _one_loss_per_row(shape: tuple, rows: int) -> None:
    if tuple(shape) != (rows,):
        raise ValueError(f"loss_fn must return one loss per sample, shape ({rows},), got {tuple(shape)}; for "
                         "torch losses pass reduction='none' (e.g. lambda z, y: F.cross_entropy(z, y, "
                         "reduction='none'))")


def _loss_coefficients(model, x: Tensor, y, U: Tensor, order: int, loss_fn, share_draws: bool = False) -> Tensor:
    """Normalized coefficients ℓ_0..ℓ_K of the per-sample loss along every direction, shape
    (K + 1, D, B), in one jet pass over the D·B rows (coefficient 0 is the loss itself).
    ``share_draws``: the D rows of a sample must see one function (polarization rows): random ops
    in the model draw once per sample (jets/draws.py), not once per row."""
    D, B = U.shape[0], x.shape[0]
    X, Y = tile_batch(x, y, D)
    UU = U.reshape((D * B,) + tuple(x.shape[1:]))
    fn = loss_fn or _default_loss
    require_per_sample(model, x, y, loss_fn, copies=D)
    with shared_draws(D if share_draws else 1, B):
        c = jet_of_rows(lambda xj: fn(model(xj), Y), X, UU, order, primal_blocks=D)
    _one_loss_per_row(c.shape[1:], D * B)
    return c.reshape(order + 1, D, B)


def _multilinear_wanted(model, x: Tensor, y, U: Tensor, N: int, loss_fn) -> bool:
    """Whether the per-order pass is a multilinear one (jets/multilinear.py): where every op has a
    multilinear rule, always in a captured graph, eagerly where it is the faster (Probe.eager_faster)."""
    p = multilinear.probe(model, x, y, loss_fn, N)
    return p.ok and (tracing() or p.eager_faster(N, U.shape[0] * x.shape[0], x.device))


def _loss_components(model, x: Tensor, y, U: Tensor, N: int, loss_fn) -> Tensor:
    """The components of the per-sample loss as a multilinear jet (jets/multilinear.py) along the
    D direction sets U (D, N, B, ...): shape (2^N, D, B); component {1..n} is Dⁿℓ[u_1, …, u_n]."""
    D, B = U.shape[0], x.shape[0]
    X, Y = tile_batch(x, y, D)
    us = [U[:, i].reshape((D * B,) + tuple(x.shape[1:])) for i in range(N)]
    fn = loss_fn or _default_loss
    require_per_sample(model, x, y, loss_fn, copies=D)
    xj = multilinear.input_jet(X, us)
    if D > 1:
        xj.share_primal(D)
    # the D direction sets of a sample share its random draws, as polarization rows do (jets/draws.py)
    with shared_draws(D, B), multilinear.multilinear_pass(N), model_call():
        out = fn(model(xj), Y)
    if not isinstance(out, Tensor):
        raise TypeError(f"loss_fn must return one tensor, got {type(out).__name__}")
    _one_loss_per_row(out.shape, D * B)
    c = out.coeffs if is_jet(out) else out.unsqueeze(0)     # a loss constant along the path: no more
    return pad_coeffs(c, 1 << N).reshape((1 << N, D, B))


def _per_order_directions(directions, xs: Tensor, x_full: Tensor, idx: Optional[Tensor],
                          N: int, n_dirs: int, generator, check_values: bool = True,
                          raw_draws: bool = False) -> Tensor:
    """u_1..u_N per direction set: shape (D, N, *xs.shape) (sampled ones not yet normalized
    with ``raw_draws``)."""
    if isinstance(directions, str):
        draw = draw_directions if raw_draws else sample_directions
        u = draw(xs, n_dirs * N, generator=generator)
        return u.reshape((n_dirs, N) + tuple(xs.shape))
    us = list(directions)
    if len(us) < N:
        raise ValueError(f"per-order directions: orders up to {N} need {N} direction tensors "
                         f"u_1..u_{N}, got {len(us)}")
    checked = [check_directions(u, x_full, name=f"directions[{i}]", values=check_values)
               for i, u in enumerate(us[:N])]
    D = checked[0].shape[0]
    if any(u.shape[0] != D for u in checked):
        raise ValueError("all per-order direction tensors must hold the same number of directions")
    U = torch.stack(checked, dim=1)                        # (D, N, B, ...)
    if idx is not None:
        U = U[:, :, idx]
    return U


def _check_config(orders, n_dirs, directions, order_reduction, scale) -> Tuple[Tuple[int, ...], bool, float]:
    """(orders, per-order directions?, scale) of a CRR configuration, checked; the values'
    checks (explicit directions, labels) are the caller's."""
    ords = parse_orders(orders)
    _check_positive_int("n_dirs", n_dirs)
    if order_reduction not in ("mean", "sum"):
        raise ValueError(f"order_reduction must be 'mean' or 'sum', got {order_reduction!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    per_order = isinstance(directions, (list, tuple)) or (isinstance(directions, str)
                                                        and directions == "per_order")
    if isinstance(directions, str) and directions not in ("fixed", "per_order"):
        raise ValueError(f"directions must be 'fixed', 'per_order', a tensor (fixed directions) or a "
                         f"list of tensors u_1..u_N (per-order directions), got {directions!r}")
    if not isinstance(directions, (str, Tensor, list, tuple)):
        raise TypeError(f"directions must be 'fixed', 'per_order', a tensor or a list of tensors, got "
                        f"{type(directions).__name__}")
    return ords, per_order, scale


_CONFIGS: Dict[tuple, Tuple[Tuple[int, ...], bool, float]] = {}


def _checked_config(orders, n_dirs, directions, order_reduction, scale) -> Tuple[Tuple[int, ...], bool, float]:
    """:func:`_check_config`, remembered for the configurations a training loop repeats (plain
    ints, strings and floats, keyed with their types: ``1`` and ``True`` are not one key)."""
    if not (type(directions) is str and type(order_reduction) is str and type(n_dirs) is int
            and type(scale) in (float, int)
            and (type(orders) is int or (type(orders) is tuple and all(type(o) is int for o in orders)))):
        return _check_config(orders, n_dirs, directions, order_reduction, scale)
    key = (orders, n_dirs, directions, order_reduction, scale, type(scale))
    out = _CONFIGS.get(key)
    if out is None:
        out = _check_config(orders, n_dirs, directions, order_reduction, scale)
        if len(_CONFIGS) >= 256:
            _CONFIGS.clear()
        _CONFIGS[key] = out
    return out


def _crr_plan(x: Tensor, y, *, loss_fn, orders, n_dirs, directions, order_reduction, subset, scale,
              generator, check_values: bool = True, raw_draws: bool = False):
    """The configuration and the random draws of a CRR call, made eagerly (outside any captured
    graph): (orders, per_order, scale, subset indices or None, the other samples' indices or
    None, directions U). U is (D, B', ...) for fixed directions and (D, N, B', ...) for per-order
    ones (B' the penalized samples).
    ``check_values=False`` leaves the checks that read tensor values (label range, zero or
    non-finite explicit directions) to the caller (a captured program runs them before its graph);
    ``raw_draws=True`` returns sampled directions as the normal draws, before their normalization
    (a captured program normalizes them inside its graph: ``_crr_compute(normalize_u=True)``)."""
    if generator is not None and torch.compiler.is_compiling():
        raise RuntimeError(
            "CRR with generator=... inside torch.compile: dynamo cannot trace a torch.Generator, so the subset "
            "and the directions cannot be drawn from it in a compiled step. Draw from the global generator "
            "there (generator=None; torch.manual_seed seeds it), or call the loss outside torch.compile.")
    ords, per_order, scale = _checked_config(orders, n_dirs, directions, order_reduction, scale)
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a tensor with a non-empty batch dimension")
    B = x.shape[0]
    check_labels(y, B, loss_fn, values=check_values)
    fixed_u = None
    if isinstance(directions, Tensor):
        fixed_u = check_directions(directions, x, values=check_values)
    split = _subset_split(subset, B, generator, x.device)
    idx, rest = (None, None) if split is None else split
    # what the draws read of the penalized samples: shape, dtype, device (not values: the graph,
    # or _crr_compute, gathers them), so a view stands in for the gather x[idx]
    xs = x if idx is None else x.narrow(0, 0, idx.shape[0])
    N = ords[-1]
    if not per_order:
        U = fixed_u[:, idx] if (fixed_u is not None and idx is not None) else fixed_u
        if U is None:
            U = (draw_directions if raw_draws else sample_directions)(xs, n_dirs, generator=generator)
    else:
        U = _per_order_directions(directions, xs, x, idx, N, n_dirs, generator, check_values, raw_draws)
    return ords, per_order, scale, idx, rest, U


def _crr_compute(model, x: Tensor, y, idx: Optional[Tensor], U: Tensor, ords: Tuple[int, ...],
                 per_order: bool, loss_fn, order_reduction: str, scale: Union[float, Tensor],
                 normalize_u: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """The deterministic part of CRR (what a captured program records): (penalty, per-order
    terms, per-sample losses at x of the penalized samples) from the drawn subset and directions
    (``scale`` a float, or a 0-d tensor in a captured program: :func:`_scale_input`)
    (``normalize_u``: U holds raw draws, normalized per sample here, as sample_directions does)."""
    if normalize_u:
        U = normalize_directions(U, batch_dims=U.dim() - x.dim() + 1)
    xs, ys = x, y
    if idx is not None:
        xs = x[idx]
        if isinstance(y, Tensor) and y.dim() >= 1:
            ys = y[idx.to(y.device)]
    N = ords[-1]
    if not per_order:
        c = _loss_coefficients(model, xs, ys, U, N, loss_fn)             # (N+1, D, B')
        terms = torch.stack([c[n].abs().mean() * math.factorial(n) for n in ords])
    elif _multilinear_wanted(model, xs, ys, U, N, loss_fn):
        c = _loss_components(model, xs, ys, U, N, loss_fn)                # (2^N, D, B')
        terms = torch.stack([c[multilinear.component(N, n)].abs().mean() for n in ords])
    else:
        D = U.shape[0]
        # 2^{N−1} polarization rows per direction set serve every order n ≤ N (directions.py)
        rows = [polarization(list(U[k].unbind(0)))[0] for k in range(D)]
        M = rows[0].shape[0]
        c = _loss_coefficients(model, xs, ys, torch.cat(rows), N, loss_fn,  # (N+1, D·M, B')
                               share_draws=True)
        terms_l = []
        for n in ords:
            w = polarization_weights(N, n, dtype=c.dtype, device=c.device)      # (M,), same for all k
            mixed = (w.reshape(1, M, 1) * c[n].reshape(D, M, -1)).sum(1)        # Dⁿℓ[u_1..u_n]: (D, B')
            terms_l.append(mixed.abs().mean())
        terms = torch.stack(terms_l)
    red = terms.mean() if order_reduction == "mean" else terms.sum()
    if isinstance(scale, Tensor) and scale.dtype != red.dtype:
        # a captured program's 0-d scale is in x's dtype; a model that computes its loss in another
        # (float64 inputs through float32 internals) would have its penalty promoted, where eager's
        # Python-float scale keeps the loss's dtype (and rounds the scale to it, as here)
        scale = scale.to(red.dtype)
    return scale * red, terms, c[0, 0]


def _crr(model, x: Tensor, y, *, loss_fn, orders, n_dirs, directions, order_reduction, subset,
         scale, generator) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(penalty, per-order terms, per-sample losses at x of the penalized samples, the other
    samples' indices or None)."""
    ords, per_order, scale, idx, rest, U = _crr_plan(
        x, y, loss_fn=loss_fn, orders=orders, n_dirs=n_dirs, directions=directions,
        order_reduction=order_reduction, subset=subset, scale=scale, generator=generator)
    R, terms, losses0 = _crr_compute(model, x, y, idx, U, ords, per_order, loss_fn, order_reduction, scale)
    return R, terms, losses0, rest


# -- captured CRR (docs/design.md §6) ------------------------------------------------------------

def _program_check(model, x, y, idx, U, ords, per_order, loss_fn, order_reduction, scale,
                   explicit_u: bool) -> None:
    """The value checks of a captured CRR call, run on the real tensors before its graph (the
    directions only when the caller gave them: sampled ones are unit vectors by construction)."""
    check_labels(y, x.shape[0], loss_fn)
    if explicit_u:
        check_directions(U.reshape((-1,) + tuple(U.shape[-x.dim():])), x if idx is None else x[idx],
                         name="directions")
    if settings.check_finite:
        require_finite(x, "x")


def _total_check(model, x, y, idx, rest, U, *more) -> None:
    _program_check(model, x, y, idx, U, *more)


def _penalty_program(model, x, y, idx, U, ords, per_order, loss_fn, order_reduction, scale, explicit_u):
    # sampled directions come as raw draws (_crr_plan(raw_draws=True)): normalized in the graph
    return _crr_compute(model, x, y, idx, U, ords, per_order, loss_fn, order_reduction, scale,
                        normalize_u=not explicit_u)[0]


def _per_sample_task_losses(model, x, y, loss_fn) -> Tensor:
    fn = loss_fn or per_sample_cross_entropy
    losses = fn(model(x), y)
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != x.shape[0]:
        raise ValueError("loss_fn must return one loss per sample (reduction='none')")
    return losses


def _task_loss(model, x, y, loss_fn) -> Tensor:
    return _per_sample_task_losses(model, x, y, loss_fn).mean()


def _batch_task_loss(model, x, y, losses0: Tensor, rest: Optional[Tensor], loss_fn) -> Tensor:
    """The task loss, the mean of the per-sample losses over the whole batch, given ``losses0``,
    the penalized samples' losses (coefficient 0 of the jet pass: the loss at x, with its
    gradient): only the other samples (``rest``, None where every sample was penalized) need a
    forward of their own. The same mean as one forward of the whole batch, with the penalized
    samples' forward not run twice."""
    if rest is None:
        return losses0.mean()
    ys = y[rest.to(y.device)] if isinstance(y, Tensor) and y.dim() >= 1 else y
    others = _per_sample_task_losses(model, x[rest], ys, loss_fn)
    return (losses0.sum() + others.sum()) / (losses0.shape[0] + others.shape[0])


def _total_program(model, x, y, idx, rest, U, ords, per_order, loss_fn, order_reduction, scale, explicit_u):
    """CRRLoss's whole loss in one program: (task + R, task, R, terms)."""
    R, terms, losses0 = _crr_compute(model, x, y, idx, U, ords, per_order, loss_fn, order_reduction, scale,
                                     normalize_u=not explicit_u)
    task = _batch_task_loss(model, x, y, losses0, rest, loss_fn)
    return task + R, task, R, terms


def _total_aux_like(model, x, y, idx, rest, U, ords, *more):
    return [((), x.dtype), ((), x.dtype), ((len(ords),), x.dtype)]


_PROGRAMS: Dict[Tuple[str, object, tuple], CompiledLoss] = {}


def _new_program(kind: str, backend: str, options: tuple = ()) -> CompiledLoss:
    if kind == "penalty":
        return CompiledLoss(_penalty_program, backend=backend, options=dict(options), check=_program_check,
                            name="crr_penalty")
    return CompiledLoss(_total_program, backend=backend, options=dict(options), check=_total_check,
                        aux_like=_total_aux_like, name="CRRLoss")


# made at import for the usual backends: a torch.compile'd step must find them, not create them
for _kind in ("penalty", "total"):
    for _backend in ("eager", "inductor"):
        _PROGRAMS[(_kind, _backend, ())] = _new_program(_kind, _backend)


def _options_key(compile_options: Optional[Dict[str, Any]], backend: Optional[str]) -> tuple:
    """``compile_options`` as a hashable key of the program cache (checked: a dict of option names
    to hashable values, and only with a capture backend)."""
    if compile_options is None:
        return ()
    if not isinstance(compile_options, dict):
        raise TypeError(f"compile_options must be a dict of inductor options, got "
                        f"{type(compile_options).__name__}")
    if backend is None:
        raise ValueError("compile_options needs compile=True (or a capture backend): the eager engine "
                         "compiles nothing")
    if not all(isinstance(k, str) for k in compile_options):
        raise TypeError("compile_options: the option names must be strings")
    key = tuple(sorted(compile_options.items()))
    if not torch.compiler.is_compiling():   # (checked where the options are first met)
        try:
            hash(key)
        except TypeError as e:
            raise TypeError(f"compile_options: the values must be hashable ({e})") from None
    return key


def _program(kind: str, backend: str, options: tuple = ()) -> CompiledLoss:
    """The captured CRR program of ``kind`` ("penalty" or "total") for a capture backend and its
    compile options (one per process: the configurations are guarded and cached inside it)."""
    prog = _PROGRAMS.get((kind, backend, options))
    if prog is None:
        if torch.compiler.is_compiling():
            raise RuntimeError(f"compile={backend!r}" + (f", compile_options={dict(options)!r}" if options else "")
                               + ": a captured CRR program other than the default 'eager' or 'inductor' one "
                               "must be used once outside torch.compile before a compiled step uses it")
        prog = _PROGRAMS[(kind, backend, options)] = _new_program(kind, backend, options)
    return prog


def _scale_input(scale: float, x: Tensor) -> Tensor:
    """The penalty's scale as a 0-d input of the captured program, not a constant baked into its
    graph: a schedule that changes the scale every step (a warm-up of the regularizer) would
    otherwise capture and compile a new graph every step. In x's dtype: the penalty it multiplies
    is 0-d too, so a wider scale would promote the loss (a float64 scale made a float32 model's
    captured loss float64); a Python float is rounded to that dtype by the eager product alike.
    Made on x's device by a fill (no host-to-device copy)."""
    return torch.full((), scale, dtype=x.dtype, device=x.device)


def _capture_backend(compile_arg) -> Optional[str]:
    """compile=False → None (the eager engine) outside torch.compile; inside a user's
    torch.compile always a captured program (the engine cannot be traced by dynamo): the graph
    replayed as it is for compile=False, inductor for True, or the backend named."""
    b = backend_of(compile_arg)
    if b is None and torch.compiler.is_compiling():
        return "eager"
    return b


def crr_penalty(model: Callable[[Tensor], Tensor], x: Tensor, y: Optional[Tensor], *,
                loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                orders: OrdersLike = (2, 4), n_dirs: int = 1, directions: DirectionsLike = "fixed",
                order_reduction: str = "mean", subset: Optional[Union[int, float]] = None,
                scale: float = 1.0, generator: Optional[torch.Generator] = None,
                compile: Union[bool, str] = False,
                compile_options: Optional[Dict[str, Any]] = None) -> Tensor:
    r"""The CRR penalty R = scale · reduce_{n∈orders} mean_k mean_b |d_n[k, b]| (docs/math.md §4),
    a 0-d tensor differentiable with respect to the model's parameters.

    d_n[k, b] = Dⁿℓ_b(x_b)[u_{k,b}, …] is the n-th directional derivative of the per-sample loss
    ℓ_b = ``loss_fn(model(x), y)[b]`` (default cross-entropy) along unit directions
    u = randn/(‖randn‖₂ + 1e-12) per sample (docs/math.md §1), computed in one batched Taylor-mode pass.
    The model is used in the mode it is in (the paper: train mode for Two Moons and Table 2, eval
    for the MNIST sweep and ``flatgrad``).

    Arguments:
        orders: a (first, last) pair = the inclusive range (paper notation "2–4"), an int, or a
            list of exact orders (see :func:`parse_orders`).
        n_dirs: directions per sample, averaged.
        directions: ``"fixed"`` (the same u at every order: d_n = Dⁿℓ[uⁿ]); ``"per_order"`` (a fresh
            u_n at every order, the notebooks' mixed derivative Dⁿℓ[u_1,…,u_n], computed exactly
            by a multilinear jet where the model's ops have its rules, else by polarization:
            module docstring); a tensor of shape ``x.shape`` or ``(D, *x.shape)`` (explicit fixed
            directions, used as given); or a list of N = max(orders) tensors u_1..u_N of those
            shapes (explicit per-order directions). Explicit directions are given for the whole
            batch and indexed with the subset; a zero direction is an error.
        order_reduction: ``"mean"`` over orders (notebooks) or ``"sum"`` (``flatgrad`` package).
        subset: None (whole batch), an int k or a fraction: penalize a random subset of the batch
            (``torch.randperm``, drawn before the directions).
        scale: the factor in front.
        generator: a ``torch.Generator`` for the subset and the directions (else the global RNG).
        compile: ``True`` runs the penalty as a captured program (docs/design.md §6,
            :func:`curvrate_fast.compile`): recorded once per configuration (shapes, dtype, device,
            train/eval mode, these arguments) as one ATen graph of the penalty and its gradients,
            compiled by inductor, then replayed; the subset and the directions are still drawn
            here, eagerly, at every call and passed in as graph inputs, so the numbers are those of
            the eager engine (up to float rounding). The first call of a configuration costs the
            capture and inductor's compile (seconds; see ``compile``). ``"eager"`` replays the
            recorded graph without compiling it; another string names a ``torch.compile`` backend.
            Needs ``model`` to be an ``nn.Module`` (its parameters become graph inputs). Inside a
            user's ``torch.compile`` the penalty is always one captured custom op (no graph break;
            ``compile=False`` replays the graph uncompiled there).
        compile_options: inductor options of the captured program (needs ``compile``), e.g.
            ``{"triton.cudagraphs": True}`` on CUDA to replay it as a CUDA graph (small,
            launch-bound models); each distinct set of options is a program of its own.

    Example::

        >>> R = curvrate_fast.crr_penalty(model, x, y, orders=(2, 3), directions="per_order",
        ...                              subset=64, scale=3e-3)
        >>> (F.cross_entropy(model(x), y) + R).backward()
    """
    options = _options_key(compile_options, backend_of(compile))
    backend = _capture_backend(compile)
    if backend is None:
        return _crr(model, x, y, loss_fn=loss_fn, orders=orders, n_dirs=n_dirs, directions=directions,
                    order_reduction=order_reduction, subset=subset, scale=scale, generator=generator)[0]
    _check_capturable(model)
    ords, per_order, scale, idx, _, U = _crr_plan(
        x, y, loss_fn=loss_fn, orders=orders, n_dirs=n_dirs, directions=directions,
        order_reduction=order_reduction, subset=subset, scale=scale, generator=generator,
        check_values=False, raw_draws=True)
    return _program("penalty", backend, options)(model, x, y, idx, U, ords, per_order, loss_fn, order_reduction,
                                                 _scale_input(scale, x), not isinstance(directions, str))


def _check_capturable(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError("a captured CRR program (compile=..., or a call inside torch.compile) needs the model "
                        f"as an nn.Module, whose parameters become graph inputs; got {type(model).__name__}. "
                        "Wrap the function in an nn.Module, or use compile=False outside torch.compile.")


class CRRLoss(nn.Module):
    r"""Task loss + CRR penalty (docs/math.md §4), configured once: ``loss = crit(model, x, y)`` returns
    mean_b ℓ_b + R with R from :func:`crr_penalty` and ℓ_b the per-sample ``loss_fn``
    (default cross-entropy).

    ``every=k`` adds the penalty only on every k-th call (calls 0, k, 2k, …, counted in
    :attr:`step`), a cheap way to trade regularization strength for speed; other calls cost one
    ordinary forward. The penalized samples' task losses are read off the jet pass (its
    coefficient 0 is the loss itself): with a subset, only the other samples run an ordinary
    forward; without one, no second forward runs at all. In eval mode
    (``crit.eval()``) the penalty is always added and :attr:`step` does not advance.

    Cheap settings (the overhead/effect frontier of ``python -m curvrate_fast reproduce mnist``;
    README, "Cheap CRR"; 3 seeds, 5 epochs on 4,000 real digits): on the paper's MNIST CNN a
    full-batch penalty of orders 1–4 costs about 2.6–2.9× a plain step. ``subset=0.5, every=10,
    scale=632`` cost 1.13–1.14× and kept 93 % of the full-batch λ reduction with ECE unchanged but
    accuracy 0.7 points lower; ``every=4, scale=400`` (1.5–1.65×) kept 94 % at equal accuracy and
    ECE. At an unchanged scale a smaller subset acts more strongly, not less: re-tune ``scale``
    (about × √every) when changing ``subset`` or ``every``.

    After each call: :attr:`last_task_loss`, :attr:`last_penalty` (None when skipped) and
    :attr:`last_terms` (per-order mean |d_n|, before scale) hold detached values for logging.

    ``compile=True`` (the fast path for small models; docs/design.md §6): the task loss, the
    penalty and their gradients run as one captured graph per configuration, compiled by
    inductor, the subset and the directions drawn here at every call and fed in (see
    :func:`crr_penalty`); the first call of each configuration costs the capture and the compile
    (seconds). ``compile="eager"`` replays the captured graph uncompiled. Inside a user's
    ``torch.compile`` the loss is one custom op either way, without graph breaks; there, with
    ``every=1``, :attr:`step` is not advanced (an int changing every call would make dynamo
    recompile every step). ``compile_options`` are inductor options of that program (see
    :func:`crr_penalty`; ``{"triton.cudagraphs": True}`` replays it as a CUDA graph on CUDA; its
    outputs, :attr:`last_task_loss` included, are then overwritten by the next call: read them
    before it).

    Example::

        >>> crit = curvrate_fast.CRRLoss(orders=(2, 3), directions="per_order", subset=64,
        ...                              scale=3e-3, every=1)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     loss = crit(model, x, y)
        ...     loss.backward(); opt.step()
        ...     print(crit.last_task_loss, crit.last_penalty)
    """

    def __init__(self, *, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 orders: OrdersLike = (2, 4), n_dirs: int = 1, directions: DirectionsLike = "fixed",
                 order_reduction: str = "mean", subset: Optional[Union[int, float]] = None,
                 scale: float = 1.0, every: int = 1, generator: Optional[torch.Generator] = None,
                 compile: Union[bool, str] = False, compile_options: Optional[Dict[str, Any]] = None):
        super().__init__()
        _options_key(compile_options, backend_of(compile))   # checked here, read at every call
        parse_orders(orders)
        _check_positive_int("n_dirs", n_dirs)
        _check_positive_int("every", every)
        if order_reduction not in ("mean", "sum"):
            raise ValueError(f"order_reduction must be 'mean' or 'sum', got {order_reduction!r}")
        self.loss_fn = loss_fn
        self.orders = orders
        self.n_dirs = n_dirs
        self.directions = directions
        self.order_reduction = order_reduction
        self.subset = subset
        self.scale = float(scale)
        self.every = every
        self.generator = generator
        self.compile = compile
        self.compile_options = compile_options
        self.step = 0
        self.last_task_loss: Optional[Tensor] = None
        self.last_penalty: Optional[Tensor] = None
        self.last_terms: Optional[Tensor] = None

    def penalty_due(self) -> bool:
        """Whether the next call in train mode adds the penalty."""
        return (not self.training) or self.step % self.every == 0

    def _task(self, model, x, y) -> Tensor:
        return _task_loss(model, x, y, self.loss_fn)

    def _advance(self) -> bool:
        """Whether this call adds the penalty; counts the call in train mode."""
        if self.every == 1:   # no counter to read: a torch.compile'd step keeps one graph
            due = True
        else:
            due = self.penalty_due()
        if self.training and not (self.every == 1 and torch.compiler.is_compiling()):
            self.step += 1
        return due and self.scale != 0.0

    def _captured(self, backend: str, model, x: Tensor, y, optimizer=None) -> Tensor:
        """The captured program's loss (and, given an optimizer, its captured training step)."""
        _check_capturable(model)
        ords, per_order, scale, idx, rest, U = _crr_plan(
            x, y, loss_fn=self.loss_fn, orders=self.orders, n_dirs=self.n_dirs,
            directions=self.directions, order_reduction=self.order_reduction, subset=self.subset,
            scale=self.scale, generator=self.generator, check_values=False, raw_draws=True)
        options = _options_key(self.compile_options, backend_of(self.compile))
        program = _program("total", backend, options)
        args = (model, x, y, idx, rest, U, ords, per_order, self.loss_fn, self.order_reduction, _scale_input(scale, x),
                not isinstance(self.directions, str))
        if optimizer is None:
            total, (task, R, terms) = program.call_with_aux(*args)
        else:
            total, (task, R, terms) = program.train_step_with_aux(optimizer, *args)
        # plain tensors, never parameters or buffers: past nn.Module.__setattr__'s checks
        self.__dict__.update(last_task_loss=task, last_penalty=R, last_terms=terms)
        return total

    def _task_only(self, model, x: Tensor, y) -> Tensor:
        """A call without the penalty: the task loss alone (logged as such)."""
        task = self._task(model, x, y)
        self.last_task_loss, self.last_penalty, self.last_terms = task.detach(), None, None
        return task

    def forward(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Optional[Tensor]) -> Tensor:
        if not self._advance():
            return self._task_only(model, x, y)
        backend = _capture_backend(self.compile)
        if backend is not None:
            return self._captured(backend, model, x, y)
        R, terms, losses0, rest = _crr(model, x, y, loss_fn=self.loss_fn, orders=self.orders,
                                       n_dirs=self.n_dirs, directions=self.directions,
                                       order_reduction=self.order_reduction, subset=self.subset,
                                       scale=self.scale, generator=self.generator)
        task = _batch_task_loss(model, x, y, losses0, rest, self.loss_fn)
        self.last_task_loss, self.last_penalty = task.detach(), R.detach()
        self.last_terms = terms.detach()
        return task + R

    def train_step(self, model: nn.Module, x: Tensor, y: Optional[Tensor],
                   optimizer: torch.optim.Optimizer) -> Tensor:
        """One training step, ``optimizer.zero_grad(); self(model, x, y).backward();
        optimizer.step()``, returning the loss (detached). With ``compile=True`` the task loss,
        the penalty, their gradients **and the optimizer's update** run as one captured graph
        (:meth:`curvrate_fast.CompiledLoss.train_step`: Adam, AdamW and SGD; the optimizer's first
        step runs eagerly and makes its state): the fastest CRR step on small models, with no
        autograd pass and no optimizer ops of its own. Without ``compile``, or inside a user's
        ``torch.compile``, it is the three calls above. Either way the model's parameters hold
        their gradients in ``.grad`` afterwards; no clipping or scaling runs between backward and
        update (for those, write the three calls yourself).

        Example::

            >>> crit = curvrate_fast.CRRLoss(orders=(2, 3), directions="per_order", subset=64,
            ...                              scale=3e-3, compile=True)
            >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            >>> for x, y in loader:
            ...     loss = crit.train_step(model, x, y, opt)
        """
        backend = _capture_backend(self.compile)
        if backend is None or torch.compiler.is_compiling() or not isinstance(model, nn.Module):
            return self._eager_step(optimizer, lambda: self(model, x, y))
        if not self._advance():   # a step without the penalty: the plain task loss
            return self._eager_step(optimizer, lambda: self._task_only(model, x, y))
        return self._captured(backend, model, x, y, optimizer)

    @staticmethod
    def _eager_step(optimizer: torch.optim.Optimizer, loss_of: Callable[[], Tensor]) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        optimizer.step()
        return loss.detach()

    def extra_repr(self) -> str:
        return (f"orders={self.orders!r}, n_dirs={self.n_dirs}, directions={self.directions!r}, "
                f"order_reduction={self.order_reduction!r}, subset={self.subset!r}, "
                f"scale={self.scale}, every={self.every}"
                + (f", compile={self.compile!r}" if self.compile else "")
                + (f", compile_options={self.compile_options!r}" if self.compile_options else ""))
