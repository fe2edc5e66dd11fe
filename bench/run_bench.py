#!/usr/bin/env python
"""Script entry of the benchmark suite (the code lives in ``curvrate_fast/bench_suite.py`` so the
installed CLI can run it too: ``python -m curvrate_fast bench ...``).

    python bench/run_bench.py --quick                 # smoke run, < 60 s on a 2-core CPU
    python bench/run_bench.py                         # full suite -> bench/results/
    python bench/run_bench.py --profile               # torch.profiler table of our MLP784 step
    python bench/run_bench.py --help

See bench/README.md for the columns and the GPU notes.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from curvrate_fast.bench_suite import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in argv):
        argv += ["--out-dir", os.path.join(ROOT, "bench", "results")]  # from any working dir
    sys.exit(main(argv))
