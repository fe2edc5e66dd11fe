"""The public derivative functions: ``jet``, ``directional_derivatives`` and
``loss_directional_derivatives`` (docs/math.md §1, §3)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import rules  # noqa: F401  (registers every rule)
from .baseline import per_sample_cross_entropy
from .finite import require_finite
from .jets.dispatcher import direction_scale, model_call, unscale_coefficients
from .jets.registry import engine_settings, settings, tracing
from .jets.tensor import JetTensor, is_jet, pad_coeffs
from .mixing import require_per_sample, tile_batch

__all__ = ["jet", "directional_derivatives", "loss_directional_derivatives", "input_jet"]

# torch.compile cannot trace the jet wrapper subclass (dynamo does not know
# _make_wrapper_subclass); these entry points run eagerly inside a compiled function (a graph break)
# instead of failing, and the fused kernels inside them are torch.library ops either way. For no
# graph break, wrap the loss in curvrate_fast.compile (or use crr_penalty / CRRLoss, which do):
# inside a compiled step it is one custom op running a captured graph (capture.py, docs/design.md §6).
_eager = torch.compiler.disable


def _check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"order must be an int ≥ 1, got {order!r}")
    if order < 1:
        raise ValueError(f"order must be ≥ 1, got {order}")
    return order


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor) or is_jet(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if type(t) is not Tensor and not isinstance(t, torch.nn.Parameter) and not tracing():
        # a subclass's own __torch_function__ would see the stacked coefficients (MaskedTensor
        # failed deep inside torch.masked; DTensor would shard the coefficient axis)
        raise TypeError(f"{name} must be a plain torch.Tensor, got a {type(t).__name__} (a tensor subclass); "
                        f"pass its values as a plain tensor")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (derivatives along x + t·u need real "
                        f"inputs), got dtype {t.dtype}; convert it with .float() or .double()")


def _check_pair(x: Tensor, u: Tensor) -> None:
    _check_tensor("x", x)
    _check_tensor("u", u)
    if u.dtype != x.dtype:
        raise TypeError(f"u has dtype {u.dtype} but x has {x.dtype}; they must match")
    if u.device != x.device:
        raise ValueError(f"u is on {u.device} but x is on {x.device}")
    if settings.check_finite and not tracing():     # after the device check: it reads the values
        require_finite(x, "x")
        require_finite(u, "u")


@_eager
def input_jet(x: Tensor, u: Tensor, order: int) -> JetTensor:
    """The input jet (x, u, 0, …, 0) of order ``order``: only two coefficients are stored.

    Example::

        >>> xj = curvrate_fast.input_jet(x, u, order=4)
        >>> model(xj).coeffs.shape    # (stored coefficients, *model(x).shape)
    """
    _check_order(order)
    _check_pair(x, u)
    if u.shape != x.shape:
        raise ValueError(f"u must have the shape of x {tuple(x.shape)}, got {tuple(u.shape)}")
    return JetTensor(torch.stack([x, u]), order)


def _coefficients(out, order: int, what: str) -> Tensor:
    if is_jet(out):
        return pad_coeffs(out.coeffs, order + 1)
    if isinstance(out, Tensor):  # the output does not depend on the input: a constant
        return pad_coeffs(out.unsqueeze(0), order + 1)
    raise TypeError(f"{what} must return one tensor, got {type(out).__name__}")


@_eager
def jet(fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, order: int, *,
        strict: Optional[bool] = None, backend: Optional[str] = None) -> Tensor:
    """Normalized Taylor coefficients f_0..f_K of t ↦ fn(x + t·u) at t = 0 (docs/math.md §1).

    Returns a tensor of shape ``(order + 1, *fn(x).shape)``; coefficient 0 equals ``fn(x)``. The
    result is differentiable with respect to everything ``fn`` uses (e.g. model parameters).
    ``strict`` is deprecated and has no effect (an op without a Taylor rule always raises);
    ``backend`` forces "reference" (pure PyTorch) or "triton" kernels ("auto": Triton on
    CUDA tensors). Use :func:`curvrate_fast.track_ops` to see which ops used rules.

    Example::

        >>> f = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, u = torch.randn(5, 3), torch.randn(5, 3)
        >>> c = curvrate_fast.jet(f, x, u, order=4)    # (5, 5, 1): f_0..f_4
    """
    return _jet_pass(fn, x, u, order, strict=strict, backend=backend)


def _jet_pass(fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, order: int, *,
              strict: Optional[bool] = None, backend: Optional[str] = None, primal_blocks: int = 1) -> Tensor:
    """The jet pass of :func:`jet`; as ``jet_of_rows`` also the library's own passes over D
    direction rows per sample, where x is ``primal_blocks`` copies of the batch along dim 0 (the
    rows of direction d are d·B … d·B + B − 1): the rules may then compute what depends on x alone
    once (JetTensor.share_primal)."""
    scale = direction_scale(x)  # float16 autocast: along c·u, coefficient k divided by c^k
    xj = input_jet(x, u if scale == 1.0 else u * scale, order)
    if primal_blocks > 1:
        xj.share_primal(primal_blocks)
    with engine_settings(strict=strict, backend=backend), model_call():
        out = fn(xj)
    return unscale_coefficients(_coefficients(out, order, "fn"), scale)


jet_of_rows = _eager(_jet_pass)


@_eager
def directional_derivatives(fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor, order: int, *,
                            strict: Optional[bool] = None, backend: Optional[str] = None) -> Tensor:
    """d_n = Dⁿfn(x)[u, …, u] = n!·f_n for n = 1..order, shape ``(order, *fn(x).shape)``.

    Example::

        >>> d = curvrate_fast.directional_derivatives(torch.sin, x, torch.ones_like(x), order=3)
        >>> torch.allclose(d[1], -torch.sin(x))   # second derivative of sin
        True
    """
    c = jet(fn, x, u, order, strict=strict, backend=backend)
    fact = torch.tensor([math.factorial(n) for n in range(1, order + 1)], dtype=c.dtype,
                        device=c.device).reshape((order,) + (1,) * (c.dim() - 1))
    return c[1:] * fact


_default_loss = per_sample_cross_entropy


@_eager
def loss_directional_derivatives(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, u: Tensor,
                                 order: int, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                                 *, strict: Optional[bool] = None, backend: Optional[str] = None,
                                 normalize: Optional[str] = None) -> Tensor:
    """Per-sample derivatives of the per-sample loss along per-sample directions (docs/math.md §3):
    d_n[b] = dⁿ/dtⁿ loss_fn(model(x + t·u), y)[b] at t = 0, for n = 1..order.

    ``u`` of shape ``x.shape`` gives a result of shape ``(order, B)``; ``u`` of shape
    ``(D, *x.shape)`` (D directions per sample) gives ``(order, D, B)``, all D·B rows in one batched
    pass. The default loss is per-sample cross-entropy; ``loss_fn(logits, y)`` must return shape
    ``(B,)``. The model's train/eval mode is used as set (train-mode BatchNorm mixes samples and
    raises). ``normalize="factorial"`` returns f_n = d_n / n! instead (the analytic convention).
    The result is differentiable with respect to the model's parameters.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
        >>> u = torch.nn.functional.normalize(torch.randn(5, 8, 2), dim=-1)     # 5 directions
        >>> d = curvrate_fast.loss_directional_derivatives(model, x, y, u, order=4)   # (4, 5, 8)
    """
    _check_order(order)
    if normalize not in (None, "factorial"):
        raise ValueError(f"normalize must be None or 'factorial', got {normalize!r}")
    _check_pair(x, u)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension")
    B = x.shape[0]
    if u.shape == x.shape:
        D = None
        U = u
    elif u.dim() == x.dim() + 1 and tuple(u.shape[1:]) == tuple(x.shape):
        D = u.shape[0]
        if D < 1:
            raise ValueError("u holds no direction (its first dimension is 0)")
        U = u.reshape((D * B,) + tuple(x.shape[1:]))
    else:
        raise ValueError(f"u must have shape {tuple(x.shape)} (one direction per sample) or "
                         f"(D, {', '.join(map(str, x.shape))}) (D directions), got {tuple(u.shape)}")
    if isinstance(y, Tensor) and y.dim() >= 1 and y.shape[0] != B:
        raise ValueError(f"y has {y.shape[0]} entries but x has batch size {B}")
    X, Y = tile_batch(x, y, D or 1)
    require_per_sample(model, x, y, loss_fn, copies=D or 1)
    loss_fn = loss_fn or _default_loss
    scale = direction_scale(X)  # float16 autocast: along c·u, coefficient k divided by c^k
    xj = JetTensor(torch.stack([X, U if scale == 1.0 else U * scale]), order)
    if D is not None and D > 1:
        xj.share_primal(D)       # X is D copies of x: the primal is computed once (JetTensor.share_primal)
    with engine_settings(strict=strict, backend=backend), model_call():
        losses = loss_fn(model(xj), Y)
    rows = X.shape[0]
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (rows,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({rows},), got {shape}; for torch "
            "losses pass reduction='none' (e.g. lambda z, y: F.cross_entropy(z, y, reduction='none'))")
    c = unscale_coefficients(_coefficients(losses, order, "loss_fn"), scale)[1:]
    if normalize is None:
        fact = torch.tensor([math.factorial(n) for n in range(1, order + 1)], dtype=c.dtype,
                            device=c.device).unsqueeze(1)
        c = c * fact
    if D is not None:
        c = c.reshape(order, D, B)
    return c
