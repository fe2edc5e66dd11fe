"""Where the time of a captured step goes: the compiled graph against the Python around it, warm
and after a nested-autograd step, and inside the graph the GEMMs against the fused kernels.

Issue 10's two open CPU targets (the Two Moons CRR step ≥ 3× nested autograd, the tiny MLP's
derivative step ≥ 1.5× JAX's jet) are timed by ``bench_suite.py`` with its methods interleaved, so
that each step starts with caches the others left. This script splits those same two steps:

- ``step``: the whole call (``CRRLoss(compile=True).train_step``; ``CompiledLoss.backward_with_aux``
  for the derivative step), median over back-to-back calls;
- ``graph``: the compiled graph alone, called with the inputs the step passed it (recorded once);
  ``step − graph`` is what runs around it (guards, draws, value checks, the optimizer's
  bookkeeping, autograd);
- the same two, each call made right after one step of nested autograd (the paper's method, as
  the benchmark times it): what the interleaved benchmark sees;
- inside the graph, from a copy compiled with inductor's kernel profiling: the BLAS calls (GEMMs)
  and inductor's fused C++ kernels, per step.

Times are medians over ``--reps`` calls; the kernel split comes from ``torch.profiler`` (its own
overhead included, so read it as shares). CPU only (the GPU's split is gpu_check's business).

Run from the repository root::

    python bench/step_split.py --threads 1                       # print the tables
    python bench/step_split.py --threads 1 --summary cpu_step_split   # also bench/results/cpu_step_split.md
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_suite as bs  # noqa: E402  (the harness: workloads, the nested baseline, environment)

import curvrate_fast as cf  # noqa: E402
from curvrate_fast import crr as _crr  # noqa: E402

CRR = dict(orders=(2, 3), directions="per_order", subset=64, scale=3e-3)   # the paper's §5.2 setting


def _stats_us(ts: List[float]) -> Tuple[float, float, float]:
    q = statistics.quantiles(ts, n=4)
    return statistics.median(ts) * 1e6, q[0] * 1e6, q[2] * 1e6


def _median_us(fn: Callable[[], object], reps: int) -> Tuple[float, float, float]:
    """(median, q1, q3) in µs of ``fn``'s wall time over ``reps`` back-to-back calls."""
    ts: List[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return _stats_us(ts)


def _after_us(fn: Callable[[], object], before: Callable[[], object], reps: int
              ) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """(``fn``'s, ``before``'s) (median, q1, q3) in µs over ``reps`` alternations before, fn, both
    timed: ``fn`` always runs with the caches ``before`` left."""
    ts: List[float] = []
    tb: List[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        before()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        tb.append(t1 - t0)
        ts.append(t2 - t1)
    return _stats_us(ts), _stats_us(tb)


def _graph_call(program: cf.CompiledLoss, call: Callable[[], object]) -> Tuple[Callable, tuple, list]:
    """(the compiled graph of the entry ``call`` replays, copies of the inputs it passed, what it
    returned): ``call`` is made once more with that entry's runner wrapped to record them. Copies,
    made before the call, because a training step's graph writes the optimizer's update into its
    inputs (the parameters and the optimizer's state): calling it with fresh copies of these
    repeats the same work on the same values, and calling it again and again with one set of
    copies repeats the same work on values that move as a training run's do (``clone`` keeps the
    dense layouts the graph was compiled for)."""
    call()
    entry = max(program._cache.values(), key=lambda e: e.used)
    runner, seen = entry.runner, {}

    def recording(*inputs):
        seen["inputs"] = tuple(t.clone() for t in inputs)
        outputs = runner(*inputs)
        seen["outputs"] = [o.clone() for o in outputs]
        return outputs

    entry.runner = recording
    try:
        call()
    finally:
        entry.runner = runner
    return runner, seen["inputs"], seen["outputs"]


def _kernel_split(call: Callable[[], object], steps: int) -> Dict[str, float]:
    """µs per step of the graph's BLAS calls and of its fused kernels (``call`` must replay a graph
    compiled with ``cpp.enable_kernel_profile``), and of the whole graph call, under the profiler."""
    from torch.profiler import profile
    with profile() as prof:
        for _ in range(steps):
            call()
    out = {"graph": 0.0, "gemm": 0.0, "fused kernels": 0.0}
    for e in prof.key_averages():
        t = float(e.self_cpu_time_total)
        if "CompiledFxGraph" in e.key:
            out["graph"] += float(e.cpu_time_total)
        elif "mm_out" in e.key or "cpu_mm" in e.key or "avx512_mm" in e.key:
            out["gemm"] += t
        elif "cpp_fused" in e.key:
            out["fused kernels"] += t
    return {k: v / steps for k, v in out.items()}


def two_moons_crr(reps: int, warmup: int = 3, backend: str = "inductor") -> Dict[str, object]:
    """The Two Moons CRR training step (CE + penalty + gradients + Adam as one captured graph);
    ``backend="eager"`` (the smoke test) replays the recorded graph uncompiled, with no kernel split."""
    model, x, y = bs.build_workload("two_moons", train=True)   # as bench_suite's two_moons_crr

    def train_step(options):
        crit = cf.CRRLoss(**CRR, compile=backend, compile_options=options)
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        program = _crr._program("total", backend, _crr._options_key(options, backend))
        return (lambda: crit.train_step(m, x, y, opt)), program

    mb = copy.deepcopy(model)
    ob = torch.optim.Adam(mb.parameters(), lr=1e-3)

    def nested():
        ob.zero_grad(set_to_none=True)
        loss = F.cross_entropy(mb(x), y) + bs._baseline_crr(mb, x, y, CRR["orders"], CRR["directions"],
                                                            CRR["subset"], CRR["scale"])
        loss.backward()
        ob.step()

    return _split("Two Moons CRR training step (CRRLoss(compile=True).train_step, Adam)",
                  train_step, nested, backend, reps, warmup)


def tiny_mlp_derivatives(reps: int, warmup: int = 3, backend: str = "inductor") -> Dict[str, object]:
    """The tiny MLP's derivative step: d_1..d_4 per sample and the backward of mean|d|, captured
    (bench_suite's ``captured`` method, on a copy of the model)."""
    model, x, y = bs.build_workload("two_moons")
    u = bs.make_directions(x, 1)

    def derivative_step(options):
        step = bs._captured_step(copy.deepcopy(model), x, y, u, 4, backend=backend, options=options)
        return step, step.program

    nested = bs.make_step("baseline", copy.deepcopy(model), x, y, u, 4)
    return _split("tiny MLP 2→64→64→2, d_1..d_4 + backward of mean|d| (CompiledLoss)",
                  derivative_step, nested, backend, reps, warmup)


def _split(name: str, make_step: Callable, nested: Callable[[], object], backend: str, reps: int,
           warmup: int) -> Dict[str, object]:
    """One workload's split. ``make_step(options)`` → (the step, its CompiledLoss) with those
    compile options: once plainly (timed; its graph recorded), once with inductor's kernel
    profiling (the kernel split; inductor only)."""
    step, program = make_step(None)
    for _ in range(warmup):
        step()
    graph, inputs, outputs = _graph_call(program, step)
    profiled = None
    if backend == "inductor":
        profiled, _ = make_step({"cpp.enable_kernel_profile": True})
        for _ in range(warmup):
            profiled()
    work = tuple(t.clone() for t in inputs)      # the timed calls update these, not the record
    out = _measure(name, step, lambda: graph(*work), nested, profiled, reps)
    out["replay"] = (graph, inputs, outputs)
    return out


def _measure(name: str, step, graph, nested, profiled, reps: int) -> Dict[str, object]:
    def graph_alone():
        with torch.no_grad():     # as the step calls it
            graph()

    graph_warm = _median_us(graph_alone, reps)
    step_warm = _median_us(step, reps)
    step_cold, nested_us = _after_us(step, nested, reps)
    graph_cold, _ = _after_us(graph_alone, nested, reps)
    return {"name": name, "step_warm": step_warm, "graph_warm": graph_warm, "step_cold": step_cold,
            "graph_cold": graph_cold, "nested": nested_us,
            "kernels": None if profiled is None else _kernel_split(profiled, reps)}


def format_markdown(results: List[Dict[str, object]], env: Dict[str, object], command: str) -> str:
    lines = ["# Where a captured step's time goes (CPU)", "",
             f"- command: `{command}`",
             f"- device: {env['device']}; torch {env['torch']}, python {env['python']}",
             f"- commit {env['commit']}, date {env['date']}; torch threads: {torch.get_num_threads()}",
             *bs.load_lines(env),
             "- medians (IQR) in µs; *warm*: back-to-back calls; *after nested*: each call right after "
             "one step of nested autograd (as the interleaved benchmark times it); *graph*: the "
             "compiled graph alone with the inputs the step passed it; *around the graph* = step − graph",
             ""]
    for r in results:
        sw, gw, sc, gc = r["step_warm"], r["graph_warm"], r["step_cold"], r["graph_cold"]
        k = r["kernels"]
        lines += [f"## {r['name']}", "",
                  "| | step | graph | around the graph | share around |",
                  "|---|---|---|---|---|",
                  f"| warm | {sw[0]:.0f} ({sw[1]:.0f}–{sw[2]:.0f}) | {gw[0]:.0f} ({gw[1]:.0f}–{gw[2]:.0f}) "
                  f"| {sw[0] - gw[0]:.0f} | {100 * (sw[0] - gw[0]) / sw[0]:.0f} % |",
                  f"| after nested | {sc[0]:.0f} ({sc[1]:.0f}–{sc[2]:.0f}) | {gc[0]:.0f} ({gc[1]:.0f}–{gc[2]:.0f}) "
                  f"| {sc[0] - gc[0]:.0f} | {100 * (sc[0] - gc[0]) / sc[0]:.0f} % |",
                  "",
                  f"Nested autograd's step, timed in the same alternation: {r['nested'][0]:.0f} µs "
                  f"({r['nested'][1]:.0f}–{r['nested'][2]:.0f}); its median over the step's after nested: "
                  f"{r['nested'][0] / sc[0]:.2f}× (the benchmark's ratio interleaves more methods).",
                  ""]
        if k is None:
            lines += ["Inside the graph: not split (not an inductor graph).", ""]
            continue
        lines += [f"Inside the graph (profiled copy, µs per step): graph {k['graph']:.0f}, of which "
                  f"GEMMs {k['gemm']:.0f} ({100 * k['gemm'] / max(k['graph'], 1e-9):.0f} %), inductor's "
                  f"fused kernels {k['fused kernels']:.0f} ({100 * k['fused kernels'] / max(k['graph'], 1e-9):.0f} %), "
                  f"the rest (allocation, the C++ wrapper) {k['graph'] - k['gemm'] - k['fused kernels']:.0f}.",
                  ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=300, help="timed calls per cell (default 300)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 pins to one core)")
    p.add_argument("--summary", default=None, help="also write bench/results/NAME.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.threads == 1:
            bs.pin_to_one_cpu()
    env = bs.environment(torch.device("cpu"))          # before the runs: the load they start under
    results = [two_moons_crr(args.reps), tiny_mlp_derivatives(args.reps)]
    command = "python bench/step_split.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = format_markdown(results, env, command.strip())
    print(text)
    if args.summary:
        path = os.path.join(HERE, "results", args.summary + ".md")
        with open(path, "w") as f:
            f.write(text + "\n")
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
