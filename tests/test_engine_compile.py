"""The engine under torch.compile: the jet entry points run eagerly inside a compiled function (a
graph break, not a failure); make_fx records the engine as one ATen graph (what capture builds
on, docs/design.md §6); a cf.compile'd loss is one custom op inside a compiled step, with no graph
break (tests/test_capture.py covers the CRR entry points)."""
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


def test_compiled_loss_inside_torch_compile_has_no_graph_break():
    """cf.compile(fn) inside a user's torch.compile(fullgraph=True): one custom op
    (curvrate::captured_loss), the eager value and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2)).double()
    x, y, u = torch.randn(4, 3).double(), torch.randint(0, 2, (4,)), torch.randn(4, 3).double()

    def penalty(m, x, y, u):
        return cf.loss_directional_derivatives(m, x, y, u, 3).abs().mean()

    fast = cf.compile(penalty, backend="eager")

    def step(x, y, u):
        return nn.functional.cross_entropy(model(x), y) + fast(model, x, y, u)

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(step, fullgraph=True, backend=counting_backend)
    a = compiled(x, y, u)
    ga = torch.autograd.grad(a, list(model.parameters()))
    b = nn.functional.cross_entropy(model(x), y) + penalty(model, x, y, u)   # the eager engine
    gb = torch.autograd.grad(b, list(model.parameters()))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("captured_loss" in t for t in targets), targets
