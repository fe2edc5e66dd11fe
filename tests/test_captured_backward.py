"""CompiledLoss.backward: the captured graph's gradients written into ``.grad`` without an
autograd pass give what ``fn(*args).backward()`` gives in eager PyTorch (the oracle: float64,
≤ 1e-12): fresh and accumulated gradients (added in place, as autograd does), tied weights, a
parameter the loss does not reach, a tensor argument requiring grad, parameter memory layouts;
where a backward pass has more to do (gradient hooks, a non-leaf tensor, DDP) it goes through
autograd with the same result; what autograd would refuse is refused."""
import pytest
import torch
import torch.nn as nn
from _steps import one_rank_process_group

import curvrate_fast as cf

D64 = torch.float64
TOL = 1e-12


def derivative_loss(model, x, y, u):
    return cf.loss_directional_derivatives(model, x, y, u, 3).abs().mean() + \
        nn.functional.cross_entropy(model(x), y)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).to(D64)


def _data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, dtype=D64, generator=g), torch.randint(0, 2, (n,), generator=g),
            torch.randn(n, 2, dtype=D64, generator=g))


def _close(a, b, what):
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
    assert err <= TOL, f"{what}: relative error {err:.2e}"


def _grads(m):
    return [None if p.grad is None else p.grad.detach().clone() for p in m.parameters()]


def _eager_grads(fn, m, *args):
    for p in m.parameters():
        p.grad = None
    loss = fn(m, *args)
    loss.backward()
    return loss.detach(), _grads(m)


def test_backward_equals_eager_backward_over_steps():
    m = _model()
    fast = cf.compile(derivative_loss, backend="eager")
    for step in range(3):
        x, y, u = _data(seed=step)
        ref_loss, ref = _eager_grads(derivative_loss, m, x, y, u)
        for p in m.parameters():
            p.grad = None
        loss = fast.backward(m, x, y, u)
        assert not loss.requires_grad
        _close(loss, ref_loss, "loss")
        for g, r in zip(_grads(m), ref):
            _close(g, r, "gradient")
        with torch.no_grad():                # a parameter update between steps: no stale weights
            for p in m.parameters():
                p.sub_(0.05 * p.grad)
    assert fast.captures == 1


def test_backward_accumulates_in_place():
    """As autograd: a gradient already there is added to, in place (the .grad tensor is kept)."""
    m = _model()
    x, y, u = _data()
    _, once = _eager_grads(derivative_loss, m, x, y, u)
    fast = cf.compile(derivative_loss, backend="eager")
    for p in m.parameters():
        p.grad = None
    fast.backward(m, x, y, u)
    held = [p.grad for p in m.parameters()]
    fast.backward(m, x, y, u)
    for p, h, r in zip(m.parameters(), held, once):
        assert p.grad is h
        _close(p.grad, 2 * r, "accumulated gradient")


def test_backward_shares_the_graph_of_the_call():
    m = _model()
    x, y, u = _data()
    fast = cf.compile(derivative_loss, backend="eager")
    fast(m, x, y, u).backward()
    fast.backward(m, x, y, u)
    assert fast.captures == 1


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _model()
        self.unused = nn.Linear(2, 2).to(D64)

    def forward(self, x):
        return self.body(x)


def test_backward_with_aux_and_an_unreached_parameter():
    """A parameter the loss does not reach keeps .grad None (as in eager autograd); aux outputs
    come back detached."""
    m = _WithUnused()

    def loss_with_aux(model, x, y, u):
        d = cf.loss_directional_derivatives(model, x, y, u, 2)
        return d.abs().mean(), d

    x, y, u = _data()
    value, (d,) = cf.compile(loss_with_aux, backend="eager").backward_with_aux(m, x, y, u)
    _close(d, cf.loss_directional_derivatives(m, x, y, u, 2), "aux")
    assert not d.requires_grad and not value.requires_grad
    assert m.unused.weight.grad is None and m.unused.bias.grad is None
    assert all(p.grad is not None for p in m.body.parameters())


def test_backward_tied_weights_and_tensor_argument():
    """A weight used by two layers gets the sum of both uses; a tensor argument that requires
    grad gets its gradient too."""
    torch.manual_seed(3)
    a, b = nn.Linear(4, 4).to(D64), nn.Linear(4, 4).to(D64)
    b.weight = a.weight
    m = nn.Sequential(nn.Linear(2, 4).to(D64), nn.Tanh(), a, nn.Tanh(), b, nn.Tanh(), nn.Linear(4, 2).to(D64))
    x, y, u = _data()
    x.requires_grad_(True)
    ref_loss, ref = _eager_grads(derivative_loss, m, x, y, u)
    ref_x = x.grad.clone()
    x.grad = None
    for p in m.parameters():
        p.grad = None
    loss = cf.compile(derivative_loss, backend="eager").backward(m, x, y, u)
    _close(loss, ref_loss, "loss")
    for g, r in zip(_grads(m), ref):
        _close(g, r, "gradient")
    _close(x.grad, ref_x, "input gradient")


def test_backward_gradient_laid_out_like_the_parameter():
    """Autograd's layout contract: .grad has the parameter's strides (a transposed weight)."""
    m = _model()
    with torch.no_grad():
        m[2].weight = nn.Parameter(m[2].weight.detach().t().contiguous().t())
    assert not m[2].weight.is_contiguous()
    x, y, u = _data()
    _, ref = _eager_grads(derivative_loss, m, x, y, u)
    for p in m.parameters():
        p.grad = None
    cf.compile(derivative_loss, backend="eager").backward(m, x, y, u)
    assert m[2].weight.grad.stride() == m[2].weight.stride()
    for g, r in zip(_grads(m), ref):
        _close(g, r, "gradient")


def test_backward_with_hooks_and_non_leaf_goes_through_autograd():
    """A gradient hook runs and a non-leaf tensor passes its gradient on, as in eager autograd."""
    m = _model()
    x0, y, u = _data()
    seen = []
    m[0].weight.register_hook(lambda g: seen.append(g.clone()))
    x0.requires_grad_(True)
    ref_loss, ref = _eager_grads(derivative_loss, m, x0 * 1.5, y, u)   # x0 * 1.5: not a leaf
    ref_x0 = x0.grad.clone()
    x0.grad = None
    for p in m.parameters():
        p.grad = None
    loss = cf.compile(derivative_loss, backend="eager").backward(m, x0 * 1.5, y, u)
    _close(loss, ref_loss, "loss")
    for g, r in zip(_grads(m), ref):
        _close(g, r, "gradient")
    _close(x0.grad, ref_x0, "gradient through the non-leaf input")
    assert len(seen) == 2                                 # the hook ran in both backwards


def test_backward_refusals():
    m = _model()
    x, y, u = _data()
    fast = cf.compile(derivative_loss, backend="eager")
    with torch.no_grad(), pytest.raises(RuntimeError, match="grad mode is off"):
        fast.backward(m, x, y, u)
    m.requires_grad_(False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        fast.backward(m, x, y, u)


def test_backward_inside_torch_compile_is_refused():
    m = _model()
    x, y, u = _data()
    fast = cf.compile(derivative_loss, backend="eager")

    def step(m, x, y, u):
        return fast.backward(m, x, y, u)
    with pytest.raises(Exception, match="cannot run inside torch.compile"):
        torch.compile(step, backend="eager", fullgraph=True)(m, x, y, u)


def test_accumulate_grad_obeys_the_layout_contract():
    """A gradient whose strides differ from the tensor's is laid out like the tensor (dense
    tensors) or made contiguous (others), as autograd's AccumulateGrad does."""
    from curvrate_fast.capture import _accumulate_grad
    t = torch.randn(3, 5, dtype=D64).t().requires_grad_(True)     # dense, transposed strides
    g = torch.randn(5, 3, dtype=D64)
    _accumulate_grad(t, g)
    assert t.grad.stride() == t.stride() and torch.equal(t.grad, g)
    s = torch.randn(4, 6, dtype=D64)[:, ::2].detach().requires_grad_(True)   # not dense
    g2 = torch.randn(4, 3, dtype=D64).t().contiguous().t()
    _accumulate_grad(s, g2)
    assert s.grad.is_contiguous() and torch.equal(s.grad, g2)
    ref = torch.randn(3, 5, dtype=D64).t().requires_grad_(True)
    ref.sum().backward()         # autograd's own: the same strides
    assert ref.grad.stride() == ref.stride()


def test_backward_of_a_ddp_model_goes_through_autograd(monkeypatch):
    """DDP synchronizes gradients in backward hooks: the call takes the autograd path (its
    reducer runs), with the eager gradients."""
    with one_rank_process_group():
        model = nn.parallel.DistributedDataParallel(_model())
        x, y, u = _data()
        ref_loss, ref = _eager_grads(derivative_loss, model, x, y, u)
        from curvrate_fast import capture
        taken = []
        call = capture.CompiledLoss._call_checked
        monkeypatch.setattr(capture.CompiledLoss, "_call_checked",
                            lambda self, *a: taken.append(1) or call(self, *a))
        for p in model.parameters():
            p.grad = None
        loss = cf.compile(derivative_loss, backend="eager").backward(model, x, y, u)
        assert taken, "the autograd path was not taken"
        _close(loss, ref_loss, "loss")
        for g, r in zip(_grads(model), ref):
            _close(g, r, "gradient")
