"""The CPU GEMM of captured programs: PyTorch's default (MKL's sgemm) or oneDNN's, chosen by measuring.

A captured jet program on a GEMM-bound model spends nearly all its time in ``aten.mm`` (96 % on the
MLP 784→512→512→10: the K+1 coefficient rows through each linear layer, forward, weight and input
gradients). On CPUs where MKL does not use its widest vector units (AMD processors: MKL picks its
AVX2 path there), oneDNN's float32 GEMM is about twice as fast on the same core (measured on the
project's AMD EPYC, one thread, 640×512 by 512×512: 109 GFLOP/s for ``torch.mm``, 244 GFLOP/s for
oneDNN, the rate XLA reaches too). Inductor only uses its own CPU GEMM templates for frozen
(constant) weights, so training graphs keep ``aten.mm``.

:func:`rewrite_graph` replaces each float32 CPU ``aten.mm`` of a captured graph whose shape runs
faster with oneDNN by :func:`cpu_mm` (``curvrate::cpu_mm``, an opaque custom op that inductor calls
as an extern kernel). Which is faster is measured once per (shapes, strides, thread count) on the
running machine, so a CPU where MKL is the faster one keeps ``aten.mm``. Both compute the float32
product with float32 accumulation, in different summation orders (results agree to float32
rounding, ~1e-7 relative); float64 and every other dtype are left alone.

Modes (``curvrate_fast.compile(..., cpu_gemm=...)``): ``"auto"`` (default: measured per shape; no
rewrite when deterministic algorithms are requested, so that a run's choice cannot depend on a
timing), ``"aten"`` (never rewrite), ``"onednn"`` (every eligible mm; raises where oneDNN is not
built in or ``torch.backends.mkldnn.enabled`` is False, which also turns ``"auto"`` off).
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["GEMM_MODES", "onednn_available", "cpu_mm", "rewrite_graph", "faster_with_onednn"]

#: what ``cpu_gemm=`` accepts
GEMM_MODES = ("auto", "aten", "onednn")


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's dense linear (``mkldnn._linear_pointwise``) and the
    user has not switched oneDNN off (``torch.backends.mkldnn.enabled = False``)."""
    return (bool(torch.backends.mkldnn.is_available()) and bool(torch.backends.mkldnn.enabled)
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    # a @ b = linear(a, W) with W = bᵀ (oneDNN's linear reads any strides: no copies here)
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [None], "")


@torch.library.custom_op("curvrate::cpu_mm", mutates_args=(), device_types="cpu")
def cpu_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D, float32, CPU) through oneDNN's GEMM: what :func:`rewrite_graph` puts in place
    of ``aten.mm`` where it is faster. No autograd: it only appears in captured graphs, which are
    already differentiated.

    Example::

        >>> a, b = torch.randn(64, 32), torch.randn(32, 16)
        >>> torch.allclose(curvrate_fast.cpu_gemm.cpu_mm(a, b), a @ b, atol=1e-5)
        True
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"cpu_mm multiplies two matrices, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _onednn_mm(a, b)


@cpu_mm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


#: ``"auto"`` leaves GEMMs below this many flops to ``torch.mm`` without timing them: on small
#: ones the custom op's dispatch (~7 µs) eats most of the gain, and whole steps measured slower
#: even where the graph itself got faster: the rest of the step (value checks, backward) slowed
#: by more than the graph gained, cause not found (one core, the Two Moons CRR step with its two
#: 1024×64·64×64 GEMMs on oneDNN: graph 484 → 439 µs, step 910 → 945 µs; the tiny MLP's
#: derivative step 361 → 395 µs). 16 MFLOP is ~150 µs on one core with MKL.
MIN_AUTO_FLOP = 16e6

_Key = Tuple[tuple, tuple, tuple, tuple, int]
_choices: Dict[_Key, bool] = {}
_choices_lock = threading.Lock()


def _timed(fn, a: Tensor, b: Tensor, reps: int) -> List[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(a, b)
        times.append(time.perf_counter() - t0)
    return times


def faster_with_onednn(a_shape: Sequence[int], a_stride: Sequence[int], b_shape: Sequence[int],
                       b_stride: Sequence[int], *, margin: float = 0.9) -> bool:
    """Whether oneDNN multiplies float32 matrices of these shapes and strides faster than
    ``torch.mm`` here, with this many threads: both timed on random data (three interleaved
    rounds of a few calls, ≤ ~70 ms in all per shape), oneDNN chosen when its median time is
    < ``margin`` of mm's. Measured once per process and key."""
    key = (tuple(a_shape), tuple(a_stride), tuple(b_shape), tuple(b_stride), torch.get_num_threads())
    with _choices_lock:
        if key in _choices:
            return _choices[key]
    try:
        a = _random_strided(a_shape, a_stride)
        b = _random_strided(b_shape, b_stride)
        one = _timed(torch.mm, a, b, 1)[0] + _timed(_onednn_mm, a, b, 1)[0]  # warm-up; sizes reps
        reps = max(3, min(20, int(0.01 / max(one, 1e-6))))
        t_mm: List[float] = []
        t_dnn: List[float] = []
        for _ in range(3):   # interleaved rounds, medians: one lucky call decides nothing
            t_mm += _timed(torch.mm, a, b, reps)
            # oneDNN timed as the graph will call it: through the custom op (~7 µs of dispatch)
            t_dnn += _timed(torch.ops.curvrate.cpu_mm.default, a, b, reps)
        choice = statistics.median(t_dnn) < margin * statistics.median(t_mm)
    except RuntimeError:  # a layout oneDNN refuses: keep torch.mm
        choice = False
    with _choices_lock:
        _choices[key] = choice
    return choice


def _random_strided(shape: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Random data laid out with ``stride`` (a broadcast stride of 0 included)."""
    dense = torch.randn(tuple(shape))
    out = torch.empty_strided(tuple(shape), tuple(max(s, 0) for s in stride))
    return out.copy_(dense) if 0 not in stride else dense.as_strided(tuple(shape), tuple(stride))


def _eligible(node) -> bool:
    if node.op != "call_function" or node.target is not torch.ops.aten.mm.default:
        return False
    vals = [getattr(a, "meta", {}).get("val") for a in node.args[:2]]
    return all(isinstance(v, Tensor) and v.dtype == torch.float32 and v.device.type == "cpu"
               and v.dim() == 2 for v in vals)


def rewrite_graph(gm: torch.fx.GraphModule, mode: str = "auto") -> int:
    """Replace the float32 CPU ``aten.mm`` nodes of ``gm`` by :func:`cpu_mm` where ``mode`` says so
    (see the module docstring); returns how many were replaced. The graph must carry the traced
    values in ``node.meta["val"]`` (``make_fx`` records them).

    Example::

        >>> gm = torch.fx.experimental.proxy_tensor.make_fx(lambda a, b: a @ b)(torch.randn(8, 4), torch.randn(4, 2))
        >>> curvrate_fast.cpu_gemm.rewrite_graph(gm, "aten")
        0
    """
    if mode not in GEMM_MODES:
        raise ValueError(f"cpu_gemm must be one of {GEMM_MODES}, got {mode!r}")
    if mode == "aten":
        return 0
    if not onednn_available():
        if mode == "onednn":
            raise RuntimeError("cpu_gemm='onednn': oneDNN is not available (this PyTorch build has none, "
                               "or torch.backends.mkldnn.enabled is False); use 'auto' or 'aten'")
        return 0
    if mode == "auto" and torch.are_deterministic_algorithms_enabled():
        return 0
    n = 0
    for node in list(gm.graph.nodes):
        if not _eligible(node):
            continue
        a, b = (x.meta["val"] for x in node.args[:2])
        if mode == "auto" and (2 * a.shape[0] * a.shape[1] * b.shape[1] < MIN_AUTO_FLOP
                               or not faster_with_onednn(a.shape, a.stride(), b.shape, b.stride())):
            continue
        node.target = torch.ops.curvrate.cpu_mm.default
        n += 1
    if n:
        gm.recompile()
    return n
