"""Guard keys of captured programs (:mod:`curvrate_fast.capture`): what a non-tensor value and a
module's structure contribute to the key that decides whether a recorded graph may be replayed.

- :func:`_attr_key` / :class:`_Const`: a value by what decides what it computes (primitives by
  value and type, containers by contents, plain functions by code, globals, defaults and closure
  contents, any other object by an identity the key keeps alive);
- :func:`_module_state`: a module's parameters, buffers and structure (each submodule's class and
  attributes) in one walk; the walk is remembered per module while nothing it read can have
  changed (:class:`_StructureMemo`), so a training loop calling with the same model pays a
  check of dict versions instead of the walk.
"""
from __future__ import annotations

import collections
import functools
import operator
import types
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn


class _Ident:
    """An object inside a guard key by identity, and kept alive by that key. An ``id()`` alone can
    be handed to a later object at the same address, whose call would then replay a graph
    captured for another value (measured: a list argument ``[1.0, 0.0]``, made anew per call,
    replayed the graph of ``[0.0, 1.0]``)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return type(other) is _Ident and other.obj is self.obj

    def __repr__(self) -> str:
        return f"<{type(self.obj).__name__} at {id(self.obj):#x}>"


_PRIMITIVE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
# what a submodule's __dict__ holds besides its tensors and children: everything else (ints,
# floats, strings, flags, hooks, functions) can steer its forward, so it is part of the guard
_NOT_ATTRIBUTES = frozenset({"_parameters", "_buffers", "_modules"})
# which buffers state_dict leaves out: no forward reads it (and, a set, no dict version tracks it)
_NOT_KEYED = frozenset({"_non_persistent_buffers_set"})
_SKIPPED = _NOT_ATTRIBUTES | _NOT_KEYED


_PRIMITIVE_TYPES = frozenset(_PRIMITIVE)


def _function_key(f: types.FunctionType, depth: int):
    """A plain function by what decides what it computes: its code, its module's globals (by
    identity), its defaults and the current contents of its closure cells. So an inline lambda
    made anew at every call is one configuration, not a new capture per call."""
    if f.__dict__:                 # function attributes: by identity, as any object
        return _Ident(f)
    cells = []
    for c in f.__closure__ or ():
        try:
            cells.append(_attr_key(c.cell_contents, depth + 1))
        except ValueError:         # an empty cell (a name assigned later in the enclosing scope)
            cells.append("<empty cell>")
    return ("fn", f.__code__, _Ident(f.__globals__), _attr_key(f.__defaults__, depth + 1),
            _attr_key(f.__kwdefaults__, depth + 1), tuple(cells))


def _attr_key(v, depth: int = 0):
    """A non-tensor value inside a guard key: primitives by value (and type), containers by their
    contents (three levels deep), plain functions and partials by what they compute with
    (:func:`_function_key`), any other object by identity (:class:`_Ident`)."""
    if type(v) in _PRIMITIVE_TYPES or isinstance(v, _PRIMITIVE):
        return (type(v), v)
    if depth < 3:
        if isinstance(v, (tuple, list)):
            return (type(v).__name__,) + tuple(_attr_key(x, depth + 1) for x in v)
        if isinstance(v, dict):
            if not v:
                return ()
            return ("dict",) + tuple((_attr_key(k, depth + 1), _attr_key(x, depth + 1)) for k, x in v.items())
        if isinstance(v, (set, frozenset)) and all(isinstance(x, str) for x in v):
            return ("set",) + tuple(sorted(v))
        if type(v) is types.FunctionType:
            return _function_key(v, depth)
        if type(v) is functools.partial:
            return ("partial", _attr_key(v.func, depth + 1), _attr_key(v.args, depth + 1),
                    _attr_key(v.keywords, depth + 1))
    return _Ident(v)          # any other object (a module's tensor attribute, a hook...): by identity


class _Const:
    """A non-tensor argument inside the guard key: primitives, containers, functions as
    :func:`_attr_key` keys them; any other hashable object by value (a frozen config made anew
    per call is one configuration), an unhashable one by identity."""

    __slots__ = ("value", "key")

    def __init__(self, value: Any) -> None:
        self.value = value
        key = _attr_key(value)
        if type(key) is _Ident:
            try:
                hash(value)
                key = ("v", type(value).__name__, value)
            except TypeError:
                pass
        self.key = key


def _submodule_key(sub: nn.Module) -> tuple:
    prim = _PRIMITIVE_TYPES
    out = [type(sub)]
    for k, v in sub.__dict__.items():
        if type(v) in prim:
            # with its type: 1 and True (or 2 and 2.0) are equal keys, not equal programs
            out.append(k)
            out.append(type(v))
            out.append(v)
        elif k not in _SKIPPED:
            if type(v) is dict or type(v) is collections.OrderedDict:
                if v:
                    out.append(k)
                    out.append(_attr_key(v))
            else:
                out.append(k)
                out.append(_attr_key(v))
    return tuple(out)


def _walk(m: nn.Module, track: Optional["_Tracking"]):
    """(ModuleParts, the submodules in walk order, whether ``track`` holds everything the result
    was read from): with ``track``, every dict the walk read and every list attribute's
    contents are gathered (:meth:`_Tracking.add`)."""
    params: List[Tuple[str, Tensor]] = []
    buffers: List[Tuple[str, Tensor]] = []
    flags: List[Any] = []
    subs: List[nn.Module] = []
    stable = track is not None
    stack = [("", m)]
    while stack:
        prefix, sub = stack.pop()
        flags.append(prefix)
        flags.append(_submodule_key(sub))
        subs.append(sub)
        if stable:
            d = sub.__dict__
            track.dicts.append(d)
            for k, v in d.items():
                if k in _NOT_ATTRIBUTES:
                    track.dicts.append(v)
                elif k not in _NOT_KEYED and not track.add(v, 1):
                    stable = False
                    break
        pre = prefix + "." if prefix else ""
        for n, p in sub._parameters.items():
            if p is not None:
                params.append((pre + n, p))
        for n, b in sub._buffers.items():
            if b is not None:
                buffers.append((pre + n, b))
        children = [(pre + n, c) for n, c in sub._modules.items() if c is not None]
        stack.extend(reversed(children))
    return ModuleParts(params, buffers, tuple(flags)), subs, stable


class _Tracking:
    """What a remembered walk was read from: dicts (their version tags) and lists of primitives
    (their contents, copied)."""

    __slots__ = ("dicts", "lists")

    def __init__(self) -> None:
        self.dicts: List[dict] = []
        self.lists: List[Tuple[list, tuple]] = []

    def add(self, v, depth: int) -> bool:
        """Whether ``_attr_key(v)`` (at this depth) can change only in ways this tracking sees:
        primitives, tuples of such values, plain dicts (their versions) and lists of primitives
        (their contents) can; sets, functions (their closure cells), partials and objects keyed by
        identity cannot be followed (and an object held here could hold the module itself, which
        a process-wide memo must not keep alive): a module with one is walked at every call."""
        t = type(v)
        if t in _PRIMITIVE_TYPES or isinstance(v, _PRIMITIVE):
            return True
        if depth >= 3:
            return False
        if t is dict or t is collections.OrderedDict:
            self.dicts.append(v)
            return all(self.add(k, depth + 1) and self.add(x, depth + 1) for k, x in v.items())
        if t is tuple:
            return all(self.add(x, depth + 1) for x in v)
        if t is list and all(type(x) in _PRIMITIVE_TYPES for x in v):
            self.lists.append((v, tuple(v)))
            return True
        return False


class ModuleParts:
    """A module's parameters and buffers (named, in ``named_parameters``/``named_buffers`` order
    with duplicates kept) and its structure key (``flags``), with the views a guard reads at
    every call made once: the names, and the tensors, parameters first."""

    __slots__ = ("params", "buffers", "flags", "param_names", "buffer_names", "tensors")

    def __init__(self, params: List[Tuple[str, Tensor]], buffers: List[Tuple[str, Tensor]], flags: tuple) -> None:
        self.params = params
        self.buffers = buffers
        self.flags = flags
        self.param_names = tuple(n for n, _ in params)
        self.buffer_names = tuple(n for n, _ in buffers)
        self.tensors = tuple(t for _, t in params) + tuple(t for _, t in buffers)


def _dict_versions_change() -> bool:
    """Whether CPython's dict version tag (PEP 509, read as dynamo's guards read it) exists here and
    changes with every write (deprecated since Python 3.12: where it does not, no memo is kept)."""
    try:
        from torch._C._dynamo.guards import dict_version
    except ImportError:
        return False
    try:
        d: Dict[str, Any] = {}
        seen = [dict_version(d)]
        d["a"] = 1
        seen.append(dict_version(d))
        d["a"] = 2
        seen.append(dict_version(d))
        del d["a"]
        seen.append(dict_version(d))
        d.update(b=3)
        seen.append(dict_version(d))
    except Exception:  # noqa: BLE001  (an internal function: any failure means no memo)
        return False
    return len(set(seen)) == len(seen)


if _dict_versions_change():
    from torch._C._dynamo.guards import dict_version as _dict_version
else:
    _dict_version = None


class _StructureMemo:
    """A module's :func:`_module_state`, remembered with what it was read from: the submodules'
    classes, the version tag of every dict the walk read (each submodule's ``__dict__``, its
    parameter, buffer and child dicts, its hook dicts and dict attributes) and the contents of its
    list attributes. Any write to any of them (an attribute set, a parameter or submodule
    replaced, a hook registered, ``train()`` flipping a flag, a list changed in place) and any
    class swap is seen: then the walk runs again. Parameters changed in place (values,
    ``.data``, ``requires_grad``) are not structure: the guard reads their metadata at every
    call. Nothing here refers back to the module (it is held weakly; its submodules and dicts
    hold only primitives, tensors and further submodules), so a model built per run is freed with
    its memo."""

    __slots__ = ("ref", "root_type", "subs", "types", "own", "dicts", "versions", "lists", "state")

    def __init__(self, m: nn.Module, state: "ModuleParts", subs: List[nn.Module], track: _Tracking) -> None:
        key = id(m)
        self.ref = weakref.ref(m, lambda _r: _MEMOS.pop(key, None))
        self.root_type = type(m)
        self.subs = subs[1:]
        self.types = tuple(map(type, self.subs))
        self.own = tuple(map(vars, subs))        # each submodule's __dict__ (one could be replaced whole)
        self.dicts = track.dicts
        self.versions = tuple(map(_dict_version, track.dicts))
        self.lists = track.lists
        self.state = state

    def valid_for(self, m: nn.Module) -> bool:
        return (self.ref() is m and type(m) is self.root_type and tuple(map(type, self.subs)) == self.types
                and vars(m) is self.own[0] and all(map(operator.is_, map(vars, self.subs), self.own[1:]))
                and tuple(map(_dict_version, self.dicts)) == self.versions
                and all(tuple(v) == seen for v, seen in self.lists))


_MEMOS: Dict[int, _StructureMemo] = {}   # id(module) → its memo (dropped with the module)
_MEMO_LIMIT = 256


def _module_state(m: nn.Module) -> ModuleParts:
    """(named parameters, named buffers, structure) in one walk over the submodules (the names
    and order of ``named_parameters``/``named_buffers`` with ``remove_duplicate=False``). The
    structure (each submodule's class, train flag and other attributes: sizes, flags, hooks) is
    what the guard compares instead of the module's identity, so that every instance of one
    architecture shares its graphs (its own parameters and buffers being the graph inputs).

    Remembered per module (:class:`_StructureMemo`) where everything the structure is read from
    can be followed (dict versions, list contents); a module with a set, function or other
    object attribute is walked at every call. The caller must not change the lists
    returned."""
    memo = _MEMOS.get(id(m))
    if memo is not None and memo.valid_for(m):
        return memo.state
    track = _Tracking() if _dict_version is not None else None
    state, subs, stable = _walk(m, track)
    if stable:
        if len(_MEMOS) >= _MEMO_LIMIT:
            _MEMOS.clear()
        _MEMOS[id(m)] = _StructureMemo(m, state, subs, track)
    else:
        _MEMOS.pop(id(m), None)
    return state
