"""The dispatcher: where every torch function that meets a jet is routed.

In order, an op that meets a ``JetTensor`` is answered by

1. the wrapper itself (sizes, dtype, device: metadata of the primal, the hottest calls);
2. a ``torch.no_grad()`` region entered *inside* the model: the op runs on the primal values and
   its result is a constant along the path, as in the nested-autograd method this library
   replaces (there, such values are detached);
3. a registered Taylor rule (``rules/``), looked up by the callable (a ``torch.ops`` overload also
   by its packet);
4. a constant result: metadata, comparisons, integer-valued and piecewise-constant results;
5. an in-place op: the out-of-place rule, written back into the jet;
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
import types
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

from . import registry
from .registry import op_name, record, settings
from .tensor import JetError, JetTensor, RuleMissingError, install_dispatcher, primals

__all__ = ["dispatch", "model_call", "random_op", "constant_result"]

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
    "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_cpu", "is_leaf",
    "is_sparse", "is_quantized", "is_meta", "is_mps", "is_xpu", "grad_fn", "names", "is_nested",
    "itemsize", "nbytes", "_version", "is_mkldnn", "output_nr", "_base", "grad",
})

# Metadata the wrapper itself answers correctly (its sizes, dtype and device are those of the
# primal): run without __torch_function__.
_WRAPPER_METADATA = frozenset({
    torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.ndimension,
    torch.Tensor.nelement, torch.Tensor.is_floating_point, torch.Tensor.is_complex,
    torch.Tensor.__len__, torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__, torch.Tensor.ndim.__get__, torch.Tensor.get_device,
    torch.Tensor.is_cuda.__get__,
})


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
        if hasattr(torch.Tensor, base) or hasattr(torch, base):
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


def _custom_function_frame():
    """The class of the ``torch.autograd.Function`` whose forward is running, if any: autograd
    runs a custom Function's forward with grad mode off, which must not be mistaken for a no_grad
    region of the model (its derivative is its backward, which is not a Taylor rule)."""
    import sys
    f = sys._getframe(2)
    for _ in range(64):
        if f is None:
            return None
        code = f.f_code
        if code.co_name == "apply" and code.co_filename.replace("\\", "/").endswith("torch/autograd/function.py"):
            return f.f_locals.get("cls")
        f = f.f_back
    return None


def _refuse_custom_function(func: Any) -> None:
    cls = _custom_function_frame()
    if cls is not None:
        name = getattr(cls, "__qualname__", repr(cls))
        raise JetError(
            f"the custom torch.autograd.Function {name} received a jet (its forward called "
            f"{op_name(func)}): autograd runs its forward without grad and differentiates it by its "
            "own backward, which is not a Taylor rule, so its higher derivatives cannot be computed "
            f"here. Write {name}'s forward as ordinary torch ops for the jet pass (e.g. behind a "
            "flag), or give the model a jet-aware path around it.")


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
    s = settings
    if s.rule_depth == 0:
        if not torch.is_grad_enabled() and _in_no_grad_region(args, kwargs):
            _refuse_custom_function(func)
            return constant_result(func, args, kwargs)
        if s.rules_without_grad:
            s.rule_depth = 1
            try:
                with torch.no_grad():
                    return _route(func, args, kwargs)
            finally:
                s.rule_depth = 0
    return _route(func, args, kwargs)


def _rule_for(func: Any) -> Optional[Callable]:
    rule = registry.lookup(func)
    if rule is None and isinstance(func, torch._ops.OpOverload):
        rule = registry.lookup(func.overloadpacket)
    return rule


def _route(func: Any, args: Tuple, kwargs: Dict) -> Any:
    if kwargs.get("out") is not None:
        raise JetError(
            f"{op_name(func)}(..., out=...) with a jet: the Taylor coefficients cannot be written into "
            "a plain output tensor; use the returned value instead of out=")
    rule = _rule_for(func)
    if rule is not None:
        record("rules", func)
        return rule(*args, **kwargs)

    getter = _getter_name(func)
    if getter is not None and getter in _CONSTANT_GETTERS:
        return func(*primals(args))

    name = _func_name(func)
    if name in _LEAVES_TORCH:
        raise JetError(
            f"Tensor.{name} on a jet would leave torch and drop its Taylor coefficients (autograd "
            "refuses this too for tensors that require grad); keep the computation in torch ops, or "
            "call .detach() first to use the value as a constant")
    if name in _CONSTANT_RESULT_NAMES:
        return constant_result(func, args, kwargs)

    base = _is_inplace(func)
    if base is not None:
        return _inplace(func, base, args, kwargs)

    fn = _python_body(func)
    if fn is not None:
        record("decomposed", func)
        return fn(*args, **kwargs)

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


def _inplace(func: Any, base: str, args: Tuple, kwargs: Dict) -> Any:
    target = args[0]
    out_of_place = getattr(torch.Tensor, base, None)
    if out_of_place is None:
        out_of_place = getattr(torch, base)
    if not isinstance(target, JetTensor):
        raise JetError(
            f"in-place {_func_name(func)} writes a jet into a plain tensor; Taylor coefficients cannot "
            "be stored there. Use the out-of-place form (e.g. torch.cat / torch.where) instead.")
    if target._is_view:
        raise JetError(
            f"in-place {_func_name(func)} on a view of a jet (from view/reshape/indexing) would not "
            "reach the tensor it views; use the out-of-place form, e.g. `x = x + y` or `F.relu(x)`.")
    result = dispatch(out_of_place, args, kwargs)
    if isinstance(result, JetTensor):
        if result.shape != target.shape:
            raise JetError(f"in-place {_func_name(func)} would change the jet's shape")
        if result.dtype != target.dtype:
            raise JetError(
                f"in-place {_func_name(func)} gives dtype {result.dtype}, which cannot be stored in a "
                f"jet of dtype {target.dtype} (PyTorch refuses this in-place cast too)")
        target._coeffs = result._coeffs
    else:  # the in-place op turned the jet into a constant (e.g. x.zero_(), x.uniform_())
        target._coeffs = torch.as_tensor(result, dtype=target.dtype, device=target.device).expand(
            target.shape).unsqueeze(0).clone()
    return target


# -- random ops ---------------------------------------------------------------------------------

_RANDOM_CACHE: Dict[str, bool] = {}


def random_op(func: Any) -> bool:
    """Whether the ATen op behind ``func`` draws random numbers (tag ``nondeterministic_seeded``)."""
    if isinstance(func, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in func.tags
    name = _func_name(func)
    hit = _RANDOM_CACHE.get(name)
    if hit is None:
        hit = False
        for n in (name, name.rstrip("_")):
            packet = getattr(torch.ops.aten, n, None)
            if packet is None:
                continue
            for ov in packet.overloads():
                if torch.Tag.nondeterministic_seeded in getattr(packet, ov).tags:
                    hit = True
        _RANDOM_CACHE[name] = hit
    return hit


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


install_dispatcher(dispatch)
