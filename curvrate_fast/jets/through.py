"""Custom autograd Functions whose forward the jets may run op by op (:func:`jet_through`).

A custom ``torch.autograd.Function`` is differentiated by its own ``backward``, which is not a Taylor
rule; by default a jet reaching its forward raises (docs/training.md). Many such Functions only
hand-write the derivative of an ordinary forward for speed or memory (BLOOM's ``GeLUFunction``, a
fused activation): for them the Taylor coefficients of the forward's ops are the function's, and
nested autograd (which differentiates the backward) gives the same derivatives as long as the
backward is the forward's derivative. :func:`jet_through` declares such a class: its forward's ops
then run as jets (recording their graph, so the parameter gradients flow through them; the
backward is never called).

The declaration is checked at the class's first call on jets, to first order: for random
cotangents v and directions u (drawn from a generator of their own, the random state restored),
⟨v, J u⟩ from the forward's ops as jets must equal ⟨Jᵀ_backward v, u⟩ from the class's own backward
on the primal values, to 1e-6 relative in float64 (1e-3 in lower precision) of Σ|v·Ju| + Σ|Jᵀv·u|.
A straight-through estimator or a gradient reversal fails this (its backward is not the forward's
derivative) and raises. Higher orders are not checked: the backward's own derivatives are what
nested autograd would use there.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Sequence

import torch
from torch import Tensor

from . import registry
from .tensor import JetError, is_jet, make_jet

__all__ = ["jet_through", "is_through", "check_through"]

# class -> whether its first-order check has passed
_THROUGH: Dict[type, bool] = {}
_lock = threading.Lock()


class _Checking(threading.local):
    def __init__(self) -> None:
        self.active = False


_checking = _Checking()


def jet_through(cls: type, enabled: bool = True) -> type:
    """Let jets run the forward of the custom autograd Function ``cls`` op by op (see the module
    docstring): for Functions whose backward is the derivative of their forward. Checked to first
    order at the first call on jets; ``enabled=False`` takes the declaration back. Returns ``cls``,
    so it also works as a class decorator.

    Example::

        >>> from transformers.models.bloom.modeling_bloom import GeLUFunction
        >>> curvrate_fast.jet_through(GeLUFunction)      # BLOOM's MLP activation
        >>> d = curvrate_fast.loss_directional_derivatives(bloom, x, y, u, order=4)
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        raise TypeError(f"jet_through takes a torch.autograd.Function subclass, got {cls!r}")
    with _lock:
        if enabled:
            _THROUGH.setdefault(cls, False)
        else:
            _THROUGH.pop(cls, None)
    return cls


def is_through(cls: Any) -> bool:
    """Whether ``cls`` was declared with :func:`jet_through`."""
    try:
        return cls in _THROUGH
    except TypeError:
        return False


def _float_outputs(out) -> list:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, Tensor) and (o.is_floating_point() or o.is_complex())]


def check_through(cls: type, args: Sequence[Any]) -> None:
    """The first-order check of a declared class on the arguments of its first call on jets
    (once per class; a call inside the check itself is not checked again)."""
    if _THROUGH.get(cls, True) or _checking.active:
        return
    _checking.active = True
    try:
        if registry.tracing():
            # inside a capture (make_fx on real tensors): the check runs on the values, unrecorded,
            # so the graph holds the forward only
            from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
            with disable_proxy_modes_tracing():
                _check(cls, list(args))
        else:
            _check(cls, list(args))
    finally:
        _checking.active = False
    with _lock:
        if cls in _THROUGH:
            _THROUGH[cls] = True


def _check(cls: type, args: list) -> None:
    name = getattr(cls, "__qualname__", repr(cls))
    jets = [i for i, a in enumerate(args) if is_jet(a) and (a.is_floating_point() or a.is_complex())]
    if not jets:
        return
    like = args[jets[0]]._coeffs
    devices = [like.device] if like.device.type == "cuda" else []
    gen = torch.Generator(device=like.device).manual_seed(0x5EED)

    def draw(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device)

    with torch.random.fork_rng(devices=devices):
        # the class's own backward on the primal values
        with torch.enable_grad():
            leaves = list(args)
            for i in jets:
                leaves[i] = args[i]._coeffs[0].detach().requires_grad_(True)
            outs = _float_outputs(cls.apply(*leaves))
            if not outs:
                return
            vs = [draw(o) for o in outs]
            grads = torch.autograd.grad(outs, [leaves[i] for i in jets], vs, allow_unused=True)
        # the forward's ops as order-1 jets along random directions
        us = [draw(args[i]._coeffs[0]) for i in jets]
        order1 = list(args)
        for i, u in zip(jets, us):
            order1[i] = make_jet(torch.stack([args[i]._coeffs[0].detach(), u]), 1)
        with torch.no_grad():
            jouts = _float_outputs(cls.apply(*order1))
    tangents = [o._coeffs[1] if is_jet(o) else torch.zeros_like(o) for o in jouts]
    if len(tangents) != len(vs):
        raise JetError(f"jet_through({name}): its forward returns {len(jouts)} floating outputs on jets and "
                       f"{len(vs)} on plain tensors; it cannot be checked")
    lhs = sum((v * t).sum() for v, t in zip(vs, tangents))
    scale = sum((v * t).abs().sum() for v, t in zip(vs, tangents))
    rhs = torch.zeros((), dtype=lhs.dtype, device=lhs.device)
    for g, u in zip(grads, us):
        if g is not None:
            rhs = rhs + (g * u).sum()
            scale = scale + (g * u).abs().sum()
    tol = 1e-6 if like.dtype == torch.float64 else 1e-3
    if abs(float(lhs - rhs)) > tol * max(float(scale), 1e-30):
        raise JetError(
            f"jet_through({name}): its backward is not the derivative of its forward (checked to first order "
            f"on its first call: ⟨v, J·u⟩ = {float(lhs):.6g} from the forward's ops, {float(rhs):.6g} from its "
            "backward). Jets would give the forward's derivatives and nested autograd the backward's (a "
            "straight-through estimator or a gradient reversal is such a Function); remove the declaration "
            "and give the jet pass a path of ordinary ops instead.")
