"""Taylor rules for softmax, log_softmax and the losses: cross-entropy, nll, mse, l1,
binary cross-entropy with logits (SPEC.md §2: per-sample cross-entropy ℓ = logsumexp(z) − z_y by
the max shift, exp jet, class sum, log jet and subtraction of the target's jet)."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .. import series as S
from ..jets import registry
from ..jets.registry import register
from ._common import aliases, is_jet, make_jet, primal
from .activations import use_triton
from .reductions import logsumexp_coeffs


def _softmax_dim(input, dim) -> int:
    if dim is None:  # torch's legacy implicit choice
        dim = 0 if input.dim() in (0, 1, 3) else 1
    return dim % max(input.dim(), 1)


@register(*aliases("softmax"), F.softmax, torch.special.softmax)
def softmax(input, dim=None, _stacklevel=3, dtype=None, *, out=None):
    """softmax = e / Σ e with e the exp jet of z − max z_0 (a constant shift)."""
    if dtype is not None:
        input = input.to(dtype)
    K = input._order
    d = _softmax_dim(input, dim)
    c = input._coeffs
    m = c[0].detach().amax(dim=d, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = S.exp([c[0] - m] + list(c[1:].unbind(0)), K)
    s = [x.sum(dim=d, keepdim=True) for x in e]
    return make_jet(S.div(e, s, K), K)


@register(*aliases("log_softmax"), F.log_softmax, torch.special.log_softmax)
def log_softmax(input, dim=None, _stacklevel=3, dtype=None, *, out=None):
    """log_softmax = z − logsumexp(z)."""
    if dtype is not None:
        input = input.to(dtype)
    K = input._order
    d = _softmax_dim(input, dim)
    lse = logsumexp_coeffs(input, d, keepdim=True)
    return make_jet(S.sub(input.series(), lse, K), K)


def _reduce(loss, reduction: str, denom=None):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / denom if denom is not None else loss.mean()
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _class_dim_gather(logp, target: Tensor):
    """−logp at the target class; class axis 1 (or 0 for an unbatched input)."""
    cdim = 1 if logp.dim() >= 2 else 0
    t = target.clamp_min(0).unsqueeze(cdim)
    c = logp._coeffs
    index = t.unsqueeze(0).expand((c.shape[0],) + tuple(t.shape))
    return make_jet(torch.gather(c, cdim + 1, index).squeeze(cdim + 1), logp._order)


def _check_targets(input, target: Tensor, ignore_index: int) -> None:
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if target.numel() == 0 or registry.tracing():  # a trace cannot read the labels' values
        return
    lo, hi = torch.aminmax(target)
    if 0 <= int(lo) and int(hi) < C:  # one op in the common case
        return
    valid = target != ignore_index
    if valid.any():
        t = target[valid]
        if bool((t < 0).any()) or bool((t >= C).any()):
            raise ValueError(f"cross-entropy targets must be class indices in [0, {C}); got values "
                             f"in [{int(t.min())}, {int(t.max())}]")


@register(F.cross_entropy, torch._C._nn.cross_entropy_loss)
def cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100,
                  reduce=None, reduction: str = "mean", label_smoothing: float = 0.0):
    """Cross-entropy jet. Per sample: ℓ = logsumexp(z) − z_y (times weight[y]); with label
    smoothing ε, (1 − ε)·ℓ + ε·mean_c(−w_c log p_c); probability targets: −Σ_c w_c p_c log p_c."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as _Reduction
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if not is_jet(input):  # only the target is a jet (probabilities): linear in the target
        return _soft_target_ce(input, target, weight, reduction, label_smoothing)
    K = input._order
    target = primal(target) if not is_jet(target) else target
    cdim = 1 if input.dim() >= 2 else 0
    C = input.shape[cdim]
    if is_jet(target) or target.is_floating_point():
        return _soft_target_ce(input, target, weight, reduction, label_smoothing)
    _check_targets(input, target, ignore_index)
    if (weight is None and label_smoothing == 0.0 and input.dim() == 2
            and use_triton(input._coeffs, K)):
        from ..functions import cross_entropy_jet
        loss = make_jet(cross_entropy_jet(input._coeffs, target, K, ignore_index=ignore_index), K)
        valid = target != ignore_index
        return _reduce(loss, reduction, valid.sum().to(loss.dtype))
    logp = log_softmax(input, cdim)
    nll = -_class_dim_gather(logp, target)
    valid = target != ignore_index
    w_t = None
    if weight is not None:
        w_t = weight[target.clamp_min(0)] * valid.to(weight.dtype)
        nll = nll * w_t
    if label_smoothing > 0.0:
        wl = logp if weight is None else logp * weight.reshape((-1,) + (1,) * (input.dim() - cdim - 1))
        smooth = -wl.sum(dim=cdim) / C
        nll = (1 - label_smoothing) * nll + label_smoothing * smooth
    # skipping the where when every label is valid saves one op per coefficient; a trace cannot ask
    if registry.tracing() or not bool(valid.all()):
        nll = torch.where(valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
    denom = w_t.sum() if w_t is not None else valid.sum().to(nll.dtype)
    return _reduce(nll, reduction, denom)


def _soft_target_ce(input, target, weight, reduction, label_smoothing):
    cdim = 1 if input.dim() >= 2 else 0
    C = input.shape[cdim]
    if label_smoothing > 0.0:
        target = target * (1 - label_smoothing) + label_smoothing / C
    logp = F.log_softmax(input, cdim) if is_jet(input) else torch.log_softmax(input, cdim)
    if weight is not None:
        logp = logp * weight.reshape((-1,) + (1,) * (input.dim() - cdim - 1))
    loss = -(logp * target).sum(dim=cdim)
    if reduction == "mean":
        return loss.sum() / (input.shape[0] if input.dim() >= 2 else 1)
    return _reduce(loss, reduction)


@register(F.nll_loss, torch._C._nn.nll_loss, torch._C._nn.nll_loss_nd)
def nll_loss(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
             reduction: str = "mean"):
    """nll = −input[target] (linear in the input jet), weighted, ignoring ``ignore_index``."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as _Reduction
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    target = primal(target)
    _check_targets(input, target, ignore_index)
    loss = -_class_dim_gather(input, target)
    valid = target != ignore_index
    w_t = None
    if weight is not None:
        w_t = weight[target.clamp_min(0)] * valid.to(weight.dtype)
        loss = loss * w_t
    if not bool(valid.all()):
        loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    denom = w_t.sum() if w_t is not None else valid.sum().to(loss.dtype)
    return _reduce(loss, reduction, denom)


def _legacy(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as _Reduction
        return _Reduction.legacy_get_string(size_average, reduce)
    return reduction


@register(F.mse_loss, torch._C._nn.mse_loss)
def mse_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None):
    reduction = _legacy(size_average, reduce, reduction)
    loss = torch.square(input - target)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


@register(F.l1_loss, torch._C._nn.l1_loss)
def l1_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None):
    reduction = _legacy(size_average, reduce, reduction)
    loss = torch.abs(input - target)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


@register(F.binary_cross_entropy_with_logits, torch.binary_cross_entropy_with_logits)
def bce_with_logits(input, target, weight=None, size_average=None, reduce=None,
                    reduction: str = "mean", pos_weight=None):
    """ℓ = (1 − y)·z + (1 + (pw − 1)·y)·softplus(−z)  (softplus(−z) = −log σ(z))."""
    reduction = _legacy(size_average, reduce, reduction)
    sp = F.softplus(-input)
    if pos_weight is not None:
        loss = (1 - target) * input + (1 + (pos_weight - 1) * target) * sp
    else:
        loss = (1 - target) * input + sp
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)
