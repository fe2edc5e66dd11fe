"""Training-time overhead of a regularized step over a plain one, measured as a ratio within one
run with the two kinds of step interleaved.

Other processes on the machine slow some seconds down and not others. Timing all plain steps,
then all regularized ones, would charge such a slowdown to one side; so plain and regularized
steps **alternate** on the same batches (plain, regularized, plain, regularized, …), each period of
``every`` step pairs gives one ratio (regularized seconds / plain seconds), and the **median** of
the per-period ratios is reported. A period of ``every`` steps holds exactly one penalized step
(:class:`curvrate_fast.CRRLoss` penalizes calls 0, k, 2k, …), so the ratio is the true average cost
of training with that period. On a loaded machine the ratio stays meaningful while absolute
seconds do not; the numbers are still only as good as the machine is quiet.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["interleaved_overhead"]

Step = Callable[[Tensor, Tensor], None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_overhead(plain: Step, regularized: Step, batches: Sequence[Tuple[Tensor, Tensor]],
                         *, every: int = 1, periods: int = 10, warmup_periods: int = 1
                         ) -> Dict[str, object]:
    """Median over ``periods`` of (seconds of ``every`` regularized steps) / (seconds of ``every``
    plain steps), the steps alternating one by one on ``batches`` (cycled).

    ``warmup_periods`` whole periods run first, untimed (first-call costs; they also keep the
    regularized step's period aligned). Returns ``{"ratio", "ratios", "plain_s", "regularized_s"}``
    with the median per-step seconds of each kind.
    """
    if every < 1 or periods < 1:
        raise ValueError("every and periods must be ≥ 1")
    if not batches:
        raise ValueError("no batches to time on")
    device = batches[0][0].device
    i = 0

    def next_batch():
        nonlocal i
        b = batches[i % len(batches)]
        i += 1
        return b

    for _ in range(warmup_periods * every):
        x, y = next_batch()
        plain(x, y)
        regularized(x, y)
    ratios: List[float] = []
    plain_per_step: List[float] = []
    reg_per_step: List[float] = []
    for _ in range(periods):
        tp = tr = 0.0
        for _ in range(every):
            x, y = next_batch()
            _sync(device)
            t0 = time.perf_counter()
            plain(x, y)
            _sync(device)
            t1 = time.perf_counter()
            regularized(x, y)
            _sync(device)
            t2 = time.perf_counter()
            tp += t1 - t0
            tr += t2 - t1
        ratios.append(tr / tp)
        plain_per_step.append(tp / every)
        reg_per_step.append(tr / every)
    return {"ratio": statistics.median(ratios), "ratios": ratios,
            "plain_s": statistics.median(plain_per_step),
            "regularized_s": statistics.median(reg_per_step)}
