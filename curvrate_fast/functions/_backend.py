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
        setattr(parent, "triton_kernels", mod)
    return mod


def kernel_module(name: str) -> ModuleType:
    """``curvrate_fast.triton_kernels.<name>`` (imports triton)."""
    kernels()
    return importlib.import_module(f"{_PKG}.{name}")
