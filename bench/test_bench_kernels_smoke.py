"""bench/bench_kernels.py --smoke: the GPU kernel benchmark run end to end on CPU through the Triton
interpreter (tiny shapes), so that a typo in any section, row or writer fails here and not in the
first, short GPU session. Nothing is timed or asserted about speed.

Not in the default test run by itself (pytest.ini: testpaths = tests);
tests/test_bench_kernels_script.py loads these tests into the default run. Here:

    python -m pytest bench/test_bench_kernels_smoke.py -q
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_kernels.py"


def _load_script():
    """bench_kernels.py as a module (it imports only the standard library at module level)."""
    spec = importlib.util.spec_from_file_location("_bench_kernels_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _table_rows(md: str, heading: str) -> list:
    """Body rows of the first markdown table after ``heading``."""
    lines = md[md.index(heading):].splitlines()[1:]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append(ln)
    return table[2:]  # header and separator


def test_smoke_run_writes_every_section(tmp_path):
    pytest.importorskip("triton")
    bk = _load_script()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_INTERPRET"] = "1"
    env.pop("CURVRATE_DISABLE_TRITON", None)  # the point is to run the kernels
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], cwd=str(ROOT),
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith("-smoke.json") and files[1].endswith("-smoke.md"), files
    res = json.loads((tmp_path / files[0]).read_text())
    md = (tmp_path / files[1]).read_text()

    meta = res["meta"]
    assert meta["smoke"] is True and meta["mode"] == bk.SMOKE_LABEL
    assert meta["device"].startswith("CPU") and meta["order"] == 4
    assert set(meta["section_s"]) == set(bk.SECTIONS)
    kinds, dtypes = meta["kinds"], meta["dtypes"]
    assert kinds == bk.DEFAULT_KINDS.split(",") and dtypes == ["float32", "bfloat16"]

    for section in ("copy", *bk.SECTIONS):
        assert res[section], f"{section} is empty"
        for r in res[section]:
            assert "error" not in r, (section, r)
            for k, v in r.items():
                if k.endswith(("ms", "bytes", "GB/s", "of_copy", "speedup", "speedup_vs_reference")) \
                        and v is not None:
                    assert _finite(v) and v > 0, (section, k, r)
                if k.startswith("rel_err_"):
                    assert _finite(v) and v <= bk.TOLERANCE[r["dtype"]], (section, k, r)
            if section != "copy" and r.get("ok") is not None:
                assert r["ok"] is True, (section, r)

    (copy,) = res["copy"]
    assert _finite(copy["GB/s"])

    act = res["activation"]
    assert len(act) == len(kinds) * len(dtypes) * 2  # input jet and full jet
    assert {(r["kind"], r["dtype"], r["nu"]) for r in act} == {(k, d, n) for k in kinds for d in dtypes
                                                             for n in (2, 5)}
    for r in act:
        for k in ("ms", "backward_ms", "reference_ms", "autograd_backward_ms", "reference_backward_ms",
                  "GB/s", "of_copy", "backward_GB/s", "backward_of_copy", "speedup_vs_reference",
                  "backward_speedup", "rel_err_fwd", "rel_err_bwd"):
            assert _finite(r[k]), (k, r)
        assert r["ok"] is True and r["peak_MiB"] is None  # GPU-only statistic
    # the torch.compile path ran once (dynamo's eager backend in smoke mode)
    assert sum(r["compiled_reference_ms"] is not None for r in act) == 1

    lin = res["linear"]
    variants = {r["variant"] for r in lin}
    assert any(v.startswith("reference") for v in variants)
    assert any(v.startswith("GEMM only") for v in variants) and any("epilogue only" in v for v in variants)
    assert any("impl=cublas" in v for v in variants) and any("impl=fused" in v for v in variants)
    per_kind = [r for r in lin if r["kind"] is not None]
    assert {r["kind"] for r in per_kind} == set(bk.LINEAR_KINDS)
    for r in per_kind:
        assert _finite(r["rel_err_fwd"]) and _finite(r["ms"]) and _finite(r["x_gemm"]), r
    assert all(_finite(r["speedup_vs_reference"]) for r in per_kind if "epilogue only" not in r["variant"])
    assert all(_finite(r["GB/s"]) for r in per_kind if "epilogue only" in r["variant"])

    ce = res["cross_entropy"]
    assert len(ce) == len(dtypes) * 2
    for r in ce:
        for k in ("ms", "backward_ms", "reference_ms", "autograd_backward_ms", "reference_backward_ms",
                  "GB/s", "backward_GB/s", "speedup_vs_reference", "backward_speedup", "rel_err_fwd",
                  "rel_err_bwd"):
            assert _finite(r[k]), (k, r)
        assert r["ok"] is True

    assert bk.SMOKE_LABEL in md.splitlines()[0]
    assert "Copy bandwidth:" in md
    for heading, rows in (("## Activation jets", act), ("## Linear jet", lin), ("## Cross-entropy jet", ce)):
        body = _table_rows(md, heading)
        assert len(body) == len(rows), heading
        assert not any(bad in ln for ln in body for bad in ("| nan |", "| inf |", "| -inf |")), heading


def test_failing_case_is_recorded_on_gpu_and_raised_in_smoke():
    """Off smoke mode one failing case becomes an ``error`` row (the GPU session goes on) and the
    markdown shows it; in smoke mode it is raised. Runs in-process, without triton."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    bk = _load_script()
    ctx = bk.Ctx.__new__(bk.Ctx)
    ctx.smoke, ctx.failed, ctx.m = False, False, SimpleNamespace(torch=torch)
    ctx.results = {"meta": {}, "copy": [], "activation": [], "linear": [], "cross_entropy": []}

    def boom():
        raise RuntimeError("out of memory (pretend)")

    ctx.case("linear", {"in": 8, "out": 8, "B": 2, "dtype": "float32"}, boom)
    ctx.case("linear", {"in": 8, "out": 8, "B": 2, "dtype": "float32"},
             lambda: [{"in": 8, "out": 8, "B": 2, "dtype": "float32", "kind": "relu", "variant": "v",
                       "ms": 1.0, "ok": True}])
    assert ctx.failed
    err, good = ctx.results["linear"]
    assert err["error"].startswith("RuntimeError: out of memory") and err["ok"] is False
    assert "error" not in good
    ctx.results["meta"] = {"device": "test", "smoke": False, "torch": "t", "triton": "t", "cuda": None,
                           "commit": "c", "date": "d", "order": 4, "mode": "full", "timer": "do_bench"}
    md = bk._markdown(ctx.results)
    body = _table_rows(md, "## Linear jet")
    assert len(body) == 2 and "RuntimeError: out of memory" in body[0] and "**NO**" in body[0]

    ctx.smoke = True
    with pytest.raises(RuntimeError):
        ctx.case("linear", {}, boom)


def test_bad_invocations_exit_2():
    """Without a GPU the default mode exits 2 with a message, and so does TRITON_INTERPRET=1 without
    --smoke (an interpreter run is not a benchmark)."""
    bk = _load_script()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with pytest.raises(SystemExit) as e:
            bk.main(["--no-compile"])
        assert e.value.code == 2
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    with pytest.raises(SystemExit) as e:
        bk.main(["--sections", "nope"])
    assert e.value.code == 2


def test_cases_past_the_deadline_are_skipped_and_reported():
    """With ``ctx.deadline`` set (bench/gpu_check.py's time box) a case that would start after it is
    not run: its row says ``skipped``, ``on_case`` still runs, the markdown shows the column."""
    torch = pytest.importorskip("torch")
    import time
    from types import SimpleNamespace

    bk = _load_script()
    ctx = bk.Ctx.__new__(bk.Ctx)
    ctx.smoke, ctx.failed, ctx.m = False, False, SimpleNamespace(torch=torch)
    ctx.results = {"meta": {}, "copy": [], "activation": [], "linear": [], "cross_entropy": []}
    seen = []
    ctx.on_case = lambda: seen.append(len(ctx.results["cross_entropy"]))
    ctx.case("cross_entropy", {"B": 1, "C": 2, "dtype": "float32"},
             lambda: [{"B": 1, "C": 2, "dtype": "float32", "ms": 1.0, "ok": True}])
    ctx.deadline = time.monotonic() - 1.0
    ctx.case("cross_entropy", {"B": 8, "C": 4, "dtype": "float32"}, lambda: pytest.fail("ran past the deadline"))
    assert seen == [1, 2] and not ctx.failed
    done, skipped = ctx.results["cross_entropy"]
    assert "skipped" not in done and skipped["skipped"].startswith("time box") and "ms" not in skipped
    ctx.results["meta"] = {"device": "test", "smoke": False, "torch": "t", "triton": "t", "cuda": None,
                           "commit": "c", "date": "d", "order": 4, "mode": "full", "timer": "do_bench"}
    body = _table_rows(bk._markdown(ctx.results), "## Cross-entropy jet")
    assert len(body) == 2 and "time box" in body[1]
