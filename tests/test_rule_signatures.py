"""Every way Python can call a registered torch op reaches its Taylor rule or a clear error.

OpInfo's samples (tests/test_opinfo.py) call ops positionally; real code does not always: BLOOM's
attention calls ``alibi.baddbmm(batch1=q, batch2=k, beta=β, alpha=α)``, which once met a rule shared
with addmm (``mat1``/``mat2``) and failed with Python's TypeError about an internal function. Here:

- the keyword names of every Python signature torch's argument parser accepts for a registered
  builtin op (read from the parser's own error message) are taken by its rule, but for a short
  list of forms refused with a JetError on purpose;
- a call a rule cannot bind raises a JetError that names the op (the dispatcher's safety net);
- the keyword forms that were fixed give the same jets as the positional ones, equal to the float64
  nested-autograd oracle, and torch's operand checks of mm/bmm/addmm/baddbmm/addbmm hold on jets
  (torch.matmul's broadcasting, which the rules use, would let a 3-D operand of mm through).
"""
from __future__ import annotations

import ast
import inspect
import os
import re

import pytest
import torch
from _oracle import rand, rel_err

import curvrate_fast as cf
from curvrate_fast import baseline
from curvrate_fast.jets import registry

D64 = torch.float64

# names torch's type stubs list that its argument parser refuses (Tensor.requires_grad_(mode=...),
# torch._C._nn.fractional_max_pool2d(_random_samples=...): the parser's name is random_samples)
NOT_TORCHS = {"requires_grad_": {"mode"}, "fractional_max_pool2d": {"_random_samples"},
              "fractional_max_pool3d": {"_random_samples"}}


def _stub_signatures() -> dict:
    """{("torch" | "Tensor", name): [set of keyword names, one per overload]} from the type stubs
    that torch generates from the same native signatures as its argument parser
    (torch/_C/_VariableFunctions.pyi, and class TensorBase in torch/_C/__init__.pyi)."""
    root = os.path.join(os.path.dirname(torch.__file__), "_C")
    out: dict = {}
    for where, fname, cls in (("torch", "_VariableFunctions.pyi", None), ("Tensor", "__init__.pyi", "TensorBase"),
                              ("torch", "_nn.pyi", None)):
        tree = ast.parse(open(os.path.join(root, fname)).read())
        body = tree.body if cls is None else next(n for n in tree.body
                                                  if isinstance(n, ast.ClassDef) and n.name == cls).body
        for node in body:
            if isinstance(node, ast.FunctionDef):
                a = node.args
                out.setdefault((where, node.name), []).append(
                    {x.arg for x in a.args + a.kwonlyargs} - {"self" if cls else "", "out"})
    return out


def _parser_signatures(func) -> list:
    """The keyword names of each overload torch's argument parser lists in the TypeError of a call
    with an unknown keyword (ops with several overloads: torch.special, torch.linalg...)."""
    try:
        if type(func).__name__ == "method_descriptor":
            func(torch.zeros(1), __no_such_keyword__=1)
        else:
            func(__no_such_keyword__=1)
    except TypeError as e:
        sigs = re.findall(r"\* \((.*)\)", str(e))
    except Exception:  # noqa: BLE001 - an op that fails otherwise lists nothing
        return []
    else:
        return []
    names = []
    for sig in sigs:
        if "Dimname" in sig:   # named tensors: not jets
            continue
        parts = [p.strip() for p in sig.split(",")]
        names.append({p.split("=")[0].split()[-1] for p in parts if p and p != "*"} - {"out"})
    return names


def _builtin_rules():
    for func, rule in registry._RULES.items():
        if type(func).__name__ in ("builtin_function_or_method", "method_descriptor") \
                and not func.__name__.startswith("_"):
            yield func, rule


def _torchs_keywords(func, stubs) -> list:
    where = "Tensor" if type(func).__name__ == "method_descriptor" else "torch"
    return stubs.get((where, func.__name__), []) + _parser_signatures(func)


def test_the_signatures_are_read():
    """The harness is not vacuous: it reads torch's signatures of most registered ops, baddbmm's
    keyword names among them."""
    stubs = _stub_signatures()
    assert any({"batch1", "batch2", "beta", "alpha"} <= s for s in _torchs_keywords(torch.baddbmm, stubs))
    rules = list(_builtin_rules())
    assert sum(1 for f, _ in rules if _torchs_keywords(f, stubs)) > 0.8 * len(rules)


def test_every_keyword_of_a_registered_op_reaches_its_rule():
    """Every keyword torch takes for a registered op is a parameter of its rule, but ``input`` and
    ``self`` where the rule takes the first argument positionally (the dispatcher moves them there)."""
    stubs = _stub_signatures()
    missing = {}
    for func, rule in _builtin_rules():
        try:
            params = inspect.signature(rule).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue              # the rule hands keywords on to torch
        taken = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        first = next(iter(params.values()), None)
        if first is not None and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD,
                                                first.VAR_POSITIONAL):
            taken |= {"input", "self"}
        names = set().union(*_torchs_keywords(func, stubs))
        lost = names - taken - NOT_TORCHS.get(func.__name__, set())
        if lost:
            missing[getattr(func, "__qualname__", func.__name__)] = sorted(lost)
    assert not missing, f"keywords torch accepts that the Taylor rules do not: {missing}"


def test_a_call_the_rule_cannot_bind_is_a_jet_error_naming_the_op(monkeypatch):
    """A form of the call that torch takes and a rule does not (here a rule that lacks ``out``,
    called as torch.sin(x, out=None)) raises a JetError naming the op, not a TypeError about an
    internal function; a TypeError raised inside a rule that did bind propagates as it is."""
    x, u = rand(3, 4, seed=0), rand(3, 4, seed=1)
    sin = registry.lookup(torch.sin)
    monkeypatch.setitem(registry._RULES, torch.sin, lambda input: sin(input))
    with pytest.raises(cf.JetError, match=r"torch\.sin with a jet: its Taylor rule does not take this form"):
        cf.jet(lambda a: torch.sin(a, out=None), x, u, 2)

    def bad_rule(input):
        raise TypeError("the rule's own TypeError")
    monkeypatch.setitem(registry._RULES, torch.sin, bad_rule)
    with pytest.raises(TypeError, match="the rule's own TypeError"):
        cf.jet(torch.sin, x, u, 2)


def test_the_first_argument_by_torchs_name_reaches_the_rule():
    """``input=`` / ``self=`` (torch's names for the first argument, also in the scalar-first
    overloads) are moved to the rule's first parameter, whatever the rule calls it."""
    x, u = rand(3, 3, seed=0) + 3 * torch.eye(3, dtype=D64), rand(3, 3, seed=1)
    for f in (lambda a: torch.det(input=a), lambda a: torch.pow(self=2.0, exponent=a),
              lambda a: torch.inverse(input=a), lambda a: torch.xlogy(self=1.5, other=a.exp())):
        assert rel_err(cf.jet(f, x, u, 3), baseline.jet(f, x, u, 3)) < 1e-12


# -- the keyword forms, against the oracle ---------------------------------------------------------

A = rand(3, 4, 5, seed=2)
U = rand(3, 4, 5, seed=3)
B3 = rand(3, 5, 2, seed=4)
C3 = rand(3, 4, 2, seed=5)

KEYWORD_FORMS = {
    # BLOOM's attention scores: alibi.baddbmm(batch1=..., batch2=..., beta=..., alpha=...)
    "Tensor.baddbmm": lambda a: C3.baddbmm(batch1=a, batch2=B3, beta=0.5, alpha=2.0),
    "torch.baddbmm jet·jet, beta=0": lambda a: torch.baddbmm(C3, batch1=a, batch2=a.transpose(1, 2)[:, :, :2],
                                                             beta=0, alpha=-1.5),
    "torch.addmm": lambda a: torch.addmm(C3[0], mat1=a[0], mat2=B3[0], beta=0.3, alpha=1.2),
    "torch.addmm, the input the only jet": lambda a: torch.addmm(a[0, :, :2], A[1], B3[0], beta=0.3, alpha=1.2),
    "torch.baddbmm, the input the only jet": lambda a: torch.baddbmm(a[:, :, :2], A, B3, beta=2.0),
    "torch.addbmm, the input the only jet": lambda a: torch.addbmm(a[0, :, :2], A, B3),
    "Tensor.addmm jet·jet": lambda a: C3[0].addmm(mat1=a[0], mat2=a[1].t()[:, :2]),
    "torch.addbmm": lambda a: torch.addbmm(C3[0], batch1=a, batch2=B3, alpha=0.7),
    "torch.mm": lambda a: torch.mm(a[0], mat2=B3[0]),
    "torch.bmm jet·jet": lambda a: torch.bmm(a, mat2=a.transpose(1, 2)),
    "torch.max other=": lambda a: torch.max(a, other=a.flip(0)),
    "Tensor.min other=": lambda a: a.min(other=1.2 * a.flip(0)),
    "linalg.pinv input=": lambda a: torch.linalg.pinv(input=a),
    "view_copy size=": lambda a: torch.view_copy(a, size=(12, 5)),
}


@pytest.mark.parametrize("name", list(KEYWORD_FORMS))
def test_keyword_forms_match_the_oracle(name):
    f = KEYWORD_FORMS[name]
    ours = cf.jet(f, A, U, 3)
    ref = baseline.jet(f, A, U, 3)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-12, name


def test_special_polynomials_take_torchs_argument_names():
    """torch.special.*_polynomial_*(x, n): the keyword form equals the positional one (nested
    autograd has no derivative for these: compared with each other, the positional form being
    checked against finite differences in the OpInfo sweep)."""
    x = A.tanh()
    for name in ("chebyshev_polynomial_t", "hermite_polynomial_h", "legendre_polynomial_p"):
        op = getattr(torch.special, name)
        a = cf.jet(lambda v: op(x=v, n=3), x, U, 3)
        b = cf.jet(lambda v: op(v, 3), x, U, 3)
        assert torch.equal(a, b), name


@pytest.mark.parametrize("call, message", [
    (lambda a: torch.mm(a, B3[0]), "mm: the first operand must be a 2-D tensor"),
    (lambda a: torch.bmm(a, B3[:1]), "bmm: the batch sizes differ"),
    (lambda a: torch.baddbmm(C3, a[0], B3[0]), "baddbmm: the first operand must be a 3-D tensor"),
    (lambda a: torch.addmm(C3, a[0], B3[0]), r"addmm: input of shape \(3, 4, 2\) does not broadcast"),
    (lambda a: torch.addbmm(C3, a, B3), r"addbmm: input of shape \(3, 4, 2\) does not broadcast"),
])
def test_products_keep_torchs_operand_checks(call, message):
    with pytest.raises((RuntimeError, IndexError)):
        call(A)            # torch refuses the plain call
    with pytest.raises(RuntimeError, match=message):
        cf.jet(call, A, U, 2)


def test_python_functions_keywords_reach_their_rules():
    """torch's Python-level functions with rules (F.layer_norm, F.softmax, F.dropout...) hand their
    arguments to the rule as they received them: every keyword of the function's own signature is
    a parameter of its rule."""
    import types
    missing, seen = {}, 0
    for func, rule in registry._RULES.items():
        if not isinstance(func, types.FunctionType):
            continue
        try:
            fparams = inspect.signature(func).parameters
            rparams = inspect.signature(rule).parameters
        except (TypeError, ValueError):
            continue
        seen += 1
        if any(p.kind is p.VAR_KEYWORD for p in rparams.values()):
            continue
        taken = {n for n, p in rparams.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        first = next(iter(rparams.values()), None)
        if first is not None and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD,
                                                first.VAR_POSITIONAL):
            taken |= {"input", "self"}
        names = {n for n, p in fparams.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"out"}
        if names - taken:
            missing[f"{func.__module__}.{func.__qualname__}"] = sorted(names - taken)
    assert seen > 100
    assert not missing, missing
