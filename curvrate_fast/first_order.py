"""Custom autograd Functions of the engine whose backward is first-order only.

The activation jets and the logsumexp jet run their forward without a graph and their backward
as a Toeplitz sum ḡu_j = Σ_{k≥j} ḡy_k · w_{k−j} over the derivative jets w the forward saved
(docs/math.md, "The Toeplitz backward"). That backward is exact, but w enters it as a constant:
differentiating the gradient again (``create_graph=True``, then another backward) would miss every
term of w's own dependence on the input, a silently wrong second derivative (measured before this
guard: 25 % off nested autograd on a small MLP with the reference rules, 100 % with the C++
kernels). :func:`first_order_backward` makes such a second derivative raise an error that names
the op instead, as the Triton kernels' Functions already did; a ``create_graph=True`` backward
that is never differentiated again still works.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["first_order_backward"]


def first_order_backward(name: str) -> Callable[[Callable], Callable]:
    """Decorate the ``backward`` of a custom autograd Function whose saved tensors enter it as
    constants. An ordinary backward runs as it is. Under ``create_graph`` its results pass through
    a node, hung on the incoming gradients, that raises, naming ``name``, when a second backward
    reaches it; and where the incoming gradient is a constant (no graph to hang that node on) while
    the Function's input needs a gradient, it raises at once: the second-order terms through the
    saved jets could not be reached by any later backward and would be missing without a word.

    Example::

        >>> class Square(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(2 * x)
        ...         return x * x
        ...     @staticmethod
        ...     @first_order_backward("square")
        ...     def backward(ctx, g):
        ...         (d,) = ctx.saved_tensors
        ...         return g * d
    """
    later = (f"{name}: a second derivative through this op of the jet engine is not supported: its "
             "backward treats the derivative jets its forward saved as constants, so differentiating "
             "the gradient again (create_graph=True, then backward) would miss terms. Compute such "
             "second derivatives with nested autograd (curvrate_fast.baseline).")
    now = (f"{name}: backward with create_graph=True through this op of the jet engine: its backward "
           "treats the derivative jets its forward saved as constants and the incoming gradient carries "
           "no graph here, so a second derivative taken from this gradient would silently miss terms. "
           "Use create_graph=False (the first derivative is exact), or nested autograd "
           "(curvrate_fast.baseline) for second derivatives.")

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():          # an ordinary backward
                return backward(ctx, *grads)
            if not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
                if any(ctx.needs_input_grad):
                    raise RuntimeError(now)
                with torch.no_grad():
                    return backward(ctx, *grads)
            with torch.no_grad():                    # nothing may differentiate the result: no graph
                out = backward(ctx, *grads)
            outs = out if isinstance(out, tuple) else (out,)
            results = [o for o in outs if isinstance(o, torch.Tensor)]
            if not results:
                return out

            def leaf(t):                              # a result a kernel made carries no graph
                if t.requires_grad:
                    return t
                t = t.detach()
                t.requires_grad_(True)
                return t
            # the node also takes the incoming gradients, so that a second backward from anything
            # they depend on reaches it (and raises) even where the results have no graph of their own
            anchors = [g for g in grads if isinstance(g, torch.Tensor) and g.requires_grad]
            ins = [leaf(t) for t in results] + anchors
            guarded = torch._C._functions.DelayedError(later.encode(), len(ins))(*ins)
            if isinstance(guarded, torch.Tensor):
                guarded = (guarded,)
            it = iter(guarded[:len(results)])
            new = tuple(next(it) if isinstance(o, torch.Tensor) else o for o in outs)
            return new if isinstance(out, tuple) else new[0]
        return wrapper
    return decorate
