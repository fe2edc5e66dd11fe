"""Taylor rules for the losses of ``torch.nn.functional`` beyond cross-entropy/nll/mse/l1 (those are
in ``nn.py``): Huber and smooth L1, soft margin, KL divergence, Poisson and Gaussian NLL, the margin
and embedding losses, binary cross-entropy, linear cross-entropy, CTC.

Every loss is written with ops that have exact rules, or as a piecewise polynomial whose piece is
picked by the primal (``activations.piecewise_quadratic``). Where a loss is not differentiable (a
hinge at exactly zero, |d| = δ of Huber) the pieces follow autograd's conventions, stated per rule.
The ATen forms (``torch._C._nn.huber_loss``, ``torch.kl_div``...) take the reduction as an integer
(0 none, 1 mean, 2 sum) and share the rules of the functional forms.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..jets.registry import register
from ._common import JetError, is_jet, make_jet, primal, require
from .activations import piecewise_quadratic
from .nn import _legacy, _reduce

_REDUCTIONS = ("none", "mean", "sum")


def _red(reduction) -> str:
    """A reduction given as a string or as ATen's integer enum."""
    return _REDUCTIONS[reduction] if isinstance(reduction, int) else reduction


def _fixed_labels(target, labels, op: str) -> Tensor:
    """The primal of a target used only through equality tests with ``labels`` (±1). Along a path
    on which such a target entry moves, the loss jumps at t = 0 (y = 1 only at t = 0), so it has no
    Taylor expansion: that raises."""
    y = primal(target)
    if is_jet(target) and target._coeffs.shape[0] > 1:
        hit = torch.zeros_like(y, dtype=torch.bool)
        for v in labels:
            hit |= y == v
        require(~(hit & (target._coeffs[1:] != 0).any(0)), JetError,
                f"{op}: the target is a jet that moves away from ±1; the loss selects its branch by "
                "target == ±1, so it jumps along this path (no Taylor expansion). Pass the target as a "
                "constant (e.g. target.detach()).")
    return y


def _zero(like) -> Tensor:
    p = primal(like)
    return torch.zeros((), dtype=p.dtype, device=p.device)


def _as_float(x, like):
    """A constant operand (number or tensor) in the dtype of the jet ``like``."""
    p = primal(like)
    if is_jet(x):
        return x
    return torch.as_tensor(x, dtype=p.dtype, device=p.device) if not isinstance(x, Tensor) else x


# -- regression losses --------------------------------------------------------------------------

def _huber_jet(d, delta: float, smooth_l1: bool):
    """Huber: ½d² for |d_0| ≤ δ, δ(|d| − ½δ) outside; smooth L1 is Huber/β with δ = β. Degree ≤ 2
    on each piece (piecewise_quadratic), with autograd's convention |d_0| = δ → the inner piece."""
    d0 = primal(d)
    a = d0.abs()
    inner = a <= delta
    scale = 1.0 / delta if smooth_l1 else 1.0
    y0 = torch.where(a < delta, 0.5 * d0 * d0, delta * (a - 0.5 * delta)) * scale
    d1 = torch.where(inner, d0, delta * torch.sign(d0)) * scale
    d2 = inner.to(d0.dtype) * scale
    return piecewise_quadratic(d, y0, d1, d2)


def _abs_jet(d):
    """|d|: y_k = sign(d_0)·d_k (0 at d_0 = 0, like autograd)."""
    d0 = primal(d)
    return piecewise_quadratic(d, d0.abs(), torch.sign(d0))


@register(F.huber_loss)
def huber_loss(input, target, reduction: str = "mean", delta: float = 1.0, weight=None):
    """Huber loss ½d² (|d| ≤ δ), δ(|d| − ½δ) (|d| > δ) of d = input − target, times ``weight``."""
    if delta <= 0:
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    loss = _huber_jet(input - target, float(delta), smooth_l1=False)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, _red(reduction))


@register(torch._C._nn.huber_loss)
def _huber_loss_aten(input, target, reduction: int = 1, delta: float = 1.0):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return huber_loss(input, target, reduction, delta)


@register(F.smooth_l1_loss)
def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction: str = "mean",
                   beta: float = 1.0):
    """Smooth L1: ½d²/β (|d| < β), |d| − ½β otherwise; β = 0 is the L1 loss."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    if beta < 0:
        raise RuntimeError("smooth_l1_loss does not support negative values for beta.")
    d = input - target
    loss = _abs_jet(d) if beta == 0 else _huber_jet(d, float(beta), smooth_l1=True)
    return _reduce(loss, reduction)


@register(torch._C._nn.smooth_l1_loss)
def _smooth_l1_loss_aten(input, target, reduction: int = 1, beta: float = 1.0):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return smooth_l1_loss(input, target, reduction=reduction, beta=beta)


@register(F.soft_margin_loss)
def soft_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """log(1 + exp(−y·x)) = −log σ(y·x) (the logsigmoid jet: exact for every y·x)."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    if torch.broadcast_shapes(input.shape, target.shape) != input.shape:
        raise RuntimeError(f"soft_margin_loss: the target of shape {tuple(target.shape)} does not "
                           f"broadcast to the input's shape {tuple(input.shape)}")
    return _reduce(-F.logsigmoid(target * input), reduction)


def _xlogx(t):
    """t·log t with 0 at t = 0 (xlogy(t, t)). Along a path through t_0 = 0 with a non-zero
    direction the function is s·log s, which has no Taylor expansion: that raises."""
    t0 = primal(t)
    if not is_jet(t):
        return torch.xlogy(t0, t0)
    zero = t0 == 0
    c = t._coeffs
    if c.shape[0] > 1:
        require(~(zero & (c[1:] != 0).any(0)), JetError,
                "kl_div: a target jet passes through target = 0 with a non-zero direction; t·log t has no "
                "Taylor expansion there (its derivative is −∞)")
    one = torch.ones((), dtype=t0.dtype, device=t0.device)
    safe = torch.where(zero, one, t)
    return torch.where(zero, _zero(t), safe * torch.log(safe))


@register(F.kl_div)
def kl_div(input, target, size_average=None, reduce=None, reduction: str = "mean",
           log_target: bool = False):
    """KL divergence pointwise: e^t·(t − x) (log_target) or xlogy(t, t) − t·x; reductions as
    F.kl_div ('batchmean' divides the sum by the batch size)."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    loss = _kl_pointwise(input, target, log_target)
    if reduction == "batchmean":
        total = loss.sum()
        return total / input.shape[0] if input.dim() != 0 else total
    return _reduce(loss, reduction)


def _kl_pointwise(input, target, log_target: bool):
    if log_target:
        return torch.exp(target) * (target - input)
    return _xlogx(target) - target * input


@register(torch.kl_div)
def _kl_div_aten(input, target, reduction: int = 1, *, log_target: bool = False):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return _reduce(_kl_pointwise(input, target, log_target), _red(reduction))


@register(F.poisson_nll_loss)
def poisson_nll_loss(input, target, log_input: bool = True, full: bool = False, size_average=None,
                     eps: float = 1e-8, reduce=None, reduction: str = "mean"):
    """exp(x) − t·x (log_input) or x − t·log(x + eps); ``full`` adds Stirling's term
    t·log t − t + ½log(2πt) where t_0 > 1 (a constant mask, as ATen's masked_fill)."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    if reduction not in _REDUCTIONS:
        raise ValueError(reduction + " is not a valid value for reduction")
    if log_input:
        loss = torch.exp(input) - target * input
    else:
        loss = input - target * torch.log(input + eps)
    if full:
        t0 = primal(target)
        small = t0 <= 1
        safe = torch.where(small, torch.full((), 2.0, dtype=t0.dtype, device=t0.device), target) \
            if is_jet(target) else torch.where(small, 2.0, t0)
        stirling = safe * torch.log(safe) - safe + 0.5 * torch.log(2 * math.pi * safe)
        loss = loss + torch.where(small, _zero(loss), stirling)
    return _reduce(loss, reduction)


@register(torch.poisson_nll_loss)
def _poisson_nll_loss_aten(input, target, log_input: bool, full: bool, eps: float, reduction: int):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return poisson_nll_loss(input, target, log_input, full, eps=eps, reduction=reduction)


@register(F.gaussian_nll_loss)
def gaussian_nll_loss(input, target, var, full: bool = False, eps: float = 1e-6,
                      reduction: str = "mean"):
    """½(log v + (x − t)²/v) (+ ½log 2π) with v = max(var, eps).

    PyTorch clamps var in place under no_grad, so its autograd passes derivatives through the
    clamp (a straight-through gradient); these are the Taylor coefficients of the function it
    computes, in which var has no effect where var_0 < eps (there the two differ)."""
    if isinstance(var, float):
        if var < 0:
            raise ValueError("var has negative entry/entries")
        var = var * torch.ones_like(primal(input))
    else:
        require(~(primal(var) < 0), ValueError, "var has negative entry/entries")   # NaN passes, as in torch
    if var.size() != input.size():
        if input.size()[:-1] == var.size():
            var = torch.unsqueeze(var, -1)
        elif input.dim() == var.dim() and sum(
                y for x, y in zip(input.size(), var.size()) if x != y) == 1:
            pass
        else:
            raise ValueError("var is of incorrect size")
    if reduction not in _REDUCTIONS:
        raise ValueError(reduction + " is not valid")
    v = torch.clamp_min(var, eps)
    loss = 0.5 * (torch.log(v) + (input - target) ** 2 / v)
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return _reduce(loss, reduction)


# -- margin and embedding losses ----------------------------------------------------------------

@register(F.margin_ranking_loss)
def margin_ranking_loss(input1, input2, target, margin: float = 0, size_average=None, reduce=None,
                        reduction: str = "mean"):
    """max(0, −y·(x₁ − x₂) + margin) (clamp_min: the gradient passes at exactly 0, as autograd)."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    if input1.dim() != input2.dim() or input1.dim() != target.dim():
        raise RuntimeError("margin_ranking_loss : All input tensors should have same dimension")
    if not (input1.shape == input2.shape == target.shape):
        raise RuntimeError("margin_ranking_loss: all input tensors should have same size")
    return _reduce(torch.clamp_min(-target * (input1 - input2) + margin, 0), reduction)


@register(torch.margin_ranking_loss)
def _margin_ranking_loss_aten(input1, input2, target, margin: float = 0.0, reduction: int = 1):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return margin_ranking_loss(input1, input2, target, margin, reduction=reduction)


@register(F.hinge_embedding_loss)
def hinge_embedding_loss(input, target, margin: float = 1.0, size_average=None, reduce=None,
                         reduction="mean"):
    """ATen's form: [y ≠ 1]·max(0, margin − x) + [y ≠ −1]·x (the target only selects)."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    y = _fixed_labels(target, (1, -1), "hinge_embedding_loss")
    z = _zero(input if is_jet(input) else target)
    hinge = torch.clamp_min(-input + margin, 0)  # (a number left of a jet would be float32)
    out = torch.where(y != 1, hinge, z) + torch.where(y != -1, input, z)
    return _reduce(out, reduction)


_EPSILON = float(torch.tensor(1e-12, dtype=torch.float32))  # ATen's float EPSILON


@register(F.cosine_embedding_loss)
def cosine_embedding_loss(input1, input2, target, margin: float = 0, size_average=None,
                          reduce=None, reduction="mean"):
    """cos = Σx₁x₂ / sqrt((Σx₁² + ε)(Σx₂² + ε)); 1 − cos where y = 1, max(0, cos − margin) where
    y = −1, 0 elsewhere (ATen's form, ε = 1e-12)."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    y = _fixed_labels(target, (1, -1), "cosine_embedding_loss")
    d = y.dim()
    if d not in (0, 1):
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    if input1.dim() != d + 1 or input2.dim() != d + 1:
        raise RuntimeError(f"{d}D target tensor expects {d + 1}D input tensors, but found inputs with "
                           f"sizes {tuple(input1.shape)} and {tuple(input2.shape)}.")
    prod = (input1 * input2).sum(d)
    m1 = (input1 * input1).sum(d) + _EPSILON
    m2 = (input2 * input2).sum(d) + _EPSILON
    cos = prod / torch.sqrt(m1 * m2)
    z = _zero(cos)
    out = torch.where(y == 1, 1 - cos, z) + torch.where(y == -1, torch.clamp_min(cos - margin, 0), z)
    return _reduce(out, reduction)


@register(F.multi_margin_loss)
def multi_margin_loss(input, target, p: int = 1, margin: float = 1.0, weight=None,
                      size_average=None, reduce=None, reduction="mean"):
    """Per sample Σ_{j ≠ y} w_y·max(0, margin − x_y + x_j)^p / C (p = 1, 2); the hinge is taken
    strictly positive (autograd's multi_margin_loss_backward: z > 0)."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    if p not in (1, 2):
        raise ValueError("only p == 1 and p == 2 supported")
    t = primal(target)
    x = input if input.dim() == 2 else input.reshape(1, -1)
    N, C = x.shape
    ti = t.reshape(-1, 1).long()
    xy = torch.gather(x, 1, ti)
    z = x - xy + margin
    z0 = primal(z)
    active = (z0 > 0) & (torch.arange(C, device=z0.device) != ti)
    h = torch.where(active, z, _zero(z))
    if p == 2:
        h = h * h
    if weight is not None:
        h = h * weight[ti.reshape(-1)].reshape(-1, 1)
    loss = h.sum(1) / C
    loss = loss.reshape(t.shape) if input.dim() != 2 else loss
    return _reduce(loss, reduction)


@register(F.multilabel_margin_loss)
def multilabel_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """Per sample Σ_{j ∈ targets} Σ_{k ∉ targets} max(0, 1 − (x_j − x_k)) / C, the targets being the
    entries of ``target`` before its first −1 (repeats count again, as in ATen's loop); the hinge is
    taken strictly positive (autograd's convention)."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    t = primal(target).long()
    x = input if input.dim() == 2 else input.reshape(1, -1)
    t2 = t.reshape(x.shape)
    N, C = x.shape
    valid = (t2 >= 0).long().cumprod(1).bool()             # entries before the first −1
    ti = torch.where(valid, t2, torch.zeros_like(t2))
    is_target = (F.one_hot(ti, C).bool() & valid.unsqueeze(2)).any(1)
    xt = torch.gather(x, 1, ti)                            # (N, C): x at the listed targets
    z = 1 - xt.unsqueeze(2) + x.unsqueeze(1)               # (N, entry j, class k)
    z0 = primal(z)
    active = valid.unsqueeze(2) & ~is_target.unsqueeze(1) & (z0 > 0)
    loss = torch.where(active, z, _zero(z)).sum((1, 2)) / C
    loss = loss.reshape(()) if input.dim() == 1 else loss
    return _reduce(loss, reduction)


@register(F.multilabel_soft_margin_loss)
def multilabel_soft_margin_loss(input, target, weight=None, size_average=None, reduce=None,
                                reduction: str = "mean"):
    """−(y·log σ(x) + (1 − y)·log σ(−x)), times weight, summed over classes / C."""
    reduction = _legacy(size_average, reduce, reduction)
    loss = -(target * F.logsigmoid(input) + (1 - target) * F.logsigmoid(-input))
    if weight is not None:
        loss = loss * weight
    C = input.shape[-1]
    loss = loss.sum(dim=input.dim() - 1) / C
    if reduction not in _REDUCTIONS:
        raise ValueError(reduction + " is not valid")
    return _reduce(loss, reduction)


@register(F.triplet_margin_loss)
def triplet_margin_loss(anchor, positive, negative, margin: float = 1.0, p: float = 2,
                        eps: float = 1e-6, swap: bool = False, size_average=None, reduce=None,
                        reduction="mean"):
    """max(0, margin + d(a, p) − d(a, n)) with d the pairwise distance (``distances.py``); with
    swap, d(a, n) ← min(d(a, n), d(p, n))."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    if margin <= 0:  # F's check (the ATen form accepts any margin)
        raise ValueError(f"margin must be greater than 0, got {margin}")
    return _triplet(anchor, positive, negative, margin, p, eps, swap, reduction)


def _triplet(anchor, positive, negative, margin, p, eps, swap, reduction):
    if not (anchor.dim() == positive.dim() == negative.dim()):
        raise RuntimeError("All inputs should have same dimension")
    dp = torch.pairwise_distance(anchor, positive, p, eps)
    dn = torch.pairwise_distance(anchor, negative, p, eps)
    if swap:
        dn = torch.minimum(dn, torch.pairwise_distance(positive, negative, p, eps))
    return _reduce(torch.clamp_min(dp - dn + margin, 0), reduction)


@register(torch.triplet_margin_loss)
def _triplet_margin_loss_aten(anchor, positive, negative, margin: float = 1.0, p: float = 2,
                              eps: float = 1e-6, swap: bool = False, reduction: int = 1):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return _triplet(anchor, positive, negative, margin, p, eps, swap, _red(reduction))


@register(F.triplet_margin_with_distance_loss)
def triplet_margin_with_distance_loss(anchor, positive, negative, *, distance_function=None,
                                      margin: float = 1.0, swap: bool = False,
                                      reduction: str = "mean"):
    """max(0, margin + d(a, p) − d(a, n)) with a user distance (default pairwise_distance)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if margin <= 0:
        raise ValueError(f"margin must be greater than 0, got {margin}")
    if not (anchor.dim() == positive.dim() == negative.dim()):
        raise RuntimeError("The anchor, positive, and negative tensors are expected to have the "
                           "same number of dimensions")
    dist = torch.pairwise_distance if distance_function is None else distance_function
    dp = dist(anchor, positive)
    dn = dist(anchor, negative)
    if swap:
        dn = torch.minimum(dn, dist(positive, negative))
    return _reduce(torch.clamp_min(dp - dn + margin, 0), reduction)


# ATen forms (the reduction an integer, no legacy size_average/reduce arguments)

@register(torch._C._nn.soft_margin_loss)
def _soft_margin_loss_aten(input, target, reduction: int = 1):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return soft_margin_loss(input, target, reduction=reduction)


@register(torch.hinge_embedding_loss)
def _hinge_embedding_loss_aten(input, target, margin: float = 1.0, reduction: int = 1):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return hinge_embedding_loss(input, target, margin, reduction=reduction)


@register(torch.cosine_embedding_loss)
def _cosine_embedding_loss_aten(input1, input2, target, margin: float = 0.0, reduction: int = 1):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return cosine_embedding_loss(input1, input2, target, margin, reduction=reduction)


@register(torch._C._nn.multi_margin_loss)
def _multi_margin_loss_aten(input, target, p=1, margin=1.0, weight=None, reduction: int = 1):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return multi_margin_loss(input, target, int(p), float(margin), weight, reduction=reduction)


@register(torch._C._nn.multilabel_margin_loss)
def _multilabel_margin_loss_aten(input, target, reduction: int = 1):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return multilabel_margin_loss(input, target, reduction=reduction)


# -- binary cross-entropy -----------------------------------------------------------------------

def _log_clamped(z):
    """max(log z, −100) as ATen's binary_cross_entropy: constant −100 where log z_0 < −100 (z_0 = 0
    included), the log jet elsewhere."""
    z0 = primal(z)
    low = torch.log(z0) < -100
    if not is_jet(z):
        return torch.clamp_min(torch.log(z0), -100)
    one = torch.ones((), dtype=z0.dtype, device=z0.device)
    safe = torch.where(low, one, z)
    return torch.where(low, torch.full((), -100.0, dtype=z0.dtype, device=z0.device), torch.log(safe))


@register(F.binary_cross_entropy)
def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    """−w·(y·max(log x, −100) + (1 − y)·max(log(1 − x), −100)) (ATen's clamped logs)."""
    reduction = _legacy(size_average, reduce, _red(reduction))
    if target.size() != input.size():
        raise ValueError(f"Using a target size ({target.size()}) that is different to the input "
                         f"size ({input.size()}) is deprecated. Please ensure they have the same size.")
    x0, t0 = primal(input), primal(target)
    require((x0 >= 0) & (x0 <= 1), RuntimeError, "all elements of input should be between 0 and 1")
    require((t0 >= 0) & (t0 <= 1), RuntimeError, "all elements of target should be between 0 and 1")
    loss = -(target * _log_clamped(input) + (1 - target) * _log_clamped(1 - input))
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


@register(torch._C._nn.binary_cross_entropy)
def _binary_cross_entropy_aten(input, target, weight=None, reduction: int = 1):
    """The ATen form (integer reduction, no legacy arguments): the rule above."""
    return binary_cross_entropy(input, target, weight, reduction=reduction)


# -- linear cross-entropy -----------------------------------------------------------------------

@register(F.linear_cross_entropy)
def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction: str = "mean", ignore_index=None, label_smoothing: float = 0.0,
                         options=None):
    """cross_entropy(linear(x, W, b), target): the chunked implementations (``options``) compute
    the same function in batch chunks to save memory, so one rule serves them all."""
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    num_batches = tuple(input.shape[:-1])
    in_features = input.shape[-1]
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    logits_shape = (*num_batches, num_classes, *out_features)
    if tuple(primal(target).shape) == logits_shape and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = ignore_index if ignore_index is not None else -100
    if out_features:
        linear_weight = linear_weight.reshape((math.prod(out_features) * num_classes, in_features))
        if linear_bias is not None:
            linear_bias = linear_bias.reshape(math.prod(out_features) * num_classes)
    logits = F.linear(input, linear_weight, linear_bias).reshape(logits_shape)
    return F.cross_entropy(logits, target, weight=weight, reduction=reduction,
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


# -- CTC ----------------------------------------------------------------------------------------

@register(F.ctc_loss, torch.ctc_loss)
def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank: int = 0,
             reduction="mean", zero_infinity: bool = False):
    """CTC loss −log Σ_alignments Π_t p_t(π_t) by the forward (α) recursion in log space:
    α_t(s) = lp_t(l′_s) + logsumexp(α_{t−1}(s), α_{t−1}(s−1), α_{t−1}(s−2) [l′_s ≠ blank, l′_s ≠
    l′_{s−2}]) over the blank-extended labels l′; the loss is −logsumexp(α_{T−1}(S′−1), α_{T−1}(S′−2)).
    Which states are reachable depends on the lengths and labels only, so the logsumexp runs over
    the reachable candidates (a constant mask) and every step is exact jet arithmetic."""
    return _ctc(log_probs, targets, input_lengths, target_lengths, blank, _red(reduction),
                zero_infinity)


def _ctc(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity):
    F.ctc_loss(primal(log_probs), primal(targets), primal(input_lengths), primal(target_lengths),
               blank, reduction, zero_infinity)  # PyTorch's own argument checks
    lp = log_probs if log_probs.dim() == 3 else log_probs.unsqueeze(1)
    T, N, C = lp.shape
    tg = primal(targets).long()
    il = torch.as_tensor(primal(input_lengths), dtype=torch.long).reshape(-1)
    tl = torch.as_tensor(primal(target_lengths), dtype=torch.long).reshape(-1)
    if log_probs.dim() == 2:
        tg = tg.reshape(1, -1)
    if tg.dim() == 1:  # concatenated targets
        offs = torch.cumsum(tl, 0) - tl
        Smax = int(tl.max()) if tl.numel() else 0
        pos = offs.unsqueeze(1) + torch.arange(Smax).unsqueeze(0)
        tg = torch.where(torch.arange(Smax).unsqueeze(0) < tl.unsqueeze(1),
                         tg[pos.clamp_max(max(tg.numel() - 1, 0))], torch.zeros_like(pos))
    Smax = tg.shape[1]
    S = 2 * Smax + 1
    # blank-extended labels l′ (N, S) and the states each may come from
    ext = torch.full((N, S), blank, dtype=torch.long)
    ext[:, 1::2] = tg[:, :Smax]
    Sn = 2 * tl + 1                                                # real length per sample
    in_range = torch.arange(S).unsqueeze(0) < Sn.unsqueeze(1)
    skip_ok = torch.zeros((N, S), dtype=torch.bool)
    skip_ok[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    # emissions e_t = lp[t, n, l′_s]: (T, N, S)
    em = torch.gather(lp, 2, ext.unsqueeze(0).expand(T, N, S))
    reach = torch.zeros((N, S), dtype=torch.bool)
    reach[:, 0] = True
    reach[:, 1] = Sn > 1
    reach &= in_range
    alpha = torch.where(reach, em[0], _zero(em))
    alphas_final = [None] * N
    zero = _zero(em)
    for t in range(T):
        if t > 0:
            prev = alpha
            r1 = torch.zeros_like(reach)
            r1[:, 1:] = reach[:, :-1]
            r2 = torch.zeros_like(reach)
            r2[:, 2:] = reach[:, :-2]
            r2 &= skip_ok
            new_reach = (reach | r1 | r2) & in_range
            p1 = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], 1)
            p2 = torch.cat([torch.zeros_like(prev[:, :2]), prev[:, :-2]], 1)
            cand = torch.stack([prev, p1, p2], 2)                 # (N, S, 3)
            cmask = torch.stack([reach, r1, r2], 2)
            alpha = torch.where(new_reach, em[t] + _masked_lse(cand, cmask, 2), zero)
            reach = new_reach
        for n in range(N):
            if int(il[n]) == t + 1:
                alphas_final[n] = (alpha[n], reach[n])
    losses = []
    for n in range(N):
        if alphas_final[n] is None:
            raise JetError(f"ctc_loss: input length {int(il[n])} is not in 1..{T}")
        a, r = alphas_final[n]
        last = int(Sn[n]) - 1
        idx = [last] if last == 0 else [last, last - 1]
        cm = r[idx]
        if not bool(cm.any()):  # no alignment: the loss is +∞ along the whole path
            inf = torch.full((), 0.0 if zero_infinity else float("inf"), dtype=zero.dtype)
            losses.append(make_jet(inf.unsqueeze(0), lp._order))
            continue
        losses.append(-_masked_lse(a[idx], cm, 0))
    loss = torch.stack(losses)
    if log_probs.dim() == 2:
        loss = loss.reshape(())
    if reduction == "mean":
        return (loss / tl.clamp_min(1).to(zero.dtype)).mean()
    return _reduce(loss, reduction)


def _masked_lse(x, mask: Tensor, dim: int):
    """logsumexp over the entries of ``dim`` where ``mask`` (a constant) is true, exact: entries
    outside the mask are replaced by the row's first valid entry and their exp weights zeroed."""
    x0 = primal(x)
    any_ = mask.any(dim, keepdim=True)
    m = torch.where(mask, x0, torch.full((), float("-inf"), dtype=x0.dtype)).amax(dim, keepdim=True)
    m = torch.where(any_, m, torch.zeros_like(m)).detach()
    safe = torch.where(mask, x, m.expand_as(x0)) - m
    w = torch.where(mask, torch.exp(safe), _zero(x))
    s = w.sum(dim)
    s = torch.where(any_.squeeze(dim), s, torch.ones((), dtype=x0.dtype))
    return torch.log(s) + m.squeeze(dim)
