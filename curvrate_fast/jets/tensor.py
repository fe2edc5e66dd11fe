"""``JetTensor``: a tensor that looks like its primal value and carries its Taylor coefficients.

A jet of order K of a tensor-valued quantity along the path t ↦ x + t·u is stored as one stacked
tensor ``coeffs`` of shape ``(n + 1, *shape)`` with n ≤ K: the normalized coefficients g_0..g_n
(docs/math.md §1); g_{n+1}..g_K are known to be zero (the input jet has n = 1, and linear maps keep n).
To the model the jet looks like a tensor of shape ``shape`` (its primal g_0): every torch function
that meets it is routed by ``__torch_function__`` to the dispatcher (``dispatcher.py``): a Taylor
rule, an exact decomposition into ops that have rules, or a clear error.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["JetTensor", "is_jet", "make_jet", "primal", "primals", "series_of", "order_of", "lift",
           "JetError", "RuleMissingError", "install_dispatcher"]


class JetError(RuntimeError):
    """An op met a jet in a way that cannot give exact Taylor coefficients."""


class RuleMissingError(JetError):
    """An op that meets a jet has no Taylor rule (and is not a Python function made of ops that
    have one)."""


def _no_dispatcher(func, args, kwargs):
    raise JetError("the jet dispatcher is not installed (import curvrate_fast.jets)")


# The dispatcher lives in its own module (``dispatcher.py``), which installs itself here when it
# is imported: the tensor type does not import the engine that routes its ops.
_dispatcher: List[Callable] = [_no_dispatcher]


def install_dispatcher(fn: Callable) -> None:
    _dispatcher[0] = fn


#: how many times a jet's coefficients were replaced (in-place writes): a view whose base may have
#: been written since it was last read compares its base's coefficient tensor (JetTensor._refresh_view)
_WRITES = [0]


class JetTensor(torch.Tensor):
    """A Taylor jet that behaves as its primal tensor inside ordinary PyTorch code."""

    _data: Tensor
    _order: int
    _is_view: bool
    _pending: Optional[tuple]
    _blocks: Optional[tuple]
    _view: Optional[list]

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
        r._blocks = None
        # a view of another jet, linked by the dispatcher (:meth:`link_view`): [base, replay, the
        # base's coefficient tensor this view's were computed from, _WRITES when last checked]
        r._view = None
        r._detached = None       # weak references to plain tensors detach() returned (:meth:`detached`)
        r._dependents = None     # views of this jet whose detached tensors are alive (held while they are)
        return r

    @classmethod
    def deferred_linear(cls, x_coeffs: Tensor, weight: Tensor, bias: Optional[Tensor], order: int) -> "JetTensor":
        """The jet of ``F.linear(x, weight, bias)`` for stored input coefficients ``x_coeffs``
        (n+1, *batch, in), with the GEMM deferred until someone reads the coefficients (then one
        GEMM of all n+1 rows, bias on coefficient 0: docs/math.md §2) or an activation takes it whole."""
        shape = tuple(x_coeffs.shape[1:-1]) + (weight.shape[0],)
        r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=x_coeffs.dtype, device=x_coeffs.device,
                                                requires_grad=False)
        r._data = None
        r._order = int(order)
        r._is_view = False
        r._pending = ("linear", x_coeffs, weight, bias, torch.is_grad_enabled())
        r._blocks = None
        r._view = None
        r._detached = None
        r._dependents = None
        return r

    @property
    def _coeffs(self) -> Tensor:
        if self._view is not None:
            self._refresh_view()
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
        self._blocks = None
        _WRITES[0] += 1          # a jet's coefficients replaced: views check their base on the next read
        self._update_detached()
        if self._dependents:     # views whose detached values must show the write now, not when read
            live = [v for v in self._dependents if v._has_detached()]
            self._dependents = live or None
            for v in live:
                v._refresh_view()

    # -- views: reads see the base's in-place writes, writes reach the base --------------------
    def link_view(self, base: "JetTensor", replay: Callable[["JetTensor"], "JetTensor"]) -> "JetTensor":
        """Mark this jet as a view of ``base``, as PyTorch's view ops alias their input: its
        coefficients are ``replay(base)._coeffs`` (the view op run again on a jet in base's place)
        and alias base's. An in-place write into the base replaces the base's coefficient tensor
        (the engine never writes into one a rule may have saved for its backward), so a view
        taken before it would read the old values (silently: ``v = h[0]; h.mul_(2); v`` is twice
        that in PyTorch); a linked view sees the write, and a write into it reaches the base
        (:meth:`assign`). The dispatcher links every view a rule returns whose coefficients alias
        an argument's."""
        self._view = [base, replay, base._data, _WRITES[0]]
        return self

    def _refresh_view(self) -> None:
        view = self._view
        if view[3] == _WRITES[0]:               # no jet written since this view was last read
            return
        base, replay, seen, _ = view
        now = base._coeffs                      # a base that is a view refreshes first
        if now is not seen:
            self._view = None                   # the replay reads base only, never this jet
            self._data = replay(base)._coeffs
            self._pending = None
            self._blocks = None
            self._update_detached()
        self._view = [base, replay, now, _WRITES[0]]

    def detached(self) -> Tensor:
        """``detach()`` / ``.data``: the value as a plain tensor, a constant along the path. In
        PyTorch it shares the storage, so it shows the tensor's later in-place writes; here a write
        replaces the jet's coefficients, so the plain tensor is remembered (weakly) and the new
        value is copied into it (without grad) when the jet is written, or re-read after its base
        was written (before, it kept the old value: ``d = h.detach(); h.add_(1); h * d``, silently)."""
        d = self._coeffs[0].detach()
        if self._detached is None:
            self._detached = []
        self._detached = [r for r in self._detached if r() is not None]
        self._detached.append(weakref.ref(d))
        view = self._view
        while view is not None:   # a view is refreshed when any base up its chain is written: held
            base = view[0]        # by each (a temporary view, x[:1].detach(), dies otherwise)
            deps = [v for v in (base._dependents or ()) if v is not self and v._has_detached()]
            base._dependents = deps + [self]
            view = base._view
        return d

    def _has_detached(self) -> bool:
        return bool(self._detached) and any(r() is not None for r in self._detached)

    def _update_detached(self) -> None:
        if not self._detached:
            return
        live = [t for t in (r() for r in self._detached) if t is not None]
        if live:
            value = self._data[0]
            with torch.no_grad():
                for t in live:
                    if t.data_ptr() != value.data_ptr():
                        # an expanded value (stride 0) holds each element once: write that one
                        once = tuple(0 if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape))
                        t[once].copy_(value.expand(t.shape)[once])
        self._detached = [weakref.ref(t) for t in live] or None

    def writable(self) -> bool:
        """Whether an in-place write can land in this jet: not a view, or a linked one."""
        return not self._is_view or self._view is not None

    def assign(self, coeffs: Tensor) -> None:
        """The in-place write of stacked coefficients (m, *shape): the jet's are replaced; a linked
        view writes into a copy of its base's (padded to the longer of the two), through the view
        op run on that copy, and hands the copy to the base (recursively up a chain of views), as
        PyTorch writes through a view into its base. Views the engine holds as copies of the base
        are refused (the caller checks :meth:`writable` first)."""
        if self._view is None:
            if self._is_view:
                raise JetError("an in-place write into a view of a jet that is not linked to its base")
            self._coeffs = coeffs
            return
        base, replay = self._view[0], self._view[1]
        b = base._coeffs
        n = max(b.shape[0], coeffs.shape[0])
        fresh = pad_coeffs(b, n).clone()
        region = replay(JetTensor(fresh, base._order))._coeffs
        if region.shape[0] != n or not torch._C._is_alias_of(region, fresh):
            raise JetError("an in-place write into a view of a jet whose coefficients the engine holds as a "
                           "copy of the base's (e.g. a reshape of a transposed jet): it would not reach the base; "
                           "use the out-of-place form")
        region.copy_(pad_coeffs(coeffs.to(region.dtype), n))
        base.assign(fresh)
        self._view[2] = None                    # re-derived from the written base now
        self._view[3] = -1
        self._refresh_view()

    # -- a primal shared by blocks of rows ----------------------------------------------------
    def share_primal(self, blocks: int) -> "JetTensor":
        """Declare that coefficient 0 is ``blocks`` identical copies of its first ``len/blocks``
        rows along the primal's dim 0, as the D direction rows of one sample are (x repeated
        per direction; docs/design.md §2, "Shared primal"). A rule may then compute what depends
        on the primal alone once per block and repeat it (the linear rule does). Only a rule that
        knows its output keeps that structure for every value of its inputs may call this; the
        claim lapses by itself when the coefficients are written afterwards (any in-place write,
        a view's included, moves the tensor's version counter)."""
        if blocks > 1 and self._pending is None and self.dim() >= 1 and self.shape[0] % blocks == 0:
            try:
                version = self._data._version
            except RuntimeError:     # an inference tensor keeps no version counter
                return self
            self._blocks = (int(blocks), self._data, version)
        return self

    def primal_blocks(self) -> int:
        """How many identical blocks coefficient 0 is made of along dim 0 (1: no claim);
        see :meth:`share_primal`."""
        b = self._blocks
        if b is None or self._pending is not None:
            return 1
        blocks, data, version = b
        if self._data is not data or data._version != version:
            return 1
        return blocks

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
        if _inside_functorch():
            raise JetError(
                f"a torch.func transform (vmap, grad, jacrev, jacfwd, functional_call under vmap...) inside "
                f"the function met a jet at {func}: functorch's transforms run below __torch_function__, where "
                "the jet's Taylor coefficients cannot follow (and a derivative taken inside the function has "
                "no Taylor rule). Call the function without the transform, e.g. a loop instead of vmap.")
        if getattr(func, "__name__", "").split(".")[0] in _COPY_CONSTRUCTION:
            raise JetError(
                f"{func} met a jet below torch functions: a constructor that copies a tensor "
                "(torch.tensor(x), torch.Tensor(x)) or Tensor.set_ received one. A plain tensor cannot hold "
                "the Taylor coefficients: use the jet itself, x.clone(), or x.detach() where a constant is meant "
                "(what torch.tensor(x) gives in autograd).")
        raise JetError(
            f"the ATen op {func} was reached with a JetTensor; this means a torch function bypassed "
            "__torch_function__. Please report it with the model that triggered it.")

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        return _dispatcher[0](func, args, kwargs or {})


# ATen ops that copy constructors and set_ reach directly with their tensor argument
_COPY_CONSTRUCTION = frozenset({"detach", "alias", "set_", "lift_fresh"})


def _inside_functorch() -> bool:
    """Whether a torch.func transform is running this call (its Python frames are on the stack:
    functorch's own interpreter stack is hidden while a subclass's __torch_dispatch__ runs).
    Read on the error path only."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if "/torch/_functorch/" in name:
            return True
        f = f.f_back
    return False


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


def lift(c: Tensor, ndim: int) -> Tensor:
    """Stacked coefficients (n+1, *shape) with singleton axes inserted after the coefficient axis,
    so that they broadcast against a constant of rank ``ndim`` as the primal would: the one
    alignment every rule that combines stacked coefficients with a constant goes through (a
    constant of higher rank than the jet would otherwise meet the coefficient axis)."""
    extra = ndim - (c.dim() - 1)
    if extra <= 0:
        return c
    return c.reshape((c.shape[0],) + (1,) * extra + tuple(c.shape[1:]))


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
