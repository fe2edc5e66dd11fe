"""Captured jet programs (docs/design.md §6): a loss computed with jets, recorded once as one ATen
graph through the rules and replayed, optionally compiled.

The eager engine interprets a model op by op: every torch function that meets a jet pays the
Python dispatch of ``__torch_function__``, the rule lookup and the rule's own Python. On a small
model that is the whole cost. :func:`compile` removes it: the first call with a new configuration
runs the function once under ``make_fx`` (the jet wrapper is Python and invisible to the trace:
what is recorded are the ATen ops the rules run on the coefficient tensors), **forward and the
backward to the parameters in one graph**, and hands that graph to ``torch.compile``'s inductor
(or replays it as it is with ``backend="eager"``); later calls with the same configuration run
the graph.

What is an input of the graph and what is not:

- **inputs** (read afresh on every call, never baked in): the parameters and buffers of every
  ``nn.Module`` argument (passed in with ``torch.nn.utils.stateless``, so an optimizer step is
  seen), every tensor argument (inputs, labels, directions, subset indices: the CRR wrappers draw
  their random directions and subsets *outside* the graph, eagerly, and pass them in, with the
  penalty's scale as a 0-d tensor, so that a scale schedule replays one graph), and the
  random state: random ops inside the model (dropout) stay random ops of the graph and draw from
  PyTorch's generator at every call, in eager order (inductor is told ``fallback_random``, so
  the masks are those the eager engine would draw), or from a ``torch.Generator`` of the user's
  (an argument, a module attribute, in fn's closure, defaults or globals), whose state the
  recording leaves as it found it; a generator found nowhere else is refused;
- **guards** (a change means a new capture, cached beside the old ones; the walk over a module's
  submodules is remembered while no dict it read has changed: :mod:`curvrate_fast.guard_keys`):
  every tensor's shape,
  strides (memory layout), dtype, device and ``requires_grad``; every module argument's
  structure: the class, the train/eval flag and the other attributes (sizes, flags, hooks: by
  value, or by identity for objects such as functions) of each submodule, and its parameter and
  buffer names and metadata (two instances of one architecture share their graphs, each feeding
  its own parameters); every other argument by value (numbers with their type, strings, None;
  lists, tuples, dicts by their contents; a plain function or partial by its code, globals,
  defaults and closure contents, so an inline lambda made anew per call is one configuration;
  another hashable object by equality) or else by an identity the key keeps alive (a bare
  ``id()`` could be reused by a later object); grad mode; autocast's state; the engine's backend
  setting; the global module hooks; the process settings a graph fixes (the default dtype,
  deterministic algorithms, oneDNN's switch, the float32 matmul precision);
- **refused** at capture, with an error that names the cause (a graph that would replay a stale
  value is never kept): a tensor value read into Python while tracing (``.item()``, ``bool(t)``:
  the graph would replay that one value), a parameter reached other than through a module
  argument, a plain tensor attribute of a module (register it as a buffer), a result that is not
  one scalar tensor, a forward or backward hook of a module argument's submodules or a global
  module hook (the graph would run it once, while recording: its side effects would not repeat;
  hooks are guarded, so one registered later is refused at its capture), a data-parallel wrapper
  whose own forward work a replay would skip (DDP with ``find_unused_parameters``,
  ``static_graph``, or broadcasting buffers the forward updates; FSDP), a buffer replaced by a
  new tensor in the forward or another input changed in place (buffers updated in place are
  fine: the trace runs on copies of them, the graph updates them once per call).

The graph returns the loss and its gradients with respect to every parameter and tensor argument
that requires grad; the call returns the loss as a tensor whose backward multiplies those
gradients by the incoming gradient (exact for a scalar loss; a backward with
``create_graph=True``, for a second derivative through it, raises a :class:`CaptureError`).
:meth:`CompiledLoss.backward` does the call and ``backward()`` in one, writing the graph's
gradients into ``.grad`` without an autograd pass (through autograd where a backward pass has
hooks or DDP/FSDP work to run); :meth:`CompiledLoss.train_step` puts the optimizer's update in
the graph as well. So ``loss.backward()`` and optimizers work as usual, and a custom backward of
the engine (the Toeplitz backward of the activation jets) is recorded as it runs. As in eager autograd, a tensor
the loss does not reach gets no gradient (``.grad`` stays None, so an optimizer skips it); a
parameter held by two modules (tied weights) is a graph input under each name, and its uses'
gradients add up.

Inside a user's ``torch.compile`` the call is one ``torch.library`` custom op
(``curvrate::captured_loss``), so dynamo sees no jet and the step compiles without graph breaks
(``fullgraph=True`` works); the op runs the captured program at run time with real tensors, and
there its value checks (NaN/Inf, labels) run too. There the op's gradient outputs are fixed when
the step is traced: a tensor the loss does not reach gets a zero gradient, not None (a warning
says so once).

First-call cost: the capture itself takes about 0.1–0.5 s on small models; inductor then compiles
the graph, 3–20 s on CPU the first time (its C++ build; later processes reuse inductor's on-disk
cache), seconds on CUDA; a transformer's per-order CRR step, whose multilinear graph holds many
small ops, takes minutes (a 2-layer TinyLM: 182 s on one CPU core). Each new configuration (e.g.
the last, smaller batch of an epoch) is one more capture and compile.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import itertools
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .cpu_gemm import GEMM_MODES, rewrite_graph
from .finite import require_finite
from .guard_keys import _PRIMITIVE_TYPES, _Const, _module_state
from .jets.registry import settings
from .jets.tensor import JetError
from .mixing import _closure_values
from .optim_update import lr_tensor, mark_stepped, step_plan

__all__ = ["compile", "CompiledLoss", "CaptureError"]


class CaptureError(JetError):
    """A function cannot be captured as a graph that replays exactly (the message says why)."""


_LOCK = threading.RLock()

# ops whose presence in a captured graph means a tensor value was read into Python while tracing:
# the Python that read it took one branch, which the graph would replay for every later value
_VALUE_READS = ("_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "unique",
                "_unique", "_unique2", "masked_select")


def _autocast_state() -> tuple:
    """Autocast's state for the devices a graph may run on: a graph recorded under autocast holds
    its casts (and float16's direction scale), so a change of state is a new capture."""
    if not torch._C._is_any_autocast_enabled():
        return ()
    from .jets.dispatcher import precision
    out = []
    for dt in ("cpu", "cuda"):
        if torch.is_autocast_enabled(dt):
            out.append((dt, torch.get_autocast_dtype(dt)))
    return tuple(out) + (("fp16_scale", float(precision.fp16_direction_scale)),)


def _global_state_key() -> tuple:
    """Process-wide settings that a recorded graph holds fixed, for the guard: the default dtype
    (a tensor the function makes without a dtype, ``torch.ones(n)``, is recorded without one and
    its conversion to the input's dtype was a no-op, so an eager replay after
    ``torch.set_default_dtype`` computed in the new dtype while eager PyTorch did not: measured,
    a float32 model's loss came back float64), deterministic algorithms and oneDNN's switch (they
    decide at capture whether a CPU GEMM may run on oneDNN: :mod:`curvrate_fast.cpu_gemm`), and
    the float32 matmul precision (TF32 on CUDA)."""
    return (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
            bool(torch.backends.mkldnn.enabled), torch.get_float32_matmul_precision())


# the hooks a forward or backward pass runs, per module and global (torch.nn.modules.module): a
# captured graph would run them once, while it is recorded; their tensor arithmetic would be
# replayed, their Python side effects (storing outputs, logging, statistics) never again
_MODULE_RUN_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
                     ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
_GLOBAL_RUN_HOOKS = (("_global_forward_pre_hooks", "forward pre-hook", "register_module_forward_pre_hook"),
                     ("_global_forward_hooks", "forward hook", "register_module_forward_hook"),
                     ("_global_backward_pre_hooks", "backward pre-hook",
                      "register_module_full_backward_pre_hook"),
                     ("_global_backward_hooks", "backward hook", "register_module_full_backward_hook"))


def _global_hooks_key() -> tuple:
    """The global module hooks in force (by handle id: a new hook is a new id), for the guard:
    () in the usual case of none."""
    mod = torch.nn.modules.module
    dicts = [getattr(mod, attr, None) for attr, _, _ in _GLOBAL_RUN_HOOKS]
    if not any(dicts):
        return ()
    return tuple(tuple(d) if d else () for d in dicts)


def _refuse_distributed(name: str, layout, mutated_buffers: Sequence[str] = ()) -> None:
    """A captured graph replays the module's computation, not its Python: a data-parallel wrapper's
    own forward work does not run on a replay. Plain DDP needs none of it for the gradients (its
    all-reduce runs in the parameters' gradient hooks, which the captured loss's backward still
    fires: tested on two ranks), nor its buffer broadcast where the forward leaves the buffers as
    they are (they were made equal on every rank when DDP was built); the other modes and FSDP
    need their forward (found unused parameters, static-graph bookkeeping, gathering and freeing
    shards) and are refused, and so is DDP broadcasting buffers that the forward updates
    (``mutated_buffers``, found by the trace)."""
    ddp = nn.parallel.DistributedDataParallel
    others = _fsdp_classes()
    for item in layout:
        if item[0] != "M":
            continue
        for mname, sub in item[1].named_modules():
            what = None
            if isinstance(sub, others):
                what = f"an FSDP module ({type(sub).__name__}), which gathers and frees its parameters in its forward"
            elif isinstance(sub, ddp):
                if sub.find_unused_parameters or getattr(sub, "static_graph", False):
                    what = ("DistributedDataParallel with find_unused_parameters=True or static_graph=True, whose "
                            "forward prepares the reducer for the backward")
                elif mutated_buffers and getattr(sub, "broadcast_buffers", False):
                    what = ("DistributedDataParallel with broadcast_buffers=True, whose forward copies rank 0's "
                            f"buffers to every rank, around a forward that updates {mutated_buffers[0]}")
            if what is not None:
                where = f" (submodule '{mname}')" if mname else ""
                raise CaptureError(f"compile({name}): the model holds {what}{where}; a captured graph replays "
                                   "the computation without that forward. Call the loss without compile (the "
                                   "eager engine supports every DDP mode and FSDP2), or use plain DDP "
                                   "(with broadcast_buffers=False where the forward updates buffers).")


def _refuse_hooks(name: str, layout) -> None:
    """Refuse, at capture, a function whose modules run hooks (their side effects would happen
    once, at capture, and never on a replay). Hooks are part of the guard key, so one added later
    means a new capture, which lands here."""
    why = ("a captured graph runs hooks once, while it is recorded: their tensor arithmetic would be "
           "replayed but their Python side effects (storing outputs, logging, statistics) would not. ")
    mod = torch.nn.modules.module
    for attr, kind, register in _GLOBAL_RUN_HOOKS:
        if getattr(mod, attr, None):
            raise CaptureError(f"compile({name}): a global module {kind} is registered "
                               f"(torch.nn.modules.module.{register}); {why}Remove it while the compiled "
                               "loss runs, or call the loss without compile.")
    for item in layout:
        if item[0] != "M":
            continue
        for mname, sub in item[1].named_modules():
            for attr, kind in _MODULE_RUN_HOOKS:
                if getattr(sub, attr, None):
                    where = f"submodule '{mname}'" if mname else "the module"
                    hint = ("FSDP gathers and frees its parameters in such hooks: call the loss without "
                            "compile." if isinstance(sub, _fsdp_classes()) else
                            "Remove the hook while the compiled loss runs, or call the loss without "
                            "compile (for weight or spectral normalization, torch.nn.utils.parametrizations "
                            "needs no hook).")
                    raise CaptureError(f"compile({name}): {where} ({type(sub).__name__}) has a {kind}; "
                                       f"{why}{hint}")


def _meta(t: Tensor) -> tuple:
    # torch.Size is a tuple: hashed and compared as one, no copy needed. The strides too: a graph
    # compiled for one memory layout reads its inputs with that layout's strides (inductor
    # asserts them), so a transposed, sliced or channels-last tensor is a capture of its own
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


class _Entry:
    """One captured configuration: the graph, how to feed it, which outputs are gradients."""

    __slots__ = ("runner", "wrt", "n_aux", "graph", "calls", "unused", "used", "reached", "warned", "writes")

    def __init__(self, runner, wrt: List[int], n_aux: int, graph, unused: Tuple[bool, ...] = (),
                 writes: bool = False) -> None:
        self.runner = runner
        self.wrt = wrt          # indices into the flat input list of the tensors differentiated
        self.n_aux = n_aux
        self.graph = graph
        self.calls = 0
        self.unused = unused    # per wrt tensor: the loss does not depend on it (its grad is None)
        self.used = 0           # the cache's clock at the last call (least recently used is evicted)
        # (position among wrt, flat index) of the tensors the loss reaches: only they get a
        # gradient, as in eager autograd (an unreached parameter keeps .grad None, so an
        # optimizer skips it instead of applying momentum or weight decay to a zero gradient)
        self.reached = [(j, i) for j, i in enumerate(wrt) if not (unused and unused[j])]
        self.warned = False
        self.writes = writes    # a captured step whose graph writes the update into its inputs


class _GradsTimesIncoming(torch.autograd.Function):
    """value (computed, detached) → value, whose backward hands grad_out · g_i to input i."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: Tuple[Tensor, ...], name: str, *wrt: Tensor) -> Tensor:
        # saved as autograd saves tensors: released right after the backward (so the gradients
        # handed over as they are below are stolen by AccumulateGrad, not copied), kept under
        # retain_graph=True for a second backward (AccumulateGrad then copies, as the saved ones
        # are still referenced), and a second backward without it gets autograd's own error
        ctx.save_for_backward(*grads)
        ctx.name = name
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():
            # backward(create_graph=True): the graph's gradients are computed values, constants to
            # a second differentiation, so a gradient penalty or a Hessian product through this
            # loss would silently lose the loss's own second-order terms (once_differentiable
            # raised only where grad_out itself required grad, and unclearly)
            raise CaptureError(f"{ctx.name}: a captured loss gives first-order gradients only, and this "
                               "backward was asked for a differentiable graph (create_graph=True: double "
                               "backward, a gradient penalty, a Hessian-vector product). The eager engine refuses "
                               "it as well where activation or cross-entropy jets run (their backwards are "
                               "first-order); second derivatives of the loss: nested autograd "
                               "(curvrate_fast.baseline).")
        grads = ctx.saved_tensors
        if (type(grad_out) is Tensor and grad_out.device.type == "cpu" and grad_out.numel() == 1
                and not torch.compiler.is_compiling() and grad_out.item() == 1.0):
            # loss.backward()'s implicit 1 (a real CPU tensor: reading it costs no sync, and no
            # tracer of the backward sees the read): the graph's own gradients, fresh tensors of
            # this call, handed over without one multiply each
            return (None, None, None) + tuple(grads)
        return (None, None, None) + tuple(torch._foreach_mul(list(grads), grad_out))


class CompiledLoss:
    """A scalar loss function computed with jets, captured per configuration and replayed
    (see the module docstring and :func:`compile`). Call it like ``fn``.

    Attributes: ``captures`` (how many graphs were recorded), ``cache_size``; ``graphs()`` the
    recorded ``torch.fx.GraphModule``\\ s (for inspection)."""

    def __init__(self, fn: Callable[..., Any], *, backend: Optional[str] = "inductor",
                 options: Optional[Dict[str, Any]] = None, cache_size: int = 8,
                 check: Optional[Callable[..., None]] = None,
                 aux_like: Optional[Callable[..., Sequence[Tuple[tuple, torch.dtype]]]] = None,
                 name: Optional[str] = None, cpu_gemm: str = "auto") -> None:
        if not callable(fn):
            raise TypeError(f"compile needs a callable, got {type(fn).__name__}")
        if backend is not None and not isinstance(backend, str) and not callable(backend):
            raise TypeError(f"backend must be None, a torch.compile backend name or callable, got {backend!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be an int ≥ 1, got {cache_size!r}")
        if cpu_gemm not in GEMM_MODES:
            raise ValueError(f"cpu_gemm must be one of {GEMM_MODES}, got {cpu_gemm!r}")
        self.fn = fn
        self.backend = "eager" if backend is None else backend
        self.cpu_gemm = cpu_gemm
        self.options = dict(options or {})
        self.cache_size = cache_size
        self.check = check
        self.aux_like = aux_like
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)
        self.captures = 0
        self._cache: Dict[tuple, _Entry] = {}
        self._clock = 0
        self._lock = _LOCK
        self._warned_evict = False
        self._last_key: Optional[tuple] = None       # the previous call's key: what changed, for warnings
        self._value_recaptures = 0

    def __repr__(self) -> str:
        return (f"CompiledLoss({self.name}, backend={self.backend!r}, captures={self.captures}, "
                f"cached={len(self._cache)})")

    def graphs(self) -> List[torch.fx.GraphModule]:
        return [e.graph for e in self._cache.values()]

    def clear(self) -> None:
        """Drop every captured graph (the next call captures again)."""
        with self._lock:
            self._cache.clear()

    # -- flattening -------------------------------------------------------------------------
    def _flatten(self, args: tuple, kwargs: dict):
        """(flat tensors, layout, guard key). The layout rebuilds the call from the flat list:
        ("M", module, names of params, names of buffers) | ("T",) | ("C", value)."""
        flat: List[Tensor] = []
        layout: List[tuple] = []
        key: List[Any] = []
        items = args + tuple(kwargs[k] for k in sorted(kwargs)) if kwargs else args
        for a in items:
            if type(a) in _PRIMITIVE_TYPES:     # as _Const keys it, without making one
                layout.append(("C", a))
                key.append(("C", (type(a), a)))
            elif type(a) is tuple and all(type(x) in _PRIMITIVE_TYPES for x in a):
                layout.append(("C", a))            # (orders, sizes): as _Const keys them
                key.append(("C", ("tuple",) + tuple((type(x), x) for x in a)))
            elif isinstance(a, nn.Module):
                parts = _module_state(a)
                layout.append(("M", a, parts.param_names, parts.buffer_names))
                flat.extend(parts.tensors)
                key.append(("M", parts.flags, parts.param_names, parts.buffer_names,
                            tuple(map(_meta, parts.tensors))))
            elif isinstance(a, Tensor):
                if type(a) is not Tensor and not isinstance(a, nn.Parameter):
                    raise CaptureError(f"compile: a tensor argument of type {type(a).__name__} (a tensor "
                                       "subclass) cannot be a graph input; pass plain tensors")
                layout.append(("T",))
                flat.append(a)
                key.append(("T", _meta(a)))
            elif isinstance(a, (list, tuple, dict)) and _has_tensor(a):
                raise CaptureError("compile: pass tensors and modules as top-level arguments, not inside "
                                   f"a {type(a).__name__} (a tensor inside a container would be baked "
                                   "into the graph)")
            else:
                c = _Const(a)
                layout.append(("C", a))
                key.append(("C", c.key))
        key.append(("kw", tuple(sorted(kwargs))))
        key.append(("grad", torch.is_grad_enabled()))
        key.append(("engine", settings.backend, settings.linear_impl))
        key.append(("autocast", _autocast_state()))
        key.append(("global hooks", _global_hooks_key()))
        key.append(("global state", _global_state_key()))
        return flat, layout, tuple(key)

    @staticmethod
    def _rebuild(layout, flat: Sequence[Tensor], n_args: int, kw_names: Sequence[str]):
        """Arguments for fn from the flat list; modules come back with a parametrization table."""
        vals: List[Any] = []
        tables: List[Tuple[nn.Module, Dict[str, Tensor]]] = []
        i = 0
        for item in layout:
            if item[0] == "M":
                _, m, pn, bn = item
                table = {}
                for n in pn:
                    table[n] = flat[i]
                    i += 1
                for n in bn:
                    table[n] = flat[i]
                    i += 1
                tables.append((m, table))
                vals.append(m)
            elif item[0] == "T":
                vals.append(flat[i])
                i += 1
            else:
                vals.append(item[1])
        args = tuple(vals[:n_args])
        kwargs = dict(zip(kw_names, vals[n_args:]))
        return args, kwargs, tables

    # -- capture ----------------------------------------------------------------------------
    def _capture(self, flat: List[Tensor], layout, n_args: int, kw_names, wrt: List[int],
                 update: Optional[Callable] = None, extra: Sequence[Tensor] = (),
                 written: Sequence[int] = ()) -> _Entry:
        """Record fn's loss, aux outputs and gradients (and, for a captured step, ``update(wrt
        tensors, gradients or None, extra inputs)``'s outputs after them) as one graph, and
        compile it; ``extra`` are further graph inputs after ``flat``. With ``written`` (the
        graph-input positions, in ``update``'s output order, of the tensors it updates), the graph
        writes the update into those inputs in place instead of returning it."""
        from contextlib import ExitStack

        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.nn.utils.stateless import _reparametrize_module

        _refuse_hooks(self.name, layout)
        _refuse_distributed(self.name, layout)
        need_grad = bool(wrt)
        n_aux_box = [0]
        unused_box: List[Tuple[bool, ...]] = [()]
        fn = self.fn
        n_flat = len(flat)

        def joint(*ins):
            extra_in = list(ins[n_flat:])
            ins = list(ins[:n_flat])
            ins_raw = list(ins)
            plain = [ins[i] for i in wrt]
            leaves = []
            for i in wrt:
                leaf = ins[i].detach().requires_grad_(True)
                ins[i] = leaf
                leaves.append(leaf)
            args, kwargs, tables = self._rebuild(layout, ins, n_args, kw_names)
            with ExitStack() as stack:
                for m, table in tables:
                    stack.enter_context(_reparametrize_module(m, table, tie_weights=False, strict=False))
                with torch.set_grad_enabled(need_grad):
                    out = fn(*args, **kwargs)
                # (a module passed twice is reparametrized twice: the last table is in force)
                for m, table in {id(m): (m, table) for m, table in tables}.values():
                    _refuse_reassigned(self.name, m, table)
                value, aux = _split_output(out, self.name)
                n_aux_box[0] = len(aux)
                # the backward too runs with the graph's inputs in the modules: activation
                # checkpointing recomputes the forward there and must meet them, not the modules'
                # own parameters (which would enter the graph as constants)
                if leaves:
                    raw = list(torch.autograd.grad(value, leaves, allow_unused=True))
                    unused_box[0] = tuple(g is None for g in raw)
                    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(raw, leaves)]
                else:
                    raw, grads = [], []
            updated: List[Tensor] = []
            if update is not None:
                # the optimizer's arithmetic as its own step() runs it: no autocast casts
                with torch.no_grad(), ExitStack() as off:
                    for dev in sorted({t.device.type for t in plain}):
                        if dev in ("cpu", "cuda"):
                            off.enter_context(torch.autocast(dev, enabled=False))
                    updated = list(update(plain, [None if g is None else g.detach() for g in raw], extra_in))
                if written:
                    # into the parameters and the optimizer's state, as its own step() writes them
                    every = ins_raw + extra_in
                    with torch.no_grad():
                        for at, new in zip(written, updated):
                            if new is not every[at]:
                                every[at].copy_(new)
                    updated = []
            return (value.detach(), *[a.detach() for a in aux], *grads, *updated)

        ins = [t.detach() for t in flat] + [t.detach() for t in extra]
        devices = sorted({t.device.index or 0 for t in flat if t.is_cuda})
        # the trace runs fn once on real tensors: it must not consume random numbers, so that the
        # first replay draws what an eager call would have drawn; nor change a tensor in place: a
        # module's buffers (a running statistic, a counter updated in place, which the graph
        # replays) are traced on copies, so that the first replay updates them once, as an eager
        # call would; any other input changed in place by the trace is refused
        names = _input_names(layout, len(flat), len(extra))
        copied = set(written)
        traced = [t.clone() if names[i][1] or i in copied else t for i, t in enumerate(ins)]
        versions = [t._version for t in ins]
        generators = _generators_of(fn, layout)
        with _capture_settings(flat), torch.random.fork_rng(devices=devices), _states_kept(generators), \
                _reseeding_refused(self.name):
            try:
                gm = make_fx(joint, tracing_mode="real", _allow_non_fake_inputs=True)(*traced)
            except RuntimeError as e:
                if "_local_scalar_dense" not in str(e) and "data-dependent" not in str(e):
                    raise
                raise CaptureError(_value_read_message(self.name, "aten._local_scalar_dense")) from e
        _refuse_unseen_generators(gm, generators, self.name)
        updated = [what for (what, is_buffer), t in zip(names, traced) if is_buffer and t._version != 0]
        if updated:
            _refuse_distributed(self.name, layout, updated)
        for (what, _), t, v in zip(names, ins, versions):
            if t._version != v:
                raise CaptureError(f"compile({self.name}): the function changed {what} in place while it was "
                                   "recorded; a graph cannot replay that exactly. Keep in-place updates to "
                                   "module buffers (under torch.no_grad()), or call the loss without compile.")
        _verify_graph(gm, layout, self.name)
        rewrite_graph(gm, self.cpu_gemm)   # oneDNN for the float32 CPU GEMMs where it is faster
        runner = self._compile_graph(gm, ins)
        self.captures += 1
        return _Entry(runner, wrt, n_aux_box[0], gm, unused_box[0], writes=bool(written))

    def _compile_graph(self, gm: torch.fx.GraphModule, example: List[Tensor]):
        backend = self.backend
        if backend == "eager":
            return gm
        if backend == "inductor":
            opts = {"fallback_random": True}
            if all(t.device.type == "cpu" for t in example):
                # the graph's wrapper in C++: on small models inductor's Python wrapper (a call
                # per buffer and per alias of a coefficient row) costs more than the kernels
                # (the tiny MLP's derivative step: graph 302 → 255 µs)
                opts["cpp_wrapper"] = True
            opts.update(self.options)
            # compile_fx derives the fake values again; a cpp_wrapper compile re-traces and
            # refuses the ones make_fx left in the nodes (another fake mode)
            for node in gm.graph.nodes:
                node.meta.pop("val", None)
                node.meta.pop("tensor_meta", None)
            try:
                from torch._inductor.compile_fx import compile_fx
            except ImportError:  # an inductor without compile_fx: torch.compile
                return torch.compile(gm, backend="inductor", options=opts, fullgraph=True, dynamic=False)
            try:
                return compile_fx(gm, example, config_patches=opts)
            except Exception:  # noqa: BLE001
                if not opts.get("cpp_wrapper") or "cpp_wrapper" in self.options:
                    raise
            # the C++ wrapper is a speed choice of ours: where it cannot build, the Python one
            opts["cpp_wrapper"] = False
            return compile_fx(gm, example, config_patches=opts)
        return torch.compile(gm, backend=backend, fullgraph=True, dynamic=False,
                             options=self.options or None)

    # -- call -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> Tensor:
        if torch.compiler.is_compiling():
            return _dynamo_call(self, args, kwargs)
        value, _ = self.call_with_aux(*args, **kwargs)
        return value

    def call_with_aux(self, *args, **kwargs) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """The loss (differentiable) and the detached auxiliary outputs of ``fn``."""
        if torch.compiler.is_compiling():
            return _dynamo_call(self, args, kwargs, with_aux=True)
        flat, layout, key = self._checked_flatten(args, kwargs)
        return self._call_checked(args, kwargs, flat, layout, key)

    def _checked_flatten(self, args: tuple, kwargs: dict):
        """The value checks (``check``, or NaN/Inf of the tensor arguments), then :meth:`_flatten`."""
        if self.check is not None:
            self.check(*args, **kwargs)
        else:
            _check_finite_args(args, kwargs)
        return self._flatten(args, kwargs)

    def _start_gradient_call(self, method: str, there: str, why: str, args: tuple, kwargs: dict):
        """How :meth:`backward` and :meth:`train_step` start: outside torch.compile (there, call
        ``there`` instead), in grad mode (else ``why``), values checked; (flat, layout, key, the
        flat positions of the tensors that require grad)."""
        if torch.compiler.is_compiling():
            raise CaptureError(f"compile({self.name}).{method} cannot run inside torch.compile; there, call {there}")
        if not torch.is_grad_enabled():
            raise RuntimeError(f"compile({self.name}).{method}: grad mode is off (torch.no_grad); {why}")
        flat, layout, key = self._checked_flatten(args, kwargs)
        return flat, layout, key, [i for i, t in enumerate(flat) if t.requires_grad]

    def _call_checked(self, args: tuple, kwargs: dict, flat: List[Tensor], layout, key: tuple
                      ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """:meth:`call_with_aux` after the checks, with the arguments flattened."""
        kw_names = sorted(kwargs)
        need_grad = torch.is_grad_enabled()
        entry = self._cached(key, lambda: self._capture(
            flat, layout, len(args), kw_names, [i for i, t in enumerate(flat) if need_grad and t.requires_grad]))
        entry.calls += 1
        with torch.no_grad():
            outs = entry.runner(*[t.detach() for t in flat])
        outs = list(outs)
        value = outs[0]
        aux = tuple(outs[1:1 + entry.n_aux])
        if entry.reached:
            n = 1 + entry.n_aux
            value = _GradsTimesIncoming.apply(value, tuple(outs[n + j] for j, _ in entry.reached),
                                              f"compile({self.name})", *[flat[i] for _, i in entry.reached])
        return value, aux

    def backward(self, *args, **kwargs) -> Tensor:
        """``fn(*args, **kwargs).backward()``, returning the loss (detached): its gradients are
        accumulated into ``.grad`` of every tensor it is differentiated with respect to (the
        parameters of the module arguments, tensor arguments that require grad) as that
        backward would (added to a gradient already there, in place; a tensor the loss does not
        reach keeps its ``.grad``), without an autograd pass: the captured graph's gradients go
        straight into ``.grad`` (on small models the autograd pass around the replay is a
        tenth of the step). The same graph as a call of the loss (one capture serves both).

        Where a backward pass would do more than accumulate (the model holds DDP or FSDP,
        whose gradient synchronization runs in backward hooks; a tensor has gradient hooks; a
        tensor requiring grad is not a leaf, so its gradient flows on), this is the loss's
        call and ``backward()`` through autograd, with the same result. Gradients of the
        implicit 1 only (for a scaled or a non-first-order backward, call the loss and
        ``backward`` yourself).

        Example::

            >>> fast = curvrate_fast.compile(loss_fn)
            >>> for x, y in loader:
            ...     opt.zero_grad(set_to_none=True)
            ...     loss = fast.backward(model, x, y)      # as loss_fn(model, x, y).backward()
            ...     opt.step()
        """
        return self.backward_with_aux(*args, **kwargs)[0]

    def backward_with_aux(self, *args, **kwargs) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """:meth:`backward`, returning (the loss, fn's auxiliary outputs), all detached."""
        flat, layout, key, wrt = self._start_gradient_call("backward", "the loss and backward()",
                                                           "the loss has no gradient to accumulate", args, kwargs)
        if _backward_work(key, [flat[i] for i in wrt]) is not None:
            value, aux = self._call_checked(args, kwargs, flat, layout, key)
            value.backward()
            return value.detach(), aux
        entry = self._cached(key, lambda: self._capture(flat, layout, len(args), sorted(kwargs), wrt))
        entry.calls += 1
        if not entry.reached:
            # as autograd's backward of a loss that depends on no tensor requiring grad
            raise RuntimeError(f"compile({self.name}).backward: the loss does not depend on any tensor that "
                               "requires grad (element 0 of tensors does not require grad and does not have a "
                               "grad_fn)")
        with torch.no_grad():
            outs = entry.runner(*[t.detach() for t in flat])
            n = 1 + entry.n_aux
            for j, i in entry.reached:
                _accumulate_grad(flat[i], outs[n + j])
        return outs[0], tuple(outs[1:n])

    def _cudagraphs(self) -> bool:
        """Whether the graph is to be replayed as a CUDA graph (dynamo's ``cudagraphs`` backend;
        inductor's options or its global config)."""
        if self.backend == "cudagraphs":
            return True
        if self.backend != "inductor":
            return False
        if "triton.cudagraphs" in self.options:
            return bool(self.options["triton.cudagraphs"])
        from torch._inductor import config
        return bool(config.triton.cudagraphs)

    def _cached(self, key: tuple, capture: Callable[[], _Entry]) -> _Entry:
        """The entry of ``key``, captured (and cached, evicting the least recently used) when
        missing. Recency is a counter in the entry: one lookup (one hash of the key) per call. The
        counter is advanced without the lock (threads calling one loss at once may stamp an entry
        a little early or late: only which graph is evicted first can differ); inserting and
        evicting hold it."""
        self._clock += 1
        entry = self._cache.get(key)
        last, self._last_key = self._last_key, key
        if entry is not None:
            entry.used = self._clock
            return entry
        change, by_value = _describe_change(last, key) if last is not None else ("", False)
        entry = capture()
        entry.used = self._clock
        self._value_recaptures = self._value_recaptures + 1 if by_value else 0
        if self._value_recaptures == 3:
            # a number that changes every step (an annealed weight, a temperature) passed as a
            # Python value: each value is a capture, with inductor a compile of seconds
            warnings.warn(f"curvrate_fast.compile({self.name}): three captures in a row, each for a new value of a "
                          f"non-tensor argument ({change}); every value is a graph of its own. Pass a value that "
                          "changes during training as a tensor (a graph input), e.g. torch.tensor(v).",
                          RuntimeWarning, stacklevel=4)
        with self._lock:
            self._cache[key] = entry
            while len(self._cache) > self.cache_size:
                oldest = min(self._cache, key=lambda k: self._cache[k].used)
                del self._cache[oldest]
                if not self._warned_evict:
                    self._warned_evict = True
                    why = f" The latest new one differed from the call before in {change}." if change else ""
                    warnings.warn(f"curvrate_fast.compile({self.name}): more than {self.cache_size} "
                                  "configurations (shapes, modes, arguments) seen; the oldest graph "
                                  f"was dropped and will be captured again when it comes back.{why} "
                                  "Raise cache_size, or keep shapes fixed (e.g. drop_last=True).",
                                  RuntimeWarning, stacklevel=4)
        return entry

    # -- a captured training step ----------------------------------------------------------
    def train_step(self, optimizer: torch.optim.Optimizer, *args, **kwargs) -> Tensor:
        """One training step, as ``optimizer.zero_grad(); fn(*args).backward(); optimizer.step()``:
        the loss, its gradients and the optimizer's update recorded as **one** captured graph per
        configuration (``curvrate_fast.optim_update``: Adam, AdamW, SGD, by exact class). Returns
        the loss, detached.

        Afterwards every tensor the loss is differentiated with respect to (the parameters of the
        module arguments, tensor arguments that require grad) holds its gradient in ``.grad``, as
        after ``backward()`` (every parameter of the optimizer starts without one, as after
        ``zero_grad()``; a tensor outside the optimizer accumulates, as in eager autograd); the
        optimizer's parameters among them are updated and its state
        advanced exactly as its own ``step()`` would (to the rounding of the parameter dtype). Its
        learning rates are read at every call (schedulers work; a tensor learning rate is used
        in float64, where PyTorch's step computes with it in its own dtype: for float64
        parameters and a float32 lr tensor the two differ at float32 rounding of the step,
        measured 5e-10 after four Adam steps at lr 1e-2); its other hyperparameters are
        guarded (a change captures again). The optimizer's very first step (no state yet) runs
        eagerly through its own ``step()``, which makes the state; the captured graph follows.
        No gradient clipping, scaling or hooks run between backward and update: for those, call
        the loss, ``backward()`` and ``step()`` yourself (models holding DDP or FSDP modules,
        whose gradient synchronization runs in backward hooks, and tensors with gradient hooks
        are refused). With ``options={"triton.cudagraphs": True}`` the returned loss and the
        ``.grad`` tensors live in the CUDA graph's memory and are overwritten by the next call:
        read or copy them before it.

        Example::

            >>> fast = curvrate_fast.compile(loss_fn)
            >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            >>> for x, y in loader:
            ...     loss = fast.train_step(opt, model, x, y)
        """
        return self.train_step_with_aux(optimizer, *args, **kwargs)[0]

    def train_step_with_aux(self, optimizer: torch.optim.Optimizer, *args, **kwargs
                      ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """:meth:`train_step`, returning (the loss, fn's auxiliary outputs), all detached."""
        flat, layout, key, wrt = self._start_gradient_call("train_step", "the loss, backward() and optimizer.step()",
                                                           "a training step needs gradients", args, kwargs)
        wrt_tensors = [flat[i] for i in wrt]
        _refuse_backward_work(self.name, key, wrt_tensors)
        sp = step_plan(optimizer, wrt_tensors)
        rule, groups, owned, names, plan = sp.rule, sp.groups, sp.owned, sp.names, sp.positions
        if not owned:
            raise CaptureError(f"compile({self.name}).train_step: the optimizer holds none of the tensors the loss is "
                               "differentiated with respect to (the parameters of its module arguments that "
                               "require grad)")
        # optimizer.zero_grad(set_to_none=True), as the eager step starts: every parameter the
        # optimizer holds loses its gradient, also one the loss does not reach (a stale gradient
        # there was applied by the eager first step below, and kept afterwards); a tensor the loss
        # reaches that the optimizer does not hold keeps its gradient, and the new one adds to it
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        pg = optimizer.param_groups
        states: List[Tensor] = []
        ready = True
        for (_, p), ns in zip(owned, names):
            st = optimizer.state.get(p) if ns else None
            for n in ns:
                t = st.get(n) if st else None
                if not isinstance(t, Tensor):
                    ready = False
                    break
                states.append(t)
            if not ready:
                break
        if not ready:
            # PyTorch's own first step makes the optimizer's state (the loss through the eager
            # engine: no graph is captured for this one call); later steps are captured
            value, aux = _split_output(self.fn(*args, **kwargs), self.name)
            value.backward()
            optimizer.step()
            return value.detach(), tuple(a.detach() for a in aux)
        lrs = [lr_tensor(pg[gi]) for gi in groups]
        skey = key + (("step", type(optimizer), sp.constants, plan, names, tuple(map(_meta, states))),)

        def capture() -> _Entry:
            hyper = [dict(pg[gi]) for gi in groups]

            def update(params: List[Tensor], grads: List[Optional[Tensor]], extra: List[Tensor]):
                lr_in, st_in = extra[:len(groups)], extra[len(groups):]
                new_p: List[Tensor] = []
                new_s: List[Tensor] = []
                at = 0
                for (k, positions), ns in zip(plan, names):
                    st = list(st_in[at:at + len(ns)])
                    at += len(ns)
                    gs = [grads[j] for j in positions if grads[j] is not None]
                    p = params[positions[0]]
                    if not gs:          # the loss does not reach it: PyTorch skips a None grad
                        new_p.append(p)
                        new_s.extend(st)
                        continue
                    g = gs[0]
                    for more in gs[1:]:  # a tied parameter: its uses' gradients summed
                        g = g + more
                    p, st = rule.update(p, g, st, hyper[k], lr_in[k])
                    new_p.append(p)
                    new_s.extend(st)
                return new_p + new_s

            extra = lrs + states
            # the graph writes the update into the parameters and the state (no output buffers for
            # them, no copy after the call); not where one of them shares memory with another
            # input (tied weights, views of one buffer), nor where inductor is to replay a CUDA
            # graph (it skips CUDA graphs for a graph that writes into its non-static inputs)
            written = ([wrt[positions[0]] for _, positions in plan]
                       + [len(flat) + len(groups) + j for j in range(len(states))])
            if self._cudagraphs() or _shares_memory(written, flat + extra):
                written = []
            return self._capture(flat, layout, len(args), sorted(kwargs), wrt, update, extra, written)

        entry = self._cached(skey, capture)
        entry.calls += 1
        with torch.no_grad():
            outs = list(entry.runner(*[t.detach() for t in flat], *lrs, *states))
            n = 1 + entry.n_aux
            grads = outs[n:n + len(wrt)]
            if not entry.writes:
                torch._foreach_copy_([p for _, p in owned] + states, outs[n + len(wrt):])
        mark_stepped(optimizer)
        for j, i in entry.reached:
            # onto None, a tied parameter's earlier use, or a gradient kept above
            _accumulate_grad(flat[i], grads[j])
        return outs[0], tuple(outs[1:n])

    # what the custom op of the dynamo path returns: the loss, the aux outputs and the gradients of
    # the tensors marked in ``mask`` (their requires_grad when dynamo traced the step: at run time
    # the op sees detached tensors)
    def _op_outputs(self, args, kwargs, mask: Sequence[bool]) -> List[Tensor]:
        flat, layout, key = self._checked_flatten(args, kwargs)
        key = key + (("mask", tuple(mask)),)

        def capture() -> _Entry:
            with _autograd_on(), torch.enable_grad():
                return self._capture(flat, layout, len(args), sorted(kwargs),
                                     [i for i, m in enumerate(mask) if m])
        entry = self._cached(key, capture)
        entry.calls += 1
        if len(entry.reached) < len(entry.wrt) and not entry.warned:
            # the op's gradients are fixed when the user's step is traced, before this capture
            # could tell which tensors the loss reaches: an unreached one gets zeros, not None
            entry.warned = True
            warnings.warn(f"compile({self.name}) inside torch.compile: {len(entry.wrt) - len(entry.reached)} "
                          "tensor(s) that require grad (e.g. parameters of an unused submodule) do not reach the "
                          "loss; they get a zero gradient instead of None, so an optimizer with momentum or "
                          "weight decay still moves them. Freeze them (requires_grad_(False)) or leave them out "
                          "of the optimizer.", RuntimeWarning, stacklevel=2)
        with torch.no_grad():
            return list(entry.runner(*[t.detach() for t in flat]))


@functools.lru_cache(maxsize=1)
def _distributed_classes() -> tuple:
    out = [nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        out += [FSDPModule, FullyShardedDataParallel]
    except ImportError:  # a build without distributed
        pass
    return tuple(out)


def _fsdp_classes() -> tuple:
    """The FSDP module classes among :func:`_distributed_classes` (all but DDP)."""
    return tuple(c for c in _distributed_classes() if c is not nn.parallel.DistributedDataParallel)


_SYNCING: Dict[tuple, Optional[type]] = {}   # guard key → the DDP/FSDP class it holds, or None


def _backward_work(key: tuple, wrt: Sequence[Tensor]) -> Optional[str]:
    """What a backward pass would run besides accumulating the gradients into ``.grad``, which a
    captured step or a captured backward (gradients written directly) would skip: DDP's and
    FSDP's gradient synchronization (their modules' classes, read off the guard key once per
    key), gradient hooks on a tensor, a tensor that is not a leaf (its gradient flows on to what
    it was computed from). None where there is nothing."""
    if key not in _SYNCING:     # the submodule classes are part of the key: read once per key
        dist = _distributed_classes()
        found = None
        for item in key:
            if item[0] != "M":
                continue
            flags = item[1]     # (prefix, submodule key, ...): a submodule key starts with its class
            found = next((k[0] for k in flags[1::2] if issubclass(k[0], dist)), None)
            if found is not None:
                break
        if len(_SYNCING) > 256:
            _SYNCING.clear()
        _SYNCING[key] = found
    cls = _SYNCING[key]
    if cls is not None:
        return f"the model holds a {cls.__name__}, which synchronizes gradients in backward hooks"
    for t in wrt:
        if t._backward_hooks or getattr(t, "_post_accumulate_grad_hooks", None):
            return (f"a tensor of shape {tuple(t.shape)} has gradient hooks (register_hook / "
                    "register_post_accumulate_grad_hook)")
        if t.grad_fn is not None:
            return f"a tensor of shape {tuple(t.shape)} is not a leaf (its gradient flows on through autograd)"
    return None


def _refuse_backward_work(name: str, key: tuple, wrt: Sequence[Tensor]) -> None:
    """A captured training step runs no backward pass: refuse what relies on one."""
    why = _backward_work(key, wrt)
    if why is not None:
        raise CaptureError(f"compile({name}).train_step runs no backward pass, and here one has work besides "
                           f"the gradients: {why}. Call the loss, backward() and optimizer.step() instead.")


def _shares_memory(chosen: Sequence[int], tensors: Sequence[Tensor]) -> bool:
    """Whether one of ``tensors[i]``, i in ``chosen``, shares its storage with another of
    ``tensors`` (the same tensor twice, views of one buffer)."""
    count = collections.Counter(t.untyped_storage().data_ptr() for t in tensors if t.numel())
    return any(tensors[i].numel() and count[tensors[i].untyped_storage().data_ptr()] > 1 for i in chosen)


def _dense(t: Tensor) -> bool:
    """Whether t's elements fill its memory without gaps or overlaps, in some order of its
    dimensions (autograd's "non-overlapping and dense"): its strides, sorted, are the running
    products of the matching sizes (dimensions of size 1 aside)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _accumulate_grad(t: Tensor, g: Tensor) -> None:
    """``t.grad += g`` as autograd's AccumulateGrad does it outside grad mode: a tensor without a
    gradient takes ``g`` itself (a fresh output of the graph: nothing else holds it), laid out
    like ``t`` where their strides differ (autograd's layout contract), and an existing gradient
    is added to in place (so a ``.grad`` that is a view, e.g. into a communication bucket, stays
    one)."""
    prev = t.grad
    if prev is None:
        if g.stride() != t.stride():
            g = g.new_empty_strided(t.shape, t.stride()).copy_(g) if _dense(t) else g.contiguous()
        t.grad = g
    else:
        prev.add_(g)


def _autograd_on():
    """A custom op's implementation runs with the autograd dispatch keys excluded (it is one node
    of the outer graph); the capture inside it records a backward, so it turns them back on."""
    K = torch._C.DispatchKey
    excl = torch._C._dispatch_tls_local_exclude_set()
    for k in ("AutogradCPU", "AutogradCUDA", "AutogradXPU", "AutogradMPS", "AutogradOther",
              "AutogradPrivateUse1", "ADInplaceOrView"):
        if hasattr(K, k):
            excl = excl.remove(getattr(K, k))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excl)


def _has_tensor(tree) -> bool:
    if type(tree) is tuple and all(type(v) in _PRIMITIVE_TYPES for v in tree):
        return False          # the common case (a tuple of orders, sizes): no pytree walk
    from torch.utils._pytree import tree_flatten
    return any(isinstance(v, (Tensor, nn.Module)) for v in tree_flatten(tree)[0])


def _split_output(out, name: str):
    if isinstance(out, Tensor):
        value, aux = out, ()
    elif isinstance(out, tuple) and out and all(isinstance(o, Tensor) for o in out):
        value, aux = out[0], out[1:]
    else:
        raise CaptureError(f"compile({name}): the function must return one scalar tensor (the loss), or a "
                           f"tuple (loss, *tensors); got {type(out).__name__}")
    if value.dim() != 0:
        raise CaptureError(f"compile({name}): the loss must be a scalar (0-d) tensor, got shape "
                           f"{tuple(value.shape)}; reduce it (e.g. .mean()) inside the function")
    if not value.is_floating_point():
        raise CaptureError(f"compile({name}): the loss must be floating point, got {value.dtype}")
    from .jets.tensor import is_jet
    if is_jet(value):
        raise CaptureError(f"compile({name}): the function returned a jet; return a plain tensor "
                           "(e.g. the coefficients via curvrate_fast.jet)")
    return value, aux


class _capture_settings:
    """The engine's settings while tracing: on CPU the pure-PyTorch reference rules (inductor
    fuses their elementwise recurrences; the C++ kernels are opaque to it), on CUDA the Triton
    kernels as torch.library ops, unless a backend was forced."""

    def __init__(self, flat: Sequence[Tensor]) -> None:
        self.flat = flat
        self.saved = None

    def __enter__(self):
        self.saved = settings.backend
        if settings.backend in ("auto", "cpp") and not any(t.is_cuda for t in self.flat):
            settings.backend = "reference"
        # a torch.compile'd module (OptimizedModule) called while make_fx traces: dynamo steps
        # aside and the original module runs into the trace (the captured graph is then compiled
        # as a whole), instead of dynamo's "FX to symbolically trace a dynamo-optimized function"
        self.dynamo = None
        try:
            import torch._dynamo.config as dynamo_config
            self.dynamo = dynamo_config.patch(error_on_nested_fx_trace=False)
            self.dynamo.__enter__()
        except (ImportError, AttributeError):   # a torch without that option: its own error stands
            self.dynamo = None
        return self

    def __exit__(self, *exc):
        settings.backend = self.saved
        if self.dynamo is not None:
            self.dynamo.__exit__(*exc)
        return False


_KEY_PARTS = {"kw": "the keyword argument names", "grad": "grad mode", "engine": "the engine's backend setting",
              "autocast": "autocast's state", "global hooks": "the global module hooks",
              "global state": "a process setting (default dtype, deterministic algorithms, oneDNN, matmul "
                              "precision)",
              "step": "the optimizer (its class, hyperparameters, param groups or state layout)",
              "mask": "which tensors require grad"}
_META_FIELDS = ("shape", "strides", "dtype", "device", "requires_grad")


def _describe_change(old: tuple, new: tuple) -> Tuple[str, bool]:
    """What differs between two guard keys, in words (for warnings about captures), and whether it
    is only the value of a non-tensor argument."""
    if len(old) != len(new):
        return "the number of arguments", False
    arg = 0
    for a, b in zip(old, new):
        kind = a[0]
        if kind in ("M", "T", "C"):
            arg += 1
        if a == b:
            continue
        if kind == "T" and b[0] == "T":
            fields = [f for f, x, y in zip(_META_FIELDS, a[1], b[1]) if x != y]
            return f"argument {arg} (a tensor): its {', '.join(fields)}", False
        if kind == "M" and b[0] == "M":
            return (f"argument {arg} (a module): a submodule's class, train/eval mode or attributes, or a "
                    "parameter's or buffer's shape, dtype, device, layout or requires_grad"), False
        if kind == "C" and b[0] == "C":
            def shown(k):
                return repr(k[1]) if isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], type) else "..."
            return f"argument {arg}: its value ({shown(a[1])} then {shown(b[1])})", True
        return _KEY_PARTS.get(kind, "the arguments' kinds"), False
    return "", False


def _generators_of(fn: Callable, layout) -> Dict[int, torch.Generator]:
    """The ``torch.Generator`` objects a traced call may draw from, found where a function keeps
    them: its arguments (and containers among them), the attributes of the module arguments'
    submodules, fn's closure, defaults and module globals. ``fork_rng`` guards only the default
    generators; these the trace would advance, so that every replay drew one step late (measured:
    a noise draw from a generator argument gave eager's second, third, ... losses)."""
    found: Dict[int, torch.Generator] = {}

    def add(v, depth: int = 0) -> None:
        if isinstance(v, torch.Generator):
            found[id(v)] = v
        elif depth < 2 and isinstance(v, (list, tuple)):
            for w in v:
                add(w, depth + 1)
        elif depth < 2 and isinstance(v, dict):
            for w in v.values():
                add(w, depth + 1)

    for item in layout:
        if item[0] == "C":
            add(item[1])
        elif item[0] == "M":
            for sub in item[1].modules():
                for v in vars(sub).values():
                    add(v)
    f = getattr(fn, "func", fn)            # a partial: its function, arguments and keywords
    if f is not fn:
        add(fn.args)
        add(fn.keywords)
    for v in _closure_values(f):
        add(v)
    add(getattr(f, "__defaults__", None))
    add(getattr(f, "__kwdefaults__", None))
    for v in list(getattr(f, "__globals__", {}).values()):
        if isinstance(v, torch.Generator):
            add(v)
    return found


class _states_kept:
    """Restore the states of these generators on exit: the trace must not consume their numbers
    (the first replay draws what an eager call would have drawn)."""

    def __init__(self, generators: Dict[int, torch.Generator]) -> None:
        self.generators = generators

    def __enter__(self) -> None:
        self.states = [(g, g.get_state()) for g in self.generators.values()]

    def __exit__(self, *exc) -> None:
        for g, state in self.states:
            g.set_state(state)


def _same_generator(a: torch.Generator, b: torch.Generator) -> bool:
    """Whether two generator objects share one state (the graph holds its own Python object for
    a generator the function drew from): draw from ``a`` and see whether ``b`` moved; both
    states are restored."""
    if a is b:
        return True
    if a.device != b.device:
        return False
    sa, sb = a.get_state(), b.get_state()
    try:
        torch.empty(1, device=a.device).uniform_(generator=a)
        return not torch.equal(b.get_state(), sb)
    finally:
        a.set_state(sa)
        b.set_state(sb)


# the functions that reseed the default generators: inside a captured function they run once,
# while it is recorded, and never on a replay, whose draws continue the running stream instead.
# (set_rng_state is left alone: torch.random.fork_rng restores with it, inside the engine too.)
_RESEEDING = (("torch", "manual_seed"), ("torch", "seed"), ("torch.random", "manual_seed"),
              ("torch.random", "seed"), ("torch.cuda", "manual_seed"), ("torch.cuda", "manual_seed_all"))


@contextlib.contextmanager
def _reseeding_refused(name: str) -> Iterator[None]:
    """While a function is recorded: a call that reseeds the global random state (torch.manual_seed,
    torch.seed, their CUDA forms) raises a CaptureError naming it (measured before: a function that reseeded
    drew the same numbers at every eager call and the running stream's at every replay)."""
    saved = []
    recording = threading.get_ident()   # another thread seeding meanwhile is not the function's doing

    def refuse(qualname: str, original: Callable):
        def call(*args, **kwargs):
            if threading.get_ident() != recording:
                return original(*args, **kwargs)
            raise CaptureError(f"compile({name}): the function calls {qualname}, which sets the global random "
                               "state; a captured graph runs it once, while it is recorded, and its replays "
                               "draw from the running stream instead. Seed outside the function (before the "
                               "call), or pass a torch.Generator argument.")
        return call
    for mod_name, attr in _RESEEDING:
        mod = importlib.import_module(mod_name)
        if hasattr(mod, attr):
            original = getattr(mod, attr)
            saved.append((mod, attr, original))
            setattr(mod, attr, refuse(f"{mod_name}.{attr}", original))
    try:
        yield
    finally:
        for mod, attr, fn in reversed(saved):
            setattr(mod, attr, fn)


def _refuse_unseen_generators(gm: torch.fx.GraphModule, seen: Dict[int, torch.Generator], name: str) -> None:
    """A generator the graph draws from (a constant of the graph) that :func:`_generators_of`
    did not find was advanced by the trace: refuse rather than replay one draw late."""
    for attr, v in vars(gm).items():
        if isinstance(v, torch.Generator) and not any(_same_generator(v, g) for g in seen.values()):
            raise CaptureError(f"compile({name}): the function draws random numbers from a torch.Generator that "
                               f"is not an argument, a module attribute, or in its closure or globals ({attr} "
                               "of the graph); the capture cannot keep the recording from consuming its numbers. "
                               "Pass the generator as an argument.")


def _verify_graph(gm: torch.fx.GraphModule, layout, name: str) -> None:
    """Refuse a graph that would replay a stale value."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            target = node.target
            base = getattr(getattr(target, "overloadpacket", None), "__name__", None) or \
                getattr(target, "__name__", "")
            if base in _VALUE_READS:
                raise CaptureError(_value_read_message(name, target))
    # constants of the graph: a parameter (requires grad) reached other than through a module
    # argument, or a plain tensor attribute of a module argument, would be frozen at its value now
    attrs: Dict[int, str] = {}
    for item in layout:
        if item[0] != "M":
            continue
        m = item[1]
        for mname, sub in m.named_modules():
            for aname, v in vars(sub).items():
                if aname in ("_parameters", "_buffers", "_modules"):
                    continue
                where = f"{mname + '.' if mname else ''}{aname}"
                held = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
                for t in held:   # a tensor attribute, or one held in a list, tuple or dict attribute
                    if isinstance(t, Tensor):
                        attrs[t.untyped_storage().data_ptr()] = where
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        c = getattr(gm, node.target, None)
        if not isinstance(c, Tensor):
            continue
        if c.requires_grad or isinstance(c, nn.Parameter):
            raise CaptureError(
                f"compile({name}): a parameter of shape {tuple(c.shape)} entered the graph as a constant: the "
                "function reaches it other than through a module argument (e.g. a model captured in a "
                "closure or a global). Pass the model as an argument so that its parameters are graph inputs.")
        hit = attrs.get(c.untyped_storage().data_ptr()) if c.numel() else None
        if hit is not None:
            raise CaptureError(
                f"compile({name}): the plain tensor attribute '{hit}' of a module entered the graph as a "
                "constant and would not follow later changes; register it as a buffer "
                "(module.register_buffer) so that it is a graph input.")


def _input_names(layout, n_flat: int, n_extra: int) -> List[Tuple[str, bool]]:
    """(what each graph input is, in words; whether it is a module buffer), in graph input order."""
    out: List[Tuple[str, bool]] = []
    arg = 0
    for item in layout:
        if item[0] == "M":
            _, m, pn, bn = item
            cls = type(m).__name__
            out.extend((f"parameter '{n}' of argument {arg} ({cls})", False) for n in pn)
            out.extend((f"buffer '{n}' of argument {arg} ({cls})", True) for n in bn)
        elif item[0] == "T":
            out.append((f"tensor argument {arg}", False))
        arg += 1
    out.extend(("an optimizer state or learning rate", False) for _ in range(n_extra))
    assert len(out) == n_flat + n_extra
    return out


def _refuse_reassigned(name: str, m: nn.Module, table: Dict[str, Tensor]) -> None:
    """Refuse a forward that assigns a new tensor to a parameter or buffer (``self.ema = 0.9 *
    self.ema + …``): in eager the module keeps the new tensor; a graph would compute it and drop
    it, so the buffer would never change (measured before this check: an EMA buffer stayed 0)."""
    for full, t in table.items():
        prefix, _, leaf = full.rpartition(".")
        sub = m.get_submodule(prefix) if prefix else m
        now = sub._buffers.get(leaf) if leaf in sub._buffers else sub._parameters.get(leaf)
        if now is not t:
            raise CaptureError(f"compile({name}): while it runs, the function assigns a new tensor to '{full}' of "
                               f"its {type(m).__name__} argument (e.g. self.{leaf} = 0.9 * self.{leaf} + ...); a "
                               "graph would compute it and drop it, so the module would keep the old one. Update "
                               f"it in place under torch.no_grad() (self.{leaf}.mul_(0.9).add_(...)), which a "
                               "graph replays, or call the loss without compile.")


def _value_read_message(name: str, what) -> str:
    return (f"compile({name}): while capturing, a tensor value was read into Python ({what}, e.g. by "
            ".item(), bool(t), int(t) or a data-dependent shape): a graph would replay the branch taken "
            "for that one value. Keep such reads out of the function (the library's own checks run "
            "before the graph), or call it eagerly.")


def _check_finite_args(args, kwargs) -> None:
    if not settings.check_finite:
        return
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor) and a.is_floating_point():
            require_finite(a, f"a tensor argument of shape {tuple(a.shape)}")


# =============================================================================================
# Inside a user's torch.compile: one custom op
# =============================================================================================

_HANDLES: Dict[int, tuple] = {}
_HANDLE_KEYS: Dict[tuple, int] = {}
_HANDLE_COUNTER = itertools.count()


class _WeakModule:
    """A module argument inside the handle table, held weakly: the table lives for the process,
    and a strong reference would keep every model ever stepped under torch.compile alive (a
    sweep that builds a model per run would never free one)."""

    __slots__ = ("ref",)

    def __init__(self, module: nn.Module) -> None:
        self.ref = weakref.ref(module)

    def get(self) -> nn.Module:
        m = self.ref()
        if m is None:
            raise RuntimeError("curvrate::captured_loss: the module of this compiled step was freed; "
                               "torch.compile should have recompiled the step for the new one")
        return m


def _handle_alive(h: int, loss: "CompiledLoss", static: tuple) -> bool:
    """Whether handle h still names these very objects (not others that reuse their addresses)."""
    entry = _HANDLES.get(h)
    if entry is None or entry[0]() is not loss:
        return False
    return all((s.ref() is t) if isinstance(s, _WeakModule) else True for s, t in zip(entry[1], static))


@torch._dynamo.assume_constant_result
def _handle_for(loss: "CompiledLoss", kw_names: tuple, mask: tuple, *static) -> int:
    """An int naming (compiled loss, the non-tensor arguments, which tensors need gradients) for
    the custom op: dynamo calls this once while tracing and keeps the int as a constant (the
    arguments come one by one: dynamo converts a module argument, not a tuple holding one). The
    loss and the module arguments are held weakly (entries of freed objects are dropped), the
    other arguments as their guard keys hold them."""
    key = (id(loss),) + tuple(("module", id(s)) if isinstance(s, nn.Module) else _Const(s).key
                              for s in static) + (kw_names, mask)
    h = _HANDLE_KEYS.get(key)
    if h is None or not _handle_alive(h, loss, static):
        for dead in [k for k, (ref, held, _, _) in _HANDLES.items()
                     if ref() is None or any(isinstance(x, _WeakModule) and x.ref() is None for x in held)]:
            del _HANDLES[dead]
        for k in [k for k, v in _HANDLE_KEYS.items() if v not in _HANDLES]:
            del _HANDLE_KEYS[k]
        h = next(_HANDLE_COUNTER)
        held = tuple(_WeakModule(s) if isinstance(s, nn.Module) else s for s in static)
        _HANDLES[h] = (weakref.ref(loss), held, kw_names, mask)
        _HANDLE_KEYS[key] = h
    return h


def _tensors_of(items: tuple) -> List[Tensor]:
    out: List[Tensor] = []
    for a in items:
        if isinstance(a, nn.Module):
            out.extend(p for _, p in a.named_parameters(remove_duplicate=False))
            out.extend(b for _, b in a.named_buffers(remove_duplicate=False))
        elif isinstance(a, Tensor):
            out.append(a)
    return out


class _TensorSlot:
    """Marks where a tensor argument goes among the non-tensor arguments of a handle."""

    def __repr__(self) -> str:
        return "<tensor>"


_SLOT = _TensorSlot()


def _static_of(items: tuple) -> tuple:
    return tuple(_SLOT if isinstance(a, Tensor) else a for a in items)


def _rebuild_from_handle(h: int, tensors: Sequence[Tensor]):
    loss_ref, held, kw_names, mask = _HANDLES[h]
    loss = loss_ref()
    if loss is None:
        raise RuntimeError("curvrate::captured_loss: the compiled loss of this step was freed")
    static = [s.get() if isinstance(s, _WeakModule) else s for s in held]
    items, i = [], 0
    for s in static:
        if s is _SLOT:
            items.append(tensors[i])
            i += 1
        else:
            items.append(s)
            if isinstance(s, nn.Module):
                i += len(list(s.named_parameters(remove_duplicate=False))) + \
                    len(list(s.named_buffers(remove_duplicate=False)))
    n_args = len(static) - len(kw_names)
    return loss, tuple(items[:n_args]), dict(zip(kw_names, items[n_args:])), mask


@torch.library.custom_op("curvrate::captured_loss", mutates_args=())
def _captured_loss_op(handle: int, tensors: List[Tensor]) -> List[Tensor]:
    loss, args, kwargs, mask = _rebuild_from_handle(handle, tensors)
    # the module arguments are the live modules: their parameters must be the tensors passed in
    expected = _tensors_of(tuple(args) + tuple(kwargs.values()))
    if len(expected) != len(tensors) or any(
            e.shape != t.shape or e.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
            for e, t in zip(expected, tensors) if e is not t):
        raise CaptureError("curvrate::captured_loss: the parameters passed by the compiled graph are not the "
                           "module's current ones (was the model replaced after torch.compile traced the "
                           "step?); call torch._dynamo.reset() or compile the step again")
    return loss._op_outputs(args, kwargs, mask)


@_captured_loss_op.register_fake
def _(handle: int, tensors: List[Tensor]) -> List[Tensor]:
    loss, args, kwargs, mask = _rebuild_from_handle(handle, tensors)
    floats = [t for t in tensors if t.is_floating_point()]
    dtype = floats[-1].dtype if floats else torch.get_default_dtype()
    value = tensors[0].new_empty((), dtype=dtype)
    aux = []
    if loss.aux_like is not None:
        aux = [tensors[0].new_empty(shape, dtype=dt) for shape, dt in loss.aux_like(*args, **kwargs)]
    grads = [torch.empty_like(t) for t, m in zip(tensors, mask) if m]
    return [value, *aux, *grads]


def _setup_context(ctx, inputs, output):
    handle, tensors = inputs
    mask = _HANDLES[handle][3]
    n_grads = sum(mask)
    ctx.mask = mask
    ctx.save_for_backward(*output[len(output) - n_grads:])


def _backward(ctx, grads_out):
    g_value = grads_out[0]
    saved = iter(ctx.saved_tensors)
    return None, [next(saved) * g_value if m else None for m in ctx.mask]


_captured_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _dynamo_call(loss: "CompiledLoss", args: tuple, kwargs: dict, with_aux: bool = False):
    kw_names = tuple(sorted(kwargs))
    items = tuple(args) + tuple(kwargs[k] for k in kw_names)
    tensors = _tensors_of(items)
    grad_on = torch.is_grad_enabled()
    mask = tuple(bool(grad_on and t.requires_grad) for t in tensors)
    h = _handle_for(loss, kw_names, mask, *_static_of(items))
    outs = torch.ops.curvrate.captured_loss(h, tensors)
    if with_aux:
        n_aux = len(outs) - 1 - sum(mask)
        return outs[0], tuple(o.detach() for o in outs[1:1 + n_aux])
    return outs[0]


def compile(fn: Callable[..., Any] = None, *, backend: Optional[str] = "inductor",
            options: Optional[Dict[str, Any]] = None, cache_size: int = 8,
            cpu_gemm: str = "auto") -> Union[CompiledLoss, Callable]:
    """Capture a scalar loss computed with jets as one graph per configuration, forward and
    backward, and replay it compiled (docs/design.md §6; the module docstring of
    ``curvrate_fast.capture`` lists what is a graph input, what is guarded and what is refused).

    ``fn(*args, **kwargs)`` must return a 0-d tensor. ``nn.Module`` arguments contribute their
    parameters and buffers as graph inputs, tensor arguments are graph inputs, other arguments
    are guarded by value. The result is differentiable with respect to every parameter and
    tensor argument that requires grad, to first order (``loss.backward()``, optimizers); a
    backward with ``create_graph=True`` (gradient penalties, Hessian-vector products) raises a
    :class:`CaptureError`: use the eager engine for those.

    - ``backend="inductor"`` (default): the graph compiled by ``torch.compile``'s inductor
      (fuses the Taylor recurrences; first call 3–20 s on CPU, cached on disk by inductor);
      ``"eager"`` or ``None``: the recorded ATen graph replayed as it is (no compile time; the
      engine's per-op Python is gone); any other ``torch.compile`` backend name.
    - ``options``: inductor options (e.g. ``{"triton.cudagraphs": True}`` on CUDA to replay the
      graph as a CUDA graph).
    - ``cache_size``: configurations kept (each shape, dtype, train/eval mode... is one graph).
    - ``cpu_gemm``: the float32 CPU GEMMs of the graph (``curvrate_fast.cpu_gemm``): ``"auto"``
      (default) measures, once per shape, whether oneDNN's GEMM or the project's AVX-512 kernel
      (part of the C++ kernels, once built) beats ``torch.mm`` on this machine and uses the
      fastest (about 2× on AMD CPUs, where MKL runs its AVX2 path); ``"aten"`` keeps ``torch.mm``;
      ``"onednn"`` and ``"avx512"`` always use that one. Other dtypes and devices are untouched.

    Value checks (NaN/Inf in floating tensor arguments, unless ``check_finite`` is off) run
    before the graph, outside it. Random ops inside ``fn`` draw afresh at every call; draw the
    random inputs of your own (directions) outside ``fn`` and pass them in.

    Example::

        >>> def penalty(model, x, y, u):
        ...     return curvrate_fast.loss_directional_derivatives(model, x, y, u, 4).abs().mean()
        >>> fast = curvrate_fast.compile(penalty)
        >>> fast(model, x, y, u).backward()          # first call captures and compiles
    """
    def wrap(f):
        return CompiledLoss(f, backend=backend, options=options, cache_size=cache_size, cpu_gemm=cpu_gemm)
    if fn is None:
        return wrap
    return wrap(fn)


def backend_of(compile_arg) -> Optional[str]:
    """The capture backend meant by a ``compile=`` argument of the CRR API: False/None → None (eager
    engine), True → "inductor", a string → that backend."""
    if compile_arg is None or compile_arg is False:
        return None
    if compile_arg is True:
        return "inductor"
    if isinstance(compile_arg, str):
        return compile_arg
    raise TypeError(f"compile must be False, True or a torch.compile backend name, got {compile_arg!r}")

