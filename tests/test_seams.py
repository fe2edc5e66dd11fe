"""The engine's seams, each against an oracle that does not share its code: casts, broadcasting
against constants of higher rank, no_grad regions inside a model, random ops, out= and in-place
ops, the registry and the verified paths (docs/engine.md)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _oracle import assert_matches_fd, rel_err

import curvrate_fast as cf
from curvrate_fast import baseline
from curvrate_fast.jets import registry
from curvrate_fast.jets.registry import RuleRegistrationError

D64 = torch.float64


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


# -- casts keep derivatives ---------------------------------------------------------------------

@pytest.mark.parametrize("cast", [
    lambda z: z.type(torch.float64),
    lambda z: z.type("torch.DoubleTensor"),
    lambda z: z.to(torch.float64),
    lambda z: z.to(D64, copy=True),
    lambda z: z.to("cpu"),
    lambda z: z.to(torch.zeros(1, dtype=D64)),
    lambda z: z.double(),
    lambda z: z.type_as(torch.zeros(1, dtype=D64)),
    lambda z: z.to(memory_format=torch.contiguous_format),
], ids=["type", "type_str", "to", "to_copy", "to_device", "to_other", "double", "type_as", "memfmt"])
def test_casts_are_linear(cast):
    x, u = rand(3, 4, seed=0), rand(3, 4, seed=1)

    def f(z):
        return torch.sin(cast(torch.exp(z) * z))
    assert rel_err(cf.jet(f, x, u, 4), baseline.jet(f, x, u, 4)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_cast_casts_every_coefficient(dtype):
    """A cast to lower precision has derivative 1 (as in autograd): coefficient k of the cast is
    the cast of coefficient k."""
    x, u = rand(5, seed=2), rand(5, seed=3)
    c64 = cf.jet(torch.tanh, x, u, 3)
    for cast in (lambda z: z.to(dtype), lambda z: z.type(dtype), lambda z: getattr(z, {
            torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16"}[dtype])()):
        c = cf.jet(lambda z: cast(torch.tanh(z)), x, u, 3)
        assert c.dtype == dtype
        assert torch.equal(c, c64.to(dtype))


def test_gpt2_style_attention_weight_cast():
    """HF GPT-2's eager attention: softmax(...).type(value.dtype) @ value."""
    x, u = rand(2, 5, 8, seed=4), rand(2, 5, 8, seed=5)

    def attn(z):
        w = torch.softmax(z @ z.transpose(-1, -2) / 8 ** 0.5, dim=-1)
        return w.type(z.dtype) @ z
    assert rel_err(cf.jet(attn, x, u, 3), baseline.jet(attn, x, u, 3)) < 1e-12


def test_integer_cast_is_constant_and_type_name():
    x, u = rand(4, seed=6), rand(4, seed=7)
    seen = {}

    def f(z):
        seen["name"] = z.type()
        return z * z.long().to(D64) + z.bool().to(D64)
    assert rel_err(cf.jet(f, x, u, 3), baseline.jet(f, x, u, 3)) < 1e-12
    assert seen["name"] == "torch.DoubleTensor"


def test_memory_format_refused_like_torch():
    x, u = rand(3, 4, seed=8), rand(3, 4, seed=9)
    with pytest.raises(RuntimeError, match="rank 4"):
        cf.jet(lambda z: z.to(memory_format=torch.channels_last), x, u, 2)
    x4, u4 = rand(2, 3, 4, 5, seed=8), rand(2, 3, 4, 5, seed=9)

    def f(z):
        return torch.tanh(z.to(memory_format=torch.channels_last).contiguous())
    assert rel_err(cf.jet(f, x4, u4, 3), baseline.jet(f, x4, u4, 3)) < 1e-12


# -- broadcasting against constants of higher rank --------------------------------------------

@pytest.mark.parametrize("op", [
    lambda c, z: c * z, lambda c, z: z * c, lambda c, z: z / c, lambda c, z: c / (z * z + 1),
    lambda c, z: c + z, lambda c, z: z - c, lambda c, z: torch.where(c > 0, z, c),
    lambda c, z: torch.maximum(z, c), lambda c, z: c * torch.exp(z),
    lambda c, z: torch.addcmul(c, z, z), lambda c, z: torch.lerp(c, z, 0.3),
], ids=["cmul", "mulc", "divc", "cdiv", "add", "sub", "where", "maximum", "cexp", "addcmul", "lerp"])
def test_constant_of_higher_rank_broadcasts_like_torch(op):
    c = rand(2, 1, 5, seed=10)
    x, u = rand(3, 1, seed=11), rand(3, 1, seed=12)

    def f(z):
        return op(c, z)
    ours = cf.jet(f, x, u, 3)
    assert ours.shape == (4,) + tuple(f(x).shape) == (4, 2, 3, 5)
    assert rel_err(ours, baseline.jet(f, x, u, 3)) < 1e-12


# -- no_grad inside a model ----------------------------------------------------------------------

class NoGradScale(nn.Module):
    """A model that computes a normalizing factor under no_grad (a common pattern: the value is
    used, its dependence on the input is not differentiated)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3, dtype=D64)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        with torch.no_grad():
            scale = h.pow(2).sum(-1, keepdim=True).sqrt() + 1.0
        return h / scale


def _nested_autograd_loss_derivatives(model, x, y, u, K):
    return baseline.loss_directional_derivatives(model, x, y, u, K)


def test_no_grad_region_inside_model_is_constant():
    torch.manual_seed(13)
    model = NoGradScale()
    x, u = rand(5, 4, seed=14), rand(5, 4, seed=15)
    y = torch.tensor([0, 1, 2, 1, 0])
    ours = cf.loss_directional_derivatives(model, x, y, u, 3)
    ref = _nested_autograd_loss_derivatives(model, x, y, u, 3)
    assert rel_err(ours, ref) < 1e-10
    # and the parameter gradient sees the same function as its value
    g_ours = torch.autograd.grad(ours.abs().sum(), model.lin.weight)[0]
    ref = _nested_autograd_loss_derivatives(model, x, y, u, 3)
    g_ref = torch.autograd.grad(ref.abs().sum(), model.lin.weight)[0]
    assert rel_err(g_ours, g_ref) < 1e-9


def test_data_attribute_is_a_constant_as_in_autograd():
    """``t.data`` (older code's detach) is the value without derivatives, as nested autograd has it."""
    torch.manual_seed(23)
    lin, lin2 = nn.Linear(4, 3, dtype=D64), nn.Linear(4, 3, dtype=D64)

    def model(x):
        return torch.tanh(lin(x)) * lin2(x).data + torch.sin(lin2(x))
    x, u = rand(5, 4, seed=24), rand(5, 4, seed=25)
    y = torch.tensor([0, 1, 2, 1, 0])
    ours = cf.loss_directional_derivatives(model, x, y, u, 3)
    assert rel_err(ours, _nested_autograd_loss_derivatives(model, x, y, u, 3)) < 1e-10


def test_no_grad_caller_still_gets_derivatives_and_inner_region_still_constant():
    torch.manual_seed(16)
    model = NoGradScale()
    x, u = rand(5, 4, seed=17), rand(5, 4, seed=18)
    y = torch.tensor([0, 1, 2, 1, 0])
    ref = _nested_autograd_loss_derivatives(model, x, y, u, 3).detach()
    with torch.no_grad():
        ours = cf.loss_directional_derivatives(model, x, y, u, 3)
        plain = cf.jet(torch.sin, x, u, 3)
    assert not ours.requires_grad
    assert rel_err(ours, ref) < 1e-10
    assert rel_err(plain, baseline.jet(torch.sin, x, u, 3)) < 1e-12
    with torch.inference_mode():
        assert rel_err(cf.loss_directional_derivatives(model, x, y, u, 3), ref) < 1e-10


def test_no_grad_in_place_changes_value_not_derivative():
    """Under no_grad an in-place op changes the value, not the derivative (autograd's rule)."""
    x, u = rand(4, seed=19), rand(4, seed=20)

    def f(z):
        h = torch.sin(z) * 2
        with torch.no_grad():
            h.add_(1.0)
        return h * z
    ours = cf.jet(f, x, u, 3)
    # (2 sin z + 1)·z: adding a constant under no_grad changes the value, and the derivatives of
    # the result are those of the changed value (the constant has derivative 0 anyway)
    assert rel_err(ours, baseline.jet(lambda z: (torch.sin(z) * 2 + 1.0) * z, x, u, 3)) < 1e-12


def test_raw_input_jet_under_no_grad_keeps_derivatives():
    x, u = rand(3, seed=21), rand(3, seed=22)
    with torch.no_grad():
        out = torch.exp(cf.input_jet(x, u, 3))
    assert rel_err(out.coeffs, baseline.jet(torch.exp, x, u, 3)) < 1e-12


# -- random ops: one draw, the plain call's stream ---------------------------------------------

@pytest.mark.parametrize("op", [
    lambda z: F.dropout(torch.tanh(z), 0.3, True),
    lambda z: F.alpha_dropout(torch.tanh(z), 0.3, True),
    lambda z: F.feature_alpha_dropout(torch.tanh(z).reshape(2, 3, 2), 0.4, True).reshape(12),
    lambda z: F.rrelu(z, training=True),
    lambda z: torch.normal(torch.sin(z), torch.exp(0.1 * z)),
    lambda z: z * torch.bernoulli(torch.sigmoid(z)),
    lambda z: z + torch.rand_like(z),
    lambda z: z.clone().uniform_() * 0 + z * z,
], ids=["dropout", "alpha_dropout", "feature_alpha_dropout", "rrelu", "normal", "bernoulli",
        "rand_like", "uniform_"])
def test_random_ops_draw_once_like_the_plain_call(op):
    x, u = rand(12, seed=23), rand(12, seed=24)
    torch.manual_seed(99)
    plain = op(x)
    after_plain = torch.get_rng_state()
    torch.manual_seed(99)
    c = cf.jet(op, x, u, 3)
    assert torch.equal(torch.get_rng_state(), after_plain)
    assert torch.allclose(c[0], plain, rtol=1e-14, atol=1e-14)

    def seeded(z):
        torch.manual_seed(99)
        return op(z)
    assert_matches_fd(c, seeded, [x], [u], 3)


# -- out= and in-place ---------------------------------------------------------------------------

def test_out_argument_with_a_jet_raises():
    x, u = rand(3, seed=25), rand(3, seed=26)
    buf = torch.empty(3, dtype=D64)
    with pytest.raises(cf.JetError, match="out="):
        cf.jet(lambda z: torch.add(z, 1.0, out=buf), x, u, 2)


def test_in_place_ops_on_jets_and_their_errors():
    x, u = rand(3, 4, seed=27), rand(3, 4, seed=28)

    def f(z):
        h = torch.tanh(z)
        h.mul_(z)
        h += 1.0
        h.clamp_(min=-0.5)
        return h
    ref = baseline.jet(lambda z: torch.clamp(torch.tanh(z) * z + 1.0, min=-0.5), x, u, 3)
    assert rel_err(cf.jet(f, x, u, 3), ref) < 1e-12
    with pytest.raises(cf.JetError, match="plain tensor"):
        cf.jet(lambda z: torch.zeros(3, 4, dtype=D64).add_(z), x, u, 2)


# -- views alias their base, as PyTorch's do ----------------------------------------------------

def _sin(z):
    """A base whose own values no rule saved for its backward (sin saves its input, the product
    nothing), so that nested autograd, the oracle, accepts the in-place writes below."""
    return torch.sin(z) * 1.0


# (name, f(h) -> value read): a view taken, then the base or the view written in place, then read
_ALIASING = {
    "view_written_base_read": lambda h: (h[:, :2].mul_(3), h)[1],
    "base_written_view_read": lambda h: (lambda v: (h.mul_(1.5), v * v)[1])(h.view(12)[2:8]),
    "view_of_view_written": lambda h: (lambda v: (v.add_(h.detach()[:, :2]), h.sum(1) + v.sum(1))[1])(
        h.view(3, 2, 2)[:, 0]),
    "two_views_of_one_base": lambda h: (lambda a, b: (a.mul_(2), b * b)[1])(h[0], h[:, 0]),
    "transpose_written": lambda h: (h.t().mul_(2), h.exp())[1],
    "select_filled": lambda h: (h.select(1, 0).fill_(0.5), h)[1],
    "diagonal_written": lambda h: (h[:, :3].diagonal().mul_(4), h)[1],
    "narrow_copied_into": lambda h: (h.narrow(1, 1, 2).copy_(h.detach()[:, :2] * 2), h)[1],
    "unsqueezed_item_assignment": lambda h: (h.unsqueeze(0).__setitem__((0, 1), 0.0), h)[1],
    "base_item_assignment_view_read": lambda h: (lambda v: (h.__setitem__((slice(None), 0), 1.0), v * 2)[1])(
        h[:, :2]),
    "relu_in_place_on_a_view": lambda h: (F.relu(h[:, 1:3], inplace=True), h)[1],
    "dropout_in_place_on_a_flattened_view": lambda h: (torch.manual_seed(0), F.dropout(h.flatten(), 0.4, True, True),
                                                       h)[2],
    "contiguous_written": lambda h: (h.contiguous().mul_(2), h)[1],      # contiguous() is h itself
    # detach() and .data share the storage: they show the later write (as constants)
    "detached_then_base_written": lambda h: (lambda d: (h.add_(1.0), h * d)[1])(h.detach()),
    "data_then_view_written": lambda h: (lambda d: (h[0].mul_(3.0), h * d)[1])(h.data),
    "expanded_view_detached_then_base_written": lambda h: (lambda d: (h.add_(1.0), h * d[0])[1])(
        h[:1].expand(2, 3, 4).detach()),
    # copies in PyTorch: the write stays in the copy
    "reshape_of_a_transpose_written": lambda h: (h.t().reshape(-1).mul_(5), h)[1],
    "advanced_index_written": lambda h: (lambda c: (c.mul_(5), h + c.sum()))(h[[0, 2]])[1],
}


@pytest.mark.parametrize("name", sorted(_ALIASING))
def test_views_alias_their_base_as_in_pytorch(name):
    """A view read after its base was written in place sees the write, and a write into a view
    reaches its base (the engine replaces a written jet's coefficients, so a view used to keep
    the old ones: ``v = h[0]; h.mul_(2)`` gave v un-doubled, silently). Oracle: nested autograd of
    the same code."""
    op = _ALIASING[name]
    x, u = rand(3, 4, seed=31), rand(3, 4, seed=32)

    def f(z):
        return torch.tanh(op(_sin(z)))
    assert rel_err(cf.jet(f, x, u, 3), baseline.jet(f, x, u, 3)) < 1e-12


def test_writes_pytorch_refuses_through_views_are_refused():
    """A write into an expanded view, or (where gradients are tracked) into one of several views
    that one op returned, raises as PyTorch does (its own error), never lands in a copy."""
    x, u = rand(3, 4, seed=33), rand(3, 4, seed=34)
    with pytest.raises(RuntimeError, match="single memory location"):
        cf.jet(lambda z: (_sin(z)[:, :1].expand(3, 4).mul_(2), z)[1], x, u, 2)
    lin = nn.Linear(4, 4).double()
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        cf.jet(lambda z: (lambda h: (h.chunk(2, dim=1)[0].zero_(), h)[1])(lin(z)), x, u, 2)


# functional ops that write into their input: F's inplace= flag, F's and torch's trailing-underscore
# forms; (name, call on h). (hardsigmoid goes the same way; autograd has no derivative of its backward
# to serve as the oracle)
_WRITES_INTO_INPUT = {
    **{f"F.{n}(inplace=True)": (lambda n: lambda h: getattr(F, n)(h, inplace=True))(n)
       for n in ("relu", "relu6", "elu", "celu", "selu", "silu", "mish", "hardswish", "hardtanh",
                 "leaky_relu", "rrelu", "dropout", "dropout1d", "alpha_dropout", "feature_alpha_dropout")},
    "F.threshold(inplace=True)": lambda h: F.threshold(h, 0.1, -0.2, inplace=True),
    "F.dropout(h, 0.3, True, True)": lambda h: F.dropout(h, 0.3, True, True),       # the flag positional
    **{f"F.{n}_": (lambda n: lambda h: getattr(F, n + "_")(h))(n)
       for n in ("relu", "elu", "celu", "selu", "hardtanh", "leaky_relu", "rrelu")},
    "F.threshold_": lambda h: F.threshold_(h, 0.1, -0.2),
    "torch.relu_": torch.relu_,
    "torch.dropout_": lambda h: torch.dropout_(h, 0.3, True),
    "nn.ReLU(inplace=True)": nn.ReLU(inplace=True),
    "nn.Dropout(inplace=True)": nn.Dropout(0.3, inplace=True),
}


@pytest.mark.parametrize("name", sorted(_WRITES_INTO_INPUT))
def test_a_functional_op_in_place_writes_into_the_jet(name):
    """``F.relu(h, inplace=True)`` with its result dropped, and h read again after it: PyTorch's
    caller sees h written, and so must the jet (the rules compute out of place; the jet passed in
    used to keep its old coefficients: a silently wrong derivative). Oracle: nested autograd of the
    same code, PyTorch's own in-place semantics; random ops reseeded alike."""
    op = _WRITES_INTO_INPUT[name]
    lin = nn.Linear(4, 6).double()
    x, u = rand(3, 4, seed=29), rand(3, 4, seed=30)

    def f(z):
        h = lin(z) * 0.7
        torch.manual_seed(1)
        op(h)
        return torch.tanh(h) + h
    assert rel_err(cf.jet(f, x, u, 3), baseline.jet(f, x, u, 3)) < 1e-12


# -- the registry and the verified paths ----------------------------------------------------------

def test_registering_twice_is_an_error_and_override_replaces():
    def my_tanh(x):
        return torch.tanh(x)
    with pytest.raises(RuleRegistrationError, match="already has"):
        cf.register(torch.tanh)(my_tanh)
    old = registry.lookup(torch.special.expit)
    try:
        cf.register(torch.special.expit, override=True)(lambda x: torch.sigmoid(x))
        x, u = rand(3, seed=29), rand(3, seed=30)
        assert rel_err(cf.jet(torch.special.expit, x, u, 3), baseline.jet(torch.sigmoid, x, u, 3)) < 1e-12
    finally:
        registry.unregister(torch.special.expit)
        cf.register(torch.special.expit)(old)


@torch.library.custom_op("curvrate_test::cube", mutates_args=())
def _cube(x: torch.Tensor) -> torch.Tensor:
    return x * x * x


def test_op_without_rule_raises_a_clear_error():
    """An op with no rule raises (there is no generic fallback), naming it
    and saying how to add a rule; registering one makes it work."""
    x, u = rand(3, seed=31), rand(3, seed=32)
    with pytest.raises(cf.RuleMissingError, match="curvrate_test.cube.*no Taylor rule.*register"):
        cf.jet(lambda z: torch.ops.curvrate_test.cube(z), x, u, 2)
    try:
        cf.register(torch.ops.curvrate_test.cube)(lambda z: z * z * z)
        with cf.track_ops() as report:
            c = cf.jet(lambda z: torch.ops.curvrate_test.cube(z), x, u, 3)
        assert rel_err(c, baseline.jet(lambda z: z ** 3, x, u, 3)) < 1e-12
        assert any("cube" in k for k in report.rules)
    finally:
        registry.unregister(torch.ops.curvrate_test.cube)


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * x

    @staticmethod
    def backward(ctx, g):
        return g  # a straight-through backward: not the derivative of the forward


def test_custom_autograd_function_receiving_a_jet_raises():
    """autograd runs a custom Function's forward without grad; the engine must not mistake that
    for a no_grad region (silent zero derivatives) nor differentiate a forward whose derivative
    is defined by its backward."""
    x, u = rand(3, seed=33), rand(3, seed=34)
    with pytest.raises(cf.JetError, match="custom torch.autograd.Function _Square"):
        cf.jet(lambda z: _Square.apply(torch.sin(z)), x, u, 2)
    with pytest.raises(cf.JetError, match="_Square"):
        with torch.no_grad():
            cf.jet(lambda z: _Square.apply(torch.sin(z)), x, u, 2)


_NET_IN_GRADIENT_LOSS = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(D64)


def _input_gradient_terms():
    """Losses that differentiate the network with respect to its input inside the function (a
    physics-informed loss): by torch.autograd.grad, torch.autograd.backward and the
    torch.autograd.functional helpers (which detach an input that does not require grad)."""
    net = _NET_IN_GRADIENT_LOSS

    def by_grad(z):
        z = z if z.requires_grad else z.requires_grad_()
        g = torch.autograd.grad(net(z).sum(), z, create_graph=True)[0]
        return net(z) + g.pow(2).sum(1, keepdim=True)

    def by_backward(z):
        out = net(z)
        torch.autograd.backward(out.sum(), inputs=[z])
        return out

    def by_jacobian(z):
        J = torch.autograd.functional.jacobian(lambda r: net(r).sum(), z, create_graph=True)
        return net(z) + J.pow(2).sum(1, keepdim=True)

    def by_vjp(z):
        _, g = torch.autograd.functional.vjp(lambda r: net(r).sum(), z, create_graph=True)
        return net(z) + g.pow(2).sum(1, keepdim=True)

    def by_hessian(z):
        H = torch.autograd.functional.hessian(lambda r: net(r[:1]).sum(), z, create_graph=True)
        return net(z) + H.sum()
    return {f.__name__: f for f in (by_grad, by_backward, by_jacobian, by_vjp, by_hessian)}


@pytest.mark.parametrize("how", sorted(_input_gradient_terms()))
def test_a_gradient_taken_inside_the_function_raises(how):
    """The engine has no Taylor rule for a gradient computed inside the function. torch.autograd's
    own helpers detach an input that does not require grad: a jet that moves along the path
    answers requires_grad=True, so they reach torch.autograd.grad and raise, instead of returning
    the gradient term as a constant (its Taylor coefficients silently 0: measured before)."""
    fn = _input_gradient_terms()[how]
    x, u = rand(4, 3, seed=41), rand(4, 3, seed=42)
    with pytest.raises(cf.JetError, match="torch.autograd.grad or torch.autograd.backward on a jet"):
        cf.jet(fn, x, u, 2)


def test_requires_grad_of_a_jet():
    """A jet that moves along the path requires grad; a constant one (no stored coefficient beyond
    the primal, e.g. a value computed under no_grad in the model) does as its primal does."""
    x, u = rand(4, 3, seed=43), rand(4, 3, seed=44)
    seen = {}

    def fn(z):
        seen["input"] = z.requires_grad
        with torch.no_grad():
            c = z * 2
        seen["no_grad"] = c.requires_grad
        return z.sum(1)
    cf.jet(fn, x, u, 2)
    assert seen == {"input": True, "no_grad": False}


def _machinery_cases():
    net = _NET_IN_GRADIENT_LOSS
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(D64))
    traced = torch.jit.trace(nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(D64), torch.zeros(2, 3, dtype=D64))

    def forward_ad(z):
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            return fwAD.unpack_dual(net(fwAD.make_dual(z, torch.ones_like(z)))).tangent
    func = "a torch.func transform"
    return {
        "vmap": (lambda z: torch.func.vmap(net)(z), func),
        "grad": (lambda z: net(z) + torch.func.grad(lambda r: net(r).sum())(z).sum(1, keepdim=True), func),
        "jacrev": (lambda z: net(z) + torch.func.jacrev(lambda r: net(r).sum())(z).sum(1, keepdim=True), func),
        "func_jvp": (lambda z: torch.func.jvp(net, (z,), (torch.ones_like(z),))[1], "forward-mode AD"),
        "forward_ad": (forward_ad, "forward-mode AD"),
        "jit_script": (lambda z: scripted(z), "TorchScript"),
        "jit_trace": (lambda z: traced(z), "TorchScript"),
    }


@pytest.mark.parametrize("case", sorted(_machinery_cases()))
def test_transforms_and_torchscript_inside_the_function_raise_named_errors(case):
    """Code that runs below __torch_function__ or outside Python (torch.func transforms,
    forward-mode AD, TorchScript) cannot carry a jet: each raises an error that names it (before:
    'an ATen op bypassed __torch_function__, please report it', or a missing rule for
    'torch._make_dual' or 'Sequential.forward')."""
    fn, named = _machinery_cases()[case]
    x, u = rand(4, 3, seed=45), rand(4, 3, seed=46)
    with pytest.raises(cf.JetError, match=named):
        cf.jet(fn, x, u, 2)


def test_copy_into_a_jet_is_linear_and_into_a_plain_tensor_raises():
    """dst.copy_(src): a jet takes src's coefficients (broadcast, cast), a plain src makes it a
    constant, a copy into a view of a jet lands in the jet it views; a copy into a plain tensor
    and the copy constructors (torch.tensor(x), torch.Tensor(x), set_) raise errors that name
    them (before: 'Tensor.copy_ has no Taylor rule' and 'an ATen op bypassed __torch_function__')."""
    x, u = rand(5, 3, seed=47), rand(5, 3, seed=48)

    def copied(z):
        w = z * 3.0
        w.copy_(torch.sin(z))
        return w

    def broadcast_cast(z):
        w = (z * 1.0).float()
        w.copy_(torch.sin(z[0]))
        return w.double()

    def constant(z):
        w = z * 1.0
        w.copy_(torch.ones(5, 3, dtype=z.dtype))
        return w + torch.sin(z)
    assert rel_err(cf.jet(copied, x, u, 3), cf.jet(torch.sin, x, u, 3)) < 1e-15
    ref = cf.jet(lambda z: torch.sin(z[0]).float().double().expand(5, 3), x, u, 3)
    assert rel_err(cf.jet(broadcast_cast, x, u, 3), ref) < 1e-15
    assert rel_err(cf.jet(constant, x, u, 3), cf.jet(lambda z: 1.0 + torch.sin(z), x, u, 3)) < 1e-15

    def into_plain(z):
        return torch.zeros(5, 3, dtype=z.dtype).copy_(z)

    def into_view(z):
        w = z * 1.0
        w[0].copy_(z[1])
        return w
    with pytest.raises(cf.JetError, match="writes a jet into a plain tensor"):
        cf.jet(into_plain, x, u, 2)
    # a copy into a view of a jet writes into the jet it views, as in PyTorch (refused before)
    assert rel_err(cf.jet(into_view, x, u, 3), baseline.jet(into_view, x, u, 3)) < 1e-14
    for construct in (torch.tensor, torch.Tensor, lambda z: torch.empty(0, dtype=z.dtype).set_(z)):
        with pytest.raises(cf.JetError, match="a constructor that copies a tensor"):
            cf.jet(construct, x, u, 2)


def test_python_numbers_of_a_jet_are_constants_as_in_autograd():
    """item(), float() and tolist() give the primal value: a value that re-enters the computation
    through them is a constant, as nested autograd has it (the derivative does not pass)."""
    x, u = rand(5, 3, seed=49), rand(5, 3, seed=50)
    y = torch.tensor([0, 1, 2, 1, 0])
    lin = nn.Linear(3, 3, dtype=D64)

    def model(z):
        h = torch.tanh(lin(z))
        scale = h.sum().item() + float(h[0, 0]) + sum(h[1].tolist())
        return h * scale
    ours = cf.loss_directional_derivatives(model, x, y, u, 3)
    assert rel_err(ours, _nested_autograd_loss_derivatives(model, x, y, u, 3)) < 1e-10


def test_inplace_op_with_a_wider_operand_casts_like_torch():
    """float32 x.add_(float64 y) is legal in PyTorch (computed in float64, stored as float32): the
    jet does the same to every coefficient (it used to refuse, claiming PyTorch does); a cast that
    torch's rules forbid (complex into real) raises as PyTorch does."""
    g = torch.Generator().manual_seed(3)
    x, u = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    y = torch.randn(3, 4, generator=g, dtype=D64)

    def f(a):
        return (a * a).mul_(y).add_(y)
    ours = cf.jet(f, x, u, 3)
    assert ours.dtype == torch.float32
    ref = baseline.jet(f, x.double(), u.double(), 3)   # the float64 truth
    assert rel_err(ours.double(), ref) < 1e-6
    assert torch.equal(ours[0], f(x.clone()))
    z = torch.randn(3, 4, generator=g, dtype=torch.complex64)
    with pytest.raises(RuntimeError):
        (x * 1).add_(z)
    with pytest.raises(cf.JetError, match=r"add_: result type torch.complex64 can't be cast"):
        cf.jet(lambda a: (a * 1).add_(z), x, u, 2)
