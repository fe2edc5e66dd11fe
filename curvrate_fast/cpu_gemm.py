"""The CPU GEMM of captured programs and of the eager engine's linear layers: PyTorch's default
(MKL's sgemm), oneDNN's, or the project's AVX-512 kernel, chosen by measuring.

A captured jet program on a GEMM-bound model spends nearly all its time in ``aten.mm`` (96 % on the
MLP 784→512→512→10: the K+1 coefficient rows through each linear layer, forward, weight and input
gradients). On CPUs where MKL does not use its widest vector units (AMD processors: MKL picks its
AVX2 path there), oneDNN's float32 GEMM is about twice as fast on the same core (measured on the
project's AMD EPYC, one thread, 640×512 by 512×512: 109 GFLOP/s for ``torch.mm``, 244 GFLOP/s for
oneDNN, the rate XLA reaches too). Inductor only uses its own CPU GEMM templates for frozen
(constant) weights, so training graphs keep ``aten.mm``.

:func:`rewrite_graph` replaces each float32 CPU ``aten.mm`` of a captured graph whose shape runs
faster with oneDNN by :func:`cpu_mm` (``curvrate::cpu_mm``, an opaque dispatcher op that inductor calls
as an extern kernel). Which is faster is measured once per (shapes, strides, thread count) on the
running machine, so a CPU where MKL is the faster one keeps ``aten.mm``. Both compute the float32
product with float32 accumulation, in different summation orders (results agree to float32
rounding, ~1e-7 relative); float64 and every other dtype are left alone.

On small networks the products are narrow (the tiny MLP 2→64→64→2 at order 4: three
640×64·64×64 products a step, forward, weight and input gradient), and there oneDNN's packing
costs it most of its lead (~140 GFLOP/s) and cold caches the rest (see :data:`MIN_AUTO_FLOP`).
:func:`avx512_mm` (``csrc/cpu_gemm.cpp``, part of the C++ kernels of the ``cpp`` backend) packs
nothing: register tiles of 6 rows × 64 columns, one sequential float32 sum over k per element
(so its result does not depend on the thread count), ~220 GFLOP/s on those products on one core
of the project's AMD EPYC (MKL ~100) and ~240 on the MLP 784's 640×512·512×512, 28 µs against
MKL's 61 for 640×64·64×64 with caches flushed before each call. It is a candidate wherever it
is built and the CPU has AVX-512 (:func:`avx512_available`); :data:`KERNELS` is the table of
candidates, :func:`fastest_gemm` times them against ``torch.mm``.

``addmm(bias, a, b)`` (a linear layer's forward; inductor's summed weight gradients) is rewritten as
``bias + kernel(a, b)`` under the same rule.

GEMMs with a tiny dimension (M, N or K ≤ :data:`TINY_GEMM_DIM`: the 2-logit output layer of a
Two Moons network, its backward, the weight gradients of its 2-feature input layer) are not worth
a BLAS call: MKL takes 5–30 µs for a 1024×64·64×2 or a 64×512·512×2 product on one core (the latter
30 µs for 65 kflop). :func:`decompose_tiny_gemms` writes them as a broadcast product summed over
K, which inductor fuses into the surrounding kernels (float32 and float64: the same sum in
another order; half-precision GEMMs, which accumulate unrounded products, are left alone).
A tiny K is decomposed only where b is contiguous along N (the output layer's backward), not for
the transposed weight of a 2-feature input layer (see ``_is_tiny``). Measured on the Two Moons CRR
training step, one core, A/B in one process: 777–797 → 755–777 µs for the tiny-M/N products,
another 11–17 µs for the tiny-K ones (30–70 µs slower when the strided ones were decomposed too).

The eager engine uses the same choice (:func:`eager_linear`, called by the linear rule outside
captured graphs): its linear layers multiply all stacked coefficient rows at once, and where such
a float32 CPU product measures faster on a kernel of :data:`KERNELS` it runs there, forward and
the input gradient, as a small autograd Function (the weight gradient, a product with a transposed
left factor, stays on ``torch.mm``). Measured on one core: the MLP 784's eager derivative step
16.9–18.5 → 12.7–13.8 ms with oneDNN.

Modes (``curvrate_fast.compile(..., cpu_gemm=...)``): ``"auto"`` (default: tiny GEMMs
decomposed, the others measured per shape; no rewrite when deterministic algorithms are
requested, so that a run's choice cannot depend on a timing), ``"aten"`` (the graph's GEMMs left
as traced), ``"onednn"`` or ``"avx512"`` (tiny GEMMs decomposed, every other eligible float32 GEMM
on that kernel; raises where it is not available: oneDNN not built in or
``torch.backends.mkldnn.enabled`` False, which also takes oneDNN out of ``"auto"``; the C++
kernels not built or no AVX-512).
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GEMM_MODES", "KERNELS", "TINY_GEMM_DIM", "onednn_available", "avx512_available", "cpu_mm", "avx512_mm",
           "rewrite_graph", "decompose_tiny_gemms", "fastest_gemm", "eager_linear"]

#: what ``cpu_gemm=`` accepts
GEMM_MODES = ("auto", "aten", "onednn", "avx512")


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's dense linear (``mkldnn._linear_pointwise``) and the
    user has not switched oneDNN off (``torch.backends.mkldnn.enabled = False``)."""
    return (bool(torch.backends.mkldnn.is_available()) and bool(torch.backends.mkldnn.enabled)
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    # a @ b = linear(a, W) with W = bᵀ (oneDNN's linear reads any strides: no copies here)
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [None], "")


# a plain dispatcher op (not ``torch.library.custom_op``): a captured graph calls it once per
# GEMM, and custom_op's Python autograd and dispatch layers cost ~8 µs a call (a third of the
# gain on a 1024×64·64×64 product). No autograd kernel: it only appears in captured graphs,
# which are already differentiated and run under no_grad.
_LIB = torch.library.Library("curvrate", "FRAGMENT")
_LIB.define("cpu_mm(Tensor a, Tensor b) -> Tensor")


def _cpu_mm_impl(a: Tensor, b: Tensor) -> Tensor:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"cpu_mm multiplies two matrices, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _onednn_mm(a, b)


def _cpu_mm_meta(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


_LIB.impl("cpu_mm", _cpu_mm_impl, "CPU")
_LIB.impl("cpu_mm", _cpu_mm_meta, "Meta")


def cpu_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D, float32, CPU) through oneDNN's GEMM (the op ``torch.ops.curvrate.cpu_mm``):
    what :func:`rewrite_graph` puts in place of ``aten.mm`` where it is faster. No autograd: it
    only appears in captured graphs, which are already differentiated.

    Example::

        >>> a, b = torch.randn(64, 32), torch.randn(32, 16)
        >>> torch.allclose(curvrate_fast.cpu_gemm.cpu_mm(a, b), a @ b, atol=1e-5)
        True
    """
    return torch.ops.curvrate.cpu_mm.default(a, b)


#: ``"auto"`` times oneDNN only on GEMMs of at least this many flops. Timed alone
#: oneDNN wins on smaller products too, but not inside steps that run between other work (the
#: benchmark interleaves methods; training loops load data): measured on one core of the
#: project's AMD EPYC, interleaved with nested-autograd steps, the tiny MLP's derivative step
#: (640×64·64×64 products, 5.2 MFLOP) took 559 µs with them on oneDNN and 522 µs on MKL, and the
#: Two Moons CRR training step (1024×64·64×64, 8.4 MFLOP) 835–855 µs either way, although alone
#: they had gained 10–40 µs. 16 MFLOP is ~150 µs on one core with MKL. Measured again on
#: 2026-12-01, the CRR step A/B in one process: oneDNN for its two 1024×64·64×64 products gains
#: 35 µs back to back (698 → 663 µs) and loses 77 µs when every step follows a nested-autograd
#: step (965 → 1042 µs): cold caches cost oneDNN more than MKL.
MIN_AUTO_FLOP = 16e6

#: ``"auto"`` times the AVX-512 kernel on GEMMs of at least this many flops. It packs nothing, so
#: cold caches cost it what they cost MKL (640×64·64×64 on one core, caches flushed before each
#: call: 28 µs against MKL's 61, warm 24 against 55), and it is timed down to ~5 µs MKL calls;
#: below that a call's fixed cost is most of its time and the timing would decide by noise.
MIN_AUTO_FLOP_AVX512 = 0.5e6


def avx512_available() -> bool:
    """Whether the project's AVX-512 GEMM (``csrc/cpu_gemm.cpp``, the op
    ``torch.ops.curvrate_fast.avx512_mm``) is loaded and this CPU has AVX-512. It is part of the
    C++ library of the ``cpp`` backend and, like its activation kernels, used only once built
    (``python -m curvrate_fast build-cpp``, or ``CURVRATE_BUILD_CPP=1`` at install): nothing is
    compiled behind the user's back."""
    global _avx512_supported
    if _avx512_supported is not None:     # the eager linear rule asks on every call
        return _avx512_supported
    from . import cpp_backend
    if not cpp_backend.available():       # not remembered: a later build-cpp makes it available
        return False
    try:
        _avx512_supported = bool(torch.ops.curvrate_fast.avx512_mm_supported())
    except (AttributeError, RuntimeError):   # a library built before the kernel existed
        _avx512_supported = False
    return _avx512_supported


#: whether the loaded C++ library's AVX-512 GEMM runs on this CPU (None: not loaded yet)
_avx512_supported = None


def avx512_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D, float32, CPU) through the project's AVX-512 kernel (``csrc/cpu_gemm.cpp``:
    register tiles of 6 rows × 64 columns, one sequential float32 sum over k per element, no
    packing; ``at::mm`` on a CPU without AVX-512). What :func:`rewrite_graph` puts in place of
    ``aten.mm`` where it is the fastest. No autograd (captured graphs are already differentiated;
    the eager linear rule wraps it in its own autograd Function).

    Example::

        >>> a, b = torch.randn(640, 64), torch.randn(64, 64)
        >>> torch.allclose(curvrate_fast.cpu_gemm.avx512_mm(a, b), a @ b, atol=1e-4)
        True
    """
    if not avx512_available():
        raise RuntimeError("the AVX-512 GEMM is not available: build the C++ kernels first "
                           "(python -m curvrate_fast build-cpp) on a CPU with AVX-512")
    return torch.ops.curvrate_fast.avx512_mm.default(a, b)


class _Kernel(NamedTuple):
    """A float32 CPU GEMM that may replace ``aten.mm``: the dispatcher op a captured graph calls,
    whether it can run here, the smallest product ``"auto"`` times it on, its name in reports,
    and the error of a ``cpu_gemm=`` mode that names it where it cannot run."""
    op: Callable[[], object]
    available: Callable[[], bool]
    min_auto_flop: float
    label: str
    unavailable: str


#: the GEMMs a graph's ``aten.mm`` may be rewritten to, by ``cpu_gemm=`` mode name ("auto" times
#: the available ones against ``torch.mm``; "aten" keeps ``torch.mm``)
KERNELS: Dict[str, _Kernel] = {
    "onednn": _Kernel(lambda: torch.ops.curvrate.cpu_mm.default, lambda: onednn_available(), MIN_AUTO_FLOP,
                      "oneDNN",
                      "cpu_gemm='onednn': oneDNN is not available (this PyTorch build has none, or "
                      "torch.backends.mkldnn.enabled is False); use 'auto' or 'aten'"),
    "avx512": _Kernel(lambda: torch.ops.curvrate_fast.avx512_mm.default, lambda: avx512_available(),
                      MIN_AUTO_FLOP_AVX512, "AVX-512 kernel",
                      "cpu_gemm='avx512': the AVX-512 GEMM is not available (build the C++ kernels with "
                      "python -m curvrate_fast build-cpp, on a CPU with AVX-512); use 'auto' or 'aten'"),
}

_Key = Tuple[tuple, tuple, tuple, tuple, int, tuple]
_choices: Dict[_Key, str] = {}
_choices_lock = threading.Lock()


def _timed(fn, a: Tensor, b: Tensor, reps: int) -> List[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(a, b)
        times.append(time.perf_counter() - t0)
    return times


def fastest_gemm(a_shape: Sequence[int], a_stride: Sequence[int], b_shape: Sequence[int],
                 b_stride: Sequence[int], candidates: Sequence[str] = ("onednn",), *,
                 margin: float = 0.9) -> str:
    """Which of ``torch.mm`` (``"aten"``) and the ``candidates`` (names in :data:`KERNELS`)
    multiplies float32 matrices of these shapes and strides the fastest here, with this many
    threads: all timed on random data, as the graph calls them (through their dispatcher ops),
    in three interleaved rounds of a few calls (≤ ~100 ms in all per shape); a candidate is
    chosen only when its median time is < ``margin`` of mm's. Measured once per process and key.

    Example::

        >>> cpu_gemm.fastest_gemm((640, 64), (64, 1), (64, 64), (64, 1), ("onednn",)) in ("aten", "onednn")
        True
    """
    key = (tuple(a_shape), tuple(a_stride), tuple(b_shape), tuple(b_stride), torch.get_num_threads(),
           tuple(candidates))
    with _choices_lock:
        if key in _choices:
            return _choices[key]
    a = _random_strided(a_shape, a_stride)
    b = _random_strided(b_shape, b_stride)
    ops = {"aten": torch.mm}
    for name in candidates:
        if not KERNELS[name].available():
            continue
        op = KERNELS[name].op()
        try:
            _timed(op, a, b, 1)           # warm-up; a layout a kernel refuses: not a candidate
        except RuntimeError:
            continue
        ops[name] = op
    choice = "aten"
    if len(ops) > 1:
        one = sum(_timed(op, a, b, 1)[0] for op in ops.values())
        reps = max(3, min(20, int(0.01 / max(one, 1e-6))))
        times: Dict[str, List[float]] = {name: [] for name in ops}
        for _ in range(3):   # interleaved rounds, medians: one lucky call decides nothing
            for name, op in ops.items():
                times[name] += _timed(op, a, b, reps)
        medians = {name: statistics.median(t) for name, t in times.items()}
        best = min((name for name in ops if name != "aten"), key=medians.__getitem__)
        if medians[best] < margin * medians["aten"]:
            choice = best
    with _choices_lock:
        _choices[key] = choice
    return choice


def _random_strided(shape: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Random data laid out with ``stride`` (a broadcast stride of 0 included), from a generator of
    its own: a measurement in the middle of training must not move the global random stream (the
    eager engine measures a new shape on its first use)."""
    dense = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0))
    out = torch.empty_strided(tuple(shape), tuple(max(s, 0) for s in stride))
    return out.copy_(dense) if 0 not in stride else dense.as_strided(tuple(shape), tuple(stride))


_aten = torch.ops.aten
_GEMMS = (_aten.mm.default, _aten.addmm.default)

#: a GEMM with a dimension this small is decomposed (see the module docstring)
TINY_GEMM_DIM = 4


def _operands(node):
    """The traced (a, b) of a CPU mm/addmm node (``addmm(bias, a, b)`` with the default alpha
    and beta only), or None."""
    if node.op != "call_function" or node.target not in _GEMMS:
        return None
    if node.target is _aten.addmm.default and (node.kwargs or len(node.args) != 3):
        return None
    vals = [getattr(a, "meta", {}).get("val") for a in node.args[-2:]]
    if not all(isinstance(v, Tensor) and v.device.type == "cpu" and v.dim() == 2 for v in vals):
        return None
    return vals[0], vals[1]


def _is_tiny(a: Tensor, b: Tensor) -> bool:
    # float32/float64 only: a half-precision GEMM accumulates unrounded products in float32,
    # a decomposed one would round every product to half first (autocast's numbers would change).
    # A tiny K is decomposed only where b is contiguous along N: the product is fused into its
    # consumer's loop over N, which a strided read of b (the transposed weight of a 2-feature
    # input layer) keeps from vectorizing (measured: the Two Moons step 30-70 µs slower)
    if a.dtype not in (torch.float32, torch.float64) or b.dtype != a.dtype:
        return False
    if min(a.shape[0], b.shape[1]) <= TINY_GEMM_DIM:
        return True
    return a.shape[1] <= TINY_GEMM_DIM and (b.shape[1] == 1 or b.stride(1) == 1)


def _replace(gm: torch.fx.GraphModule, node, build) -> None:
    """Put ``build(graph, a_node, b_node)`` (plus the bias of an addmm) in place of ``node``."""
    g = gm.graph
    with g.inserting_before(node):
        out = build(g, *node.args[-2:])
        if node.target is _aten.addmm.default:
            out = g.call_function(_aten.add.Tensor, (node.args[0], out))
    node.replace_all_uses_with(out)
    g.erase_node(node)


def _broadcast_product(g, a, b):
    # a @ b = Σ_k a[:, k, None] · b[None, k, :]: one fused loop for inductor, not a BLAS call
    prod = g.call_function(_aten.mul.Tensor, (g.call_function(_aten.unsqueeze.default, (a, 2)),
                                              g.call_function(_aten.unsqueeze.default, (b, 0))))
    return g.call_function(_aten.sum.dim_IntList, (prod, [1]))


def _kernel_product(name: str):
    def build(g, a, b):
        return g.call_function(KERNELS[name].op(), (a, b))
    return build


def decompose_tiny_gemms(gm: torch.fx.GraphModule) -> int:
    """Write each float32/float64 CPU mm/addmm of ``gm`` with a dimension ≤ :data:`TINY_GEMM_DIM`
    (K only where b is contiguous along N) as a broadcast product summed over K (see the module
    docstring); returns how many. The graph must carry the traced values in ``node.meta["val"]``.

    Example::

        >>> gm = torch.fx.experimental.proxy_tensor.make_fx(lambda a, b: a @ b)(torch.randn(8, 4), torch.randn(4, 2))
        >>> curvrate_fast.cpu_gemm.decompose_tiny_gemms(gm)
        1
    """
    n = 0
    for node in list(gm.graph.nodes):
        ab = _operands(node)
        if ab is not None and _is_tiny(*ab):
            _replace(gm, node, _broadcast_product)
            n += 1
    if n:
        gm.recompile()
    return n


def rewrite_graph(gm: torch.fx.GraphModule, mode: str = "auto") -> int:
    """Rewrite the CPU GEMMs of ``gm`` as ``mode`` says (see the module docstring): tiny ones
    decomposed (:func:`decompose_tiny_gemms`), float32 mm/addmm nodes on the kernel of
    :data:`KERNELS` that measures fastest (``"auto"``) or on the one named; returns how many nodes
    were rewritten. The graph must carry the traced values in ``node.meta["val"]`` (``make_fx``
    records them).

    Example::

        >>> gm = torch.fx.experimental.proxy_tensor.make_fx(lambda a, b: a @ b)(torch.randn(8, 4), torch.randn(4, 2))
        >>> curvrate_fast.cpu_gemm.rewrite_graph(gm, "aten")
        0
    """
    if mode not in GEMM_MODES:
        raise ValueError(f"cpu_gemm must be one of {GEMM_MODES}, got {mode!r}")
    if mode == "aten":
        return 0
    if mode in KERNELS and not KERNELS[mode].available():
        raise RuntimeError(KERNELS[mode].unavailable)
    n = decompose_tiny_gemms(gm)
    if mode == "auto" and torch.are_deterministic_algorithms_enabled():
        return n
    m = 0
    for node in list(gm.graph.nodes):
        ab = _operands(node)
        if ab is None or ab[0].dtype != torch.float32 or ab[1].dtype != torch.float32:
            continue
        a, b = ab
        name = mode if mode != "auto" else _auto_choice(a.shape, a.stride(), b.shape, b.stride())
        if name == "aten":
            continue
        _replace(gm, node, _kernel_product(name))
        m += 1
    if m:
        gm.recompile()
    return n + m


def _auto_choice(a_shape, a_stride, b_shape, b_stride) -> str:
    """"auto"'s GEMM for one float32 product a @ b (a captured graph's GEMM pass, the eager linear
    rule): ``"aten"`` under deterministic algorithms (a timing must not decide a run's numbers),
    else the fastest of torch.mm and the available kernels whose size threshold the product
    reaches (:func:`fastest_gemm`)."""
    if torch.are_deterministic_algorithms_enabled():
        return "aten"
    flop = 2 * a_shape[0] * a_shape[1] * b_shape[1]
    candidates = tuple(name for name, k in KERNELS.items() if flop >= k.min_auto_flop and k.available())
    if not candidates:
        return "aten"
    return fastest_gemm(a_shape, a_stride, b_shape, b_stride, candidates)


# -- the eager engine's linear layers -------------------------------------------------------------

class _KernelLinear(torch.autograd.Function):
    """x2 @ wᵀ on the kernel ``name`` of :data:`KERNELS`; backward gx = gy @ w (on the kernel
    ``"auto"`` picks for that product) and gw = gyᵀ @ x2 (``torch.mm``: oneDNN gains nothing on a
    transposed left factor). Under ``create_graph`` the backward runs differentiable ATen
    products, so higher derivatives stay exact."""

    @staticmethod
    def forward(ctx, x2: Tensor, w: Tensor, name: str) -> Tensor:
        ctx.save_for_backward(x2, w)
        return KERNELS[name].op()(x2, w.t())

    @staticmethod
    def backward(ctx, gy: Tensor):
        x2, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            name = "aten"
            if not torch.is_grad_enabled() and gy.is_contiguous():
                name = _auto_choice(gy.shape, gy.stride(), w.shape, w.stride())
            gx = gy @ w if name == "aten" else KERNELS[name].op()(gy, w)
        if ctx.needs_input_grad[1]:
            gw = gy.t() @ x2
        return gx, gw, None


def eager_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` (no bias) for the eager engine's linear rule: on the kernel of
    :data:`KERNELS` that multiplies this float32 CPU shape the fastest, where one is faster than
    MKL (the measurement and the thresholds of ``cpu_gemm="auto"``: timed once per shape and
    thread count; never under deterministic algorithms), ``F.linear`` otherwise. The stacked
    coefficients of a jet through a linear layer (the MLP 784's 640×784·784×512, a language
    model's vocabulary projection, a small MLP's 640×64·64×64) are such products; on this
    project's AMD EPYC oneDNN and the AVX-512 kernel run them about twice as fast (module
    docstring). Differentiable (see ``_KernelLinear``); the product is the float32 one, in another
    summation order.

    Example::

        >>> x, w = torch.randn(640, 784), torch.randn(512, 784)
        >>> torch.allclose(curvrate_fast.cpu_gemm.eager_linear(x, w), x @ w.t(), atol=1e-3)
        True
    """
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or weight.dim() != 2 or x.dim() < 1 or not x.is_contiguous()
            or torch.is_autocast_enabled("cpu")):   # autocast's linear casts: F.linear does them
        return F.linear(x, weight)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    wt = weight.t()
    name = _auto_choice(x2.shape, x2.stride(), wt.shape, wt.stride())
    if name == "aten":
        return F.linear(x, weight)
    return _KernelLinear.apply(x2, weight, name).reshape(tuple(x.shape[:-1]) + (weight.shape[0],))
