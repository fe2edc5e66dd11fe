"""Shared checks of the GEMM kernels that curvrate_fast.cpu_gemm may choose (oneDNN, AVX-512):
forcing one onto every float32 product, and the eager engine on it against nested autograd."""
import torch

import curvrate_fast as cf
from curvrate_fast import baseline, cpu_gemm


def force_kernel(monkeypatch, name):
    """Every float32 product measures fastest on kernel ``name`` (the deterministic-mode rule and
    the kernel's availability still apply)."""
    monkeypatch.setitem(cpu_gemm.KERNELS, name, cpu_gemm.KERNELS[name]._replace(min_auto_flop=0))
    monkeypatch.setattr(cpu_gemm, "fastest_gemm", lambda *a, **k: name)


def assert_eager_engine_on_kernel_matches_nested_autograd(monkeypatch, name):
    """The jet engine's linear rule through eager_linear, forced onto kernel ``name``: it is used,
    and the loss derivatives and their parameter gradients are nested autograd's (float32, to
    rounding)."""
    calls = []
    real = cpu_gemm._KernelLinear.apply
    force_kernel(monkeypatch, name)
    monkeypatch.setattr(cpu_gemm._KernelLinear, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    x, y, u = torch.randn(16, 6), torch.randint(0, 5, (16,)), torch.randn(16, 6)
    d = cf.loss_directional_derivatives(model, x, y, u, 3)
    assert calls and set(calls) == {name}
    ref = baseline.loss_directional_derivatives(model, x, y, u, 3)
    assert torch.allclose(d, ref, rtol=1e-4, atol=1e-5)
    params = list(model.parameters())
    g = torch.autograd.grad(d.abs().mean(), params)
    g_ref = torch.autograd.grad(ref.abs().mean(), params)
    for a, b in zip(g, g_ref):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4
