"""The engine on the Triton backend (interpreter on CPU): linear/conv + activation epilogue
fusion, the cross-entropy kernel, and a pending bias read by a non-activation op, against the
reference backend in float32 (docs/design.md §4)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _oracle import derivatives_and_grads, rel_err

pytest.importorskip("triton")


class ResidualTanh(nn.Module):
    """h is read by the fused tanh kernel AND by the residual add (pending bias materialized)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)

    def forward(self, x):
        h = self.fc1(x)
        z = torch.tanh(h) + h
        return self.head(F.gelu(self.fc2(z)))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.silu(self.conv(x)), 1))


class LinearReadTwice(nn.Module):
    """A deferred linear layer read by an activation AND by a non-activation op (a residual and a
    LayerNorm): the GEMM must also run for the other reader, with the bias."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(5, 7), nn.Linear(7, 7), nn.LayerNorm(7)

    def forward(self, x):
        h = self.fc1(x)
        g = self.fc2(F.softplus(h) * h)
        return F.silu(g) + self.norm(g)


# (model, input shape, classes, linear layers followed by an activation)
MODELS = [
    (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (3, 5), 3, 1),
    (ResidualTanh, (3, 5), 3, 2),
    (SmallCNN, (2, 1, 6, 6), 4, 0),
    (lambda: nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 8, bias=False), nn.GELU("tanh"),
                           nn.Linear(8, 3)), (4, 5), 3, 2),
    (LinearReadTwice, (3, 5), 7, 2),
]


@pytest.mark.parametrize("linear_impl", ["cublas", "fused"])
@pytest.mark.parametrize("make,shape,classes,linear_acts", MODELS)
def test_triton_backend_matches_reference(make, shape, classes, linear_acts, linear_impl, monkeypatch):
    """Derivatives and parameter gradients on the Triton backend equal the reference backend's, with
    linear + activation as cuBLAS + fused epilogue and as the fused Triton GEMM; the fused GEMM runs
    exactly when asked for (counted)."""
    import curvrate_fast as cf
    from curvrate_fast.functions import linear as CL
    ran = []
    real = CL.LinearActivationJetFunction.forward

    def counting(ctx, *args):
        ran.append(args[3])
        return real(ctx, *args)
    monkeypatch.setattr(CL.LinearActivationJetFunction, "forward", staticmethod(counting))
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*shape)
    y = torch.randint(0, classes, (shape[0],))
    u = torch.randn(*shape)
    with cf.engine_settings(linear_impl=linear_impl):
        tri, g_tri = derivatives_and_grads(model, x, y, u, 3, backend="triton")
    ref, g_ref = derivatives_and_grads(model, x, y, u, 3, backend="reference")
    assert rel_err(tri, ref) < 1e-5
    for a, b in zip(g_tri, g_ref):
        assert rel_err(a, b) < 1e-4
    assert len(ran) == (linear_acts if linear_impl == "fused" else 0), ran


@pytest.mark.parametrize("linear_impl", ["cublas", "fused"])
def test_relu_after_linear_or_conv_keeps_the_short_series(linear_impl):
    """ReLU maps known-zero coefficients to zero, so on the fused path too the jet after
    linear/conv + ReLU stores only the input's 2 rows (not K+1), and the values are exact."""
    import curvrate_fast as cf
    from curvrate_fast.jets.tensor import JetTensor
    torch.manual_seed(3)
    lin, conv = nn.Linear(5, 6), nn.Conv2d(2, 3, 3)
    for layer, shape in ((lin, (4, 5)), (conv, (2, 2, 5, 5))):
        x, u = torch.randn(*shape), torch.randn(*shape)
        with cf.engine_settings(backend="triton", linear_impl=linear_impl):
            y = F.relu(layer(JetTensor(torch.stack([x, u]), 4)))
        assert y.coeffs.shape[0] == 2, (layer, y.coeffs.shape)
        with cf.engine_settings(backend="reference"):
            r = F.relu(layer(JetTensor(torch.stack([x, u]), 4)))
        torch.testing.assert_close(y.coeffs, r.coeffs[:2], rtol=1e-6, atol=1e-6)
