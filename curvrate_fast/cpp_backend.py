"""The ``cpp`` backend: CPU kernels from csrc/ for elementwise activation jets (and the float32
GEMM of captured programs, ``csrc/cpu_gemm.cpp``, which :mod:`curvrate_fast.cpu_gemm` uses where it
measures faster).

The kernels (``csrc/jet_activation.cpp``) compute, per element in one pass, the jets of φ(u(t)) and
φ′(u(t)) by the recurrences of docs/math.md §2, and the backward as the Toeplitz product
ḡu_j = Σ_{k≥j} ḡy_k·w_{k−j} (see ``curvrate_fast.activation_jet``). They are registered as torch
custom ops (``torch.ops.curvrate_fast.*``) and built once with the system C++ compiler:

- ahead of time by installing with ``CURVRATE_BUILD_CPP=1``, or
- on first use (``backend="cpp"``, or :func:`build`), cached under ``CURVRATE_CPP_BUILD_DIR``
  (default ``~/.cache/curvrate_fast/cpp``); about 10–60 s once.

``backend="auto"`` uses them on CPU only when they are already built; otherwise the pure-PyTorch
reference runs, so nothing is compiled behind the user's back.

Example::

    >>> from curvrate_fast import cpp_backend
    >>> cpp_backend.build()              # once
    >>> curvrate_fast.jet(model, x, u, 4, backend="cpp")
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "build", "activation_jet_cpp", "MAX_ORDER"]

from .activation_kinds import MAX_KERNEL_ORDER as MAX_ORDER  # noqa: E402
from .activation_kinds import kernel_params
from .first_order import first_order_backward

_lock = threading.Lock()
_state = {"loaded": False, "error": None, "prebuilt_checked": False}


#: the C++ sources of the one library (setup.py lists the same files)
SOURCES = ("jet_activation.cpp", "cpu_gemm.cpp")


def _sources() -> list:
    here = Path(__file__).resolve().parent
    for folder in (here / "csrc", here.parent / "csrc"):
        if all((folder / name).exists() for name in SOURCES):
            return [folder / name for name in SOURCES]
    raise FileNotFoundError(f"csrc/ ({', '.join(SOURCES)}) is not shipped with this installation")


def _ops_registered() -> bool:
    try:
        return hasattr(torch.ops.curvrate_fast, "activation_jet_fwd")
    except Exception:  # noqa: BLE001
        return False


def _build_dir() -> Path:
    return Path(os.environ.get("CURVRATE_CPP_BUILD_DIR",
                               Path.home() / ".cache" / "curvrate_fast" / "cpp"))


def _source_hash() -> str:
    import hashlib
    h = hashlib.sha256()
    for path in _sources():
        h.update(path.read_bytes())
    h.update(torch.__version__.encode())  # a build against another torch is not loadable
    return h.hexdigest()


_MARKER = "curvrate_fast_cpp.source-sha256"


def _try_prebuilt() -> bool:
    """Load a library built earlier: by ``CURVRATE_BUILD_CPP=1 pip install …``
    (curvrate_fast/_C*.so), or by ``build()``/``build-cpp`` in another process (the JIT cache, used
    only when its recorded source hash matches this installation's source and torch). Looked for
    once per process: this runs on the hot path of every activation rule."""
    if _state["prebuilt_checked"]:
        return False
    _state["prebuilt_checked"] = True
    candidates = sorted(Path(__file__).resolve().parent.glob("_C*.so"))
    cache = _build_dir()
    marker = cache / _MARKER
    try:
        if marker.exists() and marker.read_text().strip() == _source_hash():
            candidates += sorted(cache.glob("curvrate_fast_cpp*.so"))
    except (OSError, FileNotFoundError):
        pass
    for lib in candidates:
        try:
            torch.ops.load_library(str(lib))
        except Exception:  # noqa: BLE001 - a stale or foreign build: fall through to JIT
            continue
        if _ops_registered():
            return True
    return False


def build(verbose: bool = False) -> None:
    """Compile (or load the cached build of) the C++ kernels; raises with the compiler's message."""
    with _lock:
        if _state["loaded"] or _ops_registered() or _try_prebuilt():
            _state["loaded"] = True
            return
        from torch.utils.cpp_extension import load
        build_dir = _build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            load(name="curvrate_fast_cpp", sources=[str(p) for p in _sources()], extra_cflags=["-O3", "-march=native"],
                 is_python_module=False, build_directory=str(build_dir), verbose=verbose)
        except Exception as e:  # noqa: BLE001
            _state["error"] = e
            raise RuntimeError(f"building the curvrate_fast C++ kernels failed: {e}") from e
        # later processes find this build under backend="auto" (_try_prebuilt)
        (build_dir / _MARKER).write_text(_source_hash())
        _state["loaded"] = True


def available(build_if_missing: bool = False) -> bool:
    """Whether the C++ kernels are loaded (building them first if asked)."""
    if _state["loaded"]:
        return True
    if _ops_registered() or _try_prebuilt():
        _state["loaded"] = True
        return True
    if build_if_missing:
        build()
        return True
    return False


class _CppActivationJet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c: Tensor, kind: str, K: int, p1: float, p2: float) -> Tensor:
        shape = c.shape
        y, w = torch.ops.curvrate_fast.activation_jet_fwd(c.reshape(shape[0], -1), kind, K, p1, p2)
        ctx.save_for_backward(w)
        ctx.n_in = shape[0]
        ctx.rest = tuple(shape[1:])
        return y.reshape((K + 1,) + ctx.rest)

    @staticmethod
    @first_order_backward("activation jet (C++ kernels)")
    def backward(ctx, gy: Tensor):
        (w,) = ctx.saved_tensors
        g = torch.ops.curvrate_fast.activation_jet_bwd(gy.reshape(w.shape), w, ctx.n_in)
        return g.reshape((ctx.n_in,) + ctx.rest), None, None, None, None


def activation_jet_cpp(c: Tensor, kind: str, order: int, **params) -> Tensor:
    """Jet (order+1, *S) of an elementwise activation of c (n+1, *S) by the C++ kernel."""
    if order > MAX_ORDER:
        raise ValueError(f"the cpp backend supports orders up to {MAX_ORDER}, got {order}")
    kind, p1, p2 = kernel_params(kind, params)
    return _CppActivationJet.apply(c, kind, order, p1, p2)
