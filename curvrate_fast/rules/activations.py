"""Taylor rules for elementwise activations (SPEC.md §2: tanh, sigmoid, GELU both forms, SiLU,
softplus, ELU family, ReLU and leaky ReLU, and the smooth ones built from them).

On CUDA tensors (or when the Triton backend is forced) the fused one-pass kernels of
``curvrate_fast.functions`` run; elsewhere the pure-PyTorch recurrences of ``curvrate_fast.series``.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import series as S
from ..jets import registry
from ..jets.registry import register
from ..activation_jet import KINDS, activation_jet_reference
from ._common import aliases, make_jet

_FUSED_KINDS = {"tanh", "sigmoid", "gelu", "gelu_tanh", "silu", "softplus", "relu", "leaky_relu"}


def use_triton(x: torch.Tensor, order: int) -> bool:
    """Whether the fused Triton kernels should run for this tensor (see ``engine_settings``)."""
    backend = registry.settings.backend
    if backend == "reference" or backend == "cpp":
        return False
    try:
        from ..functions import triton_available
    except Exception:  # noqa: BLE001 - no triton: the reference rules run
        if backend == "triton":
            raise
        return False
    if backend == "triton":
        return True
    return x.is_cuda and triton_available(x) and order <= 6


def use_cpp(x: torch.Tensor, order: int) -> bool:
    """Whether the C++ CPU kernels should run: forced by backend="cpp" (built on first use), or
    under "auto" for CPU tensors when they are already built (nothing is compiled implicitly)."""
    backend = registry.settings.backend
    if x.device.type != "cpu" or backend not in ("cpp", "auto"):
        return False
    from .. import cpp_backend
    if order > cpp_backend.MAX_ORDER or x.dtype not in (torch.float32, torch.float64):
        return False
    return cpp_backend.available(build_if_missing=(backend == "cpp"))


def _piecewise_linear(x, kind: str, **params):
    """ReLU / leaky ReLU: y_k = m·u_k with m = 1 or the slope by the sign of u_0 (SPEC.md §2).
    The map is linear in the coefficients, so known-zero coefficients stay zero: a ReLU network
    carries only (x, u) to the loss, and every conv/linear after a ReLU runs on 2 rows, not K+1."""
    c = x._coeffs
    pos = c[0] > 0
    if kind == "relu":
        m = pos.to(c.dtype)
    else:
        slope = float(params.get("negative_slope", 0.01))
        m = torch.where(pos, torch.ones((), dtype=c.dtype, device=c.device),
                        torch.full((), slope, dtype=c.dtype, device=c.device))
    return make_jet(c * m, x._order)


def activation(x, kind: str, **params):
    """The jet of an elementwise activation of the jet ``x`` through the best backend."""
    K = x._order
    if kind in ("relu", "leaky_relu") and x._pending is None:
        return _piecewise_linear(x, kind, **params)
    # ReLU/leaky ReLU keep known-zero coefficients zero (y_k = m·u_k): the fused kernels then write
    # only the stored rows, so a ReLU network still carries (x, u) alone to the loss
    piecewise = kind in ("relu", "leaky_relu")
    if kind in _FUSED_KINDS and x._pending is not None:
        deferred = x.take_pending_linear()
        if deferred is not None:  # linear + activation: one fused Triton GEMM or cuBLAS + one epilogue
            from ..functions import linear_activation_jet
            x_coeffs, weight, bias = deferred
            out_order = min(K, x_coeffs.shape[0] - 1) if piecewise else K
            return make_jet(linear_activation_jet(x_coeffs, weight, bias, kind, out_order, **params), K)
        pending = x.take_pending_bias()
        if pending is not None and use_triton(pending[0], K):  # conv + bias + activation in one epilogue
            from ..functions import bias_activation_jet
            raw, bias, channel_dim = pending
            out_order = min(K, raw.shape[0] - 1) if piecewise else K
            return make_jet(bias_activation_jet(raw, bias, kind, out_order, channel_dim, **params), K)
    if kind in _FUSED_KINDS and use_triton(x._coeffs, K):
        from ..functions import activation_jet
        return make_jet(activation_jet(x._coeffs, kind, K, **params), K)
    if kind in KINDS and use_cpp(x._coeffs, K):
        from ..cpp_backend import activation_jet_cpp
        return make_jet(activation_jet_cpp(x._coeffs, kind, K, **params), K)
    if kind in KINDS:
        return make_jet(activation_jet_reference(x._coeffs, kind, K, **params), K)
    raise ValueError(f"unknown activation {kind!r}")


@register(*aliases("tanh"), F.tanh)
def tanh(input, *, out=None):
    return activation(input, "tanh")


@register(*aliases("sigmoid"), F.sigmoid, torch.special.expit)
def sigmoid(input, *, out=None):
    return activation(input, "sigmoid")


@register(F.gelu)
def gelu(input, approximate: str = "none"):
    return activation(input, "gelu_tanh" if approximate == "tanh" else "gelu")


@register(F.silu, torch.nn.functional.silu)
def silu(input, inplace: bool = False):
    return activation(input, "silu")


@register(F.softplus)
def softplus(input, beta: float = 1.0, threshold: float = 20.0):
    return activation(input, "softplus", beta=float(beta), threshold=float(threshold))


@register(*aliases("relu"), F.relu)
def relu(input, inplace: bool = False):
    return activation(input, "relu")


@register(F.leaky_relu, torch._C._nn.leaky_relu)
def leaky_relu(input, negative_slope: float = 0.01, inplace: bool = False):
    return activation(input, "leaky_relu", negative_slope=float(negative_slope))


@register(F.relu6)
def relu6(input, inplace: bool = False):
    return torch.clamp(input, 0.0, 6.0)


@register(F.hardtanh, torch._C._nn.hardtanh)
def hardtanh(input, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False):
    return torch.clamp(input, min_val, max_val)


@register(F.elu, torch._C._nn.elu)
def elu(input, alpha: float = 1.0, inplace: bool = False):
    K = input._order
    return make_jet(S.elu(input.series(), K, alpha=alpha), K)


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


@register(F.selu, *aliases("selu"))
def selu(input, inplace: bool = False):
    K = input._order
    return make_jet(S.elu(input.series(), K, alpha=_SELU_ALPHA, scale_=_SELU_SCALE), K)


@register(F.celu, *aliases("celu"))
def celu(input, alpha: float = 1.0, inplace: bool = False):
    K = input._order
    return make_jet(S.elu(input.series(), K, alpha=alpha, input_scale=1.0 / alpha), K)


@register(F.mish)
def mish(input, inplace: bool = False):
    """mish(u) = u · tanh(softplus(u))."""
    K = input._order
    sp = S.softplus(input.series(), K)
    return make_jet(S.mul(input.series(), S.tanh(sp, K), K), K)


@register(F.logsigmoid, torch._C._nn.log_sigmoid)
def logsigmoid(input):
    """log σ(u) = −softplus(−u)."""
    K = input._order
    return make_jet(S.neg(S.softplus(S.neg(input.series(), K), K), K), K)


@register(F.softsign)
def softsign(input):
    return input / (1 + torch.abs(input))


@register(F.tanhshrink)
def tanhshrink(input):
    return input - torch.tanh(input)
