"""Captured training steps (CompiledLoss.train_step, CRRLoss.train_step; curvrate_fast.optim_update):
loss, gradients and the optimizer's update as one graph give what ``zero_grad(); loss.backward();
optimizer.step()`` gives with PyTorch's own optimizer (the oracle: float64, ≤ 1e-12, over several
steps) for Adam, AdamW (AMSGrad, weight decay, maximize) and SGD (momentum, Nesterov, dampening,
weight decay), with an LR scheduler, several param groups, tied weights, a parameter the loss
does not reach and one the optimizer does not hold; the optimizer's state is PyTorch's (its
state_dict round-trips into a plain optimizer); what cannot be captured is refused by name.

The graphs are replayed uncompiled (backend="eager") except in one inductor test."""
import copy

import pytest
import torch
import torch.nn as nn
from _steps import adam, one_rank_process_group, torch_and_captured, torch_steps
from models import CountingIdentity

import curvrate_fast as cf
from curvrate_fast import optim_update

D64 = torch.float64
TOL = 1e-12


def _moons_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).to(D64)


def _data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, dtype=D64, generator=g), torch.randint(0, 2, (n,), generator=g)


def derivative_loss(model, x, y, u):
    return cf.loss_directional_derivatives(model, x, y, u, 3).abs().mean() + \
        nn.functional.cross_entropy(model(x), y)


def _close(a, b, what):
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
    assert err <= TOL, f"{what}: relative error {err:.2e}"


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_l2_maximize": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, maximize=True, eps=1e-6),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, weight_decay=0.05,
                                                  betas=(0.8, 0.95)),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd_dampening": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.5, dampening=0.3, maximize=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_loss_train_step_equals_torch_optimizer(name):
    model = _moons_model()
    runs = []
    for mode in ("torch", "captured"):
        m = copy.deepcopy(model)
        opt = OPTIMIZERS[name](m.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)   # lr changes: read each call
        fast = cf.compile(derivative_loss, backend="eager")
        losses = []
        for step in range(5):
            x, y = _data(seed=step)                      # a fresh batch and direction every step
            u = torch.randn(x.shape, dtype=D64, generator=torch.Generator().manual_seed(10 + step))
            if mode == "torch":
                opt.zero_grad()
                loss = derivative_loss(m, x, y, u)
                loss.backward()
                opt.step()
            else:
                loss = fast.train_step(opt, m, x, y, u)
                assert not loss.requires_grad
            sched.step()
            losses.append(loss.detach())
        if mode == "captured":
            assert fast.captures == 1      # the first step is the optimizer's own, then one graph
        runs.append((torch.stack(losses), [p.detach().clone() for p in m.parameters()],
                     [p.grad.clone() for p in m.parameters()], opt.state_dict()))
    (l0, p0, g0, s0), (l1, p1, g1, s1) = runs
    _close(l1, l0, "losses")
    for a, b in zip(p1, p0):
        _close(a, b, "parameters")
    for a, b in zip(g1, g0):
        _close(a, b, "gradients")
    for k, st in s0["state"].items():
        for n, v in st.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == s1["state"][k][n].dtype and v.shape == s1["state"][k][n].shape
                _close(s1["state"][k][n].double(), v.double(), f"state {n}")


def test_state_round_trips_into_a_plain_optimizer():
    """After captured steps the optimizer's state is PyTorch's: a fresh Adam loaded from its
    state_dict continues exactly as the captured steps do."""
    model = _moons_model()
    x, y = _data()
    u = torch.randn_like(x)
    fast = cf.compile(derivative_loss, backend="eager")
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):
        fast.train_step(opt, m, x, y, u)
    m2 = copy.deepcopy(m)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))   # (load_state_dict keeps aliases)
    fast.train_step(opt, m, x, y, u)
    opt2.zero_grad()
    derivative_loss(m2, x, y, u).backward()
    opt2.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        _close(a.detach(), b.detach(), "parameters")


def test_param_groups_tied_unused_and_unheld_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(2, 8, bias=False)
            self.mid = nn.Linear(8, 8)
            self.unused = nn.Linear(3, 3)          # the loss never reaches it
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.tanh(self.mid(torch.tanh(self.emb(x))))
            # the input layer's weight used a second time (tied): its gradients are summed
            return self.out(h) + (h @ self.emb.weight).sum(-1, keepdim=True)

    torch.manual_seed(3)
    model = Tied().to(D64)
    x, y = _data()
    u = torch.randn_like(x)
    runs = []
    for mode in ("torch", "captured"):
        m = copy.deepcopy(model)
        # and a parameter of no module argument (another model's) with a stale gradient
        other = nn.Parameter(torch.ones(3, dtype=D64))
        other.grad = torch.ones_like(other)
        opt = torch.optim.AdamW([{"params": [m.emb.weight, *m.mid.parameters(), *m.unused.parameters()],
                                  "lr": 1e-2},
                                 {"params": [m.out.weight, other], "lr": 3e-3, "weight_decay": 0.0}])
        # m.out.bias requires grad but no group holds it: its gradients accumulate (zero_grad does
        # not reach it), no update. Stale gradients from before: m.unused's (held, the loss does
        # not reach it) is cleared by zero_grad, so never applied (the captured first step, run
        # eagerly, applied it), m.out.bias's is accumulated onto
        m.unused.weight.grad = torch.ones_like(m.unused.weight)
        m.out.bias.grad = torch.ones_like(m.out.bias)
        fast = cf.compile(derivative_loss, backend="eager")
        for _ in range(3):
            if mode == "torch":
                opt.zero_grad()
                derivative_loss(m, x, y, u).backward()
                opt.step()
            else:
                fast.train_step(opt, m, x, y, u)
        assert torch.equal(other, torch.ones(3, dtype=D64)) and other.grad is None, mode
        runs.append(m)
    m0, m1 = runs
    for (n, a), b in zip(m1.named_parameters(), m0.parameters()):
        _close(a.detach(), b.detach(), n)
        if b.grad is None:
            assert a.grad is None, n
        else:
            _close(a.grad, b.grad, n + ".grad")
    assert m1.unused.weight.grad is None
    assert torch.equal(m1.unused.weight, model.unused.weight)     # never updated (no gradient)
    assert torch.equal(m1.out.bias, model.out.bias)               # no group holds it


def _crr_steps(model, crit, make_opt, x, y, *, steps, seed, via_train_step):
    """``steps`` CRR training steps on a copy of ``model`` from the RNG state ``seed``: the three
    calls (zero_grad, backward, step) or ``crit.train_step``; returns (the model, the losses)."""
    m = copy.deepcopy(model)
    opt = make_opt(m.parameters())
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        if via_train_step:
            losses.append(crit.train_step(m, x, y, opt))
        else:
            opt.zero_grad()
            loss = crit(m, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert crit.last_task_loss is not None
    return m, torch.stack(losses)


def test_crrloss_train_step_equals_eager_step_and_counts_steps():
    model = _moons_model()
    x, y = _data(n=48)
    runs = []
    for mode in ("eager", "captured"):
        crit = cf.CRRLoss(orders=(2, 3), directions="per_order", subset=16, scale=0.1, every=2,
                          compile="eager" if mode == "captured" else False)
        m, losses = _crr_steps(model, crit, lambda ps: torch.optim.Adam(ps, lr=1e-2), x, y, steps=5, seed=7,
                               via_train_step=mode == "captured")
        assert crit.step == 5
        runs.append((losses, [p.detach().clone() for p in m.parameters()]))
    _close(runs[1][0], runs[0][0], "losses")
    for a, b in zip(runs[1][1], runs[0][1]):
        _close(a, b, "parameters")


def test_inductor_train_step_matches_torch_optimizer_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = torch.randn(32, 2), torch.randint(0, 2, (32,))
    u = torch.randn_like(x)
    eager, captured = torch_and_captured(derivative_loss, model, (x, y, u), adam, backend="inductor")
    for a, b in zip(captured.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_what_cannot_be_captured_is_refused():
    model = _moons_model()
    x, y = _data()
    u = torch.randn_like(x)
    fast = cf.compile(derivative_loss, backend="eager")
    with pytest.raises(cf.CaptureError, match="RMSprop"):
        fast.train_step(torch.optim.RMSprop(model.parameters()), model, x, y, u)

    class MyAdam(torch.optim.Adam):
        pass
    with pytest.raises(cf.CaptureError, match="MyAdam"):
        fast.train_step(MyAdam(model.parameters()), model, x, y, u)
    with pytest.raises(cf.CaptureError, match="differentiable"):
        fast.train_step(torch.optim.Adam(model.parameters(), differentiable=True), model, x, y, u)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["my_option"] = 1
    with pytest.raises(cf.CaptureError, match="my_option"):
        fast.train_step(opt, model, x, y, u)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_post_hook(lambda o, a, k: None)
    with pytest.raises(cf.CaptureError, match="hook"):
        fast.train_step(opt, model, x, y, u)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step = lambda closure=None: None
    with pytest.raises(cf.CaptureError, match="replaced"):
        fast.train_step(opt, model, x, y, u)
    hooked = copy.deepcopy(model)
    hooked[0].weight.register_hook(lambda g: g * 2)
    with pytest.raises(cf.CaptureError, match="gradient hooks"):
        fast.train_step(torch.optim.SGD(hooked.parameters(), lr=0.1), hooked, x, y, u)
    x0 = x.clone().requires_grad_(True)     # a non-leaf input: its gradient would flow on to x0
    with pytest.raises(cf.CaptureError, match="not a leaf"):
        fast.train_step(torch.optim.SGD(model.parameters(), lr=0.1), model, x0 * 2, y, u)
    other = nn.Linear(2, 2).to(D64)
    with pytest.raises(cf.CaptureError, match="holds none"):
        fast.train_step(torch.optim.SGD(other.parameters(), lr=0.1), model, x, y, u)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fast.train_step("adam", model, x, y, u)
    with torch.no_grad(), pytest.raises(RuntimeError, match="grad mode is off"):
        fast.train_step(torch.optim.SGD(model.parameters(), lr=0.1), model, x, y, u)


def test_hyperparameter_change_captures_again():
    model = _moons_model()
    x, y = _data()
    u = torch.randn_like(x)
    fast = cf.compile(derivative_loss, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        fast.train_step(opt, model, x, y, u)
    assert fast.captures == 1
    opt.param_groups[0]["lr"] = 0.05           # an input of the graph: no new capture
    fast.train_step(opt, model, x, y, u)
    assert fast.captures == 1
    opt.param_groups[0]["momentum"] = 0.5      # a constant of the graph: captured again
    fast.train_step(opt, model, x, y, u)
    assert fast.captures == 2


def test_rules_table_covers_the_documented_optimizers():
    assert set(optim_update.RULES) == {torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD}


def test_crrloss_train_step_without_compile_is_the_three_calls():
    model = _moons_model()
    x, y = _data(n=48)
    runs = []
    for via_train_step in (False, True):
        crit = cf.CRRLoss(orders=(1, 2), directions="fixed", subset=16, scale=0.1)
        m, _ = _crr_steps(model, crit, lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), x, y, steps=3,
                          seed=2, via_train_step=via_train_step)
        runs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_ddp_model_is_refused():
    """DDP synchronizes gradients in backward hooks, which a captured step does not run."""
    with one_rank_process_group():
        model = nn.parallel.DistributedDataParallel(_moons_model())
        x, y = _data()
        u = torch.randn_like(x)
        fast = cf.compile(derivative_loss, backend="eager")
        with pytest.raises(cf.CaptureError, match="DistributedDataParallel"):
            fast.train_step(torch.optim.SGD(model.parameters(), lr=0.1), model, x, y, u)


def test_dropout_masks_and_subsets_match_the_eager_engine():
    """In train mode with dropout, a fresh subset and fresh directions every step, the captured
    training steps equal the eager engine's steps (the same random draws, in the same order)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 2)).to(D64)
    x, y = _data()
    runs = []
    for mode in ("eager", "train_step"):
        crit = cf.CRRLoss(orders=(1, 3), directions="fixed", subset=16, scale=0.1,
                          compile="eager" if mode == "train_step" else False)
        m, _ = _crr_steps(model, crit, lambda ps: torch.optim.AdamW(ps, lr=1e-2), x, y, steps=4, seed=5,
                          via_train_step=mode == "train_step")
        runs.append(m)
    for a, b in zip(runs[1].parameters(), runs[0].parameters()):
        _close(a.detach(), b.detach(), "parameters")


def test_autocast_leaves_the_update_alone():
    """Under autocast the loss is captured with its casts; the optimizer's update is not cast."""
    model = _moons_model().float()
    x, y = _data()
    x = x.float()
    u = torch.randn_like(x)
    fast = cf.compile(derivative_loss, backend="eager")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            fast.train_step(opt, model, x, y, u)
    graph = fast.graphs()[-1]
    casts = [n for n in graph.graph.nodes if n.op == "call_function"
             and n.target is torch.ops.aten._to_copy.default
             and n.kwargs.get("dtype") == torch.bfloat16]
    assert casts                                     # the loss ran in bfloat16 GEMMs
    update = [n for n in graph.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.lerp.Scalar, torch.ops.aten.addcmul.default, torch.ops.aten.sqrt.default)]
    assert update and all(n.meta["val"].dtype == torch.float32 for n in update)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items() if k != "step")


ADAM_OPTIONS = [dict(), dict(weight_decay=0.1), dict(amsgrad=True), dict(maximize=True, eps=1e-4),
                dict(betas=(0.5, 0.9), weight_decay=0.05, amsgrad=True, maximize=True)]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_adam_rule_equals_torch_step(cls, options):
    _rule_equals_torch_step(cls, options)


@pytest.mark.parametrize("options", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                     dict(momentum=0.5, dampening=0.5, weight_decay=0.1),
                                     dict(momentum=0.9, maximize=True, weight_decay=0.01)],
                         ids=lambda o: ",".join(o) or "defaults")
def test_sgd_rule_equals_torch_step(options):
    _rule_equals_torch_step(torch.optim.SGD, options)


def _rule_equals_torch_step(cls, options):
    """The update rule alone, applied functionally, against the optimizer's own step() on the same
    gradients (float64, 6 steps, the learning rate changed halfway)."""
    g = torch.Generator().manual_seed(0)
    p_torch = torch.randn(5, 3, dtype=D64, generator=g).requires_grad_(True)
    p_rule = p_torch.detach().clone()
    opt = cls([p_torch], lr=0.1, **options)
    rule = optim_update.rule_for(opt)
    states = None
    for step in range(6):
        grad = torch.randn(5, 3, dtype=D64, generator=g)
        if step == 3:
            opt.param_groups[0]["lr"] = 0.03
        p_torch.grad = grad.clone()
        opt.step()
        group = opt.param_groups[0]
        names = rule.states(group)
        if states is None:     # the first step is PyTorch's own: it makes the state
            p_rule = p_torch.detach().clone()
            states = [opt.state[p_torch][n].clone() for n in names]
            continue
        p_rule, states = rule.update(p_rule, grad, states, group, optim_update.lr_tensor(group))
        _close(p_rule, p_torch.detach(), f"{cls.__name__} parameter, step {step}")
        for n, s in zip(names, states):
            _close(s.double(), opt.state[p_torch][n].double(), f"{cls.__name__} {n}, step {step}")


def test_keyword_arguments_and_two_models():
    """Tensors passed by keyword and a second module argument: both feed the captured step."""
    torch.manual_seed(1)
    enc, head = nn.Sequential(nn.Linear(2, 8), nn.Tanh()).to(D64), nn.Linear(8, 2).to(D64)
    x, y = _data()
    u = torch.randn_like(x)

    def loss(enc, head, x, y, *, u):
        return derivative_loss(lambda z: head(enc(z)), x, y, u)

    runs = []
    for mode in ("torch", "captured"):
        e, h = copy.deepcopy(enc), copy.deepcopy(head)
        opt = torch.optim.Adam([*e.parameters(), *h.parameters()], lr=1e-2)
        fast = cf.compile(loss, backend="eager")
        for _ in range(3):
            if mode == "torch":
                opt.zero_grad()
                loss(e, h, x, y, u=u).backward()
                opt.step()
            else:
                fast.train_step(opt, e, h, x, y, u=u)
        if mode == "captured":
            assert fast.captures == 1
        runs.append([p.detach().clone() for p in [*e.parameters(), *h.parameters()]])
    for a, b in zip(*reversed(runs)):
        _close(a, b, "parameters")


def _only_entry(fast):
    (entry,) = fast._cache.values()
    return entry


def test_update_written_into_the_parameters_and_the_state():
    """The step's graph writes the update into the parameters and the optimizer's state in place
    (no output buffers, no copy after the call): the same tensor objects, PyTorch's values."""
    model = _moons_model()
    x, y = _data()
    u = torch.randn_like(x)
    m_torch, m = copy.deepcopy(model), copy.deepcopy(model)
    opt_torch, opt = torch.optim.Adam(m_torch.parameters(), lr=1e-2), torch.optim.Adam(m.parameters(), lr=1e-2)
    fast = cf.compile(derivative_loss, backend="eager")
    fast.train_step(opt, m, x, y, u)             # the optimizer's own first step makes its state
    held = [(p, dict(opt.state[p])) for p in m.parameters()]
    for _ in range(3):
        fast.train_step(opt, m, x, y, u)
    assert _only_entry(fast).writes
    for p, st in held:
        assert all(opt.state[p][n] is t for n, t in st.items())
    torch_steps(derivative_loss, m_torch, (x, y, u), opt_torch, 4)
    for a, b in zip(m.parameters(), m_torch.parameters()):
        _close(a.detach(), b.detach(), "parameters")


def test_update_copied_where_parameters_share_memory():
    """A parameter registered under two names (tied weights) is two graph inputs sharing memory:
    the update is returned and copied after the call, with PyTorch's values."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 2)).to(D64)
    model[4].weight = model[2].weight
    x, y = _data()
    u = torch.randn_like(x)
    m_torch, m = copy.deepcopy(model), copy.deepcopy(model)
    assert m[4].weight is m[2].weight
    opt_torch, opt = torch.optim.SGD(m_torch.parameters(), lr=1e-2, momentum=0.9), \
        torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
    fast = cf.compile(derivative_loss, backend="eager")
    for _ in range(3):
        fast.train_step(opt, m, x, y, u)
    torch_steps(derivative_loss, m_torch, (x, y, u), opt_torch, 3)
    assert not _only_entry(fast).writes
    for a, b in zip(m.parameters(), m_torch.parameters()):
        _close(a.detach(), b.detach(), "parameters")


def test_no_update_written_into_a_cuda_graph():
    """Where inductor is asked for CUDA graphs the update is returned and copied after the call:
    inductor does not replay a graph that writes into its (non-static) inputs as a CUDA graph."""
    assert cf.compile(derivative_loss, options={"triton.cudagraphs": True})._cudagraphs()
    assert not cf.compile(derivative_loss)._cudagraphs()
    assert cf.compile(derivative_loss, backend="cudagraphs")._cudagraphs()
    assert not cf.compile(derivative_loss, backend="eager")._cudagraphs()


def test_update_written_beside_a_buffer_the_forward_updates():
    """A forward that updates a buffer in place (a call counter, an EMA of its input) and a step
    that writes the update into the parameters: both writes happen once per step, as eagerly."""
    def loss(model, x, y):
        return nn.functional.cross_entropy(model(x), y)

    x, y = _data()
    m_torch = nn.Sequential(CountingIdentity(2), _moons_model())
    m = copy.deepcopy(m_torch)
    opt_torch, opt = torch.optim.Adam(m_torch.parameters(), lr=1e-2), torch.optim.Adam(m.parameters(), lr=1e-2)
    fast = cf.compile(loss, backend="eager")
    for _ in range(4):
        fast.train_step(opt, m, x, y)
    torch_steps(loss, m_torch, (x, y), opt_torch, 4)
    assert _only_entry(fast).writes
    assert float(m[0].calls) == float(m_torch[0].calls) == 4.0
    _close(m[0].ema, m_torch[0].ema, "buffer")
    for a, b in zip(m.parameters(), m_torch.parameters()):
        _close(a.detach(), b.detach(), "parameters")
