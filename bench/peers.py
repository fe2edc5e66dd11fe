"""The peers of the benchmark harness (bench_suite.py): other libraries computing the same
derivative step, with the same weights, inputs and directions, checked against nested autograd in
float64 before they are timed.

- ``jax``: ``jax.experimental.jet`` (JAX's Taylor mode) under ``jax.jit``: d_1..d_K of the
  per-sample cross-entropy along per-sample directions, and ``jax.value_and_grad`` of mean|d| with
  respect to the weights, one jitted function. The model is ported layer by layer from the torch
  ``nn.Sequential`` MLPs of the harness (Linear, Tanh, ReLU, GELU, Sigmoid); other models raise
  :class:`PeerUnavailable` (recorded as skipped, with the reason). JAX runs on the CPU here. With
  one torch thread the harness pins the whole process to one CPU (``bench_suite.pin_to_one_cpu``):
  XLA sizes its thread pool from the CPUs it may use; the ``XLA_FLAGS`` thread flags set below
  (for older JAX versions) are not honoured by this one.
  Install: ``pip install -c constraints.txt ".[peers]"``.
- ``torch_jet``: torch-jet (PyPI ``jet-for-pytorch``, Python ≥ 3.12): ``jet.jet`` of the
  per-sample cross-entropy along the directions, frozen into one FX graph with
  ``jet.capture_graph`` and simplified with its ``common_subexpression_elimination`` (the library's
  own pipeline for a fixed order); the backward of mean|d| to the parameters is PyTorch's autograd
  through that graph (the parameters are live tensors inside it, so updates are seen). torch-jet
  takes all K input coefficients (here u, 0, …, 0) and computes with every one of them; its
  coefficients are the derivatives dⁿ/dtⁿ (checked against nested autograd before timing). Where
  it is not importable (Python 3.11) the column is skipped with that reason; run the harness from
  a Python 3.12 environment to fill it (bench/README.md).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, List, Tuple

import torch
import torch.nn as nn

__all__ = ["PeerUnavailable", "make_step", "derivatives_and_grads"]


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (not installed, or no port of this model): a skipped cell."""


def _jax():
    if importlib.util.find_spec("jax") is None:
        raise PeerUnavailable("jax is not installed (pip install -c constraints.txt '.[peers]')")
    if "jax" not in sys.modules and torch.get_num_threads() == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1").strip()
    import jax
    jax.config.update("jax_enable_x64", True)   # float64 for the correctness check; float32 stays float32
    return jax


def _torch_jet():
    if sys.version_info < (3, 12):
        raise PeerUnavailable(f"torch-jet (jet-for-pytorch) needs Python ≥ 3.12; this is "
                              f"{sys.version_info.major}.{sys.version_info.minor}")
    if importlib.util.find_spec("jet") is None or importlib.util.find_spec("jet.tracing") is None:
        raise PeerUnavailable("torch-jet is not installed (pip install jet-for-pytorch)")
    import jet
    return jet


def _rows(x, y, u):
    """(X, Y, U, D, B): D directions as D·B rows, as the engine batches them (D None: one)."""
    B = x.shape[0]
    if u.dim() == x.dim() + 1:
        D = u.shape[0]
        X = x.unsqueeze(0).expand((D,) + tuple(x.shape)).reshape((D * B,) + tuple(x.shape[1:]))
        U = u.reshape((D * B,) + tuple(x.shape[1:]))
        Y = y.unsqueeze(0).expand((D,) + tuple(y.shape)).reshape(-1)
        return X, Y, U, D, B
    return x, y, u, None, B


def _torch_jet_program(model: nn.Module, x, y, u, order: int) -> Callable[[], torch.Tensor]:
    """torch-jet's derivatives d (K, B) or (K, D, B) of the per-sample cross-entropy along u, as
    one captured FX graph; differentiable in the model's parameters."""
    jet = _torch_jet()
    import torch.nn.functional as F
    X, Y, U, D, B = _rows(x, y, u)

    def f(z):
        return F.cross_entropy(model(z), Y, reduction="none")

    jet_f = jet.jet(f, (X,))
    coeffs = (X, U) + tuple(torch.zeros_like(U) for _ in range(order - 1))
    gm, _ = jet.capture_graph(jet_f, (coeffs,))
    jet.common_subexpression_elimination(gm.graph)
    gm.recompile()

    def run():
        out = gm(*coeffs)
        d = torch.stack(list(out[1:order + 1]))
        return d.reshape(order, D, B) if D is not None else d
    return run


def _jax_layers(model: nn.Module):
    """The MLP as a list of ("linear", index) / (activation name) steps, or PeerUnavailable."""
    if not isinstance(model, nn.Sequential):
        raise PeerUnavailable(f"the JAX port covers nn.Sequential MLPs; {type(model).__name__} is not one")
    acts = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.GELU: "gelu", nn.Sigmoid: "sigmoid"}
    steps = []
    n = 0
    for m in model:
        if isinstance(m, nn.Linear):
            steps.append(("linear", n, m.bias is not None))
            n += 1
        elif type(m) in acts and (not isinstance(m, nn.GELU) or m.approximate == "none"):
            steps.append((acts[type(m)],))
        else:
            raise PeerUnavailable(f"the JAX port has no layer {type(m).__name__}")
    return steps


def _jax_program(model: nn.Module, order: int):
    jax = _jax()
    import jax.numpy as jnp
    from jax.experimental import jet

    steps = _jax_layers(model)

    def mlp(ps, z):
        for st in steps:
            if st[0] == "linear":
                W, b = ps[st[1]]
                z = z @ W.T
                if st[2]:
                    z = z + b
            elif st[0] == "tanh":
                z = jnp.tanh(z)
            elif st[0] == "relu":
                z = jax.nn.relu(z)
            elif st[0] == "gelu":
                z = jax.nn.gelu(z, approximate=False)
            else:
                z = jax.nn.sigmoid(z)
        return z

    def ce(logits, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, None], 1)[:, 0]

    def loss(ps, x, y, u):
        f = lambda z: ce(mlp(ps, z), y)
        zeros = tuple(jnp.zeros_like(u) for _ in range(order - 1))
        _, series = jet.jet(f, (x,), ((u,) + zeros,))   # series[n-1] = dⁿ/dtⁿ f(x + t·u)
        d = jnp.stack(series)
        return jnp.abs(d).mean(), d

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), jnp


def _jax_inputs(model, x, y, u, jnp):
    import numpy as np
    ps = [(jnp.asarray(m.weight.detach().cpu().numpy()),
           jnp.asarray(m.bias.detach().cpu().numpy()) if m.bias is not None else None)
          for m in model if isinstance(m, nn.Linear)]
    X, Y, U, D, B = _rows(x, y, u)
    arr = lambda t: jnp.asarray(np.ascontiguousarray(t.detach().cpu().numpy()))
    return ps, arr(X), arr(Y), arr(U), D, B


def _to_torch(a, like: torch.Tensor) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.array(a)).to(device=like.device)


def derivatives_and_grads(method: str, model: nn.Module, x, y, u, order: int
                          ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(d of shape (K, B) or (K, D, B), gradients of mean|d| in ``model.parameters()`` order)."""
    if method == "torch_jet":
        d = _torch_jet_program(model, x, y, u, order)()
        params = list(model.parameters())
        return d.detach(), list(torch.autograd.grad(d.abs().mean(), params))
    if method != "jax":
        raise ValueError(f"unknown peer {method!r}")
    fn, jnp = _jax_program(model, order)
    ps, X, Y, U, D, B = _jax_inputs(model, x, y, u, jnp)
    (_, d), g = fn(ps, X, Y, U)
    d = _to_torch(d, x)
    if D is not None:
        d = d.reshape(order, D, B)
    grads = []
    for (gw, gb), m in zip(g, [m for m in model if isinstance(m, nn.Linear)]):
        grads.append(_to_torch(gw, x))
        if m.bias is not None:
            grads.append(_to_torch(gb, x))
    return d, grads


def make_step(method: str, model: nn.Module, x, y, u, order: int) -> Callable[[], torch.Tensor]:
    """The timed step of a peer: the jitted value-and-gradient call, waited for; returns d."""
    if method == "torch_jet":
        run = _torch_jet_program(model, x, y, u, order)

        def jet_step():          # as the harness's own steps: zero grads, d, mean|d|, backward
            for p in model.parameters():
                p.grad = None
            d = run()
            d.abs().mean().backward()
            return d.detach()
        return jet_step
    if method != "jax":
        raise ValueError(f"unknown peer {method!r}")
    if x.device.type != "cpu":
        raise PeerUnavailable("the JAX peer runs on the CPU here (jax without a GPU build)")
    fn, jnp = _jax_program(model, order)
    ps, X, Y, U, D, B = _jax_inputs(model, x, y, u, jnp)
    import jax

    def step():
        (v, d), g = fn(ps, X, Y, U)
        jax.block_until_ready((d, g))
        out = _to_torch(d, x)
        return out.reshape(order, D, B) if D is not None else out
    return step
