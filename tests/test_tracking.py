"""curvrate_fast.tracking.LambdaTracker: records λ and the per-order log norms, CSV round trip,
PNG plot (Agg canvas)."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from _curv_oracle import data, tiny_mlp

from curvrate_fast.curvature import curvature_rate
from curvrate_fast.tracking import LambdaTracker


def test_record_csv_roundtrip_and_plot(tmp_path):
    csv_path = tmp_path / "runs" / "lam.csv"
    tr = LambdaTracker(csv_path, max_order=3, n_dirs=2, generator=torch.Generator().manual_seed(0))
    m = tiny_mlp(0)
    x, y = data(0, B=8)
    r = tr.measure(m, x, y, step=0, epoch=0, test_error=0.25)
    tr.record(5, 1.5, std=0.1, log_norms=[0.0, 1.0, 3.0], test_error=0.2)
    assert len(tr) == 2 and csv_path.exists()          # autosaved after every record
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["lambda"] and float(rows[0]["lambda"]) == pytest.approx(r.value, rel=1e-12)
    assert float(rows[0]["log_norm_2"]) == pytest.approx(float(r.log_norms[1]), rel=1e-12)
    assert rows[0]["estimator"] == "slope" and rows[1]["lambda_std"] == "0.1"
    assert list(rows[0])[:9] == ["step", "lambda", "lambda_std", "n_samples", "estimator",
                                 "band_fallback", "log_norm_1", "log_norm_2", "log_norm_3"]
    back = LambdaTracker.from_csv(csv_path)
    assert back.history["lambda"] == pytest.approx([r.value, 1.5])
    assert back.history["step"] == [0, 5] and back.history["test_error"] == [0.25, 0.2]
    assert back.history["n_samples"][0] == 8
    png = tr.plot(tmp_path / "lam.png", title="test")
    head = png.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_measure_uses_settings_and_matches_curvature_rate():
    m = tiny_mlp(1)
    x, y = data(1, B=6)
    tr = LambdaTracker(max_order=4, n_dirs=3, estimator="per_direction",
                       generator=torch.Generator().manual_seed(2))
    r = tr.measure(m, x, y, step=1)
    ref = curvature_rate(m, x, y, max_order=4, n_dirs=3, estimator="per_direction",
                         generator=torch.Generator().manual_seed(2))
    assert r.value == ref.value and tr.latest["lambda"] == ref.value
    assert tr.latest["lambda_std"] == pytest.approx(ref.std)
    assert tr.latest["estimator"] == "per_direction"


def test_errors(tmp_path):
    tr = LambdaTracker()
    with pytest.raises(ValueError, match="nothing recorded"):
        tr.plot(tmp_path / "x.png")
    tr.record(0, 1.0)
    with pytest.raises(ValueError, match="no CSV path"):
        tr.to_csv()
    with pytest.raises(ValueError, match="collides"):
        tr.record(1, 1.0, estimator="mine")
    assert math.isnan(tr.history["lambda_std"][0])
    assert tr.plot(tmp_path / "only_lambda.png").exists()      # no log norms recorded: one panel
    with pytest.raises(TypeError, match=r"unknown curvature_rate setting\(s\) \['max_ordr'\]"):
        LambdaTracker(max_ordr=4)                              # at construction, not at measure()
