"""Linear layers on jets with a fused bias + activation epilogue.

Two implementations of φ(x Wᵀ + b) on stacked jets (docs/math.md §2, linear maps: every stored coefficient
through the same map, the bias on coefficient 0 only; stacking the coefficients along the batch axis
reads the weight once):

- "cublas": one GEMM (cuBLAS, through ``F.linear``) for all n+1 stored coefficients, then
  :func:`bias_activation_jet` adds the bias to coefficient 0 and applies the activation jet in one
  pass (the pre-activation is written once and read once);
- "fused": one Triton GEMM whose epilogue adds the bias and applies the activation jet on the
  accumulator tiles (``triton_kernels/linear_jet.py``): the pre-activation never reaches memory, one
  launch instead of two. Its backward is one more fused kernel that recomputes the pre-activation
  tiles and writes ∂L/∂pre (the activation's transposed Cauchy product in the epilogue), then
  ∂x = ∂pre·W, ∂W = Σ_j ∂pre_jᵀ x_j (cuBLAS) and ∂b = Σ ∂pre_0.

Which is faster depends on the shape and the GPU (docs/design.md §2: fuse only where it measures faster),
so ``impl="auto"`` (the default, or ``engine_settings(linear_impl=...)`` / ``CURVRATE_LINEAR_IMPL``)
times both on the first call for each shape — forward, plus backward when gradients are needed — and
keeps the winner for the process (:func:`linear_impl_choices` shows the decisions). Without a GPU
(the interpreter) "auto" means "cublas"; "fused" can be forced there for tests.

Convolutions take the cuDNN + epilogue path through the engine's conv rule (rules/linear.py defers
the bias to the activation's fused kernel); a Triton implicit-GEMM convolution was not written:
docs/design.md asks for one only where it measures faster than cuDNN.
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..first_order import first_order_backward
from ._backend import KERNEL_DTYPES, triton_available
from ._ops import ensure_registered
from .activation import MAX_KERNEL_ORDER, activation_params, bias_activation_jet

__all__ = ["linear_activation_jet", "LinearActivationJetFunction", "linear_impl_choices",
           "choose_linear_impl"]


class LinearActivationJetFunction(torch.autograd.Function):
    """φ(x Wᵀ + b) as jets by the fused Triton GEMM; x (n+1, *batch, D) with n ≤ order."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], kind: str, order: int, p0: float,
                p1: float) -> Tensor:
        y = torch.ops.curvrate_fast_triton.linear_act_jet_fused(x, weight, bias, kind, order, p0, p1)
        ctx.save_for_backward(x, weight, bias)
        ctx.args = (kind, order, p0, p1)
        return y

    @staticmethod
    @first_order_backward("linear + activation jet (Triton kernels)")
    def backward(ctx, grad_y: Tensor):
        x, weight, bias = ctx.saved_tensors
        kind, order, p0, p1 = ctx.args
        N, D = weight.shape
        # ∂L/∂pre by one fused kernel that recomputes the pre-activation tiles (never stored)
        gpre = torch.ops.curvrate_fast_triton.linear_act_jet_fused_bwd(x, weight, bias, grad_y, kind, order, p0, p1)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gpre.matmul(weight)
        if ctx.needs_input_grad[1]:
            gw = gpre.reshape(-1, N).t().matmul(x.reshape(-1, D))
        if bias is not None and ctx.needs_input_grad[2]:
            gb = gpre[0].reshape(-1, N).sum(0, dtype=torch.float32).to(bias.dtype)
        return gx, gw, gb, None, None, None, None


# -- per-shape choice by measurement --------------------------------------------------------------
_CHOICES: Dict[Tuple, str] = {}


def linear_impl_choices() -> Dict[Tuple, str]:
    """The measured choices so far: {(device, dtype, stored rows, rows bucket, in, out, order, kind,
    bias, tf32, backward): "cublas" | "fused"} (a copy)."""
    return dict(_CHOICES)


def _median_ms(fn: Callable[[], object], reps: int = 7) -> float:
    """Median CUDA-event time of ``fn`` after two warm-up calls (the first compiles/autotunes)."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _shape_key(x: Tensor, weight: Tensor, bias: Optional[Tensor], kind: str, order: int, backward: bool) -> Tuple:
    rows = x[0].numel() // x.shape[-1]
    return (str(x.device), x.dtype, x.shape[0], max(rows - 1, 0).bit_length(), weight.shape[1], weight.shape[0],
            order, kind, bias is not None, bool(torch.backends.cuda.matmul.allow_tf32), backward)


def choose_linear_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], kind: str, order: int, p0: float = 0.0,
                       p1: float = 0.0, backward: bool = True,
                       timer: Optional[Callable[[Callable[[], object]], float]] = None) -> str:
    """"cublas" or "fused" for this problem: the faster of the two when timed on this device (cached
    per shape, rows bucketed by powers of two). ``backward``: time forward + backward (a training
    step) rather than the forward alone. ``timer`` (tests): a function timing a callable, in any unit;
    default CUDA events on CUDA. Without CUDA and without a timer: "cublas" (nothing to measure)."""
    key = _shape_key(x, weight, bias, kind, order, backward)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    if timer is None:
        if not x.is_cuda:
            return "cublas"
        timer = _median_ms
    xd = x.detach().requires_grad_(backward)
    wd = weight.detach().requires_grad_(backward)
    bd = bias.detach().requires_grad_(backward) if bias is not None else None
    inputs = [t for t in (xd, wd, bd) if t is not None]

    def run(impl: str) -> Callable[[], object]:
        def step():
            y = _linear_activation_impl(impl, xd, wd, bd, kind, order, p0, p1)
            if backward:
                torch.autograd.grad(y, inputs, torch.ones_like(y))
            return y
        return step

    with torch.enable_grad() if backward else torch.no_grad():
        t_cublas = timer(run("cublas"))
        t_fused = timer(run("fused"))
    choice = "fused" if t_fused < t_cublas else "cublas"
    _CHOICES[key] = choice
    return choice


def _linear_activation_impl(impl: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], kind: str, order: int,
                            p0: float, p1: float) -> Tensor:
    if impl == "fused":
        ensure_registered()
        return LinearActivationJetFunction.apply(x, weight, bias, kind, order, p0, p1)
    pre = F.linear(x, weight)  # one GEMM over (n+1)·batch rows
    params = ({"beta": p0, "threshold": p1} if kind == "softplus" else
              {"negative_slope": p0} if kind == "leaky_relu" else {})
    return bias_activation_jet(pre, bias, kind, order, -1, **params)


def _fused_possible(x: Tensor, weight: Tensor, bias: Optional[Tensor], order: int) -> bool:
    return (x.dtype in KERNEL_DTYPES and weight.dtype == x.dtype and x.device == weight.device
            and (bias is None or (bias.dtype in KERNEL_DTYPES and bias.device == x.device))
            and weight.dim() == 2 and x.dim() >= 2 and order <= MAX_KERNEL_ORDER and triton_available(x))


def linear_activation_jet(x: Tensor, weight: Tensor, bias: Optional[Tensor], kind: Optional[str], order: int,
                          impl: Optional[str] = None, **params) -> Tensor:
    """φ(x Wᵀ + b) as a jet: x (n+1, *batch, in) → (order+1, *batch, out); ``kind=None``: no activation.

    ``impl``: "cublas", "fused" or "auto" (module docstring); None reads
    ``engine_settings(linear_impl=...)`` / ``CURVRATE_LINEAR_IMPL`` (default "auto"). Both are
    differentiable w.r.t. x, the weight and the bias; where the fused kernel cannot run (no GPU and no
    interpreter, float64, mixed dtypes, order above the kernels' maximum) the cuBLAS/reference path runs.

    Example::

        >>> x = torch.randn(2, 128, 784, device="cuda")          # (x, u) of a batch of 128
        >>> W, b = torch.randn(512, 784, device="cuda") / 28, torch.zeros(512, device="cuda")
        >>> y = linear_activation_jet(x, W, b, "tanh", order=4)  # (5, 128, 512)
    """
    from ..jets.registry import check_linear_impl, settings
    kind, p0, p1 = activation_params(kind, params)
    impl = check_linear_impl(settings.linear_impl if impl is None else impl)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (n+1, *batch, in), got {tuple(x.shape)}")
    if x.shape[0] > order + 1:  # slicing only when needed: a no-op slice still adds a backward copy
        x = x[: order + 1]
    if impl != "cublas" and _fused_possible(x, weight, bias, order):
        if impl == "auto":
            if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                impl = "cublas"  # no timing inside a trace or a CUDA-graph capture; "fused" can be forced
            else:
                need_grad = torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (x, weight, bias))
                impl = choose_linear_impl(x, weight, bias, kind, order, p0, p1, backward=need_grad)
        if impl == "fused":
            return _linear_activation_impl("fused", x, weight, bias, kind, order, p0, p1)
    return _linear_activation_impl("cublas", x, weight, bias, kind, order, p0, p1)
