"""A torch.compile'd training step that calls the engine runs it eagerly (graph break) and gives
the eager result, instead of failing inside dynamo."""
import torch
import torch.nn as nn

import curvrate_fast as cf


def test_compiled_step_calls_engine_eagerly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y, u = torch.randn(4, 3), torch.randint(0, 2, (4,)), torch.randn(4, 3)

    def step(x, y, u):
        d = cf.loss_directional_derivatives(model, x, y, u, 3)
        return nn.functional.cross_entropy(model(x), y) + d.abs().mean()

    compiled = torch.compile(step, backend="eager")
    assert torch.allclose(compiled(x, y, u), step(x, y, u), rtol=1e-6)


def test_make_fx_records_the_engine_as_one_graph():
    """make_fx records the ops the rules run on the coefficients (the jet wrapper is Python): the
    graph of derivatives + parameter gradients replays the eager result, and value-reading checks
    (NaN/Inf scan, label range, the all-labels-valid shortcut) are skipped while tracing instead of
    failing on a tracing tensor. This is what the bench's ``compile`` method compiles."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 4))
    x, y, u = torch.randn(5, 3), torch.randint(0, 4, (5,)), torch.randn(2, 5, 3)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def fn(ps, x, u):
        leaves = [p.detach().requires_grad_(True) for p in ps]
        table = dict(zip(names, leaves))
        d = cf.loss_directional_derivatives(lambda inp: functional_call(model, table, (inp,)), x, y, u, 3,
                                            backend="reference")
        return d.detach(), torch.autograd.grad(d.abs().sum(), leaves)

    gm = make_fx(fn, tracing_mode="real")(params, x, u)
    assert not any(n.target == torch.ops.aten._local_scalar_dense.default for n in gm.graph.nodes)
    x2, u2 = torch.randn(5, 3), torch.randn(2, 5, 3)
    d_g, g_g = gm(params, x2, u2)
    d_e, g_e = fn(params, x2, u2)
    torch.testing.assert_close(d_g, d_e, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_g, g_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
