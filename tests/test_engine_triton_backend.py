"""The engine on the Triton backend (interpreter on CPU): linear/conv + activation epilogue
fusion, the cross-entropy kernel, and a pending bias read by a non-activation op, against the
reference backend in float32 (DESIGN.md §4)."""
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


@pytest.mark.parametrize("make,shape,classes", [
    (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (3, 5), 3),
    (ResidualTanh, (3, 5), 3),
    (SmallCNN, (2, 1, 6, 6), 4),
])
def test_triton_backend_matches_reference(make, shape, classes):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*shape)
    y = torch.randint(0, classes, (shape[0],))
    u = torch.randn(*shape)
    tri, g_tri = derivatives_and_grads(model, x, y, u, 3, backend="triton")
    ref, g_ref = derivatives_and_grads(model, x, y, u, 3, backend="reference")
    assert rel_err(tri, ref) < 1e-5
    for a, b in zip(g_tri, g_ref):
        assert rel_err(a, b) < 1e-4
