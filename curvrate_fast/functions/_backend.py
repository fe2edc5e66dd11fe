"""Where the Triton kernels come from, and whether they can run.

The kernels live in the top-level ``triton_kernels/`` folder of the repository, which setup.py installs
as the subpackage ``curvrate_fast.triton_kernels``. In a source checkout (``PYTHONPATH=.``) that
subpackage does not exist on disk under ``curvrate_fast/``, so :func:`kernels` registers the folder
under the same dotted name; the kernels import their siblings relatively, so both layouts work.
Nothing here imports triton until a kernel is actually needed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["kernels", "kernel_module", "triton_importable", "interpreting", "triton_available",
           "KERNEL_DTYPES"]

_PKG = "curvrate_fast.triton_kernels"

#: dtypes the kernels take (they compute in fp32; float64 stays on the exact reference path)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: the kernels run on CPU tensors through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_IMPORTABLE = None


def triton_importable() -> bool:
    global _IMPORTABLE
    if _IMPORTABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _IMPORTABLE = True
        except Exception:  # noqa: BLE001 - any import failure means no kernels
            _IMPORTABLE = False
    return _IMPORTABLE


def triton_available(t: torch.Tensor = None) -> bool:
    """True when the fused kernels can run on ``t``: triton imports and either ``t`` is a CUDA tensor
    or ``TRITON_INTERPRET=1`` is set (the interpreter runs them on CPU, for tests).
    ``CURVRATE_DISABLE_TRITON=1`` turns the kernels off everywhere."""
    if os.environ.get("CURVRATE_DISABLE_TRITON", "0") not in ("", "0", "false", "False"):
        return False
    if not triton_importable():
        return False
    if interpreting():
        return True
    return t is not None and t.is_cuda


def kernels() -> ModuleType:
    """The ``curvrate_fast.triton_kernels`` package (installed, or the checkout's folder)."""
    mod = sys.modules.get(_PKG)
    if mod is not None:
        return mod
    try:
        return importlib.import_module(_PKG)
    except ImportError:
        pass
    folder = Path(__file__).resolve().parents[2] / "triton_kernels"
    init = folder / "__init__.py"
    if not init.is_file():
        raise ImportError(f"{_PKG} is not installed and {folder} does not exist")
    spec = importlib.util.spec_from_file_location(_PKG, init, submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_PKG] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[_PKG]
        raise
    parent = sys.modules.get("curvrate_fast")
    if parent is not None:
        parent.triton_kernels = mod
    return mod


_INTERPRETER_PATCHED = False


def _patch_interpreter_index() -> None:
    """Make the Triton interpreter's ``tensor.__index__`` accept one-element arrays.

    A loop such as ``for c0 in range(lo, hi, BLOCK)`` over runtime bounds calls ``__index__`` on the
    interpreter's scalars, which hold 1-element 1-D numpy arrays. Triton up to 3.6 converts them with
    ``int(array)``, which NumPy ≥ 2.4 rejects ("only 0-dimensional arrays can be converted to Python
    scalars"); later Triton squeezes first. This installs the squeezing version after the interpreter
    patches ``tl.tensor`` for a launch, on any Triton version (the same value where both work). Only
    the interpreter is touched; compiled kernels never call ``__index__``."""
    global _INTERPRETER_PATCHED
    if _INTERPRETER_PATCHED:
        return
    _INTERPRETER_PATCHED = True
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no interpreter in this triton: nothing to patch
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def _index(self):
        return int(self.handle.data.item())

    def patch_lang_tensor(tensor, *args, **kwargs):
        out = original(tensor, *args, **kwargs)
        # after the original's own patching; where the interpreter undoes its patches after a launch
        # (Triton 3.6 does), that undo removes this one as well
        tensor.__index__ = _index
        return out

    interpreter._patch_lang_tensor = patch_lang_tensor


def kernel_module(name: str) -> ModuleType:
    """``curvrate_fast.triton_kernels.<name>`` (imports triton)."""
    kernels()
    if interpreting():
        _patch_interpreter_index()
    return importlib.import_module(f"{_PKG}.{name}")
