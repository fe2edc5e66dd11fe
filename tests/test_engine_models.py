"""Whole models against the float64 nested-autograd oracle: per-sample loss derivatives and the
gradient of Σ|d_n| with respect to every parameter (issue: jet engine; docs/math.md §3)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _oracle import rel_err
from models import EncoderClassifier, MnistCNN, ResidualLN, SpecialFunctionModel, mlp

import curvrate_fast as cf
from curvrate_fast import baseline

D64 = torch.float64


def compare(model, x, y, K, D=None, loss_fn=None, seed=0, tol=1e-9):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(((D,) if D else ()) + tuple(x.shape), generator=g, dtype=x.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed + 1)  # same dropout masks for both
    ours = cf.loss_directional_derivatives(model, x, y, u, K, loss_fn)
    g_ours = torch.autograd.grad(ours.abs().sum(), params)
    torch.manual_seed(seed + 1)
    ref = baseline.loss_directional_derivatives(model, x, y, u, K, loss_fn)
    g_ref = torch.autograd.grad(ref.abs().sum(), params)
    assert ours.shape == ref.shape == ((K, D, x.shape[0]) if D else (K, x.shape[0]))
    assert rel_err(ours, ref) < tol
    for a, b in zip(g_ours, g_ref):
        assert rel_err(a, b) < tol


ACTS = {"tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU("tanh"),
        "silu": nn.SiLU(), "softplus": nn.Softplus(), "elu": nn.ELU(), "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(0.1), "mish": nn.Mish(), "selu": nn.SELU()}


@pytest.mark.parametrize("act", sorted(ACTS))
def test_mlp_each_activation(act):
    torch.manual_seed(0)
    model = mlp(ACTS[act]).double()
    x, y = torch.randn(6, 5, dtype=D64), torch.randint(0, 3, (6,))
    compare(model, x, y, K=6, D=2)


@pytest.mark.parametrize("train", [False, True])
def test_mnist_cnn(train):
    torch.manual_seed(1)
    model = MnistCNN().double().train(train)
    x, y = torch.randn(3, 1, 28, 28, dtype=D64), torch.randint(0, 10, (3,))
    compare(model, x, y, K=4)


def test_residual_block_with_layer_norm():
    torch.manual_seed(2)
    compare(ResidualLN().double(), torch.randn(5, 8, dtype=D64), torch.randint(0, 3, (5,)), K=5, D=3)


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_layer(norm_first, activation):
    torch.manual_seed(3)
    model = EncoderClassifier(norm_first=norm_first, activation=activation).double().eval()
    x, y = torch.randn(3, 5, 16, dtype=D64), torch.randint(0, 3, (3,))
    with cf.track_ops() as report:
        compare(model, x, y, K=4)
    assert "F.scaled_dot_product_attention" in report.rules or report.decomposed, str(report)


def test_multihead_attention_with_weights_and_mask():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    head = nn.Linear(8, 3).double()
    mask = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.head = mha, head

        def forward(self, x):
            out, w = self.mha(x, x, x, attn_mask=mask, need_weights=True)
            return self.head(out.sum(1)) + w.sum((1, 2)).unsqueeze(1)
    compare(M(), torch.randn(2, 4, 8, dtype=D64), torch.randint(0, 3, (2,)), K=3)


def test_model_with_special_functions():
    torch.manual_seed(5)
    with cf.track_ops() as report:
        compare(SpecialFunctionModel().double(), torch.randn(5, 4, dtype=D64), torch.randint(0, 3, (5,)), K=4)
    assert "torch.lgamma" in report.rules and "torch.special.i0" in report.rules


def test_custom_loss_fn_and_mse():
    torch.manual_seed(6)
    model = mlp(nn.Tanh(), classes=2).double()
    x, target = torch.randn(4, 5, dtype=D64), torch.randn(4, 2, dtype=D64)

    def loss_fn(out, t):
        return F.mse_loss(out, t, reduction="none").sum(1)
    compare(model, x, target, K=4, loss_fn=loss_fn)


def test_batched_directions_equal_separate_calls():
    torch.manual_seed(7)
    model = mlp(nn.GELU()).double()
    x, y = torch.randn(4, 5, dtype=D64), torch.randint(0, 3, (4,))
    u = torch.randn(3, 4, 5, dtype=D64)
    together = cf.loss_directional_derivatives(model, x, y, u, 4)
    for d in range(3):
        alone = cf.loss_directional_derivatives(model, x, y, u[d], 4)
        assert torch.allclose(together[:, d], alone, rtol=1e-12, atol=1e-14)


def test_float32_close_to_float64():
    torch.manual_seed(8)
    model = mlp(nn.Tanh())
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    u = torch.randn(8, 5)
    d32 = cf.loss_directional_derivatives(model, x, y, u, 4)
    d64 = cf.loss_directional_derivatives(model.double(), x.double(), y, u.double(), 4)
    assert d32.dtype == torch.float32
    assert rel_err(d32.double(), d64) < 1e-4
