"""Taylor rules for softmax, log_softmax and the losses: cross-entropy, nll, mse, l1,
binary cross-entropy with logits (docs/math.md §2: per-sample cross-entropy ℓ = logsumexp(z) − z_y by
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
    if c.numel() == 0:  # nothing to normalize (amax of an empty slice would raise)
        return make_jet(torch.zeros_like(c), K)
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
    if input._coeffs.numel() == 0:
        return make_jet(torch.zeros_like(input._coeffs), K)
    lse = logsumexp_coeffs(input, d, keepdim=True)
    return make_jet(S.sub(input.series(), lse, K), K)


@register(F.softmin)
def softmin(input, dim=None, _stacklevel=3, dtype=None):
    """softmin(u) = softmax(−u) (the same implicit dim as softmax when dim is None)."""
    return softmax(-input, dim, dtype=dtype)


@register(torch._safe_softmax, torch.ops.aten._safe_softmax)
def safe_softmax(input, dim, dtype=None):
    """softmax, but a slice whose entries are all −∞ gives 0 (not NaN): such slices are −∞ along
    the whole path (x_0 + t·u = −∞), so every coefficient there is 0; the others are softmax's."""
    if dtype is not None:
        input = input.to(dtype)
    d = _softmax_dim(input, dim)
    x0 = input._coeffs[0]
    dead = (x0 == float("-inf")).all(dim=d, keepdim=True) if x0.dim() else x0 == float("-inf")
    safe = torch.where(dead, torch.zeros((), dtype=x0.dtype, device=x0.device), input)
    return torch.where(dead, torch.zeros((), dtype=x0.dtype, device=x0.device), softmax(safe, d))


@register(torch._softmax_backward_data, torch.ops.aten._softmax_backward_data)
def softmax_backward_data(grad_output, output, dim, input_dtype):
    """softmax's vector-Jacobian product y ⊙ (g − Σ_dim g ⊙ y): bilinear in (g, y), so any of
    them may be a jet (products of jets are Cauchy products)."""
    g = grad_output
    return (output * (g - (g * output).sum(dim, keepdim=True))).to(input_dtype)


@register(torch._log_softmax_backward_data, torch.ops.aten._log_softmax_backward_data)
def log_softmax_backward_data(grad_output, output, dim, input_dtype):
    """log_softmax's vector-Jacobian product g − exp(y) ⊙ Σ_dim g."""
    g = grad_output
    return (g - torch.exp(output) * g.sum(dim, keepdim=True)).to(input_dtype)


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


@register(F.cross_entropy)
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
    if reduction == "mean":  # PyTorch divides by the number of positions, numel / C
        return loss.sum() / max(input.numel() // max(C, 1), 1)
    return _reduce(loss, reduction)


@register(F.nll_loss)
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
    if registry.tracing() or not bool(valid.all()):   # a capture cannot read which are valid
        loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    denom = w_t.sum() if w_t is not None else valid.sum().to(loss.dtype)
    return _reduce(loss, reduction, denom)


def _legacy(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as _Reduction
        return _Reduction.legacy_get_string(size_average, reduce)
    return reduction


@register(F.mse_loss)
def mse_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None):
    """(x − t)², times weight (a weighted mean divides by Σ weight, as F.mse_loss)."""
    reduction = _legacy(size_average, reduce, reduction)
    loss = torch.square(input - target)
    if weight is not None:  # F.mse_loss: a weighted mean divides by Σ weight
        loss = loss * weight
        if reduction == "mean":
            return loss.sum() / weight.sum()
    return _reduce(loss, reduction)


@register(F.l1_loss)
def l1_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None):
    """|x − t| (sign(0) = 0, as autograd), times weight (weighted mean ÷ Σ weight)."""
    reduction = _legacy(size_average, reduce, reduction)
    loss = torch.abs(input - target)
    if weight is not None:  # F.l1_loss: a weighted mean divides by Σ weight
        loss = loss * weight
        if reduction == "mean":
            return loss.sum() / weight.sum()
    return _reduce(loss, reduction)


@register(F.binary_cross_entropy_with_logits)
def bce_with_logits(input, target, weight=None, size_average=None, reduce=None,
                    reduction: str = "mean", pos_weight=None):
    """ℓ = (1 − y)·z + (1 + (pw − 1)·y)·softplus(−z), with softplus(−z) = −log σ(z) through the
    logsigmoid jet (exact for every z; F.softplus would switch to the identity past its
    threshold)."""
    reduction = _legacy(size_average, reduce, reduction)
    if target.size() != input.size():  # F's check (the ATen form broadcasts)
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    return _bce_with_logits(input, target, weight, reduction, pos_weight)


def _bce_with_logits(input, target, weight, reduction: str, pos_weight):
    sp = -F.logsigmoid(input)
    if pos_weight is not None:
        loss = (1 - target) * input + (1 + (pos_weight - 1) * target) * sp
    else:
        loss = (1 - target) * input + sp
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


# The ATen forms take the reduction as an integer (0 none, 1 mean, 2 sum) and their own argument
# order; they share the rules above.
_REDUCTION_NAMES = ("none", "mean", "sum")


@register(torch._C._nn.cross_entropy_loss)
def _cross_entropy_aten(input, target, weight=None, reduction: int = 1, ignore_index: int = -100,
                        label_smoothing: float = 0.0):
    """The ATen form (integer reduction, ATen argument order): the rule above."""
    return cross_entropy(input, target, weight, ignore_index=ignore_index,
                         reduction=_REDUCTION_NAMES[reduction], label_smoothing=label_smoothing)


@register(torch._C._nn.nll_loss, torch._C._nn.nll_loss_nd, torch._C._nn.nll_loss2d)
def _nll_loss_aten(input, target, weight=None, reduction: int = 1, ignore_index: int = -100):
    """The ATen form (integer reduction, ATen argument order): the rule above."""
    return nll_loss(input, target, weight, ignore_index=ignore_index,
                    reduction=_REDUCTION_NAMES[reduction])


@register(torch._C._nn.mse_loss)
def _mse_loss_aten(input, target, reduction: int = 1):
    """The ATen form (integer reduction, ATen argument order): the rule above."""
    return mse_loss(input, target, reduction=_REDUCTION_NAMES[reduction])


@register(torch._C._nn.l1_loss)
def _l1_loss_aten(input, target, reduction: int = 1):
    """The ATen form (integer reduction, ATen argument order): the rule above."""
    return l1_loss(input, target, reduction=_REDUCTION_NAMES[reduction])


@register(torch.binary_cross_entropy_with_logits)
def _bce_with_logits_aten(input, target, weight=None, pos_weight=None, reduction: int = 1):
    """The ATen form (integer reduction, ATen argument order): the rule above."""
    return _bce_with_logits(input, target, weight, _REDUCTION_NAMES[reduction], pos_weight)
