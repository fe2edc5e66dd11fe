"""Taylor rules for normalization layers: layer_norm, rms_norm, group_norm, instance_norm and
eval-mode batch_norm (docs/math.md §2: compose mean, centring, mean of squares (Cauchy), rsqrt (power
rule) and a product; eval-mode BatchNorm is an affine map). PyTorch's own nested derivatives of
layer_norm and instance_norm are wrong from order 2–3 (docs/math.md §2); these rules are exact.

Train-mode batch_norm normalizes with batch statistics, so one sample's output depends on the
others and per-sample derivatives are not defined: it raises ``SampleMixingError``."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import series as S
from ..jets.registry import register
from ..jets.tensor import JetError
from ._common import is_jet, make_jet


class SampleMixingError(JetError, ValueError):
    """The model mixes the samples of a batch (e.g. BatchNorm in train mode)."""


def _normalize_series(u: List[Tensor], dims: Sequence[int], eps: float, K: int) -> List[Tensor]:
    """(x − mean) · rsqrt(mean((x − mean)²) + eps) over ``dims`` of each coefficient."""
    mu = [x.mean(dim=dims, keepdim=True) for x in u]
    xc = [x - m for x, m in zip(u, mu)]
    var = [x.mean(dim=dims, keepdim=True) for x in S.square(xc, K)]
    var[0] = var[0] + eps
    return S.mul(xc, S.rsqrt(var, K), K)


def _affine(y: List[Tensor], weight, bias, K: int, view=None):
    def shaped(t):
        return t if view is None else t.reshape(view)
    if weight is not None:
        if is_jet(weight):
            w = [shaped(c) for c in weight.series()]
            y = S.mul(y, w, K)
        else:
            y = [x * shaped(weight) for x in y]
    if bias is not None:
        if is_jet(bias):
            y = S.add(y, [shaped(c) for c in bias.series()], K)
        else:
            y = [y[0] + shaped(bias)] + y[1:]
    return y


@register(torch.nn.functional.layer_norm, torch.layer_norm)
def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5, cudnn_enable: bool = True):
    K = input._order
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    y = _normalize_series(input.series(), dims, eps, K)
    return make_jet(_affine(y, weight, bias, K), K)


@register(torch.nn.functional.rms_norm, getattr(torch, "rms_norm", None))
def rms_norm(input, normalized_shape, weight=None, eps: Optional[float] = None):
    """x · rsqrt(mean(x²) + eps) · w."""
    K = input._order
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    u = input.series()
    ms = [x.mean(dim=dims, keepdim=True) for x in S.square(u, K)]
    ms[0] = ms[0] + eps
    y = S.mul(u, S.rsqrt(ms, K), K)
    return make_jet(_affine(y, weight, None, K), K)


@register(torch.nn.functional.group_norm, torch.group_norm)
def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5, cudnn_enabled: bool = True):
    K = input._order
    N, C = input.shape[0], input.shape[1]
    rest = tuple(input.shape[2:])
    u = [x.reshape(N, num_groups, -1) for x in input.series()]
    y = _normalize_series(u, (-1,), eps, K)
    y = [x.reshape((N, C) + rest) for x in y]
    view = (1, C) + (1,) * len(rest)
    return make_jet(_affine(y, weight, bias, K, view), K)


@register(torch.nn.functional.instance_norm, torch.instance_norm)
def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                  cudnn_enabled: bool = True):
    K = input._order
    view = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    if not use_input_stats:
        return _batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
    dims = tuple(range(2, input.dim()))
    y = _normalize_series(input.series(), dims, eps, K)
    return make_jet(_affine(y, weight, bias, K, view), K)


def _batch_norm_eval(input, running_mean, running_var, weight, bias, eps):
    """Eval-mode BatchNorm: y = (x − μ_run)·γ/sqrt(σ²_run + eps) + β, an affine map."""
    K = input._order
    C = input.shape[1] if input.dim() > 1 else input.shape[0]
    view = (1, C) + (1,) * (input.dim() - 2) if input.dim() > 1 else (C,)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None and not is_jet(weight):
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None and not is_jet(bias):
        shift = shift + bias
    c = input._coeffs * scale.reshape(view)
    c = torch.cat([(c[0] + shift.reshape(view)).unsqueeze(0), c[1:]])
    out = make_jet(c, K)
    if is_jet(weight) or is_jet(bias):
        raise JetError("batch_norm with jet-valued affine parameters")
    return out


@register(torch.nn.functional.batch_norm, torch.batch_norm)
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, cudnn_enabled: bool = True):
    if training or running_mean is None or running_var is None:
        raise SampleMixingError(
            "batch_norm in training mode normalizes with the statistics of the whole batch, so each "
            "sample's output depends on the other samples and per-sample input derivatives are not "
            "defined. Call model.eval() (BatchNorm then uses its running statistics) before "
            "computing derivatives.")
    return _batch_norm_eval(input, running_mean, running_var, weight, bias, eps)


# -- the ATen-level forms (reached when called directly, e.g. by PyTorch's op database) ----------

def _stats(x, dims, eps: float):
    """(mean, rstd) jets over ``dims`` (kept), rstd = 1/sqrt(var + eps) with the biased variance."""
    mu = x.mean(dim=dims, keepdim=True)
    var = torch.square(x - mu).mean(dim=dims, keepdim=True)
    return mu, torch.rsqrt(var + eps)


@register(torch.native_layer_norm)
def native_layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """(layer_norm(x), mean, rstd): the statistics over the normalized dims, kept as size-1 dims."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    out = torch.nn.functional.layer_norm(input, normalized_shape, weight, bias, eps)
    mu, rstd = _stats(input, dims, eps)
    return out, mu, rstd


@register(torch.native_group_norm)
def native_group_norm(input, weight, bias, N: int, C: int, HxW: int, group: int, eps: float):
    """(group_norm(x), mean, rstd), the statistics per (sample, group), shape (N, group)."""
    out = torch.nn.functional.group_norm(input, group, weight, bias, eps)
    g = input.reshape(N, group, -1)
    mu, rstd = _stats(g, (-1,), eps)
    return out, mu.reshape(N, group), rstd.reshape(N, group)


def _native_bn(input, weight, bias, running_mean, running_var, training, eps, name):
    if training:
        raise SampleMixingError(
            f"{name} in training mode normalizes with the statistics of the whole batch, so each "
            "sample's output depends on the other samples and per-sample input derivatives are not "
            "defined. Call model.eval() (BatchNorm then uses its running statistics).")
    if is_jet(running_mean) or is_jet(running_var):
        raise JetError(f"{name} with jet-valued running statistics")
    out = _batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
    empty = torch.empty(0, dtype=input.dtype, device=input.device)
    return out, empty, empty.clone()  # torch returns empty saved statistics in evaluation mode


@register(torch.native_batch_norm)
def native_batch_norm(input, weight, bias, running_mean, running_var, training: bool,
                      momentum: float, eps: float):
    return _native_bn(input, weight, bias, running_mean, running_var, training, eps,
                      "native_batch_norm")


@register(torch._native_batch_norm_legit)
def native_batch_norm_legit(input, weight, bias, running_mean, running_var=None, training=None,
                            momentum: float = 0.1, eps: float = 1e-5):
    if running_var is None or isinstance(running_var, bool):  # the no-stats overload
        raise SampleMixingError("_native_batch_norm_legit without running statistics normalizes "
                                "with the batch's statistics (samples mix)")
    return _native_bn(input, weight, bias, running_mean, running_var, training, eps,
                      "_native_batch_norm_legit")


@register(torch.ops.aten._batch_norm_with_update, torch.ops.aten._batch_norm_with_update.default)
def batch_norm_with_update(input, weight, bias, running_mean, running_var, momentum, eps):
    raise SampleMixingError("_batch_norm_with_update is BatchNorm in training mode: it normalizes "
                            "with the statistics of the whole batch, so samples mix; call "
                            "model.eval() before computing derivatives")
