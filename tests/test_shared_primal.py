"""The shared primal (JetTensor.share_primal, docs/design.md §6): a pass over D direction rows per
sample computes the primal of a linear layer once per sample instead of once per row. It must give
exactly the plain pass's values and gradients (float64, ≤ 1e-12, against the unshared engine and
nested autograd), be taken where it is claimed (a spy on the shared product), and lapse by itself
when the coefficients are written after the claim (a model whose in-place op makes the rows of a
sample differ)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _oracle import rel_err
from models import ResidualLN, mlp

import curvrate_fast as cf
from curvrate_fast import baseline
from curvrate_fast.jets.tensor import JetTensor
from curvrate_fast.rules import linear as linear_rule

D64 = torch.float64
TOL = 1e-12


@pytest.fixture
def spy(monkeypatch):
    """Counts the shared-primal products; ``spy.share(on)`` forces them on (every size) or off."""
    calls = []
    real = linear_rule._linear_shared_primal

    def counted(*a, **k):
        calls.append(a[3])           # the number of blocks
        return real(*a, **k)

    monkeypatch.setattr(linear_rule, "_linear_shared_primal", counted)

    class Spy:
        def share(self, on: bool) -> None:
            monkeypatch.setattr(linear_rule, "SHARED_PRIMAL_MIN_FLOP", 0.0 if on else float("inf"))
    Spy.calls = calls
    return Spy()


def _derivatives_and_grads(model, x, y, u, K):
    d = cf.loss_directional_derivatives(model, x, y, u, K)
    return d, torch.autograd.grad(d.abs().mean(), [p for p in model.parameters()])


# (model, input shape, whether a linear layer sees the claim: only the linear and activation
# rules keep it, so a model that starts with LayerNorm runs the plain products)
MODELS = {
    "mlp_tanh": lambda: (mlp(nn.Tanh()), (6, 5), True),
    "mlp_gelu": lambda: (mlp(nn.GELU()), (6, 5), True),
    "mlp_relu": lambda: (mlp(nn.ReLU()), (6, 5), True),
    "residual_ln": lambda: (ResidualLN(), (5, 8), False),
    "sequence_mlp": lambda: (nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 3)), (3, 6, 4), True),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shared_equals_plain_and_nested_autograd(name, spy):
    torch.manual_seed(0)
    model, shape, shared = MODELS[name]()
    model = model.double()
    x, u = torch.randn(shape, dtype=D64), torch.randn((3,) + shape, dtype=D64)
    if len(shape) == 3:          # a per-token model: the loss of a sample sums its tokens
        y = torch.randint(0, 3, (shape[0],))

        def loss_fn(z, y):
            return F.cross_entropy(z.sum(1), y, reduction="none")
    else:
        y, loss_fn = torch.randint(0, 3, (shape[0],)), None
    K = 4
    spy.share(False)
    d0 = cf.loss_directional_derivatives(model, x, y, u, K, loss_fn)
    g0 = torch.autograd.grad(d0.abs().mean(), list(model.parameters()))
    assert not spy.calls
    spy.share(True)
    d1 = cf.loss_directional_derivatives(model, x, y, u, K, loss_fn)
    g1 = torch.autograd.grad(d1.abs().mean(), list(model.parameters()))
    assert set(spy.calls) == ({3} if shared else set())
    assert rel_err(d1, d0) <= TOL
    for a, b in zip(g1, g0):
        assert rel_err(a, b) <= TOL
    ref = torch.stack([baseline.loss_directional_derivatives(model, x, y, u[k], K, loss_fn) for k in range(3)], 1)
    assert rel_err(d1, ref) <= 1e-10


@pytest.mark.parametrize("multilinear", [False, True], ids=["polarization", "multilinear"])
def test_crr_per_order_shared_equals_plain(spy, multilinear, monkeypatch):
    """The rows of a per-order CRR penalty share x: the 2^{N−1} polarization rows of a direction
    set, or the n_dirs direction sets of a multilinear pass."""
    from curvrate_fast.jets import multilinear as ML
    if not multilinear:
        monkeypatch.setattr(ML, "probe", lambda *a, **k: ML.Probe(False))
    else:                       # eagerly too (a model this small keeps polarization there otherwise)
        monkeypatch.setattr(ML, "EAGER_FLOP_PER_OP", 0.0)
    torch.manual_seed(1)
    model = mlp(nn.Tanh()).double()
    x, y = torch.randn(8, 5, dtype=D64), torch.randint(0, 3, (8,))
    out = []
    for on in (False, True):
        spy.share(on)
        R = cf.crr_penalty(model, x, y, orders=(2, 3), directions="per_order", n_dirs=1 if not multilinear else 3,
                           generator=torch.Generator().manual_seed(3))
        out.append((R, torch.autograd.grad(R, list(model.parameters()))))
    assert spy.calls and set(spy.calls) == {3 if multilinear else 4}
    if multilinear:             # the activations keep the claim: all three linear layers share
        assert len(spy.calls) == 3
    (r0, g0), (r1, g1) = out
    assert rel_err(r1, r0) <= TOL
    for a, b in zip(g1, g0):
        assert rel_err(a, b) <= TOL


class _RowDropout(nn.Module):
    """Between two linear layers, a dropout in place in train mode: each of the D direction rows of
    a sample draws its own mask (loss_directional_derivatives runs the directions as independent
    forwards, as nested autograd's loop over them does), so after it the rows of a sample no
    longer share their primal. (A write that differs by row position would do the same, but such
    a model depends on the batch size: the engine refuses it.)"""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        F.dropout(h, 0.5, training=True, inplace=True)
        return self.fc2(h)


def test_claim_lapses_after_an_in_place_write(spy):
    torch.manual_seed(2)
    model = _RowDropout().double()
    x, y, u = torch.randn(4, 5, dtype=D64), torch.randint(0, 3, (4,)), torch.randn(2, 4, 5, dtype=D64)
    spy.share(False)
    torch.manual_seed(5)
    d0, g0 = _derivatives_and_grads(model, x, y, u, 3)
    spy.share(True)
    torch.manual_seed(5)
    d1, g1 = _derivatives_and_grads(model, x, y, u, 3)
    assert spy.calls == [2]      # fc1 only: fc2 reads rows that differ
    assert rel_err(d1, d0) <= TOL
    for a, b in zip(g1, g0):
        assert rel_err(a, b) <= TOL


def test_claim_and_its_lapse_on_the_tensor():
    c = torch.randn(2, 6, 3).double()
    c[0, 3:] = c[0, :3]
    j = JetTensor(c, 3)
    assert j.primal_blocks() == 1
    assert j.share_primal(2).primal_blocks() == 2
    assert JetTensor(c, 3).share_primal(4).primal_blocks() == 1     # 6 rows are not 4 blocks
    j._data[1, 0, 0] += 1.0      # any write through the stored tensor (a view's too) ends the claim
    assert j.primal_blocks() == 1
    k = JetTensor(c.clone(), 3).share_primal(2)
    k._coeffs = c.clone()        # new coefficients (an in-place op's result): no claim
    assert k.primal_blocks() == 1
