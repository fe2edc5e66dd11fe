"""The benchmark workloads as a pytest-benchmark suite (docs/design.md §5). Not part of the default test
run (pytest.ini: testpaths = tests). Run from the repository root:

    python -m pytest bench/ --benchmark-only                       # everything but torch.compile
    python -m pytest bench/ --benchmark-only -k "mlp784"           # one workload
    python -m pytest bench/ --benchmark-only -k "mlp784 and (ours or baseline)"
    CURVRATE_BENCH_COMPILE=1 python -m pytest bench/ --benchmark-only -k compile
    python -m pytest bench/ --benchmark-only --benchmark-json bench/results/pytest-bench.json

Environment: CURVRATE_BENCH_ROUNDS (timed rounds per test, default 5; slow cells get fewer, see
``_rounds``), CURVRATE_BENCH_COMPILE=1 (include the torch.compile tests), CURVRATE_BENCH_DEVICE
(default: cuda if available, else cpu), CURVRATE_BENCH_THREADS (torch.set_num_threads; 1 gives
stable numbers on a loaded machine). Each test's ``extra_info`` holds the workload settings.
Tests of one (workload, K, D) share a benchmark group, so pytest-benchmark's table compares the
methods side by side; the speedup vs nested autograd is the ratio of the group's rows. For
interleaved timing, peak memory and the markdown report use ``bench/run_bench.py`` instead.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from curvrate_fast import bench_suite as bs  # noqa: E402

DEVICE = os.environ.get("CURVRATE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = int(os.environ.get("CURVRATE_BENCH_ROUNDS", "5"))
COMPILE = os.environ.get("CURVRATE_BENCH_COMPILE", "0") not in ("", "0")
if os.environ.get("CURVRATE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CURVRATE_BENCH_THREADS"]))
ORDER = 4

# one-step cost on a 2-core CPU runs from milliseconds to about a minute (nested autograd and the
# nested jvp on the transformer with 5 directions); give the slow ones fewer rounds
_SLOW = {("transformer", "baseline"), ("transformer", "func_jvp"), ("mnist_cnn", "func_jvp"),
         ("mnist_cnn", "baseline")}


def _rounds(workload, method, dirs):
    if DEVICE.startswith("cuda"):
        return max(ROUNDS, 10)
    if (workload, method) in _SLOW:
        return 1 if dirs > 1 else min(ROUNDS, 2)
    return ROUNDS


CASES = [(w, d, m) for w in bs.WORKLOADS for d in (1, 5) for m in bs.METHODS]


@pytest.mark.parametrize("workload,dirs,method", [
    pytest.param(w, d, m, id=f"{w}-K{ORDER}-D{d}-{m}",
                 marks=[pytest.mark.skipif(m == "compile" and not COMPILE,
                                           reason="set CURVRATE_BENCH_COMPILE=1"),
                        pytest.mark.skipif(m == "cpp" and DEVICE != "cpu",
                                           reason="the C++ kernels are CPU only")])
    for (w, d, m) in CASES])
def test_derivative_step(benchmark, workload, dirs, method):
    """d_1..d_4 of the per-sample loss + backward of mean|d| to the parameters."""
    device = torch.device(DEVICE)
    model, x, y = bs.build_workload(workload, device=device)
    u = bs.make_directions(x, dirs)
    step = bs.make_step(method, model, x, y, u, ORDER)
    try:
        d = step()  # warm-up (compiles for "compile")
        if method == "compile":
            step()
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing on the jet subclass
        pytest.skip(f"{method} failed on {workload}: {type(e).__name__}: {str(e)[:200]}")
    benchmark.group = f"{workload} K={ORDER} D={dirs}"
    benchmark.extra_info.update({"workload": bs.WORKLOADS[workload].description,
                                 "batch": x.shape[0], "dirs": dirs, "order": ORDER,
                                 "method": bs.METHOD_DOC[method], "device": DEVICE})

    def timed():
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=_rounds(workload, method, dirs), iterations=1,
                       warmup_rounds=0)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("setting,variant", [
    pytest.param(s, v, id=f"{s}-{v}") for s in bs.CRR_WORKLOADS
    for v in ("plain", "ours", "baseline")])
def test_crr_training_step(benchmark, setting, variant):
    """A full training step (forward, CE, [CRR penalty], backward, Adam) at the paper's settings."""
    import torch.nn.functional as F

    spec = bs.CRR_WORKLOADS[setting]
    device = torch.device(DEVICE)
    model, x, y = bs.build_workload(spec["workload"], device=device, train=spec["train"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lo, hi = spec["orders"]
    api = bs._crr_penalty_api()

    def pen():
        if variant == "baseline":
            return bs._baseline_crr(model, x, y, (lo, hi), spec["directions"], spec["subset"],
                                    spec["scale"])
        if api is not None:
            return api(model, x, y, orders=(lo, hi), directions=spec["directions"],
                       subset=spec["subset"], scale=spec["scale"])
        return bs._ours_crr_fallback(model, x, y, (lo, hi), spec["subset"], spec["scale"])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if variant != "plain":
            loss = loss + pen()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    benchmark.group = f"CRR {setting}"
    benchmark.extra_info.update({"setting": spec["note"], "variant": variant,
                                 "crr_penalty_api": api is not None})
    benchmark.pedantic(step, rounds=ROUNDS if variant != "baseline" else max(2, ROUNDS // 2),
                       iterations=1, warmup_rounds=1)
