"""The Triton kernels compile for real NVIDIA GPUs, checked without one.

The interpreter (used by test_triton_kernels.py on CPU) runs kernels as numpy code and accepts
things the GPU compiler rejects (and the reverse). Here every kernel is compiled ahead of time to
PTX and a cubin for sm_90 (H100) and sm_80 (A100) by ``triton.compile`` with the ptxas bundled in the
triton wheel; no GPU or driver is needed. It runs in a subprocess because the kernels must be
imported with TRITON_INTERPRET unset (this test session may have set it).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from curvrate_fast.functions._backend import kernel_module
    A = kernel_module("activation_jet")
    CE = kernel_module("cross_entropy_jet")
    LJ = kernel_module("linear_jet")
    assert not A.INTERPRET and not CE.INTERPRET and not LJ.INTERPRET

    act_fwd = {"x_ptr": "*bf16", "b_ptr": "*fp32", "y_ptr": "*bf16", "N": "i32", "sx": "i32", "sy": "i32",
               "C": "i32", "INNER": "i32", "p0": "fp32", "p1": "fp32", "N_BUCKET": "i32"}
    act_bwd = {"x_ptr": "*fp32", "b_ptr": "*fp32", "gy_ptr": "*fp32", "gx_ptr": "*fp32", "N": "i64", "sx": "i64",
               "sgy": "i64", "sgx": "i64", "C": "i32", "INNER": "i32", "p0": "fp32", "p1": "fp32", "N_BUCKET": "i32"}
    ce_fwd = {"z_ptr": "*fp16", "t_ptr": "*i64", "w_ptr": "*fp32", "loss_ptr": "*fp16", "lse_ptr": "*fp32",
              "B": "i32", "C": "i32", "szk": "i32", "szb": "i32", "slk": "i32", "sek": "i32",
              "ignore_index": "i32"}
    ce_bwd = {"z_ptr": "*fp32", "t_ptr": "*i32", "w_ptr": "*fp32", "lse_ptr": "*fp32", "gl_ptr": "*fp32",
              "gz_ptr": "*fp32", "B": "i32", "C": "i32", "szk": "i64", "szb": "i64", "sek": "i32", "sgk": "i32",
              "sgzk": "i64", "sgzb": "i64", "ignore_index": "i32"}
    ce_part = {"z_ptr": "*bf16", "ws_ptr": "*fp32", "B": "i32", "C": "i32", "szk": "i64", "szb": "i64",
               "swk": "i32", "swb": "i32"}
    ce_comb = {"ws_ptr": "*fp32", "z_ptr": "*bf16", "t_ptr": "*i64", "w_ptr": "*fp32", "loss_ptr": "*bf16",
               "lse_ptr": "*fp32", "B": "i32", "C": "i32", "NS": "i32", "szk": "i64", "szb": "i64", "swk": "i32",
               "swb": "i32", "slk": "i32", "sek": "i32", "ignore_index": "i32"}
    jobs = []
    for act in sorted(A.ACTIVATIONS.values()):
        for fn, sig in ((A.activation_jet_fwd_kernel.fn, act_fwd), (A.activation_jet_bwd_kernel.fn, act_bwd)):
            jobs.append((fn, sig, dict(ACT=act, K=4, NU=2, HAS_BIAS=act % 2 == 0, BLOCK=1024), 8, 90))
    for fn, sig in ((A.activation_jet_fwd_kernel.fn, act_fwd), (A.activation_jet_bwd_kernel.fn, act_bwd)):
        jobs.append((fn, sig, dict(ACT=3, K=6, NU=7, HAS_BIAS=True, BLOCK=512), 4, 90))
        jobs.append((fn, sig, dict(ACT=2, K=1, NU=2, HAS_BIAS=False, BLOCK=256), 2, 80))
    for fn, sig in ((CE.ce_jet_fwd_kernel, ce_fwd), (CE.ce_jet_bwd_kernel, ce_bwd)):
        jobs.append((fn, sig, dict(K=4, NU=2, HAS_W=True, BLOCK_B=1, BLOCK_C=2048), 8, 90))
        jobs.append((fn, sig, dict(K=6, NU=7, HAS_W=False, BLOCK_B=128, BLOCK_C=16), 8, 90))
        jobs.append((fn, sig, dict(K=2, NU=3, HAS_W=False, BLOCK_B=2, BLOCK_C=1024), 8, 80))
    # the split-over-classes path (few rows, many classes): partial sums, then the combine
    jobs.append((CE.ce_jet_partial_kernel, ce_part, dict(K=4, NU=2, BLOCK_B=1, BLOCK_C=2048), 8, 90))
    jobs.append((CE.ce_jet_partial_kernel, ce_part, dict(K=6, NU=7, BLOCK_B=128, BLOCK_C=16), 8, 90))
    jobs.append((CE.ce_jet_partial_kernel, ce_part, dict(K=2, NU=3, BLOCK_B=2, BLOCK_C=1024), 8, 80))
    jobs.append((CE.ce_jet_combine_kernel, ce_comb, dict(K=4, NU=2, HAS_W=True, BLOCK_B=8, BLOCK_S=16), 4, 90))
    jobs.append((CE.ce_jet_combine_kernel, ce_comb, dict(K=6, NU=7, HAS_W=False, BLOCK_B=1, BLOCK_S=2048), 8, 90))
    jobs.append((CE.ce_jet_combine_kernel, ce_comb, dict(K=2, NU=3, HAS_W=True, BLOCK_B=64, BLOCK_S=32), 8, 80))
    gemm = {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32", "M": "i32", "N": "i32",
            "D": "i32", "sxk": "i32", "sxm": "i32", "sxd": "i32", "swn": "i32", "swd": "i32", "syk": "i32",
            "sym": "i32", "p0": "fp32", "p1": "fp32", "M_BUCKET": "i32"}
    gemm16 = dict(gemm, x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16")
    tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, GROUP_M=8)
    for sig, consts, warps, arch in (
            (gemm, dict(ACT=0, K=4, NU=2, HAS_BIAS=True, DOT_PRECISION="ieee", UPCAST=False), 8, 90),
            (gemm, dict(ACT=2, K=3, NU=2, HAS_BIAS=False, DOT_PRECISION="tf32", UPCAST=False), 8, 80),
            (gemm16, dict(ACT=3, K=6, NU=7, HAS_BIAS=True, DOT_PRECISION="tf32", UPCAST=False), 8, 90),
            (gemm16, dict(ACT=8, K=1, NU=2, HAS_BIAS=True, DOT_PRECISION="tf32", UPCAST=False), 4, 90)):
        jobs.append((LJ.linear_act_jet_fused_kernel.fn, sig, dict(consts, **tiles), warps, arch))
    gemm_bwd = dict(gemm, gy_ptr="*fp32", gu_ptr="*fp32", sgyk="i32", sgym="i32", sguk="i32", sgum="i32")
    del gemm_bwd["y_ptr"], gemm_bwd["syk"], gemm_bwd["sym"]
    gemm_bwd16 = dict(gemm_bwd, x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", gy_ptr="*bf16", gu_ptr="*bf16")
    for sig, consts, warps, arch in (
            (gemm_bwd, dict(ACT=0, K=4, NU=2, HAS_BIAS=True, DOT_PRECISION="ieee", UPCAST=False), 8, 90),
            (gemm_bwd16, dict(ACT=3, K=6, NU=7, HAS_BIAS=True, DOT_PRECISION="tf32", UPCAST=False), 8, 80)):
        jobs.append((LJ.linear_act_jet_fused_bwd_kernel.fn, sig, dict(consts, **tiles), warps, arch))
    done = []
    for fn, sig, consts, warps, arch in jobs:
        s = dict(sig)
        s.update({k: "constexpr" for k in consts})
        ck = triton.compile(ASTSource(fn=fn, signature=s, constexprs=consts),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        assert len(ck.asm["cubin"]) > 0
        done.append([fn.__name__, consts, arch])
    print(json.dumps(done))
""")


def _nvidia_backend_usable() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    import triton
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend_usable(), reason="triton's NVIDIA backend / bundled ptxas not available")
def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(done) == 40
