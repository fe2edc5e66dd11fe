"""Captured jet programs (curvrate_fast.capture, docs/design.md §6): the graph replays the eager
engine exactly (float64, ≤ 1e-12) on the engine's model zoo, in train mode with dropout (the same
masks), with fresh subsets and directions at every step, across shape changes (a new capture) and
parameter updates (no stale weights); what cannot replay exactly is refused; a user's
torch.compile(fullgraph=True) of a CRR step compiles without graph breaks and matches eager.

The graphs are replayed uncompiled (backend="eager") except in the one test that runs inductor: the
replay is what capture adds, inductor's own correctness is PyTorch's."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _steps import adam, torch_and_captured
from models import EncoderClassifier, MnistCNN, ResidualLN, SpecialFunctionModel, mlp

import curvrate_fast as cf
from curvrate_fast import crr as crr_mod

D64 = torch.float64
TOL = 1e-12


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def derivative_loss(model, x, y, u):
    return cf.loss_directional_derivatives(model, x, y, u, 3).abs().mean()


def _compare(fn, model, *tensors, seed=0, steps=2, fresh=None):
    """Captured vs eager over a few steps, the same RNG state for both, the parameters updated
    between steps; ``fresh(step)`` gives new tensors per step."""
    fast = cf.compile(fn, backend="eager")
    twin = copy.deepcopy(model)
    for step in range(steps):
        if fresh is not None:
            tensors = fresh(step)
        torch.manual_seed(seed + step)
        a = fast(model, *tensors)
        ga = torch.autograd.grad(a, [p for p in model.parameters() if p.requires_grad])
        torch.manual_seed(seed + step)
        b = fn(twin, *tensors)
        gb = torch.autograd.grad(b, [p for p in twin.parameters() if p.requires_grad])
        assert _max_rel(a.detach(), b.detach()) <= TOL, (step, a.item(), b.item())
        for p, q in zip(ga, gb):
            assert _max_rel(p, q) <= TOL, step
        with torch.no_grad():  # an optimizer step on both: the graph must see the new weights
            for p, q, g in zip(model.parameters(), twin.parameters(), ga):
                p.sub_(0.05 * g)
                q.sub_(0.05 * g)
    assert fast.captures == 1
    return fast


ACTS = {"tanh": nn.Tanh(), "gelu": nn.GELU(), "relu": nn.ReLU(), "mish": nn.Mish(), "silu": nn.SiLU()}


@pytest.mark.parametrize("act", sorted(ACTS))
def test_mlp_zoo(act):
    torch.manual_seed(0)
    model = mlp(ACTS[act]).double()
    y = torch.randint(0, 3, (6,))
    _compare(derivative_loss, model, fresh=lambda s: (torch.randn(6, 5, dtype=D64), y,
                                                      torch.randn(2, 6, 5, dtype=D64)))


@pytest.mark.parametrize("train", [False, True])
def test_mnist_cnn_with_dropout(train):
    """Train mode: the dropout masks of the graph are the ones the eager engine draws."""
    torch.manual_seed(1)
    model = MnistCNN().double().train(train)
    x, y, u = torch.randn(3, 1, 28, 28, dtype=D64), torch.randint(0, 10, (3,)), torch.randn(3, 1, 28, 28, dtype=D64)
    _compare(derivative_loss, model, x, y, u)


@pytest.mark.parametrize("name", ["residual_ln", "encoder", "encoder_gelu_prenorm", "special"])
def test_other_zoo_models(name):
    torch.manual_seed(2)
    if name == "residual_ln":
        model, shape = ResidualLN().double(), (5, 8)
    elif name == "encoder":
        model, shape = EncoderClassifier().double().eval(), (3, 5, 16)
    elif name == "encoder_gelu_prenorm":
        model, shape = EncoderClassifier(norm_first=True, activation="gelu").double().eval(), (3, 5, 16)
    else:
        model, shape = SpecialFunctionModel().double(), (4, 4)
    y = torch.randint(0, 3, (shape[0],))
    _compare(derivative_loss, model, fresh=lambda s: (torch.randn(shape, dtype=D64), y,
                                                      torch.randn(shape, dtype=D64)))


def test_multihead_attention_with_mask():
    torch.manual_seed(4)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)
            self.register_buffer("mask", torch.triu(torch.ones(4, 4, dtype=torch.bool), 1))

        def forward(self, x):
            out, _ = self.mha(x, x, x, attn_mask=self.mask, need_weights=True)
            return self.head(out.mean(1))

    model = M().double().eval()
    y = torch.randint(0, 3, (3,))
    _compare(derivative_loss, model, fresh=lambda s: (torch.randn(3, 4, 8, dtype=D64), y,
                                                      torch.randn(3, 4, 8, dtype=D64)))


# -- CRR through compile= -----------------------------------------------------------------------

def _crr_pair(compile_arg, **kw):
    return cf.CRRLoss(compile=compile_arg, **kw), cf.CRRLoss(**kw)


def _train_both(crit_a, crit_b, model, batches, lr=0.1):
    twin = copy.deepcopy(model)
    oa, ob = torch.optim.SGD(model.parameters(), lr=lr), torch.optim.SGD(twin.parameters(), lr=lr)
    for step, (x, y) in enumerate(batches):
        torch.manual_seed(100 + step)
        oa.zero_grad()
        la = crit_a(model, x, y)
        la.backward()
        oa.step()
        torch.manual_seed(100 + step)
        ob.zero_grad()
        lb = crit_b(twin, x, y)
        lb.backward()
        ob.step()
        assert _max_rel(la.detach(), lb.detach()) <= TOL, step
        assert _max_rel(crit_a.last_penalty, crit_b.last_penalty) <= TOL, step
        assert _max_rel(crit_a.last_task_loss, crit_b.last_task_loss) <= TOL, step
        for p, q in zip(model.parameters(), twin.parameters()):
            assert _max_rel(p.detach(), q.detach()) <= TOL, step
    return twin


def _program(kind, backend="eager"):
    return crr_mod._program(kind, backend)


@pytest.mark.parametrize("directions", ["per_order", "fixed"])
def test_crrloss_fresh_subset_and_directions_every_step(directions):
    """The Two Moons setting (random 6 of 10, a fresh direction per order, dropout on): one graph
    serves every step, and each step's new subset and directions reach it (a graph that replayed
    stale ones would differ from the eager engine at step ≥ 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 2)).double().train()
    crit_a, crit_b = _crr_pair("eager", orders=(2, 3), directions=directions, subset=6, scale=3e-2)
    batches = [(torch.randn(10, 2, dtype=D64), torch.randint(0, 2, (10,))) for _ in range(4)]
    prog = _program("total")
    before = prog.captures
    _train_both(crit_a, crit_b, model, batches)
    assert prog.captures == before + 1
    penalties = set()
    for step in range(2):  # the same batch and weights, another draw: another penalty
        torch.manual_seed(7 + step)
        penalties.add(round(crit_a(model, *batches[0]).item(), 15))
    assert len(penalties) == 2


def test_crrloss_shape_change_recaptures_and_mode_change():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 3)).double().train()
    crit_a, crit_b = _crr_pair("eager", orders=(1, 3), subset=None, scale=0.5)
    batches = [(torch.randn(B, 3, dtype=D64), torch.randint(0, 3, (B,))) for B in (7, 7, 5, 7)]
    prog = _program("total")
    before = prog.captures
    _train_both(crit_a, crit_b, model, batches)
    assert prog.captures == before + 2          # B = 7 and B = 5, each once
    model.eval()
    crit_b_model = copy.deepcopy(model)
    torch.manual_seed(3)
    a = crit_a(model, *batches[0])
    torch.manual_seed(3)
    b = crit_b(crit_b_model, *batches[0])
    assert prog.captures == before + 3          # eval mode is another configuration
    assert _max_rel(a.detach(), b.detach()) <= TOL


def test_a_scale_schedule_keeps_one_graph():
    """The penalty's scale is a graph input, not a constant: a schedule that changes it every step
    (a warm-up of the regularizer) replays one graph, with the eager values. Before: every new
    scale was a new configuration (11 captures in 12 steps, each an inductor compile with
    compile=True, and the cache-eviction warning)."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double().train()
    crit_a, crit_b = _crr_pair("eager", orders=(2, 3), directions="per_order", subset=6, scale=1e-2)
    batches = [(torch.randn(10, 2, dtype=D64), torch.randint(0, 2, (10,))) for _ in range(5)]
    prog = _program("total")
    before = prog.captures
    for step, batch in enumerate(batches):     # (each call trains model and a fresh copy of it)
        crit_a.scale = crit_b.scale = 1e-2 * (step + 1)
        _train_both(crit_a, crit_b, model, [batch])
    assert prog.captures == before + 1
    pen = _program("penalty")
    before = pen.captures
    x, y = batches[0]
    for scale in (0.5, 2.0, 0.0):
        a = cf.crr_penalty(model, x, y, orders=(1, 2), scale=scale, compile="eager",
                           generator=torch.Generator().manual_seed(1))
        b = cf.crr_penalty(model, x, y, orders=(1, 2), scale=scale, generator=torch.Generator().manual_seed(1))
        assert float((a - b).abs()) <= TOL * max(float(b.abs()), 1e-300)
    assert pen.captures == before + 1
    # float32: the scale input must not promote the 0-d penalty (the loss keeps the model's dtype)
    m32, x32 = copy.deepcopy(model).float(), x.float()
    crit32, ref32 = cf.CRRLoss(orders=(1, 2), scale=0.3, compile="eager"), cf.CRRLoss(orders=(1, 2), scale=0.3)
    torch.manual_seed(4)
    a = crit32(m32, x32, y)
    torch.manual_seed(4)
    b = ref32(m32, x32, y)
    assert a.dtype == b.dtype == crit32.last_penalty.dtype == torch.float32
    assert float((a - b).abs()) <= 1e-6 * float(b.abs())


def test_argument_values_not_addresses():
    """Non-tensor arguments are keyed by value (containers, functions by code and closure) or by an
    identity the key keeps alive, never by a bare id(): a list made anew per call could get the
    address of a freed one and replay its graph. Measured before: the third call, with
    [1.0, 0.0], returned the loss of [0.0, 1.0]."""
    import weakref

    from curvrate_fast.capture import _Const
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y, u = torch.randn(16, 2, dtype=D64), torch.randint(0, 2, (16,)), torch.randn(16, 2, dtype=D64)

    def weighted(m, x, y, u, weights):
        d = cf.loss_directional_derivatives(m, x, y, u, 2)
        return sum(w * d[i].abs().mean() for i, w in enumerate(weights))

    fast = cf.compile(weighted, backend="eager")
    for ws in ([1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]):
        a = fast(model, x, y, u, list(ws))
        assert _max_rel(a.detach(), weighted(model, x, y, u, list(ws)).detach()) <= TOL, ws
    assert fast.captures == 2
    assert _Const([1.0, 0.0]).key == _Const([1.0, 0.0]).key != _Const([0.0, 1.0]).key
    assert _Const(2).key != _Const(2.0).key != _Const(True).key

    class Opaque:                   # unhashable, no value: by identity, kept alive by the key
        __hash__ = None
    obj = Opaque()
    key, ref = _Const(obj).key, weakref.ref(obj)
    del obj
    assert ref() is not None and key == key


def test_an_inline_lambda_is_one_configuration():
    """A loss_fn written inline (a new function object at every call) is keyed by its code and
    closure: one capture for the same lambda, another where its closure holds another value.
    Before: a capture per call (with compile=True an inductor compile per step)."""
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(12, 2, dtype=D64), torch.randint(0, 3, (12,))
    prog = _program("penalty")
    before = prog.captures
    for smoothing in (0.0, 0.0, 0.0, 0.2, 0.2):
        kw = dict(orders=(1, 2), generator=torch.Generator().manual_seed(3),
                  loss_fn=lambda z, t: F.cross_entropy(z, t, reduction="none", label_smoothing=smoothing))
        a = cf.crr_penalty(model, x, y, compile="eager", **kw)
        kw["generator"] = torch.Generator().manual_seed(3)
        b = cf.crr_penalty(model, x, y, **kw)
        assert _max_rel(a.detach(), b.detach()) <= TOL, smoothing
    assert prog.captures == before + 2


def test_crr_penalty_explicit_directions_and_generator():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(9, 4, dtype=D64), torch.randint(0, 3, (9,))
    us = [torch.randn(9, 4, dtype=D64) for _ in range(3)]
    kw = dict(orders=(1, 3), scale=2.0, subset=5)
    for directions in (us[0], us):
        a = cf.crr_penalty(model, x, y, directions=directions, compile="eager",
                           generator=torch.Generator().manual_seed(5), **kw)
        b = cf.crr_penalty(model, x, y, directions=directions, generator=torch.Generator().manual_seed(5), **kw)
        assert _max_rel(a.detach(), b.detach()) <= TOL
    bad = [u.clone() for u in us]
    bad[1][3] = 0.0
    with pytest.raises(ValueError, match="zero"):
        cf.crr_penalty(model, x, y, directions=bad, compile="eager", **kw)
    with pytest.raises(ValueError, match="labels"):
        cf.crr_penalty(model, x, y - 5, compile="eager", **kw)
    with pytest.raises(TypeError, match="nn.Module"):
        cf.crr_penalty(lambda z: model(z), x, y, compile="eager", **kw)


def test_compile_options_give_a_program_of_their_own():
    """compile_options reach the captured program (a program per set of options, the options
    handed to its compile), the result is the eager engine's, and misuse is refused by name."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(6, 3, dtype=D64), torch.randint(0, 2, (6,))
    opts = {"max_autotune": False}
    kw = dict(orders=(1, 3), scale=0.4, subset=4)
    crit = cf.CRRLoss(**kw, compile="eager", compile_options=opts)
    torch.manual_seed(9)
    a = crit(model, x, y)
    torch.manual_seed(9)
    b = cf.CRRLoss(**kw)(model, x, y)
    assert _max_rel(a.detach(), b.detach()) <= TOL
    prog = crr_mod._program("total", "eager", (("max_autotune", False),))
    assert prog is not _program("total") and prog.options == opts and prog.captures >= 1
    assert "compile_options={'max_autotune': False}" in repr(crit)
    later = cf.CRRLoss(**kw, compile="eager")
    later.compile_options = {"max_autotune": True}          # read at every call, not frozen
    later(model, x, y)
    assert crr_mod._program("total", "eager", (("max_autotune", True),)).captures == 1
    torch.manual_seed(9)
    p = cf.crr_penalty(model, x, y, compile="eager", compile_options=opts, **kw)
    assert crr_mod._program("penalty", "eager", (("max_autotune", False),)).options == opts
    torch.manual_seed(9)
    assert _max_rel(p.detach(), cf.crr_penalty(model, x, y, **kw).detach()) <= TOL
    with pytest.raises(ValueError, match="compile_options needs compile=True"):
        cf.CRRLoss(**kw, compile_options=opts)
    with pytest.raises(ValueError, match="compile_options needs compile=True"):
        cf.crr_penalty(model, x, y, compile_options=opts, **kw)
    with pytest.raises(TypeError, match="must be a dict"):
        cf.CRRLoss(**kw, compile=True, compile_options=[("max_autotune", False)])
    with pytest.raises(TypeError, match="hashable"):
        cf.CRRLoss(**kw, compile=True, compile_options={"triton.cudagraphs": [True]})


def test_no_grad_call_captures_a_value_only_graph():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y, u = torch.randn(4, 3, dtype=D64), torch.randint(0, 2, (4,)), torch.randn(4, 3, dtype=D64)
    fast = cf.compile(derivative_loss, backend="eager")
    with torch.no_grad():
        v = fast(model, x, y, u)
    assert not v.requires_grad
    assert _max_rel(v, derivative_loss(model, x, y, u).detach()) <= TOL
    g = torch.autograd.grad(fast(model, x, y, u), list(model.parameters()))
    assert fast.captures == 2 and all(t.abs().sum() > 0 for t in g)
    # gradients with respect to a tensor argument that requires grad
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(fast(model, xr, y, u), [xr])
    (gx_e,) = torch.autograd.grad(derivative_loss(model, xr, y, u), [xr])
    assert _max_rel(gx, gx_e) <= TOL


def test_backward_scales_by_the_incoming_gradient_and_accumulates():
    """loss.backward()'s implicit 1 hands the graph's gradients over as they are; any other
    incoming gradient (a scaled loss, an explicit one, a sum with another loss) multiplies them,
    and .grad accumulates across backward calls as with an eager loss."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y, u = torch.randn(5, 3, dtype=D64), torch.randint(0, 2, (5,)), torch.randn(5, 3, dtype=D64)
    fast = cf.compile(derivative_loss, backend="eager")
    params = list(model.parameters())
    ref = torch.autograd.grad(derivative_loss(model, x, y, u), params)

    def grads_after(run):
        for p in params:
            p.grad = None
        run()
        return [p.grad.clone() for p in params]

    cases = {
        "implicit one": (lambda: fast(model, x, y, u).backward(), 1.0),
        "scaled loss": (lambda: (-2.5 * fast(model, x, y, u)).backward(), -2.5),
        "explicit gradient": (lambda: fast(model, x, y, u).backward(torch.tensor(0.5, dtype=D64)), 0.5),
        "sum with another loss": (lambda: (fast(model, x, y, u) + 0.0 * params[0].sum()).backward(), 1.0),
        "two backward calls": (lambda: (fast(model, x, y, u).backward(), fast(model, x, y, u).backward()), 2.0),
    }
    for name, (run, factor) in cases.items():
        got = grads_after(run)
        for g, r in zip(got, ref):
            assert _max_rel(g, factor * r) <= TOL, name
    # the handed-over gradients are the call's own tensors: a later call writes none of them
    for p in params:
        p.grad = None
    fast(model, x, y, u).backward()
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    fast(model, x + 1.0, y, u).backward()
    for g, r, p in zip(held, ref, params):
        assert g is not p.grad and _max_rel(g, r) <= TOL


def test_autocast_state_is_part_of_the_configuration():
    """A graph recorded under autocast holds its casts: the same call in and out of autocast is two
    captures, each replaying what the eager engine computes in that state."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y, u = torch.randn(4, 3), torch.randint(0, 2, (4,)), torch.randn(4, 3)
    fast = cf.compile(derivative_loss, backend="eager")
    plain = fast(model, x, y, u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast(model, x, y, u)
        low_eager = derivative_loss(model, x, y, u)
    assert fast.captures == 2
    torch.testing.assert_close(low, low_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain, derivative_loss(model, x, y, u), rtol=1e-6, atol=1e-7)
    assert not torch.equal(low, plain)              # bfloat16 GEMMs: another number
    assert torch.equal(fast(model, x, y, u), plain)  # back out of autocast: the first graph again
    assert fast.captures == 2


# -- refusals -------------------------------------------------------------------------------------

def test_refuses_what_would_replay_stale():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y, u = torch.randn(4, 3, dtype=D64), torch.randint(0, 2, (4,)), torch.randn(4, 3, dtype=D64)

    closure = cf.compile(lambda x, y, u: derivative_loss(model, x, y, u), backend="eager")
    with pytest.raises(cf.CaptureError, match="module argument"):
        closure(x, y, u)

    def reads_a_value(model, x, y, u):
        d = cf.loss_directional_derivatives(model, x, y, u, 2)
        return d.abs().mean() * (2.0 if d.sum().item() > 0 else 1.0)
    with pytest.raises(cf.CaptureError, match="read into Python"):
        cf.compile(reads_a_value, backend="eager")(model, x, y, u)

    class Attr(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.shift = torch.randn(3, dtype=D64)     # a plain attribute, not a buffer

        def forward(self, z):
            return self.fc(z + self.shift)
    with pytest.raises(cf.CaptureError, match="register it as a buffer"):
        cf.compile(derivative_loss, backend="eager")(Attr().double(), x, y, u)

    with pytest.raises(cf.CaptureError, match="scalar"):
        cf.compile(lambda m, x, y, u: cf.loss_directional_derivatives(m, x, y, u, 2),
                   backend="eager")(model, x, y, u)
    with pytest.raises(cf.CaptureError, match="top-level"):
        cf.compile(lambda m, xs: derivative_loss(m, *xs), backend="eager")(model, (x, y, u))
    with pytest.raises(ValueError, match="NaN"):
        cf.compile(derivative_loss, backend="eager")(model, x, y, u * float("nan"))


def test_weights_tied_across_modules():
    """One Parameter held by two modules (an LM's tied embedding and output layer): each of its
    names is a graph input of its own, so the graph sees both uses and the gradients add up, in
    the call and in train_step. Before: the capture raised functional_call's "got multiple values
    for keys ['0.weight', '2.weight'], which are tied" (GPT-2 could not be captured)."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    model[2].weight = model[0].weight
    x, y, u = torch.randn(6, 4, dtype=D64), torch.randint(0, 4, (6,)), torch.randn(6, 4, dtype=D64)
    _compare(derivative_loss, copy.deepcopy(model), x, y, u, steps=3)
    eager, captured = torch_and_captured(derivative_loss, model, (x, y, u), adam)
    assert eager[2].weight is eager[0].weight
    for (n, a), b in zip(captured.named_parameters(), eager.parameters()):
        assert _max_rel(a.detach(), b.detach()) <= TOL and _max_rel(a.grad, b.grad) <= TOL, n
    assert captured[2].weight is captured[0].weight


def test_one_module_passed_twice():
    """The same module as two arguments is reparametrized twice (the inner table in force):
    the gradients still equal eager, and the reassignment check does not mistake the second
    table for a reassignment."""
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y, u = torch.randn(5, 3, dtype=D64), torch.randint(0, 2, (5,)), torch.randn(5, 3, dtype=D64)

    def twice(m1, m2, x, y, u):
        return derivative_loss(m1, x, y, u) + derivative_loss(m2, x, y, -u)

    a = cf.compile(twice, backend="eager")(model, model, x, y, u)
    ga = torch.autograd.grad(a, list(model.parameters()))
    b = twice(model, model, x, y, u)
    gb = torch.autograd.grad(b, list(model.parameters()))
    assert _max_rel(a.detach(), b.detach()) <= TOL
    for p, q in zip(ga, gb):
        assert _max_rel(p, q) <= TOL


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, z):
        from torch.utils.checkpoint import checkpoint
        h = checkpoint(lambda t: torch.tanh(self.a(t)), z, use_reentrant=self.reentrant)
        return self.b(h)


@pytest.mark.parametrize("kind", ["checkpoint", "checkpoint_reentrant", "torch_compiled"])
def test_activation_checkpointing_and_a_compiled_model(kind):
    """Activation checkpointing recomputes the forward inside the backward: the capture keeps the
    graph's inputs in the modules while it differentiates, so the recomputation meets them (before:
    refused with a misleading "a parameter entered the graph as a constant"). A torch.compile'd
    model (OptimizedModule) runs its original module into the trace (before: dynamo's "FX to
    symbolically trace a dynamo-optimized function"). Call path and train_step equal eager."""
    torch.manual_seed(18)
    if kind == "torch_compiled":
        model = torch.compile(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double(),
                              backend="eager")
    else:
        model = _Checkpointed(reentrant=kind.endswith("reentrant")).double()
    x, y, u = torch.randn(5, 3, dtype=D64), torch.randint(0, 2, (5,)), torch.randn(5, 3, dtype=D64)
    _compare(derivative_loss, copy.deepcopy(model), x, y, u, steps=2)
    eager, captured = torch_and_captured(derivative_loss, model, (x, y, u), adam)
    for a, b in zip(captured.parameters(), eager.parameters()):
        assert _max_rel(a.detach(), b.detach()) <= TOL


class _WithSpare(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.spare = nn.Linear(2, 2)          # not used by forward

    def forward(self, z):
        return self.net(z)


def test_a_parameter_the_loss_does_not_reach_gets_no_gradient():
    """As in eager autograd, a parameter the loss does not reach keeps .grad None, so AdamW skips
    it. Before: the captured loss handed it a zero gradient and AdamW's weight decay and momentum
    moved it, unlike the eager step."""
    torch.manual_seed(12)
    model = _WithSpare().double()
    x, y, u = torch.randn(5, 3, dtype=D64), torch.randint(0, 2, (5,)), torch.randn(5, 3, dtype=D64)
    runs = []
    for captured in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        fn = cf.compile(derivative_loss, backend="eager") if captured else derivative_loss
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            fn(m, x, y, u).backward()
            assert m.spare.weight.grad is None and m.spare.bias.grad is None
            opt.step()
        runs.append(m)
    assert torch.equal(runs[1].spare.weight, model.spare.weight)
    for (n, a), b in zip(runs[1].named_parameters(), runs[0].parameters()):
        assert _max_rel(a.detach(), b.detach()) <= TOL, n


class _Counting(nn.Module):
    """A layer that updates buffers in place during its forward (a counter, an EMA under no_grad)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.register_buffer("count", torch.zeros((), dtype=D64))
        self.register_buffer("running", torch.zeros(3, dtype=D64))

    def forward(self, z):
        self.count += 1
        with torch.no_grad():
            self.running.mul_(0.9).add_(0.1 * torch.ones(3, dtype=D64))
        return self.fc(z + self.running)


def test_buffers_updated_in_place_once_per_call_as_in_eager():
    """The trace runs the function on real tensors: a buffer it updates in place is traced on a
    copy, so the first call updates it once, like every replay and every eager call. Before: the
    first call counted 2 and applied the EMA twice, and every later value differed from eager
    (8e-5, growing). Also through train_step (the update in the same graph)."""
    torch.manual_seed(9)
    model = nn.Sequential(_Counting(), nn.Tanh(), nn.Linear(4, 2)).double()
    twin = copy.deepcopy(model)
    x, y, u = torch.randn(5, 3, dtype=D64), torch.randint(0, 2, (5,)), torch.randn(5, 3, dtype=D64)
    fast = _compare(derivative_loss, model, x, y, u, steps=3)
    assert fast.captures == 1 and model[0].count.item() == 3
    step_fast = cf.compile(derivative_loss, backend="eager")
    eager = copy.deepcopy(twin)
    opt_a, opt_b = torch.optim.SGD(twin.parameters(), lr=0.1), torch.optim.SGD(eager.parameters(), lr=0.1)
    for step in range(3):
        a = step_fast.train_step(opt_a, twin, x, y, u)
        opt_b.zero_grad()
        b = derivative_loss(eager, x, y, u)
        b.backward()
        opt_b.step()
        assert _max_rel(a, b.detach()) <= TOL, step
        for name, t in eager.state_dict().items():
            assert _max_rel(twin.state_dict()[name], t) <= TOL, (step, name)
    assert twin[0].count.item() == 3


def test_refuses_what_a_graph_would_drop_or_apply_twice():
    """A buffer replaced by a new tensor during the forward (eager keeps the new one, a graph
    would drop it: measured before, an EMA buffer stayed 0 under capture), and an argument
    changed in place by the function (the trace would change it once more than eager)."""
    class Reassign(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.register_buffer("ema", torch.zeros(3, dtype=D64))

        def forward(self, z):
            self.ema = 0.9 * self.ema + 0.1
            return self.fc(z + self.ema)

    torch.manual_seed(10)
    x, y, u = torch.randn(5, 3, dtype=D64), torch.randint(0, 2, (5,)), torch.randn(5, 3, dtype=D64)
    model = nn.Sequential(Reassign(), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(cf.CaptureError, match="assigns a new tensor to '0.ema'"):
        cf.compile(derivative_loss, backend="eager")(model, x, y, u)
    assert model[0].ema.abs().max() == 0          # the refused trace left the module as it was

    def scales_u(m, x, y, u):
        u.mul_(2.0)
        return derivative_loss(m, x, y, u)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(cf.CaptureError, match="changed tensor argument 3 in place"):
        cf.compile(scales_u, backend="eager")(plain, x, y, u)


MODULE_HOOKS = {
    "forward pre-hook": lambda m: m.register_forward_pre_hook(lambda mod, i: None),
    "forward hook": lambda m: m.register_forward_hook(lambda mod, i, o: None),
    "backward pre-hook": lambda m: m.register_full_backward_pre_hook(lambda mod, go: None),
    "backward hook": lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
}
_M = torch.nn.modules.module
GLOBAL_HOOKS = {
    "forward pre-hook": lambda: _M.register_module_forward_pre_hook(lambda mod, i: None),
    "forward hook": lambda: _M.register_module_forward_hook(lambda mod, i, o: None),
    "backward pre-hook": lambda: _M.register_module_full_backward_pre_hook(lambda mod, go: None),
    "backward hook": lambda: _M.register_module_full_backward_hook(lambda mod, gi, go: None),
}


@pytest.mark.parametrize("kind", sorted(MODULE_HOOKS))
def test_refuses_module_hooks_even_added_after_the_capture(kind):
    """A graph runs a hook once, while it is recorded: its side effects would not repeat. Measured
    before the refusal: a forward hook appending to a list ran once in three captured calls, and a
    global forward hook doubling the Tanh output changed eager (0.183) but not the replay
    (0.093)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y, u = torch.randn(4, 3, dtype=D64), torch.randint(0, 2, (4,)), torch.randn(4, 3, dtype=D64)
    fast = cf.compile(derivative_loss, backend="eager")
    ok = fast(model, x, y, u)
    handle = MODULE_HOOKS[kind](model[1])
    with pytest.raises(cf.CaptureError, match=f"submodule '1' \\(Tanh\\) has a {kind}"):
        fast(model, x, y, u)
    handle.remove()                      # without the hook the loss captures (or replays) again
    assert torch.equal(fast(model, x, y, u), ok)


@pytest.mark.parametrize("kind", sorted(GLOBAL_HOOKS))
def test_refuses_global_module_hooks_even_added_after_the_capture(kind):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y, u = torch.randn(4, 3, dtype=D64), torch.randint(0, 2, (4,)), torch.randn(4, 3, dtype=D64)
    fast = cf.compile(derivative_loss, backend="eager")
    ok = fast(model, x, y, u)
    handle = GLOBAL_HOOKS[kind]()
    try:
        with pytest.raises(cf.CaptureError, match=f"global module {kind}"):
            fast(model, x, y, u)
    finally:
        handle.remove()
    assert torch.equal(fast(model, x, y, u), ok) and fast.captures == 1


def test_parametrizations_need_no_hook_and_replay_exactly():
    """What the hook refusal recommends for weight normalization: torch.nn.utils.parametrizations
    (a property, no hook) captures and follows parameter updates."""
    from torch.nn.utils import parametrizations
    torch.manual_seed(7)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 5)), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y, u = torch.randn(6, 3, dtype=D64), torch.randint(0, 2, (6,)), torch.randn(6, 3, dtype=D64)
    _compare(derivative_loss, model, x, y, u, steps=3)


@pytest.mark.parametrize("outer", ["loss", "loss_squared", "plus_eager_term"])
def test_refuses_a_differentiable_backward(outer):
    """The graph's gradients are computed values: a backward with create_graph=True (a gradient
    penalty, a Hessian-vector product) would lose the captured loss's second-order terms. It is
    refused, however the loss enters the outer expression; an ordinary backward still works."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y, u = torch.randn(6, 3, dtype=D64), torch.randint(0, 2, (6,)), torch.randn(6, 3, dtype=D64)
    fast = cf.compile(derivative_loss, backend="eager")
    params = list(model.parameters())

    def total():
        v = fast(model, x, y, u)
        if outer == "loss_squared":
            return v ** 2
        if outer == "plus_eager_term":          # the captured part silently constant before
            return v + F.cross_entropy(model(x), y)
        return v

    with pytest.raises(cf.CaptureError, match="first-order gradients only.*create_graph=True"):
        torch.autograd.grad(total(), params, create_graph=True)
    g = torch.autograd.grad(total(), params)
    twin = copy.deepcopy(model)
    v = derivative_loss(twin, x, y, u)
    ref = {"loss": v, "loss_squared": v ** 2, "plus_eager_term": v + F.cross_entropy(twin(x), y)}[outer]
    for a, b in zip(g, torch.autograd.grad(ref, list(twin.parameters()))):
        assert _max_rel(a, b) <= TOL


def test_backward_twice_with_retain_graph_as_in_eager():
    """loss.backward(retain_graph=True) then another backward accumulates twice, as eager autograd
    does (it raised an AttributeError: the gradients were dropped after the first backward), also
    when the gradients were zeroed in place in between; a second backward without retain_graph
    gets autograd's own error."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y, u = torch.randn(6, 3, dtype=D64), torch.randint(0, 2, (6,)), torch.randn(6, 3, dtype=D64)
    fast = cf.compile(derivative_loss, backend="eager")
    twin = copy.deepcopy(model)
    ref = torch.autograd.grad(derivative_loss(twin, x, y, u), list(twin.parameters()))
    loss = fast(model, x, y, u)
    loss.backward(retain_graph=True)
    model.zero_grad(set_to_none=False)     # in place: must not reach what the loss kept
    loss.backward(retain_graph=True)
    loss.backward()
    for p, g in zip(model.parameters(), ref):
        assert _max_rel(p.grad, 2 * g) <= TOL
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


class _NoisyInput(nn.Module):
    """Input noise drawn from the module's own generator (an attribute, not a buffer)."""

    def __init__(self, seed):
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x):
        return x + 0.1 * torch.randn(x.shape, generator=self.gen, dtype=x.dtype)


@pytest.mark.parametrize("where", ["argument", "module_attribute", "closure"])
def test_draws_from_a_users_generator_as_eager(where):
    """fork_rng guards only the default generators: the trace advanced a generator of the user's by
    one draw, so every replay drew eager's next noise (captured losses were eager's 2nd, 3rd, ...
    ones). Its state is now kept across the trace, wherever the function holds it."""
    torch.manual_seed(11)
    body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(6, 3, dtype=D64), torch.randint(0, 2, (6,))

    def setup():
        gen = torch.Generator().manual_seed(4)
        if where == "argument":
            def fn(m, x, y, g):
                return F.cross_entropy(m(x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype)), y)
            return fn, (body, x, y, gen)
        if where == "module_attribute":
            model = nn.Sequential(_NoisyInput(4), body)
            return (lambda m, x, y: F.cross_entropy(m(x), y)), (model, x, y)

        def fn(m, x, y):
            return F.cross_entropy(m(x + 0.1 * torch.randn(x.shape, generator=gen, dtype=x.dtype)), y)
        return fn, (body, x, y)

    fn, args = setup()
    fast = cf.compile(fn, backend="eager")
    got = [fast(*args) for _ in range(3)]
    fn, args = setup()
    want = [fn(*args) for _ in range(3)]
    assert fast.captures == 1
    for a, b in zip(got, want):
        assert _max_rel(a.detach(), b.detach()) <= TOL


def test_refuses_a_generator_it_cannot_keep():
    """A generator hidden where the capture does not look (an attribute of a plain object) would
    be advanced by the trace: refused, naming the way out."""
    class Holder:
        def __init__(self):
            self.gen = torch.Generator().manual_seed(0)

    def fn(m, x, y, holder):
        return F.cross_entropy(m(x + torch.randn(x.shape, generator=holder.gen, dtype=x.dtype)), y)

    model = nn.Linear(3, 2).double()
    with pytest.raises(cf.CaptureError, match="draws random numbers from a torch.Generator.*Pass the generator"):
        cf.compile(fn, backend="eager")(model, torch.randn(4, 3, dtype=D64), torch.tensor([0, 1, 0, 1]), Holder())


def test_cache_evicts_the_least_recent_and_warnings_say_what_changed():
    """cache_size graphs are kept (the least recently used one dropped, captured again when it comes
    back); the eviction warning names what the latest new configuration changed, and a Python
    number that takes a new value at every call (three captures in a row) is named too, with the
    way out (a tensor argument)."""
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=D64), torch.tensor([0, 1, 0, 1])
    fast = cf.compile(lambda m, x, y, w: w * F.cross_entropy(m(x), y), backend="eager", cache_size=2)
    for b in (4, 3, 4):
        fast(model, x[:b], y[:b], 1.0)
    with pytest.warns(RuntimeWarning, match=r"dropped .* argument 2 \(a tensor\): its shape"):
        fast(model, x[:2], y[:2], 1.0)      # the 3-row graph, the least recent, goes
    fast(model, x, y, 1.0)
    assert fast.captures == 3 and len(fast.graphs()) == 2
    fast(model, x[:3], y[:3], 1.0)
    assert fast.captures == 4
    fast(model, x, y, 0.1)                  # a new shape and a new value: not a value streak yet
    with pytest.warns(RuntimeWarning, match=r"three captures in a row.*argument 4: its value \(0\.3 then 0\.4\)"
                                            r".*as a tensor"):
        for w in (0.2, 0.3, 0.4):
            fast(model, x, y, w)
    for w in (0.1, 0.2, 0.3):               # the value was right every time
        assert torch.equal(fast(model, x, y, w), w * F.cross_entropy(model(x), y))


def test_process_settings_the_graph_fixes_are_guarded():
    """A function that makes a tensor without a dtype (``torch.ones(n)``): its graph records no
    dtype, so after torch.set_default_dtype a replay computed in the new one (a float32 loss came
    back float64). The default dtype, deterministic algorithms, oneDNN's switch and the float32
    matmul precision are part of the guard: a change captures again and matches eager."""
    torch.manual_seed(9)

    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) + torch.ones(2).to(x.dtype) / 3

    model, x, y = Offset(), torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    fast = cf.compile(lambda m, x, y: F.cross_entropy(m(x), y), backend="eager")
    fast(model, x, y)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got, want = fast(model, x, y), F.cross_entropy(model(x), y)
    finally:
        torch.set_default_dtype(old)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert fast.captures == 2
    for switch in (lambda on: torch.use_deterministic_algorithms(on),
                   lambda on: torch.set_float32_matmul_precision("high" if on else "highest")):
        switch(True)
        try:
            fast(model, x, y)
        finally:
            switch(False)
    # the flags() context manager: PyTorch's own test helpers (OpInfo) disable setting the flag
    with torch.backends.mkldnn.flags(enabled=False):
        fast(model, x, y)
    assert fast.captures == 5
    fast(model, x, y)
    assert fast.captures == 5


# -- inside a user's torch.compile ----------------------------------------------------------------

def _graph_breaks():
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("use", ["CRRLoss", "crr_penalty"])
def test_user_torch_compile_fullgraph_no_graph_breaks(use):
    """A training step calling CRRLoss / crr_penalty compiles with fullgraph=True (dynamo sees one
    custom op, curvrate::captured_loss) and gives the eager result: fixed explicit directions and
    the whole batch, so that no random number is drawn inside the compiled step."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 3, dtype=D64), torch.randint(0, 3, (6,))
    kw = dict(orders=(1, 3), scale=0.3)
    crit = cf.CRRLoss(**kw)

    def step(m, x, y, u):
        if use == "CRRLoss":
            return crit(m, x, y)
        return F.cross_entropy(m(x), y) + cf.crr_penalty(m, x, y, directions=u, **kw)

    crit.directions = torch.randn(6, 3, dtype=D64)
    u = crit.directions
    breaks = _graph_breaks()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        a = compiled(model, x, y, u)
        ga = torch.autograd.grad(a, list(model.parameters()))
        b = step(twin, x, y, u)
        gb = torch.autograd.grad(b, list(twin.parameters()))
        assert _max_rel(a.detach(), b.detach()) <= TOL
        for p, q in zip(ga, gb):
            assert _max_rel(p, q) <= TOL
        with torch.no_grad():
            for p, q, g in zip(model.parameters(), twin.parameters(), ga):
                p.sub_(0.1 * g)
                q.sub_(0.1 * g)
    assert _graph_breaks() == breaks


def test_user_torch_compile_warns_of_zero_gradients_for_unreached_parameters():
    """Inside a user's torch.compile the captured op's gradient outputs are fixed when the step is
    traced, before the capture can tell which parameters the loss reaches: an unreached one gets a
    zero gradient, not None. That difference from eager is announced, once, not left silent."""
    torch._dynamo.reset()
    torch.manual_seed(13)
    model = _WithSpare().double()
    x, y = torch.randn(6, 3, dtype=D64), torch.randint(0, 2, (6,))
    u = torch.randn(6, 3, dtype=D64)

    def step(m, x, y, u):
        return cf.crr_penalty(m, x, y, directions=u, orders=(1, 2))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="do not reach the loss"):
        compiled(model, x, y, u).backward()
    assert float(model.spare.weight.grad.abs().max()) == 0.0


def test_user_torch_compile_does_not_keep_models_alive():
    """The custom op's handle table lives for the process; it holds the module arguments weakly,
    so a sweep that builds a model per run under torch.compile frees each one (before: every model
    stayed alive in the table, parameters and all). A later model at a reused address gets a
    handle of its own and the eager values."""
    import gc
    import weakref

    def run(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        x, y = torch.randn(5, 3, dtype=D64), torch.randint(0, 2, (5,))
        u = torch.randn(5, 3, dtype=D64)
        step = torch.compile(lambda m, x, y, u: cf.crr_penalty(m, x, y, directions=u, orders=(1, 2)),
                             fullgraph=True, backend="aot_eager")
        a = step(m, x, y, u)
        b = cf.crr_penalty(m, x, y, directions=u, orders=(1, 2))
        assert _max_rel(a.detach(), b.detach()) <= TOL
        return weakref.ref(m)

    for seed in range(3):
        torch._dynamo.reset()
        ref = run(seed)
        torch._dynamo.reset()
        gc.collect()
        assert ref() is None, seed


@pytest.mark.slow
def test_inductor_program_matches_eager_with_dropout():
    """compile=True: the graph compiled by inductor (fallback_random: the eager dropout masks)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 2)).double().train()
    crit_a, crit_b = _crr_pair(True, orders=(2, 3), directions="per_order", subset=6, scale=3e-2)
    batches = [(torch.randn(10, 2, dtype=D64), torch.randint(0, 2, (10,))) for _ in range(3)]
    _train_both(crit_a, crit_b, model, batches)


@pytest.mark.slow
def test_inductor_graph_per_memory_layout():
    """A graph compiled by inductor reads its inputs with the strides it was compiled for: the
    strides are part of the guard, so a transposed, sliced or expanded tensor (and a channels-last
    model and input) gets a capture of its own and the eager values. Before: a transposed ``x``
    of the same shape raised inductor's "expected ... stride 1==3" from inside the graph."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    y = torch.randint(0, 2, (5,))
    fast = cf.compile(derivative_loss)
    x, u = torch.randn(5, 3, dtype=D64), torch.randn(5, 3, dtype=D64)
    layouts = [(x, u),
               (torch.randn(3, 5, dtype=D64).t(), u),                      # column-major x
               (torch.randn(10, 6, dtype=D64)[::2, ::2], u),               # a strided slice
               (x, torch.randn(1, 3, dtype=D64).expand(5, 3))]             # one direction, stride 0
    for i, (xi, ui) in enumerate(layouts):
        for _ in range(2):
            assert _max_rel(fast(model, xi, y, ui).detach(), derivative_loss(model, xi, y, ui).detach()) <= TOL
        assert fast.captures == i + 1

    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    xc, uc = torch.randn(5, 2, 6, 6, dtype=D64), torch.randn(5, 2, 6, 6, dtype=D64)
    fast_cnn = cf.compile(derivative_loss)
    ref = derivative_loss(cnn, xc, y, uc).detach()
    assert _max_rel(fast_cnn(cnn, xc, y, uc).detach(), ref) <= TOL
    cnn = cnn.to(memory_format=torch.channels_last)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (xc, uc)]
    assert _max_rel(fast_cnn(cnn, *cl[:1], y, cl[1]).detach(), ref) <= TOL
    assert fast_cnn.captures == 2


def test_cpu_graph_falls_back_to_the_python_wrapper_only_when_ours_to_choose(monkeypatch):
    """On CPU inductor builds the graph with its C++ wrapper; where that build fails the Python
    wrapper is used (same values as the eager engine), unless the caller asked for the C++ one,
    whose failure then surfaces."""
    import torch._inductor.compile_fx as cfx
    real, calls = cfx.compile_fx, []

    def no_cpp_wrapper(gm, example, config_patches=None, **kw):
        calls.append(bool((config_patches or {}).get("cpp_wrapper")))
        if calls[-1]:
            raise RuntimeError("C++ wrapper build failed (simulated)")
        return real(gm, example, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", no_cpp_wrapper)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y, u = torch.randn(5, 3, dtype=D64), torch.randint(0, 2, (5,)), torch.randn(5, 3, dtype=D64)
    fast = cf.compile(derivative_loss)
    a = fast(model, x, y, u)
    # the C++ try, then the Python build (compile_fx re-enters itself for the inner graph)
    assert calls[0] and len(calls) >= 2 and not any(calls[1:])
    assert _max_rel(a.detach(), derivative_loss(model, x, y, u).detach()) <= TOL
    with pytest.raises(RuntimeError, match="simulated"):
        cf.compile(derivative_loss, options={"cpp_wrapper": True})(model, x, y, u)


def test_triton_kernels_stay_in_the_graph_as_library_ops():
    """With the Triton backend (the interpreter here, CUDA on a GPU) the fused kernels are recorded
    as their torch.library ops, forward and backward, and the replay equals the eager engine."""
    pytest.importorskip("triton")
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y, u = torch.randn(5, 3), torch.randint(0, 3, (5,)), torch.randn(5, 3)
    with cf.engine_settings(backend="triton"):
        fast = cf.compile(derivative_loss, backend="eager")
        a = fast(model, x, y, u)
        ga = torch.autograd.grad(a, list(model.parameters()))
        b = derivative_loss(model, x, y, u)
        gb = torch.autograd.grad(b, list(model.parameters()))
    assert _max_rel(a.detach(), b.detach()) <= 1e-6
    for p, q in zip(ga, gb):
        assert _max_rel(p, q) <= 1e-6
    ops = {str(n.target) for n in fast.graphs()[0].graph.nodes if n.op == "call_function"}
    assert {"curvrate_fast_triton.activation_jet_fwd.default",
            "curvrate_fast_triton.activation_jet_bwd.default"} <= ops, ops


def test_user_torch_compile_with_a_generator_names_it():
    """A CRRLoss with its own torch.Generator inside torch.compile: dynamo cannot trace the
    generator. fullgraph=True fails with an error that says so (before: dynamo's 'Failed to convert
    args/kwargs to proxy'); without fullgraph the step falls back to eager for the draws and gives
    the eager values."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(10, 2, dtype=D64), torch.randint(0, 2, (10,))

    def crit():
        return cf.CRRLoss(orders=(2, 3), directions="per_order", subset=6,
                          generator=torch.Generator().manual_seed(1))
    full = crit()
    with pytest.raises(Exception, match="dynamo cannot trace a torch.Generator"):
        torch.compile(lambda x, y: full(model, x, y), fullgraph=True, backend="eager")(x, y)
    a, b = crit(), crit()
    step = torch.compile(lambda x, y: a(model, x, y), backend="eager")
    for _ in range(2):
        assert _max_rel(step(x, y).detach(), b(model, x, y).detach()) <= TOL


# -- rules that check the values they are given ---------------------------------------------------

_G = torch.Generator().manual_seed(11)
_T = torch.rand(4, 6, generator=_G, dtype=D64)            # a BCE target in [0, 1]
_Y = torch.tensor([0, 2, -100, 1])                        # nll labels, one ignored
_V = torch.rand(4, 6, generator=_G, dtype=D64) + 0.1      # a Gaussian NLL variance > 0
VALUE_CHECKING = {
    # softplus's linear regime (β·x > threshold) is chosen per element: taken everywhere in a graph
    "softplus": lambda z: F.softplus(3 * z, beta=2.0, threshold=1.0),
    "binary_cross_entropy": lambda z: F.binary_cross_entropy(torch.sigmoid(z), _T, reduction="none"),
    "nll_loss with ignore_index": lambda z: F.nll_loss(F.log_softmax(z, 1), _Y, reduction="none"),
    "gaussian_nll_loss": lambda z: F.gaussian_nll_loss(z, _T, _V, reduction="none"),
    "normalize": lambda z: F.normalize(z, dim=1),
    "cosine_similarity": lambda z: F.cosine_similarity(z, z.flip(1) + 1, dim=1),
    "pairwise_distance": lambda z: F.pairwise_distance(z, 2 * z + 1),
    "dist": lambda z: torch.dist(z, z.square(), p=3),
}


@pytest.mark.parametrize("name", list(VALUE_CHECKING))
def test_value_checking_rules_capture(name):
    """Rules that read their values (a domain, a zero, which elements are linear) used to refuse
    capture ('a tensor value was read'); their checks are graph assertions now and their branches
    the general form: the captured loss equals the eager one, and its gradients too."""
    f = VALUE_CHECKING[name]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=D64)
    u = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=D64)
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=D64, requires_grad=True)

    def loss(w, x, u):
        return cf.jet(lambda z: f(z @ w), x, u, 3).square().sum()
    fast = cf.CompiledLoss(loss, backend="eager")
    got, want = fast(w, x, u), loss(w, x, u)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    g1, g2 = (torch.autograd.grad(v, w)[0] for v in (got, want))
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)


def test_a_captured_value_check_raises_on_replay():
    """The check of binary_cross_entropy's domain is part of the graph (inductor too): a replay with
    an input outside [0, 1] raises with the rule's message, as the eager call does."""
    def loss(p, u):
        return cf.jet(lambda z: F.binary_cross_entropy(z, _T, reduction="none"), p, u, 2).square().sum()
    u = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=D64)
    good = torch.rand(4, 6, generator=torch.Generator().manual_seed(4), dtype=D64) * 0.8 + 0.1
    bad = good.clone()
    bad[1, 2] = 1.5
    fast = cf.CompiledLoss(loss, backend="inductor")
    assert torch.allclose(fast(good, u), loss(good, u), rtol=1e-10)
    with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
        loss(bad, u)
    with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
        fast(bad, u)


def test_reseeding_inside_a_captured_function_is_refused():
    """torch.manual_seed inside the function runs once, while it is recorded: eager calls drew the
    same numbers every time, replays the running stream's. Refused with a CaptureError naming it
    (and the global functions are restored afterwards)."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=D64)
    u = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=D64)

    def loss(x, u):
        torch.manual_seed(42)
        return cf.jet(lambda z: F.dropout(z, 0.5, training=True), x, u, 2).square().sum()
    with pytest.raises(cf.CaptureError, match=r"calls torch\.manual_seed"):
        cf.CompiledLoss(loss, backend="eager")(x, u)
    assert torch.manual_seed.__module__ == "torch.random"
    torch.manual_seed(0)


def test_captured_crr_keeps_the_loss_dtype_of_a_model_with_lower_precision_inside():
    """float64 inputs through a model that computes in float32 (Mamba's and Llama's casts): the
    captured program's scale input (in x's dtype) promoted the penalty to float64, where eager's
    Python-float scale keeps float32. Now both return float32, bit-equal."""
    class Float32Inside(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x.float())
    model = Float32Inside()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g, dtype=D64), torch.randint(0, 3, (6,), generator=g)
    out = []
    for compile_arg in (False, "eager"):
        torch.manual_seed(2)
        out.append(cf.CRRLoss(orders=(1, 3), scale=3e-3, compile=compile_arg)(model, x, y))
    assert out[0].dtype == out[1].dtype == torch.float32
    assert torch.equal(out[0], out[1])
