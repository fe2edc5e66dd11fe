"""PyTorch's own module database (``torch.testing._internal.common_modules.module_db``: every
``torch.nn`` layer with the sample inputs PyTorch tests it on) through the jet engine, in eval and
in train mode, against the finite-difference polynomial oracle of tests/_opinfo.py (shares no code
with the engine).

For each module that supports float64 and up to three of its samples: the module is built from
the sample's constructor arguments, its first floating forward argument becomes the jet x + t·u
(random u), the other arguments stay as given, and the output's coefficients 0..3 must equal the
oracle's wherever the oracle is conclusive. Random modules (dropout in train mode) draw the same
masks in the jet pass and in every oracle evaluation (the seed is fixed inside the call), so the
comparison is of one function. A module may instead raise a clear error (``JetError``, or a
``ValueError`` about its input, e.g. the NaN of KLDivLoss's sample); a mismatch or any other
exception fails.

The older configuration lists of ``torch.testing._internal.common_nn`` (``module_tests``,
``get_new_module_tests()``, ``criterion_tests``: 280 configurations, convolutions with every
padding mode and group count, padding layers, losses with each reduction) run the same way, in
eval mode: 237 exact, 1 clear error (CrossMapLRN2d, a custom autograd Function), the rest without
a floating input or a judgeable sample.
"""
from __future__ import annotations

import collections
import warnings

import pytest
import torch
from _oracle import fd_jet

import curvrate_fast as cf

common_modules = pytest.importorskip("torch.testing._internal.common_modules")

D64 = torch.float64
MAX_NUMEL = 2000
SAMPLES = 3


def _modules():
    return [mi for mi in common_modules.module_db if D64 in mi.dtypes]


def _name(mi) -> str:
    return getattr(mi, "name", None) or mi.module_cls.__name__


def _cases(mi, training: bool):
    """(forward(z), x) for the module's usable samples."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = mi.module_inputs_func(mi, device="cpu", dtype=D64, requires_grad=False, training=training)
    for mod_in in inputs[:SAMPLES]:
        if mod_in.forward_input is None:
            continue
        fargs, fkw = mod_in.forward_input.args, mod_in.forward_input.kwargs
        floats = [i for i, a in enumerate(fargs) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        if not floats or not 0 < fargs[floats[0]].numel() <= MAX_NUMEL:
            continue
        torch.manual_seed(0)
        module = mi.module_cls(*mod_in.constructor_input.args, **mod_in.constructor_input.kwargs).to(D64)
        module.train(training)
        i0 = floats[0]

        def forward(z, module=module, fargs=fargs, fkw=fkw, i0=i0):
            args = list(fargs)
            args[i0] = z
            torch.manual_seed(1)           # a random module draws the same masks in every call
            out = module(*args, **fkw)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if isinstance(out, torch.nn.utils.rnn.PackedSequence):
                out = out.data
            return out
        yield forward, fargs[i0].detach()


def run_module(mi, training: bool) -> tuple:
    """(status, detail): pass | clear error | mismatch | unclear error | no sample."""
    for k, (forward, x) in enumerate(_cases(mi, training)):
        try:
            plain = forward(x)
        except Exception:  # noqa: BLE001 - the sample does not run on its own
            continue
        if not isinstance(plain, torch.Tensor) or not plain.is_floating_point():
            continue
        u = torch.randn(x.shape, generator=torch.Generator().manual_seed(k + 5), dtype=D64)
        try:
            c = cf.jet(forward, x, u, 3)
        except cf.JetError as e:
            return "clear error", str(e)[:120]
        except ValueError as e:
            return "clear error", f"ValueError: {str(e)[:120]}"
        except Exception as e:  # noqa: BLE001
            return "unclear error", f"{type(e).__name__}: {str(e)[:200]}"
        try:
            best, tol, mask = fd_jet(lambda z: forward(z).detach(), [x], [u], 3)
        except RuntimeError:   # the path leaves the module's domain (BCELoss's [0, 1]): no oracle
            continue
        if float(mask.float().mean()) < 0.3:
            continue
        diff = (c.detach().reshape(4, -1).double() - best).abs()
        bad = (diff > tol)[:, mask]
        if bool(bad.any()):
            worst = float(diff[:, mask].max())
            return "mismatch", f"order {int(bad.nonzero()[0][0])}: max |ours − oracle| {worst:.3g}"
        return "pass", ""
    return "no sample", ""


MODULES = _modules()
CASES = [(mi, training) for mi in MODULES for training in (False, True)]


@pytest.fixture(scope="module")
def sweep():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {(_name(mi), training): run_module(mi, training) for mi, training in CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name, training", [(_name(mi), t) for mi, t in CASES],
                         ids=[f"{_name(mi)}-{'train' if t else 'eval'}" for mi, t in CASES])
def test_module_is_exact_or_a_clear_error(sweep, name, training):
    status, detail = sweep[(name, training)]
    mode = "train" if training else "eval"
    assert status not in ("mismatch", "unclear error"), f"{name} ({mode}): {status}: {detail}"


def test_the_module_sweep_is_conclusive(sweep, capsys):
    counts = collections.Counter(status for status, _ in sweep.values())
    with capsys.disabled():
        print("\nmodule_db classification:", dict(sorted(counts.items())))
    assert counts["pass"] >= 0.9 * len(sweep), counts


def test_the_module_sweep_catches_a_wrong_rule(monkeypatch):
    """The harness fails a module whose rule is wrong (tanh's rule replaced by sin's)."""
    from curvrate_fast.jets import registry
    mi = next(mi for mi in MODULES if mi.module_cls is torch.nn.Tanh)
    for f in (torch.tanh, torch.Tensor.tanh, torch.nn.functional.tanh):
        monkeypatch.setitem(registry._RULES, f, registry.lookup(torch.sin))
    assert run_module(mi, False)[0] == "mismatch"


# -- the older lists of torch.testing._internal.common_nn: module and criterion configurations -----

common_nn = pytest.importorskip("torch.testing._internal.common_nn")


def _nn_configs():
    out = []
    for d in common_nn.module_tests + common_nn.get_new_module_tests() + common_nn.criterion_tests:
        name = d.get("fullname") or "_".join(str(v) for v in (d.get("module_name"), d.get("desc")) if v)
        if d.get("check_complex") or "complex" in name.lower():
            continue
        out.append((name, d))
    return out


def run_config(d) -> tuple:
    """One common_nn configuration (module in eval mode, float64, its input the jet; a criterion's
    target fixed): (status, detail) as :func:`run_module`."""
    try:
        torch.manual_seed(0)
        module = d["constructor"](*d.get("constructor_args", ())) if "constructor" in d else \
            getattr(torch.nn, d["module_name"])(*d.get("constructor_args", ()))
        module = module.to(D64).eval()
        x = d["input_fn"]() if "input_fn" in d else torch.randn(d["input_size"])
        target = d["target_fn"]() if "target_fn" in d else \
            (torch.randn(d["target_size"]) if "target_size" in d else None)
    except Exception:  # noqa: BLE001 - a configuration that does not build here
        return "no sample", "does not build"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not 0 < x.numel() <= MAX_NUMEL:
        return "no sample", "no floating input"
    x = x.to(D64)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        target = target.to(D64)

    def forward(z):
        torch.manual_seed(1)
        out = module(z) if target is None else module(z, target)
        return out[0] if isinstance(out, (tuple, list)) else out
    try:
        plain = forward(x)
    except Exception:  # noqa: BLE001
        return "no sample", "the plain call fails"
    if not isinstance(plain, torch.Tensor) or not plain.is_floating_point():
        return "no sample", "no floating output"
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=D64)
    try:
        c = cf.jet(forward, x, u, 3)
    except (cf.JetError, ValueError) as e:
        return "clear error", str(e)[:120]
    except Exception as e:  # noqa: BLE001
        return "unclear error", f"{type(e).__name__}: {str(e)[:200]}"
    try:
        best, tol, mask = fd_jet(lambda z: forward(z).detach(), [x], [u], 3)
    except RuntimeError:
        return "no sample", "the path leaves the module's domain"
    if float(mask.float().mean()) < 0.3:
        return "no sample", "the oracle is inconclusive"
    diff = (c.detach().reshape(4, -1).double() - best).abs()
    bad = (diff > tol)[:, mask]
    if bool(bad.any()):
        return "mismatch", f"order {int(bad.nonzero()[0][0])}: max |ours − oracle| {float(diff[:, mask].max()):.3g}"
    return "pass", ""


NN_CONFIGS = _nn_configs()


@pytest.fixture(scope="module")
def nn_sweep():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [(name, run_config(d)) for name, d in NN_CONFIGS]
    finally:
        torch.set_num_threads(threads)


def test_common_nn_configurations_are_exact_or_clear_errors(nn_sweep, capsys):
    """torch's module_tests, new module tests and criterion tests (common_nn): convolutions with
    every padding mode and group count, pooling, padding layers, losses with each reduction..."""
    bad = [(name, status, detail) for name, (status, detail) in nn_sweep
           if status in ("mismatch", "unclear error")]
    counts = collections.Counter(status for _, (status, _) in nn_sweep)
    with capsys.disabled():
        print("\ncommon_nn classification:", dict(sorted(counts.items())))
    assert not bad, bad
    assert counts["pass"] >= 0.8 * len(nn_sweep), counts
