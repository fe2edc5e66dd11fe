r"""Multilinear jets: the mixed derivatives Dⁿf(x)[u_1, …, u_n] of several directions in one pass
(docs/math.md §4, "Multilinear jets"; docs/design.md §6).

A per-order CRR penalty needs d_n = Dⁿℓ(x)[u_1, …, u_n] for n = 1..N with a fresh direction per
order. The univariate engine gets them by polarization: 2^{N−1} jets of order N along sign
combinations of the u_i, 2^{N−1}·(N + 1) coefficient rows per sample (16 for N = 3). Here the
input is instead x + ε_1·u_1 + … + ε_N·u_N in the algebra of the ε_i with ε_i² = 0 (hyper-dual
numbers). An element has one component a_S per subset S of {1..N}; the component S of f(x + Σ ε_i
u_i) is exactly ∂^{|S|}/∏_{i∈S}∂t_i f(x + Σ t_i u_i) at t = 0 = D^{|S|}f(x)[u_i : i ∈ S], so d_n
is the component {1..n}: 2^N rows per sample (8 for N = 3), no weights, no cancellation.

Arithmetic (a, b elements; S, T subsets):

- linear maps act on every component (a GEMM of the stacked components, bias on a_∅);
- product: (ab)_T = Σ_{S⊆T} a_S·b_{T∖S}; the same for a bilinear map of two jets (matmul, bmm,
  addmm, baddbmm: attention's q kᵀ and its weighted values), the pairs of each component T one
  batched product (:func:`bilinear`);
- a smooth elementwise f: f(a)_T = Σ_{π partition of T} f^{(|π|)}(a_∅)·∏_{B∈π} a_B (Faà di Bruno
  for square-free monomials), e.g. f(a)_{12} = f′a_{12} + f″a_1a_2 (activations, exp, log,
  constant powers with f^{(k)}(a) = p(p−1)…(p−k+1)·a^{p−k}: rsqrt, sqrt, reciprocal, a quotient
  by a jet);
- composites written with those: softmax = e/Σe and logsumexp = log Σe with e = exp of the
  scores shifted by each row's largest entry (its whole jet: :func:`_row_shift`), LayerNorm and
  RMSNorm (means, products, rsqrt), scaled-dot-product attention (its univariate rule is a
  composition of ops with rules here, and nn.MultiheadAttention reaches it through
  F.multi_head_attention_forward).

Components are stored stacked along a leading axis in order of degree (∅; the singletons; the
pairs; …), so the input x + Σ ε_i u_i stores N + 1 rows and, as in the univariate engine, trailing
components never stored are zero. A multilinear jet is a :class:`JetTensor` of order 2^N − 1 (every
component kept): the univariate rules that act on every coefficient alike (linear maps, shape
ops, reductions, sums) are right for it unchanged; every other op needs a rule of this module. So
that no univariate rule ever sees one, a pass runs under :func:`multilinear_pass`, where the
dispatcher sends every op on a jet through :func:`route`, which raises
:class:`MultilinearUnsupported` for an op outside :data:`_RULES`. Callers probe a model once
(:func:`supported`) and use polarization where it raises.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import lookup, op_name
from .tensor import JetError, JetTensor, is_jet, make_jet

__all__ = ["MultilinearUnsupported", "multilinear_pass", "route", "probe", "Probe", "supported", "input_jet",
           "component", "MAX_DIRECTIONS"]

# 2^N rows per sample (64 at N = 6, against polarization's 224); higher orders take polarization
MAX_DIRECTIONS = 6


class MultilinearUnsupported(JetError):
    """An op of a multilinear pass has no multilinear rule: the caller uses polarization instead."""


# -- the algebra --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def masks(N: int) -> Tuple[int, ...]:
    """The subsets of {0..N−1} as bit masks, in storage order: by degree, then by value."""
    return tuple(sorted(range(1 << N), key=lambda m: (bin(m).count("1"), m)))


@functools.lru_cache(maxsize=None)
def position(N: int) -> Dict[int, int]:
    """Storage index of each mask."""
    return {m: i for i, m in enumerate(masks(N))}


def component(N: int, n: int) -> int:
    """Storage index of the component {1..n}: Dⁿf[u_1, …, u_n]."""
    return position(N)[(1 << n) - 1]


@functools.lru_cache(maxsize=None)
def _partitions(N: int) -> Tuple[Tuple[Tuple[int, ...], ...], ...]:
    """For each storage index i ≥ 1, the partitions of its subset, each as the storage indices of
    its blocks."""
    pos = position(N)

    def parts(bits: List[int]) -> Iterator[List[int]]:
        if not bits:
            yield []
            return
        first, rest = bits[0], bits[1:]
        for p in parts(rest):
            for k in range(len(p)):
                yield p[:k] + [p[k] | (1 << first)] + p[k + 1:]
            yield p + [1 << first]

    out = []
    for m in masks(N)[1:]:
        bits = [i for i in range(N) if m >> i & 1]
        out.append(tuple(tuple(pos[b] for b in p) for p in parts(bits)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _splits(N: int) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
    """For each storage index of T, the pairs (index of S, index of T∖S) over all S ⊆ T."""
    pos = position(N)
    out = []
    for m in masks(N):
        pairs, s = [], m
        while True:           # every submask of m
            pairs.append((pos[s], pos[m & ~s]))
            if s == 0:
                break
            s = (s - 1) & m
        out.append(tuple(pairs))
    return tuple(out)


def _directions(order: int) -> int:
    """N of a multilinear jet of order 2^N − 1."""
    return (order + 1).bit_length() - 1


def compose(c: Tensor, derivatives: Sequence[Optional[Tensor]], N: int) -> List[Optional[Tensor]]:
    """The components of f(a) for a = ``c`` (stored components, a_∅ first) from
    ``derivatives[k]`` = f^{(k)}(a_∅), k = 0..N (None: exactly zero). None for a component that is
    exactly zero."""
    comps = list(c.unbind(0))
    stored = len(comps)
    out: List[Optional[Tensor]] = [derivatives[0]]
    ops = 0
    for blocks_list in _partitions(N):
        acc = None
        for blocks in blocks_list:
            d = derivatives[len(blocks)] if len(blocks) < len(derivatives) else None
            if d is None or any(b >= stored for b in blocks):
                continue
            term = d
            for b in blocks:
                term = term * comps[b]
            acc = term if acc is None else acc + term
            ops += len(blocks) + 1
        out.append(acc)
    _tally(ops, 0.0)
    return out


def product(a: Tensor, b: Tensor, N: int) -> List[Optional[Tensor]]:
    """The components of a·b (stacked components a (s, ...), b (r, ...))."""
    A, B = list(a.unbind(0)), list(b.unbind(0))
    out: List[Optional[Tensor]] = []
    for pairs in _splits(N):
        acc = None
        for i, j in pairs:
            if i < len(A) and j < len(B):
                t = A[i] * B[j]
                acc = t if acc is None else acc + t
                _tally(2, 0.0)
        out.append(acc)
    return out


def bilinear(a: Tensor, b: Tensor, N: int, op: Callable[[Tensor, Tensor], Tensor]) -> List[Optional[Tensor]]:
    """The components of op(a, b) for a bilinear ``op`` (matmul) of two multilinear jets (stacked
    components a (s, ...), b (r, ...)): (op(a, b))_T = Σ_{S⊆T} op(a_S, b_{T∖S}). The pairs of one
    component T are one batched ``op`` call summed over the batch: 2^N products in all (8 for
    N = 3) instead of 3^N small ones (27), and at any time no more than 2^{|T|} pair products
    alive (the whole 3^N at once would hold 27 attention-score tensors). None for a component
    that no stored pair reaches."""
    # the operands' own dims broadcast from the right, as op's do: the pair axis must not take part
    nd = max(a.dim(), b.dim())
    a = a.reshape((a.shape[0],) + (1,) * (nd - a.dim()) + tuple(a.shape[1:]))
    b = b.reshape((b.shape[0],) + (1,) * (nd - b.dim()) + tuple(b.shape[1:]))
    out: List[Optional[Tensor]] = []
    for pairs in _splits(N):
        stored = [(i, j) for i, j in pairs if i < a.shape[0] and j < b.shape[0]]
        if not stored:
            out.append(None)
        elif len(stored) == 1:
            i, j = stored[0]
            out.append(op(a[i], b[j]))
        else:
            rows = torch.tensor([i for i, _ in stored], device=a.device)
            cols = torch.tensor([j for _, j in stored], device=b.device)
            out.append(op(a.index_select(0, rows), b.index_select(0, cols)).sum(0))
        _tally(4 if len(stored) > 1 else 1, 0.0)
    return out


def _tally(ops: int, macs: float) -> None:
    count = _state.count
    if count is not None:
        if _state.stand_in:
            count[0] += ops
        count[1] += macs


def _jet(comps: List[Optional[Tensor]], order: int) -> JetTensor:
    """A jet from components, the trailing zero ones not stored."""
    while len(comps) > 1 and comps[-1] is None:
        comps.pop()
    return make_jet(comps, order)


def input_jet(x: Tensor, us: Sequence[Tensor]) -> JetTensor:
    """x + Σ ε_i·u_i: N + 1 stored rows (x, u_1, …, u_N), order 2^N − 1."""
    N = len(us)
    return JetTensor(torch.stack([x, *us]), (1 << N) - 1)


# -- the pass -----------------------------------------------------------------------------------

class _State(threading.local):
    def __init__(self) -> None:
        self.N = 0
        self.count: Optional[List[float]] = None    # the probe's tally: [elementwise ops, GEMM MACs per sample]
        self.stand_in = False      # inside a rule that stands in for one fused univariate kernel


_state = _State()


def active() -> int:
    """N of the multilinear pass running on this thread (0: none)."""
    return _state.N


@contextlib.contextmanager
def multilinear_pass(N: int) -> Iterator[None]:
    """Every op on a jet inside goes through :func:`route` (the dispatcher asks :func:`active`)."""
    if not 1 <= N <= MAX_DIRECTIONS:
        raise ValueError(f"a multilinear pass takes 1..{MAX_DIRECTIONS} directions, got {N}")
    old, _state.N = _state.N, N
    try:
        yield
    finally:
        _state.N = old


def refuse(what: str) -> MultilinearUnsupported:
    return MultilinearUnsupported(f"{what} has no multilinear rule (a multilinear pass computes mixed "
                                  "derivatives; the caller falls back to polarization)")


def route(func: Any, rule: Optional[Callable], args: Tuple, kwargs: Dict) -> Any:
    """The dispatcher's call of ``func`` (whose univariate rule is ``rule``) during a multilinear
    pass: its multilinear rule, or :class:`MultilinearUnsupported`."""
    handler = _table().get(rule) if rule is not None else None
    if handler is None:
        raise refuse(op_name(func))
    return handler(rule, *args, **kwargs)


# -- rules --------------------------------------------------------------------------------------

def _stand_in(handler: Callable) -> Callable:
    """Mark a rule that replaces one fused kernel of the univariate engine (an activation, the
    cross-entropy's logsumexp): its subset arithmetic is what the probe counts as the multilinear
    pass's extra ops (:meth:`Probe.eager_faster`). The composite rules (norms, softmax, attention,
    products, powers) run series code of many ops in either pass and are not counted."""
    @functools.wraps(handler)
    def counted(*args, **kwargs):
        old, _state.stand_in = _state.stand_in, True
        try:
            return handler(*args, **kwargs)
        finally:
            _state.stand_in = old
    return counted


def _jets(*xs) -> int:
    return sum(1 for x in xs if is_jet(x))


def _same(rule, *args, **kwargs):
    """A univariate rule that treats every coefficient alike: right for components too."""
    return rule(*args, **kwargs)


def _one_jet(rule, *args, **kwargs):
    """A rule linear in each operand (mul, linear, conv): right per component when only one
    operand is a jet (with two it is a Cauchy product, here the subset product)."""
    if _jets(*args, *kwargs.values()) > 1:
        raise refuse(f"{getattr(rule, '__name__', rule)} of two jets")
    out = rule(*args, **kwargs)
    if _state.count is not None and len(args) > 1 and isinstance(args[1], Tensor) and args[1].dim() >= 2:
        # multiply-adds per sample: (outputs per sample) × (weight entries per output channel)
        w, batch = args[1], max(1, args[0].shape[0] if args[0].dim() else 1)
        _tally(0, out.numel() / batch * w.numel() / w.shape[0])
    return out


def _mul(rule, input, other, *, out=None):
    if is_jet(input) and is_jet(other):
        N = _directions(input._order)
        return _jet(product(input._coeffs, other._coeffs, N), input._order)
    return rule(input, other)


def _div(rule, input, other, *, rounding_mode=None, out=None):
    """a / b; by a jet b as a · (1/b) (the reciprocal's components by :func:`compose`)."""
    if not is_jet(other):
        return rule(input, other, rounding_mode=rounding_mode)
    if rounding_mode is not None:
        raise refuse(f"division by a jet with rounding_mode={rounding_mode!r}")
    return input * _elementwise(other, _power_derivatives(-1.0, torch.reciprocal))


def _rdiv(rule, input, other):
    """``other / input`` (Tensor.__rtruediv__: a number or tensor over a jet)."""
    return _div(None, other, input)


def _power_derivatives(p: float, value: Callable[[Tensor], Tensor]) -> Callable[[Tensor, int], List[Optional[Tensor]]]:
    """f(a) = a^p (``value`` computes it as the op does: rsqrt, sqrt, reciprocal, pow):
    f^{(k)}(a) = p(p−1)…(p−k+1)·a^{p−k}; for an integer p ≥ 0 the derivatives past the p-th are
    exactly zero (None), so x² at x = 0 never meets 0^{negative}."""
    def derivatives(a: Tensor, N: int) -> List[Optional[Tensor]]:
        out: List[Optional[Tensor]] = [value(a)]
        falling = 1.0
        for k in range(1, N + 1):
            falling *= p - (k - 1)
            out.append(None if falling == 0.0 else torch.pow(a, p - k) * falling)
        return out
    return derivatives


def _power(p: float, value: Callable[[Tensor], Tensor]):
    def handler(rule, input, *, out=None):
        return _elementwise(input, _power_derivatives(p, value))
    return handler


def _pow(rule, input, exponent, *, out=None):
    """A jet to a constant real power (a Python number or a one-element tensor); a jet or tensor
    exponent is refused (exp(r·log x) has no rule here)."""
    if is_jet(exponent) or not is_jet(input):
        raise refuse("pow with a jet exponent")
    if isinstance(exponent, Tensor):
        # one value that does not broadcast the result beyond the base's shape, as the univariate rule
        if exponent.numel() != 1 or exponent.is_complex() or exponent.dim() > input.dim():
            raise refuse("pow with a tensor exponent")
        exponent = exponent.item()
    if isinstance(exponent, complex):
        raise refuse("pow with a complex exponent")
    p = float(exponent)
    return _elementwise(input, _power_derivatives(p, lambda a: torch.pow(a, exponent)))


def _bilinear_handler(swap: bool = False):
    """matmul/bmm: linear in each operand (per component) when one is a jet; of two jets the
    subset product of :func:`bilinear` (``swap``: the rule of ``__rmatmul__``, other @ input)."""
    def handler(rule, input, other, *, out=None):
        if _jets(input, other) < 2:
            return rule(input, other)
        a, b = (other, input) if swap else (input, other)
        if a.dim() < 2 or b.dim() < 2:
            raise refuse("matmul of two jets with a 1-D operand")
        return _jet(bilinear(a._coeffs, b._coeffs, _directions(a._order), torch.matmul), a._order)
    return handler


def _scaled_product_handler(name: str):
    """addmm/baddbmm, beta·input + alpha·(m1 @ m2): the univariate rule where at most one factor is
    a jet (a linear map per component, input on every component it has); of two jets the
    :func:`bilinear` product, scaled and summed as torch does (input ignored at beta = 0)."""
    def handler(rule, input, *args, beta=1, alpha=1, out=None, **kwargs):
        # (input, mat1, mat2) of addmm, (input, batch1, batch2) of baddbmm, positional or by name
        first, second = ("batch1", "batch2") if name == "baddbmm" else ("mat1", "mat2")
        mat1 = args[0] if args else kwargs.pop(first)
        mat2 = args[1] if len(args) > 1 else kwargs.pop(second)
        if len(args) > 2 or kwargs.get("out_dtype") is not None:
            raise refuse(f"{name} with out_dtype")
        if _jets(mat1, mat2) < 2:
            return rule(input, mat1, mat2, beta=beta, alpha=alpha)
        prod = _jet(bilinear(mat1._coeffs, mat2._coeffs, _directions(mat1._order), torch.matmul), mat1._order)
        if beta == 0:
            return prod * alpha
        if tuple(torch.broadcast_shapes(input.shape, prod.shape)) != tuple(prod.shape):
            raise RuntimeError(f"{name}: input of shape {tuple(input.shape)} does not broadcast to the product's "
                               f"shape {tuple(prod.shape)}")
        return input * beta + prod * alpha
    return handler


def _normalizer_input(name: str, input, dim, rest: tuple, dtype):
    """The input of softmax or log_softmax in its dtype: ``dtype=`` or a dtype among the positional
    arguments after dim (F.softmax(x, dim, _stacklevel, dtype), torch.softmax(x, dim, dtype) and the
    Tensor method take these forms); refused without a dim."""
    dtype = dtype if dtype is not None else next((r for r in rest if isinstance(r, torch.dtype)), None)
    if dim is None:
        raise refuse(f"{name} without dim")
    return input.to(dtype) if dtype is not None else input


def _softmax(rule, input, dim=None, *rest, dtype=None, **kwargs):
    """softmax = e / Σe with e = exp(z − s), s each row's largest entry (:func:`_row_shift`): the
    components of e by :func:`compose`, of 1/Σe the same with the reciprocal's derivatives, and
    their product. (Not exp(log_softmax): its primal would carry the rounding of log p, ~|log p|·ε
    relative, 1e-14 where p is small.) A masked −inf score gives 0 and zero components; a row with
    every score masked gives NaN, as torch.softmax. The call forms of :func:`_log_softmax`."""
    input = _normalizer_input("softmax", input, dim, rest, dtype)
    N = _directions(input._order)
    c = input._coeffs
    if not input.dim():
        return _jet([torch.ones_like(c[0])], input._order)
    d = dim % input.dim()
    E, S = _exp_and_sum(_row_shift(c, d)[0], d, N)
    R = compose(_stacked(S, S[0]), _power_derivatives(-1.0, torch.reciprocal)(S[0], N), N)
    return _jet(product(_stacked(E, E[0]), _stacked(R, S[0]), N), input._order)


def _layer_norm(rule, input, normalized_shape, weight=None, bias=None, eps: float = 1e-5, *rest):
    """(x − mean)·rsqrt(mean((x − mean)²) + eps)·w + b, each op on the jet (its own rule)."""
    if is_jet(weight) or is_jet(bias):
        raise refuse("layer_norm with a jet weight or bias")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    xc = input - input.mean(dim=dims, keepdim=True)
    y = xc * torch.rsqrt((xc * xc).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _rms_norm(rule, input, normalized_shape, weight=None, eps: Optional[float] = None):
    """x·rsqrt(mean(x²) + eps)·w (eps None: the dtype's machine epsilon, as torch)."""
    if is_jet(weight):
        raise refuse("rms_norm with a jet weight")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    y = input * torch.rsqrt((input * input).mean(dim=dims, keepdim=True) + eps)
    return y if weight is None else y * weight


def _elementwise(x: JetTensor, derivatives: Callable[[Tensor, int], List[Optional[Tensor]]]) -> JetTensor:
    """f(x) by :func:`compose`; equal rows of a_∅ stay equal (JetTensor.share_primal)."""
    N = _directions(x._order)
    c = x._coeffs
    blocks = x.primal_blocks()
    y = _jet(compose(c, derivatives(c[0], N), N), x._order)
    return y.share_primal(blocks) if blocks > 1 else y


def _series_derivatives(kind: str, params: dict) -> Callable[[Tensor, int], List[Optional[Tensor]]]:
    """f^{(k)}(a) for k ≤ N from the univariate reference rule: the jet of f along a + t has the
    coefficients f^{(k)}(a)/k! (differentiable in a, as the rule is)."""
    from ..activation_jet import activation_jet_reference

    def derivatives(a: Tensor, N: int) -> List[Optional[Tensor]]:
        if kind in ("relu", "leaky_relu"):       # piecewise linear: f″ = f‴ = … = 0 exactly
            slope = 0.0 if kind == "relu" else float(params.get("negative_slope", 0.01))
            m = torch.where(a > 0, torch.ones((), dtype=a.dtype, device=a.device),
                            torch.full((), slope, dtype=a.dtype, device=a.device))
            return [a * m, m] + [None] * (N - 1)
        c = activation_jet_reference(torch.stack([a, torch.ones_like(a)]), kind, N, **params)
        return [c[k] * math.factorial(k) if k > 1 else c[k] for k in range(N + 1)]
    return derivatives


def _activation(kind: str, **fixed):
    def handler(rule, input, *args, **kwargs):
        params = dict(fixed)
        if kind == "gelu":
            approx = args[0] if args else kwargs.get("approximate", "none")
            return _elementwise(input, _series_derivatives("gelu_tanh" if approx == "tanh" else "gelu", {}))
        if kind == "softplus":
            beta = args[0] if args else kwargs.get("beta", 1.0)
            threshold = args[1] if len(args) > 1 else kwargs.get("threshold", 20.0)
            params.update(beta=float(beta), threshold=float(threshold))
        if kind == "leaky_relu":
            params["negative_slope"] = float(args[0] if args else kwargs.get("negative_slope", 0.01))
        return _elementwise(input, _series_derivatives(kind, params))
    return handler


def _exp(rule, input, *, out=None):
    def derivatives(a, N):
        e = torch.exp(a)
        return [e] * (N + 1)
    return _elementwise(input, derivatives)


def _log_derivatives(s: Tensor, N: int) -> List[Optional[Tensor]]:
    """log^{(k)}(s) = (−1)^{k−1}(k−1)!/s^k."""
    r = torch.reciprocal(s)
    out: List[Optional[Tensor]] = [torch.log(s)]
    p = r
    for k in range(1, N + 1):
        out.append(p * ((-1) ** (k - 1) * math.factorial(k - 1)))
        p = p * r
    return out


def _log(rule, input, *, out=None):
    return _elementwise(input, _log_derivatives)


def _row_shift(c: Tensor, d: int) -> Tuple[Tensor, Tensor]:
    """(c − s, s) for the stacked components c of z and s the components of each row's largest
    entry along dim ``d`` of z (kept as a dim of size 1). softmax and logsumexp − s are invariant
    under z → z − s, a shift by a jet constant per row: exact. Afterwards the largest entry has
    e = 1 and zero components; shifting the primal alone (max z_∅) leaves the components as large
    as the scores, and where one score dominates (saturated rows; an untrained model's scores of
    10⁴) the sums of the compositions cancel terms far larger than their result (measured on
    MobileBERT: order 3 off by 1e-8 relative in float64, 1e-14 after). A row with every score −inf
    is not shifted."""
    top = c[0].detach().argmax(d, keepdim=True).unsqueeze(0).expand((c.shape[0],) + (-1,) * c[0].dim())
    shift = c.gather(d + 1, top)
    shift = torch.where(torch.isfinite(shift[0:1]), shift, torch.zeros((), dtype=c.dtype, device=c.device))
    return c - shift, shift


def _exp_and_sum(c: Tensor, d: int, N: int) -> Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]:
    """The components of e = exp(z) and of Σ_d e (kept dim), from the stacked (shifted) c."""
    e0 = torch.exp(c[0])
    E = compose(c, [e0] * (N + 1), N)
    return E, [None if t is None else t.sum(d, keepdim=True) for t in E]


def _stacked(comps: List[Optional[Tensor]], like: Tensor) -> Tensor:
    """Components as one stacked tensor, an exact zero (None) as zeros."""
    return torch.stack([torch.zeros_like(like) if t is None else t.expand_as(like) for t in comps])


def _logsumexp_parts(z: JetTensor, dim: int) -> Tuple[Tensor, List[Optional[Tensor]]]:
    """(the stacked components of z, those of logsumexp(z, dim, keepdim=True)): of the row-shifted
    z (:func:`_row_shift`), the shift added back."""
    N = _directions(z._order)
    c = z._coeffs
    if not z.dim():                  # logsumexp of one value is the value
        return c, list(c.unbind(0))
    d = dim % z.dim()
    shifted, shift = _row_shift(c, d)
    _, S = _exp_and_sum(shifted, d, N)
    L = compose(_stacked(S, S[0]), _log_derivatives(S[0], N), N)
    for k in range(shift.shape[0]):
        L[k] = shift[k] if L[k] is None else L[k] + shift[k]
    return c, L


def _log_softmax(rule, input, dim=None, *rest, dtype=None, **kwargs):
    """log_softmax = z − logsumexp(z) (F.log_softmax(x, dim, _stacklevel, dtype), torch.log_softmax(x,
    dim, dtype) and Tensor.log_softmax(dim, dtype) share this handler)."""
    input = _normalizer_input("log_softmax", input, dim, rest, dtype)
    c, L = _logsumexp_parts(input, dim)
    comps = [c[k] - L[k] if L[k] is not None else c[k] for k in range(c.shape[0])]
    comps += [None if l is None else -l for l in L[c.shape[0]:]]
    return _jet(comps, input._order)


def _cross_entropy(rule, input, target, weight=None, size_average=None, ignore_index: int = -100,
                   reduce=None, reduction: str = "mean", label_smoothing: float = 0.0):
    """ℓ = logsumexp(z) − z_y per sample (class-index targets, 2-D logits, no weights or label
    smoothing: the rest is refused to polarization)."""
    if (weight is not None or size_average is not None or reduce is not None or label_smoothing != 0.0
            or not is_jet(input) or is_jet(target) or input.dim() != 2 or target.is_floating_point()):
        raise refuse("cross_entropy with weights, label smoothing, probability targets or non-2-D logits")
    from ..rules.nn import _check_targets, _reduce
    _check_targets(input, target, ignore_index)
    c, L = _logsumexp_parts(input, 1)
    t = target.clamp_min(0).unsqueeze(1)
    comps: List[Optional[Tensor]] = []
    for k in range(max(c.shape[0], len(L))):
        picked = torch.gather(c[k], 1, t) if k < c.shape[0] else None
        lk = L[k]
        if lk is None and picked is None:
            comps.append(None)
            continue
        v = lk if picked is None else (-picked if lk is None else lk - picked)
        comps.append(v.squeeze(1))
    valid = target != ignore_index
    zero = torch.zeros((), dtype=input.dtype, device=input.device)
    comps = [None if v is None else torch.where(valid, v, zero) for v in comps]
    loss = _jet(comps, input._order)
    return _reduce(loss, reduction, valid.sum().to(loss.dtype))


# rules keyed by the univariate rule of a representative torch function (aliases share it)
_SAME = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.sub,
         torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.neg, torch.Tensor.neg,
         torch.Tensor.__neg__, torch.Tensor.__pos__, torch.sum, torch.Tensor.sum, torch.mean,
         torch.Tensor.mean, torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.flatten,
         torch.Tensor.flatten, torch.unsqueeze, torch.Tensor.unsqueeze, torch.squeeze, torch.Tensor.squeeze,
         torch.where, torch.gather, torch.Tensor.gather, torch.Tensor.__getitem__, torch.Tensor.permute,
         torch.transpose, torch.Tensor.transpose, torch.Tensor.contiguous, torch.clone, torch.Tensor.clone,
         torch.cat, torch.stack,
         torch.Tensor.expand, torch.Tensor.view_as, torch.Tensor.reshape_as, torch.Tensor.unflatten,
         torch.unbind, torch.Tensor.unbind, torch.chunk, torch.Tensor.chunk, torch.split, torch.Tensor.split,
         torch.Tensor.narrow, torch.narrow, torch.select, torch.Tensor.select, torch.repeat_interleave,
         torch.Tensor.repeat_interleave,
         # padding: linear; a constant fill value on the primal component only
         F.pad,
         # casts: every coefficient cast (linear), or a constant for an integer dtype
         torch.Tensor.to, torch.Tensor.float, torch.Tensor.double, torch.Tensor.type_as, torch.Tensor.type,
         # pooling: linear, or every coefficient at the primal's argmax; dropout: one mask for all
         F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
         F.adaptive_avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
         F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
         torch.dropout,
         # a constant fill (zero components there) or a jet's (its components): where, per component
         torch.masked_fill, torch.Tensor.masked_fill,
         # composite rules: each of their ops on a jet meets its own rule here
         F.scaled_dot_product_attention)
_ONE_JET = (F.linear, F.conv1d, F.conv2d, F.conv3d)
_MUL = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
_DIV = (torch.div, torch.Tensor.div, torch.Tensor.__truediv__)
_ACTIVATIONS = ((torch.tanh, "tanh"), (torch.Tensor.tanh, "tanh"), (F.tanh, "tanh"), (torch.sigmoid, "sigmoid"),
                (torch.Tensor.sigmoid, "sigmoid"), (F.sigmoid, "sigmoid"), (F.gelu, "gelu"), (F.silu, "silu"),
                (F.softplus, "softplus"), (torch.relu, "relu"), (torch.Tensor.relu, "relu"), (F.relu, "relu"),
                (F.leaky_relu, "leaky_relu"))


@functools.lru_cache(maxsize=1)
def _table() -> Dict[Callable, Callable]:
    from .. import rules  # noqa: F401  (registers the univariate rules this table is keyed by)
    table: Dict[Callable, Callable] = {}

    def put(funcs, handler):
        for f in funcs:
            rule = lookup(f)
            if rule is None:
                raise RuntimeError(f"multilinear table: {op_name(f)} has no univariate rule")
            table[rule] = handler
    put(_SAME, _same)
    put(_ONE_JET, _one_jet)
    put(_MUL, _mul)
    put(_DIV, _div)
    for f, kind in _ACTIVATIONS:
        put((f,), _stand_in(_activation(kind)))
    put((torch.exp, torch.Tensor.exp), _exp)
    put((torch.log, torch.Tensor.log), _log)
    put((F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax), _stand_in(_log_softmax))
    put((F.cross_entropy,), _stand_in(_cross_entropy))
    put((torch.rsqrt, torch.Tensor.rsqrt), _power(-0.5, torch.rsqrt))
    put((torch.sqrt, torch.Tensor.sqrt), _power(0.5, torch.sqrt))
    put((torch.reciprocal, torch.Tensor.reciprocal), _power(-1.0, torch.reciprocal))
    put((torch.pow, torch.Tensor.pow, torch.Tensor.__pow__), _pow)
    put((torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm),
        _bilinear_handler())
    put((torch.Tensor.__rmatmul__,), _bilinear_handler(swap=True))
    put((torch.Tensor.__rtruediv__,), _rdiv)
    put((torch.addmm, torch.Tensor.addmm), _scaled_product_handler("addmm"))
    put((torch.baddbmm, torch.Tensor.baddbmm), _scaled_product_handler("baddbmm"))
    put((F.softmax, torch.softmax, torch.Tensor.softmax), _softmax)
    put((F.layer_norm,), _layer_norm)
    if hasattr(F, "rms_norm"):
        put((F.rms_norm,), _rms_norm)
    return table


# -- which models a pass supports, and where it is the faster one --------------------------------

class Probe:
    """What a probe pass saw: ``ok`` (every op had a rule), ``ops`` (elementwise tensor ops of
    the subset arithmetic in the rules that stand in for one fused univariate kernel: activations,
    cross-entropy, log-softmax; :func:`_stand_in`) and ``macs`` (GEMM and convolution multiply-adds
    per sample row)."""

    __slots__ = ("ok", "ops", "macs")

    def __init__(self, ok: bool, ops: float = 0.0, macs: float = 0.0) -> None:
        self.ok, self.ops, self.macs = ok, ops, macs

    def eager_faster(self, N: int, rows: int, device: torch.device) -> bool:
        """Whether the eager engine should run the multilinear pass for ``rows`` sample rows:
        it saves 2^{N−1}·(N + 1) − 2^N rows of every product but runs several small tensor ops
        per component where polarization runs one fused activation (and, on CUDA, the Triton
        kernels of univariate jets): on the CPU only where each extra op buys at least
        :data:`EAGER_FLOP_PER_OP` of saved products. (Norms, softmax and attention run series
        code of many ops in either pass: not counted as extra.)"""
        if not self.ok or device.type != "cpu":
            return False
        saved = 2.0 * self.macs * rows * ((1 << (N - 1)) * (N + 1) - (1 << N))
        return saved >= EAGER_FLOP_PER_OP * max(self.ops, 1.0)


# Measured on one CPU thread (per-order CRR, orders 2–3, eager): the Two Moons MLP (2→64→64→2,
# 64 samples) saves 35 kFLOP of products per extra op and runs 3.2 → 3.8 ms with the multilinear
# pass; the MLP 784→512→512→10 (128 samples) saves 5.4 MFLOP per op and runs 51.6 → 32.8 ms. An
# eager op costs a few µs, ~1 MFLOP of GEMM here. A captured graph always takes the multilinear pass (the
# compiler fuses the subset arithmetic: the Two Moons training step 706 → 583 µs). With the ops of
# the composite rules left out of the count (2026-12-02), measured multilinear/polarization A/B in
# one process: MLP 2→256→256→2 (128 samples) 1.50× faster, chosen; LayerNorm MLPs 16→64/256 0.69×/1.00×,
# not chosen; TinyLMs (2 pre-LN layers, vocabulary 512) d = 32, 16 tokens, 4 samples 1.00×, not
# chosen, d = 64, 32 tokens, 2 and 8 samples 1.06× and 1.66×, chosen; the MNIST CNN 3.08×, chosen.
EAGER_FLOP_PER_OP = 1e6

_probed_modules: "weakref.WeakKeyDictionary[Any, Dict[tuple, Probe]]" = weakref.WeakKeyDictionary()
_probed_other: Dict[tuple, Probe] = {}
_lock = threading.Lock()


def probe(model: Callable, x: Tensor, y: Any, loss_fn: Optional[Callable], N: int) -> Probe:
    """Whether ``loss_fn(model(·), y)`` runs as a multilinear pass with N directions, and what it
    costs: tried once per configuration (the keys of the sample-mixing probe,
    curvrate_fast.mixing: the model, the modes of its modules, x's shape, dtype and device, the
    loss function; and the labels' shape and dtype) on x, without gradients, PyTorch's random
    state and the modules' buffers left as they were (a failed try stops at its first op without
    a rule, before that op runs). Never under autocast (its casts are the univariate engine's)
    nor for half-precision inputs.

    Example::

        >>> curvrate_fast.jets.multilinear.probe(mlp, x, y, None, 3).ok
        True
    """
    if (torch._C._is_any_autocast_enabled() or not 1 <= N <= MAX_DIRECTIONS
            or x.dtype not in (torch.float32, torch.float64)):
        # half precision keeps the univariate engine's path: components are the derivatives
        # themselves, n! times the normalized Taylor coefficients, nearer float16's overflow
        return Probe(False)
    from .. import mixing
    labels = (tuple(y.shape), y.dtype) if isinstance(y, Tensor) else type(y)   # class ids or probabilities
    key = (mixing._key(model, x, loss_fn), N, labels)
    with _lock:
        known = (_probed_modules.get(model, {}) if isinstance(model, torch.nn.Module) else _probed_other).get(key)
    if known is not None:
        return known
    result = _try(model, x, y, loss_fn, N)
    with _lock:
        if isinstance(model, torch.nn.Module):
            _probed_modules.setdefault(model, {})[key] = result
        else:
            _probed_other[key] = result
            while len(_probed_other) > 256:
                _probed_other.pop(next(iter(_probed_other)))
    return result


def supported(model: Callable, x: Tensor, y: Any, loss_fn: Optional[Callable], N: int) -> bool:
    """Whether every op of ``loss_fn(model(·), y)`` has a multilinear rule (:func:`probe`)."""
    return probe(model, x, y, loss_fn, N).ok


def _try(model, x: Tensor, y, loss_fn, N: int) -> Probe:
    from ..baseline import per_sample_cross_entropy
    from ..mixing import side_effects_kept
    from .dispatcher import model_call
    loss = loss_fn or per_sample_cross_entropy
    count = [0.0, 0.0]
    with side_effects_kept(model, loss_fn, x):
        xx = x.detach()
        xj = input_jet(xx, [torch.ones_like(xx)] * N)
        _state.count = count
        try:
            with multilinear_pass(N), model_call():
                out = loss(model(xj), y)
        except MultilinearUnsupported:
            return Probe(False)
        except Exception:  # noqa: BLE001  (the univariate pass will raise it with its own message)
            return Probe(False)
        finally:
            _state.count = None
    return Probe(is_jet(out), count[0], count[1])
