"""Taylor rules for elementwise activations (docs/math.md §2: tanh, sigmoid, GELU both forms, SiLU,
softplus, ELU family, ReLU and leaky ReLU, and the smooth ones built from them).

On CUDA tensors (or when the Triton backend is forced) the fused one-pass kernels of
``curvrate_fast.functions`` run; elsewhere the pure-PyTorch recurrences of ``curvrate_fast.series``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import series as S
from ..activation_jet import activation_jet_reference
from ..activation_kinds import KINDS, MAX_KERNEL_ORDER
from ..jets import registry
from ..jets.registry import register
from ..jets.tensor import JetError
from ._common import aliases, is_jet, make_jet, primal

_FUSED_KINDS = frozenset(KINDS)


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
    return x.is_cuda and triton_available(x) and order <= MAX_KERNEL_ORDER


def use_cpp(x: torch.Tensor, order: int) -> bool:
    """Whether the C++ CPU kernels should run: forced by backend="cpp" (built on first use), or
    under "auto" for CPU tensors when they are already built (nothing is compiled implicitly)."""
    backend = registry.settings.backend
    if x.device.type != "cpu" or backend not in ("cpp", "auto"):
        return False
    from .. import cpp_backend
    if order > MAX_KERNEL_ORDER or x.dtype not in (torch.float32, torch.float64):
        return False
    return cpp_backend.available(build_if_missing=(backend == "cpp"))


def _piecewise_linear(x, kind: str, **params):
    """ReLU / leaky ReLU: y_k = m·u_k with m = 1 or the slope by the sign of u_0 (docs/math.md §2).
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
    """The jet of an elementwise activation of the jet ``x`` through the best backend. An
    elementwise map of equal rows gives equal rows: a primal shared by blocks of rows stays
    shared (JetTensor.share_primal)."""
    blocks = x.primal_blocks()
    y = _activation(x, kind, **params)
    return y.share_primal(blocks) if blocks > 1 else y


def _activation(x, kind: str, **params):
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


@register(F.relu6, torch._C._nn.relu6)
def relu6(input, inplace: bool = False):
    """relu6 = hardtanh(·, 0, 6)."""
    return hardtanh(input, 0.0, 6.0, inplace)


@register(F.hardtanh, torch._C._nn.hardtanh)
def hardtanh(input, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False):
    """y_0 = clamp(u_0), y_k = u_k strictly inside (min, max), else 0: autograd's convention at
    the corners (hardtanh_backward passes the gradient only for min < u < max; unlike clamp)."""
    x0 = input._coeffs[0]
    inside = (x0 > min_val) & (x0 < max_val)
    return _writeback(input, piecewise_quadratic(input, torch.clamp(x0, min_val, max_val), inside),
                      inplace)


@register(F.elu)
def elu(input, alpha: float = 1.0, inplace: bool = False):
    """ELU: u for u_0 > 0, α(e^u − 1) otherwise (the exp jet; autograd's branch at u_0 = 0)."""
    K = input._order
    return _writeback(input, make_jet(S.elu(input.series(), K, alpha=alpha), K), inplace)


@register(torch._C._nn.elu)
def elu_aten(input, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0):
    """ATen's elu: scale·u for u > 0, scale·α·(e^{input_scale·u} − 1) otherwise."""
    K = input._order
    return make_jet(S.elu(input.series(), K, alpha=float(alpha), scale_=float(scale),
                          input_scale=float(input_scale)), K)


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


@register(F.selu, *aliases("selu"))
def selu(input, inplace: bool = False):
    """SELU = scale·ELU(u, α) with the fixed SELU constants."""
    K = input._order
    return make_jet(S.elu(input.series(), K, alpha=_SELU_ALPHA, scale_=_SELU_SCALE), K)


@register(F.celu, *aliases("celu"))
def celu(input, alpha: float = 1.0, inplace: bool = False):
    """CELU = α(e^{u/α} − 1) for u_0 ≤ 0, u above."""
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
    """y = log σ(u): y' = σ(−u)·u', so y_k = (1/k) Σ_j j·u_j·s_{k−j} with s the jet of σ(−u)
    (no softplus threshold: exact for every u_0)."""
    K = input._order
    x0 = input._coeffs[0]
    y0 = F.logsigmoid(x0)
    if K == 0 or input._coeffs.shape[0] == 1:
        return make_jet(y0.unsqueeze(0), K)
    s = S.sigmoid(S.neg(input.series(), K - 1), K - 1)
    return make_jet(S.integrate(input.series(), s, K, y0), K)


@register(F.softsign)
def softsign(input):
    """u / (1 + |u|) (|u| with sign(0) = 0, as autograd)."""
    return input / (1 + torch.abs(input))


@register(F.tanhshrink)
def tanhshrink(input):
    """u − tanh u."""
    return input - torch.tanh(input)


# -- piecewise-polynomial activations (hard*, shrinks, threshold) and gated/parametric ones ------

def piecewise_quadratic(x, y0, d1, d2=None):
    """The jet of a function that is a polynomial of degree ≤ 2 on the piece holding each primal
    element: y(t) = y_0 + d1·δ(t) + (d2/2)·δ(t)², δ = x(t) − x_0, with y_0, d1 = φ′(x_0) and
    d2 = φ″(x_0) chosen per element by the primal (masks; booleans count as 0/1). Without d2 the
    map is linear in the coefficients, so known-zero coefficients stay zero (like ReLU)."""
    c = x._coeffs
    K = x._order
    d1 = d1.to(c.dtype) if isinstance(d1, Tensor) else d1
    if c.requires_grad:
        # the value from torch's kernel, its gradient the exact slope of the piece (some kernels'
        # backward keeps constants such as 1/6 in float32, which float64 training would inherit)
        y0 = y0.detach() + d1 * (c[0] - c[0].detach())
    rest = c[1:] * d1
    if d2 is None or c.shape[0] == 1:
        return make_jet(torch.cat([y0.unsqueeze(0).to(c.dtype), rest]), K)
    delta = [torch.zeros_like(c[0])] + list(c[1:].unbind(0))
    sq = S.square(delta, K)
    half = 0.5 * (d2.to(c.dtype) if isinstance(d2, Tensor) else d2)
    n = len(sq)
    out = [y0.to(c.dtype)]
    for k in range(1, n):
        term = half * sq[k]
        out.append(term + rest[k - 1] if k - 1 < rest.shape[0] else term)
    return make_jet(out, K)


def _writeback(input, out, inplace: bool):
    """``inplace=True`` of the functional form: the jet itself takes the result (a view's write
    reaches its base; a view the engine holds as a copy is refused, as by every in-place op). The
    dispatcher already runs F's ``inplace=True`` calls this way; this serves the direct calls of
    ``torch._C._nn`` forms."""
    if inplace and is_jet(input):
        if not input.writable():
            raise JetError("an in-place activation on a view of a jet would not reach the tensor it views; "
                           "use the out-of-place form")
        input.assign(out._coeffs)
        return input
    return out


@register(F.hardsigmoid, torch._C._nn.hardsigmoid)
def hardsigmoid(input, inplace: bool = False):
    """hardsigmoid = clamp(u/6 + 1/2, 0, 1): slope 1/6 for −3 < u_0 < 3, else 0 (autograd's
    hardsigmoid_backward convention at the corners)."""
    x0 = input._coeffs[0]
    d1 = ((x0 > -3.0) & (x0 < 3.0)).to(x0.dtype) / 6.0
    return _writeback(input, piecewise_quadratic(input, F.hardsigmoid(x0), d1), inplace)


@register(F.hardswish, torch._C._nn.hardswish)
def hardswish(input, inplace: bool = False):
    """hardswish = u·relu6(u + 3)/6: 0 for u ≤ −3, (u² + 3u)/6 on (−3, 3), u from 3 on. Degree ≤ 2
    on each piece, so y = y_0 + φ′δ + φ″δ²/2 exactly; at u_0 = ±3 the outer pieces (autograd's
    hardswish_backward: φ′(−3) = 0, φ′(3) = 1, φ″ = 0)."""
    x0 = input._coeffs[0]
    mid = (x0 > -3.0) & (x0 < 3.0)
    d1 = torch.where(mid, (2.0 * x0 + 3.0) / 6.0, (x0 >= 3.0).to(x0.dtype))
    d2 = mid.to(x0.dtype) / 3.0
    return _writeback(input, piecewise_quadratic(input, F.hardswish(x0), d1, d2), inplace)


@register(*aliases("hardshrink"))
def hardshrink(input, lambd: float = 0.5):
    """u where |u_0| > λ, else 0: y_k = u_k·[|u_0| > λ] (autograd: zero on [−λ, λ])."""
    x0 = input._coeffs[0]
    return piecewise_quadratic(input, torch.hardshrink(x0, lambd), (x0 < -lambd) | (x0 > lambd))


@register(F.softshrink, torch._C._nn.softshrink)
def softshrink(input, lambd: float = 0.5):
    """u ∓ λ where |u_0| > λ, else 0: y_k = u_k·[|u_0| > λ] for k ≥ 1."""
    x0 = input._coeffs[0]
    return piecewise_quadratic(input, F.softshrink(x0, lambd), (x0 < -lambd) | (x0 > lambd))


@register(F.threshold, torch.threshold)
def threshold(input, threshold: float, value: float, inplace: bool = False):
    """u where u_0 > threshold, else the constant value: y_k = u_k·[u_0 > threshold]."""
    x0 = input._coeffs[0]
    out = piecewise_quadratic(input, torch.threshold(x0, threshold, value), x0 > threshold)
    return _writeback(input, out, inplace)


@register(F.glu, torch._C._nn.glu)
def glu(input, dim: int = -1):
    """glu(u) = a·σ(b) with (a, b) the two halves of u along ``dim`` (sigmoid jet, Cauchy product)."""
    if input.dim() == 0:
        raise RuntimeError("glu does not support scalars because halving size must be even")
    d = dim % input.dim()
    n = input.shape[d]
    if n % 2:
        raise RuntimeError(f"Halving dimension must be even, but dimension {d} is size {n}")
    a, b = torch.narrow(input, d, 0, n // 2), torch.narrow(input, d, n // 2, n // 2)
    return a * torch.sigmoid(b)


@register(*aliases("prelu"), torch._prelu_kernel)
def prelu(input, weight):
    """prelu(u, w) = u where u_0 > 0, else w·u (a Cauchy product when w is a jet too; autograd's
    convention at u_0 = 0: the w·u branch). w is per channel: dim 1, or dim 0 of a 1-d input."""
    x0 = primal(input)
    torch.prelu(x0, primal(weight))  # PyTorch's own checks of the weight's size
    w = weight
    if w.numel() == 1:
        w = w.reshape(())
    elif x0.dim() >= 2 and w.dim() == 1:
        w = w.reshape((-1,) + (1,) * (x0.dim() - 2))
    return torch.where(x0 > 0, input, w * input)


def _inplace_form(rule):
    def inplace(input, *args, **kwargs):
        return _writeback(input, rule(input, *args, **kwargs), True)
    inplace.__doc__ = f"the in-place form of {rule.__name__}: the jet takes the result."
    return inplace


for _name, _rule in (("hardtanh_", hardtanh), ("hardsigmoid_", hardsigmoid),
                     ("hardswish_", hardswish), ("relu6_", relu6), ("elu_", elu_aten)):
    _fn = getattr(torch._C._nn, _name, None)
    if _fn is not None:
        register(_fn)(_inplace_form(_rule))
