"""GPU benchmark of the fused Triton jet kernels (DESIGN.md §5).

Measures, with ``triton.testing.do_bench`` medians, inside one run:

1. the achievable memory bandwidth: ``torch.clone`` of the same number of bytes (read + write);
2. the fused activation-jet kernels (forward and backward) at order K = 4 on ≥ 16M elements per
   coefficient, as achieved GB/s and as a fraction of the copy bandwidth, against the reference
   chain of torch ops (``curvrate_fast.series``) eager and, if it compiles, under ``torch.compile``;
3. the linear jet: one cuBLAS GEMM on the stacked (n+1)·B rows alone, the same GEMM + the fused
   bias/activation epilogue, the reference (GEMM + bias + reference chain), and one GEMM per stored
   coefficient (what a per-coefficient implementation launches);
4. the cross-entropy jet at 32k classes (forward, backward) against the copy bandwidth and the
   reference chain.

Writes bench/results/kernels-<date>-<device>.json and .md with the device name, torch and triton
versions, git commit and date. Needs a CUDA GPU; exits with a message otherwise.

    python bench/bench_kernels.py [--quick] [--no-compile] [--out bench/results]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _die(msg: str) -> None:
    print(f"bench_kernels.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(ROOT), capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=str(ROOT), capture_output=True, text=True,
                               timeout=10)
        if commit != "unknown" and dirty.returncode == 0 and dirty.stdout.strip():
            commit += "-dirty"
        return commit
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference chain")
    p.add_argument("--order", type=int, default=4, help="jet order K (default 4)")
    p.add_argument("--kinds", default="tanh,gelu,gelu_tanh,silu,softplus,relu",
                   help="comma-separated activations")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated storage dtypes")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder")
    args = p.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        _die("TRITON_INTERPRET=1 is set: the interpreter cannot be benchmarked; unset it and run on a GPU.")
    try:
        import torch
    except ImportError:
        _die("torch is not installed.")
    if not torch.cuda.is_available():
        _die("no CUDA GPU is available on this machine; this benchmark measures GPU kernels only "
             "(the CPU reference path has its own benchmarks). Nothing was measured.")
    try:
        import triton
        from triton.testing import do_bench
    except ImportError:
        _die("triton is not installed (pip install triton); the fused kernels need it.")

    import torch.nn.functional as F

    from curvrate_fast import functions as CF
    from curvrate_fast.functions.activation import reference_activation_jet
    from curvrate_fast.functions.cross_entropy import reference_cross_entropy_jet

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    K = args.order
    quick = args.quick
    rep, warmup = (30, 10) if quick else (100, 25)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dts = [dtypes[d] for d in args.dtypes.split(",") if d]
    kinds = [k for k in args.kinds.split(",") if k]

    def bench(fn) -> float:
        """Median milliseconds."""
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def peak_mem(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)

    results = {"meta": {}, "copy": [], "activation": [], "linear": [], "cross_entropy": []}
    props = torch.cuda.get_device_properties(dev)
    results["meta"] = {
        "device": torch.cuda.get_device_name(dev), "sm": f"{props.major}.{props.minor}",
        "memory_GiB": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "commit": _git_commit(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "order": K, "quick": quick, "tf32": False,
    }
    print(f"# {results['meta']['device']}  torch {torch.__version__}  triton {triton.__version__}  "
          f"commit {results['meta']['commit']}")

    # -- 1. copy bandwidth ------------------------------------------------------------------------
    def copy_gbps(nbytes: int) -> float:
        t = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).normal_()
        ms = bench(lambda: t.clone())
        gbps = 2 * t.numel() * 4 / ms / 1e6
        results["copy"].append({"bytes": int(t.numel() * 4), "ms": ms, "GB/s": gbps})
        del t
        return gbps

    N = (4 if quick else 16) * 2**20   # elements per coefficient (≥ 16M in the full run)
    copy_bw = copy_gbps((K + 1) * N * 4)
    print(f"copy bandwidth (clone of {(K + 1) * N * 4 / 2**20:.0f} MiB): {copy_bw:.0f} GB/s")

    def row(d: dict) -> dict:
        if "bytes" in d and d.get("ms"):
            d["GB/s"] = d["bytes"] / d["ms"] / 1e6
            d["of_copy"] = d["GB/s"] / copy_bw
        return d

    # -- 2. activation jets -------------------------------------------------------------------------
    for dt in dts:
        es = torch.tensor([], dtype=dt).element_size()
        for nu_name, nu in (("input jet (n=1)", 2), ("full jet", K + 1)):
            c = torch.randn(nu, N, device=dev, dtype=dt)
            gy = torch.randn(K + 1, N, device=dev, dtype=dt)
            for kind in kinds:
                fwd = lambda: CF.activation_jet(c, kind, K)  # noqa: E731
                ms_f = bench(fwd)
                cg = c.detach().clone().requires_grad_(True)
                y = CF.activation_jet(cg, kind, K)
                ms_b = bench(lambda: torch.autograd.grad(y, cg, gy, retain_graph=True))
                ref = lambda: reference_activation_jet(c, kind, K)  # noqa: E731
                ms_r = bench(ref)
                yr = reference_activation_jet(cg, kind, K)
                ms_rb = bench(lambda: torch.autograd.grad(yr, cg, gy, retain_graph=True))
                del yr
                ms_c = None
                if not args.no_compile:
                    try:
                        cref = torch.compile(lambda t: reference_activation_jet(t, kind, K), dynamic=False)
                        cref(c)
                        ms_c = bench(lambda: cref(c))
                    except Exception as e:  # noqa: BLE001
                        print(f"  torch.compile of the reference failed for {kind}: {type(e).__name__}")
                mem_f = peak_mem(fwd)
                mem_r = peak_mem(ref)
                d = row({"kind": kind, "dtype": str(dt).replace("torch.", ""), "stored": nu_name, "N": N,
                         "K": K, "ms": ms_f, "bytes": (nu + K + 1) * N * es, "backward_ms": ms_b,
                         "backward_bytes": (2 * nu + K + 1) * N * es, "reference_ms": ms_r,
                         "reference_backward_ms": ms_rb, "compiled_reference_ms": ms_c,
                         "speedup_vs_reference": ms_r / ms_f, "backward_speedup": ms_rb / ms_b,
                         "peak_MiB": mem_f / 2**20, "reference_peak_MiB": mem_r / 2**20})
                d["backward_GB/s"] = d["backward_bytes"] / ms_b / 1e6
                d["backward_of_copy"] = d["backward_GB/s"] / copy_bw
                results["activation"].append(d)
                print(f"act {kind:9s} {d['dtype']:8s} {nu_name:15s} fwd {ms_f:7.3f} ms {d['GB/s']:6.0f} GB/s "
                      f"({d['of_copy']:.0%} of copy)  bwd {ms_b:7.3f} ms ({d['backward_of_copy']:.0%})  "
                      f"ref {ms_r:7.3f} ms (x{d['speedup_vs_reference']:.1f})"
                      + (f"  compiled ref {ms_c:.3f} ms" if ms_c else ""))
                del y, cg
            del c, gy
            torch.cuda.empty_cache()

    # -- 3. linear jet -------------------------------------------------------------------------------
    B = 2048 if quick else 8192
    for (fin, fout) in ((1024, 1024), (4096, 4096)):
        for dt in dts:
            n1 = 2  # input jet (x, u): n + 1 = 2 stored coefficients
            x = torch.randn(n1, B, fin, device=dev, dtype=dt)
            W = torch.randn(fout, fin, device=dev, dtype=dt) / fin ** 0.5
            b = torch.randn(fout, device=dev, dtype=dt)
            for kind in ("gelu", "relu"):
                ms_mm = bench(lambda: F.linear(x, W))
                ms_ours = bench(lambda: CF.linear_activation_jet(x, W, b, kind, K))

                def ref():
                    pre = F.linear(x, W)
                    pre = torch.cat([(pre[0] + b).unsqueeze(0), pre[1:]])
                    return reference_activation_jet(pre, kind, K)

                ms_ref = bench(ref)
                ms_sep = bench(lambda: [F.linear(x[i], W) for i in range(n1)])
                flops = 2 * n1 * B * fin * fout
                es = torch.tensor([], dtype=dt).element_size()
                epi_bytes = (n1 + K + 1) * B * fout * es
                d = {"in": fin, "out": fout, "B": B, "dtype": str(dt).replace("torch.", ""), "kind": kind,
                     "stored": n1, "K": K, "gemm_ms": ms_mm, "gemm_TFLOP/s": flops / ms_mm / 1e9,
                     "fused_ms": ms_ours, "epilogue_ms": ms_ours - ms_mm,
                     "epilogue_GB/s": epi_bytes / max(ms_ours - ms_mm, 1e-6) / 1e6,
                     "reference_ms": ms_ref, "separate_gemms_ms": ms_sep, "speedup_vs_reference": ms_ref / ms_ours}
                results["linear"].append(d)
                print(f"linear {fin}x{fout} B={B} {d['dtype']:8s} {kind:5s} gemm {ms_mm:.3f} ms "
                      f"({d['gemm_TFLOP/s']:.0f} TFLOP/s)  gemm+epilogue {ms_ours:.3f} ms  ref {ms_ref:.3f} ms "
                      f"(x{d['speedup_vs_reference']:.1f})  {n1} per-coefficient gemms {ms_sep:.3f} ms")
            del x, W, b
            torch.cuda.empty_cache()

    # -- 4. cross-entropy jet ----------------------------------------------------------------------
    C = 32768
    for dt in dts:
        es = torch.tensor([], dtype=dt).element_size()
        for B in ((128, 512) if quick else (256, 1024)):
            for nu in (2, K + 1):
                z = torch.randn(nu, B, C, device=dev, dtype=dt)
                t = torch.randint(0, C, (B,), device=dev)
                gl = torch.randn(K + 1, B, device=dev, dtype=dt)
                ms_f = bench(lambda: CF.cross_entropy_jet(z, t, K))
                zg = z.detach().clone().requires_grad_(True)
                loss = CF.cross_entropy_jet(zg, t, K)
                ms_b = bench(lambda: torch.autograd.grad(loss, zg, gl, retain_graph=True))
                ms_r = bench(lambda: reference_cross_entropy_jet(z, t, K))
                lr = reference_cross_entropy_jet(zg, t, K)
                ms_rb = bench(lambda: torch.autograd.grad(lr, zg, gl, retain_graph=True))
                d = row({"B": B, "C": C, "dtype": str(dt).replace("torch.", ""), "stored": nu, "K": K, "ms": ms_f,
                         "bytes": nu * B * C * es, "backward_ms": ms_b, "backward_bytes": 2 * nu * B * C * es,
                         "reference_ms": ms_r, "reference_backward_ms": ms_rb,
                         "speedup_vs_reference": ms_r / ms_f, "backward_speedup": ms_rb / ms_b,
                         "peak_MiB": peak_mem(lambda: CF.cross_entropy_jet(z, t, K)) / 2**20,
                         "reference_peak_MiB": peak_mem(lambda: reference_cross_entropy_jet(z, t, K)) / 2**20})
                d["backward_GB/s"] = d["backward_bytes"] / ms_b / 1e6
                d["backward_of_copy"] = d["backward_GB/s"] / copy_bw
                results["cross_entropy"].append(d)
                print(f"CE B={B} C={C} {d['dtype']:8s} stored {nu}: fwd {ms_f:.3f} ms {d['GB/s']:.0f} GB/s "
                      f"({d['of_copy']:.0%} of copy)  bwd {ms_b:.3f} ms ({d['backward_of_copy']:.0%})  "
                      f"ref {ms_r:.3f} ms (x{d['speedup_vs_reference']:.1f}) ref bwd {ms_rb:.3f} ms")
                del z, zg, loss, lr
                torch.cuda.empty_cache()

    # -- write -------------------------------------------------------------------------------------
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    devname = re.sub(r"[^A-Za-z0-9]+", "-", results["meta"]["device"]).strip("-")
    base = out / f"kernels-{stamp}-{devname}"
    base.with_suffix(".json").write_text(json.dumps(results, indent=1))
    base.with_suffix(".md").write_text(_markdown(results))
    print(f"wrote {base}.json and {base}.md")
    return 0


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _table(rows, cols) -> str:
    if not rows:
        return "(none)\n"
    head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(k)) for _, k in cols) + " |\n" for r in rows)
    return head + body


def _markdown(res) -> str:
    m = res["meta"]
    s = [f"# Jet kernel benchmark — {m['device']}\n",
         f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, commit `{m['commit']}`, {m['date']}, "
         f"order K = {m['order']}, tf32 off{' (quick run)' if m['quick'] else ''}. Times are do_bench medians (ms); "
         "\"of copy\" is achieved bandwidth over the bandwidth of `torch.clone` of the same bytes.\n"]
    for c in res["copy"]:
        s.append(f"Copy bandwidth: {c['GB/s']:.0f} GB/s ({c['bytes'] / 2**20:.0f} MiB cloned).\n")
    s.append("\n## Activation jets (fused kernel vs reference chain of torch ops)\n\n")
    s.append(_table(res["activation"], [
        ("kind", "kind"), ("dtype", "dtype"), ("stored", "stored"), ("N", "N"), ("fwd ms", "ms"),
        ("GB/s", "GB/s"), ("of copy", "of_copy"), ("bwd ms", "backward_ms"), ("bwd of copy", "backward_of_copy"),
        ("ref ms", "reference_ms"), ("ref bwd ms", "reference_backward_ms"),
        ("compiled ref ms", "compiled_reference_ms"), ("speedup", "speedup_vs_reference"),
        ("bwd speedup", "backward_speedup"), ("peak MiB", "peak_MiB"), ("ref peak MiB", "reference_peak_MiB")]))
    s.append("\n## Linear jet (one stacked GEMM + fused epilogue)\n\n")
    s.append(_table(res["linear"], [
        ("in", "in"), ("out", "out"), ("B", "B"), ("dtype", "dtype"), ("kind", "kind"), ("gemm ms", "gemm_ms"),
        ("TFLOP/s", "gemm_TFLOP/s"), ("gemm+epilogue ms", "fused_ms"), ("epilogue GB/s", "epilogue_GB/s"),
        ("reference ms", "reference_ms"), ("per-coefficient gemms ms", "separate_gemms_ms"),
        ("speedup", "speedup_vs_reference")]))
    s.append("\n## Cross-entropy jet\n\n")
    s.append(_table(res["cross_entropy"], [
        ("B", "B"), ("C", "C"), ("dtype", "dtype"), ("stored", "stored"), ("fwd ms", "ms"), ("GB/s", "GB/s"),
        ("of copy", "of_copy"), ("bwd ms", "backward_ms"), ("bwd of copy", "backward_of_copy"),
        ("ref ms", "reference_ms"), ("ref bwd ms", "reference_backward_ms"), ("speedup", "speedup_vs_reference"),
        ("bwd speedup", "backward_speedup"), ("peak MiB", "peak_MiB"), ("ref peak MiB", "reference_peak_MiB")]))
    return "".join(s)


if __name__ == "__main__":
    sys.exit(main())
