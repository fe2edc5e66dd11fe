"""bench/gpu_check.py (``python -m curvrate_fast gpu-check``), the one command of a GPU session, run
here without a GPU: ``--smoke`` end to end (every section on CPU through the Triton interpreter, as a
subprocess, the way a GPU machine would start it), then the ways a section can go wrong (raise, hang,
crash: each recorded, the next section still runs, the budget holds), the no-GPU exit, and the
commit read from .git without git. Nothing here measures anything."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("_gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GC = _load()


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("CURVRATE_DISABLE_TRITON", "CURVRATE_BACKEND", "CURVRATE_LINEAR_IMPL", GC.INJECT_ENV):
        env.pop(k, None)
    env.update(extra)
    return env


def _check_files(out: Path):
    """At most 8 flat files come back from a GPU machine: the run writes only its known names."""
    entries = list(out.iterdir())
    assert all(p.is_file() for p in entries), entries
    names = {p.name for p in entries}
    assert names <= set(GC.FILES.values()) and len(names) <= 8, names
    assert {GC.FILES["json"], GC.FILES["md"]} <= names
    doc = json.loads((out / GC.FILES["json"]).read_text())
    assert list(doc["sections"]) == list(GC.SECTION_NAMES)  # every section reported, in order
    return doc, (out / GC.FILES["md"]).read_text()


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "out"
    budget = 240
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "curvrate_fast", "gpu-check", "--smoke", "--out", str(out),
                           "--budget", str(budget)], cwd=str(ROOT), env=_env(), capture_output=True, text=True,
                          timeout=budget + 60)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    assert wall < budget
    doc, md = _check_files(out)
    assert set(os.listdir(out)) == set(GC.FILES.values())
    meta = doc["meta"]
    assert meta["smoke"] is True and meta["mode"] == GC.SMOKE_LABEL and meta["budget_s"] == budget
    assert meta["device"].startswith("CPU") and meta["torch"] and meta["triton"] and meta["commit"]
    for name in GC.SECTION_NAMES:
        rec = doc["sections"][name]
        assert rec["status"] == "ok", (name, rec.get("error"), rec.get("summary"))
        assert rec["summary"]["text"] and 0 < rec["wall_s"] <= rec["allotted_s"], (name, rec)
        assert f"{rec['title']} — ok" in md

    env = doc["sections"]["env"]["result"]
    assert env["checks"] and not [c for c in env["checks"] if c["ok"] is False]
    names = {c["check"] for c in env["checks"]}
    assert {"torch import", "triton compiles and runs a trivial kernel", "kernel modules and operator registration",
            "one call of each kernel family vs float64", "engine: loss derivatives, backend auto"} <= names

    pt = doc["sections"]["pytest"]["result"]
    assert pt["counts"].get("passed", 0) >= 2 and pt["counts"].get("skipped", 0) >= 1  # gpu tests skip here
    assert not pt["failures"] and pt["exitstatus"] == 0 and pt["collected"] >= 3
    assert "test_triton_kernels.py" in (out / GC.FILES["pytest"]).read_text()

    kr = doc["sections"]["kernels"]["result"]["results"]
    for part in ("copy", "activation", "linear", "cross_entropy"):
        assert kr[part], part
        for r in kr[part]:
            assert "error" not in r and "skipped" not in r, (part, r)
            assert r.get("ok", True) is True, (part, r)
    variants = {r["variant"] for r in kr["linear"]}
    assert {v for v in variants if "impl=" in v} and any("impl=auto" in v for v in variants)
    assert "## Linear jet" in (out / GC.FILES["kernels"]).read_text()

    rows = doc["sections"]["workloads"]["result"]["rows"]
    checks = [r for r in rows if r["kind"] == "check"]
    assert checks and all(r["ok"] for r in checks)
    deriv = {(r["workload"], r["method"]): r for r in rows if r["kind"] == "deriv"}
    for w in ("mnist_cnn", "mlp784"):
        for m in ("baseline", "ours", "reference"):
            assert deriv[(w, m)]["median_ms"] > 0 and "error" not in deriv[(w, m)], (w, m)
        assert deriv[(w, "ours")]["speedup"] > 0
    comp = deriv[("mlp784", "compile")]                 # the torch.compile subprocess path, traced once
    assert "error" not in comp and comp["speedup"] > 0 and deriv[("mlp784", "ours")]["speedup_vs_compile"] > 0
    crr = {(r["workload"], r["method"]): r for r in rows if r["kind"] == "crr"}
    for setting in ("mnist_cnn_crr", "two_moons_crr", "lm_crr"):
        for m in ("plain", "ours", "ours_crrloss", "baseline"):
            assert "error" not in crr[(setting, m)] and crr[(setting, m)]["overhead_x"] > 0, (setting, m)
    assert "CRR training step" in (out / GC.FILES["workloads"]).read_text()
    assert "lm_crr" in md and "mnist_cnn" in md


@pytest.mark.slow
def test_faults_are_recorded_and_the_budget_holds(tmp_path):
    """A section that raises, hangs or dies is recorded as such (with its output), the next still runs,
    and the whole command ends within --budget although two sections never return."""
    out = tmp_path / "out"
    budget = 16
    t0 = time.monotonic()
    faults = "env=raise,pytest=hang,kernels=crash,workloads=hang"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--budget", str(budget)],
                          cwd=str(ROOT), env=_env(**{GC.INJECT_ENV: faults}), capture_output=True, text=True,
                          timeout=120)
    wall = time.monotonic() - t0
    assert proc.returncode == 1, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert wall < budget + 3  # + interpreter start-up of the parent
    doc, md = _check_files(out)
    secs = doc["sections"]
    assert [secs[n]["status"] for n in GC.SECTION_NAMES] == ["error", "timeout", "error", "timeout"]
    assert "injected failure" in secs["env"]["error"] and "Traceback" in secs["env"]["error"]
    assert "killed" in secs["pytest"]["error"] and "killed" in secs["workloads"]["error"]
    assert "status 3" in secs["kernels"]["error"]
    assert all(secs[n]["wall_s"] <= secs[n]["allotted_s"] + 2 for n in GC.SECTION_NAMES)
    for n in GC.SECTION_NAMES:
        assert f"— {secs[n]['status']}" in md
    assert doc["meta"]["wall_s"] <= budget


def test_without_a_gpu_the_later_sections_are_skipped_and_the_exit_is_2(tmp_path):
    """Not in smoke mode and no CUDA: the env section says so, the rest is skipped (not silently)."""
    pytest.importorskip("triton")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--budget", "300",
                           "--commit", "0123abc"], cwd=str(ROOT), env=_env(), capture_output=True, text=True,
                          timeout=360)
    if '"cuda_available": true' in (out / GC.FILES["json"]).read_text():
        pytest.skip("a CUDA GPU is present")
    assert proc.returncode == 2, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "no CUDA GPU" in proc.stderr
    doc, md = _check_files(out)
    secs = doc["sections"]
    assert secs["env"]["status"] == "failed"
    assert any(c["check"] == "CUDA visible" and c["ok"] is False for c in secs["env"]["result"]["checks"])
    assert [secs[n]["status"] for n in GC.SECTION_NAMES[1:]] == ["skipped"] * 3
    assert doc["meta"]["commit"] == "0123abc" and doc["meta"]["commit_source"] == "--commit"


def test_bad_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        GC.main(["--smoke"])                                 # no --out
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        GC.main(["--out", str(tmp_path), "--sections", "env,nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        GC.main(["--out", str(tmp_path), "--budget", "0"])
    assert e.value.code == 2


def test_git_commit_read_without_git(tmp_path, monkeypatch):
    sha, other = "a" * 40, "b" * 40
    monkeypatch.setattr(GC.shutil, "which", lambda name: None)   # no git program: no dirty flag
    assert GC.git_commit(tmp_path)["commit"] == "unknown"
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(sha + "\n")
    got = GC.git_commit(tmp_path)
    assert got == {"commit": sha, "source": ".git (refs/heads/main)", "dirty": None}
    (git / "refs" / "heads" / "main").unlink()                   # packed refs only
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{other} refs/heads/main\n")
    assert GC.git_commit(tmp_path)["commit"] == other
    (git / "HEAD").write_text(sha + "\n")                        # detached
    assert GC.git_commit(tmp_path)["commit"] == sha
    wt = tmp_path / "wt"                                         # a worktree: .git is a file
    wt.mkdir()
    (git / "worktrees" / "wt").mkdir(parents=True)
    (git / "worktrees" / "wt" / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "worktrees" / "wt" / "commondir").write_text("../..\n")
    (wt / ".git").write_text(f"gitdir: {git / 'worktrees' / 'wt'}\n")
    assert GC.git_commit(wt)["commit"] == other


def test_markdown_lists_every_section_before_anything_ran():
    doc = {"meta": {"smoke": False, "device": None, "torch": None, "triton": None, "cuda": None, "python": None,
                    "commit": "unknown", "commit_source": "no .git found", "dirty": None, "date": "d",
                    "budget_s": 420.0, "wall_s": 0.0},
           "sections": {n: {"name": n, "title": t, "status": "pending"} for n, t, _ in GC.SECTIONS}}
    md = GC.markdown(doc)
    for n, t, _ in GC.SECTIONS:
        assert f"| {n} | pending |" in md and f"{t} — pending" in md
    assert "pending" in GC.summary_table(doc)
