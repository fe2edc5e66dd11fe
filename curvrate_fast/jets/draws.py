"""Random draws shared by the row groups of one jet pass (per-order CRR directions).

The per-order CRR penalty takes the mixed derivative Dⁿℓ_b[u_1, …, u_n] by polarization: M jets of
one sample along M combinations of the directions, stacked as M row groups of one batched pass,
whose rows are ordered group-major (rows g·B' … (g+1)·B' − 1 are group g's B' samples; the model
may flatten more axes into dim 0 after them, e.g. (B, T) → B·T). The identity holds for ONE
function: in train mode a random op (dropout, rrelu, a noise layer) must draw the same numbers for
every group of a sample, as the one forward of nested autograd does. Drawn for all rows at once,
each polarization row would see another mask and the combination would be the derivative of no
function at all (silently: its value is plausible).

Inside :func:`shared_draws` the random rules of the engine (dropout, alpha dropout, rrelu, normal,
the random fills and factories of a jet) make their draw for the rows of the first group only and
repeat it for the others (:func:`shared_draw`): every group sees the draw a plain forward of the
B' samples would make, from the same generator state (so a seeded run matches nested autograd's
masks). A random op that draws a plain tensor with one row per jet row (``torch.rand(x.shape)``,
``torch.bernoulli`` of a plain tensor, ``F.dropout`` of a constant), which no rule sees, is refused
with an error that names it; a draw not tied to the rows (a scalar, a per-feature tensor) is the
same for every row anyway and passes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .dispatcher import random_op
from .registry import op_name, settings
from .tensor import JetError, JetTensor

__all__ = ["shared_draws", "shared_draw", "grouped", "SharedDrawError"]


class SharedDrawError(JetError):
    """A random draw inside a grouped pass that the engine cannot share across the row groups."""


def grouped() -> bool:
    """Whether the current jet pass has row groups whose draws must be shared."""
    return settings.draw_groups[0] > 1


def _check_rows(t: Tensor, what: str) -> Tuple[int, int]:
    G, B = settings.draw_groups
    n = t.shape[0] if t.dim() else -1
    if n < 0 or n % (G * B):
        raise SharedDrawError(
            f"{what} inside a CRR pass with per-order directions: the pass runs {G} polarization rows "
            f"of each of its {B} samples as {G} row groups along dim 0, which a random draw must share, but "
            f"this draw is shaped {tuple(t.shape)} (dim 0 not a multiple of {G * B}: the batch is not the "
            "leading axis here). Use directions='fixed', or the penalty in eval mode (crit.eval() / "
            "model.eval()) for models that draw random numbers this way.")
    return G, n // G


def _tile(out: Any, G: int) -> Any:
    if isinstance(out, Tensor):
        return out.repeat((G,) + (1,) * (out.dim() - 1)) if out.dim() else out
    return type(out)(_tile(o, G) for o in out)


def shared_draw(like: Tensor, draw: Callable[[Tensor], Union[Tensor, Tuple[Tensor, ...]]],
                what: str = "a random op") -> Any:
    """``draw(like)``, or in a grouped pass ``draw`` on the first group's rows of ``like`` repeated
    for every group (a tensor or a tuple of tensors, each with one row per row of the first group)."""
    if not grouped():
        return draw(like)
    G, rows = _check_rows(like, what)
    return _tile(draw(like[:rows]), G)


class _PlainDrawGuard(TorchFunctionMode):
    """Refuses a random op that draws a plain tensor with rows tied to the jet rows (the engine's
    rules, which see jets, share theirs: :func:`shared_draw`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and not isinstance(out, JetTensor) and out.dim() >= 1:
            G, B = settings.draw_groups
            if (out.shape[0] % (G * B) == 0 and random_op(func) and not _from_jet(args, kwargs)
                    and not _dropout_without_draw(func, args, kwargs)):
                raise SharedDrawError(
                    f"{op_name(func)} drew a plain tensor of shape {tuple(out.shape)}, one draw per row, inside a CRR "
                    f"pass with per-order directions, whose {G} polarization rows of a sample must share their "
                    "random draws; the engine shares the draws of random ops applied to the model's activations "
                    "(dropout, torch.randn_like(h) ...), not of plain tensors. Draw it from an activation, use "
                    "directions='fixed', or compute the penalty in eval mode.")
        return out


#: the dropout functions and the positions of their (p, training) arguments; torch.dropout and
#: friends take (input, p, train)
_DROPOUTS = {F.dropout: (1, 2), F.dropout1d: (1, 2), F.dropout2d: (1, 2), F.dropout3d: (1, 2),
             F.alpha_dropout: (1, 2), F.feature_alpha_dropout: (1, 2), torch.dropout: (1, 2),
             torch.alpha_dropout: (1, 2), torch.feature_dropout: (1, 2), torch.feature_alpha_dropout: (1, 2)}


def _dropout_without_draw(func, args, kwargs) -> bool:
    """A dropout call that returns its input without drawing (eval mode: training=False, or
    p = 0), e.g. a model's dropout of a plain tensor in eval mode: nothing to share."""
    at = _DROPOUTS.get(func)
    if at is None:
        return False
    p = args[at[0]] if len(args) > at[0] else kwargs.get("p", 0.5)
    training = args[at[1]] if len(args) > at[1] else kwargs.get("training", kwargs.get("train", True))
    return (not training) or p == 0


def _from_jet(args, kwargs) -> bool:
    return any(isinstance(a, JetTensor) for a in tree_flatten((args, kwargs))[0])


@contextlib.contextmanager
def shared_draws(groups: int, samples: int) -> Iterator[None]:
    """A jet pass whose dim-0 rows are ``groups`` row groups of the same ``samples`` samples
    (group-major): the random rules share their draws across the groups, and a per-row random draw
    of a plain tensor is refused. Nothing changes for ``groups == 1``."""
    if groups <= 1:
        yield
        return
    old = settings.draw_groups
    settings.draw_groups = (int(groups), int(samples))
    try:
        with _PlainDrawGuard():
            yield
    finally:
        settings.draw_groups = old
