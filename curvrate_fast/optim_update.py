"""Optimizer updates as functions of tensors, for captured training steps
(:meth:`curvrate_fast.CompiledLoss.train_step`, :meth:`curvrate_fast.CRRLoss.train_step`).

A captured step records the loss, its gradients and the optimizer's update in one graph, so the
update must be written as ops on tensors that are graph inputs: the parameters, the optimizer's
per-parameter state (``exp_avg``, ``exp_avg_sq``, ``step``, ``momentum_buffer``...) and each
parameter group's learning rate (a 0-d float64 tensor made at every call, so that a scheduler's
change is seen without a new capture). The other hyperparameters (betas, eps, weight decay,
momentum, the flags) are constants of the graph and part of its guard: changing one captures
again.

Each rule below mirrors PyTorch's own update (``torch/optim/adam.py``, ``sgd.py``, the
non-differentiable path) op for op; the scalar factors (bias corrections, step size) are computed
in float64 from the step count, as PyTorch computes them in Python floats. The result equals
``optimizer.step()`` to the rounding of the parameter dtype (tests: ≤ 1e-12 in float64 over
several steps, with weight decay, AMSGrad, maximize, Nesterov momentum and an LR schedule).

The first step of an optimizer (its state not yet made) runs ``optimizer.step()`` itself, so the
state is the one PyTorch makes; captured steps follow. Optimizers outside :data:`RULES` (and
subclasses, which may override ``step``) raise :class:`curvrate_fast.CaptureError` naming them.

Example::

    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> fast = curvrate_fast.compile(loss_fn)
    >>> fast.train_step(opt, model, x, y)   # zero_grad + loss + backward + opt.step(), one graph
"""
from __future__ import annotations

import collections
import functools
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim import optimizer as _optimizer_module

from .guard_keys import _dict_version

__all__ = ["UpdateRule", "RULES", "rule_for", "group_constants", "lr_tensor", "mark_stepped", "StepPlan",
           "step_plan"]

Update = Callable[[Tensor, Tensor, List[Tensor], Dict[str, Any], Tensor], Tuple[Tensor, List[Tensor]]]


@dataclass(frozen=True)
class UpdateRule:
    """How one optimizer class updates a parameter.

    ``states(group)``: the names of the per-parameter state tensors the update reads and returns,
    in order (they depend on the group's flags: AMSGrad's ``max_exp_avg_sq``, SGD's momentum
    buffer); ``constants``: the group keys that are constants of the graph; ``neutral``: keys
    that do not change the math (implementation choices); any other key in a group is refused.
    ``update(param, grad, states, hyper, lr)`` → (new param, new states)."""

    states: Callable[[Dict[str, Any]], Tuple[str, ...]]
    constants: Tuple[str, ...]
    neutral: Tuple[str, ...]
    update: Update
    check: Callable[[Dict[str, Any]], Optional[str]] = lambda group: None

    @functools.cached_property
    def known(self) -> frozenset:
        """Every group key the rule accepts (its constants and the neutral keys)."""
        return frozenset(self.constants) | frozenset(self.neutral)


# keys every PyTorch optimizer group may carry without changing the math of its update
# (``initial_lr`` is written by LR schedulers)
_NEUTRAL = ("params", "lr", "initial_lr", "foreach", "fused", "capturable", "differentiable", "name")


def _adam_states(group: Dict[str, Any]) -> Tuple[str, ...]:
    names = ("step", "exp_avg", "exp_avg_sq")
    return names + (("max_exp_avg_sq",) if group["amsgrad"] else ())


def _adam_update(p: Tensor, g: Tensor, states: List[Tensor], h: Dict[str, Any], lr: Tensor):
    r"""Adam (Kingma & Ba) as ``torch.optim.Adam``/``AdamW`` compute it:

    t ← t + 1; g ← −g if maximize; weight decay: g ← g + λθ (L2), or θ ← θ(1 − ηλ) (decoupled,
    AdamW); m ← lerp(m, g, 1 − β₁); v ← β₂v + (1 − β₂) g²; v̂ ← max(v̂, v) with AMSGrad;
    θ ← θ − η/(1 − β₁ᵗ) · m / (√v̂ / √(1 − β₂ᵗ) + ε)."""
    step, m, v = states[0], states[1], states[2]
    beta1, beta2 = (float(b) for b in h["betas"])
    wd, eps = float(h["weight_decay"]), float(h["eps"])
    if h["maximize"]:
        g = -g
    step = step + 1
    if wd != 0:
        if h["decoupled_weight_decay"]:
            p = p * (1 - lr * wd)
        else:
            g = g.add(p, alpha=wd)
    m = torch.lerp(m, g, 1 - beta1)
    v = v.mul(beta2).addcmul(g, g, value=1 - beta2)
    t = step.to(torch.float64)
    bias1 = 1 - torch.pow(beta1, t)
    bias2_sqrt = (1 - torch.pow(beta2, t)) ** 0.5
    step_size = lr / bias1
    new = [step, m, v]
    if h["amsgrad"]:
        vmax = torch.maximum(states[3], v)
        new.append(vmax)
        denom = (vmax.sqrt() / bias2_sqrt).add(eps)
    else:
        denom = (v.sqrt() / bias2_sqrt).add(eps)
    p = p - step_size * m / denom
    return p, new


def _adam_check(group: Dict[str, Any]) -> Optional[str]:
    if isinstance(group["betas"][0], Tensor) or isinstance(group["betas"][1], Tensor):
        return "tensor betas"
    return None


def _sgd_states(group: Dict[str, Any]) -> Tuple[str, ...]:
    return ("momentum_buffer",) if group["momentum"] != 0 else ()


def _sgd_update(p: Tensor, g: Tensor, states: List[Tensor], h: Dict[str, Any], lr: Tensor):
    r"""SGD as ``torch.optim.SGD`` computes it: g ← −g if maximize; g ← g + λθ; with momentum μ,
    b ← μb + (1 − τ)g (the first step, b = g, is PyTorch's own), g ← g + μb (Nesterov) or b;
    θ ← θ − ηg."""
    wd, mom = float(h["weight_decay"]), float(h["momentum"])
    if h["maximize"]:
        g = -g
    if wd != 0:
        g = g.add(p, alpha=wd)
    new: List[Tensor] = []
    if mom != 0:
        buf = states[0].mul(mom).add(g, alpha=1 - float(h["dampening"]))
        new.append(buf)
        g = g.add(buf, alpha=mom) if h["nesterov"] else buf
    return p - lr * g, new


# Adam and AdamW share one update (AdamW is Adam with decoupled_weight_decay=True in its groups)
_ADAM = UpdateRule(_adam_states, ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"),
                   _NEUTRAL, _adam_update, _adam_check)

#: the optimizers a captured step can update, by exact class
RULES: Dict[type, UpdateRule] = {
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.SGD: UpdateRule(_sgd_states, ("momentum", "dampening", "weight_decay", "nesterov",
                                              "maximize"), _NEUTRAL, _sgd_update),
}


def rule_for(optimizer: torch.optim.Optimizer) -> UpdateRule:
    """The rule of ``optimizer``'s class, or a :class:`curvrate_fast.CaptureError` naming what
    cannot be captured (another class, a subclass, an unknown group option, differentiable=True,
    optimizer step hooks, a step method replaced on the instance; an LR scheduler's wrapper of
    ``step`` is fine)."""
    from .capture import CaptureError
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"step needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    rule = RULES.get(type(optimizer))
    if rule is None:
        known = ", ".join(sorted(f"torch.optim.{c.__name__}" for c in RULES))
        raise CaptureError(f"a captured step cannot update a {type(optimizer).__module__}."
                           f"{type(optimizer).__qualname__} (captured steps know {known}, by exact class); "
                           "call loss.backward() and optimizer.step() instead")
    hook_dicts = (getattr(optimizer, "_optimizer_step_pre_hooks", None),
                  getattr(optimizer, "_optimizer_step_post_hooks", None),
                  getattr(_optimizer_module, "_global_optimizer_pre_hooks", None),
                  getattr(_optimizer_module, "_global_optimizer_post_hooks", None))
    if any(hook_dicts):
        hooks = [h for d in hook_dicts if d for h in d.values()]
        raise CaptureError(f"a captured step cannot update {type(optimizer).__name__}: it has optimizer step "
                           f"hook(s) ({', '.join(getattr(h, '__qualname__', type(h).__name__) for h in hooks)}), "
                           "which a captured update would skip; call loss.backward() and optimizer.step() instead")
    own_step = vars(optimizer).get("step")
    if own_step is not None and not hasattr(own_step, "_wrapped_by_lr_sched"):
        raise CaptureError(f"a captured step cannot update {type(optimizer).__name__}: its step method was "
                           "replaced on the instance; call loss.backward() and optimizer.step() instead")
    for group in optimizer.param_groups:
        if not rule.known.issuperset(group):
            unknown = sorted(set(group) - rule.known)
            raise CaptureError(f"a captured step cannot update {type(optimizer).__name__}: its param group has "
                               f"option(s) {unknown} that the captured update does not know; call "
                               "loss.backward() and optimizer.step() instead")
        if group.get("differentiable"):
            raise CaptureError(f"a captured step cannot update {type(optimizer).__name__} with "
                               "differentiable=True (its update is part of a graph to differentiate)")
        why = rule.check(group)
        if why:
            raise CaptureError(f"a captured step cannot update {type(optimizer).__name__} with {why}")
    return rule


def group_constants(rule: UpdateRule, group: Dict[str, Any]) -> tuple:
    """The hashable constants of a group (part of a captured step's guard)."""
    return tuple((k, tuple(group[k]) if isinstance(group[k], (list, tuple)) else group[k])
                 for k in rule.constants if k in group)


def lr_tensor(group: Dict[str, Any]) -> Tensor:
    """The group's learning rate as a 0-d float64 CPU graph input (a float or a tensor lr; a 0-d
    CPU tensor mixes with tensors on any device as a scalar)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        return lr.detach().to(device="cpu", dtype=torch.float64).reshape(())
    return torch.tensor(float(lr), dtype=torch.float64)


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """What the LR scheduler's wrapper of ``optimizer.step`` records when the optimizer steps (so
    that ``scheduler.step()`` knows the optimizer stepped first, and does not warn)."""
    if hasattr(getattr(optimizer, "step", None), "_wrapped_by_lr_sched"):
        optimizer._opt_called = True  # type: ignore[attr-defined]


class StepPlan:
    """What a captured step reads off an optimizer for the tensors a loss is differentiated with
    respect to (``wrt``, in graph-input order; a tied parameter sits at several positions):

    - ``rule``: the optimizer's :class:`UpdateRule` (:func:`rule_for`'s checks passed);
    - ``groups``: the indices of the param groups holding one of the tensors;
    - ``owned``: (index into ``groups``, parameter) for every such parameter, in group order
      (empty: the optimizer holds none of them);
    - ``positions``: each owned parameter's positions among ``wrt``;
    - ``names``: each owned parameter's state names (``rule.states`` of its group);
    - ``constants``: each group's constants (part of the step's guard)."""

    __slots__ = ("rule", "groups", "owned", "positions", "names", "constants")

    def __init__(self, optimizer: torch.optim.Optimizer, wrt: Sequence[Tensor]) -> None:
        self.rule = rule = rule_for(optimizer)
        where: Dict[int, List[int]] = {}     # id(tensor) → its positions among wrt
        for j, t in enumerate(wrt):
            where.setdefault(id(t), []).append(j)
        pg = optimizer.param_groups
        self.groups: List[int] = []
        self.owned: List[Tuple[int, Tensor]] = []
        for gi, group in enumerate(pg):
            mine = [p for p in group["params"] if id(p) in where]
            if mine:
                self.groups.append(gi)
                self.owned.extend((len(self.groups) - 1, p) for p in mine)
        self.positions = tuple((k, tuple(where[id(p)])) for k, p in self.owned)
        self.names = tuple(rule.states(pg[self.groups[k]]) for k, _ in self.owned)
        self.constants = tuple(group_constants(rule, pg[gi]) for gi in self.groups)


class _PlanMemo:
    """A :class:`StepPlan` kept while nothing it was read from can have changed: the same
    tensors, the same param-group dicts holding the same parameter lists, and the version tag of
    every dict involved (the optimizer's ``__dict__``: a replaced ``step``, new hook dicts; each
    group's dict: any hyperparameter, the learning rate included; the optimizer's and the global
    step-hook dicts)."""

    __slots__ = ("ref", "wrt", "group_dicts", "params", "versions", "plan")

    def __init__(self, optimizer: torch.optim.Optimizer, wrt: Sequence[Tensor], plan: StepPlan) -> None:
        key = id(optimizer)
        self.ref = weakref.ref(optimizer, lambda _r: _PLANS.pop(key, None))
        self.wrt = tuple(wrt)
        self.group_dicts = tuple(optimizer.param_groups)
        self.params = tuple(tuple(g["params"]) for g in self.group_dicts)
        # the versions only: the optimizer's own dict may hold a bound method of it (a scheduler's
        # step wrapper), and a process-wide memo must not keep an optimizer alive
        self.versions = tuple(map(_dict_version, _plan_dicts(optimizer)))
        self.plan = plan

    def valid_for(self, optimizer: torch.optim.Optimizer, wrt: Sequence[Tensor]) -> bool:
        pg = optimizer.param_groups
        return (self.ref() is optimizer and len(wrt) == len(self.wrt) and all(map(operator.is_, wrt, self.wrt))
                and len(pg) == len(self.group_dicts) and all(map(operator.is_, pg, self.group_dicts))
                and tuple(map(_dict_version, _plan_dicts(optimizer))) == self.versions
                and all(len(g["params"]) == len(ps) and all(map(operator.is_, g["params"], ps))
                        for g, ps in zip(pg, self.params)))


def _plan_dicts(optimizer: torch.optim.Optimizer) -> tuple:
    """The dicts a :class:`StepPlan` is read from (their versions are its memo's guard)."""
    d = optimizer.__dict__
    return (d, *optimizer.param_groups,
            *[h for h in (d.get("_optimizer_step_pre_hooks"), d.get("_optimizer_step_post_hooks"),
                          getattr(_optimizer_module, "_global_optimizer_pre_hooks", None),
                          getattr(_optimizer_module, "_global_optimizer_post_hooks", None))
              if type(h) is dict or type(h) is collections.OrderedDict])


_PLANS: Dict[int, _PlanMemo] = {}    # id(optimizer) → its memo (dropped with the optimizer)


def step_plan(optimizer: torch.optim.Optimizer, wrt: Sequence[Tensor]) -> StepPlan:
    """The :class:`StepPlan` of ``optimizer`` for ``wrt``, remembered per optimizer while it holds
    (:class:`_PlanMemo`; a learning-rate scheduler's write to a group makes it anew, as any
    change does). Raises :class:`curvrate_fast.CaptureError` as :func:`rule_for` does."""
    memo = _PLANS.get(id(optimizer))
    if memo is not None and memo.valid_for(optimizer, wrt):
        return memo.plan
    plan = StepPlan(optimizer, wrt)
    if _dict_version is not None:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        _PLANS[id(optimizer)] = _PlanMemo(optimizer, wrt, plan)
    return plan
