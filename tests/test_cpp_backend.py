"""The C++ CPU kernels (csrc/jet_activation.cpp) against the pure-PyTorch reference: forward and
Toeplitz backward, every activation, orders 1..8, float32 and float64, short stored series."""
import pytest
import torch
import torch.nn as nn
from _oracle import derivatives_and_grads, rel_err
from models import mlp

from curvrate_fast import cpp_backend
from curvrate_fast.activation_jet import KINDS, activation_jet_reference


@pytest.fixture(scope="module", autouse=True)
def built():
    cpp_backend.build()  # compiles once (cached); a failure here is a real failure
    assert cpp_backend.available()


PARAMS = {"softplus": {"beta": 1.5, "threshold": 2.0}, "leaky_relu": {"negative_slope": 0.2}}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_in,K", [(1, 1), (2, 4), (5, 4), (3, 6), (7, 6), (2, 8), (9, 8)])
def test_matches_reference_float64(kind, n_in, K):
    g = torch.Generator().manual_seed(K * 10 + n_in)
    # 127 elements: not a multiple of the 64-element block
    c = (torch.randn(n_in, 127, generator=g, dtype=torch.float64) * 2).requires_grad_()
    params = PARAMS.get(kind, {})
    ours = cpp_backend.activation_jet_cpp(c, kind, K, **params)
    ref = activation_jet_reference(c, kind, K, **params)
    gy = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, c, gy)
    (g_ref,) = torch.autograd.grad(ref, c, gy)
    assert rel_err(ours, ref) < 1e-12
    assert rel_err(g_ours, g_ref) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_float32_non_contiguous(kind):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 40, 9, generator=g)
    c = base.transpose(1, 2)[:, :, ::2].requires_grad_()  # non-contiguous (3, 9, 20)
    ours = cpp_backend.activation_jet_cpp(c, kind, 4, **PARAMS.get(kind, {}))
    ref = activation_jet_reference(c.double(), kind, 4, **PARAMS.get(kind, {}))
    assert ours.dtype == torch.float32 and ours.shape == (5, 9, 20)
    assert rel_err(ours.double(), ref) < 1e-5


def test_order_above_limit_is_refused():
    with pytest.raises(ValueError, match="orders up to"):
        cpp_backend.activation_jet_cpp(torch.randn(2, 4), "tanh", cpp_backend.MAX_ORDER + 1)


def test_engine_with_cpp_backend_equals_reference():
    torch.manual_seed(0)
    model = mlp(nn.GELU()).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    u = torch.randn(2, 6, 5, dtype=torch.float64)
    a, ga = derivatives_and_grads(model, x, y, u, 4, backend="cpp")
    b, gb = derivatives_and_grads(model, x, y, u, 4, backend="reference")
    assert rel_err(a, b) < 1e-12
    for p, q in zip(ga, gb):
        assert rel_err(p, q) < 1e-12


def test_cli_build_cpp(capsys):
    from curvrate_fast.cli import main
    assert main(["build-cpp"]) == 0
    assert "C++ kernels ready" in capsys.readouterr().out
