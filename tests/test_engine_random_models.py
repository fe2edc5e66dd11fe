"""Random architectures, orders, shapes and directions against the float64 oracle (hypothesis)."""
import torch
import torch.nn as nn
from _oracle import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import curvrate_fast as cf
from curvrate_fast import baseline

ACTS = [nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.ELU, nn.LeakyReLU, nn.Mish]


@st.composite
def models(draw):
    depth = draw(st.integers(1, 3))
    d_in = draw(st.integers(1, 7))
    widths = [draw(st.integers(1, 9)) for _ in range(depth)]
    classes = draw(st.integers(2, 5))
    layers, d = [], d_in
    for w in widths:
        layers.append(nn.Linear(d, w))
        if draw(st.booleans()):
            layers.append(nn.LayerNorm(w))
        layers.append(draw(st.sampled_from(ACTS))())
        d = w
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers).double(), d_in, classes


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=models(), batch=st.integers(1, 6), order=st.integers(1, 5), n_dirs=st.integers(0, 3),
       seed=st.integers(0, 2**31 - 1))
def test_random_mlp_matches_oracle(spec, batch, order, n_dirs, seed):
    model, d_in, classes = spec
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    shape = ((n_dirs,) if n_dirs else ()) + (batch, d_in)
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    ours = cf.loss_directional_derivatives(model, x, y, u, order)
    ref = baseline.loss_directional_derivatives(model, x, y, u, order)
    # compare relative to the largest derivative of each order (orders differ in scale)
    for n in range(order):
        assert rel_err(ours[n], ref[n]) < 1e-8
