"""PyTorch's own operator database (OpInfo ``op_db``) run through the jet engine against an oracle
that shares none of its code: a polynomial fit of the op evaluated along the path.

For every op that supports float64 on the CPU and up to ``max_samples`` of its own sample inputs,
the floating tensors of the sample become jets ``x + t·u`` (random ``u``; mode ``input``: the first
operand only; mode ``all``: every floating operand, each with its own direction) and the op runs on
them. Its output coefficients c_0..c_K are compared with the Taylor coefficients of
t ↦ op(x + t·u, ...) at t = 0 obtained by **Chebyshev interpolation** of the plain op at N points
of [−h, h]. The fit's own accuracy is checked: it is repeated with h/2, and only a pair of fits that
agree is used as the oracle (the disagreement is its error bar); when no pair agrees (a kink or a
pole within reach of the path) the sample is "inconclusive", never a pass.

Each op is classified by what the engine did on its samples:

- ``rule``: only Taylor rules ran;
- ``decomposition``: a Python function (``torch.norm``, ``F.multi_head_attention_forward``) ran op
  by op, each op through its rule;
- ``constant``: the result does not depend differentiably on the input (integer results...);
- ``clear error``: the engine refused it with a ``JetError`` that names the op;
- ``mismatch``: a silent wrong answer (must never happen);
- ``unclear error``: an exception that is not a ``JetError`` (must never happen);
- ``no sample``: no usable sample (the plain op fails on its own sample, samples too large,
  or the oracle was inconclusive on all of them).

Run as a script for the full sweep and its table::

    python tests/_opinfo.py --out docs/opinfo_sweep.md [--ops name,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

K = 3
D64 = torch.float64
SEED = 1234
# Samples whose floating operands hold more elements than this are skipped: the oracle evaluates
# the op 4·N times (plus the jets), and the CI run must stay short.
MAX_NUMEL = 4096

# Ops of op_db that are not functions of their floating inputs in the sense tested here (they
# return memory layouts, allocate uninitialized memory, hash, or test backend-specific variants).
SKIP_OPS = {
    "empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted",
    "hash_tensor", "jiterator_unary", "jiterator_binary", "jiterator_4inputs_with_extra_args",
    "jiterator_binary_return_by_ref", "jiterator_2inputs_2outputs", "bmm.triton_optimized",
    "to_sparse", "sparse.sampled_addmm", "sparse.mm.reduce", "item", "allclose", "equal",
}


@dataclass
class Result:
    op: str
    sample: int
    mode: str
    status: str              # pass | mismatch | clear error | unclear error | inconclusive | skipped
    path: str = ""           # rule | decomposition | constant
    detail: str = ""
    err: float = 0.0         # worst |ours − oracle| / scale over orders and outputs
    decomposed: Tuple[str, ...] = ()
    seconds: float = 0.0


@dataclass
class OpSummary:
    op: str
    cls: str
    results: List[Result] = field(default_factory=list)


# -- the oracle ---------------------------------------------------------------------------------

def _cheb_taylor_matrix(N: int, Kmax: int) -> torch.Tensor:
    """M (Kmax+1, N): Taylor coefficients at s = 0 (in s, on [−1, 1]) of the degree-(N−1)
    Chebyshev interpolant through the values at the nodes s_j = cos(π(j + ½)/N)."""
    import numpy as np
    from numpy.polynomial import chebyshev as C
    j = np.arange(N)
    theta = np.pi * (j + 0.5) / N
    # c_m = (2/N) Σ_j y_j cos(m θ_j), c_0 halved
    V = np.cos(np.outer(np.arange(N), theta)) * (2.0 / N)
    V[0] *= 0.5
    P = np.zeros((Kmax + 1, N))
    for m in range(N):
        e = np.zeros(N)
        e[m] = 1.0
        poly = C.cheb2poly(e)
        for k in range(min(Kmax + 1, len(poly))):
            P[k, m] = poly[k]
    return torch.tensor(P @ V, dtype=D64), torch.tensor(np.cos(theta), dtype=D64)


_NODES = 16
_M, _S = _cheb_taylor_matrix(_NODES, K)


def set_order(order: int) -> None:
    """Run the sweep (and the oracle) at another highest order."""
    global K, _M, _S
    K = order
    _M, _S = _cheb_taylor_matrix(_NODES, order)


def _fit(g, h: float) -> List[torch.Tensor]:
    """Taylor coefficients 0..K of g at t = 0 by interpolation on [−h, h]; g returns a list of
    float64 tensors (the floating outputs)."""
    vals = [g(float(h * s)) for s in _S]
    out = []
    for i in range(len(vals[0])):
        Y = torch.stack([v[i].reshape(-1) for v in vals])  # (N, numel)
        a = _M @ Y                                          # (K+1, numel) in s
        a = a / torch.tensor([h ** k for k in range(K + 1)], dtype=D64).unsqueeze(1)
        out.append(a.reshape((K + 1,) + tuple(vals[0][i].shape)))
    return out


def oracle(g, hs: Sequence[float] = (0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125, 0.0015625)):
    """Per output: (coefficients (K+1, numel), tolerance (K+1, numel), conclusive mask (numel,)).

    Fits at consecutive h are compared element by element; an element takes the first pair that
    agrees (to 1e-6 of the coefficient's size plus the rounding floor of the fit), its oracle value
    is the smaller-h fit, and its tolerance the pair's disagreement (×8) plus that floor plus 1e-6 of
    the size. Elements with no agreeing pair (a kink or pole within reach of the path) are
    inconclusive and left out."""
    fits = [_fit(g, h) for h in hs]
    result = []
    for i in range(len(fits[0])):
        F = [f[i].reshape(K + 1, -1) for f in fits]
        n = F[0].shape[1]
        best = F[-1].clone()
        tol = torch.full_like(best, float("inf"))
        done = torch.zeros(n, dtype=torch.bool)
        finite = [torch.isfinite(f).all(dim=0) for f in F]
        scale = _scale(torch.where(torch.isfinite(F[0]), F[0], 0))
        for p in range(len(hs) - 1):
            a, b = F[p], F[p + 1]
            fl = _floor(b, hs[p + 1]).unsqueeze(1)
            e = (a - b).abs()
            ok = finite[p] & finite[p + 1] & (e <= 1e-6 * scale.unsqueeze(1) + fl).all(dim=0) & ~done
            best[:, ok] = b[:, ok]
            tol[:, ok] = (1e-6 * scale.unsqueeze(1) + 8 * e + fl)[:, ok]
            done |= ok
        result.append((best, tol, done))
    return result


def _scale(c: torch.Tensor) -> torch.Tensor:
    """Per-order size of coefficients (K+1, ...): max_elements |c_k|."""
    if not c.numel():
        return torch.zeros(c.shape[0], dtype=c.dtype)
    return c.reshape(c.shape[0], -1).abs().amax(dim=1)


def _floor(c: torch.Tensor, h: float) -> torch.Tensor:
    """The rounding noise of an interpolation on [−h, h] in coefficient k."""
    f0 = float(c[0].abs().max()) if c.numel() else 0.0
    return torch.tensor([1e-11 * (1.0 + f0) / h ** k for k in range(K + 1)], dtype=D64)


# -- running a sample ---------------------------------------------------------------------------

def _float_leaves(sample, mode: str):
    """Positions (in the flattened (input, args, kwargs) tree) of the operands that become jets."""
    flat, spec = tree_flatten((sample.input, sample.args, sample.kwargs))
    floats = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor) and a.dtype == D64]
    if mode == "input":
        first = tree_flatten(sample.input)[0]
        n_first = len(first)
        floats = [i for i in floats if i < n_first]
    return flat, spec, floats


def _call(fn, flat, spec):
    a, args, kwargs = tree_unflatten(list(flat), spec)
    if isinstance(a, (list, tuple)):
        # ops like cat/stack take a list as their first argument
        return fn(a, *args, **kwargs)
    return fn(a, *args, **kwargs)


def _outputs(out) -> Tuple[list, Any]:
    return tree_flatten(out)


def _coeffs_of(o, Kp1: int):
    from curvrate_fast.jets.tensor import is_jet, pad_coeffs
    if is_jet(o):
        return pad_coeffs(o.coeffs.detach(), Kp1)
    if isinstance(o, torch.Tensor):
        return pad_coeffs(o.detach().unsqueeze(0), Kp1)
    return None


def run_sample(opinfo, sample, mode: str, index: int) -> Result:
    import curvrate_fast as cf
    from curvrate_fast.jets.tensor import JetError, JetTensor

    name = opinfo.name + ("." + opinfo.variant_test_name if opinfo.variant_test_name else "")
    flat, spec, floats = _float_leaves(sample, mode)
    if not floats:
        return Result(name, index, mode, "skipped", detail="no floating operand")
    if sum(flat[i].numel() for i in floats) > MAX_NUMEL:
        return Result(name, index, mode, "skipped", detail="sample too large")
    fn = opinfo.op
    gen = torch.Generator().manual_seed(SEED + index)
    dirs = {i: torch.randn(flat[i].shape, generator=gen, dtype=D64) for i in floats}
    base = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in flat]

    def plain_at(t: float):
        vals = list(base)
        for i in floats:
            vals[i] = base[i] + t * dirs[i]
        torch.manual_seed(SEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _call(fn, vals, spec)

    # the plain op must work on its own sample
    try:
        ref_out = plain_at(0.0)
        rng_after_plain = torch.get_rng_state()
    except Exception as e:  # noqa: BLE001
        return Result(name, index, mode, "skipped", detail=f"plain op fails: {type(e).__name__}")
    ref_flat, ref_spec = _outputs(ref_out)
    float_out = [i for i, o in enumerate(ref_flat) if isinstance(o, torch.Tensor)
                 and (o.is_floating_point() or o.is_complex())]

    # ours
    t0 = time.perf_counter()
    vals = list(base)
    for i in floats:
        vals[i] = JetTensor(torch.stack([base[i], dirs[i]]), K)
    torch.manual_seed(SEED)
    try:
        with cf.track_ops() as report, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _call(fn, vals, spec)
            ours_flat, ours_spec = _outputs(out)
            ours = [_coeffs_of(o, K + 1) for o in ours_flat]
        rng_after_ours = torch.get_rng_state()
    except JetError as e:
        return Result(name, index, mode, "clear error", detail=str(e).split("\n")[0][:300],
                      seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc().strip().splitlines()
        where = next((ln.strip() for ln in reversed(tb) if "curvrate_fast" in ln), "")
        return Result(name, index, mode, "unclear error",
                      detail=f"{type(e).__name__}: {str(e).splitlines()[0][:200]} [{where[:160]}]",
                      seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    decomposed = tuple(sorted(report.decomposed))
    path = "decomposition" if decomposed else "rule" if report.rules else "constant"
    res = Result(name, index, mode, "pass", path=path, decomposed=decomposed, seconds=seconds)

    if len(ours_flat) != len(ref_flat):
        res.status, res.detail = "mismatch", f"{len(ours_flat)} outputs, the op gives {len(ref_flat)}"
        return res
    if not torch.equal(rng_after_plain, rng_after_ours):
        res.status, res.detail = "mismatch", "the random-number stream differs from the plain call"
        return res
    # non-float outputs and shapes must equal the plain op's
    for i, (o, r) in enumerate(zip(ours_flat, ref_flat)):
        if isinstance(r, torch.Tensor):
            c = ours[i]
            if c is None or tuple(c.shape[1:]) != tuple(r.shape):
                res.status = "mismatch"
                res.detail = f"output {i}: shape {None if c is None else tuple(c.shape[1:])} vs {tuple(r.shape)}"
                return res
            if i not in float_out:
                if not torch.equal(c[0].to(r.dtype), r) or bool((c[1:] != 0).any()):
                    res.status, res.detail = "mismatch", f"output {i} (non-float) differs"
                    return res
        elif o != r and not (isinstance(o, float) and isinstance(r, float) and math.isclose(o, r)):
            res.status, res.detail = "mismatch", f"output {i}: {o!r} vs {r!r}"
            return res
    if not float_out:
        return res
    if any(ref_flat[i].dtype not in (D64, torch.complex128) for i in float_out):
        # A float64 input made into float32/float16/bfloat16 is a staircase along the path: the
        # polynomial fit cannot tell its (autograd) derivative 1 from the steps. Casts have their
        # own test (tests/test_seams.py).
        res.status, res.detail = "inconclusive", "an output in lower precision than float64"
        return res

    def g(t: float):
        out = _outputs(plain_at(t))[0]
        return [torch.view_as_real(out[i].resolve_conj()) if out[i].is_complex() else out[i].to(D64) for i in float_out]

    try:
        fits = oracle(g)
    except Exception as e:  # noqa: BLE001 - the op leaves its domain along the path
        res.status, res.detail = "inconclusive", f"the op fails along the path: {type(e).__name__}"
        return res
    if not any(bool(m.any()) for _, _, m in fits) and any(m.numel() for _, _, m in fits):
        res.status = "inconclusive"
        res.detail = "the polynomial fits did not converge (kink, pole or domain edge near the path)"
        return res
    worst = 0.0
    for j, i in enumerate(float_out):
        c = ours[i]
        c = (torch.view_as_real(c.resolve_conj()) if c.is_complex() else c.to(D64))
        o, tol, mask = fits[j]
        if c[0].numel() != o.shape[1]:
            res.status, res.detail = "mismatch", f"output {i}: coefficient shape {tuple(c.shape)}"
            return res
        c = c.reshape(K + 1, -1)[:, mask]
        o, tol = o[:, mask], tol[:, mask]
        if not c.numel():
            continue
        if not bool(torch.isfinite(c).all()):
            res.status, res.detail = "mismatch", f"output {i}: non-finite coefficients"
            return res
        diff = (c - o).abs()
        scale = _scale(o).unsqueeze(1)
        meaningful = scale > 1e3 * tol
        if bool(meaningful.any()):
            worst = max(worst, float((diff / scale)[meaningful.expand_as(diff)].max()))
        bad = diff > tol
        if bool(bad.any()):
            k, e = [int(v) for v in bad.nonzero()[0]]
            res.status = "mismatch"
            res.detail = (f"output {i}, order {k}: ours {c[k, e]:.6g}, oracle {o[k, e]:.6g} "
                          f"(tolerance {tol[k, e]:.2g})")
            res.err = worst
            return res
    res.err = worst
    return res


def samples_of(opinfo, max_samples: int):
    try:
        it = opinfo.sample_inputs("cpu", D64, requires_grad=False)
        out = []
        for s in it:
            out.append(s)
            if len(out) >= 4 * max_samples:
                break
    except Exception:  # noqa: BLE001
        return []
    # prefer small samples, keep the database's order otherwise
    def size(s):
        flat = tree_flatten((s.input, s.args, s.kwargs))[0]
        return sum(a.numel() for a in flat if isinstance(a, torch.Tensor))
    small = [s for s in out if size(s) <= MAX_NUMEL]
    return small[:max_samples]


def op_name(opinfo) -> str:
    return opinfo.name + ("." + opinfo.variant_test_name if opinfo.variant_test_name else "")


def float64_ops(names: Optional[Sequence[str]] = None):
    from torch.testing._internal.common_methods_invocations import op_db
    ops = [o for o in op_db if D64 in o.supported_dtypes("cpu") and op_name(o) not in SKIP_OPS]
    if names is not None:
        wanted = set(names)
        ops = [o for o in ops if op_name(o) in wanted or o.name in wanted]
    return ops


_ORDER = ["mismatch", "unclear error", "clear error", "decomposition", "rule", "constant"]


def classify(results: List[Result]) -> str:
    """The op's class: any silent mismatch or unclear error wins; else a clear error; else the
    weakest path that ran; 'no sample' when nothing was conclusive."""
    st = [r.status for r in results]
    if "mismatch" in st:
        return "mismatch"
    if "unclear error" in st:
        return "unclear error"
    if "clear error" in st:
        return "clear error"
    passed = [r for r in results if r.status == "pass"]
    if not passed:
        return "no sample"
    for c in ("decomposition", "rule", "constant"):
        if any(r.path == c for r in passed):
            return c
    return "rule"


def run_op(opinfo, max_samples: int = 3, modes=("input", "all")) -> OpSummary:
    results = []
    for idx, s in enumerate(samples_of(opinfo, max_samples)):
        done = set()
        for mode in modes:
            flat, spec, floats = _float_leaves(s, mode)
            key = tuple(floats)
            if key in done:
                continue
            done.add(key)
            results.append(run_sample(opinfo, s, mode, idx))
    return OpSummary(op_name(opinfo), classify(results), results)


def sweep(names=None, max_samples: int = 3, progress: bool = False) -> List[OpSummary]:
    out = []
    ops = float64_ops(names)
    for n, o in enumerate(ops):
        t = time.perf_counter()
        s = run_op(o, max_samples)
        out.append(s)
        if progress:
            print(f"[{n + 1}/{len(ops)}] {s.op}: {s.cls} ({time.perf_counter() - t:.1f} s)",
                  file=sys.stderr, flush=True)
    return out


def markdown(summaries: List[OpSummary], header: str = "") -> str:
    counts = collections.Counter(s.cls for s in summaries)
    lines = [header] if header else []
    lines += ["| class | ops |", "|---|---|"]
    for c in _ORDER + ["no sample"]:
        lines.append(f"| {c} | {counts.get(c, 0)} |")
    lines += ["", "| op | class | samples (pass/inconclusive/skipped) | worst rel. err | detail |",
              "|---|---|---|---|---|"]
    for s in sorted(summaries, key=lambda s: (_ORDER.index(s.cls) if s.cls in _ORDER else 99, s.op)):
        st = collections.Counter(r.status for r in s.results)
        worst = max((r.err for r in s.results if r.status == "pass"), default=0.0)
        det = next((r.detail for r in s.results if r.status in ("mismatch", "unclear error", "clear error")), "")
        if not det:
            dc = sorted({f for r in s.results for f in r.decomposed})
            det = ("decomposed: " + ", ".join(dc)) if dc else ""
            if not det and s.cls == "no sample":
                det = next((r.detail for r in s.results), "no sample input")
        det = det.replace("|", "\\|")
        lines.append(f"| `{s.op}` | {s.cls} | {st.get('pass', 0)}/{st.get('inconclusive', 0)}/"
                     f"{st.get('skipped', 0)} | {worst:.1e} | {det} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    p.add_argument("--max-samples", type=int, default=3)
    p.add_argument("--out", default=None, help="markdown table")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    names = a.ops.split(",") if a.ops else None
    t0 = time.perf_counter()
    res = sweep(names, a.max_samples, progress=True)
    wall = time.perf_counter() - t0
    import curvrate_fast  # noqa: F401
    head = (f"OpInfo sweep: torch {torch.__version__}, orders 0..{K}, float64, up to {a.max_samples} "
            f"samples per op, {len(res)} ops, {wall:.0f} s\n")
    md = markdown(res, head)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"op": s.op, "class": s.cls, "results": [r.__dict__ for r in s.results]}
                       for s in res], f, indent=1, default=str)
    print(md if not a.out else md.split("\n\n")[0])
    bad = [s.op for s in res if s.cls in ("mismatch", "unclear error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
