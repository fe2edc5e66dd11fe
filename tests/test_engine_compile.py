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
