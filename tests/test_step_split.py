"""Smoke test of bench/step_split.py (where a captured step's time goes; not part of the package):
the eager capture backend, a few repeats. Checks that the recorded graph call, given copies of the
recorded inputs, reproduces what the step's own call of it returned (the "graph alone" column
times the same work) and that the report is well-formed; timings themselves are never asserted
(benchmarks live under bench/)."""
import importlib.util
import math
import sys
from pathlib import Path

import torch

_BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(_BENCH))
_spec = importlib.util.spec_from_file_location("step_split", _BENCH / "step_split.py")
split = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(split)


def _check(result):
    graph, inputs, outputs = result["replay"]
    with torch.no_grad():      # on copies: a training step's graph writes the update into its inputs
        again = list(graph(*[t.clone() for t in inputs]))
    assert len(again) == len(outputs) > 1
    for a, b in zip(again, outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for cell in ("step_warm", "graph_warm", "step_cold", "graph_cold", "nested"):
        med, q1, q3 = result[cell]
        assert math.isfinite(med) and 0 < q1 <= med <= q3
    assert result["kernels"] is None            # the eager backend: no inductor kernels to split


def test_step_split_eager_smoke():
    torch.manual_seed(0)
    results = [split.two_moons_crr(reps=4, warmup=2, backend="eager"),
               split.tiny_mlp_derivatives(reps=4, warmup=2, backend="eager")]
    for r in results:
        _check(r)
    text = split.format_markdown(results, {"device": "cpu", "torch": torch.__version__, "python": "3",
                                           "commit": "x", "date": "d"}, "python bench/step_split.py")
    assert text.count("| warm |") == 2 and text.count("| after nested |") == 2
    assert "Two Moons CRR training step" in text and "tiny MLP" in text
    assert "not split" in text
