"""Each Taylor rule alone against the float64 nested-autograd oracle, orders 1..6 (docs/math.md §2)."""

import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _oracle import rel_err

import curvrate_fast as cf
from curvrate_fast import baseline

D64 = torch.float64


def pos(z):
    return z * z + 0.5  # strictly positive inputs for log, sqrt, pow


_BILINEAR = nn.Bilinear(6, 6, 3, dtype=D64)

CASES = {
    # arithmetic
    "add_const": lambda z: z + 1.5,
    "rsub": lambda z: 2.0 - z,
    "mul_jets": lambda z: z * torch.sin(z),
    "mul_const_tensor": lambda z: z * torch.linspace(-1, 2, z.shape[-1], dtype=D64),
    "div_jets": lambda z: torch.cos(z) / pos(z),
    "rdiv": lambda z: 3.0 / pos(z),
    "neg": lambda z: -torch.exp(z),
    "pow_int": lambda z: z ** 3,
    "pow_frac": lambda z: pos(z) ** 1.7,
    "pow_neg": lambda z: torch.pow(pos(z), -2.5),
    "rpow": lambda z: 1.3 ** z,
    "pow_jet_jet": lambda z: pos(z) ** torch.sin(z),
    "sqrt": lambda z: torch.sqrt(pos(z)),
    "rsqrt": lambda z: torch.rsqrt(pos(z)),
    "exp": torch.exp,
    "log": lambda z: torch.log(pos(z)),
    "log1p": lambda z: torch.log1p(pos(z)),
    "expm1": torch.expm1,
    "abs": lambda z: torch.abs(z) * z,
    "square": torch.square,
    "reciprocal": lambda z: torch.reciprocal(pos(z)),
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": lambda z: torch.tan(0.3 * z),
    "atan": torch.atan,
    "erf": torch.erf,
    "sinh_cosh": lambda z: torch.sinh(z) + torch.cosh(0.5 * z),
    "where": lambda z: torch.where(z > 0, torch.sin(z), z * z),
    "maximum": lambda z: torch.maximum(z, torch.cos(z)),
    "clamp": lambda z: torch.clamp(z, -0.5, 0.7),
    "masked_fill": lambda z: torch.exp(z).masked_fill(z > 1.0, 0.25),
    # activations
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
    "softplus": nn.Softplus(beta=1.5, threshold=2.0),
    "elu": nn.ELU(alpha=0.8),
    "selu": nn.SELU(),
    "relu": nn.ReLU(),
    "leaky_relu": nn.LeakyReLU(0.2),
    "mish": nn.Mish(),
    "logsigmoid": nn.LogSigmoid(),
    # reductions
    "sum": lambda z: torch.sin(z).sum(1),
    "mean_all": lambda z: torch.exp(z).mean(),
    "var": lambda z: torch.var(z, dim=1),
    "std": lambda z: z.std(0, keepdim=True),
    "logsumexp": lambda z: torch.logsumexp(z, 1),
    "max_dim": lambda z: z.max(1).values * z.amax(0).sum(),
    "norm": lambda z: z.norm(dim=1),
    "normalize": lambda z: F.normalize(z, dim=1),
    "cumsum": lambda z: torch.cumsum(torch.tanh(z), 1),
    # shape
    "view_permute": lambda z: torch.sin(z).reshape(2, -1).t().permute(1, 0).flatten(),
    "transpose_unsqueeze": lambda z: torch.exp(z).unsqueeze(0).transpose(1, 2).squeeze(0),
    "getitem_basic": lambda z: z[1:, ::2] * z[:-1, 1::2],
    "getitem_tensor": lambda z: torch.tanh(z)[torch.tensor([0, 2, 1])],
    "cat_stack": lambda z: torch.cat([z, z * z], 1) + torch.stack([z, z], 0).sum(0).repeat(1, 2),
    "chunk_split": lambda z: sum(c.sum() for c in z.chunk(3, dim=1)) * torch.split(z, 2, 1)[0].mean(),
    "pad": lambda z: F.pad(torch.sin(z), (1, 2), value=0.5),
    "pad_reflect": lambda z: F.pad(torch.sin(z).unsqueeze(0), (2, 1), mode="reflect"),
    "expand": lambda z: z[:, :1].expand(-1, 4) * z[:, :4],
    "flip_roll": lambda z: torch.flip(z, [1]) * torch.roll(z, 1, 0),
    "gather": lambda z: torch.gather(z, 1, torch.tensor([[0, 1], [2, 0], [1, 1], [3, 2]])),
    "index_select": lambda z: torch.index_select(z, 1, torch.tensor([3, 0])),
    # softmax and losses
    "softmax": lambda z: torch.softmax(z, -1),
    "log_softmax": lambda z: F.log_softmax(z, dim=1),
    "cross_entropy": lambda z: F.cross_entropy(z, torch.tensor([0, 3, 1, 2]), reduction="none"),
    "cross_entropy_mean_w_ls": lambda z: F.cross_entropy(z, torch.tensor([0, 3, 1, 2]),
                                                         weight=torch.tensor([1., 2., .5, 1.5, 1., 1.], dtype=D64),
                                                         label_smoothing=0.1),
    "cross_entropy_ignore": lambda z: F.cross_entropy(z, torch.tensor([0, -100, 1, 2]), reduction="sum"),
    "cross_entropy_soft": lambda z: F.cross_entropy(z, torch.softmax(torch.arange(24, dtype=D64).reshape(4, 6), 1)),
    "nll_loss": lambda z: F.nll_loss(F.log_softmax(z, 1), torch.tensor([5, 3, 1, 0]), reduction="none"),
    "mse_loss": lambda z: F.mse_loss(torch.tanh(z), torch.ones_like(z)),
    "l1_loss": lambda z: F.l1_loss(z, torch.zeros_like(z), reduction="none"),
    "bce_logits": lambda z: F.binary_cross_entropy_with_logits(
        z, torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=D64)),
    # norms
    "layer_norm": nn.LayerNorm(6, dtype=D64),
    "rms_norm": nn.RMSNorm(6, dtype=D64),
    "group_norm": lambda z: F.group_norm(z.reshape(2, 4, 3), 2,
                                         torch.linspace(0.5, 1.5, 4, dtype=D64), torch.linspace(-1, 1, 4, dtype=D64)),
    "instance_norm": lambda z: F.instance_norm(z.reshape(2, 3, 4)),
    # linear maps
    "linear": nn.Linear(6, 5, dtype=D64),
    "matmul_const": lambda z: z @ torch.linspace(-1, 1, 18, dtype=D64).reshape(6, 3),
    "matmul_jets": lambda z: torch.tanh(z) @ z.t(),
    "bmm": lambda z: torch.bmm(z.reshape(2, 2, 6), torch.sin(z).reshape(2, 6, 2)),
    "einsum": lambda z: torch.einsum("bi,bi->b", z, torch.cos(z)),
    "bilinear": lambda z: _BILINEAR(torch.tanh(z), z),
    "bilinear_const": lambda z: _BILINEAR(z, torch.ones_like(z)),
    "einsum_const": lambda z: torch.einsum("bi,ij->bj", z, torch.eye(6, dtype=D64)[:, :3]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_oracle(name):
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # stable across processes (hash() is salted)
    fn = CASES[name]
    x = torch.randn(4, 6, dtype=D64)
    u = torch.randn(4, 6, dtype=D64)
    K = 6 if name not in ("pow_jet_jet", "matmul_jets", "bmm") else 4
    ours = cf.jet(fn, x, u, K)
    oracle = baseline.jet(fn, x, u, K)
    assert ours.shape == oracle.shape
    assert rel_err(ours, oracle) < 1e-9, name
    assert torch.allclose(ours[0], fn(x))


CONV_CASES = {
    "conv1d": (nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=1), (2, 3, 9)),
    "conv2d_groups": (nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (2, 4, 7, 6)),
    "conv3d": (nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (1, 2, 4, 5, 3)),
    "conv_transpose1d": (nn.ConvTranspose1d(3, 2, 3, stride=2, output_padding=1), (2, 3, 5)),
    "conv_transpose2d": (nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, groups=2), (2, 4, 4, 5)),
    "conv_transpose3d": (nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 2, 3, 2)),
    "conv2d_unbatched": (nn.Conv2d(2, 3, 3), (2, 5, 5)),
    "conv2d_reflect": (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 5)),
    "avg_pool2d": (nn.AvgPool2d(2), (2, 3, 6, 5)),
    "adaptive_avg_pool2d": (nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 6, 7)),
    "max_pool2d": (nn.MaxPool2d(2, stride=1), (2, 3, 5, 5)),
    "max_pool1d": (nn.MaxPool1d(3, stride=2, padding=1), (2, 3, 9)),
    "max_pool3d": (nn.MaxPool3d(2), (1, 2, 4, 4, 4)),
    "adaptive_max_pool2d": (nn.AdaptiveMaxPool2d(2), (2, 3, 5, 6)),
    "avg_pool1d": (nn.AvgPool1d(2), (2, 3, 8)),
    "batch_norm_eval": (None, (3, 4, 5, 5)),
    "pixel_shuffle": (nn.PixelShuffle(2), (2, 8, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_spatial_rule_matches_oracle(name):
    torch.manual_seed(len(name))
    layer, shape = CONV_CASES[name]
    if name == "batch_norm_eval":
        layer = nn.BatchNorm2d(4)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.data.uniform_(0.5, 1.5)
        layer.bias.data.uniform_(-1, 1)
        layer.eval()
    layer = layer.double()

    def fn(z):
        return torch.tanh(layer(torch.sin(z)))
    x = torch.randn(*shape, dtype=D64)
    u = torch.randn(*shape, dtype=D64)
    ours = cf.jet(fn, x, u, 4)
    oracle = baseline.jet(fn, x, u, 4)
    assert rel_err(ours, oracle) < 1e-9


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_orders_are_consistent(K):
    """A jet of order K holds the first K+1 coefficients of a higher-order jet."""
    f = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2)).double()
    x, u = torch.randn(4, 3, dtype=D64), torch.randn(4, 3, dtype=D64)
    hi = cf.jet(f, x, u, 6)
    lo = cf.jet(f, x, u, K)
    assert torch.allclose(lo, hi[:K + 1], rtol=1e-12, atol=1e-14)


def test_directional_derivatives_are_factorial_times_coefficients():
    x = torch.randn(5, dtype=D64)
    d = cf.directional_derivatives(torch.sin, x, torch.ones_like(x), 4)
    expect = torch.stack([torch.cos(x), -torch.sin(x), -torch.cos(x), torch.sin(x)])
    assert torch.allclose(d, expect, atol=1e-13)


def test_layer_norm_exact_where_nested_autograd_is_wrong():
    """docs/math.md §2: PyTorch's nested derivatives of F.layer_norm are wrong from order 3. On the
    paper's own method (per-sample loss derivatives by nested reverse mode) our rule agrees with the
    primitive-op oracle at every order, while unmodified nested autograd is off from order 3."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    model[1].weight.data.uniform_(0.5, 1.5)
    model[1].bias.data.uniform_(-0.5, 0.5)
    x, u = torch.randn(3, 8, dtype=D64), torch.randn(3, 8, dtype=D64)
    y = torch.tensor([0, 2, 1])
    ours = cf.loss_directional_derivatives(model, x, y, u, 4)
    primitive = baseline.loss_directional_derivatives(model, x, y, u, 4, primitive=True)
    torch_nested = baseline.loss_directional_derivatives(model, x, y, u, 4, primitive=False)
    assert rel_err(ours, primitive) < 1e-10
    assert rel_err(torch_nested[:2], primitive[:2]) < 1e-10   # orders 1-2 are right
    assert rel_err(torch_nested[2], primitive[2]) > 1e-2      # order 3 is not
    # the coefficient jet of LayerNorm alone: nested reverse mode is off from coefficient 2
    ln = model[1]
    cj = cf.jet(ln, x, u, 4)
    assert rel_err(cj, baseline.jet(ln, x, u, 4, primitive=True)) < 1e-10
    assert rel_err(baseline.jet(ln, x, u, 4, primitive=False)[2:], cj[2:]) > 1e-2


def test_celu_exact_against_primitive_formula():
    """CELU: compared with its formula in primitive ops (PyTorch's own nested CELU derivative
    differs at the 1e-8 level)."""
    a = 0.7
    x, u = torch.randn(4, 6, dtype=D64), torch.randn(4, 6, dtype=D64)
    ours = cf.jet(nn.CELU(a), x, u, 5)
    oracle = baseline.jet(lambda z: torch.where(z > 0, z, a * (torch.exp(z / a) - 1)), x, u, 5)
    assert rel_err(ours, oracle) < 1e-12


def test_inplace_ops_on_jets():
    def f(z):
        y = z * 2
        y += torch.sin(z)
        y.mul_(z)
        y = F.relu(y, inplace=True)
        return y
    x, u = torch.randn(3, 4, dtype=D64), torch.randn(3, 4, dtype=D64)
    assert rel_err(cf.jet(f, x, u, 4), baseline.jet(f, x, u, 4)) < 1e-12


def test_inplace_on_view_of_jet_reaches_the_jet():
    """An in-place op on a view writes into the jet it views, as in PyTorch (it was refused before
    views were linked to their base; tests/test_seams.py has the full set)."""
    def f(z):
        y = z * 2
        v = y.view(-1)
        v.add_(torch.sin(z).reshape(-1))
        return y
    x = torch.randn(3, 4, dtype=D64)
    u = torch.randn_like(x)
    assert torch.allclose(cf.jet(f, x, u, 3), baseline.jet(f, x, u, 3), rtol=1e-12, atol=1e-13)


def test_op_without_exact_jet_names_the_op():
    """There is no generic fallback: an op whose jet cannot be formed exactly raises, naming it
    (airy_ai: torch has no Ai′)."""
    x = torch.randn(3, dtype=D64)
    with pytest.raises(cf.JetError, match="airy_ai"):
        cf.jet(torch.special.airy_ai, x, torch.ones_like(x), 2)


def test_strict_is_deprecated():
    x = torch.randn(3, dtype=D64)
    with pytest.warns(FutureWarning, match="strict"):
        cf.jet(torch.sin, x, torch.ones_like(x), 2, strict=True)


def test_metadata_and_integer_ops_are_constants():
    def f(z):
        assert z.shape == (3, 4) and z.dim() == 2 and z.size(1) == 4 and z.dtype == D64
        idx = torch.argmax(z, dim=1)
        mask = (z > 0).float()
        return z[torch.arange(3), idx] * mask.sum(1) + z.sign().sum(1)
    x, u = torch.randn(3, 4, dtype=D64), torch.randn(3, 4, dtype=D64)
    assert rel_err(cf.jet(f, x, u, 3), baseline.jet(f, x, u, 3)) < 1e-12


def test_float32_and_dtype_follow_inputs():
    f = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    x, u = torch.randn(2, 3), torch.randn(2, 3)
    c = cf.jet(f, x, u, 3)
    assert c.dtype == torch.float32
    ref = cf.jet(f.double(), x.double(), u.double(), 3)
    assert rel_err(c.double(), ref) < 1e-5
