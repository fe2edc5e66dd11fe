"""Bad input gets a clear error naming the problem (issue: jet engine, 'Bad input')."""
import pytest
import torch
import torch.nn as nn
from models import mlp

import curvrate_fast as cf


@pytest.fixture
def setup():
    torch.manual_seed(0)
    return mlp(nn.Tanh()), torch.randn(4, 5), torch.randint(0, 3, (4,))


@pytest.mark.parametrize("order", [0, -1])
def test_order_below_one(setup, order):
    model, x, y = setup
    with pytest.raises(ValueError, match="order must be ≥ 1"):
        cf.loss_directional_derivatives(model, x, y, torch.randn_like(x), order)
    with pytest.raises(ValueError, match="order must be ≥ 1"):
        cf.jet(model, x, torch.randn_like(x), order)


@pytest.mark.parametrize("order", [2.0, True, "3"])
def test_order_not_int(setup, order):
    model, x, y = setup
    with pytest.raises(TypeError, match="order must be an int"):
        cf.jet(model, x, torch.randn_like(x), order)


def test_direction_shape_mismatch(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="u must have shape"):
        cf.loss_directional_derivatives(model, x, y, torch.randn(4, 4), 2)
    with pytest.raises(ValueError, match="u must have the shape of x"):
        cf.jet(model, x, torch.randn(5, 5), 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "u"])
def test_nan_inf(setup, bad, where):
    model, x, y = setup
    u = torch.randn_like(x)
    (x if where == "x" else u)[1, 2] = bad
    with pytest.raises(ValueError, match=f"{where} contains 1 NaN or Inf"):
        cf.loss_directional_derivatives(model, x, y, u, 2)


def test_integer_inputs(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match="floating-point"):
        cf.jet(model, x.long(), torch.randn_like(x).long(), 2)


def test_dtype_mismatch(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match="dtype"):
        cf.jet(model, x, torch.randn_like(x).double(), 2)


def test_tensor_subclass_inputs_are_named(setup):
    """x or u of a tensor subclass (here torch.masked's MaskedTensor, which failed with a TypeError
    deep inside torch.masked) is refused by name; a Parameter is a plain tensor for this."""
    from torch.masked import masked_tensor
    model, x, y = setup
    u = torch.randn_like(x)
    with pytest.warns(UserWarning):      # MaskedTensor is a prototype and says so
        mt = masked_tensor(x, torch.ones_like(x, dtype=torch.bool))
    with pytest.raises(TypeError, match="x must be a plain torch.Tensor, got a MaskedTensor"):
        cf.loss_directional_derivatives(model, mt, y, u, 2)
    with pytest.raises(TypeError, match="u must be a plain torch.Tensor, got a MaskedTensor"):
        cf.jet(model, x, masked_tensor(u, torch.ones_like(u, dtype=torch.bool)), 2)
    d = cf.loss_directional_derivatives(model, nn.Parameter(x.clone()), y, u, 2)
    assert torch.equal(d, cf.loss_directional_derivatives(model, x, y, u, 2))


def test_device_mismatch_is_named_before_any_value_is_read(setup):
    """u on another device than x: the device check runs before the finite check reads values
    (a meta u made the finite check fail with 'Tensor.item() cannot be called on meta tensors')."""
    model, x, y = setup
    with pytest.raises(ValueError, match="u is on meta but x is on cpu"):
        cf.jet(model, x, torch.randn_like(x, device="meta"), 2)


def test_loss_not_per_sample(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="one loss per sample.*reduction='none'"):
        cf.loss_directional_derivatives(model, x, y, torch.randn_like(x), 2,
                                        loss_fn=torch.nn.functional.cross_entropy)


def test_train_mode_batchnorm_mixes_samples():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).train()
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(cf.SampleMixingError, match="model.eval()"):
        cf.loss_directional_derivatives(model, x, y, torch.randn_like(x), 2)
    model.eval()
    d = cf.loss_directional_derivatives(model, x, y, torch.randn_like(x), 2)
    assert torch.isfinite(d).all()


def test_labels_out_of_range(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        cf.loss_directional_derivatives(model, x, torch.tensor([0, 1, 5, 2]), torch.randn_like(x), 2)


def test_batch_size_mismatch(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match="y has 3 entries"):
        cf.loss_directional_derivatives(model, x, torch.tensor([0, 1, 2]), torch.randn_like(x), 2)


def test_fn_returning_tuple():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="must return one tensor"):
        cf.jet(lambda z: (z, z), x, torch.ones_like(x), 2)


def test_assigning_jet_into_plain_tensor():
    def f(z):
        out = torch.zeros(3, 4)
        out[0] = z[0]
        return out
    x = torch.randn(3, 4)
    with pytest.raises(cf.JetError, match="plain tensor"):
        cf.jet(f, x, torch.randn_like(x), 2)


def test_unknown_backend(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match="backend must be one of"):
        cf.jet(model, x, torch.randn_like(x), 2, backend="cuda")


def test_numpy_on_a_jet_raises():
    def f(z):
        import numpy as np
        return torch.from_numpy(np.asarray(z.numpy()) ** 2)
    x = torch.randn(3)
    with pytest.raises(cf.JetError, match="leave torch"):
        cf.jet(f, x, torch.ones_like(x), 2)


def test_finite_check_can_be_switched_off(setup):
    model, x, y = setup
    u = torch.randn_like(x)
    u[0, 0] = float("nan")
    with cf.engine_settings(check_finite=False):
        d = cf.loss_directional_derivatives(model, x, y, u, 2)
    assert torch.isnan(d[:, 0]).all() and torch.isfinite(d[:, 1:]).all()  # per-sample: only row 0
    with pytest.raises(ValueError, match="NaN or Inf"):
        cf.loss_directional_derivatives(model, x, y, u, 2)
