"""The two documented ways to build the C++ kernels, each in fresh processes: the ahead-of-time
build (``CURVRATE_BUILD_CPP=1 pip install --no-build-isolation .``, here as a wheel) and the JIT
build of ``python -m curvrate_fast build-cpp``, which later processes must find under
``backend="auto"``."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, env=None, cwd=None, timeout=900):
    out = subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_jit_build_is_found_by_a_later_process(tmp_path):
    env = {"CURVRATE_CPP_BUILD_DIR": str(tmp_path / "cache")}
    _run([sys.executable, "-m", "curvrate_fast", "build-cpp"], env)
    probe = ("from curvrate_fast import cpp_backend, jets\n"
             "from curvrate_fast.rules.activations import use_cpp\n"
             "import torch\n"
             "assert cpp_backend.available(), 'the cached build was not found'\n"
             "assert use_cpp(torch.zeros(2, dtype=torch.float64), 4)\n"
             "assert hasattr(torch.ops.curvrate_fast, 'avx512_mm')\n"
             "print('found')\n")
    assert "found" in _run([sys.executable, "-c", probe], env)
    # a changed source (here: a different recorded hash) is not loaded
    (tmp_path / "cache" / "curvrate_fast_cpp.source-sha256").write_text("stale")
    probe_stale = ("from curvrate_fast import cpp_backend\n"
                   "print('found' if cpp_backend.available() else 'not found')\n")
    assert "not found" in _run([sys.executable, "-c", probe_stale], env)


@pytest.mark.slow
def test_install_time_build(tmp_path):
    """CURVRATE_BUILD_CPP=1 with --no-build-isolation puts curvrate_fast/_C*.so into the wheel,
    and the package loads it from there (no JIT build)."""
    import shutil
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("setup.py", "README.md", "curvrate_fast", "triton_kernels", "csrc"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.so")}
                                        if (ROOT / name).is_dir() else {}))
    wheel_dir = tmp_path / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
          "-w", str(wheel_dir), str(src)], {"CURVRATE_BUILD_CPP": "1"}, cwd=tmp_path)
    wheel = next(wheel_dir.glob("curvrate_fast-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert any(n.startswith("curvrate_fast/_C") and n.endswith(".so") for n in names), names
        assert not any(n.startswith("bench") for n in names)
        z.extractall(site)
    probe = ("import sys; sys.path.insert(0, sys.argv[1])\n"
             "import curvrate_fast, torch\n"
             "from curvrate_fast import cpp_backend\n"
             "assert curvrate_fast.__file__.startswith(sys.argv[1]), curvrate_fast.__file__\n"
             "assert cpp_backend.available(), 'the installed _C library was not loaded'\n"
             "c = torch.randn(2, 5, dtype=torch.float64)\n"
             "y = cpp_backend.activation_jet_cpp(c, 'tanh', 3)\n"
             "a, b = torch.randn(9, 7), torch.randn(7, 20)\n"   # the GEMM of csrc/cpu_gemm.cpp is in it too
             "assert torch.allclose(torch.ops.curvrate_fast.avx512_mm(a, b), a @ b, atol=1e-5)\n"
             "print('ok', tuple(y.shape))\n")
    out = _run([sys.executable, "-c", probe, str(site)],
               {"CURVRATE_CPP_BUILD_DIR": str(tmp_path / "empty-cache")}, cwd=tmp_path)
    assert "ok (4, 5)" in out
