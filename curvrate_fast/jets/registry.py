"""The rule registry, the engine's settings (strict mode, backend) and the op tracker.

A rule is a function with the signature of the torch function it replaces; it receives the
arguments as the model passed them (``JetTensor`` among them) and returns jets. Rules are
registered against every alias of an op (``torch.tanh``, ``Tensor.tanh``, ``F.tanh``...).
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

__all__ = ["register", "lookup", "settings", "engine_settings", "OpReport", "track_ops", "BACKENDS",
           "LINEAR_IMPLS", "tracing"]

_RULES: Dict[object, Callable] = {}

BACKENDS = ("auto", "reference", "triton", "cpp")
#: how a linear layer followed by an activation runs on the Triton backend: "auto" measures both per
#: shape on the GPU and keeps the faster; "cublas": one cuBLAS GEMM + the fused bias/activation kernel;
#: "fused": one Triton GEMM with the bias and activation jet in its epilogue
LINEAR_IMPLS = ("auto", "cublas", "fused")


def register(*funcs: object) -> Callable[[Callable], Callable]:
    """Register the decorated rule for each of ``funcs`` (torch functions, methods or getters)."""
    def deco(rule: Callable) -> Callable:
        for f in funcs:
            if f is None:
                continue
            _RULES[f] = rule
        return rule
    return deco


def lookup(func: object) -> Optional[Callable]:
    try:
        return _RULES.get(func)
    except TypeError:  # unhashable callables never have rules
        return None


def op_name(func: object) -> str:
    """A readable name for a torch function, method or property getter."""
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
    if name.startswith("TensorBase."):
        return "Tensor." + name[len("TensorBase."):]
    if mod in ("torch", "torch._C._VariableFunctions") or (mod is None and "." not in name):
        return "torch." + name
    return name


@dataclass
class OpReport:
    """Which torch functions ran through Taylor rules and which took the generic fallback.

    ``rules`` and ``fallbacks`` map an op name to the number of calls; ``decomposed`` counts Python
    functions (e.g. ``F.multi_head_attention_forward``) that were run op by op through the rules.

    Example::

        >>> with curvrate_fast.track_ops() as report:
        ...     curvrate_fast.jet(model, x, u, order=3)
        >>> report.fallbacks      # {} when every op had a rule
    """
    rules: Dict[str, int] = field(default_factory=collections.Counter)
    fallbacks: Dict[str, int] = field(default_factory=collections.Counter)
    decomposed: Dict[str, int] = field(default_factory=collections.Counter)

    def record(self, kind: str, func: object) -> None:
        getattr(self, kind)[op_name(func)] += 1

    def __str__(self) -> str:
        lines = ["ops through Taylor rules:"]
        lines += [f"  {k}: {v}" for k, v in sorted(self.rules.items())] or ["  (none)"]
        lines.append("ops through the generic fallback (exact, slow):")
        lines += [f"  {k}: {v}" for k, v in sorted(self.fallbacks.items())] or ["  (none)"]
        if self.decomposed:
            lines.append("Python functions decomposed into their ops:")
            lines += [f"  {k}: {v}" for k, v in sorted(self.decomposed.items())]
        return "\n".join(lines)


class _Settings(threading.local):
    def __init__(self) -> None:
        self.strict: bool = os.environ.get("CURVRATE_STRICT", "0") not in ("", "0", "false", "False")
        self.backend: str = os.environ.get("CURVRATE_BACKEND", "auto")
        # NaN/Inf checks of x and u: one reduction each, and a device sync on CUDA
        self.check_finite: bool = os.environ.get("CURVRATE_CHECK_FINITE", "1") not in (
            "", "0", "false", "False")
        self.linear_impl: str = os.environ.get("CURVRATE_LINEAR_IMPL", "auto")
        self.trackers: List[OpReport] = []


settings = _Settings()


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def tracing() -> bool:
    """True while torch.compile (dynamo) or make_fx/AOT tracing records the ops. Checks that read
    tensor values in Python (NaN/Inf scans, label ranges) cannot run then and are skipped."""
    import torch
    if torch.compiler.is_compiling():
        return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None


def check_linear_impl(impl: str) -> str:
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"linear_impl must be one of {LINEAR_IMPLS}, got {impl!r} "
                         "(from the argument or CURVRATE_LINEAR_IMPL)")
    return impl


@contextlib.contextmanager
def engine_settings(*, strict: Optional[bool] = None, backend: Optional[str] = None,
                    check_finite: Optional[bool] = None, linear_impl: Optional[str] = None) -> Iterator[None]:
    """Temporarily set the engine's strict mode, backend, input NaN/Inf checks and linear+activation
    implementation (``None`` keeps the current value). ``check_finite=False`` skips the NaN/Inf scan
    of x and u, which costs a device sync per call on CUDA (env: ``CURVRATE_CHECK_FINITE=0``).
    ``linear_impl`` (env ``CURVRATE_LINEAR_IMPL``): on the Triton backend, a linear layer followed by
    an activation runs as one cuBLAS GEMM + one fused bias/activation kernel ("cublas"), as one
    Triton GEMM with the bias and activation jet in its epilogue ("fused"), or as whichever of the
    two measured faster for that shape on this GPU ("auto", the default).

    Example::

        >>> with curvrate_fast.engine_settings(backend="reference", check_finite=False):
        ...     loss = crit(model, x, y)
    """
    old = (settings.strict, settings.backend, settings.check_finite, settings.linear_impl)
    try:
        if strict is not None:
            settings.strict = bool(strict)
        if backend is not None:
            settings.backend = _check_backend(backend)
        if check_finite is not None:
            settings.check_finite = bool(check_finite)
        if linear_impl is not None:
            settings.linear_impl = check_linear_impl(linear_impl)
        yield
    finally:
        settings.strict, settings.backend, settings.check_finite, settings.linear_impl = old


@contextlib.contextmanager
def track_ops() -> Iterator[OpReport]:
    """Record which ops used Taylor rules and which fell back, inside the ``with`` block.

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
