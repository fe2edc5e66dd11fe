"""The one table of activation kinds (curvrate_fast/activation_kinds.py) against every consumer:
the reference recurrences, the C++ kernels' enum and the Triton kernels' dispatch codes."""
import re
from pathlib import Path

import pytest
import torch

from curvrate_fast.activation_jet import activation_series_with_derivative
from curvrate_fast.activation_kinds import ACTIVATIONS, KINDS, kernel_params

ROOT = Path(__file__).resolve().parents[1]


def test_every_kind_has_a_reference_recurrence():
    u = [torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    for kind in KINDS:
        y, w = activation_series_with_derivative(u, kind, 3)
        assert len(y) == 4 and len(w) == 4


def test_cpp_enum_matches_the_table():
    """csrc/jet_activation.cpp maps names to an enum whose values are the table's codes."""
    src = (ROOT / "csrc" / "jet_activation.cpp").read_text()
    names = dict(re.findall(r'if \(s == "(\w+)"\) return (\w+);', src))
    enum_body = re.search(r"enum\s+\w*\s*\{([^}]*)\}", src).group(1)
    values = {}
    for i, m in enumerate(m for m in enum_body.split(",") if m.strip()):
        name, _, val = m.partition("=")
        values[name.strip()] = int(val) if val.strip() else i
    for kind in KINDS:
        assert kind in names, f"the C++ kernels do not know {kind!r}"
        assert values[names[kind]] == ACTIVATIONS[kind].code, kind


def test_triton_codes_come_from_the_table():
    src = (ROOT / "triton_kernels" / "activation_jet.py").read_text()
    assert "ACTIVATIONS = {name: act.code for name, act in _TABLE.items()}" in src
    assert "MAX_ORDER = MAX_KERNEL_ORDER" in src


@pytest.mark.parametrize("kind,params,expected", [
    ("softplus", {"beta": 2.0}, ("softplus", 2.0, 20.0)),
    ("leaky_relu", {"slope": 0.3}, ("leaky_relu", 0.3, 0.0)),
    ("leaky_relu", {}, ("leaky_relu", 0.01, 0.0)),
    ("gelu", {"approximate": "tanh"}, ("gelu_tanh", 0.0, 0.0)),
    (None, {}, ("identity", 0.0, 0.0)),
])
def test_kernel_params(kind, params, expected):
    assert kernel_params(kind, params) == expected


def test_kernel_params_errors():
    with pytest.raises(ValueError, match="unknown activation"):
        kernel_params("swish2", {})
    with pytest.raises(TypeError, match="unexpected parameters"):
        kernel_params("tanh", {"beta": 1.0})
    with pytest.raises(ValueError, match="beta"):
        kernel_params("softplus", {"beta": 0.0})
