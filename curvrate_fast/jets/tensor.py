"""``JetTensor``: a tensor that looks like its primal value and carries its Taylor coefficients.

A jet of order K of a tensor-valued quantity along the path t ↦ x + t·u is stored as one stacked
tensor ``coeffs`` of shape ``(n + 1, *shape)`` with n ≤ K: the normalized coefficients g_0..g_n
(SPEC.md §1); g_{n+1}..g_K are known to be zero (the input jet has n = 1, and linear maps keep n).
To the model the jet looks like a tensor of shape ``shape`` (its primal g_0): every torch function
that meets it is routed by ``__torch_function__`` to a Taylor rule, to a decomposition of a Python
function into ops that have rules, or to the exact generic fallback.
"""
from __future__ import annotations

import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from . import registry

__all__ = ["JetTensor", "is_jet", "make_jet", "primal", "series_of", "order_of", "JetError",
           "RuleMissingError"]


class JetError(RuntimeError):
    """An op met a jet in a way that cannot give exact Taylor coefficients."""


class RuleMissingError(JetError):
    """Raised in strict mode for an op without a Taylor rule."""


class JetTensor(torch.Tensor):
    """A Taylor jet that behaves as its primal tensor inside ordinary PyTorch code."""

    _data: Tensor
    _order: int
    _is_view: bool
    _pending: Optional[tuple]

    @staticmethod
    def __new__(cls, coeffs: Tensor, order: int, is_view: bool = False,
                pending_bias: Optional[Tuple[Tensor, int]] = None):
        if coeffs.dim() < 1 or coeffs.shape[0] < 1:
            raise ValueError("jet coefficients need a leading coefficient axis of length ≥ 1")
        if coeffs.shape[0] > order + 1:
            coeffs = coeffs[: order + 1]
        r = torch.Tensor._make_wrapper_subclass(
            cls, coeffs.shape[1:], dtype=coeffs.dtype, device=coeffs.device, requires_grad=False)
        r._data = coeffs
        r._order = int(order)
        r._is_view = is_view
        # Deferred work on the coefficients, so that a following activation can do it inside its
        # fused kernel; any other reader materializes it (``_coeffs``):
        #   ("bias", bias, channel_dim, shared): a bias still to be added to coefficient 0 (a linear
        #       or conv rule on the Triton path);
        #   ("linear", x_coeffs, weight, bias, grad_enabled): the whole GEMM x Wᵀ (+ b) not yet run
        #       (a linear rule on the Triton path: the activation may run it as ONE Triton GEMM
        #       with the activation jet in its epilogue).
        r._pending = None if pending_bias is None else ("bias", pending_bias[0], pending_bias[1], False)
        return r

    @classmethod
    def deferred_linear(cls, x_coeffs: Tensor, weight: Tensor, bias: Optional[Tensor], order: int) -> "JetTensor":
        """The jet of ``F.linear(x, weight, bias)`` for stored input coefficients ``x_coeffs``
        (n+1, *batch, in), with the GEMM deferred until someone reads the coefficients (then one
        GEMM of all n+1 rows, bias on coefficient 0: SPEC.md §2) or an activation takes it whole."""
        shape = tuple(x_coeffs.shape[1:-1]) + (weight.shape[0],)
        r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=x_coeffs.dtype, device=x_coeffs.device,
                                                requires_grad=False)
        r._data = None
        r._order = int(order)
        r._is_view = False
        r._pending = ("linear", x_coeffs, weight, bias, torch.is_grad_enabled())
        return r

    @property
    def _coeffs(self) -> Tensor:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if pending[0] == "linear":
                _, x, weight, bias, grad_enabled = pending
                with torch.set_grad_enabled(grad_enabled):  # as if it had run where the model called it
                    out = torch.nn.functional.linear(x, weight)
                    if bias is not None:
                        out.select(0, 0).add_(bias)  # a fresh GEMM output nobody else holds
                self._data = out
            else:
                _, bias, channel_dim, shared = pending
                d = self._data
                nd = d.dim() - 1
                cd = channel_dim % nd
                b = bias.reshape((-1,) + (1,) * (nd - cd - 1))
                if shared:  # a fused kernel saved the raw data for its backward: do not modify it
                    self._data = torch.cat([(d[0] + b).unsqueeze(0), d[1:]])
                else:       # a fresh GEMM/conv output nobody else holds: add in place
                    d.select(0, 0).add_(b)
        return self._data

    @_coeffs.setter
    def _coeffs(self, value: Tensor) -> None:
        self._data = value
        self._pending = None

    def take_pending_bias(self) -> Optional[Tuple[Tensor, Tensor, int]]:
        """(raw coefficients, bias, channel_dim) for a fused bias+activation kernel, or None.
        The raw tensor is marked shared, so a later materialization copies instead of writing."""
        if self._pending is None or self._pending[0] != "bias":
            return None
        _, bias, channel_dim, _ = self._pending
        self._pending = ("bias", bias, channel_dim, True)
        return self._data, bias, channel_dim

    def take_pending_linear(self) -> Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]:
        """(x coefficients, weight, bias) of a deferred linear layer for a fused linear+activation,
        or None. The jet stays deferred: a later reader of the pre-activation runs the GEMM then."""
        if self._pending is None or self._pending[0] != "linear":
            return None
        return self._pending[1:4]

    # -- access -------------------------------------------------------------------------------
    @property
    def coeffs(self) -> Tensor:
        """The stored coefficients, shape (n + 1, *shape), n ≤ order (higher ones are zero)."""
        return self._coeffs

    @property
    def order(self) -> int:
        return self._order

    @property
    def primal(self) -> Tensor:
        return self._coeffs[0]

    def full_coeffs(self) -> Tensor:
        """All K + 1 coefficients, shape (order + 1, *shape), zero-padded."""
        return pad_coeffs(self._coeffs, self._order + 1)

    def series(self) -> List[Tensor]:
        return list(self._coeffs.unbind(0))

    def __repr__(self) -> str:  # noqa: D105
        return (f"JetTensor(order={self._order}, stored={self._coeffs.shape[0]}, "
                f"shape={tuple(self.shape)}, dtype={self.dtype}, coeffs=\n{self._coeffs!r})")

    __str__ = __repr__

    def __format__(self, spec: str) -> str:  # noqa: D105
        return self.__repr__()

    # -- dispatch -----------------------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types_, args=(), kwargs=None):
        raise JetError(
            f"the ATen op {func} was reached with a JetTensor; this means a torch function bypassed "
            "__torch_function__. Please report it with the model that triggered it.")

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})


# -- helpers used by rules -----------------------------------------------------------------------

def is_jet(x: Any) -> bool:
    return isinstance(x, JetTensor)


def make_jet(coeffs, order: int, is_view: bool = False) -> JetTensor:
    """A jet from a stacked tensor (n+1, *shape) or a list of coefficient tensors (None = zero)."""
    if isinstance(coeffs, (list, tuple)):
        coeffs = stack_series(coeffs)
    return JetTensor(coeffs, order, is_view)


def stack_series(series: Sequence[Optional[Tensor]]) -> Tensor:
    first = next(s for s in series if s is not None)
    items = [torch.zeros_like(first) if s is None else s for s in series]
    if any(s.shape != first.shape for s in items):  # a constant term broadcast against the rest
        shape = torch.broadcast_shapes(*[s.shape for s in items])
        items = [s.expand(shape) for s in items]
    return torch.stack(items)


def pad_coeffs(c: Tensor, length: int) -> Tensor:
    if c.shape[0] >= length:
        return c[:length]
    z = c.new_zeros((length - c.shape[0],) + tuple(c.shape[1:]))
    return torch.cat([c, z], 0)


def primal(x: Any) -> Any:
    return x._coeffs[0] if isinstance(x, JetTensor) else x


def primals(tree: Any) -> Any:
    """Jets replaced by their primal values (flat tuples/lists without pytree, the common case)."""
    if isinstance(tree, (tuple, list)) and not any(isinstance(a, (list, tuple, dict)) for a in tree):
        return type(tree)(primal(a) for a in tree)
    if isinstance(tree, dict) and not any(isinstance(a, (list, tuple, dict)) for a in tree.values()):
        return {k: primal(a) for k, a in tree.items()}
    return tree_map(primal, tree)


def series_of(x: Any) -> List[Tensor]:
    """The coefficient list of a jet; a plain tensor or number is a constant (one coefficient)."""
    if isinstance(x, JetTensor):
        return list(x._coeffs.unbind(0))
    if isinstance(x, Tensor):
        return [x]
    return [torch.as_tensor(x)]


def _jets_in(trees: Any):
    """The jets among the arguments: a flat scan first (the common case), pytree for nesting."""
    for a in trees:
        if isinstance(a, JetTensor):
            yield a
        elif isinstance(a, (list, tuple, dict)):
            yield from (x for x in tree_flatten(a)[0] if isinstance(x, JetTensor))


def order_of(*trees: Any) -> int:
    orders = {a._order for a in _jets_in(trees)}
    if not orders:
        raise JetError("no jet among the arguments")
    if len(orders) > 1:
        raise JetError(f"jets of different orders met in one op: {sorted(orders)}")
    return orders.pop()


def stored(x: Any) -> int:
    """Number of stored coefficients (1 for a constant)."""
    return x._coeffs.shape[0] if isinstance(x, JetTensor) else 1


# -- the dispatcher ------------------------------------------------------------------------------

# Functions whose result does not depend differentiably on the values (metadata, comparisons,
# integer-valued results): evaluated on the primal; the result is a constant along the path.
_CONSTANT_RESULT_NAMES = {
    "size", "dim", "ndimension", "numel", "nelement", "__len__", "is_floating_point", "is_complex",
    "is_contiguous", "stride", "element_size", "get_device", "storage_offset", "is_signed",
    "argmax", "argmin", "argsort", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__",
    "__le__", "__gt__", "__ge__", "isnan", "isinf", "isfinite", "isposinf", "isneginf", "isreal",
    "sign", "sgn", "signbit", "floor", "ceil", "round", "trunc", "any", "all", "nonzero", "item",
    "tolist", "__bool__", "__int__", "__float__", "__index__", "count_nonzero", "equal", "allclose",
    "isclose", "bucketize", "searchsorted", "logical_and", "logical_or", "logical_not", "logical_xor",
    "__and__", "__or__", "__xor__", "__invert__", "bitwise_not", "bitwise_and", "bitwise_or",
    "floor_divide", "__floordiv__", "__rfloordiv__", "is_nonzero", "data_ptr", "unique",
    "unique_consecutive", "is_same_size", "__hash__", "is_set_to", "untyped_storage",
    "dim_order", "_is_view", "is_inference", "is_shared", "is_pinned", "type",
    "__contains__", "histc", "bincount",
}
# Conversions that leave torch: the derivatives would be lost silently, so they raise.
_LEAVES_TORCH = {"numpy", "__array__", "__reduce_ex__", "__deepcopy__", "__setstate__"}
# Property getters (Tensor.shape.__get__ etc.) answered from the primal.
_CONSTANT_GETTERS = {
    "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_cpu", "is_leaf",
    "is_sparse", "is_quantized", "is_meta", "is_mps", "is_xpu", "grad_fn", "names", "is_nested",
    "itemsize", "nbytes", "_version", "is_mkldnn", "output_nr", "_base", "grad",
}


def _getter_name(func: Any) -> Optional[str]:
    self_obj = getattr(func, "__self__", None)
    if type(func).__name__ == "method-wrapper" and getattr(func, "__name__", "") == "__get__":
        return getattr(self_obj, "__name__", None)
    return None


def _func_name(func: Any) -> str:
    return getattr(func, "__name__", "") or ""


def _is_inplace(func: Any) -> Optional[str]:
    """The out-of-place method name for an in-place Tensor method or operator, else None."""
    name = _func_name(func)
    if name.startswith("__i") and name.endswith("__") and hasattr(torch.Tensor, "__" + name[3:]):
        return "__" + name[3:]
    if name.endswith("_") and not name.startswith("_") and not name.endswith("__"):
        base = name[:-1]
        if hasattr(torch.Tensor, base) or hasattr(torch, base):
            return base
    return None


_DECOMPOSED: Dict[Any, Callable] = {}


def _decomposable(func: Any) -> Optional[Callable]:
    """For a Python function that guards itself with ``has_torch_function``, a copy whose guard
    answers False: its body then runs op by op, and each op meets the jets and their rules."""
    if func in _DECOMPOSED:
        return _DECOMPOSED[func]
    fn = None
    code = getattr(func, "__code__", None)
    if isinstance(func, types.FunctionType) and code is not None \
            and "handle_torch_function" in code.co_names:
        g = dict(func.__globals__)
        for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
            g[name] = _never
        fn = types.FunctionType(code, g, func.__name__, func.__defaults__, func.__closure__)
        fn.__kwdefaults__ = func.__kwdefaults__
    _DECOMPOSED[func] = fn
    return fn


def _never(*args, **kwargs) -> bool:
    return False


# Metadata the wrapper itself answers correctly (its sizes, strides, dtype and device are those of
# the primal): run without __torch_function__, the hottest calls in rule and model code.
_WRAPPER_METADATA = {
    torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.ndimension,
    torch.Tensor.nelement, torch.Tensor.is_floating_point, torch.Tensor.is_complex,
    torch.Tensor.__len__, torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__, torch.Tensor.ndim.__get__, torch.Tensor.get_device,
    torch.Tensor.is_cuda.__get__,
}


def dispatch(func: Any, args: Tuple, kwargs: Dict) -> Any:
    if func in _WRAPPER_METADATA:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    rule = registry.lookup(func)
    if rule is not None:
        registry.record("rules", func)
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
        return func(*primals(args), **primals(kwargs))

    base = _is_inplace(func)
    if base is not None:
        return _inplace(func, base, args, kwargs)

    fn = _decomposable(func)
    if fn is not None:
        registry.record("decomposed", func)
        return fn(*args, **kwargs)

    if registry.settings.strict:
        raise RuleMissingError(
            f"no Taylor rule for {registry.op_name(func)} and strict mode is on; turn strict off to "
            "use the exact (slower) generic fallback, or register a rule with "
            "curvrate_fast.jets.register")
    from .fallback import generic_jet  # late import: fallback imports this module
    registry.record("fallbacks", func)
    return generic_jet(func, args, kwargs)


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
        target._coeffs = result._coeffs.to(target.dtype)
    else:  # the in-place op turned the jet into a constant (e.g. x.zero_())
        target._coeffs = torch.as_tensor(result, dtype=target.dtype, device=target.device).expand(
            target.shape).unsqueeze(0).clone()
    return target
