"""curvrate_fast.calibration: ECE (docs/math.md §6: 10 equal-width bins, lower < conf ≤ upper) and the
hard-20 % accuracy on hand-checkable examples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from curvrate_fast.calibration import expected_calibration_error, hard_fraction_accuracy, reliability_bins
from curvrate_fast.compat import flatgrad as fg

P = torch.tensor([[0.93, 0.07], [0.82, 0.18], [0.29, 0.71], [0.36, 0.64], [0.5, 0.5]],
                 dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 1, 1])      # correct, wrong, correct, correct, wrong (tie → class 0)


def test_ece_hand_example():
    expected = (0.5 + 0.36 + 0.29 + 0.82 + 0.07) / 5          # = 0.408
    assert expected_calibration_error(P, LABELS, probs=True) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(torch.log(P), LABELS) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(P.numpy(), LABELS.numpy(), probs=True) == pytest.approx(expected)


def test_bins_are_left_open_right_closed():
    bins = reliability_bins(P, LABELS, probs=True)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 1, 0, 1, 1, 1, 1]
    assert bins[4]["upper"] == 0.5 and bins[4]["confidence"] == 0.5 and bins[4]["accuracy"] == 0.0
    assert np.isnan(bins[0]["accuracy"])
    # one bin: |accuracy − mean confidence|
    one = expected_calibration_error(P, LABELS, n_bins=1, probs=True)
    assert one == pytest.approx(abs(3 / 5 - float(P.max(1).values.mean())), abs=1e-12)


def test_ece_agrees_with_compat_on_random_logits():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(500, 10, generator=g) * 3
    t = torch.randint(0, 10, (500,), generator=g)
    assert expected_calibration_error(z, t) == pytest.approx(fg.compute_ece(z, t), abs=1e-6)
    perfect = torch.nn.functional.one_hot(t, 10).double()
    assert expected_calibration_error(perfect, t, probs=True) == 0.0


def test_hard_fraction_accuracy():
    assert hard_fraction_accuracy(P, LABELS, probs=True) == 0.0               # k = 1: conf .5, wrong
    assert hard_fraction_accuracy(P, LABELS, 0.4, probs=True) == 0.5          # .5 wrong, .64 right
    assert hard_fraction_accuracy(P, LABELS, 1.0, probs=True) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        hard_fraction_accuracy(P, LABELS, 0.0, probs=True)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        expected_calibration_error(P, torch.tensor([0, 1, 2, 1, 1]), probs=True)
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error(P, LABELS[:3], probs=True)
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(P, LABELS, n_bins=0, probs=True)


def test_probs_true_requires_probabilities():
    """probs=True with logits, or with rows that do not sum to 1, is an error (before: the max
    entry was read as a confidence, 0.349 for a (10, 3) batch of |logits|); float16-rounded
    softmax output passes."""
    z = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        expected_calibration_error(z, torch.tensor([0, 1]), probs=True)
    with pytest.raises(ValueError, match="row 1 sums to 0.8"):
        hard_fraction_accuracy(torch.tensor([[0.2, 0.8], [0.5, 0.3]]), torch.tensor([0, 1]), probs=True)
    p16 = torch.softmax(torch.randn(50, 10, generator=torch.Generator().manual_seed(0)), 1).half()
    assert 0.0 <= expected_calibration_error(p16, torch.zeros(50, dtype=torch.long), probs=True) <= 1.0
