"""The dispatcher: where every torch function that meets a jet is routed.

In order, an op that meets a ``JetTensor`` is answered by

1. the wrapper itself (sizes, dtype, device: metadata of the primal, the hottest calls);
2. a ``torch.no_grad()`` region entered *inside* the model: the op runs on the primal values and
   its result is a constant along the path, as in the nested-autograd method this library
   replaces (there, such values are detached);
3. a registered Taylor rule (``rules/``), looked up by the callable (a ``torch.ops`` overload also
   by its packet); a functional op called with ``inplace=True`` runs its rule out of place and
   writes the result into its input (:func:`_functional_inplace`), and a result that views an
   argument is linked to it (:func:`_linked`: reads see the base's later writes, writes reach it);
4. a constant result: metadata, comparisons, integer-valued and piecewise-constant results;
5. an in-place op: the out-of-place rule, written back into the jet (through a view into its base);
6. an exact decomposition into ops that have rules: a Python function's own body (torch's
   ``has_torch_function`` guard answered False: ``F.multi_head_attention_forward``, ``torch.norm``);
7. otherwise a :class:`RuleMissingError` that names the op and says how to add a rule.

There is no generic fallback. Nested forward-mode differentiation (``torch.func.jvp`` along t)
would be exact only where PyTorch's forward-mode formulas are themselves differentiable, and for
many ops they are not (``linalg.det``/``solve``/``cholesky``/``eigh``, the native norm kernels and
most of ``torch.special`` give wrong second derivatives or zeros); PyTorch's reference
decompositions write removable singularities as ``where`` on the value (``sinc``), right at the
point and wrong in its derivatives. Every op of PyTorch's operator database has a rule or raises
(docs/opinfo.md), so an op the engine cannot answer exactly raises; it never returns a silent
constant.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

from ..finite import all_finite
from . import multilinear, registry, through
from .registry import op_name, record, settings, tracing
from .tensor import JetError, JetTensor, RuleMissingError, install_dispatcher, primals

__all__ = ["dispatch", "model_call", "random_op", "constant_result", "precision", "direction_scale",
           "unscale_coefficients"]

# Functions whose result does not depend differentiably on the values (metadata, comparisons,
# integer-valued or piecewise-constant results): evaluated on the primal; the result is a constant.
_CONSTANT_RESULT_NAMES = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "__len__", "is_floating_point", "is_complex",
    "is_contiguous", "stride", "element_size", "get_device", "storage_offset", "is_signed",
    "argmax", "argmin", "argsort", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__",
    "__le__", "__gt__", "__ge__", "isnan", "isinf", "isfinite", "isposinf", "isneginf", "isreal",
    "sign", "signbit", "floor", "ceil", "round", "trunc", "fix", "any", "all", "nonzero",
    "nonzero_static", "argwhere", "item", "tolist", "__bool__", "__int__", "__float__",
    "__index__", "count_nonzero", "equal", "allclose", "isclose", "bucketize", "searchsorted",
    "logical_and", "logical_or", "logical_not", "logical_xor", "__and__", "__or__", "__xor__",
    "__invert__", "bitwise_not", "bitwise_and", "bitwise_or", "bitwise_xor", "floor_divide",
    "__floordiv__", "__rfloordiv__", "is_nonzero", "data_ptr", "is_same_size", "__hash__",
    "is_set_to", "untyped_storage", "dim_order", "_is_view", "is_inference", "is_shared",
    "is_pinned", "__contains__", "histc", "bincount", "isin",
    "heaviside", "is_neg", "is_conj", "result_type", "can_cast", "promote_types",
    "matrix_rank", "linalg_matrix_rank", "__format__", "__dlpack__", "__dlpack_device__",
})
# Conversions that leave torch: the derivatives would be lost silently, so they raise.
_LEAVES_TORCH = frozenset({"numpy", "__array__", "__reduce_ex__", "__deepcopy__", "__setstate__"})
# Property getters (Tensor.shape.__get__ etc.) answered from the primal.
_CONSTANT_GETTERS = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_cpu",
    "is_sparse", "is_quantized", "is_meta", "is_mps", "is_xpu", "names", "is_nested",
    "itemsize", "nbytes", "is_mkldnn",
})
# Autograd metadata, answered from the stacked coefficient tensor, which carries the jet's autograd
# graph (the wrapper itself has requires_grad=False): PyTorch's training machinery reads these on
# a model's outputs (FSDP2 collects the outputs that require grad, DDP skips those without a
# grad_fn, reentrant checkpointing checks requires_grad of its inputs). ``_base`` is None: a jet
# is never an autograd view (in-place ops on jets are the engine's, docs/engine.md).
_AUTOGRAD_GETTERS = {
    # a jet that moves along the path (a stored coefficient beyond the primal) depends on the
    # input as a tensor that requires grad does: code that asks before differentiating (torch.
    # autograd.functional's jacobian/hessian/vjp, which detach inputs that do not require grad)
    # then reaches torch.autograd.grad, which refuses, instead of computing a constant silently
    "requires_grad": lambda c: c.requires_grad or c.shape[0] > 1,
    "grad_fn": lambda c: c.grad_fn,
    "is_leaf": lambda c: c.is_leaf,
    "grad": lambda c: c.grad,
    "output_nr": lambda c: c.output_nr,
    "_version": lambda c: c._version,
    "retains_grad": lambda c: c.retains_grad,
    "_base": lambda c: None,
    # ``t.data`` is answered as ``detach()`` (JetTensor.detached): the value without its autograd
    # history, a constant along the path, as nested autograd sees it, following later writes
}

# Metadata the wrapper itself answers correctly (its sizes, dtype and device are those of the
# primal): run without __torch_function__.
_WRAPPER_METADATA = frozenset({
    torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.ndimension,
    torch.Tensor.nelement, torch.Tensor.is_floating_point, torch.Tensor.is_complex,
    torch.Tensor.__len__, torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__, torch.Tensor.ndim.__get__, torch.Tensor.get_device,
    torch.Tensor.is_cuda.__get__,
})


def _moves_without_graph(coeffs: torch.Tensor) -> bool:
    """A jet's stacked coefficients that move along the path (a stored coefficient beyond the
    primal) but carry no autograd graph (the input jet; a pass whose rules record none): such a jet
    answers requires_grad=True (above), so autograd's machinery asks it for what only a tensor
    with a graph has (hooks, a node, a backward node of an identity Function)."""
    return coeffs.shape[0] > 1 and not coeffs.requires_grad


def _register_hook(jet: JetTensor, hook: Callable) -> Any:
    """A hook on a jet is a hook on its stacked coefficient tensor: it runs when the gradient of
    all the jet's coefficients is computed, and receives it, shape (n + 1, *jet.shape) (FSDP2
    registers its pre-backward hook on a module's outputs this way). A jet that moves along the
    path answers requires_grad=True also where its coefficients have no autograd graph (a pass
    without parameters that require grad, the sample-mixing probe): no gradient ever reaches it,
    so the hook is held by a handle and never runs, as it would never run on a tensor that no
    loss reaches."""
    if _moves_without_graph(jet._coeffs):
        return _UnusedHookHandle()
    if not jet._coeffs.requires_grad:
        raise RuntimeError("cannot register a hook on a jet that does not require grad")
    return jet._coeffs.register_hook(hook)


def _asks_for_grad_node(args: Tuple) -> bool:
    """Whether this ``j.view_as(j)`` is ``torch.autograd.graph._get_grad_fn_or_grad_acc`` asking for
    the autograd node of a jet that moves along the path but has no autograd graph (it answers
    requires_grad=True with grad_fn None, as a leaf would). ``register_multi_grad_hook`` asks so for
    module inputs: torch.utils.module_tracker's pre-forward hooks (FlopCounterMode, the memory
    and communication debug modes) register one on the input jet of a pass."""
    if len(args) != 2 or args[0] is not args[1] or not isinstance(args[0], JetTensor):
        return False
    if not _moves_without_graph(args[0]._coeffs):
        return False
    return _running_frame("_get_grad_fn_or_grad_acc", "torch/autograd/graph.py", 3, 4) is not None


def _unreached_node_view(jet: JetTensor) -> torch.Tensor:
    """For :func:`_asks_for_grad_node`: a view of a fresh leaf, whose gradient accumulator is the
    node asked for. No gradient ever reaches it, so a hook on it never runs, as one registered on
    the jet itself (:func:`_register_hook`); a multi-grad hook counts it as not part of the
    backward."""
    with torch.enable_grad():
        leaf = torch.zeros((), dtype=jet.dtype, device=jet.device, requires_grad=True)
        return leaf.view_as(leaf)


class _UnusedHookHandle:
    """The handle of a hook on a jet no gradient reaches (:func:`_register_hook`)."""

    def remove(self) -> None:
        pass


def _retain_grad(jet: JetTensor) -> None:
    if not _moves_without_graph(jet._coeffs):   # a constant jet without a graph raises as torch does
        jet._coeffs.retain_grad()


def _no_backward(jet: JetTensor, *args, **kwargs) -> None:
    raise JetError("backward() on a jet: a jet is a Taylor expansion, not a loss; take a scalar "
                   "function of its coefficients (jet.coeffs), or of the values curvrate_fast's entry "
                   "points return, and call backward() on that")


def _no_autograd_call(*args, **kwargs) -> None:
    raise JetError("torch.autograd.grad or torch.autograd.backward on a jet, inside the model or the loss "
                   "(e.g. a physics-informed loss that differentiates the output with respect to the input): "
                   "a jet is a Taylor expansion, not an autograd graph of the input, and the engine has no "
                   "Taylor rule for a gradient computed inside the function. Take the derivatives of such a "
                   "loss with nested autograd (curvrate_fast.baseline.nested_directional_derivatives), or give the "
                   "gradient in closed form as ordinary ops")


def _no_accumulate_hook(jet: JetTensor, hook: Callable) -> None:
    raise JetError("register_post_accumulate_grad_hook on a jet: a jet is computed, never a leaf")


_AUTOGRAD_METHODS: Dict[Any, Callable] = {
    torch.Tensor.register_hook: _register_hook,
    torch.Tensor.retain_grad: _retain_grad,
    torch.Tensor.backward: _no_backward,
    torch.Tensor.register_post_accumulate_grad_hook: _no_accumulate_hook,
    # plain Python functions that hand a jet to __torch_function__: as a decomposition they would
    # run autograd's engine on the wrappers and fail with a message about requires_grad
    torch.autograd.grad: _no_autograd_call,
    torch.autograd.backward: _no_autograd_call,
}


def _getter_name(func: Any) -> Optional[str]:
    if type(func).__name__ == "method-wrapper" and getattr(func, "__name__", "") == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None)
    return None


def _func_name(func: Any) -> str:
    if isinstance(func, torch._ops.OpOverload):
        return func.overloadpacket.__name__
    if isinstance(func, torch._ops.OpOverloadPacket):
        return func.__name__
    return getattr(func, "__name__", "") or ""


def _is_inplace(func: Any) -> Optional[str]:
    """The out-of-place method name for an in-place Tensor method or operator, else None."""
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    name = _func_name(func)
    if name.startswith("__i") and name.endswith("__") and hasattr(torch.Tensor, "__" + name[3:]):
        return "__" + name[3:]
    if name.endswith("_") and not name.startswith("_") and not name.endswith("__"):
        base = name[:-1]
        if hasattr(torch.Tensor, base) or hasattr(torch, base) or hasattr(torch.nn.functional, base):
            return base
    return None


_DECOMPOSED: Dict[Any, Optional[Callable]] = {}


def _python_body(func: Any) -> Optional[Callable]:
    """For a Python function that guards itself with ``has_torch_function``, a copy whose guard
    answers False: its body then runs op by op, and each op meets the jets and their rules."""
    try:
        return _DECOMPOSED[func]
    except (KeyError, TypeError):
        pass
    fn = None
    code = getattr(func, "__code__", None)
    if isinstance(func, types.FunctionType) and code is not None \
            and "handle_torch_function" in code.co_names:
        g = dict(func.__globals__)
        for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
            g[name] = _never
        fn = types.FunctionType(code, g, func.__name__, func.__defaults__, func.__closure__)
        fn.__kwdefaults__ = func.__kwdefaults__
    try:
        _DECOMPOSED[func] = fn
    except TypeError:
        pass
    return fn


def _never(*args, **kwargs) -> bool:
    return False


def _jets(args: Tuple, kwargs: Dict):
    for a in args:
        if isinstance(a, JetTensor):
            yield a
        elif isinstance(a, (list, tuple, dict)):
            yield from (x for x in tree_flatten(a)[0] if isinstance(x, JetTensor))
    for a in kwargs.values():
        if isinstance(a, JetTensor):
            yield a
        elif isinstance(a, (list, tuple, dict)):
            yield from (x for x in tree_flatten(a)[0] if isinstance(x, JetTensor))


def _in_no_grad_region(args: Tuple, kwargs: Dict) -> bool:
    """Grad mode is off here (the caller checked). Inside an entry point's model call that means
    the model entered a no_grad region; outside one (a user calling ``model(input_jet(...))``
    directly), autograd's own rule decides: a value computed under no_grad from tensors that
    require grad is detached."""
    if settings.model_calls:
        return True
    return any(j._coeffs.requires_grad for j in _jets(args, kwargs))


def _custom_function_frame(depth: int = 3):
    """The frame of ``torch.autograd.Function.apply`` that is running, if any (its locals hold the
    Function class ``cls`` and its arguments ``args``): autograd runs a custom Function's forward
    with grad mode off, which must not be mistaken for a no_grad region of the model (its
    derivative is its backward, which is not a Taylor rule)."""
    return _running_frame("apply", "torch/autograd/function.py", depth + 1, 64)


def _running_frame(name: str, path_end: str, depth: int, limit: int):
    """The nearest of the ``limit`` frames from ``depth`` up that runs the function ``name`` of the
    file ending in ``path_end`` (a torch source file), or None."""
    f = sys._getframe(depth)
    for _ in range(limit):
        if f is None:
            return None
        code = f.f_code
        if code.co_name == name and code.co_filename.replace("\\", "/").endswith(path_end):
            return f
        f = f.f_back
    return None


def _refusal(cls: Any, func: Any, why: str = "") -> JetError:
    name = getattr(cls, "__qualname__", repr(cls))
    return JetError(
        f"the custom torch.autograd.Function {name} received a jet (its forward called "
        f"{op_name(func)}){why}: autograd runs its forward without grad and differentiates it by its "
        "own backward, which is not a Taylor rule, so its higher derivatives cannot be computed "
        f"here. Write {name}'s forward as ordinary torch ops for the jet pass (e.g. behind a "
        "flag), or give the model a jet-aware path around it. (Functions whose forward returns "
        "their tensor inputs unchanged or cloned, such as DDP's and FSDP's, and torch.utils."
        "checkpoint are handled: docs/training.md.)")


def _custom_function(frame, func: Any, args: Tuple, kwargs: Dict) -> Any:
    """An op that meets a jet inside a custom Function's forward (or in autograd's wrapping of its
    outputs). Four cases are exact; everything else raises:

    - a class declared with :func:`curvrate_fast.jet_through` (its backward is the derivative of its
      forward, checked to first order at its first call): the forward's ops run as jets recording
      their graph, as in a model without the Function;
    - ``torch.utils.checkpoint``'s reentrant ``CheckpointFunction``: its forward runs the checkpointed
      segment under no_grad, to be recomputed in backward. For the jet pass the segment runs as in
      the unchecked model (rules recording their graph); the outer node never receives a gradient.
    - an identity Function (forward returns its tensor inputs as they are, or clones of them, as
      DDP's ``_DDPSink`` and FSDP2's pre/post-backward Functions do): the Function is applied
      again to the jets' stacked coefficient tensors, so its backward (and whatever it triggers:
      DDP's delayed all-reduce, FSDP2's reduce-scatter) runs on the gradient of the coefficients,
      and the jet continues over its outputs;
    - anything else raises :class:`JetError`."""
    cls = frame.f_locals.get("cls")
    if through.is_through(cls):
        # declared with jet_through: its forward's ops are the function (checked to first order)
        through.check_through(cls, frame.f_locals.get("args", ()))
        return _route_with_graph(func, args, kwargs)
    if _is_checkpoint_function(cls):
        if _decorated_no_grad_below(frame):
            return constant_result(func, args, kwargs)
        return _route_with_graph(func, args, kwargs)
    identity = (func in (torch.Tensor.clone, torch.clone) and args and isinstance(args[0], JetTensor)) or \
        (func is torch.Tensor.view_as and len(args) == 2 and args[0] is args[1] and isinstance(args[0], JetTensor))
    if not identity:
        raise _refusal(cls, func)
    jet = args[0]
    outs = _reapplied(frame, cls, func)
    queue = outs.get(id(jet._coeffs))
    if not queue:
        raise _refusal(cls, func, ", and its outputs do not correspond one to one to its jet inputs")
    out = queue.pop(0)
    if not queue:
        del outs[id(jet._coeffs)]
    if not outs:
        _REAPPLIED.entries.pop(id(frame), None)
    return JetTensor(out, jet._order)


def _route_with_graph(func: Any, args: Tuple, kwargs: Dict) -> Any:
    if settings.rules_without_grad:
        return _route_without_grad(func, args, kwargs)
    with torch.enable_grad():
        return _route(func, args, kwargs)


def _route_without_grad(func: Any, args: Tuple, kwargs: Dict) -> Any:
    """A top-level op of a pass whose caller runs without grad (``model_call``): the rule runs under
    no_grad, marked as a rule (depth 1) so that its own no_grad is not taken for the model's."""
    s = settings
    s.rule_depth = 1
    try:
        with torch.no_grad():
            return _route(func, args, kwargs)
    finally:
        s.rule_depth = 0


def _is_checkpoint_function(cls: Any) -> bool:
    import torch.utils.checkpoint as cp
    return cls is (_JetCheckpoint.original or getattr(cp, "CheckpointFunction", None))


def _decorated_no_grad_below(apply_frame) -> bool:
    """Whether a function decorated with ``@torch.no_grad()`` / ``@torch.inference_mode()`` (e.g.
    Hugging Face's rotary embeddings) is running between the current op and ``apply_frame``."""
    f = sys._getframe(3)
    while f is not None and f is not apply_frame:
        if f.f_code.co_name == "decorate_context" and f.f_code.co_filename.replace("\\", "/").endswith(
                "torch/utils/_contextlib.py"):
            factory = f.f_locals.get("ctx_factory")
            cm = getattr(factory, "__self__", None)
            if isinstance(cm, (torch.no_grad, torch.inference_mode)) or \
                    (isinstance(cm, torch.set_grad_enabled) and not getattr(cm, "mode", True)):
                return True
        f = f.f_back
    return False


class _Reapplied(threading.local):
    def __init__(self) -> None:
        self.entries: Dict[int, Tuple[Any, Dict[int, list]]] = {}


_REAPPLIED = _Reapplied()


class _IdentityRecorder(torch.overrides.TorchFunctionMode):
    """Watches a custom Function's forward run on coefficient tensors: which outputs are its
    inputs as they are (``view_as``, autograd's wrapping of a returned input) or their clones, and
    whether anything else touches them."""

    def __init__(self, sources: Dict[int, torch.Tensor]):
        super().__init__()
        self.sources = sources
        self.pairs: list = []
        self.other: Optional[Any] = None

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = next((a for a in args if isinstance(a, torch.Tensor) and id(a) in self.sources), None)
        if src is None:
            return out
        if func in (torch.Tensor.clone, torch.clone) or (func is torch.Tensor.view_as and args[1] is src):
            self.pairs.append((src, out))
        elif not (func in _WRAPPER_METADATA or _getter_name(func) is not None
                  or _func_name(func) in _CONSTANT_RESULT_NAMES):
            self.other = func
        return out


def _reapplied(frame, cls: Any, func: Any) -> Dict[int, list]:
    """The outputs of ``cls`` applied to the coefficient tensors of the jets among the arguments
    of the ``apply`` call running in ``frame`` (once per call), by the id of their source."""
    hit = _REAPPLIED.entries.get(id(frame))
    if hit is not None and hit[0] is frame:
        return hit[1]
    loc = frame.f_locals
    fargs, fkwargs = tuple(loc.get("args", ())), dict(loc.get("kwargs", None) or {})
    stand_ins: Dict[int, torch.Tensor] = {}

    def coeff_arg(a: JetTensor) -> torch.Tensor:
        c = a._coeffs
        if not _moves_without_graph(c):
            return c
        # a jet that moves along the path without an autograd graph (the input jet, a pass whose
        # rules record none) answers requires_grad=True, so PyTorch's machinery expects the
        # Function's outputs to carry its backward node (a module's full backward hook checks for
        # it): applied to a leaf with the same values, whose gradient nothing reads
        leaf = c.detach().requires_grad_(True)
        stand_ins[id(leaf)] = c
        return leaf
    coeff_args = tuple(coeff_arg(a) if isinstance(a, JetTensor) else a for a in fargs)
    sources = {id(c): c for a, c in zip(fargs, coeff_args) if isinstance(a, JetTensor)}
    if not sources:
        raise _refusal(cls, func, " through a container")
    rec = _IdentityRecorder(sources)
    with torch.set_grad_enabled(not settings.rules_without_grad or bool(stand_ins)), rec:
        cls.apply(*coeff_args, **fkwargs)
    if rec.other is not None:
        raise _refusal(cls, func, f" and, on plain tensors, {op_name(rec.other)}: it is not an identity")
    outs: Dict[int, list] = {}
    for src, out in rec.pairs:
        outs.setdefault(id(stand_ins.get(id(src), src)), []).append(out)
    # forget calls that have returned (their frames are no longer on the stack)
    live = set()
    f = frame
    while f is not None:
        live.add(id(f))
        f = f.f_back
    for k in [k for k in _REAPPLIED.entries if k not in live]:
        del _REAPPLIED.entries[k]
    _REAPPLIED.entries[id(frame)] = (frame, outs)
    return outs


def constant_result(func: Any, args: Tuple, kwargs: Dict, kind: str = "constants") -> Any:
    """Run ``func`` on the primal values: its result is a constant along the path. An in-place op
    writes into the jet's primal only (as autograd, under no_grad, changes the value but not the
    derivative) and returns the jet."""
    record(kind, func)
    out = func(*primals(args), **primals(kwargs))
    if _is_inplace(func) is not None and args and isinstance(args[0], JetTensor):
        return args[0]
    return out


def dispatch(func: Any, args: Tuple, kwargs: Dict) -> Any:
    if func in _WRAPPER_METADATA:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    getter = _getter_name(func)
    if getter is not None:
        if getter in _CONSTANT_GETTERS:
            return func(*primals(args))
        if getter == "data" and isinstance(args[0], JetTensor):
            return args[0].detached()
        answer = _AUTOGRAD_GETTERS.get(getter)
        if answer is not None and isinstance(args[0], JetTensor):
            return answer(args[0]._coeffs)
    method = _AUTOGRAD_METHODS.get(func)
    if method is not None:
        return method(*args, **kwargs)
    if func is torch.Tensor.view_as and _asks_for_grad_node(args):
        return _unreached_node_view(args[0])
    s = settings
    if s.rule_depth == 0:
        if not torch.is_grad_enabled() and _in_no_grad_region(args, kwargs):
            frame = _custom_function_frame()
            if frame is not None:
                if multilinear.active():
                    raise multilinear.refuse(f"{op_name(func)} in a custom autograd Function")
                return _custom_function(frame, func, args, kwargs)
            return constant_result(func, args, kwargs)
    if torch._C._is_any_autocast_enabled():
        if multilinear.active():
            raise multilinear.refuse(f"{op_name(func)} under autocast")
        return _autocast(func, args, kwargs)
    if s.rule_depth == 0 and s.rules_without_grad:
        return _route_without_grad(func, args, kwargs)
    return _route(func, args, kwargs)


# -- mixed precision ----------------------------------------------------------------------------

_LOW = (torch.float16, torch.bfloat16)
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)
# rules written as compositions of jet ops: under autocast each of their ops gets the policy itself
# (attention: its matmuls in the autocast dtype, its softmax recurrences in float32)
_AUTOCAST_BY_PARTS = {torch.nn.functional.scaled_dot_product_attention}
_AUTOCAST_DTYPES: Dict[Any, Any] = {}


def _autocast(func: Any, args: Tuple, kwargs: Dict) -> Any:
    """The mixed-precision policy (docs/training.md, "Mixed precision"). Under ``torch.autocast``
    an op on jets gives coefficients of the dtype autocast gives the same op on plain tensors
    (learned once per op and operand dtypes by running it on the primal values), so the model sees
    the dtypes it sees in ordinary training; and

    - an op that autocast runs in lower precision (a GEMM, a convolution: it casts a float32
      operand down) runs its rule on coefficients cast to the autocast dtype, as plain training
      does (the GEMM accumulates in float32 inside);
    - every other rule (the Taylor recurrences of activations, normalizations, softmax and
      losses, products of jets) runs on coefficients upcast to float32, with autocast off inside,
      and its result is cast to that dtype.

    Float64 operands are never cast. In-place ops, random ops, decompositions and the ops of
    ``_AUTOCAST_BY_PARTS`` are left to their parts."""
    jets = list(_jets(args, kwargs))
    if not jets or func in _AUTOCAST_BY_PARTS or _is_inplace(func) is not None or _rule_for(func) is None \
            or random_op(func):
        return _route_plain(func, args, kwargs)
    device_type = jets[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return _route_plain(func, args, kwargs)
    low = torch.get_autocast_dtype(device_type)
    out_dtypes = _autocast_out_dtypes(func, args, kwargs, device_type, low)
    floats = [d for d in out_dtypes if d in _CASTABLE]
    if not floats:
        return _route_plain(func, args, kwargs)
    target = floats[0]
    operands = [a.dtype for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    lowered = target == low and torch.float32 in operands
    compute = low if lowered else torch.float32

    def cast(a):
        if isinstance(a, JetTensor):
            return a if a.dtype == compute or a.dtype not in _CASTABLE else JetTensor(a._coeffs.to(compute), a._order)
        if isinstance(a, torch.Tensor) and a.dtype in _CASTABLE and a.dtype != compute:
            return a.to(compute)
        return a

    from torch.utils._pytree import tree_map
    cargs, ckwargs = tree_map(cast, args), tree_map(cast, kwargs)
    with torch._C._DisableAutocast():
        out = _route_plain(func, cargs, ckwargs)

        def back(o):
            if isinstance(o, JetTensor) and o.dtype in _CASTABLE and o.dtype != target:
                return JetTensor(o._coeffs.to(target), o._order)
            if isinstance(o, torch.Tensor) and not isinstance(o, JetTensor) and o.dtype in _CASTABLE \
                    and o.dtype != target:
                return o.to(target)
            return o
        return tree_map(back, out) if compute != target else out


class _Precision:
    """``fp16_direction_scale``: under float16 autocast the entry points take the derivatives along
    c·u instead of u and divide coefficient k by c^k afterwards (in float32): float16's range
    (6e-8 .. 65504) would otherwise flush the high orders of the hidden layers' coefficients to
    zero. Any positive power of two keeps the division exact; 0 turns float16 autocast into an
    error instead."""

    fp16_direction_scale: float = 16.0


precision = _Precision()


def direction_scale(x: torch.Tensor) -> float:
    """The factor c the entry points scale their direction by for ``x`` (1 unless float16
    autocast is on for its device): the mixed-precision policy's treatment of float16."""
    if not torch._C._is_any_autocast_enabled():
        return 1.0
    dt = x.device.type
    if not (torch.is_autocast_enabled(dt) and torch.get_autocast_dtype(dt) == torch.float16):
        return 1.0
    c = float(precision.fp16_direction_scale)
    if c <= 0:
        raise JetError("float16 autocast with jets is switched off (precision.fp16_direction_scale = 0): "
                       "its range underflows the high-order coefficients; use bfloat16, or a "
                       "direction scale > 0 (docs/training.md, 'Mixed precision')")
    return c


def unscale_coefficients(c: torch.Tensor, scale: float) -> torch.Tensor:
    """Coefficients (K+1, ...) along c·u turned into those along u: coefficient k divided by c^k,
    in float32 at least (float16 would underflow again)."""
    if scale == 1.0:
        return c
    if c.dtype in _LOW:
        c = c.float()
    if not tracing() and not all_finite(c):
        raise JetError(
            f"float16 autocast: the Taylor coefficients along {scale:g}·u overflowed (inf or NaN); "
            "lower curvrate_fast.jets.dispatcher.precision.fp16_direction_scale (a power of two), or "
            "use bfloat16 (docs/training.md, 'Mixed precision')")
    powers = torch.tensor([scale ** -k for k in range(c.shape[0])], dtype=c.dtype, device=c.device)
    return c * powers.reshape((-1,) + (1,) * (c.dim() - 1))


def _route_plain(func: Any, args: Tuple, kwargs: Dict) -> Any:
    s = settings
    if s.rules_without_grad and s.rule_depth == 0:
        s.rule_depth = 1
        try:
            with torch.no_grad():
                return _route(func, args, kwargs)
        finally:
            s.rule_depth = 0
    return _route(func, args, kwargs)


def _autocast_out_dtypes(func: Any, args: Tuple, kwargs: Dict, device_type: str, low) -> Tuple:
    """The floating dtypes of ``func``'s outputs under the current autocast on plain tensors."""
    leaves = tree_flatten((args, kwargs))[0]
    key = (func, device_type, low) + tuple(
        (a.dtype, isinstance(a, JetTensor)) if isinstance(a, torch.Tensor) else a
        for a in leaves if isinstance(a, (torch.Tensor, torch.dtype)))
    try:
        return _AUTOCAST_DTYPES[key]
    except KeyError:
        pass
    with torch.no_grad():
        out = func(*primals(args), **primals(kwargs))
    dtypes = tuple(o.dtype for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
    _AUTOCAST_DTYPES[key] = dtypes
    return dtypes


def _rule_for(func: Any) -> Optional[Callable]:
    rule = registry.lookup(func)
    if rule is None and isinstance(func, torch._ops.OpOverload):
        rule = registry.lookup(func.overloadpacket)
    return rule


def _unbound_call(func: Any, rule: Callable, args: Tuple, kwargs: Dict,
                  error: TypeError) -> Optional[Tuple[Tuple, Dict]]:
    """A rule that raised TypeError. When the call's arguments do not fit the rule's signature:
    the first argument passed by torch's name for it (``input=``, or ``self=`` in the scalar-first
    overloads: ``torch.det(input=A)``, ``torch.pow(self=2, exponent=x)``) moved to its position,
    returned as (args, kwargs) to call the rule with, where that binds; otherwise a JetError that
    names the op and the arguments, not Python's complaint about an internal function. None (the
    TypeError propagates) where the arguments did bind: the rule's own error, or torch's for bad
    arguments."""
    try:
        sig = inspect.signature(rule)
    except (TypeError, ValueError):   # a builtin or C rule: nothing to compare
        return None
    try:
        sig.bind(*args, **kwargs)
        return None
    except TypeError as bind_error:
        first = [k for k in ("input", "self") if k in kwargs]
        if not args and len(first) == 1:
            rest = dict(kwargs)
            moved = (rest.pop(first[0]),)
            try:
                sig.bind(*moved, **rest)
                return moved, rest
            except TypeError:
                pass
        given = ", ".join([f"{len(args)} positional"] + [f"{k}=" for k in kwargs])
        raise JetError(f"{op_name(func)} with a jet: its Taylor rule does not take this form of the call "
                       f"({given}: {bind_error}); pass the arguments positionally, or compute this op "
                       "outside the jet") from error


def _route(func: Any, args: Tuple, kwargs: Dict) -> Any:
    if kwargs.get("out") is not None:
        raise JetError(
            f"{op_name(func)}(..., out=...) with a jet: the Taylor coefficients cannot be written into "
            "a plain output tensor; use the returned value instead of out=")
    rule = _rule_for(func)
    if rule is not None and _asks_inplace(func, args, kwargs):
        return _functional_inplace(func, args, kwargs)
    if rule is not None and multilinear.active():
        record("rules", func)
        out = multilinear.route(func, rule, args, kwargs)
        return _linked(func, out, rule, args, kwargs, True) if _may_link(func, out) else out
    if rule is not None:
        record("rules", func)
        try:
            out = rule(*args, **kwargs)
        except TypeError as e:
            fixed = _unbound_call(func, rule, args, kwargs, e)
            if fixed is None:
                raise
            args, kwargs = fixed
            out = rule(*args, **kwargs)
        return _linked(func, out, rule, args, kwargs, False) if _may_link(func, out) else out

    name = _func_name(func)
    if name in _LEAVES_TORCH:
        raise JetError(
            f"Tensor.{name} on a jet would leave torch and drop its Taylor coefficients (autograd "
            "refuses this too for tensors that require grad); keep the computation in torch ops, or "
            "call .detach() first to use the value as a constant")
    if name in _CONSTANT_RESULT_NAMES:
        return constant_result(func, args, kwargs)

    if func is torch.Tensor.copy_:
        return _copy_into(*args, **kwargs)
    base = _is_inplace(func)
    if base is not None:
        return _inplace(func, base, args, kwargs)

    fn = _python_body(func)
    if fn is not None:
        record("decomposed", func)
        return fn(*args, **kwargs)

    machinery = _foreign_machinery(func)
    if machinery is not None:
        raise JetError(machinery)
    if random_op(func):
        raise RuleMissingError(
            f"{op_name(func)} draws random numbers and has no Taylor rule: the draw must be made once, "
            "from the plain call's generator state, which only a rule can arrange. Register one "
            "with curvrate_fast.register (docs/rules.md; curvrate_fast/rules/random.py has examples).")
    raise RuleMissingError(
        f"{op_name(func)} has no Taylor rule, so its Taylor coefficients cannot be computed exactly "
        "(the engine has no generic fallback: docs/engine.md says why). Register a rule with "
        "curvrate_fast.register: docs/rules.md shows how, usually in one line from the op's "
        "derivative or as a composition of ops that have rules; or .detach() the value if it "
        "should be a constant.")


# forward-mode AD's primitives: a jet already is the forward-mode expansion, and a dual number of
# a jet would need a rule for each op on the pair
_FORWARD_AD = frozenset({"_make_dual", "_unpack_dual", "make_dual", "unpack_dual"})


def _foreign_machinery(func: Any) -> Optional[str]:
    """Why a call that runs code the engine cannot see op by op (TorchScript, forward-mode AD)
    cannot take a jet, or None for an ordinary op without a rule."""
    if isinstance(func, (torch._C.ScriptMethod, torch._C.ScriptFunction)) \
            or isinstance(getattr(func, "__self__", None), torch.jit.ScriptModule):
        return (f"{op_name(func)}: a TorchScript module or function (torch.jit.script / torch.jit.trace) "
                "received a jet; TorchScript runs its compiled graph on ATen directly, where the jet's Taylor "
                "coefficients cannot follow. Call the eager module (the one that was scripted or traced) instead.")
    if _func_name(func) in _FORWARD_AD:
        return (f"{op_name(func)}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) inside the function "
                "received a jet; the engine has no rule for a derivative taken inside the function. A jet "
                "already carries the derivatives along its direction: compute them with the engine instead.")
    return None


def _memoized(table: Dict[Any, Any], func: Any, compute: Callable[[Any], Any]) -> Any:
    """``compute(func)``, remembered in ``table`` (an unhashable func is computed every time)."""
    try:
        return table[func]
    except (KeyError, TypeError):
        pass
    value = compute(func)
    try:
        table[func] = value
    except TypeError:
        pass
    return value


@functools.lru_cache(maxsize=None)
def _aten_overloads(name: str) -> Optional[Tuple[Any, ...]]:
    """The overloads of the ATen op called ``name``; None where ``torch.ops.aten`` has no op of
    that name (none at all, or an attribute of the namespace itself: ``__eq__``)."""
    packet = getattr(torch.ops.aten, name, None) if name else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    return tuple(getattr(packet, ov) for ov in packet.overloads())


def _schema_may_view(func: Any) -> bool:
    ops = (func,) if isinstance(func, torch._ops.OpOverload) else _aten_overloads(_func_name(func))
    return True if ops is None else any(
        r.alias_info is not None and not r.alias_info.is_write for op in ops for r in op._schema.returns)


# whether a torch function may return a view of an argument: its ATen op's schema says so (a
# return annotated as an alias, not written: ``Tensor(a) self -> Tensor(a)``); True where no ATen
# op of that name exists (T, float: checked); the rules' own view marks are checked in any case
_MAY_VIEW: Dict[Any, bool] = {}


def _may_view(func: Any) -> bool:
    return _memoized(_MAY_VIEW, func, _schema_may_view)


def _may_link(func: Any, out: Any) -> bool:
    """Whether a rule's result may hold a view to link (the hot path: one lookup for most ops)."""
    return _may_view(func) or isinstance(out, (tuple, list)) or (isinstance(out, JetTensor) and out._is_view)


def _linked(func: Any, out: Any, rule: Callable, args: Tuple, kwargs: Dict, via_multilinear: bool) -> Any:
    """A rule's result with each view it returns linked to its base (JetTensor.link_view), so that
    the aliasing of PyTorch's view ops holds for jets. Only ops whose ATen schema returns an alias
    (:func:`_may_view`) and results the rule marked as views are looked at: a result whose
    coefficients alias the first argument's is a view of it (select, diagonal, a slice, transpose,
    a reshape that did not copy); a marked one is looked up among the other positional arguments
    (broadcast_tensors, meshgrid). The replay is the rule called again with another jet in the
    base's place. A marked result that aliases no argument is a copy (advanced indexing, a
    reshape that had to copy), a tensor of its own as in PyTorch: unmarked. Whether a reshape
    copies follows the coefficients' memory layout, which mirrors the primal's as PyTorch lays it
    out except where a rule chose another layout. A deferred result (a linear layer's pending
    GEMM) is fresh and left as it is."""
    many = isinstance(out, (tuple, list))
    outs = out if many else (out,)
    first = args[0] if args else None
    may = _may_view(func)
    for k, o in enumerate(outs):
        if not isinstance(o, JetTensor) or o._view is not None or o._pending is not None or o is first \
                or not (may or o._is_view):
            continue
        if _aliases(o, first):
            at = (0, None)
        elif o._is_view:
            # a view of another argument (broadcast_tensors, meshgrid's list): the positional
            # arguments and the sequences among them
            at = next(((i, j) for i, a in enumerate(args)
                       for j, b in (enumerate(a) if isinstance(a, (list, tuple)) else ((None, a),))
                       if _aliases(o, b)), None)
            if at is None:
                o._is_view = False
                continue
        else:
            continue
        o._is_view = True
        i, j = at
        o.link_view(args[i] if j is None else args[i][j],
                    functools.partial(_replay, func, rule, via_multilinear, args, kwargs, at, k if many else None))
    return out


def _aliases(o: JetTensor, b: Any) -> bool:
    """Whether jet ``o``'s coefficients alias those of ``b`` (a jet with stored coefficients)."""
    return (isinstance(b, JetTensor) and b._pending is None and b._data is not None
            and torch._C._is_alias_of(o._data, b._data))


def _replay(func: Any, rule: Callable, via_multilinear: bool, args: Tuple, kwargs: Dict,
            at: Tuple[int, Optional[int]], k: Optional[int], base: JetTensor) -> Any:
    """The view op of a linked view, called again with ``base`` in its base's place (positional
    argument ``at[0]``, or item ``at[1]`` of that sequence); output ``k`` of a tuple result."""
    i, j = at
    a = list(args)
    a[i] = base if j is None else type(args[i])(base if n == j else v for n, v in enumerate(args[i]))
    r = multilinear.route(func, rule, tuple(a), kwargs) if via_multilinear else rule(*a, **kwargs)
    return r if k is None else r[k]


def _writable_target(func: Any, target: Any) -> JetTensor:
    """The jet an in-place op writes into, or the error why it cannot."""
    if not isinstance(target, JetTensor):
        raise JetError(
            f"in-place {_func_name(func)} writes a jet into a plain tensor; Taylor coefficients cannot "
            "be stored there. Use the out-of-place form (e.g. torch.cat / torch.where, or the jet itself "
            "instead of a copy into a buffer; x.detach() where a constant is meant) instead.")
    if not target.writable():
        raise JetError(
            f"in-place {_func_name(func)} on a view of a jet (from view/reshape/indexing) would not "
            "reach the tensor it views; use the out-of-place form, e.g. `x = x + y` or `F.relu(x)`.")
    return target


def _copy_into(dst: Any, src: Any, non_blocking: bool = False) -> JetTensor:
    """``dst.copy_(src)`` with a jet: dst takes src's value and coefficients, broadcast to dst's
    shape and cast to its dtype and device (linear in src, as copy_ is in autograd); a plain src
    makes dst a constant. Into a plain tensor it raises (:func:`_writable_target`)."""
    target = _writable_target(torch.Tensor.copy_, dst)
    if isinstance(src, JetTensor):
        value = src
        if value.dtype != target.dtype or value.device != target.device:
            value = dispatch(torch.Tensor.to, (value,), {"dtype": target.dtype, "device": target.device})
        expanded = dispatch(torch.Tensor.expand, (value, target.shape), {})
        target.assign(dispatch(torch.Tensor.clone, (expanded,), {})._coeffs)
    else:
        target.assign(torch.as_tensor(src, dtype=target.dtype, device=target.device).expand(
            target.shape).unsqueeze(0).clone())
    return target


def _inplace(func: Any, base: str, args: Tuple, kwargs: Dict) -> Any:
    out_of_place = getattr(torch.Tensor, base, None) or getattr(torch, base, None) \
        or getattr(torch.nn.functional, base)          # F.leaky_relu_: only F has leaky_relu
    target = _writable_target(func, args[0])
    return _written_into(func, target, dispatch(out_of_place, args, kwargs))


# the position of the ``inplace`` parameter of a functional op (F.relu, F.dropout, F.silu ...), -1
# for an op without one
_INPLACE_AT: Dict[Any, int] = {}


def _signature_inplace_position(func: Any) -> int:
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):    # a builtin without a signature: no inplace flag
        return -1
    return names.index("inplace") if "inplace" in names else -1


def _inplace_position(func: Any) -> int:
    return _memoized(_INPLACE_AT, func, _signature_inplace_position)


def _asks_inplace(func: Any, args: Tuple, kwargs: Dict) -> bool:
    """Whether a call of a functional op asks to write into its input (``F.relu(h, inplace=True)``)."""
    at = _inplace_position(func)
    if at < 0:
        return False
    flag = args[at] if len(args) > at else kwargs.get("inplace", False)
    return bool(flag) and bool(args) and isinstance(args[0], JetTensor)


def _functional_inplace(func: Any, args: Tuple, kwargs: Dict) -> Any:
    """``F.relu(h, inplace=True)`` and the like with a jet ``h``: the op out of place, written into
    ``h`` (as for ``h.relu_()``). The rules compute out of place; a call that keeps only the
    input (``F.relu(h, inplace=True)`` with the result dropped) or reads ``h`` again after it must
    see the written jet, as PyTorch's caller sees the written tensor."""
    at = _inplace_position(func)
    target = args[0]
    if len(args) > at:
        args = args[:at] + (False,) + args[at + 1:]
    else:
        kwargs = dict(kwargs, inplace=False)
    result = dispatch(func, args, kwargs)
    if result is target:       # nothing to write (dropout in eval mode): also on a view of a jet
        return target
    return _written_into(func, _writable_target(func, target), result)


def _written_into(func: Any, target: JetTensor, result: Any) -> JetTensor:
    """The result of an in-place op written into the jet it acts on (its coefficients replaced):
    cast to the jet's dtype where torch's casting allows, a plain result as a constant."""
    if isinstance(result, JetTensor):
        if result.shape != target.shape:
            raise JetError(f"in-place {_func_name(func)} would change the jet's shape")
        if result.dtype != target.dtype:
            # as torch: computed in the promoted dtype, then cast to the target's where torch's
            # casting rules allow it (float64 into float32: a linear map of every coefficient)
            if not torch.can_cast(result.dtype, target.dtype):
                raise JetError(f"in-place {_func_name(func)}: result type {result.dtype} can't be cast to the "
                               f"jet's dtype {target.dtype} (PyTorch refuses this in-place cast too)")
            result = dispatch(torch.Tensor.to, (result,), {"dtype": target.dtype})
        target.assign(result._coeffs)
    else:  # the in-place op turned the jet into a constant (e.g. x.zero_(), x.uniform_())
        target.assign(torch.as_tensor(result, dtype=target.dtype, device=target.device).expand(
            target.shape).unsqueeze(0).clone())
    return target


# -- random ops ---------------------------------------------------------------------------------

_RANDOM_CACHE: Dict[str, bool] = {}


def random_op(func: Any) -> bool:
    """Whether the ATen op behind ``func`` draws random numbers (tag ``nondeterministic_seeded``)."""
    if isinstance(func, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in func.tags
    return _memoized(_RANDOM_CACHE, _func_name(func), _name_draws_random)


def _name_draws_random(name: str) -> bool:
    return any(torch.Tag.nondeterministic_seeded in op.tags
               for n in (name, name.rstrip("_")) for op in (_aten_overloads(n) or ()))


# -- grad mode around an entry point's model call -------------------------------------------------

@contextlib.contextmanager
def model_call() -> Iterator[None]:
    """Wrap the model call of an entry point (``jet``, ``loss_directional_derivatives``...).

    Inside it, a ``torch.no_grad()`` (or ``inference_mode``) region that the model enters makes
    the values computed there constants along the path, as nested autograd treats them. A caller
    who runs the entry point itself under ``no_grad`` still gets derivatives: the model then runs
    with grad mode on (so that its own no_grad regions can be told apart) while every rule runs
    under no_grad (so that no autograd graph is recorded)."""
    s = settings
    s.model_calls += 1
    outer_no_grad = not torch.is_grad_enabled()
    saved = (s.rules_without_grad, s.rule_depth)
    ddp_hook = _watch_ddp() if s.model_calls == 1 else None
    if s.model_calls == 1:
        _reroute_reentrant_checkpoint(True)
    try:
        if outer_no_grad:
            s.rules_without_grad, s.rule_depth = True, 0
            with torch.enable_grad():
                yield
        else:
            yield
    finally:
        s.model_calls -= 1
        s.rules_without_grad, s.rule_depth = saved
        if ddp_hook is not None:
            ddp_hook.remove()
        if s.model_calls == 0:
            _reroute_reentrant_checkpoint(False)


# -- torch.utils.checkpoint(use_reentrant=True) --------------------------------------------------

class _JetCheckpoint:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction`` while a jet pass runs.

    The reentrant checkpoint runs its segment under ``no_grad`` inside a custom Function, so a
    ``with torch.no_grad():`` block the segment enters itself could not be told apart from the
    checkpoint's own (values computed there must be constants along the path, as in the unchecked
    model). The jet pass never sends a gradient into that Function anyway (its gradients flow
    through the coefficient tensors), and memory is not what checkpointing saves there: so a call
    with a jet among its arguments runs the segment directly, in the caller's grad mode, exactly
    as the unchecked model; a call without one goes to the real Function."""

    original: Any = None

    @classmethod
    def apply(cls, function, preserve_rng_state, *args):
        if any(True for _ in _jets(args, {})):
            return function(*args)
        return cls.original.apply(function, preserve_rng_state, *args)


_REROUTE_LOCK = threading.Lock()
_REROUTE_USERS = [0]


def _reroute_reentrant_checkpoint(on: bool) -> None:
    """Install (``on``) or remove :class:`_JetCheckpoint` in ``torch.utils.checkpoint``; counted
    across threads, so the last pass to finish restores the real Function."""
    import torch.utils.checkpoint as cp
    with _REROUTE_LOCK:
        if on:
            _REROUTE_USERS[0] += 1
            if _REROUTE_USERS[0] == 1 and getattr(cp, "CheckpointFunction", None) is not None:
                _JetCheckpoint.original = cp.CheckpointFunction
                cp.CheckpointFunction = _JetCheckpoint
        else:
            _REROUTE_USERS[0] -= 1
            if _REROUTE_USERS[0] == 0 and _JetCheckpoint.original is not None:
                cp.CheckpointFunction = _JetCheckpoint.original


# -- DistributedDataParallel(find_unused_parameters=True) ----------------------------------------

class _Link(torch.autograd.Function):
    """A new wrapper over the same coefficients whose own autograd node points at them.

    DDP with ``find_unused_parameters=True`` finds the parameters a forward used by walking the
    autograd graph from the outputs' ``grad_fn`` in C++, which reads the wrapper's own (empty)
    autograd metadata, not the Python answer; a jet it receives from its module is given this link
    first. The link only makes the graph visible: gradients flow through the coefficients, never
    through the wrapper, so its backward never runs (it raises if it ever did)."""

    @staticmethod
    def forward(ctx, coeffs: torch.Tensor, order: int):
        return JetTensor(coeffs, order)

    @staticmethod
    def backward(ctx, grad):
        raise JetError("a gradient reached a jet's wrapper through PyTorch's autograd; the engine "
                       "routes gradients through the coefficients only. Please report the model.")


def _link_outputs(module, inputs, output):
    from torch.utils._pytree import tree_map_only
    return tree_map_only(
        JetTensor, lambda j: _Link.apply(j._coeffs, j._order) if j._coeffs.requires_grad else j, output)


def _ddp_pre_hook(module, inputs):
    from torch.nn.parallel import DistributedDataParallel as DDP
    if not settings.model_calls or not isinstance(module, DDP):
        return None
    if module.find_unused_parameters and not module.static_graph:
        handle = []

        def once(mod, inp, out):
            handle[0].remove()
            return _link_outputs(mod, inp, out)
        handle.append(module.module.register_forward_hook(once))
    return None


def _fsdp_post_hook(module, inputs, output):
    """FSDP2 reshards a unit's parameters in its own forward hook, right after the forward: a jet
    the unit returns with its GEMM still deferred (``JetTensor.deferred_linear``, the Triton path)
    would run that GEMM on a freed weight later. Global forward hooks run before the module's own,
    so the GEMM runs here, while the weight is still gathered."""
    if settings.model_calls and _is_fsdp_module(module):
        materialize_deferred(output)
    return None


def materialize_deferred(output) -> None:
    """Run the deferred work (a linear layer's GEMM, a pending bias) of every jet in ``output``."""
    for j in _jets((output,), {}):
        if j._pending is not None:
            j._coeffs  # noqa: B018  (reading the coefficients runs the deferred work)


def _is_fsdp_module(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:          # a torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


class _Handles:
    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _watch_ddp():
    """While a jet pass runs in a process group, a global pre-forward hook notices a DDP module
    with ``find_unused_parameters=True`` and links its module's output jets (``_Link``), and a
    global forward hook runs the deferred GEMMs of the jets an FSDP2 unit returns before FSDP2
    reshards its weights (``_fsdp_post_hook``)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    mod = torch.nn.modules.module
    return _Handles(mod.register_module_forward_pre_hook(_ddp_pre_hook),
                    mod.register_module_forward_hook(_fsdp_post_hook))


install_dispatcher(dispatch)
