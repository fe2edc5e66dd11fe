"""Smoke test of the benchmark harness (bench/bench_suite.py, not part of the package): tiny sizes,
one repeat; checks that the rows, the raw JSON, the markdown and the curated summary are
well-formed, and that the peers are checked before they are timed. Timings themselves are never
asserted (docs/design.md §5: benchmarks live under bench/, not in timed assertions)."""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_suite.py"
_spec = importlib.util.spec_from_file_location("bench_suite", _PATH)
bs = importlib.util.module_from_spec(_spec)
sys.modules["bench_suite"] = bs
_spec.loader.exec_module(bs)

TINY = dict(workloads=["two_moons"], methods=["baseline", "ours", "reference", "func_jvp"],
            dirs=[1, 2], orders=[2], batch=6, repeats=(1, 1), budget_s=0.0, warmup=1,
            crr_workloads=["two_moons_crr"], check=True, log=False)


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_run_rows_well_formed():
    rows = bs.run(dict(TINY))
    kinds = {r["kind"] for r in rows}
    assert {"check", "deriv", "crr"} <= kinds <= {"check", "deriv", "crr", "info"}
    checks = [r for r in rows if r["kind"] == "check"]
    assert {r["method"] for r in checks} == {"ours", "reference", "func_jvp"}
    assert all(r["ok"] for r in checks), checks
    deriv = [r for r in rows if r["kind"] == "deriv"]
    assert len(deriv) == 2 * 4  # (1, 2 directions) × 4 methods
    for r in deriv:
        assert "error" not in r, r
        assert r["workload"] == "two_moons" and r["order"] == 2 and r["batch"] == 6
        assert r["reps"] == 1
        assert _finite(r["median_ms"]) and r["median_ms"] > 0
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert _finite(r["speedup"]) and r["speedup"] > 0
        assert r["peak_mb"] is None or r["peak_mb"] >= 0
        if r["method"] == "baseline":
            assert r["speedup"] == pytest.approx(1.0)
        else:
            assert r["rel_err_vs_baseline"] < 1e-4
    crr = [r for r in rows if r["kind"] == "crr"]
    methods = [r["method"] for r in crr]
    assert methods[0] == "plain" and methods[-1] == "baseline" and "ours" in methods
    for r in crr:
        assert "error" not in r, r
        assert _finite(r["overhead_x"]) and r["overhead_x"] > 0
        assert r["subset"] == 3  # 64 of 128 scaled down to half the tiny batch


def test_main_writes_json_and_markdown(tmp_path, capsys):
    argv = ["--workloads", "two_moons", "--methods", "baseline,ours", "--dirs", "1",
            "--orders", "2", "--batch", "4", "--min-repeats", "1", "--max-repeats", "1",
            "--budget", "0", "--no-crr", "--no-check", "--out-dir", str(tmp_path), "--tag", "smoke",
            "--quiet"]
    assert bs.main(argv) == 0
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    assert all("smoke" in f for f in files)
    if not torch.cuda.is_available():
        assert all(f.startswith("bench_cpu_") for f in files)
    with open(tmp_path / files[0]) as f:
        data = json.load(f)
    meta = data["meta"]
    for key in ("device", "torch", "triton", "commit", "date"):
        assert key in meta
    assert meta["torch"] == torch.__version__
    assert [r["method"] for r in data["rows"] if r["kind"] == "deriv"] == ["baseline", "ours"]
    md = (tmp_path / files[1]).read_text()
    assert md.startswith("# curvrate-fast benchmark")
    assert meta["commit"] in md and "| two_moons | 2 | 1 | ours |" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| two_moons")]
    header = next(ln for ln in md.splitlines() if ln.startswith("| workload | K |"))
    assert all(ln.count("|") == header.count("|") for ln in table)
    out = capsys.readouterr().out
    assert "speedup" in out and "saved" in out


def test_config_validation():
    with pytest.raises(ValueError):
        bs.run({"workloads": ["nope"], "log": False})
    with pytest.raises(ValueError):
        bs.run({"not_a_key": 1})
    quick = bs.BenchConfig.from_any({"quick": True})
    assert "compile" not in quick.methods and quick.repeats[1] <= 3


def test_func_jvp_matches_baseline_float64():
    model, x, y = bs.build_workload("two_moons", batch=5, dtype=torch.float64)
    u = bs.make_directions(x, 3)
    from curvrate_fast import baseline
    d0 = baseline.loss_directional_derivatives(model, x, y, u, 3)
    d1 = bs.func_jvp_derivatives(model, x, y, u, 3)
    assert d1.shape == (3, 3, 5)
    torch.testing.assert_close(d1, d0, rtol=1e-10, atol=1e-12)


def test_compile_method_traces_the_reference_rules(monkeypatch):
    """The ``compile`` method records derivatives + gradients with make_fx and hands the graph to
    torch.compile (replaced by the identity here: inductor's C++ build takes ~15 s on CPU); the step
    returns the reference rules' derivatives and leaves their gradients in ``.grad``."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda gm, **kw: compiled.append(gm) or gm)
    model, x, y = bs.build_workload("two_moons", batch=6, dtype=torch.float64, device="cpu")
    u = bs.make_directions(x, 2)
    d_c = bs.make_step("compile", model, x, y, u, 3)()
    g_c = [p.grad.clone() for p in model.parameters()]
    d_r = bs.make_step("reference", model, x, y, u, 3)()
    g_r = [p.grad.clone() for p in model.parameters()]
    assert len(compiled) == 1 and isinstance(compiled[0], torch.fx.GraphModule)
    torch.testing.assert_close(d_c, d_r, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_peers_and_captured_are_checked_before_timing():
    """JAX's jet (when installed) and the captured step meet nested autograd in float64 before any
    timing; torch-jet is skipped with its reason where it cannot be installed."""
    methods = ["captured", "torch_jet"] + (["jax"] if importlib.util.find_spec("jax") else [])
    recs = {r["method"]: r for r in bs.check_methods(["two_moons"], ["baseline"] + methods, order=3,
                                                     batch=4, log=lambda *a: None)}
    assert recs["captured"]["ok"], recs["captured"]
    if "jax" in recs:
        assert recs["jax"]["ok"] and recs["jax"]["deriv_rel_err"] < 1e-10, recs["jax"]
    tj = recs["torch_jet"]
    assert tj["ok"] or tj.get("skipped"), tj
    if tj.get("skipped"):
        assert "torch-jet" in tj["skipped"]


def test_summary_is_curated(tmp_path):
    """The committed summary: device, versions, commit, date; no host name, no absolute path, no
    per-repeat times. Raw results default to the ignored bench/results/raw/."""
    rows = bs.run(dict(TINY, methods=["baseline", "ours"], dirs=[1], crr=False, check=False))
    env = bs.environment(torch.device("cpu"))
    assert "host" not in env
    jpath, mpath = bs.write_summary(rows, env, bs.BenchConfig(), "tiny", out_dir=str(tmp_path),
                                    command="python bench/bench_suite.py --quick")
    data = json.loads(open(jpath).read())
    for key in ("device", "torch", "commit", "date", "python"):
        assert key in data["meta"]
    text = open(jpath).read() + open(mpath).read()
    assert bs.ROOT not in text and os.path.expanduser("~") + "/" not in text
    assert "times_ms" not in text and "host" not in data["meta"]
    assert bs.build_parser().parse_args([]).out_dir == bs.RAW
    with pytest.raises(ValueError):
        bs.write_summary(rows, env, bs.BenchConfig(), "../x", out_dir=str(tmp_path))


def test_a_target_needs_the_medians_and_the_best_times():
    """A peer's median inflated by interleaving (bimodal times) does not make a target met: the
    ratio of the best times must agree."""
    def row(method, med, best):
        return {"kind": "deriv", "workload": "two_moons", "method": method, "dirs": 1, "order": 4,
                "median_ms": med, "min_ms": best}

    def line(rows):
        (t,) = [t for t in bs.targets(rows) if "JAX" in t["target"] and "tiny" in t["target"]]
        return t

    noisy = line([row("captured", 0.50, 0.38), row("jax", 0.86, 0.43)])
    assert noisy["met"] == "no" and "1.72×" in noisy["measured"] and "best times 1.13×" in noisy["measured"]
    clear = line([row("captured", 0.25, 0.22), row("jax", 0.40, 0.36)])
    assert clear["met"] == "yes"
    slow = line([row("captured", 0.40, 0.20), row("jax", 0.40, 0.36)])
    assert slow["met"] == "no"
