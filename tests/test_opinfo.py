"""PyTorch's own operator database through the jet engine (tests/_opinfo.py): every op that
supports float64 on the CPU, up to three of its own sample inputs, the first operand or every
floating operand as jets, orders 0..3, against a finite-difference polynomial oracle that shares
no code with the engine. No op may give a silent wrong answer or an unclear error; the table of
the full run is docs/opinfo.md (`python tests/_opinfo.py --out docs/opinfo.md`)."""
import collections

import _opinfo
import pytest
import torch

OPS = _opinfo.float64_ops()
NAMES = [_opinfo.op_name(o) for o in OPS]


@pytest.fixture(scope="module")
def sweep():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {s.op: s for s in (_opinfo.run_op(o) for o in OPS)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_op_is_exact_or_a_clear_error(sweep, name):
    s = sweep[name]
    bad = [r for r in s.results if r.status in ("mismatch", "unclear error")]
    assert not bad, f"{name}: {bad[0].status}: {bad[0].detail} (sample {bad[0].sample}, mode {bad[0].mode})"


def test_the_sweep_is_conclusive(sweep, capsys):
    """The oracle must decide most ops: an inconclusive sweep would pass vacuously."""
    counts = collections.Counter(s.cls for s in sweep.values())
    with capsys.disabled():
        print("\nOpInfo classification:", dict(sorted(counts.items())))
    decided = counts["rule"] + counts["decomposition"] + counts["constant"] + counts["clear error"]
    assert decided >= 0.9 * len(sweep), counts
    assert counts["mismatch"] == 0 and counts["unclear error"] == 0


# The ops the engine refuses with a clear error, each for a documented reason (docs/opinfo.md). A
# rule that starts refusing (as addmm/baddbmm/addbmm once did, when their input was the only jet)
# fails here: a refusal is a deliberate choice, made by editing this list and the docs.
CLEAR_ERRORS = {
    "__rpow__", "_batch_norm_with_update", "_native_batch_norm_legit", "igamma", "igammac",
    "linalg.norm.subgradients_at_zero", "linalg.pinv.singular", "native_batch_norm", "nn.functional.batch_norm",
    "nn.functional.cosine_embedding_loss", "nn.functional.hinge_embedding_loss", "pca_lowrank", "resize_",
    "special.airy_ai", "special.zeta", "svd_lowrank",
}


def test_only_the_documented_ops_refuse(sweep):
    refused = {name for name, s in sweep.items() if s.cls == "clear error"}
    new = sorted(refused - CLEAR_ERRORS)
    assert not new, {n: next(r.detail for r in sweep[n].results if r.status == "clear error") for n in new}


def test_the_oracle_catches_a_wrong_rule(monkeypatch):
    """The harness fails an op whose rule is wrong (here: sin's rule replaced by cos's)."""
    from curvrate_fast.jets import registry
    op = next(o for o in OPS if _opinfo.op_name(o) == "sin")
    monkeypatch.setitem(registry._RULES, torch.sin, registry.lookup(torch.cos))
    s = _opinfo.run_op(op)
    assert s.cls == "mismatch"
