"""GPU benchmark of the fused Triton jet kernels (docs/design.md §5).

Measures, with ``triton.testing.do_bench`` medians (warm-up first; do_bench flushes the L2 before
every timed call), inside one run:

1. the achievable memory bandwidth: ``torch.clone`` of a buffer of at least 8 L2 sizes (read + write);
2. the fused activation-jet kernels at order K = 4 on ≥ 16M elements per coefficient (8M with
   --quick): the forward and the backward kernel, as achieved GB/s and as a fraction of the copy
   bandwidth, against the reference chain of torch ops (``curvrate_fast.series``) eager and, if it
   compiles, under ``torch.compile``; plus both backwards through autograd (what training pays);
3. the linear jet, forward: every entry of :func:`_linear_variants` (complete implementations of
   φ(x Wᵀ + b) on the stacked input jet: the reference, cuBLAS GEMM + fused epilogue, the fused
   Triton GEMM, the library's per-shape choice), and for context its parts: the stacked
   (n+1)·B-row GEMM alone, one GEMM per stored coefficient, the fused bias + activation epilogue alone;
4. the cross-entropy jet at 32k classes, and at 8 rows × 128k classes (the split-over-classes path),
   forward, backward kernel, autograd backward, against the copy bandwidth and the reference chain.

Before it is timed, every kernel's output is checked against the reference evaluated in float64 on
the first and last rows/columns of the same inputs (``rel err``: max over coefficients k of
‖y_k − ref_k‖ / ‖ref_k‖; ``ok``: under the dtype's tolerance).

Writes <out>/kernels-<date>-<device>.json and .md, rewritten after every section (a run cut short
keeps what it measured), with the device, torch and triton versions, git commit and date. Needs a
CUDA GPU; exits with status 2 and a message otherwise. A case that raises is recorded in its row
(``error``) and the run goes on; the exit status is 1 when a case raised or a check failed.

``--smoke`` runs the whole script on CPU through the Triton interpreter (it sets TRITON_INTERPRET=1
before anything imports a kernel) with tiny shapes and a perf_counter timer, without torch.compile
or GPU memory statistics: every section, row kind and writer executes, and any error is raised.
Nothing is measured; the results say "smoke (CPU interpreter, not a benchmark)" and go to a new
temporary folder unless --out is given. bench/test_bench_kernels_smoke.py runs it.

    python bench/bench_kernels.py [--quick] [--no-compile] [--sections activation,linear] [--out DIR]
    python bench/bench_kernels.py --smoke [--out DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOKE_LABEL = "smoke (CPU interpreter, not a benchmark)"
SECTIONS = ("activation", "linear", "cross_entropy")
DEFAULT_KINDS = "tanh,gelu,gelu_tanh,silu,softplus,relu"
LINEAR_KINDS = ("gelu", "relu")
#: a check fails above this relative error: float32 rounding gives ~1e-6, a TF32 GEMM ~3e-4 (the
#: jet amplifies it a few times), bf16 storage ~4e-3; a wrong kernel gives O(1)
TOLERANCE = {"float32": 5e-3, "float16": 1e-2, "bfloat16": 5e-2}
#: rows (and columns) at each end of a tensor that the float64 correctness check looks at
CHECK_ROWS = 64
CHECK_COLS = 1 << 16
#: smoke mode: perf_counter repetitions per timing (each interpreted kernel call costs ~10–100 ms)
SMOKE_REPS = 2
#: a bandwidth figure over fewer bytes than this many L2 sizes is flagged in the console
MIN_L2_MULTIPLE = 4


def _die(msg: str) -> NoReturn:
    print(f"bench_kernels.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _git_commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=str(ROOT), capture_output=True, text=True, timeout=10,
                              check=False)
    try:
        out = git("rev-parse", "HEAD")
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = git("status", "--porcelain")
        if commit != "unknown" and dirty.returncode == 0 and dirty.stdout.strip():
            commit += "-dirty"
        return commit
    except Exception:  # noqa: BLE001 - no git: still benchmark
        return "unknown"


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    p.add_argument("--smoke", action="store_true",
                   help="run every section on CPU under the Triton interpreter with tiny shapes: a test "
                        "of this script, not a benchmark (output in a new temporary folder unless --out)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference chain")
    p.add_argument("--compile-budget", type=float, default=300.0,
                   help="seconds of torch.compile time (summed over cases) after which the remaining cases "
                        "skip it (default 300; each activation case compiles its own graph)")
    p.add_argument("--order", type=int, default=4, help="jet order K (default 4)")
    p.add_argument("--kinds", default=DEFAULT_KINDS, help=f"comma-separated activations ({DEFAULT_KINDS})")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated storage dtypes")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (the copy bandwidth always runs)")
    p.add_argument("--out", default=None,
                   help="output folder (default bench/results; with --smoke a new temporary folder)")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.sections = [s for s in args.sections.split(",") if s]
    if not args.kinds or not args.dtypes:
        p.error("--kinds and --dtypes need at least one entry")
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    bad = [d for d in args.dtypes if d not in TOLERANCE]
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {','.join(TOLERANCE)}")
    if not 1 <= args.order <= 8:
        p.error("--order must be in 1..8 (the kernels' range)")
    return args


def _utc(fmt: str) -> str:
    return time.strftime(fmt, time.gmtime())


# -- the run's context ---------------------------------------------------------------------------
class Ctx:
    """What every case needs: the lazily imported modules, the device, the timer, the sizes, the
    results so far and where they are written."""

    # set by a caller with a time box (bench/gpu_check.py): cases that would start after ``deadline``
    # (time.monotonic()) become "skipped" rows; ``on_case()`` runs after every case
    deadline: float | None = None
    on_case: Callable[[], None] | None = None

    def __init__(self, args, m):
        self.args, self.m = args, m
        torch = m.torch
        self.smoke = args.smoke
        self.K = args.order
        self.dev = torch.device("cpu" if self.smoke else "cuda")
        self.dtypes = {d: getattr(torch, d) for d in args.dtypes}
        self.failed = False
        self.copy_bw = None
        self.results = {"meta": {}, "copy": [], "activation": [], "linear": [], "cross_entropy": []}
        self.compile_backend = "eager" if self.smoke else "inductor"
        self._smoke_compiles_left = 1
        self.compile_spent_s = 0.0
        self._compile_budget_said = False
        if self.smoke:
            self.bench = _cpu_timer(reps=SMOKE_REPS)
            self.l2_bytes = None
        else:
            warmup, rep = (10, 30) if args.quick else (25, 100)
            self.bench = _gpu_timer(torch, m.do_bench, warmup, rep)
            props = torch.cuda.get_device_properties(self.dev)
            self.l2_bytes = int(getattr(props, "L2_cache_size", 0)) or None

    def sync(self) -> None:
        if not self.smoke:
            self.m.torch.cuda.synchronize()

    def compile_wanted(self) -> bool:
        """Whether this activation case times the torch.compile'd reference. Smoke mode exercises that
        code once, with dynamo's "eager" backend (no C++ compiler, seconds instead of minutes)."""
        if self.args.no_compile:
            return False
        if not self.smoke:
            if self.compile_spent_s > self.args.compile_budget:
                if not self._compile_budget_said:
                    print(f"  torch.compile budget spent ({self.compile_spent_s:.0f} s > "
                          f"{self.args.compile_budget:.0f} s): later cases skip the compiled reference")
                    self._compile_budget_said = True
                return False
            return True
        self._smoke_compiles_left -= 1
        return self._smoke_compiles_left >= 0

    # sizes: (smoke, quick, full)
    def size(self, smoke, quick, full):
        return smoke if self.smoke else quick if self.args.quick else full

    def peak_mem(self, fn):
        """Peak CUDA memory (MiB) that one call of ``fn`` allocates on top of what was allocated before;
        None in smoke mode (GPU-only statistic)."""
        if self.smoke:
            return None
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def finish(self, d: dict, fwd: Callable, ref: Callable) -> None:
        """The derived columns of a kernel case: speedups over the reference chain (forward, and the
        autograd backwards), peak memory of one forward of each, bandwidths."""
        d["speedup_vs_reference"] = d["reference_ms"] / d["ms"]
        d["backward_speedup"] = d["reference_backward_ms"] / d["autograd_backward_ms"]
        d["peak_MiB"] = self.peak_mem(fwd)
        d["reference_peak_MiB"] = self.peak_mem(ref)
        self.bandwidth(d)
        self.bandwidth(d, "backward_")

    def bandwidth(self, d: dict, prefix: str = "") -> None:
        """Add ``<prefix>GB/s``, ``<prefix>of_copy`` and ``<prefix>L2x`` (bytes over the L2 size) from
        ``<prefix>bytes`` and ``<prefix>ms``."""
        nbytes, ms = d.get(prefix + "bytes"), d.get(prefix + "ms")
        if not nbytes or not ms:
            return
        d[prefix + "GB/s"] = nbytes / ms / 1e6
        d[prefix + "of_copy"] = d[prefix + "GB/s"] / self.copy_bw if self.copy_bw else None
        if self.l2_bytes:
            d[prefix + "L2x"] = nbytes / self.l2_bytes
            if nbytes < MIN_L2_MULTIPLE * self.l2_bytes:
                print(f"  note: {nbytes / 2**20:.0f} MiB moved is under {MIN_L2_MULTIPLE} L2 sizes; "
                      f"its GB/s is a lower bound of the streaming rate (launch and L2-flush write-back "
                      f"weigh more)")

    def check(self, d: dict, key: str, y, ref, dtype_name: str, gate: bool = True) -> None:
        """Record ``rel_err_<key>`` of ``y`` vs the float64 ``ref``; with ``gate``, set ``ok`` (False
        above the dtype's tolerance, which also makes the exit status 1). The reference chain itself
        is recorded ungated: in bf16 its own rounding is not a kernel failure."""
        err = _rel_err(self.m.torch, y, ref)
        d["rel_err_" + key] = err
        if not gate:
            return
        good = err <= TOLERANCE[dtype_name]
        d["ok"] = bool(d.get("ok", True) and good)
        if not good:
            self.failed = True
            print(f"  CHECK FAILED: {key} relative error {err:.3g} > {TOLERANCE[dtype_name]:.0e} ({dtype_name})")

    def free(self) -> None:
        gc.collect()
        if not self.smoke:
            self.m.torch.cuda.empty_cache()

    def case(self, section: str, desc: dict, fn: Callable[[], list]) -> None:
        """Run one case (``fn`` returns its rows) in its own scope, so its tensors are freed when it
        returns. On the GPU an exception becomes an ``error`` row and the run goes on; in smoke mode
        it is raised (the smoke run exists to catch it). Past ``deadline`` the case is not run: its
        row says ``skipped``."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.results[section].append(dict(desc, skipped="time box of the section spent"))
            if self.on_case:
                self.on_case()
            return
        try:
            rows = fn()
        except Exception as e:  # one failing case must not cost the whole GPU session
            if self.smoke:
                raise
            traceback.print_exc()
            rows = [dict(desc, error=f"{type(e).__name__}: {e}"[:500], ok=False)]
            self.failed = True
            print(f"  {section} {desc}: FAILED ({type(e).__name__}); recorded, going on")
        self.results[section].extend(rows)
        self.free()
        if self.on_case:
            self.on_case()


def _gpu_timer(torch, do_bench, warmup_ms: int, rep_ms: int) -> Callable[[Callable], float]:
    def bench(fn) -> float:
        """Median milliseconds of ``fn`` by do_bench (CUDA events; L2 flushed before each timed call;
        warm-up and repetitions in milliseconds)."""
        torch.cuda.synchronize()
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return bench


def _cpu_timer(reps: int) -> Callable[[Callable], float]:
    def bench(fn) -> float:
        """Median milliseconds of ``reps`` perf_counter-timed calls (smoke mode: exercises the code,
        measures nothing)."""
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return float(statistics.median(times))
    return bench


def _rel_err(torch, y, ref) -> float:
    """max over coefficients k of ‖y_k − ref_k‖ / ‖ref_k‖ (0 where both vanish); inf when ``y`` has
    the wrong shape or a non-finite value."""
    if tuple(y.shape) != tuple(ref.shape):
        return math.inf
    y, ref = y.double(), ref.double()
    if not bool(torch.isfinite(y).all()):
        return math.inf
    worst = 0.0
    for k in range(ref.shape[0]):
        num = float(torch.linalg.vector_norm(y[k] - ref[k]))
        den = float(torch.linalg.vector_norm(ref[k]))
        if num > 0:
            worst = max(worst, num / den if den > 0 else math.inf)
    return worst


def _ends(torch, t, dim: int, m: int):
    """The first and last ``m`` entries of ``t`` along ``dim`` (all of it when short), contiguous."""
    n = t.shape[dim]
    if n <= 2 * m:
        return t.contiguous()
    return torch.cat([t.narrow(dim, 0, m), t.narrow(dim, n - m, m)], dim=dim)


def _dtname(dt) -> str:
    return str(dt).replace("torch.", "")


# -- 1. copy bandwidth ---------------------------------------------------------------------------
def _copy_case(ctx: Ctx, nbytes: int) -> list:
    torch = ctx.m.torch
    t = torch.empty(nbytes // 4, dtype=torch.float32, device=ctx.dev).normal_()
    ms = ctx.bench(lambda: t.clone())
    d = {"bytes": 2 * t.numel() * 4, "buffer_MiB": t.numel() * 4 / 2**20, "ms": ms}
    d["GB/s"] = d["bytes"] / ms / 1e6
    if ctx.l2_bytes:
        d["L2x"] = d["bytes"] / ctx.l2_bytes
    return [d]


# -- 2. activation jets --------------------------------------------------------------------------
def _activation_case(ctx: Ctx, dt, N: int, nu: int, stored: str, kind: str) -> list:
    m, K = ctx.m, ctx.K
    torch, CF = m.torch, m.CF
    kind_n, p0, p1 = m.activation_params(kind, {})
    es = torch.empty((), dtype=dt).element_size()
    d = {"kind": kind, "dtype": _dtname(dt), "stored": stored, "nu": nu, "N": N, "K": K}

    c = torch.randn(nu, N, device=ctx.dev, dtype=dt)
    gy = torch.randn(K + 1, N, device=ctx.dev, dtype=dt)

    def fwd():
        return CF.activation_jet(c, kind, K)

    def bwd_kernel():
        return m.ops.activation_jet_bwd(c, None, gy, kind_n, K, p0, p1, 1, 1)

    def ref():
        return m.reference_activation_jet(c, kind_n, K, p0, p1)

    # correctness first: the full-size outputs, compared on their first and last columns
    y, gx = fwd(), bwd_kernel()
    cs = _ends(torch, c, 1, CHECK_COLS).double().requires_grad_(True)
    gys = _ends(torch, gy, 1, CHECK_COLS).double()
    r64 = m.reference_activation_jet(cs, kind_n, K, p0, p1)
    (g64,) = torch.autograd.grad(r64, cs, gys)
    ctx.check(d, "fwd", _ends(torch, y, 1, CHECK_COLS), r64.detach(), d["dtype"])
    ctx.check(d, "bwd", _ends(torch, gx, 1, CHECK_COLS), g64, d["dtype"])
    del y, gx, cs, gys, r64, g64

    d["ms"] = ctx.bench(fwd)
    d["bytes"] = (nu + K + 1) * N * es                    # read nu rows, write K+1
    d["backward_ms"] = ctx.bench(bwd_kernel)
    d["backward_bytes"] = (2 * nu + K + 1) * N * es       # read nu + K+1 rows, write nu
    d["reference_ms"] = ctx.bench(ref)
    d["autograd_backward_ms"] = _autograd_backward_ms(ctx, c, gy, lambda t: CF.activation_jet(t, kind, K))
    d["reference_backward_ms"] = _autograd_backward_ms(
        ctx, c, gy, lambda t: m.reference_activation_jet(t, kind_n, K, p0, p1))
    d["compiled_reference_ms"] = d["compile_s"] = None
    if ctx.compile_wanted():
        d["compiled_reference_ms"], d["compile_s"] = _compiled_ms(
            ctx, lambda t: m.reference_activation_jet(t, kind_n, K, p0, p1), c, kind)
    ctx.finish(d, fwd, ref)
    print(f"act {kind:9s} {d['dtype']:8s} {stored:15s} fwd {d['ms']:8.3f} ms ({_pct(d.get('of_copy'))} of copy) "
          f"bwd {d['backward_ms']:8.3f} ms ({_pct(d.get('backward_of_copy'))})  ref {d['reference_ms']:8.3f} ms "
          f"(x{d['speedup_vs_reference']:.1f})  autograd bwd x{d['backward_speedup']:.1f} vs ref"
          + (f"  compiled ref {d['compiled_reference_ms']:.3f} ms" if d["compiled_reference_ms"] else "")
          + f"  err {d['rel_err_fwd']:.1e}/{d['rel_err_bwd']:.1e}")
    return [d]


def _autograd_backward_ms(ctx: Ctx, x, g, forward: Callable) -> float:
    """Time ``autograd.grad`` of ``forward(x')`` w.r.t. a leaf copy x' of x, with output gradient g
    (the graph is built once and retained)."""
    torch = ctx.m.torch
    xg = x.detach().clone().requires_grad_(True)
    out = forward(xg)
    return ctx.bench(lambda: torch.autograd.grad(out, xg, g, retain_graph=True))


def _compiled_ms(ctx: Ctx, fn: Callable, x, label: str):
    """(median ms, compile seconds) of torch.compile(fn)(x), or (None, None) if it does not compile.
    The dynamo caches are reset first: every case compiles the same code object, and past the
    recompile limit dynamo would silently run it eagerly."""
    torch = ctx.m.torch
    torch._dynamo.reset()
    try:
        cfn = torch.compile(fn, dynamic=False, backend=ctx.compile_backend)
        t0 = time.perf_counter()
        try:
            cfn(x)
            ctx.sync()
        finally:
            compile_s = time.perf_counter() - t0
            ctx.compile_spent_s += compile_s
        return ctx.bench(lambda: cfn(x)), compile_s
    except Exception as e:  # noqa: BLE001 - recorded as "not compiled"
        print(f"  torch.compile of the reference failed for {label}: {type(e).__name__}: {str(e)[:200]}")
        return None, None


def _pct(v) -> str:
    return "–" if v is None else f"{v:.0%}"


def _section_activation(ctx: Ctx) -> None:
    K = ctx.K
    N = ctx.size(128, 8 * 2**20, 16 * 2**20)  # elements per coefficient
    for dname, dt in ctx.dtypes.items():
        for stored, nu in (("input jet (n=1)", 2), ("full jet", K + 1)):
            for kind in ctx.args.kinds:
                desc = {"kind": kind, "dtype": dname, "stored": stored, "nu": nu, "N": N, "K": K}
                ctx.case("activation", desc,
                         lambda dt=dt, nu=nu, stored=stored, kind=kind: _activation_case(ctx, dt, N, nu, stored,
                                                                                          kind))


# -- 3. linear jet -------------------------------------------------------------------------------
def _linear_reference_fn(m) -> Callable:
    def reference(x, W, b, kind, K):
        """One GEMM + bias on coefficient 0 + the reference chain (also the float64 oracle)."""
        kind_n, p0, p1 = m.activation_params(kind, {})
        pre = m.F.linear(x, W)
        pre = m.torch.cat([(pre[0] + b).unsqueeze(0), pre[1:]])
        return m.reference_activation_jet(pre, kind_n, K, p0, p1)
    return reference


def _linear_variants(m) -> list:
    """Complete implementations of φ(x Wᵀ + b) on the stacked input jet, as (name, fn) pairs with
    fn(x (n+1, B, in), W (out, in), b (out,), kind, K) → (K+1, B, out). The first is the reference
    (speedups are against it). Each entry gets a float64 check and a timed forward row per shape,
    dtype and kind: adding a variant is adding an entry here."""
    CF = m.CF

    def impl(name):
        return lambda x, W, b, kind, K: CF.linear_activation_jet(x, W, b, kind, K, impl=name)

    return [
        ("reference (GEMM + bias + series chain)", _linear_reference_fn(m)),
        ("cuBLAS GEMM + fused epilogue (impl=cublas)", impl("cublas")),
        ("Triton GEMM, bias+act epilogue (impl=fused)", impl("fused")),
        # the library's default: times both on its first call per shape (outside the timed region
        # here: the check calls each variant once first) and keeps the faster; "cublas" without CUDA
        ("per-shape measured choice (impl=auto)", impl("auto")),
    ]


def _linear_case(ctx: Ctx, dt, B: int, fin: int, fout: int) -> list:
    m, K = ctx.m, ctx.K
    torch, F, CF = m.torch, m.F, m.CF
    n1 = 2  # input jet (x, u): n + 1 = 2 stored coefficients
    es = torch.empty((), dtype=dt).element_size()
    flops = 2 * n1 * B * fin * fout
    base = {"in": fin, "out": fout, "B": B, "dtype": _dtname(dt), "stored": n1, "K": K}
    x = torch.randn(n1, B, fin, device=ctx.dev, dtype=dt)
    W = torch.randn(fout, fin, device=ctx.dev, dtype=dt) / fin ** 0.5
    b = torch.randn(fout, device=ctx.dev, dtype=dt)
    rows = []

    def row(kind, variant, ms, gemm=True, **extra):
        d = dict(base, kind=kind, variant=variant, ms=ms, **extra)
        d["TFLOP/s"] = flops / ms / 1e9 if gemm else None   # the GEMM's flops over the row's time
        d["x_gemm"] = ms / gemm_ms
        rows.append(d)
        return d

    # the parts (no activation): the stacked GEMM, and one GEMM per stored coefficient
    gemm_ms = ctx.bench(lambda: F.linear(x, W))
    row(None, "GEMM only, stacked (n+1)·B rows", gemm_ms)
    row(None, "GEMM per stored coefficient", ctx.bench(lambda: [F.linear(x[i], W) for i in range(n1)]))

    reference = _linear_reference_fn(m)
    xs = _ends(torch, x, 1, CHECK_ROWS)
    for kind in LINEAR_KINDS:
        ref64 = reference(xs.double(), W.double(), b.double(), kind, K)
        # a piecewise-linear kind jumps where the exact pre-activation is ~0, and a low-precision GEMM
        # may put such an element on the other side of the kink: compare only away from it
        away = None
        if kind in ("relu", "leaky_relu"):
            pre0 = (F.linear(xs[0].double(), W.double()) + b.double()).abs()
            away = pre0 > TOLERANCE[base["dtype"]] * pre0.max()
        # the epilogue alone, on a precomputed pre-activation jet
        pre = F.linear(x, W)
        d = {}
        ctx.check(d, "fwd", _ends(torch, CF.bias_activation_jet(pre, b, kind, K), 1, CHECK_ROWS),
                  _linear_epilogue64(m, _ends(torch, pre, 1, CHECK_ROWS).double(), b.double(), kind, K),
                  base["dtype"])
        d = row(kind, "fused epilogue only (bias + activation jet)",
                ctx.bench(lambda pre=pre, kind=kind: CF.bias_activation_jet(pre, b, kind, K)), gemm=False, **d)
        d["bytes"] = (n1 + K + 1) * B * fout * es + fout * es
        ctx.bandwidth(d)
        del pre
        ref_ms = None
        for i, (name, fn) in enumerate(_linear_variants(m)):
            d = {}
            ys = _ends(torch, fn(x, W, b, kind, K), 1, CHECK_ROWS)
            if away is None:
                ctx.check(d, "fwd", ys, ref64, base["dtype"], gate=i > 0)
            else:
                ctx.check(d, "fwd", torch.where(away, ys.double(), 0.0), torch.where(away, ref64, 0.0),
                          base["dtype"], gate=i > 0)
            d = row(kind, name, ctx.bench(lambda fn=fn, kind=kind: fn(x, W, b, kind, K)), **d)
            ref_ms = d["ms"] if ref_ms is None else ref_ms
            d["speedup_vs_reference"] = ref_ms / d["ms"]
    for d in rows:
        rate = f"{d['TFLOP/s']:7.1f} TFLOP/s" if d["TFLOP/s"] is not None else " " * 15
        extra = f"  {d['of_copy']:.0%} of copy" if d.get("of_copy") is not None else ""
        err = f"  err {d['rel_err_fwd']:.1e}" if "rel_err_fwd" in d else ""
        print(f"linear {fin}x{fout} B={B} {base['dtype']:8s} {d['kind'] or '':5s} {d['variant']:44s} "
              f"{d['ms']:8.3f} ms  {rate}  x{d['x_gemm']:.2f} GEMM{extra}{err}")
    return rows


def _linear_epilogue64(m, pre64, b64, kind, K):
    kind_n, p0, p1 = m.activation_params(kind, {})
    pre64 = m.torch.cat([(pre64[0] + b64).unsqueeze(0), pre64[1:]])
    return m.reference_activation_jet(pre64, kind_n, K, p0, p1)


def _section_linear(ctx: Ctx) -> None:
    B = ctx.size(4, 2048, 8192)
    shapes = ctx.size(((24, 40), (40, 24)), ((1024, 1024), (4096, 4096)), ((1024, 1024), (4096, 4096)))
    for fin, fout in shapes:
        for dname, dt in ctx.dtypes.items():
            desc = {"in": fin, "out": fout, "B": B, "dtype": dname}
            ctx.case("linear", desc, lambda dt=dt, fin=fin, fout=fout: _linear_case(ctx, dt, B, fin, fout))


# -- 4. cross-entropy jet ------------------------------------------------------------------------
def _ce_case(ctx: Ctx, dt, B: int, C: int, nu: int) -> list:
    m, K = ctx.m, ctx.K
    torch, CF = m.torch, m.CF
    es = torch.empty((), dtype=dt).element_size()
    d = {"B": B, "C": C, "dtype": _dtname(dt), "stored": nu, "K": K}
    z = torch.randn(nu, B, C, device=ctx.dev, dtype=dt)
    t = torch.randint(0, C, (B,), device=ctx.dev)
    gl = torch.randn(K + 1, B, device=ctx.dev, dtype=dt)
    _, lse = m.ops.cross_entropy_jet_fwd(z, t, None, K, -100)

    def fwd():
        return CF.cross_entropy_jet(z, t, K)

    def bwd_kernel():
        return m.ops.cross_entropy_jet_bwd(z, t, None, lse, gl, K, -100)

    def ref():
        return m.reference_cross_entropy_jet(z, t, K)

    # correctness first, on the first and last rows of the batch
    loss, gz = fwd(), bwd_kernel()
    zs = _ends(torch, z, 1, CHECK_ROWS).double().requires_grad_(True)
    r64 = m.reference_cross_entropy_jet(zs, _ends(torch, t, 0, CHECK_ROWS), K)
    (g64,) = torch.autograd.grad(r64, zs, _ends(torch, gl, 1, CHECK_ROWS).double())
    ctx.check(d, "fwd", _ends(torch, loss, 1, CHECK_ROWS), r64.detach(), d["dtype"])
    ctx.check(d, "bwd", _ends(torch, gz, 1, CHECK_ROWS), g64, d["dtype"])
    del loss, gz, zs, r64, g64

    d["ms"] = ctx.bench(fwd)
    d["bytes"] = nu * B * C * es                      # one pass over the logits jet
    d["backward_ms"] = ctx.bench(bwd_kernel)
    d["backward_bytes"] = 2 * nu * B * C * es         # read z, write its gradient
    d["reference_ms"] = ctx.bench(ref)
    d["autograd_backward_ms"] = _autograd_backward_ms(ctx, z, gl, lambda zz: CF.cross_entropy_jet(zz, t, K))
    d["reference_backward_ms"] = _autograd_backward_ms(
        ctx, z, gl, lambda zz: m.reference_cross_entropy_jet(zz, t, K))
    ctx.finish(d, fwd, ref)
    print(f"CE B={B} C={C} {d['dtype']:8s} stored {nu}: fwd {d['ms']:.3f} ms ({_pct(d.get('of_copy'))} of copy)  "
          f"bwd {d['backward_ms']:.3f} ms ({_pct(d.get('backward_of_copy'))})  ref {d['reference_ms']:.3f} ms "
          f"(x{d['speedup_vs_reference']:.1f})  autograd bwd x{d['backward_speedup']:.1f} vs ref  "
          f"err {d['rel_err_fwd']:.1e}/{d['rel_err_bwd']:.1e}")
    return [d]


def _section_cross_entropy(ctx: Ctx) -> None:
    K = ctx.K
    # (B, C): B·C·(bytes per element) ≥ 2.7 L2 sizes of an H100 even for bf16 with 2 stored
    # coefficients; 8 rows × 128k classes (a language-model vocabulary) takes the split-over-classes
    # path (choose_num_splits) instead of one program per row
    shapes = ctx.size(((4, 96),), ((1024, 32768), (8, 131072)), ((1024, 32768), (4096, 32768), (8, 131072)))
    for dname, dt in ctx.dtypes.items():
        for B, C in shapes:
            for nu in (2, K + 1):
                desc = {"B": B, "C": C, "dtype": dname, "stored": nu, "K": K}
                ctx.case("cross_entropy", desc, lambda dt=dt, B=B, C=C, nu=nu: _ce_case(ctx, dt, B, C, nu))


# -- main ----------------------------------------------------------------------------------------
def _import_modules(smoke: bool):
    """Import torch, triton and the kernels (after TRITON_INTERPRET is settled) into a namespace."""
    try:
        import torch
    except ImportError:
        _die("torch is not installed.")
    if not smoke and not torch.cuda.is_available():
        _die("no CUDA GPU is available on this machine; this benchmark measures GPU kernels only "
             "(the CPU reference path has its own benchmarks; --smoke tests this script on CPU). "
             "Nothing was measured.")
    try:
        import triton
        from triton.testing import do_bench
    except ImportError:
        _die("triton is not installed (pip install triton); the fused kernels need it.")
    import torch.nn.functional as F

    from curvrate_fast import functions as CF
    from curvrate_fast.functions._backend import kernel_module
    from curvrate_fast.functions._ops import ops
    from curvrate_fast.functions.activation import (
        activation_params,
        reference_activation_jet,
    )
    from curvrate_fast.functions.cross_entropy import reference_cross_entropy_jet

    interpreted = {kernel_module(n).INTERPRET for n in ("activation_jet", "cross_entropy_jet")}
    if interpreted != {smoke}:
        _die(f"the kernel modules were imported with TRITON_INTERPRET={'1' if not smoke else 'unset'}, "
             f"this run needs the opposite; run bench_kernels.py in a fresh process.")
    return SimpleNamespace(torch=torch, triton=triton, do_bench=do_bench, F=F, CF=CF, ops=ops(),
                           kernel_module=kernel_module, activation_params=activation_params,
                           reference_activation_jet=reference_activation_jet,
                           reference_cross_entropy_jet=reference_cross_entropy_jet)


def _meta(ctx: Ctx) -> dict:
    m, args = ctx.m, ctx.args
    torch = m.torch
    meta = {"mode": SMOKE_LABEL if ctx.smoke else ("quick" if args.quick else "full"),
            "smoke": ctx.smoke, "quick": bool(args.quick), "torch": torch.__version__,
            "triton": m.triton.__version__, "python": platform.python_version(), "commit": _git_commit(),
            "date": _utc("%Y-%m-%dT%H:%M:%SZ"), "order": ctx.K, "tf32": False, "kinds": args.kinds,
            "dtypes": args.dtypes, "sections": args.sections,
            "timer": (f"time.perf_counter, median of {SMOKE_REPS} calls (smoke: measures nothing)" if ctx.smoke else
                      "triton.testing.do_bench median (CUDA events, L2 flushed before each call)"),
            "compile": None if args.no_compile else f"torch.compile(backend={ctx.compile_backend!r})"
                       + (", first case only (smoke)" if ctx.smoke else ""),
            "compile_budget_s": args.compile_budget, "compile_spent_s": 0.0, "section_s": {}}
    if ctx.smoke:
        meta.update(device=f"CPU ({platform.machine()}), Triton interpreter", sm=None, memory_GiB=None,
                    L2_MiB=None, cuda=None)
    else:
        props = torch.cuda.get_device_properties(ctx.dev)
        meta.update(device=torch.cuda.get_device_name(ctx.dev), sm=f"{props.major}.{props.minor}",
                    memory_GiB=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    L2_MiB=ctx.l2_bytes / 2**20 if ctx.l2_bytes else None,
                    multiprocessors=props.multi_processor_count)
    return meta


def settle_interpret(smoke: bool) -> None:
    """Set TRITON_INTERPRET=1 for a smoke run; refuse a benchmark run under the interpreter. Call it
    before anything imports triton or a kernel module."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        _die("TRITON_INTERPRET=1 is set: the interpreter cannot be benchmarked; unset it and run on a GPU "
             "(or use --smoke to test this script).")


def setup(args) -> Ctx:
    """Import the modules (TRITON_INTERPRET settled), fix the global settings (tf32 off, seed 0) and
    return the run's :class:`Ctx` with its ``results["meta"]``."""
    m = _import_modules(args.smoke)
    torch = m.torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    ctx = Ctx(args, m)
    ctx.results["meta"] = _meta(ctx)
    return ctx


def run_sections(ctx: Ctx, after: Callable[[], None] | None = None,
                 deadline_for: Callable[[str], float | None] | None = None) -> None:
    """The copy bandwidth, then every section of ``args.sections`` in order; ``after()`` runs after
    each (main writes the files there); ``deadline_for(section)``, if given, sets ``ctx.deadline``
    (time.monotonic()) before each section."""
    meta = ctx.results["meta"]
    # 1. copy bandwidth: one large buffer (≥ 8 L2 sizes) is the streaming ceiling every row compares to
    K = ctx.K
    nbytes = (K + 1) * ctx.size(128, 8 * 2**20, 16 * 2**20) * 4
    if ctx.l2_bytes:
        nbytes = max(nbytes, 8 * ctx.l2_bytes)
    ctx.deadline = deadline_for("copy") if deadline_for else None
    ctx.case("copy", {"buffer_MiB": nbytes / 2**20}, lambda: _copy_case(ctx, nbytes))
    ctx.copy_bw = ctx.results["copy"][0].get("GB/s")
    if ctx.copy_bw:
        print(f"copy bandwidth (clone of {nbytes / 2**20:.4g} MiB, read + write): {ctx.copy_bw:.4g} GB/s")
    if after:
        after()

    runners = {"activation": _section_activation, "linear": _section_linear,
               "cross_entropy": _section_cross_entropy}
    for section in SECTIONS:
        if section not in ctx.args.sections:
            continue
        ctx.deadline = deadline_for(section) if deadline_for else None
        t0 = time.perf_counter()
        runners[section](ctx)
        meta["section_s"][section] = round(time.perf_counter() - t0, 1)
        print(f"-- {section}: {meta['section_s'][section]:.1f} s")
        if after:
            after()
    ctx.deadline = None


def main(argv=None) -> int:
    args = _parse(argv)
    settle_interpret(args.smoke)
    t_start = time.perf_counter()
    ctx = setup(args)
    meta = ctx.results["meta"]
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="bench_kernels_smoke_")) if args.smoke
                                           else ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    devname = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-")
    stem = f"kernels-{_utc('%Y%m%d-%H%M%S')}-{devname}" + ("-smoke" if args.smoke else "")
    paths = (out / (stem + ".json"), out / (stem + ".md"))

    def write():
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        meta["compile_spent_s"] = round(ctx.compile_spent_s, 1)
        paths[0].write_text(json.dumps(ctx.results, indent=1))
        paths[1].write_text(_markdown(ctx.results))

    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}"
          + (f"  [{SMOKE_LABEL}]" if args.smoke else ""))
    run_sections(ctx, after=write)
    print(f"wrote {paths[0]} and {paths[1]} ({meta['wall_s']:.1f} s)")
    if ctx.failed:
        print("some cases failed or did not pass their check (see 'error' / 'ok' in the tables)", file=sys.stderr)
        return 1
    return 0


# -- markdown ------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _table(rows, cols) -> str:
    if not rows:
        return "(none)\n"
    if any("error" in r for r in rows):
        cols = [*cols, ("error", "error")]
    if any("skipped" in r for r in rows):
        cols = [*cols, ("skipped", "skipped")]
    head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(k)) for _, k in cols) + " |\n" for r in rows)
    return head + body


ACTIVATION_COLS = [
    ("kind", "kind"), ("dtype", "dtype"), ("stored", "stored"), ("N", "N"), ("fwd ms", "ms"), ("GB/s", "GB/s"),
    ("of copy", "of_copy"), ("bwd kernel ms", "backward_ms"), ("bwd GB/s", "backward_GB/s"),
    ("bwd of copy", "backward_of_copy"), ("ref ms", "reference_ms"), ("compiled ref ms", "compiled_reference_ms"),
    ("speedup", "speedup_vs_reference"), ("autograd bwd ms", "autograd_backward_ms"),
    ("ref autograd bwd ms", "reference_backward_ms"), ("bwd speedup", "backward_speedup"),
    ("peak MiB", "peak_MiB"), ("ref peak MiB", "reference_peak_MiB"), ("rel err fwd", "rel_err_fwd"),
    ("rel err bwd", "rel_err_bwd"), ("ok", "ok")]
LINEAR_COLS = [
    ("in", "in"), ("out", "out"), ("B", "B"), ("dtype", "dtype"), ("kind", "kind"), ("variant", "variant"),
    ("ms", "ms"), ("GEMM TFLOP/s", "TFLOP/s"), ("× GEMM", "x_gemm"), ("GB/s", "GB/s"), ("of copy", "of_copy"),
    ("speedup vs ref", "speedup_vs_reference"), ("rel err", "rel_err_fwd"), ("ok", "ok")]
CE_COLS = [
    ("B", "B"), ("C", "C"), ("dtype", "dtype"), ("stored", "stored"), ("fwd ms", "ms"), ("GB/s", "GB/s"),
    ("of copy", "of_copy"), ("bwd kernel ms", "backward_ms"), ("bwd GB/s", "backward_GB/s"),
    ("bwd of copy", "backward_of_copy"), ("ref ms", "reference_ms"), ("speedup", "speedup_vs_reference"),
    ("autograd bwd ms", "autograd_backward_ms"), ("ref autograd bwd ms", "reference_backward_ms"),
    ("bwd speedup", "backward_speedup"), ("peak MiB", "peak_MiB"), ("ref peak MiB", "reference_peak_MiB"),
    ("rel err fwd", "rel_err_fwd"), ("rel err bwd", "rel_err_bwd"), ("ok", "ok")]


def _markdown(res) -> str:
    m = res["meta"]
    title = f"# Jet kernel benchmark — {m['device']}" + (f" — {SMOKE_LABEL}" if m["smoke"] else "")
    s = [title + "\n\n"]
    if m["smoke"]:
        s.append(f"**{SMOKE_LABEL}**: tiny shapes through the Triton interpreter; the times only show "
                 "that every code path ran.\n\n")
    s.append(f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, commit `{m['commit']}`, {m['date']}, "
             f"order K = {m['order']}, tf32 off, {m['mode']} run. Times: {m['timer']}, in ms. "
             "\"of copy\" is achieved bandwidth over the bandwidth of `torch.clone` of a large buffer; "
             "\"rel err\" is max over coefficients of ‖y − ref‖/‖ref‖ against the float64 reference "
             "on the first and last rows of the inputs.\n\n")
    for c in res["copy"]:
        if "GB/s" in c:
            s.append(f"Copy bandwidth: {_fmt(c['GB/s'])} GB/s ({_fmt(c['buffer_MiB'])} MiB cloned, "
                     f"{_fmt(c['ms'])} ms).\n")
        else:
            s.append(f"Copy bandwidth: not measured ({c.get('error') or c.get('skipped')}).\n")
    s.append("\n## Activation jets (fused kernel vs reference chain of torch ops)\n\n")
    s.append(_table(res["activation"], ACTIVATION_COLS))
    s.append("\n## Linear jet (variants of φ(x Wᵀ + b) on the stacked jet, and their parts)\n\n")
    s.append(_table(res["linear"], LINEAR_COLS))
    s.append("\n## Cross-entropy jet\n\n")
    s.append(_table(res["cross_entropy"], CE_COLS))
    return "".join(s)


if __name__ == "__main__":
    sys.exit(main())
