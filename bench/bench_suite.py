"""The benchmark harness of curvrate-fast (docs/design.md §5): the one place where workloads,
methods, timers, correctness checks and reports live. It is not part of the installed package
(the wheel holds the library); it runs from a source checkout:

    python bench/bench_suite.py --quick                      # smoke run, about a minute on 2 CPU cores
    python bench/bench_suite.py                              # the full suite
    python bench/bench_suite.py --summary cpu_small_models   # + a curated summary to commit
    python -m curvrate_fast bench ...                        # the same, forwarded here by the CLI

Raw results (JSON with every row and timing, markdown) go to ``bench/results/raw/``, which git
ignores; ``--summary NAME`` also writes ``bench/results/NAME.md`` and ``NAME.json``: the tables
with the device, the versions (torch, triton, jax), the commit and the date, no host name and no
path. Those summaries are what the README cites.

What is measured: per-step time, speedup and peak memory of the per-sample loss derivatives
d_1..d_K plus the backward of mean |d_n| to the parameters, for our engine against the paper's
nested-autograd method and the alternatives; and CRR training steps against a plain step and
against their floor (docs/design.md §6). Everything is measured in one run on one device, the
methods of a cell interleaved.

Methods (one "step" = zero the gradients, derivatives of orders 1..K, ``mean|d|``, ``backward``):

- ``baseline``   nested reverse-mode autograd (:mod:`curvrate_fast.baseline`, the paper's method;
                 loops over the directions). The reference of every speedup.
- ``ours``       :func:`curvrate_fast.loss_directional_derivatives`, backend ``"auto"`` (all
                 directions batched into one pass), the eager engine.
- ``captured``   the same step through :func:`curvrate_fast.compile` (the library's fast path: the
                 whole step, derivatives and gradients, captured once as one graph and compiled
                 by inductor); the first call (capture + compile) is reported apart. Its float32
                 CPU GEMMs run through oneDNN where that measures faster (curvrate_fast.cpu_gemm).
- ``captured_mm`` the same with ``cpu_gemm="aten"``: every GEMM through ``torch.mm`` (MKL), to
                 show what the graph costs without oneDNN's GEMMs.
- ``reference``  the eager engine with ``backend="reference"`` (pure-PyTorch rules).
- ``cpp``        the same with ``backend="cpp"`` (the C++ CPU kernels of csrc/, built on first use;
                 CPU only).
- ``func_jvp``   K nested ``torch.func.jvp`` along the scalar t of t ↦ loss(model(x + t·u)), all
                 sample-directions batched as rows (forward-over-forward, 2^K tangent terms).
- ``compile``    the make_fx + torch.compile recipe the library's capture grew out of, in a
                 subprocess with a timeout (its speedup chained through the reference rules).
- ``jax``        a peer: ``jax.experimental.jet`` under ``jax.jit`` (value_and_grad of mean|d|),
                 the same weights, inputs and directions (bench/peers.py; MLP workloads).
- ``torch_jet``  a peer: torch-jet (``jet-for-pytorch``); skipped with the reason where it cannot
                 be installed (it needs Python ≥ 3.12).

Timing: on CUDA ``triton.testing.do_bench`` (median and quartiles); on CPU wall-clock medians and
inter-quartile range after warm-up, the methods of one cell interleaved in a fresh random order
every round. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated
before the step; on CPU the growth of the process's resident-set high-water mark (VmHWM) over one
step, "n/a" where /proc is not available.

From Python (with bench/ on ``sys.path``)::

    >>> import bench_suite
    >>> rows = bench_suite.run({"workloads": ["two_moons"], "dirs": [1], "repeats": (1, 1)})
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:          # run as a script from anywhere: the checkout's package first
    sys.path.insert(0, ROOT)
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from curvrate_fast import baseline  # noqa: E402
from curvrate_fast.experiments.mnist import MnistCNN  # noqa: E402

#: raw results (ignored by git); curated summaries go to RESULTS
RESULTS = os.path.join(HERE, "results")
RAW = os.path.join(RESULTS, "raw")

__all__ = ["BenchConfig", "WORKLOADS", "CRR_ONLY_WORKLOADS", "METHODS", "CRR_WORKLOADS", "run", "main",
           "build_workload", "workload", "TinyLM", "lm_loss", "MnistCNN", "GeluCNN",
           "derivative_fn", "check_methods", "format_markdown", "profile_ours", "environment",
           "write_summary"]

METHODS = ("baseline", "ours", "captured", "captured_mm", "reference", "cpp", "func_jvp", "compile", "jax",
           "torch_jet")
#: the captured methods and their ``cpu_gemm`` (curvrate_fast.cpu_gemm): the library's default, and
#: torch.mm everywhere (what the graph costs without oneDNN's GEMMs)
CAPTURED = {"captured": "auto", "captured_mm": "aten"}
#: the peers: other libraries, checked like our methods, timed beside them
PEERS = ("jax", "torch_jet")
#: the methods of the default run (cpp and the make_fx recipe on request)
DEFAULT_METHODS = ("baseline", "ours", "captured", "reference", "func_jvp", "jax", "torch_jet")
METHOD_DOC = {
    "baseline": "nested reverse-mode autograd (paper's method), loops over directions",
    "ours": "curvrate_fast.loss_directional_derivatives, backend='auto', directions batched",
    "reference": "curvrate_fast, backend='reference' (pure-PyTorch rules)",
    "cpp": "curvrate_fast, backend='cpp' (C++ CPU activation-jet kernels; CPU only)",
    "func_jvp": "K nested torch.func.jvp along t (forward-over-forward), directions batched",
    "compile": "reference rules, whole step traced by make_fx and compiled by torch.compile (inductor)",
    "captured": ("curvrate_fast.compile (inductor): the whole step captured once as one graph; its "
                 "gradients written into .grad by CompiledLoss.backward (as loss.backward() would)"),
    "captured_mm": "captured with cpu_gemm='aten': every GEMM through torch.mm (MKL), no oneDNN or AVX-512 kernel",
    "jax": "jax.experimental.jet under jax.jit (value_and_grad), same weights and inputs",
    "torch_jet": "torch-jet (jet-for-pytorch) captured graph",
}


# =============================================================================================
# Workloads
# =============================================================================================

class GeluCNN(MnistCNN):
    """The paper's MNIST CNN with GELU in place of ReLU: a smooth network, so every coefficient row
    is stored (R = K + 1: the CRR floor's other end from the ReLU CNN's R = 2)."""

    act = staticmethod(F.gelu)


class TransformerClassifier(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (batch_first) + mean over the sequence + a linear head."""

    def __init__(self, d_model: int = 256, nhead: int = 8, n_classes: int = 10,
                 dim_feedforward: int = 2048) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=dim_feedforward,
                                                batch_first=True)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x):
        return self.head(self.layer(x).mean(dim=1))


class TinyLM(nn.Module):
    """A small causal transformer language model on input embeddings (the CRR LM setting): learned
    positions, ``n_layers`` pre-LayerNorm ``nn.TransformerEncoderLayer`` (batch_first, causal mask),
    a final LayerNorm and a linear head over the vocabulary. Input (B, T, d_model) embeddings (the
    directions of CRR live in embedding space), output logits (B, T, vocab)."""

    def __init__(self, d_model: int = 256, nhead: int = 4, n_layers: int = 2, vocab: int = 8192,
                 seq: int = 128, dim_feedforward: int = 1024) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=dim_feedforward, batch_first=True,
                                       norm_first=True) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq),
                             persistent=False)

    def forward(self, x):
        T = x.shape[1]
        h = x + self.pos[:T]
        for layer in self.layers:
            h = layer(h, src_mask=self.causal[:T, :T], is_causal=True)
        return self.head(self.norm(h))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample next-token loss of a language model: the cross-entropy of every position, averaged
    over the sequence; logits (B, T, V), targets (B, T) → (B,)."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.reshape(B * T, V), y.reshape(B * T), reduction="none")
    return ce.reshape(B, T).mean(1)


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _two_moons_model() -> nn.Module:
    """experiments.two_moons.MLP's network and initialization, as an nn.Sequential (the form the
    JAX port of bench/peers.py reads)."""
    m = _mlp([2, 64, 64, 2])
    for mod in m:  # docs/math.md §6: Xavier-uniform weights, zero biases
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            nn.init.zeros_(mod.bias)
    return m


def _moons(n: int, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` training samples of the demo's and the reproduction's Two Moons data
    (:func:`curvrate_fast.experiments.two_moons.make_data`, noise 0.2, standardized, no label
    noise), the data seed drawn from ``g``."""
    from curvrate_fast.experiments.two_moons import make_data
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
    d = make_data(seed, label_noise=0.0, n=max(4 * n, 200))
    return d.x_train[:n], d.y_train[:n]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    batch: int
    make_model: Callable[[], nn.Module]
    make_data: Callable[[int, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]
    #: per-sample loss (logits, y) → (B,); None: cross-entropy over the last axis
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None


def _mnist_data(b, g):
    x = (torch.rand(b, 1, 28, 28, generator=g) - 0.1307) / 0.3081
    return x, torch.randint(0, 10, (b,), generator=g)


def _mlp784_data(b, g):
    x = (torch.rand(b, 784, generator=g) - 0.1307) / 0.3081
    return x, torch.randint(0, 10, (b,), generator=g)


def _seq_data(b, g):
    return torch.randn(b, 64, 256, generator=g), torch.randint(0, 10, (b,), generator=g)


def _lm_data(b, g):
    return torch.randn(b, 128, 256, generator=g), torch.randint(0, 8192, (b, 128), generator=g)


WORKLOADS: Dict[str, Workload] = {
    "two_moons": Workload("two_moons", "Two Moons MLP 2→64→64→2 tanh", 128, _two_moons_model,
                          _moons),
    "mlp784": Workload("mlp784", "MLP 784→512→512→10 tanh", 128, lambda: _mlp([784, 512, 512, 10]),
                       _mlp784_data),
    "mnist_cnn": Workload("mnist_cnn", "MNIST CNN (SPEC §6), eval mode, 1×28×28", 128, MnistCNN,
                          _mnist_data),
    "transformer": Workload("transformer",
                            "TransformerEncoderLayer(256, nhead=8, ff 2048) + mean-pool + linear, seq 64",
                            32, TransformerClassifier, _seq_data),
}


#: workloads of the CRR table only (their loss is not the per-sample CE of the derivative methods)
CRR_ONLY_WORKLOADS: Dict[str, Workload] = {
    "gelu_cnn": Workload("gelu_cnn", "the MNIST CNN with GELU (smooth: all K+1 rows stored), 1×28×28", 128,
                         GeluCNN, _mnist_data),
    "lm": Workload("lm", "causal transformer LM: 2 pre-LN layers d=256, 4 heads, ff 1024, seq 128, "
                         "vocab 8192, on input embeddings", 16, TinyLM, _lm_data, loss_fn=lm_loss),
}


def workload(name: str) -> Workload:
    """The :class:`Workload` of a derivative-step or CRR-only workload name."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    if name in CRR_ONLY_WORKLOADS:
        return CRR_ONLY_WORKLOADS[name]
    raise ValueError(f"unknown workload {name!r}; choose from {list(WORKLOADS) + list(CRR_ONLY_WORKLOADS)}")


def build_workload(name: str, *, batch: Optional[int] = None, dtype=torch.float32,
                   device="cpu", seed: int = 0, train: bool = False):
    """(model, x, y) for a workload, model in eval mode unless ``train``."""
    wl = workload(name)
    torch.manual_seed(seed)
    model = wl.make_model().to(device=device, dtype=dtype)
    model.train(train)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = wl.make_data(batch or wl.batch, g)
    return model, x.to(device=device, dtype=dtype), y.to(device)


def make_directions(x: torch.Tensor, n_dirs: int, seed: int = 2) -> torch.Tensor:
    """Per-sample unit directions (docs/math.md §1): shape x.shape for one, (D, *x.shape) for D > 1."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn((n_dirs,) + tuple(x.shape), generator=g, dtype=torch.float64)
    flat = u.reshape(n_dirs, x.shape[0], -1)
    u = (flat / (flat.norm(dim=-1, keepdim=True) + 1e-12)).reshape(u.shape)
    u = u.to(device=x.device, dtype=x.dtype)
    return u[0] if n_dirs == 1 else u


# =============================================================================================
# Methods: derivative functions with the signature of loss_directional_derivatives
# =============================================================================================

def _per_sample_ce(z, y):
    return F.cross_entropy(z, y, reduction="none")


def func_jvp_derivatives(model, x, y, u, order, loss_fn=None):
    """d_n[b] = dⁿ/dtⁿ loss(model(x + t·u), y)[b] by ``order`` nested ``torch.func.jvp`` along the
    scalar t; D directions are batched as D·B rows (samples are independent). Output as
    :func:`curvrate_fast.loss_directional_derivatives`: (order, B) or (order, D, B)."""
    from torch.func import jvp

    from curvrate_fast.baseline import primitive_ops

    loss_fn = loss_fn or _per_sample_ce
    B = x.shape[0]
    D = None
    X, U, Y = x, u, y
    if u.dim() == x.dim() + 1:
        D = u.shape[0]
        X = x.unsqueeze(0).expand((D,) + tuple(x.shape)).reshape((D * B,) + tuple(x.shape[1:]))
        U = u.reshape((D * B,) + tuple(x.shape[1:]))
        Y = y.unsqueeze(0).expand((D,) + tuple(y.shape)).reshape((D * B,) + tuple(y.shape[1:]))

    def f(t):
        return loss_fn(model(X + t * U), Y)

    g = f
    for _ in range(order):
        g = (lambda h: (lambda t: jvp(h, (t,), (torch.ones_like(t),))))(g)
    t0 = torch.zeros((), dtype=x.dtype, device=x.device)
    with primitive_ops(True):
        out = g(t0)
    ds = []
    for k in range(1, order + 1):
        o = out
        for _ in range(order - k):
            o = o[0]
        for _ in range(k):
            o = o[1]
        ds.append(o)
    d = torch.stack(ds)
    return d.reshape(order, D, B) if D is not None else d


def derivative_fn(method: str) -> Callable:
    """The derivative function of a method (``compile`` uses the reference rules)."""
    import curvrate_fast as cf

    if method == "baseline":
        return baseline.loss_directional_derivatives
    if method == "ours":
        return lambda m, x, y, u, k: cf.loss_directional_derivatives(m, x, y, u, k, backend="auto")
    if method == "cpp":
        return lambda m, x, y, u, k: cf.loss_directional_derivatives(m, x, y, u, k, backend="cpp")
    if method in ("reference", "compile"):
        return lambda m, x, y, u, k: cf.loss_directional_derivatives(m, x, y, u, k,
                                                                     backend="reference")
    if method == "func_jvp":
        return func_jvp_derivatives
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def make_step(method: str, model: nn.Module, x, y, u, order: int,
              compile_backend: str = "inductor") -> Callable[[], torch.Tensor]:
    """The timed step: zero grads, d_1..d_K, penalty mean|d|, backward. Returns the derivatives.
    ``compile_backend``: torch.compile's backend of the ``compile`` method."""
    if method == "compile":
        return _traced_compiled_step(model, x, y, u, order, compile_backend)
    if method in CAPTURED:
        return _captured_step(model, x, y, u, order, cpu_gemm=CAPTURED[method])
    if method in PEERS:
        import peers
        return peers.make_step(method, model, x, y, u, order)
    fn = derivative_fn(method)

    def step():
        for p in model.parameters():
            p.grad = None
        d = fn(model, x, y, u, order)
        d.abs().mean().backward()
        return d.detach()
    return step


def _captured_step(model: nn.Module, x, y, u, order: int, backend: str = "inductor",
                   cpu_gemm: str = "auto", options: Optional[Dict[str, Any]] = None):
    """The library's fast path for a derivative step: :func:`curvrate_fast.compile` of
    mean|d| (d returned beside it, detached, for the in-run check); the first call captures the
    step and compiles it. ``options``: the compiler's (inductor config patches). The step's
    ``program`` attribute is its :class:`curvrate_fast.CompiledLoss` (bench/step_split.py reads
    its graph)."""
    import curvrate_fast as cf

    def loss(m, x, y, u):
        d = cf.loss_directional_derivatives(m, x, y, u, order)
        return d.abs().mean(), d

    fast = cf.CompiledLoss(loss, backend=backend, name="bench step", cpu_gemm=cpu_gemm, options=options)

    def step():
        for p in model.parameters():
            p.grad = None
        # the gradients straight into .grad, as value.backward() would put them (no autograd pass)
        _, (d,) = fast.backward_with_aux(model, x, y, u)
        return d
    step.program = fast
    return step


def _traced_compiled_step(model: nn.Module, x, y, u, order: int,
                          backend: str = "inductor") -> Callable[[], torch.Tensor]:
    """The ``compile`` method's step: the reference rules' derivatives and the gradients of mean|d|,
    recorded once by ``make_fx`` (real tensors; the jet wrapper is Python and invisible to the trace,
    the ops the rules run on the coefficients are what it records, forward and backward) and
    compiled by ``torch.compile``; the first call traces and compiles. The gradients are written to
    ``.grad`` like the other methods' ``backward``."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    import curvrate_fast as cf

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]

    def fn(ps, x, u):
        leaves = [p.detach().requires_grad_(True) for p in ps]
        table = dict(zip(names, leaves))
        d = cf.loss_directional_derivatives(lambda inp: functional_call(model, table, (inp,), strict=False),
                                            x, y, u, order, backend="reference")
        grads = torch.autograd.grad(d.abs().mean(), leaves)
        return d.detach(), grads

    compiled: List[Callable] = []

    def step():
        if not compiled:
            gm = make_fx(fn, tracing_mode="real")([p.detach() for p in params], x, u)
            compiled.append(torch.compile(gm, backend=backend))
        d, grads = compiled[0]([p.detach() for p in params], x, u)
        for p, g in zip(params, grads):
            p.grad = g
        return d
    return step


# =============================================================================================
# Correctness: every method against the nested-autograd oracle (float64, small batch)
# =============================================================================================

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over orders of max|a_n − b_n| / max|b_n| (a per-order relative error)."""
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    den = b.abs().amax(1).clamp_min(1e-300)
    return float(((a - b).abs().amax(1) / den).max())


def check_methods(workloads: Sequence[str], methods: Sequence[str], *, order: int = 4,
                  n_dirs: int = 2, batch: int = 4, tol: float = 1e-8, device="cpu",
                  log=print) -> List[Dict[str, Any]]:
    """Derivatives and parameter gradients of mean|d| of each method vs the baseline in float64."""
    out = []
    for wname in workloads:
        model, x, y = build_workload(wname, batch=batch, dtype=torch.float64, device=device)
        u = make_directions(x, n_dirs)
        params = [p for p in model.parameters() if p.requires_grad]
        d0 = baseline.loss_directional_derivatives(model, x, y, u, order)
        g0 = torch.autograd.grad(d0.abs().mean(), params)
        for m in methods:
            if m in ("baseline", "compile"):
                continue
            rec: Dict[str, Any] = {"workload": wname, "method": m, "order": order,
                                   "dirs": n_dirs, "batch": batch}
            try:
                if m in PEERS or m in CAPTURED:
                    d, g = _grads_of_step(m, model, x, y, u, order, params)
                else:
                    d = derivative_fn(m)(model, x, y, u, order)
                    g = torch.autograd.grad(d.abs().mean(), params, allow_unused=True)
                rec["deriv_rel_err"] = _rel_err(d.detach(), d0.detach())
                rec["grad_rel_err"] = max(
                    float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
                    if a is not None else float("inf") for a, b in zip(g, g0))
                rec["ok"] = bool(rec["deriv_rel_err"] <= tol and rec["grad_rel_err"] <= tol
                                 and tuple(d.shape) == tuple(d0.shape))
            except Exception as e:  # noqa: BLE001 - a failing method is a result
                rec["ok"] = False
                rec["error"] = f"{type(e).__name__}: {_clean(str(e))[:300]}"
                if m in PEERS and isinstance(e, _skip_error()):
                    rec["skipped"] = rec["error"]
            if rec.get("skipped"):
                log(f"  check {wname:12s} {m:10s} skipped: {rec['skipped']}")
                out.append(rec)
                continue
            log(f"  check {wname:12s} {m:10s} "
                + (f"deriv {rec.get('deriv_rel_err', float('nan')):.1e} "
                   f"grad {rec.get('grad_rel_err', float('nan')):.1e} "
                   + ("ok" if rec["ok"] else "MISMATCH") if "error" not in rec
                   else "ERROR " + rec["error"]))
            out.append(rec)
    return out


def _grads_of_step(method, model, x, y, u, order, params):
    """(d, gradients of mean|d| in ``params`` order) of a method that computes its own gradients."""
    if method in CAPTURED:
        # the replay; inductor's own numerics are PyTorch's
        step = _captured_step(model, x, y, u, order, backend="eager", cpu_gemm=CAPTURED[method])
        d = step()
        return d, [p.grad for p in params]
    import peers
    return peers.derivatives_and_grads(method, model, x, y, u, order)


def _skip_error():
    import peers
    return peers.PeerUnavailable


def _clean(text: str) -> str:
    """A message without the checkout's absolute path or the user's home (results are committed)."""
    text = text.replace(ROOT + os.sep, "").replace(ROOT, "<repo>")
    home = os.path.expanduser("~")
    if home and home != "/":
        text = text.replace(home, "~")
    return text


# =============================================================================================
# Measurement
# =============================================================================================

def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except Exception:  # noqa: BLE001 - not glibc
        pass


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@contextlib.contextmanager
def retained_heap(enabled: bool = True):
    """Keep freed memory in the process (glibc: no mmap for big blocks, no trimming) while timing.

    Without it every large tensor is mmap'ed and unmapped each step, and its pages are faulted in
    again on the next step. On a VM whose guest memory is backed lazily (first touch of a page
    costing ~4 s/GiB here) that turns into multi-second stalls that have nothing to do with the
    method measured. With the heap retained, warm-up faults the pages once, like a GPU caching
    allocator. No effect where glibc is absent."""
    libc = None
    if enabled and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        except Exception:  # noqa: BLE001 - not glibc
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, 65536)
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            libc.malloc_trim(0)


def prefault(gib: float) -> float:
    """Touch ``gib`` GiB of fresh memory once and free it (backs a lazily-backed VM's memory before
    timing). Returns the seconds it took."""
    t0 = time.perf_counter()
    chunks = []
    for _ in range(int(math.ceil(gib))):
        a = torch.empty(2**28, dtype=torch.float32)
        a.fill_(0.0)
        chunks.append(a)
    del chunks
    _malloc_trim()
    return time.perf_counter() - t0


def mem_available_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _proc_status() -> Optional[Dict[str, int]]:
    try:
        d = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS")):
                    k, v = line.split(":")
                    d[k] = int(v.split()[0])  # kB
        return d if len(d) == 2 else None
    except OSError:
        return None


def peak_memory_mb(fn: Callable[[], Any], device) -> Optional[float]:
    """Peak extra memory of one call of ``fn`` in MiB (see the module docstring), None if n/a."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark
    except OSError:
        return None
    before = _proc_status()
    if before is None:
        return None
    fn()
    after = _proc_status()
    return max(0.0, (after["VmHWM"] - before["VmRSS"]) / 1024.0)


def _quantiles(ts: List[float]) -> Tuple[float, float, float]:
    ts = sorted(ts)
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return q[0], statistics.median(ts), q[2]


def _do_bench(fn, budget_s: float) -> Dict[str, Any]:
    from triton.testing import do_bench
    q1, med, q3 = do_bench(fn, warmup=max(25, int(budget_s * 100)), rep=max(100, int(budget_s * 1000)),
                           quantiles=[0.25, 0.5, 0.75])
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "min_ms": None, "reps": None,
            "timer": "do_bench"}


def time_interleaved(fns: Dict[str, Callable[[], Any]], device, *, est_s: Dict[str, float],
                     min_reps: int = 3, max_reps: int = 20, budget_s: float = 3.0,
                     max_cell_s: float = 40.0) -> Dict[str, Dict[str, Any]]:
    """Median and quartiles (ms) of each function's time, the functions already warmed up.

    CUDA: ``triton.testing.do_bench`` per function. CPU: wall clock, the functions run
    **interleaved** (round r runs each function once, in a fresh random order, so that no method
    always follows the same one) so that every method sees the same machine load; a method gets
    ``budget_s / est`` repeats clamped to [min_reps, max_reps], but a slow one
    (min_reps·est > max_cell_s) only as many as fit max_cell_s, at least 1; a method whose IQR
    exceeds 20 % of its median gets up to max(3, n) more rounds within the same limits."""
    if str(device).startswith("cuda"):
        try:
            return {k: _do_bench(f, budget_s) for k, f in fns.items()}
        except ImportError:
            pass
    reps: Dict[str, int] = {}
    for k in fns:
        est = max(est_s.get(k, 1.0), 1e-6)
        n = int(min(max_reps, max(min_reps, budget_s // est)))
        if n * est > max_cell_s:
            n = max(1, min(n, int(max_cell_s // est)))
        reps[k] = n
    ts: Dict[str, List[float]] = {k: [] for k in fns}
    errors: Dict[str, str] = {}

    import random
    rng = random.Random(0)

    def rounds(n_rounds: int, want: Dict[str, int]) -> None:
        names = [k for k in fns if want.get(k, 0) > 0]
        for r in range(n_rounds):
            if not names:
                return
            # a fresh random order every round: a step runs measurably slower right after a
            # memory-heavy one (cold caches, e.g. 2.5 vs 2.0 ms for two_moons after func_jvp), and
            # a fixed or rotated order would give every method the same predecessor every time
            order = names[:]
            rng.shuffle(order)
            for k in order:
                if r < want[k] and k not in errors:
                    t0 = time.perf_counter()
                    try:
                        fns[k]()
                        _sync(device)
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory on a later call
                        errors[k] = f"{type(e).__name__}: {str(e)[:300]}"
                        continue
                    ts[k].append(time.perf_counter() - t0)

    rounds(max(reps.values(), default=0), reps)
    # a noisy machine (other jobs, VM page faults) shows as a wide IQR: top up such methods with
    # more interleaved rounds while their budget allows
    extra: Dict[str, int] = {}
    for k, v in ts.items():
        if k in errors or len(v) < 3:
            continue
        q1, med, q3 = _quantiles(v)
        if (q3 - q1) > 0.2 * med:
            room = min(max_reps - len(v), int(max_cell_s // max(med, 1e-6)) - len(v))
            if room > 0:
                extra[k] = min(room, max(3, len(v)))
    if extra:
        rounds(max(extra.values()), extra)
    out: Dict[str, Dict[str, Any]] = {}
    for k, v in ts.items():
        if k in errors:
            out[k] = {"error": errors[k]}
            continue
        q1, med, q3 = _quantiles(v)
        out[k] = {"median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                  "min_ms": min(v) * 1e3, "reps": len(v), "timer": "wall-interleaved",
                  "times_ms": [round(t * 1e3, 3) for t in v]}
        if k in extra:
            out[k]["topped_up"] = extra[k]
    return out


def warm_up(fn: Callable[[], Any], device, n: int) -> Tuple[Any, List[float]]:
    """Call ``fn`` n ≥ 1 times; returns the first result and the times (s)."""
    first, ts = None, []
    for i in range(max(1, n)):
        t0 = time.perf_counter()
        r = fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
        if i == 0:
            first = r
    return first, ts


# =============================================================================================
# Configuration
# =============================================================================================

@dataclass
class BenchConfig:
    workloads: List[str] = field(default_factory=lambda: list(WORKLOADS))
    methods: List[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    dirs: List[int] = field(default_factory=lambda: [1, 5])
    orders: List[int] = field(default_factory=lambda: [4])
    batch: Optional[int] = None          # override every workload's batch (tests)
    device: str = "auto"
    dtype: str = "float32"
    repeats: Tuple[int, int] = (3, 20)   # (min, max) timed repeats per cell (CPU)
    budget_s: float = 3.0                # time budget per cell (CPU), sets the number of repeats
    warmup: int = 1
    crr: bool = True
    crr_workloads: List[str] = field(default_factory=lambda: ["two_moons_crr", "mnist_cnn_crr"])
    crr_captured: bool = True            # the CRR rows include CRRLoss(compile=True)
    check: bool = True                   # float64 correctness check before measuring
    check_in_run: bool = True            # each method's d vs the baseline's d in the timed run
    memory: bool = True
    max_cell_s: float = 30.0             # a slow method gets only the repeats that fit this
    threads: Optional[int] = None        # torch.set_num_threads (None: torch's default)
    mem_limit_gib: Optional[float] = None  # CPU: skip a cell predicted to need more (None: half
                                           # of MemAvailable at start)
    compile_timeout_s: float = 300.0
    compile_backend: str = "inductor"    # of the compile method ("eager": trace only, for smoke tests)
    isolate_compile: bool = True         # torch.compile cells in a subprocess with a timeout
    retain_heap: bool = True             # CPU: keep freed memory in the process (see retained_heap)
    prefault_gib: float = 0.0            # CPU: touch this much memory once before measuring
    quick: bool = False
    seed: int = 0
    log: bool = True

    @classmethod
    def from_any(cls, config: Any) -> "BenchConfig":
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            names = {f.name for f in fields(cls)}
            bad = set(config) - names
            if bad:
                raise ValueError(f"unknown config keys {sorted(bad)}; known: {sorted(names)}")
            c = cls(**config)
            if c.quick and "workloads" not in config:
                c.apply_quick(keep_workloads=False)
            elif c.quick:
                c.apply_quick(keep_workloads=True)
            return c
        raise TypeError(f"config must be a BenchConfig or a dict, got {type(config).__name__}")

    def apply_quick(self, keep_workloads: bool = False) -> None:
        """Small settings for the CLI smoke test (< 60 s on a 2-core CPU)."""
        self.quick = True
        if not keep_workloads:
            self.workloads = ["two_moons", "mlp784"]
        self.methods = [m for m in self.methods if m != "compile" and m not in CAPTURED]
        self.crr_captured = False
        self.repeats = (1, 3)
        self.budget_s = 0.3
        self.max_cell_s = 1.0
        self.crr_workloads = ["two_moons_crr"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# =============================================================================================
# Environment
# =============================================================================================

def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, check=False,
                              text=True, timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        if not sha:
            return "unknown"
        return sha + ("-dirty" if git("status", "--porcelain") else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU: {_cpu_name()} ({os.cpu_count()} logical cores)"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:
        import importlib.metadata as md
        jax_version = md.version("jax")
    except Exception:  # noqa: BLE001 - not installed
        jax_version = None
    return {   # no host name and no path: summaries of these are committed
        "device": dev_name, "device_type": device.type, "torch": torch.__version__,
        "triton": triton_version, "jax": jax_version, "python": platform.python_version(),
        "commit": _git_commit(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "os": platform.system(), "loadavg_at_start": load,
    }


# =============================================================================================
# CRR training steps
# =============================================================================================

CRR_WORKLOADS = {
    # name: (workload, orders (inclusive range), directions, subset, scale, train mode)
    "two_moons_crr": dict(workload="two_moons", orders=(2, 3), directions="per_order", subset=64,
                          scale=3e-3, train=True,
                          note="paper §5.2: orders 2–3, fresh direction per order, 64 of 128"),
    "mnist_cnn_crr": dict(workload="mnist_cnn", orders=(1, 4), directions="fixed", subset=None,
                          scale=200.0, train=True,
                          note="paper Table 2: orders 1–4, one fixed direction, full batch 128, "
                               "dropout on"),
    "gelu_cnn_crr": dict(workload="gelu_cnn", orders=(1, 4), directions="fixed", subset=None,
                         scale=200.0, train=True,
                         note="the MNIST CNN with GELU (smooth, R = K+1 rows): orders 1–4, one fixed "
                              "direction, full batch 128, dropout on"),
    # not a paper setting: what CRR costs on a (small) language model; the scale only sets the
    # penalty's weight, not the step's cost. Nested autograd needs LayerNorm and attention in
    # primitive ops (PyTorch's fused attention has no double backward on CUDA)
    "lm_crr": dict(workload="lm", orders=(1, 4), directions="fixed", subset=None, scale=1e-2, train=True,
                   primitive_ops=True,
                   note="small causal transformer LM (CRR_ONLY_WORKLOADS['lm']): orders 1–4, one fixed "
                        "direction in embedding space, full batch 16 × 128 tokens, dropout on; per-sample "
                        "loss = mean next-token CE over the sequence"),
}


def _unit(shape, like: torch.Tensor) -> torch.Tensor:
    u = torch.randn(shape, dtype=like.dtype, device=like.device)
    flat = u.reshape(shape[0], -1)
    return (flat / (flat.norm(dim=1, keepdim=True) + 1e-12)).reshape(shape)


def _baseline_crr(model, x, y, orders, directions, subset, scale, loss_fn=None, primitive=False):
    """The paper's code: nested grads of Σ_b ℓ_b with ⟨g_n, u_n⟩ (fresh u_n per order for
    directions="per_order", else one u), penalty = scale · mean over orders of mean_b |d_n|
    (:func:`curvrate_fast.baseline.nested_directional_derivatives`, the library's one copy of the
    loop). ``primitive``: LayerNorm and attention in primitive ops for the whole penalty."""
    if subset is not None and subset < x.shape[0]:
        idx = torch.randperm(x.shape[0], device=x.device)[:subset]
        x, y = x[idx], y[idx]
    lo, hi = orders
    fn = loss_fn or _per_sample_ce
    u = (lambda n, X: _unit(X.shape, X)) if directions == "per_order" else _unit(x.shape, x)
    with baseline.primitive_ops(primitive):
        d = baseline.nested_directional_derivatives(lambda X: fn(model(X), y), x, u, hi)
    return scale * d[lo - 1:].abs().mean(dim=1).mean()


def _stored_rows(model, x, order: int) -> int:
    """R of the CRR floor: the coefficient rows the model's output jet stores (2 for a
    piecewise-linear network, K + 1 for a smooth one; docs/design.md §6)."""
    import curvrate_fast as cf
    was = model.training
    model.eval()
    try:
        out = model(cf.input_jet(x[:2], torch.ones_like(x[:2]), order))
    finally:
        model.train(was)
    return int(out.coeffs.shape[0]) if isinstance(out, cf.JetTensor) else 1


def crr_floor(spec: Dict[str, Any], rows: int, batch: int, subset: Optional[int], every: int = 1,
              multilinear: bool = False) -> float:
    """The floor of a CRR step in plain steps: 1 + s·R/k (s the penalized fraction, R the rows
    per sample: the stored rows, for per-order directions 2^N components of a multilinear jet
    where the model has multilinear rules (``multilinear``), else the stored rows times 2^{N−1}
    polarization rows)."""
    lo, hi = spec["orders"]
    s = 1.0 if subset is None else min(1.0, subset / batch)
    if spec["directions"] == "per_order":
        rows = 2 ** hi if multilinear else rows * 2 ** (hi - 1)
    return 1.0 + s * rows / every


def crr_steps(name: str, cfg: BenchConfig, device, log=print) -> List[Dict[str, Any]]:
    """Times of a plain training step and of CRR steps (ours eager, ours captured, the baseline)
    on one setting, interleaved, with the step's floor (:func:`crr_floor`)."""
    import curvrate_fast as cf

    spec = CRR_WORKLOADS[name]
    dtype = getattr(torch, cfg.dtype)
    model, x, y = build_workload(spec["workload"], batch=cfg.batch, dtype=dtype, device=device,
                                 seed=cfg.seed, train=spec["train"])
    subset = spec["subset"]
    if subset is not None and cfg.batch is not None:
        subset = max(1, min(subset, cfg.batch // 2))
    loss_fn = workload(spec["workload"]).loss_fn   # None: per-sample CE
    primitive = bool(spec.get("primitive_ops"))
    lo, hi = spec["orders"]
    kw = dict(loss_fn=loss_fn, orders=(lo, hi), n_dirs=1, directions=spec["directions"],
              order_reduction="mean", subset=subset, scale=spec["scale"])

    def ours_pen(m):
        return cf.crr_penalty(m, x, y, **kw)

    def base_pen(m):
        return _baseline_crr(m, x, y, (lo, hi), spec["directions"], subset, spec["scale"], loss_fn,
                             primitive)

    def make(kind: str, payload):
        """The timed step of one variant: ``kind`` "penalty" (the task loss plus ``payload(model)``,
        None for the plain step), "crrloss" (``payload(model, x, y)``, a CRRLoss) or "train_step"
        (``payload.train_step``, loss, gradients and update in one call)."""
        m = copy.deepcopy(model)  # each variant trains its own copy with its own Adam
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        if kind == "train_step":
            def step_fused():
                payload.train_step(m, x, y, opt)
            return step_fused
        if kind == "crrloss":     # CRRLoss: task loss + penalty in one call
            def step_crit():
                opt.zero_grad(set_to_none=True)
                payload(m, x, y).backward()
                opt.step()
            return step_crit
        if kind != "penalty":
            raise ValueError(f"unknown CRR step kind {kind!r}")

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y) if loss_fn is None else loss_fn(m(x), y).mean()
            if payload is not None:
                loss = loss + payload(m)
            loss.backward()
            opt.step()
        return step

    # (name, kind of step (see make), what it calls, note)
    variants = [("plain", "penalty", None, "forward, CE, backward, Adam step"),
                ("ours", "penalty", ours_pen, f"curvrate_fast.crr_penalty(directions={spec['directions']!r}) + "
                                              "a separate forward for CE, eager engine"),
                ("ours_crrloss", "crrloss", cf.CRRLoss(**kw), "curvrate_fast.CRRLoss, eager engine (the "
                                                              "penalized samples' CE read off the jet pass)")]
    if cfg.crr_captured:
        variants.append(("captured", "crrloss", cf.CRRLoss(**kw, compile=True),
                         "curvrate_fast.CRRLoss(compile=True): CE + penalty + gradients as one captured, "
                         "inductor-compiled graph (first call reported apart)"))
        variants.append(("captured_step", "train_step", cf.CRRLoss(**kw, compile=True),
                         "curvrate_fast.CRRLoss(compile=True).train_step: CE + penalty + gradients + the "
                         "Adam update as one captured, inductor-compiled graph (first call reported apart)"))
        if device.type == "cuda":
            variants.append(("captured_cudagraphs", "crrloss",
                             cf.CRRLoss(**kw, compile=True, compile_options={"triton.cudagraphs": True}),
                             "the captured program replayed as a CUDA graph "
                             "(compile_options={'triton.cudagraphs': True})"))
    variants.append(("baseline", "penalty", base_pen,
                     f"nested autograd (paper's code), directions={spec['directions']}"
                     + (", LayerNorm/attention in primitive ops" if primitive else "")))
    rows: Dict[str, Dict[str, Any]] = {}
    steps: Dict[str, Callable] = {}
    est: Dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    for vname, kind, payload, note in variants:
        row = {"kind": "crr", "workload": name, "base_workload": spec["workload"],
               "method": vname, "orders": f"{lo}-{hi}", "directions": spec["directions"],
               "subset": subset, "batch": x.shape[0], "note": note, "setting": spec["note"]}
        rows[vname] = row
        try:
            step = make(kind, payload)
            # a captured step's first call captures and compiles; a CUDA-graph one records on a
            # later call, so its warm-up is a call longer still
            # (a captured_step's first call is the optimizer's eager first step, its second captures)
            extra = {"captured": 1, "captured_step": 2, "captured_cudagraphs": 2}.get(vname, 0)
            _, ts = warm_up(step, device, cfg.warmup + extra)
            if extra:
                row["compile_s"] = round(max(ts[:extra]), 2)
            row["warmup_ms"] = [round(t * 1e3, 2) for t in ts]
            steps[vname], est[vname] = step, ts[-1]
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {_clean(str(e))[:300]}"
    for k, t in time_interleaved(steps, device, est_s=est, min_reps=cfg.repeats[0],
                                 max_reps=cfg.repeats[1], budget_s=cfg.budget_s,
                                 max_cell_s=cfg.max_cell_s).items():
        rows[k].update(t)
    if cfg.memory:
        for k, step in steps.items():
            if "error" not in rows[k]:
                rows[k]["peak_mb"] = peak_memory_mb(step, device)
    out = [rows[v[0]] for v in variants]
    plain_ms = rows["plain"].get("median_ms")
    base_ms = rows["baseline"].get("median_ms")
    try:
        R = _stored_rows(model, x, hi)
        from curvrate_fast.jets import multilinear
        ml = spec["directions"] == "per_order" and multilinear.supported(model, x, y, None, hi)
        floor = crr_floor(spec, R, x.shape[0], subset, multilinear=ml)
    except Exception:  # noqa: BLE001 - a model the jets cannot run: no floor
        R, floor = None, None
    for r in out:
        if plain_ms and r.get("median_ms"):
            r["overhead_x"] = r["median_ms"] / plain_ms
            if floor is not None and r["method"] != "plain":
                r["floor_x"] = floor
                r["stored_rows"] = R
                r["vs_floor"] = r["overhead_x"] / floor
        if base_ms and r.get("median_ms") and r["method"] != "plain":
            r["speedup"] = base_ms / r["median_ms"]
        log(_fmt_progress(r))
    return out


# =============================================================================================
# The derivative-step cells
# =============================================================================================

def derivative_group(wname: str, methods: Sequence[str], n_dirs: int, order: int,
                     cfg: BenchConfig, device, ref: Optional[torch.Tensor] = None,
                     skip: Optional[Dict[str, str]] = None
                     ) -> Tuple[List[Dict[str, Any]], Optional[torch.Tensor]]:
    """Measure the derivative step of several methods on one (workload, K, D), interleaved.
    Returns the rows and the baseline's derivatives (the in-run reference). ``skip`` maps a
    method to the reason it is not run (recorded as its error)."""
    skip = skip or {}
    dtype = getattr(torch, cfg.dtype)
    model, x, y = build_workload(wname, batch=cfg.batch, dtype=dtype, device=device, seed=cfg.seed)
    u = make_directions(x, n_dirs)
    rows: Dict[str, Dict[str, Any]] = {}
    steps: Dict[str, Callable] = {}
    est: Dict[str, float] = {}
    outs: Dict[str, torch.Tensor] = {}
    for m in methods:
        row: Dict[str, Any] = {"kind": "deriv", "workload": wname, "method": m, "dirs": n_dirs,
                               "order": order, "batch": x.shape[0], "dtype": cfg.dtype}
        rows[m] = row
        if m in skip:
            row["error"] = row["skipped"] = skip[m]
            continue
        try:
            step = make_step(m, model, x, y, u, order, cfg.compile_backend)
            d, ts = warm_up(step, device, cfg.warmup + (1 if m in ("compile", "jax", *CAPTURED) else 0))
            if m == "compile":
                row["compile_s"] = ts[0]
            elif m in ("jax", *CAPTURED):
                row["capture_s"] = ts[0]
            row["warmup_ms"] = [round(t * 1e3, 2) for t in ts]
            steps[m], est[m], outs[m] = step, ts[-1], d
        except Exception as e:  # noqa: BLE001 - a failing method is a result
            msg = _clean(str(e).strip().splitlines()[0][:300]) if str(e).strip() else ""
            row["error"] = f"{type(e).__name__}: {msg}"
            if m in PEERS and isinstance(e, _skip_error()):
                row["skipped"] = row["error"]
            if os.environ.get("CURVRATE_BENCH_DEBUG"):
                traceback.print_exc()
    if "baseline" in outs:
        ref = outs["baseline"]
    if ref is not None and cfg.check_in_run:
        for m, d in outs.items():
            if m != "baseline":
                rows[m]["rel_err_vs_baseline"] = _rel_err(d.float(), ref.float())
    timings = time_interleaved(steps, device, est_s=est, min_reps=cfg.repeats[0],
                               max_reps=cfg.repeats[1], budget_s=cfg.budget_s,
                               max_cell_s=cfg.max_cell_s)
    for m, t in timings.items():
        rows[m].update(t)
    jx = rows.get("jax", {}).get("median_ms")
    if jx:
        for m, r in rows.items():
            if r.get("median_ms") and m != "jax":
                r["vs_jax"] = jx / r["median_ms"]
    if cfg.memory:
        for m, step in steps.items():
            if "error" in rows[m]:
                continue
            try:
                rows[m]["peak_mb"] = peak_memory_mb(step, device)
            except Exception:  # noqa: BLE001
                rows[m]["peak_mb"] = None
    del steps
    _malloc_trim()
    return [rows[m] for m in methods], ref


def _compile_subprocess(wname, n_dirs, order, cfg: BenchConfig, device,
                        ref: Optional[torch.Tensor]) -> Dict[str, Any]:
    """The torch.compile cell in a fresh interpreter with a timeout, timed interleaved with the
    reference rules there (its speedup vs the baseline is then chained through them)."""
    import tempfile
    base_row = {"kind": "deriv", "workload": wname, "method": "compile", "dirs": n_dirs,
                "order": order, "dtype": cfg.dtype}
    spec = {"workload": wname, "dirs": n_dirs, "order": order,
            "config": {**asdict(cfg), "log": False}, "device": str(device)}
    with tempfile.TemporaryDirectory() as td:
        out_path = os.path.join(td, "rows.json")
        if ref is not None:
            spec["ref"] = os.path.join(td, "ref.pt")
            torch.save(ref.cpu(), spec["ref"])
        spec["out"] = out_path
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_cell",
                                   json.dumps(spec)], env=env, capture_output=True, text=True,
                                  timeout=cfg.compile_timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {**base_row, "error": f"timeout: not done after {cfg.compile_timeout_s:.0f} s "
                                         "(compile + warm-up + repeats) in a subprocess"}
        if not os.path.exists(out_path):
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return {**base_row, "error": f"subprocess exited {proc.returncode}: "
                                         f"{' | '.join(tail)[:300]}"}
        with open(out_path) as f:
            sub = {r["method"]: r for r in json.load(f)}
    row = sub["compile"]
    row["subprocess_s"] = round(time.perf_counter() - t0, 1)
    r = sub.get("reference", {})
    if "median_ms" in row and "median_ms" in r:
        row["speedup_vs_reference"] = r["median_ms"] / row["median_ms"]
    return row


def _run_cell_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    c = spec["config"]
    c["repeats"] = tuple(c["repeats"])
    cfg = BenchConfig(**c)
    device = torch.device(spec["device"])
    ref = torch.load(spec["ref"]).to(device) if spec.get("ref") else None
    import warnings
    warnings.filterwarnings("ignore")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with retained_heap(cfg.retain_heap and device.type == "cpu"):
        rows, _ = derivative_group(spec["workload"], ["reference", "compile"], spec["dirs"],
                                   spec["order"], cfg, device, ref)
    with open(spec["out"], "w") as f:
        json.dump(rows, f)
    return 0


def _fmt_progress(r: Dict[str, Any]) -> str:
    head = f"  {r['workload']:14s} {r['method']:12s}"
    if r["kind"] == "deriv":
        head += f" D={r['dirs']} K={r['order']}"
    if "error" in r:
        return head + "  ERROR " + r["error"][:160]
    s = f"{head}  {r['median_ms']:10.2f} ms  [{r['q1_ms']:.2f}, {r['q3_ms']:.2f}]"
    if r.get("reps") is not None:
        s += f"  n={r['reps']}"
    if r.get("peak_mb") is not None:
        s += f"  peak {r['peak_mb']:.0f} MiB"
    if r.get("rel_err_vs_baseline") is not None:
        s += f"  err {r['rel_err_vs_baseline']:.1e}"
    return s


def run(config: Any = None) -> List[Dict[str, Any]]:
    """Run the suite; returns one dict per measured cell (``kind`` "deriv", "crr" or "check").

    ``config`` is a :class:`BenchConfig` or a dict of its fields. Derivative rows carry
    ``median_ms``, ``q1_ms``, ``q3_ms``, ``reps``, ``peak_mb``, ``speedup`` (baseline median /
    this median), ``rel_err_vs_baseline`` or ``error``."""
    cfg = BenchConfig.from_any(config)
    for w in cfg.workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; choose from {list(WORKLOADS)}")
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}")
    for w in cfg.crr_workloads:
        if w not in CRR_WORKLOADS:
            raise ValueError(f"unknown CRR workload {w!r}; choose from {list(CRR_WORKLOADS)}")
    log = print if cfg.log else (lambda *a, **k: None)
    device = resolve_device(cfg.device)
    if cfg.prefault_gib > 0 and device.type == "cpu":
        log(f"prefault {cfg.prefault_gib:g} GiB: {prefault(cfg.prefault_gib):.1f} s")
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    old_mask = pin_to_one_cpu() if cfg.threads == 1 and device.type == "cpu" else None
    pinned = []
    if old_mask is not None:
        text = (f"process pinned to CPU {min(os.sched_getaffinity(0))}: every method, XLA's thread "
                f"pool included, runs on one core")
        log(text)
        pinned = [{"kind": "info", "what": "cpu pinning", "text": text}]
    try:
        with retained_heap(cfg.retain_heap and device.type == "cpu"):
            return pinned + _run(cfg, device, log)
    finally:
        torch.set_num_threads(old_threads)
        if old_mask is not None:
            os.sched_setaffinity(0, old_mask)


def pin_to_one_cpu() -> Optional[set]:
    """Pin this process to one of its CPUs and return the previous mask (None where the OS has no
    affinity call). One torch thread is not one core for every peer: XLA sizes its thread pool from
    the CPUs it may run on and ignores the ``--xla_cpu_multi_thread_eigen`` flags of older JAX
    versions (measured: 1.7 cores busy for a jitted matmul with those flags set), so a
    one-thread comparison pins the whole process before JAX is first imported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    old = os.sched_getaffinity(0)
    if len(old) <= 1:
        return None
    os.sched_setaffinity(0, {min(old)})
    return old


def gemm_rates(shapes=((640, 512, 512), (640, 64, 64)), seconds: float = 0.3) -> Dict[str, Any]:
    """An info row: float32 GFLOP/s of ``torch.mm`` and of the kernels ``curvrate_fast.cpu_gemm``
    may put in its place (oneDNN's GEMM, the AVX-512 kernel where built) on m×k·k×n products
    (default: the MLP 784's 5·128 coefficient rows through its 512×512 layer, the tiny MLP's
    through its 64×64 one), best of interleaved timings, with this run's thread count."""
    from curvrate_fast import cpu_gemm
    fns = {"torch.mm": torch.mm}
    fns.update({k.label: k.op() for k in cpu_gemm.KERNELS.values() if k.available()})
    rates: Dict[str, Dict[str, float]] = {}
    texts = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        best = {name: float("inf") for name in fns}
        for f in fns.values():   # warm-up
            f(a, b)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            for name, f in fns.items():
                t0 = time.perf_counter()
                f(a, b)
                best[name] = min(best[name], time.perf_counter() - t0)
        shape = f"{m}×{k}·{k}×{n}"
        rates[shape] = {name: round(2 * m * k * n / t / 1e9, 1) for name, t in best.items()}
        texts.append(shape + ": " + ", ".join(f"{name} {r:g}" for name, r in rates[shape].items()))
    text = f"float32 GEMM GFLOP/s, {torch.get_num_threads()} thread(s): " + "; ".join(texts)
    return {"kind": "info", "what": "gemm rates", "gflops": rates, "text": text}


def _run(cfg: BenchConfig, device, log) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    import warnings
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")

    methods_all = list(cfg.methods)
    if device.type != "cpu" and "cpp" in methods_all:
        methods_all.remove("cpp")
        log("note: method 'cpp' skipped (CPU only)")
    if methods_all != list(cfg.methods):
        cfg = copy.copy(cfg)
        cfg.methods = methods_all
    if device.type == "cpu":
        info = {"kind": "info", "what": "auto backend on CPU"}
        try:
            from curvrate_fast import cpp_backend
            if "cpp" in cfg.methods and not cpp_backend.available():
                t0 = time.perf_counter()
                cpp_backend.build()
                info["cpp_build_s"] = round(time.perf_counter() - t0, 1)
            info["cpp_loaded"] = bool(cpp_backend.available())
        except Exception as e:  # noqa: BLE001
            info["cpp_loaded"] = False
            info["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if info["cpp_loaded"]:
            from curvrate_fast import cpu_gemm
            info["avx512_gemm"] = cpu_gemm.avx512_available()
        info["text"] = ("backend='auto' runs the C++ activation kernels (cpp) on CPU"
                        + ("; the AVX-512 GEMM (csrc/cpu_gemm.cpp) is a candidate of cpu_gemm='auto'"
                           if info.get("avx512_gemm") else "; no AVX-512 GEMM here")
                        if info["cpp_loaded"] else
                        "backend='auto' runs the pure-PyTorch reference rules on CPU (C++ kernels "
                        "not built)" + (f": {info['error']}" if "error" in info else ""))
        log("note: " + info["text"])
        rows.append(info)
        if cfg.dtype == "float32" and any(m in CAPTURED for m in cfg.methods):
            rates = gemm_rates()
            log("note: " + rates["text"])
            rows.append(rates)

    if cfg.check:
        log("correctness (float64, batch 4, 2 directions, order "
            f"{max(cfg.orders)}, vs nested autograd):")
        for rec in check_methods(cfg.workloads, cfg.methods, order=max(cfg.orders), device=device,
                                 log=log):
            rows.append({"kind": "check", **rec})

    log(f"derivative steps ({cfg.dtype}, device {device}; methods interleaved):")
    limit = cfg.mem_limit_gib
    if limit is None and device.type == "cpu":
        avail = mem_available_gib()
        limit = avail / 2 if avail else None
    peaks: Dict[Tuple[str, int, str], Tuple[int, float]] = {}  # smallest-D peak per method
    for wname in cfg.workloads:
        for order in cfg.orders:
            for n_dirs in sorted(cfg.dirs):
                methods = [m for m in cfg.methods if m != "compile"]
                if "baseline" in methods:  # first: its d is the in-run reference
                    methods.remove("baseline")
                    methods.insert(0, "baseline")
                isolate = "compile" in cfg.methods and cfg.isolate_compile
                if "compile" in cfg.methods and not isolate:
                    methods.append("compile")
                skip = {}
                if limit is not None and device.type == "cpu":
                    for m in methods:
                        if (wname, order, m) in peaks:
                            d0, p0 = peaks[(wname, order, m)]
                            pred = p0 * n_dirs / d0 / 1024
                            if n_dirs > d0 and pred > limit:
                                skip[m] = (f"skipped: predicted peak ≈ {pred:.1f} GiB (the D={d0} "
                                           f"peak × {n_dirs}/{d0}) exceeds the memory limit "
                                           f"{limit:.1f} GiB (--mem-limit-gib)")
                group, ref = derivative_group(wname, methods, n_dirs, order, cfg, device,
                                              skip=skip)
                for r in group:
                    if r.get("peak_mb") and (wname, order, r["method"]) not in peaks:
                        peaks[(wname, order, r["method"])] = (n_dirs, r["peak_mb"])
                if isolate:
                    crow = _compile_subprocess(wname, n_dirs, order, cfg, device, ref)
                    group.append(crow)
                base = next((r for r in group if r["method"] == "baseline" and "median_ms" in r),
                            None)
                refr = next((r for r in group if r["method"] == "reference"
                             and "median_ms" in r), None)
                for r in group:
                    if base is None or "median_ms" not in r:
                        continue
                    if r["method"] == "compile" and isolate:
                        if refr is not None and r.get("speedup_vs_reference") is not None:
                            r["speedup"] = (base["median_ms"] / refr["median_ms"]
                                            * r["speedup_vs_reference"])
                            r["speedup_note"] = "chained: baseline/reference here × " \
                                                "reference/compile in the subprocess"
                    else:
                        r["speedup"] = base["median_ms"] / r["median_ms"]
                for r in group:
                    log(_fmt_progress(r))
                rows.extend(group)

    if cfg.crr and cfg.crr_workloads:
        log("CRR training steps (forward, CE, penalty, backward, Adam step; interleaved):")
        for name in cfg.crr_workloads:
            rows.extend(crr_steps(name, cfg, device, log=log))
    return rows


# =============================================================================================
# Reports
# =============================================================================================

def _f(v, fmt="{:.2f}", na="–"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return na
    return fmt.format(v)


def load_lines(env: Dict[str, Any]) -> List[str]:
    """The report line of the load average the run started under (none where it was not read)."""
    load = env.get("loadavg_at_start")
    return [] if load is None else [f"- load average at start: {', '.join(f'{v:.2f}' for v in load)}"]


def format_markdown(rows: List[Dict[str, Any]], env: Dict[str, Any],
                    cfg: Optional[BenchConfig] = None) -> str:
    L: List[str] = []
    L.append("# curvrate-fast benchmark")
    L.append("")
    L.append(f"- device: {env['device']}")
    L.append(f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}")
    L.append(f"- commit {env['commit']}, date {env['date']}")
    L.extend(load_lines(env))
    if cfg is not None:
        L.append(f"- dtype {cfg.dtype}; repeats {cfg.repeats[0]}–{cfg.repeats[1]} per cell within "
                 f"{cfg.budget_s:g} s, warm-up {cfg.warmup}{' (quick mode)' if cfg.quick else ''}")
    timer = "triton.testing.do_bench" if env["device_type"] == "cuda" else "wall-clock"
    mem = ("torch.cuda.max_memory_allocated − allocated before" if env["device_type"] == "cuda"
           else "growth of the process RSS high-water mark over one step (approximate)")
    L.append(f"- time: median of {timer}, IQR = [q1, q3]; peak memory: {mem}")
    if env.get("threads") is not None:
        L.append(f"- torch threads: {env['threads']}")
    for r in rows:
        if r["kind"] == "info":
            L.append(f"- {r['text']}")
    if env.get("wall_s") is not None:
        L.append(f"- whole run: {env['wall_s']} s")
    L.append("")

    checks = [r for r in rows if r["kind"] == "check"]
    if checks:
        L.append("## Correctness (float64, vs nested autograd)")
        L.append("")
        L.append("| workload | method | max rel. err d_n | max rel. err ∂mean\\|d\\|/∂θ | ok |")
        L.append("|---|---|---|---|---|")
        for r in checks:
            if r.get("skipped"):
                L.append(f"| {r['workload']} | {r['method']} | skipped: {r['skipped'][:160]} | | – |")
            elif "error" in r:
                L.append(f"| {r['workload']} | {r['method']} | error: {r['error'][:120]} | | ✗ |")
            else:
                L.append(f"| {r['workload']} | {r['method']} | {r['deriv_rel_err']:.1e} | "
                         f"{r['grad_rel_err']:.1e} | {'✓' if r['ok'] else '✗ MISMATCH'} |")
        L.append("")

    deriv = [r for r in rows if r["kind"] == "deriv"]
    if deriv:
        L.append("## Derivative step: d_1..d_K per sample + backward of mean|d| to the parameters")
        L.append("")
        L.append("speedup = baseline median / method median (> 1: faster than nested autograd)")
        L.append("")
        L.append("| workload | K | dirs | method | median ms | IQR ms | min ms | n | speedup | vs jax | "
                 "peak MiB | rel. err vs baseline | note |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in deriv:
            note = r.get("error", "")
            if r.get("compile_s") is not None:
                note = f"compile+1st call {r['compile_s']:.1f} s"
                if r.get("speedup_note"):
                    note += "; speedup chained via the reference rules"
                if r.get("compile_note"):
                    note += "; " + r["compile_note"]
            if r.get("topped_up"):
                note = (note + "; " if note else "") + f"wide IQR: +{r['topped_up']} rounds"
            if r.get("capture_s") is not None:
                note = (note + "; " if note else "") + f"capture+compile+1st call {r['capture_s']:.1f} s"
            if "error" in r:
                L.append(f"| {r['workload']} | {r['order']} | {r['dirs']} | {r['method']} | – | – "
                         f"| – | – | – | – | – | – | {note.replace('|', '/')[:200]} |")
                continue
            L.append(f"| {r['workload']} | {r['order']} | {r['dirs']} | {r['method']} | "
                     f"{r['median_ms']:.2f} | {r['q1_ms']:.2f}–{r['q3_ms']:.2f} | "
                     f"{_f(r.get('min_ms'))} | "
                     f"{_f(r.get('reps'), '{}')} | {_f(r.get('speedup'), '{:.2f}×')} | "
                     f"{_f(r.get('vs_jax'), '{:.2f}×')} | "
                     f"{_f(r.get('peak_mb'), '{:.0f}', 'n/a')} | "
                     f"{_f(r.get('rel_err_vs_baseline'), '{:.1e}')} | {note} |")
        L.append("")
        L.append("vs jax = jax median / this median (> 1: faster than JAX's jet under jit)")
        L.append("")

    crr = [r for r in rows if r["kind"] == "crr"]
    if crr:
        L.append("## CRR training step overhead")
        L.append("")
        L.append("overhead = step time / plain step time; speedup = baseline CRR step / this step; "
                 "floor = 1 + s·R/k plain steps (s the penalized fraction, R the coefficient rows per sample: "
                 "the stored rows, for per-order directions the 2^N components of a multilinear jet where "
                 "the model has their rules, else × 2^{N−1} polarization rows; k the period; "
                 "docs/design.md §6); vs floor = overhead / floor")
        L.append("")
        L.append("| setting | step | orders | directions | subset | median ms | IQR ms | n | "
                 "overhead vs plain | speedup vs baseline CRR | floor | vs floor | peak MiB | note |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in crr:
            if "error" in r:
                L.append(f"| {r['workload']} | {r['method']} | {r['orders']} | {r['directions']} | "
                         f"{_f(r['subset'], '{}', 'all')} | – | – | – | – | – | – | – | – | "
                         f"{r['error'][:200]} |")
                continue
            ov = r.get("overhead_x")
            ov_s = "1.00×" if r["method"] == "plain" else (
                f"{ov:.2f}× (+{(ov - 1) * 100:.0f} %)" if ov is not None else "–")
            L.append(f"| {r['workload']} | {r['method']} | {r['orders']} | {r['directions']} | "
                     f"{_f(r['subset'], '{}', 'all')} | {r['median_ms']:.2f} | "
                     f"{r['q1_ms']:.2f}–{r['q3_ms']:.2f} | {_f(r.get('reps'), '{}')} | {ov_s} | "
                     f"{_f(r.get('speedup'), '{:.2f}×') if r['method'] != 'plain' else ''} | "
                     f"{_f(r.get('floor_x'), '{:.1f}', '') if r['method'] != 'plain' else ''} | "
                     f"{_f(r.get('vs_floor'), '{:.2f}×', '') if r['method'] != 'plain' else ''} | "
                     f"{_f(r.get('peak_mb'), '{:.0f}', 'n/a')} | {r['note']}"
                     f"{'; capture+compile+1st call %.1f s' % r['compile_s'] if r.get('compile_s') else ''} |")
        L.append("")
        settings = {r["workload"]: r["setting"] for r in crr}
        for k, v in settings.items():
            L.append(f"- {k}: {v}")
        L.append("")
    tg = targets(rows)
    if tg:
        L.append("## Targets (issue 10), from this run")
        L.append("")
        L.append("| target | measured | met |")
        L.append("|---|---|---|")
        for t in tg:
            L.append(f"| {t['target']} | {t['measured']} | {t['met']} |")
        L.append("")
    L.append("Methods: " + "; ".join(f"`{k}`: {v}" for k, v in METHOD_DOC.items()))
    L.append("")
    return "\n".join(L)


def targets(rows: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    """The issue's targets, read off the rows of this run (what could be measured)."""
    out: List[Dict[str, str]] = []

    def med(kind, wl, method, **kw):
        for r in rows:
            if r["kind"] == kind and r["workload"] == wl and r["method"] == method and "median_ms" in r \
                    and all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    def add(target, num, den, need, what, invert=False):
        if den is None:          # the captured row is what the targets are about: none, no target
            return
        if num is None:
            out.append({"target": target, "measured": f"not measured ({what} missing in this run)",
                        "met": "–"})
            return
        ratio = num["median_ms"] / den["median_ms"]
        if invert:
            ratio = 1.0 / ratio
        measured = f"{ratio:.2f}× ({num['median_ms']:.2f} vs {den['median_ms']:.2f} ms)"
        met = ratio >= need
        # a ratio of medians alone can come from one side's interference in the interleaved run
        # (a peer whose times are bimodal: JAX's ranged 0.43–0.9 ms in one run, 0.39 ms stable in
        # another); a target is met only if the ratio of the best times agrees
        if num.get("min_ms") and den.get("min_ms"):
            best = num["min_ms"] / den["min_ms"]
            if invert:
                best = 1.0 / best
            measured += f"; best times {best:.2f}× ({num['min_ms']:.2f} vs {den['min_ms']:.2f} ms)"
            met = met and best >= need
        out.append({"target": target, "measured": measured, "met": "yes" if met else "no"})

    b = med("crr", "two_moons_crr", "baseline")
    c = med("crr", "two_moons_crr", "captured")
    add("Two Moons CRR step ≥ 3× nested autograd (captured)", b, c, 3.0, "baseline")
    add("Two Moons CRR step ≥ 3× nested autograd (captured training step: loss, gradients and "
        "Adam in one graph)", b, med("crr", "two_moons_crr", "captured_step"), 3.0, "baseline")
    add("Two Moons CRR step ≥ 3× nested autograd (captured, CUDA-graph replay)", b,
        med("crr", "two_moons_crr", "captured_cudagraphs"), 3.0, "baseline")
    for wl, label in (("two_moons", "tiny MLP 2→64→64→2"), ("mlp784", "MLP 784→512→512→10")):
        cap = med("deriv", wl, "captured", dirs=1, order=4)
        for peer, pname in (("jax", "JAX jit"), ("torch_jet", "torch-jet's graph")):
            p = med("deriv", wl, peer, dirs=1, order=4)
            skipped = next((r for r in rows if r["kind"] == "deriv" and r["workload"] == wl
                            and r["method"] == peer and r.get("error")), None)
            if cap is None:
                continue
            if p is None and skipped is not None:
                out.append({"target": f"{label}, K=4 + backward ≥ 1.5× {pname}",
                            "measured": "not measured: " + skipped["error"][:120], "met": "–"})
            else:
                add(f"{label}, K=4 + backward ≥ 1.5× {pname}", p, cap, 1.5, peer)
    for setting in ("gelu_cnn_crr", "lm_crr"):
        r = med("crr", setting, "captured")
        if r is not None and r.get("vs_floor") is not None:
            out.append({"target": f"{setting}: CRR step ≤ 1.5× its floor (captured)",
                        "measured": f"{r['vs_floor']:.2f}× the floor ({r['overhead_x']:.2f} plain steps, "
                                    f"floor {r['floor_x']:.1f})",
                        "met": "yes" if r["vs_floor"] <= 1.5 else "no"})
    return out


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A compact plain-text summary (printed at the end of a run)."""
    out = []
    deriv = [r for r in rows if r["kind"] == "deriv"]
    if deriv:
        out.append(f"{'workload':12s} {'K':>2s} {'D':>2s} {'method':10s} {'median ms':>10s} "
                   f"{'IQR ms':>17s} {'speedup':>8s} {'peak MiB':>9s}")
        for r in deriv:
            if "error" in r:
                out.append(f"{r['workload']:12s} {r['order']:2d} {r['dirs']:2d} {r['method']:10s} "
                           f"ERROR {r['error'][:70]}")
                continue
            out.append(f"{r['workload']:12s} {r['order']:2d} {r['dirs']:2d} {r['method']:10s} "
                       f"{r['median_ms']:10.2f} {r['q1_ms']:8.2f}–{r['q3_ms']:8.2f} "
                       f"{_f(r.get('speedup'), '{:.2f}x'):>8s} "
                       f"{_f(r.get('peak_mb'), '{:.0f}', 'n/a'):>9s}")
    crr = [r for r in rows if r["kind"] == "crr"]
    if crr:
        out.append("")
        out.append(f"{'CRR setting':14s} {'step':12s} {'median ms':>10s} {'overhead':>9s} "
                   f"{'vs base':>8s}")
        for r in crr:
            if "error" in r:
                out.append(f"{r['workload']:14s} {r['method']:12s} ERROR {r['error'][:70]}")
                continue
            out.append(f"{r['workload']:14s} {r['method']:12s} {r['median_ms']:10.2f} "
                       f"{_f(r.get('overhead_x'), '{:.2f}x'):>9s} "
                       f"{_f(r.get('speedup'), '{:.2f}x') if r['method'] != 'plain' else '':>8s}")
    bad = [r for r in rows if r["kind"] == "check" and not r.get("ok") and not r.get("skipped")]
    if bad:
        out.append("")
        out.append("CORRECTNESS MISMATCHES: " + ", ".join(f"{r['workload']}/{r['method']}"
                                                          for r in bad))
    return "\n".join(out)


def _slug(s: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in s.lower())
    while "--" in keep:
        keep = keep.replace("--", "-")
    return keep.strip("-")[:40]


def save_results(rows, env, cfg: BenchConfig, out_dir: str, tag: str = "") -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    dev = "cpu" if env["device_type"] == "cpu" else _slug(env["device"])
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"bench_{dev}_{stamp}" + (f"_{_slug(tag)}" if tag else "") + ("_quick" if cfg.quick else "")
    jpath = os.path.join(out_dir, base + ".json")
    mpath = os.path.join(out_dir, base + ".md")
    cfg_d = asdict(cfg)
    with open(jpath, "w") as f:
        json.dump({"meta": env, "config": cfg_d, "rows": rows}, f, indent=1, default=str)
    with open(mpath, "w") as f:
        f.write(format_markdown(rows, env, cfg))
    return jpath, mpath


#: row fields a curated summary keeps (timings as numbers, no per-repeat lists, no paths)
_SUMMARY_FIELDS = ("kind", "workload", "method", "dirs", "order", "batch", "dtype", "median_ms", "q1_ms", "q3_ms",
                   "min_ms", "reps", "speedup", "vs_jax", "peak_mb", "rel_err_vs_baseline", "deriv_rel_err",
                   "grad_rel_err", "ok", "skipped", "error", "compile_s", "capture_s", "orders",
                   "directions", "subset", "overhead_x", "floor_x", "stored_rows", "vs_floor", "note",
                   "setting", "text")
_SUMMARY_META = ("device", "device_type", "torch", "triton", "jax", "python", "commit", "date", "os",
                 "loadavg_at_start", "loadavg_at_end", "threads", "wall_s")


def write_summary(rows, env, cfg: BenchConfig, name: str, out_dir: str = RESULTS,
                  command: Optional[str] = None) -> Tuple[str, str]:
    """The curated summary of a run, to be committed and cited: ``<name>.md`` (the tables) and
    ``<name>.json`` (the rows' numbers, the device, the versions, the commit and the date); no
    host name, no path, no per-repeat times (those stay in the raw results)."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"summary name must be a plain file name, got {name!r}")
    os.makedirs(out_dir, exist_ok=True)
    meta = {k: env.get(k) for k in _SUMMARY_META if k in env}
    if command:
        meta["command"] = command
    keep = []
    for r in rows:
        rr = {k: r[k] for k in _SUMMARY_FIELDS if k in r}
        for k in ("error", "skipped", "note", "text"):
            if isinstance(rr.get(k), str):
                rr[k] = _clean(rr[k])
        for k, v in list(rr.items()):
            if isinstance(v, float):
                rr[k] = float(f"{v:.4g}")
        keep.append(rr)
    jpath = os.path.join(out_dir, name + ".json")
    mpath = os.path.join(out_dir, name + ".md")
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "rows": keep}, f, indent=1)
    md = format_markdown(rows, env, cfg)
    if command:
        md = md.replace("\n\n", f"\n\n- command: `{command}`\n", 1)
    with open(mpath, "w") as f:
        f.write(_clean(md))
    return jpath, mpath


# =============================================================================================
# Profile (where our engine spends its time)
# =============================================================================================

_GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
             "aten::mkldnn_convolution", "aten::convolution", "aten::_convolution",
             "aten::convolution_backward", "aten::linear"}
_COPY_OPS = {"aten::cat", "aten::copy_", "aten::stack", "aten::clone", "aten::contiguous",
             "aten::index_select", "aten::gather", "aten::fill_", "aten::zero_", "aten::zeros",
             "aten::empty", "aten::empty_strided", "aten::expand", "aten::_to_copy"}


def profile_ours(workload: str = "mlp784", n_dirs: int = 1, order: int = 4, *, method: str = "ours",
                 device: str = "auto", row_limit: int = 20, batch: Optional[int] = None,
                 steps: int = 5, python_profile: bool = True) -> str:
    """Where one step's time goes: wall time per step, the share of GEMM/conv, copy/cat and other
    ATen ops in the profiler's self time, the torch.profiler top-ops table and (CPU) the cProfile
    top Python functions by own time (engine dispatch overhead)."""
    from torch.profiler import ProfilerActivity, profile
    dev = resolve_device(device)
    backend_note = ""
    if dev.type == "cpu" and method == "ours":  # as in run(): auto = the C++ kernels when buildable
        try:
            from curvrate_fast import cpp_backend
            cpp_backend.build()
            backend_note = "backend='auto' on CPU: C++ activation kernels loaded\n"
        except Exception as e:  # noqa: BLE001
            backend_note = f"backend='auto' on CPU: reference rules (C++ kernels: {e})\n"
    model, x, y = build_workload(workload, batch=batch, device=dev)
    u = make_directions(x, n_dirs)
    step = make_step(method, model, x, y, u, order)
    for _ in range(3):
        step()
    _sync(dev)
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(dev)
        walls.append(time.perf_counter() - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(steps):
            step()
        _sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    avgs = prof.key_averages()
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    tot = {"gemm/conv": 0.0, "copy/cat/fill": 0.0, "other aten (elementwise, reductions)": 0.0}
    n_ops = 0
    for e in avgs:
        if not e.key.startswith("aten::"):
            continue
        t = float(getattr(e, attr, 0.0) or 0.0)
        n_ops += e.count
        if e.key in _GEMM_OPS:
            tot["gemm/conv"] += t
        elif e.key in _COPY_OPS:
            tot["copy/cat/fill"] += t
        else:
            tot["other aten (elementwise, reductions)"] += t
    aten_total = sum(tot.values())
    wall_med = statistics.median(walls)
    lines = [backend_note + f"wall time per step (median of {steps}, unprofiled): "
             f"{wall_med * 1e3:.2f} ms",
             f"ATen self time per step (profiled run, includes profiler overhead): "
             f"{aten_total / steps / 1e3:.2f} ms ({n_ops / steps:.0f} ATen op calls per step)"]
    for k, v in tot.items():
        lines.append(f"  {k}: {v / steps / 1e3:.2f} ms/step ({100 * v / max(aten_total, 1e-9):.0f} % "
                     "of ATen time)")
    text = "\n".join(lines) + "\n\n" + avgs.table(sort_by=key, row_limit=row_limit)
    if python_profile and dev.type == "cpu":
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            step()
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(15)
        keep = [ln for ln in buf.getvalue().splitlines() if ln.strip()][:28]
        text += "\n\ncProfile, top Python functions by own time (" + str(steps) + " steps):\n" + \
            "\n".join(keep)
    return text


# =============================================================================================
# CLI
# =============================================================================================

def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _names(s: str) -> List[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="curvrate-fast bench",
        description="Benchmark the derivative step (d_1..d_K + backward of mean|d|) and the CRR "
                    "training overhead: ours vs nested autograd, torch.func jvp, reference rules, "
                    "torch.compile. Writes JSON + markdown to --out-dir.")
    p.add_argument("--quick", action="store_true",
                   help="small smoke run (two_moons + mlp784, no compile, 1–3 repeats; < 60 s)")
    p.add_argument("--workloads", type=_names, default=None,
                   help=f"comma list from {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--methods", type=_names, default=None,
                   help=f"comma list from {','.join(METHODS)} (default: all)")
    p.add_argument("--dirs", type=_ints, default=None, help="directions per sample (default 1,5)")
    p.add_argument("--orders", type=_ints, default=None,
                   help="highest derivative order(s) K (default 4: orders 1..4 in one step)")
    p.add_argument("--batch", type=int, default=None, help="override every workload's batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--min-repeats", type=int, default=None)
    p.add_argument("--max-repeats", type=int, default=None)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repeats per cell (CPU; default 3)")
    p.add_argument("--crr", dest="crr", action="store_true", default=None,
                   help="include the CRR training-step rows (default on)")
    p.add_argument("--no-crr", dest="crr", action="store_false")
    p.add_argument("--crr-workloads", type=_names, default=None,
                   help=f"comma list from {','.join(CRR_WORKLOADS)}")
    p.add_argument("--no-check", action="store_true", help="skip the float64 correctness check")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--prefault-gib", type=float, default=None,
                   help="CPU: touch this many GiB once before measuring (lazily-backed VMs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    p.add_argument("--max-cell", type=float, default=None,
                   help="seconds a slow method may spend in timed repeats of one cell (default 30)")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="CPU: skip cells whose predicted peak (from the smallest D) exceeds this "
                        "(default: half the available memory)")
    p.add_argument("--no-retain-heap", action="store_true",
                   help="CPU: let glibc return freed memory to the OS between steps")
    p.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds allowed to a torch.compile cell (default 300)")
    p.add_argument("--no-isolate-compile", action="store_true",
                   help="run torch.compile cells in this process (no timeout)")
    p.add_argument("--out-dir", default=RAW,
                   help="where the raw JSON and markdown go (default bench/results/raw/, ignored by git)")
    p.add_argument("--summary", default=None, metavar="NAME",
                   help="also write the curated summary bench/results/NAME.{md,json} (device, versions, "
                        "commit, date; no host, no paths): what the README cites")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    p.add_argument("--profile", action="store_true",
                   help="print (and save) a torch.profiler table of our step on mlp784 and exit")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="re-render the markdown next to a saved JSON result and exit")
    p.add_argument("--_cell", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """The ``bench`` command: run the suite, print a summary, save JSON + markdown. Returns 0, or 1
    if a correctness check failed."""
    args = build_parser().parse_args(argv)
    if args._cell is not None:
        return _run_cell_main(args._cell)
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        c = data.get("config", {})
        c["repeats"] = tuple(c.get("repeats", (3, 20)))
        cfg_r = BenchConfig(**{k: v for k, v in c.items() if k in {f.name for f in fields(BenchConfig)}})
        md = format_markdown(data["rows"], data["meta"], cfg_r)
        out = os.path.splitext(args.render)[0] + ".md"
        with open(out, "w") as f:
            f.write(md)
        print(f"rendered {out}")
        return 0
    if args.profile:
        if args.threads:
            torch.set_num_threads(args.threads)
        wl = (args.workloads or ["mlp784"])[0]
        parts = []
        for d in (args.dirs or [1, 5]):
            for m in (args.methods or ["ours"]):
                parts.append(f"### {wl}, method {m}, {d} direction(s), K={(args.orders or [4])[0]}"
                             f", {torch.get_num_threads()} torch thread(s), 5 steps\n\n```\n"
                             + profile_ours(wl, d, (args.orders or [4])[0], method=m,
                                            device=args.device, batch=args.batch) + "\n```\n")
        env = environment(resolve_device(args.device))
        text = (f"# Profile of one derivative step\n\n{env['device']}, torch {env['torch']}, "
                f"commit {env['commit']}, {env['date']}\n\n" + "\n".join(parts))
        print(text)
        if not args.no_save:
            os.makedirs(args.out_dir, exist_ok=True)
            dev = resolve_device(args.device)
            path = os.path.join(args.out_dir, f"profile_{wl}_{dev.type}_"
                                f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.md")
            with open(path, "w") as f:
                f.write(text)
            print(f"saved {path}")
        return 0

    cfg = BenchConfig()
    if args.quick:
        cfg.apply_quick(keep_workloads=args.workloads is not None)
    if args.workloads is not None:
        cfg.workloads = args.workloads
    if args.methods is not None:
        cfg.methods = args.methods
    if args.dirs is not None:
        cfg.dirs = args.dirs
    if args.orders is not None:
        cfg.orders = args.orders
    cfg.batch = args.batch
    cfg.device = args.device
    cfg.dtype = args.dtype
    lo, hi = cfg.repeats
    cfg.repeats = (args.min_repeats if args.min_repeats is not None else lo,
                   args.max_repeats if args.max_repeats is not None else hi)
    if args.budget is not None:
        cfg.budget_s = args.budget
    if args.crr is not None:
        cfg.crr = args.crr
    if args.crr_workloads is not None:
        cfg.crr_workloads = args.crr_workloads
    cfg.check = not args.no_check
    cfg.memory = not args.no_memory
    if args.prefault_gib is not None:
        cfg.prefault_gib = args.prefault_gib
    cfg.retain_heap = not args.no_retain_heap
    if args.threads is not None:
        cfg.threads = args.threads
    if args.mem_limit_gib is not None:
        cfg.mem_limit_gib = args.mem_limit_gib
    if args.max_cell is not None:
        cfg.max_cell_s = args.max_cell
    if args.compile_timeout is not None:
        cfg.compile_timeout_s = args.compile_timeout
    cfg.isolate_compile = not args.no_isolate_compile
    cfg.log = not args.quiet

    device = resolve_device(cfg.device)
    env = environment(device)
    if cfg.log:
        print(f"curvrate-fast bench on {env['device']}, {cfg.threads or torch.get_num_threads()} "
              f"torch thread(s) (torch {env['torch']}, triton {env['triton']}, commit "
              f"{env['commit']})")
    env["threads"] = cfg.threads or torch.get_num_threads()
    t0 = time.perf_counter()
    rows = run(cfg)
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    try:
        env["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    print()
    print(format_table(rows))
    if args.summary:
        cmd = "python bench/bench_suite.py " + " ".join(argv if argv is not None else sys.argv[1:])
        jpath, mpath = write_summary(rows, env, cfg, args.summary, command=_clean(cmd))
        print(f"\nsummary {jpath}\n        {mpath}")
    if not args.no_save:
        jpath, mpath = save_results(rows, env, cfg, args.out_dir, args.tag)
        print(f"\nsaved {jpath}\n      {mpath}")
    bad = [r for r in rows if r["kind"] == "check" and not r.get("ok") and not r.get("skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
