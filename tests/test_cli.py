"""``python -m curvrate_fast`` end to end in quick modes: demo, reproduce two-moons / analytic,
bench forwarding; outputs well-formed, and CRR lowers λ in the demo."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from curvrate_fast import cli


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _finite(*vals):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals)


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--timing-rounds", "1", "--no-progress",
                   "--device", "cpu", "--seeds", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("test error", "ECE", "λ (band)", "train time", "no CRR", "CRR 0.003",
                   "nested autograd", "ms", "Figure", "mean ± sd over seeds", "±",
                   "lower in", "of 3 seeds", "s.e."):
        assert needle in text, needle
    js = json.loads((out / "demo_two_moons.json").read_text())
    assert js["epochs"] == 25 and js["seed"] == 42 and js["model_seed"] == 1042
    assert js["seeds"] == [42, 43, 44]
    plain, crr = js["runs"]
    for r in (plain, crr):                               # means over the seeds, with spreads
        assert _finite(r["test_error"], r["ece"], r["lam"], r["train_time"], r["sd"]["lam"])
        assert len(r["log_norms"]) == 4 and len(r["history"]) == 25 and r["n_band"] > 0
        assert 0.25 < r["test_error"] < 0.45
        assert [p["seed"] for p in r["per_seed"]] == [42, 43, 44]
        assert abs(r["lam"] - sum(p["lam"] for p in r["per_seed"]) / 3) < 1e-9
    assert crr["lam"] < plain["lam"]                     # CRR lowers λ on the boundary band
    assert js["paired"]["lam"]["n"] == 3 and js["paired"]["lam"]["mean"] < 0
    assert crr["scale"] == 3e-3 and plain["scale"] == 0.0
    t = js["timing_s_per_step"]
    assert set(t) == {"plain", "captured_step", "captured", "ours", "baseline"} and all(v > 0 for v in t.values())
    assert js["engine"].startswith("captured") and "one captured step" in text
    png = out / "demo_two_moons.png"
    if js["files"]["png"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert str(png) in text


def test_reproduce_two_moons_quick(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = cli.main(["reproduce", "two-moons", "--seeds", "2", "--epochs", "2", "--engine", "both",
                   "--scales", "0,1e-2", "--noise-rows", "0.3,0.45", "--n-max-rows", "3,4",
                   "--out", str(out), "--no-progress", "--name", "tm"])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("CRR sweep", "λ (paper)", "1.5865", "Label noise", "n_max ablation",
                   "engine: ours", "engine: baseline", "## checks", "tuned", "wall time"):
        assert needle in text, needle
    js = json.loads((out / "tm.json").read_text())
    assert js["settings"]["seeds"] == 2 and js["settings"]["engine"] == "both"
    res = js["results"]
    kinds = {(r["kind"], r["label_noise"], r["scale"], r["n_max"], r["engine"]) for r in res}
    for eng in ("ours", "baseline"):
        assert ("sweep", 0.3, 0.0, 4, eng) in kinds and ("sweep", 0.3, 0.01, 4, eng) in kinds
        assert ("noise", 0.45, 0.0, 4, eng) in kinds and ("n_max", 0.3, 0.0, 3, eng) in kinds
    assert all(_finite(r["lam"], r["test_error"], r["ece"]) for r in res)
    assert len([r for r in res if r["kind"] == "sweep"]) == 2 * 2 * 2
    eng = js["checks"]["engines"]
    assert eng["unregularized_max_abs_lambda_diff"] < 1e-3 and eng["unregularized_same"]
    assert {c["scale"] for c in eng["crr_mean_diffs"]} == {0.01}
    assert (out / "tm.md").read_text().startswith("# Two Moons reproduction")
    summ = js["summary"]["sweep"]
    assert {(r["engine"], r["scale"]) for r in summ} == {(e, s) for e in ("ours", "baseline")
                                                        for s in (0.0, 0.01)}


def test_reproduce_analytic(tmp_path, capsys):
    assert cli.main(["reproduce", "analytic", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "paper" in text and "0.693147" in text and "448.14" in text
    rows = [l for l in text.splitlines() if l.rstrip().endswith(("yes", "no"))]
    assert rows and all(l.rstrip().endswith("yes") for l in rows)
    assert (tmp_path / "analytic.md").exists()


def test_bench_forwards_arguments(monkeypatch, tmp_path, capsys):
    """``bench`` runs the checkout's bench/bench_suite.py main() with the arguments untouched, and
    says clearly that it needs a source checkout where there is none."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_suite.py").write_text("def main(argv):\n    print('fake bench', argv)\n    return 7\n")
    monkeypatch.setattr(cli, "_bench_dirs", lambda: [tmp_path / "nowhere", bench])
    assert cli.main(["bench", "--quick", "--help", "x"]) == 7
    assert "fake bench ['--quick', '--help', 'x']" in capsys.readouterr().out
    monkeypatch.setattr(cli, "_bench_dirs", lambda: [tmp_path / "a" / "bench"])
    assert cli.main(["bench", "--quick"]) == 2
    assert "bench/bench_suite.py not found" in capsys.readouterr().err


def test_the_wheel_holds_no_benchmark_code():
    """The package is the library: the harness lives in bench/ (issue 13)."""
    import importlib.util
    assert importlib.util.find_spec("curvrate_fast.bench_suite") is None
    assert any((d / "bench_suite.py").is_file() for d in cli._bench_dirs())


def test_usage_and_errors(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "two-moons", "--engine", "nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--epochs", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "two-moons", "--scales", "a,b"])
    assert e.value.code == 2


def test_python_dash_m_help():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "curvrate_fast", "--help"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0 and "reproduce" in p.stdout and "bench" in p.stdout and "gpu-check" in p.stdout


def test_gpu_check_forwards_arguments(monkeypatch, tmp_path):
    """``gpu-check`` runs the checkout's bench/gpu_check.py main() with the arguments untouched."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "gpu_check.py").write_text("SEEN = []\n\ndef main(argv):\n    SEEN.append(argv)\n    "
                                        "print('fake gpu_check', argv)\n    return 3\n")
    monkeypatch.setattr(cli, "_bench_dirs", lambda: [tmp_path / "nowhere", bench])
    assert cli.main(["gpu-check", "--smoke", "--out", "d", "--help"]) == 3


def test_gpu_check_without_a_checkout_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_bench_dirs", lambda: [tmp_path / "a" / "bench", tmp_path / "b" / "bench"])
    assert cli.main(["gpu-check", "--out", "d"]) == 2
    err = capsys.readouterr().err
    assert "bench/gpu_check.py not found" in err and "source checkout" in err and "PYTHONPATH=." in err


def test_gpu_check_is_found_from_the_package():
    """From this checkout the real script is found beside the package (its --help exits 0)."""
    assert any((d / "gpu_check.py").is_file() for d in cli._bench_dirs())
    with pytest.raises(SystemExit) as e:
        cli.main(["gpu-check", "--help"])
    assert e.value.code == 0
