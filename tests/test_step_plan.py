"""optim_update.step_plan: what a captured step reads off an optimizer, remembered per optimizer
only while nothing it was read from has changed; every kind of change is seen, and the memo
keeps no optimizer alive."""
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from curvrate_fast import CaptureError, optim_update
from curvrate_fast.guard_keys import _dict_version

pytestmark = pytest.mark.skipif(_dict_version is None, reason="no dict version tags on this Python")


@pytest.fixture
def plans(monkeypatch):
    """Counts the plans made (not taken from the memo)."""
    made = [0]
    cls = optim_update.StepPlan

    class Counting(cls):
        __slots__ = ()

        def __init__(self, *a, **k):
            made[0] += 1
            super().__init__(*a, **k)
    monkeypatch.setattr(optim_update, "StepPlan", Counting)
    return made


def _setup():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), list(model.parameters())


def test_plan_reused_while_unchanged(plans):
    _, opt, wrt = _setup()
    first = optim_update.step_plan(opt, wrt)
    assert optim_update.step_plan(opt, wrt) is first and plans[0] == 1
    assert first.names == (("step", "exp_avg", "exp_avg_sq"),) * 4
    assert first.positions == tuple((0, (j,)) for j in range(4))


def _lr(opt, model):
    opt.param_groups[0]["lr"] = 5e-3


def _amsgrad(opt, model):
    opt.param_groups[0]["amsgrad"] = True


def _new_group(opt, model):
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def _params_in_place(opt, model):
    opt.param_groups[0]["params"].pop()


def _group_replaced(opt, model):
    opt.param_groups[0] = dict(opt.param_groups[0])


@pytest.mark.parametrize("change", [_lr, _amsgrad, _new_group, _params_in_place, _group_replaced])
def test_every_change_is_seen(change, plans):
    model, opt, wrt = _setup()
    before = optim_update.step_plan(opt, wrt)
    change(opt, model)
    after = optim_update.step_plan(opt, wrt)
    assert plans[0] == 2 and after is not before
    if change is _amsgrad:
        assert after.names[0] == ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    if change is _params_in_place:
        assert len(after.owned) == 3


def test_other_tensors_another_plan(plans):
    _, opt, wrt = _setup()
    optim_update.step_plan(opt, wrt)
    assert len(optim_update.step_plan(opt, wrt[:2]).owned) == 2 and plans[0] == 2


def test_refusals_seen_after_a_memo():
    """What rule_for refuses is refused also once a plan is remembered."""
    _, opt, wrt = _setup()
    optim_update.step_plan(opt, wrt)
    h = opt.register_step_pre_hook(lambda o, a, k: None)
    with pytest.raises(CaptureError, match="hook"):
        optim_update.step_plan(opt, wrt)
    h.remove()
    optim_update.step_plan(opt, wrt)
    from torch.optim.optimizer import register_optimizer_step_post_hook
    g = register_optimizer_step_post_hook(lambda o, a, k: None)
    try:
        with pytest.raises(CaptureError, match="hook"):
            optim_update.step_plan(opt, wrt)
    finally:
        g.remove()
    optim_update.step_plan(opt, wrt)
    opt.param_groups[0]["my_option"] = 1
    with pytest.raises(CaptureError, match="my_option"):
        optim_update.step_plan(opt, wrt)
    del opt.param_groups[0]["my_option"]
    optim_update.step_plan(opt, wrt)
    opt.step = lambda closure=None: None
    with pytest.raises(CaptureError, match="replaced"):
        optim_update.step_plan(opt, wrt)


def test_memo_keeps_no_optimizer_alive():
    """Dropped with its optimizer, also one a scheduler has wrapped (a bound method of it in its
    own dict)."""
    _, opt, wrt = _setup()
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    optim_update.step_plan(opt, wrt)
    key = id(opt)
    assert key in optim_update._PLANS
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None and key not in optim_update._PLANS
