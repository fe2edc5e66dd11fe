"""The rule table, the engine's settings (backend, input checks, linear implementation)
and the op tracker.

A rule is a function with the signature of the torch function it replaces; it receives the
arguments as the model passed them (``JetTensor`` among them) and returns jets. Rules are
registered against every alias of an op (``torch.tanh``, ``Tensor.tanh``, ``F.tanh``,
``torch.ops.aten.tanh``...). Registering a second rule for a callable that already has one is an
error: two modules silently overriding each other is how wrong answers hide.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

__all__ = ["register", "unregister", "lookup", "has_rule", "settings", "engine_settings",
           "configure", "OpReport", "track_ops", "BACKENDS", "LINEAR_IMPLS", "tracing",
           "RuleRegistrationError", "op_name"]

_RULES: Dict[object, Callable] = {}

#: where the elementwise and linear jet kernels run: "auto" picks by device (Triton on CUDA, the
#: C++ kernels on CPU once built, else the pure-PyTorch reference rules)
BACKENDS = ("auto", "reference", "triton", "cpp")
#: how a linear layer followed by an activation runs on the Triton backend: "auto" measures both per
#: shape on the GPU and keeps the faster; "cublas": one cuBLAS GEMM + the fused bias/activation kernel;
#: "fused": one Triton GEMM with the bias and activation jet in its epilogue
LINEAR_IMPLS = ("auto", "cublas", "fused")


class RuleRegistrationError(ValueError):
    """A rule was registered for a callable that already has one."""


def register(*funcs: object, override: bool = False) -> Callable[[Callable], Callable]:
    """Register the decorated rule for each of ``funcs`` (torch functions, methods, property
    getters or ``torch.ops`` overloads). ``override=True`` replaces an existing rule on purpose
    (e.g. a user's faster rule); otherwise a second registration raises.

    Example::

        >>> @curvrate_fast.register(torch.special.expit)
        ... def my_expit(x):
        ...     return torch.sigmoid(x)          # a composition of ops that have rules
    """
    def deco(rule: Callable) -> Callable:
        for f in funcs:
            if f is None:
                continue
            old = _RULES.get(f)
            if old is not None and old is not rule and not override:
                raise RuleRegistrationError(
                    f"{op_name(f)} already has the Taylor rule {getattr(old, '__qualname__', old)} "
                    f"(from {getattr(old, '__module__', '?')}); pass override=True to replace it")
            _RULES[f] = rule
        return rule
    return deco


def unregister(*funcs: object) -> None:
    """Remove the rules of ``funcs`` (a test or a user undoing ``register``)."""
    for f in funcs:
        _RULES.pop(f, None)


def lookup(func: object) -> Optional[Callable]:
    try:
        return _RULES.get(func)
    except TypeError:  # unhashable callables never have rules
        return None


def has_rule(func: object) -> bool:
    return lookup(func) is not None


def op_name(func: object) -> str:
    """A readable name for a torch function, method, property getter or ``torch.ops`` overload."""
    import torch
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(func)
    self_obj = getattr(func, "__self__", None)
    if type(func).__name__ == "method-wrapper" and getattr(func, "__name__", "") == "__get__":
        return "Tensor." + str(getattr(self_obj, "__name__", "?"))  # a property getter
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if name is None:
        name = repr(func)
    mod = getattr(func, "__module__", None)
    if mod and (mod.startswith("torch.nn.functional") or mod == "torch._C._nn"):
        return "F." + name
    if name.startswith("_VariableFunctionsClass."):
        return "torch." + name[len("_VariableFunctionsClass."):]
    if mod == "torch._C._special" or name.startswith("special_"):
        return "torch.special." + name[len("special_"):] if name.startswith("special_") else name
    if mod == "torch._C._linalg" or name.startswith("linalg_"):
        return "torch.linalg." + name[len("linalg_"):] if name.startswith("linalg_") else name
    if mod == "torch._C._fft" or name.startswith("fft_"):
        return "torch.fft." + name[len("fft_"):] if name.startswith("fft_") else name
    if name.startswith("TensorBase."):
        return "Tensor." + name[len("TensorBase."):]
    if mod in ("torch", "torch._C._VariableFunctions") or (mod is None and "." not in name):
        return "torch." + name
    return name


@dataclass
class OpReport:
    """Which torch functions ran through which path of the engine (docs/engine.md):

    - ``rules``: a Taylor rule of this library ran;
    - ``decomposed``: a Python function (``F.multi_head_attention_forward``, ``torch.norm``...) ran
      op by op, each of its ops through its own rule;
    - ``constants``: the op's result does not depend differentiably on the jets (an integer or
      piecewise-constant result, or a value computed inside a ``torch.no_grad()`` region).

    An op without a rule raises ``RuleMissingError``; there is no third, inexact path.

    Example::

        >>> with curvrate_fast.track_ops() as report:
        ...     curvrate_fast.jet(model, x, u, order=3)
        >>> report.rules["F.gelu"]
        2
    """
    rules: Dict[str, int] = field(default_factory=collections.Counter)
    decomposed: Dict[str, int] = field(default_factory=collections.Counter)
    constants: Dict[str, int] = field(default_factory=collections.Counter)

    def record(self, kind: str, func: object) -> None:
        getattr(self, kind)[op_name(func)] += 1

    def __str__(self) -> str:
        def block(title, d):
            return [title] + ([f"  {k}: {v}" for k, v in sorted(d.items())] or ["  (none)"])
        lines = block("ops through Taylor rules:", self.rules)
        lines += block("Python functions run op by op through the rules:", self.decomposed)
        lines += block("ops whose results are constants along the path:", self.constants)
        return "\n".join(lines)


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected 1/0, true/false, yes/no or on/off")


def _env_choice(name: str, default: str, choices) -> str:
    raw = os.environ.get(name, "") or default
    if raw not in choices:
        raise ValueError(f"environment variable {name}={raw!r}: expected one of {choices}")
    return raw


class _Defaults:
    """Process-wide defaults: read once from the environment, changed by :func:`configure`."""

    def __init__(self) -> None:
        if os.environ.get("CURVRATE_STRICT", ""):
            _strict_deprecated()
        self.backend = _env_choice("CURVRATE_BACKEND", "auto", BACKENDS)
        # NaN/Inf checks of x and u: one reduction each, and a device sync on CUDA
        self.check_finite = _env_flag("CURVRATE_CHECK_FINITE", True)
        self.linear_impl = _env_choice("CURVRATE_LINEAR_IMPL", "auto", LINEAR_IMPLS)


_defaults = _Defaults()


class _Settings(threading.local):
    """The settings in force on this thread: the process defaults, changed for a ``with`` block by
    :func:`engine_settings`. Also holds the engine's per-thread state (trackers, the grad-mode
    bookkeeping of the dispatcher)."""

    def __init__(self) -> None:
        self.backend: str = _defaults.backend
        self.check_finite: bool = _defaults.check_finite
        self.linear_impl: str = _defaults.linear_impl
        self.trackers: List[OpReport] = []
        # grad-mode bookkeeping (see dispatcher.model_call): inside an entry point's model call,
        # a torch.no_grad() region entered by the model makes the values it computes constants
        self.model_calls: int = 0
        # the caller ran the entry point under no_grad: the model runs with grad mode on (so that
        # the model's own no_grad regions can be seen) and the rules run under no_grad
        self.rules_without_grad: bool = False
        self.rule_depth: int = 0
        # (row groups G, samples B') of a jet pass whose G groups of rows must share their random
        # draws (per-order CRR's polarization rows: jets/draws.py); (1, 0) otherwise
        self.draw_groups: Tuple[int, int] = (1, 0)


settings = _Settings()


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ValueError("backend='triton' needs the triton package (pip install triton), "
                             "which is not importable here") from e
    return backend


def check_linear_impl(impl: str) -> str:
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"linear_impl must be one of {LINEAR_IMPLS}, got {impl!r} "
                         "(from the argument or CURVRATE_LINEAR_IMPL)")
    return impl


def tracing() -> bool:
    """True while torch.compile (dynamo) or make_fx/AOT tracing records the ops. Checks that read
    tensor values in Python (NaN/Inf scans, label ranges) cannot run then and are skipped."""
    import torch
    if torch.compiler.is_compiling():
        return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None


def _strict_deprecated() -> None:
    import warnings
    warnings.warn("strict (and CURVRATE_STRICT) has no effect and will be removed: the engine has no "
                  "inexact fallback any more, so every op without a Taylor rule raises "
                  "RuleMissingError (docs/engine.md)", FutureWarning, stacklevel=4)


def _validated(strict, backend, check_finite, linear_impl) -> dict:
    out = {}
    if strict is not None:
        _strict_deprecated()
    if backend is not None:
        out["backend"] = _check_backend(backend)
    if check_finite is not None:
        out["check_finite"] = bool(check_finite)
    if linear_impl is not None:
        out["linear_impl"] = check_linear_impl(linear_impl)
    return out


def configure(*, strict: Optional[bool] = None, backend: Optional[str] = None,
              check_finite: Optional[bool] = None, linear_impl: Optional[str] = None) -> None:
    """Set the engine's settings for the whole process (every thread, from now on); ``None``
    keeps a setting. The same settings can be changed for one ``with`` block on one thread by
    :func:`engine_settings`, and their initial values come from the environment variables
    ``CURVRATE_STRICT``, ``CURVRATE_BACKEND``, ``CURVRATE_CHECK_FINITE`` and
    ``CURVRATE_LINEAR_IMPL``.

    Example::

        >>> curvrate_fast.configure(check_finite=False)   # trusted training loop: no NaN scan
    """
    new = _validated(strict, backend, check_finite, linear_impl)
    for k, v in new.items():
        setattr(_defaults, k, v)
        setattr(settings, k, v)


@contextlib.contextmanager
def engine_settings(*, strict: Optional[bool] = None, backend: Optional[str] = None,
                    check_finite: Optional[bool] = None, linear_impl: Optional[str] = None) -> Iterator[None]:
    """Change the engine's settings for the ``with`` block, on this thread only (``None`` keeps a
    setting; use :func:`configure` for the whole process).

    - ``strict``: deprecated, no effect (every op without a rule raises; there is no fallback).
    - ``backend``: "auto", "reference", "triton" or "cpp" (env ``CURVRATE_BACKEND``).
    - ``check_finite=False`` skips the NaN/Inf scan of x and u, which costs a device sync per call
      on CUDA (env ``CURVRATE_CHECK_FINITE=0``).
    - ``linear_impl`` (env ``CURVRATE_LINEAR_IMPL``): on the Triton backend, a linear layer followed
      by an activation runs as one cuBLAS GEMM + one fused bias/activation kernel ("cublas"), as
      one Triton GEMM with the bias and activation jet in its epilogue ("fused"), or as whichever
      of the two measured faster for that shape on this GPU ("auto", the default).

    It is a context manager: calling it without ``with`` changes nothing.

    Example::

        >>> with curvrate_fast.engine_settings(backend="reference", check_finite=False):
        ...     loss = crit(model, x, y)
    """
    new = _validated(strict, backend, check_finite, linear_impl)
    old = {k: getattr(settings, k) for k in new}
    try:
        for k, v in new.items():
            setattr(settings, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(settings, k, v)


@contextlib.contextmanager
def track_ops() -> Iterator[OpReport]:
    """Record which ops used Taylor rules or decompositions, or gave constants, inside the
    ``with`` block.

    Example::

        >>> with curvrate_fast.track_ops() as report:
        ...     curvrate_fast.jet(torch.nn.Mish(), x, u, order=2)
        >>> print(report)
    """
    report = OpReport()
    settings.trackers.append(report)
    try:
        yield report
    finally:
        settings.trackers.remove(report)


def record(kind: str, func: object) -> None:
    for t in settings.trackers:
        t.record(kind, func)
