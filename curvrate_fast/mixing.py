r"""Refuse a model whose per-sample loss depends on other samples' inputs (docs/engine.md).

The derivatives this library computes are per sample: d_n[b] = dⁿ/dtⁿ ℓ_b(x_b + t·u_b), every
other sample held fixed. The engine moves all samples at once (one batched jet), which gives the
same numbers exactly when ℓ_b depends on x_b alone. A model that mixes samples across the batch
(statistics over dim 0, attention or a softmax across samples, a batch-level normalization written
by hand) has no per-sample derivative to compute, and the batched pass would return a number that
is neither (nested autograd, the paper's code, returns yet another one). Train-mode BatchNorm is
refused by its rule; this module finds the rest.

The probe: first-order jets of the per-sample losses at the batch, each along random directions
given to a set S of the samples and zero for the others. For every b outside S the coefficient
∂ℓ_b/∂x · u is a sum of products with zero, so it is **exactly** 0 when no sample reaches another
(in any summation order: also with non-deterministic GPU reductions), and almost surely not when
a moved sample reaches b. The sets are the samples whose index has bit k set, and their
complements, for k < ⌈log₂ B⌉: two indices i ≠ j differ in some bit, so one of the passes moves i
and holds j, and a sample reaching any other sample is found, whichever pair it is (two random
halves, the probe before, missed a coupling of two samples that fell in the same half). A finite
nonzero value is refused with :class:`~curvrate_fast.SampleMixingError`. The probe runs
without gradients, draws its directions from a generator of its own and leaves PyTorch's random
state as it found it (dropout draws in the probe do not move the training run's random stream),
and buffers the forward updates in place (a counter, an EMA) as they were. It costs 2·⌈log₂ B⌉
first-order forward passes without gradients (14 for a batch of 128), once per configuration
(model, the train/eval mode of each of its modules, input shape, dtype and device, loss
function), remembered while the model lives; another instance of the same architecture (the
same classes, attributes and parameter shapes: a new seed, a fresh model per run) reuses the
result. A forward with Python side effects (a hook that collects activations, a call counter in
Python) sees those extra calls.

The batch-size probe: where the engine runs D direction rows per sample (several directions, the
polarization rows of per-order CRR) it feeds the model the batch tiled D times (:func:`tile_batch`),
and a per-sample loss that reads the batch size in its arithmetic (``out / x.shape[0]``, a loss
divided by ``len(y)``) would silently come out another function: D times too small, or large.
Nested autograd loops over the directions on the batch as given. So for D > 1 the probe also
runs a first-order jet of the tiled batch (the rows of a sample sharing their random draws, as the
engine's own pass does) and compares every row group with the batch's own jet: a difference beyond
rounding (√ε of the batch's largest value in float64 and CPU float32, 1 % in half precision, under
autocast and in CUDA float32, :func:`_copy_tolerance`) is refused with
:class:`~curvrate_fast.SampleMixingError`, and so is a model that fails on the tiled rows only (a
mask built for B samples), with the error it raised. A model that draws random plain tensors row by
row (``torch.rand(x.shape)``: no rule sees it, so its rows cannot share the draw) cannot be
compared this way and is not probed for the batch size.

Example::

    >>> model = lambda x: net(x - x.mean(0, keepdim=True))     # centers with the batch mean
    >>> curvrate_fast.crr_penalty(model, x, y)
    Traceback (most recent call last):
    SampleMixingError: the per-sample loss of sample 1 moves when other samples' inputs move ...
"""
from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, List, Optional

import torch
from torch import Tensor

from .baseline import per_sample_cross_entropy

__all__ = ["require_per_sample", "tile_batch"]

_PROBE_SEED = 0x5A3B1E
_checked_modules: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()
_checked_functions: "collections.OrderedDict[tuple, bool]" = collections.OrderedDict()
_checked_structures: "collections.OrderedDict[tuple, bool]" = collections.OrderedDict()
_MAX_FUNCTIONS = 256
_lock = threading.Lock()


def _closure_values(f: Any) -> List[Any]:
    """The contents of a function's closure cells (empty cells left out)."""
    out = []
    for c in getattr(f, "__closure__", None) or ():
        try:
            out.append(c.cell_contents)
        except ValueError:          # a name the enclosing scope assigns later
            pass
    return out


def _modules_reached(*fns: Any) -> List[torch.nn.Module]:
    """The modules the probe runs through these callables: a module itself; for a function, the
    modules in its closure and the modules among the attributes of other objects there (a wrapper
    made per step around the same model, e.g. ``EmbeddingSpace``)."""
    mods: List[torch.nn.Module] = []
    for f in fns:
        if isinstance(f, torch.nn.Module):
            mods.append(f)
        for v in _closure_values(f):
            if isinstance(v, torch.nn.Module):
                mods.append(v)
            else:
                mods.extend(a for a in getattr(v, "__dict__", {}).values() if isinstance(a, torch.nn.Module))
    return mods


# closure contents keyed by value: an index, a shift, a flag or a mode name can decide whether a
# function mixes samples (``lambda z: net(z.roll(k, 0))``); everything else (the step's tensors,
# floats such as a temperature) by its type, so a closure made anew per step is probed once
_BY_VALUE = (bool, int, str, bytes, type(None), torch.dtype, torch.device)


def _closure_key(v: Any) -> Any:
    return (type(v), v) if type(v) in _BY_VALUE else type(v)


def _code_shape(f: Any) -> Any:
    """A plain function (a lambda or a closure made anew per call included) by its code and its
    closure contents (:func:`_closure_key`); anything else by identity ("obj")."""
    code = getattr(f, "__code__", None)
    if code is None:
        return ("obj", id(f))
    return ("fn", code, tuple(_closure_key(v) for v in _closure_values(f)))


def _code_key(f: Any) -> Any:
    """:func:`_code_shape` and, for a function, the modules its closure reaches (a batch's tensors
    change at every step, the model does not)."""
    shape = _code_shape(f)
    return shape if shape[0] == "obj" else shape + (tuple(id(m) for m in _modules_reached(f)),)


def _submodules(*fns: Any) -> Iterator[torch.nn.Module]:
    """Every module these callables run, submodules included (``m.modules()`` without its memo of
    visited modules: 1.5x faster, and a module held twice is listed twice)."""
    stack = list(_modules_reached(*fns))
    while stack:
        sub = stack.pop()
        yield sub
        stack.extend(c for c in sub._modules.values() if c is not None)


def _train_flags(*fns: Any) -> tuple:
    """The train/eval flags of every module (submodules included) these callables run: a module
    that uses batch statistics in training only mixes samples in one of the modes, and a model
    function's modules, or one submodule, can switch mode on their own."""
    return tuple(sub.training for sub in _submodules(*fns))


def _key(model: Any, x: Tensor, loss_fn: Optional[Callable], copies: int = 1) -> tuple:
    """The configuration probed: (the model's own key, or None for a module, which keys the weak
    table instead; input shape, dtype and device; the train flags of its modules; the loss
    function; the copies of the batch the engine runs)."""
    own = None if isinstance(model, torch.nn.Module) else _code_key(model)
    return (own, tuple(x.shape), x.dtype, x.device, _train_flags(model, loss_fn),
            None if loss_fn is None else _code_key(loss_fn), copies)


class _NotPlain(Exception):
    """An attribute that is not a plain value: its module is probed per instance."""


_STRUCTURE_VALUES = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)


def _plain_value(v: Any) -> Any:
    if type(v) in _STRUCTURE_VALUES:
        return (type(v), v)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__,) + tuple(_plain_value(x) for x in v)
    if isinstance(v, (set, frozenset)) and all(type(x) is str for x in v):
        return ("set",) + tuple(sorted(v))
    raise _NotPlain


def _structure(*fns: Any) -> Optional[tuple]:
    """What the modules these callables run compute with, apart from their weights: each
    submodule's class, its attributes (sizes, flags, the train/eval mode, hook tables) and its
    parameters' and buffers' shapes and dtypes. Instances of one architecture share it, and so
    share one probe (mixing is decided by the code and these, not by the weights' values: the
    probe runs once per configuration, before the weights train, anyway). None where a module
    holds anything but plain values (a config object, a hook, a tensor attribute): such a model
    is probed per instance."""
    out: List[tuple] = []
    try:
        for sub in _submodules(*fns):
            entry: List[Any] = [type(sub)]
            for k, v in sub.__dict__.items():
                if k in ("_parameters", "_buffers", "_modules") or (isinstance(v, (dict, set)) and not v):
                    continue
                entry.append((k, _plain_value(v)))
            entry.append(tuple((n, tuple(t.shape), t.dtype) for n, t in sub._parameters.items() if t is not None))
            entry.append(tuple((n, tuple(t.shape), t.dtype) for n, t in sub._buffers.items() if t is not None))
            out.append(tuple(entry))
    except _NotPlain:
        return None
    return tuple(out)


def _shared_key(model: Any, x: Tensor, loss_fn: Optional[Callable], copies: int = 1) -> Optional[tuple]:
    """The configuration by architecture (:func:`_structure`) rather than by instance, or None."""
    code = [None if f is None or isinstance(f, torch.nn.Module) else _code_shape(f) for f in (model, loss_fn)]
    if any(c is not None and c[0] == "obj" for c in code):
        return None                      # a callable object other than a module or a function
    structure = _structure(model, loss_fn)
    if structure is None:
        return None
    return (tuple(code), structure, tuple(x.shape), x.dtype, x.device, copies)


def _seen(model: Any, key: tuple) -> bool:
    with _lock:
        if isinstance(model, torch.nn.Module):
            return key in _checked_modules.get(model, ())
        return key in _checked_functions


def _seen_shared(shared: tuple) -> bool:
    with _lock:
        if shared in _checked_structures:
            _checked_structures.move_to_end(shared)
            return True
        return False


def _remember(model: Any, key: tuple, shared: Optional[tuple] = None) -> None:
    with _lock:
        if shared is not None:
            _checked_structures[shared] = True
            while len(_checked_structures) > _MAX_FUNCTIONS:
                _checked_structures.popitem(last=False)
        if isinstance(model, torch.nn.Module):
            _checked_modules.setdefault(model, set()).add(key)
            return
        _checked_functions[key] = True
        while len(_checked_functions) > _MAX_FUNCTIONS:
            _checked_functions.popitem(last=False)


class _buffers_kept:
    """The buffers of the modules the probe runs (:func:`_modules_reached` of the model and the
    loss function) as they were before it: a forward that updates a buffer in place (a counter,
    an EMA) must not do so once more for the probe. Only a buffer the probe changed is written
    back (its version moved), so a buffer an earlier forward saved for its backward is not
    touched."""

    def __init__(self, *fns: Any) -> None:
        self.buffers = list({id(b): b for m in _modules_reached(*fns) for b in m.buffers()}.values())

    def __enter__(self) -> None:
        self.saved = [(b, b._version, b.clone()) for b in self.buffers]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for b, version, value in self.saved:
                if b._version != version:
                    b.copy_(value)


@contextlib.contextmanager
def side_effects_kept(model: Any, loss_fn: Optional[Callable], x: Tensor) -> Iterator[None]:
    """What a probe forward runs inside: on the real tensors (not into a graph make_fx is
    recording), without gradients, PyTorch's random state forked (a dropout draw in the probe does
    not move the training run's stream) and the modules' buffers kept (:class:`_buffers_kept`).
    The sample-mixing probe here and the multilinear probe (jets/multilinear.py) share it."""
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
    devices = [x.device.index or 0] if x.is_cuda else []
    with disable_proxy_modes_tracing(), torch.no_grad(), torch.random.fork_rng(devices=devices), \
            _buffers_kept(model, loss_fn):
        yield


def _probe_sets(B: int):
    """The moved sets of the probe, as boolean masks over the batch: for each bit k of the sample
    index, the samples with bit k set, then those with it clear. For every ordered pair i ≠ j one
    set holds i and not j."""
    index = torch.arange(B)
    for k in range(max(1, (B - 1).bit_length())):
        bit = ((index >> k) & 1).bool()
        yield bit
        yield ~bit


def tile_batch(x: Tensor, y: Any, copies: int):
    """x and y (a tensor with a batch axis; anything else as it is) repeated ``copies`` times along
    dim 0, group-major: rows d·B … d·B + B − 1 are copy d of the batch (the engine's D direction
    rows per sample)."""
    if copies == 1:
        return x, y
    B, rest = x.shape[0], tuple(x.shape[1:])
    X = x.unsqueeze(0).expand((copies, B) + rest).reshape((copies * B,) + rest)
    if isinstance(y, Tensor) and y.dim() >= 1:
        y = y.unsqueeze(0).expand((copies,) + tuple(y.shape)).reshape((copies * B,) + tuple(y.shape[1:]))
    return X, y


def _probe_mixing(model: Callable, x: Tensor, y: Any, loss: Callable, loss_fn: Optional[Callable],
                  gen: torch.Generator) -> None:
    """The sample-mixing probe (module docstring): one first-order jet per moved set."""
    from .api import jet
    from .rules.norm import SampleMixingError

    B = x.shape[0]
    # make_fx capturing a loss: the probe runs on the real tensors, not into the graph
    with side_effects_kept(model, loss_fn, x):
        u_all = torch.randn(tuple(x.shape), generator=gen, dtype=torch.float64)
        for moved in _probe_sets(B):
            u = u_all.clone()
            u[~moved] = 0
            u = u.to(device=x.device, dtype=x.dtype)
            c = jet(lambda xj: loss(model(xj), y), x.detach(), u, 1)
            if not (isinstance(c, Tensor) and c.dim() == 2 and c.shape[1] == B):
                break                   # not one loss per sample: the caller's own check says so
            still = c[1].detach()[~moved.to(c.device)].double()
            bad = torch.isfinite(still) & (still != 0)
            if bool(bad.any()):
                b = int(torch.nonzero(~moved).flatten()[int(torch.nonzero(bad).flatten()[0])])
                raise SampleMixingError(
                    f"the per-sample loss of sample {b} moves when other samples' inputs move (a first-order "
                    f"probe gave ∂ℓ_{b}/∂x_other · u = {float(still[bad][0]):.3g}, exactly 0 for a model that "
                    "treats samples independently): the model mixes samples across the batch (statistics, "
                    "a softmax or attention over dim 0, a normalization by the batch), so per-sample input "
                    "derivatives are not defined. Compute the batch statistics under torch.no_grad() or "
                    "from .detach()ed inputs if they are meant as constants, or call model.eval() where a "
                    "module has a per-sample evaluation mode. Dim 0 of x is the batch: a sequence-first "
                    "model (nn.MultiheadAttention or nn.Transformer with batch_first=False) mixes along it "
                    "and needs batch-first inputs.")


def _copy_tolerance(x: Tensor) -> float:
    """How far a copy's value may sit from the batch's own, relative to the batch's largest: the
    two passes differ in the row count of every product (another GEMM kernel, another summation
    order). √ε where the arithmetic is x's float64 or float32 on a CPU; 1 % where it may be coarser
    (half precision, autocast, CUDA float32, whose convolutions run TF32 by default). A loss that
    reads the batch size is off by a factor (D times smaller for ``/ len(y)``)."""
    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except TypeError:                   # torch < 2.4: no device argument
        autocast = torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()
    coarse = autocast or x.dtype not in (torch.float32, torch.float64) or (x.is_cuda and x.dtype == torch.float32)
    return 1e-2 if coarse else torch.finfo(x.dtype).eps ** 0.5


#: when the engine runs the batch as given, one row per sample
_ONE_ROW = ("use one direction per sample (n_dirs=1, or u of x's shape), with directions='fixed' or per-order "
            "directions on a model whose ops all have multilinear rules (polarization runs 2^(N-1) rows per "
            "sample)")


def _probe_batch_size(model: Callable, x: Tensor, y: Any, loss: Callable, loss_fn: Optional[Callable],
                      copies: int, gen: torch.Generator) -> None:
    """The batch-size probe (module docstring): the first-order jet of the batch tiled ``copies``
    times, every copy against the batch's own, both from the same random state."""
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    # make_fx capturing a loss: the probe and its comparisons run on the real tensors, not into the graph
    with disable_proxy_modes_tracing():
        _compare_copies(model, x, y, loss, loss_fn, copies, gen)


def _compare_copies(model: Callable, x: Tensor, y: Any, loss: Callable, loss_fn: Optional[Callable],
                    copies: int, gen: torch.Generator) -> None:
    from .api import jet
    from .jets.draws import SharedDrawError, shared_draws
    from .rules.norm import SampleMixingError

    B = x.shape[0]
    u = torch.randn(tuple(x.shape), generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    with side_effects_kept(model, loss_fn, x):
        one = jet(lambda xj: loss(model(xj), y), x.detach(), u, 1)
    if not (isinstance(one, Tensor) and one.dim() == 2 and one.shape[1] == B):
        return                          # not one loss per sample: the caller's own check says so
    X, Y = tile_batch(x.detach(), y, copies)
    U = tile_batch(u, None, copies)[0]
    rows = f"{copies}·{B} = {copies * B} rows ({copies} copies of the batch of {B}: {copies} direction rows per sample)"
    try:
        # the same random state as the pass above (side_effects_kept forks it), the copies of a
        # sample sharing their draws: a dropout mask is the batch's own
        with side_effects_kept(model, loss_fn, x), shared_draws(copies, B):
            many = jet(lambda xj: loss(model(xj), Y), X, U, 1)
    except SharedDrawError:
        return                          # a per-row draw of a plain tensor: no common function to compare
    except Exception as e:
        raise SampleMixingError(
            f"the model fails on the {rows} the engine runs, though it runs on the batch itself: it is built "
            f"for a batch of {B} (a mask, a view or a buffer sized by the batch). {type(e).__name__}: {e}. Size "
            f"what the model builds from its input's dim 0, or {_ONE_ROW}.") from e
    if not (isinstance(many, Tensor) and tuple(many.shape) == (2, copies * B)):
        return
    one = one.detach().double()
    many = many.detach().double().reshape(2, copies, B)
    tol = _copy_tolerance(x)
    for n, what in ((0, "ℓ_b"), (1, "∂ℓ_b/∂x_b · u")):
        ref = one[n]
        finite = torch.isfinite(ref)
        scale = float(ref[finite].abs().max()) if bool(finite.any()) else 0.0
        off = (many[n] - ref).abs()
        bad = finite & ~((off <= tol * scale) & torch.isfinite(many[n]))
        if bool(bad.any()):
            d, b = (int(i) for i in torch.nonzero(bad)[0])
            raise SampleMixingError(
                f"the per-sample loss depends on the batch size: for sample {b}, {what} = {float(ref[b]):.6g} "
                f"in the batch of {B} but {float(many[n, d, b]):.6g} in copy {d} of the {rows} the engine "
                "runs (nested autograd runs each direction on the batch as given). The model or loss_fn "
                "uses the batch size in its arithmetic (e.g. dividing by x.shape[0] or len(y)); make the "
                f"per-sample loss independent of it (scale the penalty with scale= instead), or {_ONE_ROW}.")


def require_per_sample(model: Callable[[Tensor], Any], x: Tensor, y: Any,
                       loss_fn: Optional[Callable[[Any, Any], Tensor]] = None, copies: int = 1) -> None:
    """Raise :class:`~curvrate_fast.SampleMixingError` if the per-sample loss
    ``loss_fn(model(x), y)`` (default: the per-sample cross-entropy) of some sample moves with other
    samples' inputs, or, where the engine runs ``copies`` > 1 copies of the batch (one per
    direction row), with the batch size (see the module docstring). No-op for a batch of one run
    once, inside torch.compile's tracing, and for a configuration already probed.

    Example::

        >>> require_per_sample(net, x, y)          # passes for an MLP
        >>> require_per_sample(lambda z: net(z) / z.shape[0], x, y, copies=4)
        Traceback (most recent call last):
        SampleMixingError: the per-sample loss depends on the batch size: ...
    """
    B = x.shape[0] if x.dim() >= 1 else 0
    if B < 1 or (B < 2 and copies < 2) or torch.compiler.is_compiling():
        return
    key = _key(model, x, loss_fn, copies)
    if _seen(model, key):
        return
    shared = _shared_key(model, x, loss_fn, copies)
    if shared is not None and _seen_shared(shared):   # another instance of the architecture passed
        _remember(model, key)
        return
    loss = loss_fn or per_sample_cross_entropy
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    if B >= 2:
        _probe_mixing(model, x, y, loss, loss_fn, gen)
    if copies > 1:
        _probe_batch_size(model, x, y, loss, loss_fn, copies, gen)
    _remember(model, key, shared)
