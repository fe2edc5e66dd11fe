"""The guard's module walk and its memo (curvrate_fast.guard_keys): a remembered walk is reused
only while nothing it read can have changed, and every kind of change is seen."""
import gc
import weakref

import pytest
import torch
from torch import nn

from curvrate_fast import guard_keys as gk

pytestmark = pytest.mark.skipif(gk._dict_version is None, reason="no dict version tags on this Python")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
        self.scale = 2.0
        self.cfg = {"mode": "a", "inner": {"k": 1}}
        self.register_buffer("offset", torch.zeros(2))

    def forward(self, x):
        return self.body(x) * self.scale + self.offset


def _fresh(m):
    return gk._walk(m, None)[0]


def _same_state(a, b) -> bool:
    return ([(n, id(t)) for n, t in a.params] == [(n, id(t)) for n, t in b.params]
            and [(n, id(t)) for n, t in a.buffers] == [(n, id(t)) for n, t in b.buffers] and a.flags == b.flags)


@pytest.fixture
def walks(monkeypatch):
    """Counts the walks _module_state makes."""
    count = [0]
    walk = gk._walk

    def counting(m, dicts):
        count[0] += 1
        return walk(m, dicts)
    monkeypatch.setattr(gk, "_walk", counting)
    return count


def test_memo_reused_while_unchanged(walks):
    m = _Net()
    first = gk._module_state(m)
    for _ in range(3):
        assert gk._module_state(m) is first
    assert walks[0] == 1
    assert _same_state(first, _fresh(m))


def _set_attr(m):
    m.scale = 3.0


def _set_int_to_float(m):
    m.body[0].in_features = 2.0     # equal to 2, another type: another key


def _new_attr(m):
    m.extra = "x"


def _eval(m):
    m.eval()


def _dict_in_place(m):
    m.cfg["mode"] = "b"


def _nested_dict_in_place(m):
    m.cfg["inner"]["k"] = 2


def _replace_param(m):
    m.body[0].weight = nn.Parameter(torch.randn(4, 2))


def _replace_child(m):
    m.body[1] = nn.ReLU()


def _add_child(m):
    m.body.append(nn.Identity())


def _new_buffer(m):
    m.body[0].register_buffer("b", torch.ones(1))


def _forward_hook(m):
    m.body[2].register_forward_hook(lambda *a: None)


def _state_dict_hook(m):
    m.body[0]._register_state_dict_hook(lambda *a: None)


def _swap_child_class(m):
    class Tanh2(nn.Tanh):
        pass
    m.body[1].__class__ = Tanh2


def _swap_root_class(m):
    class Net2(_Net):
        pass
    m.__class__ = Net2


def _replace_dict(m):
    m.body[2].__dict__ = dict(m.body[2].__dict__, out_features=3)


@pytest.mark.parametrize("change", [_replace_dict, _set_attr, _set_int_to_float, _new_attr, _eval, _dict_in_place,
                                    _nested_dict_in_place, _replace_param, _replace_child, _add_child,
                                    _new_buffer, _forward_hook, _state_dict_hook, _swap_child_class,
                                    _swap_root_class])
def test_every_change_is_seen(change, walks):
    m = _Net()
    before = gk._module_state(m)
    change(m)
    after = gk._module_state(m)
    assert walks[0] == 2, "the change went unseen: the remembered walk was replayed"
    assert _same_state(after, _fresh(m))
    assert not _same_state(before, after)


def test_in_place_parameter_change_is_not_structure(walks):
    """Values and metadata of a parameter are read by the guard at every call, not memoized."""
    m = _Net()
    first = gk._module_state(m)
    with torch.no_grad():
        m.body[0].weight.mul_(2)
    m.body[0].weight.requires_grad_(False)
    assert gk._module_state(m) is first and walks[0] == 1
    assert first.params[0][1] is m.body[0].weight


def test_list_attribute_followed_by_contents(walks):
    """A list of primitives (a conv layer's padding list) is followed by its contents: the memo is
    kept, and an in-place change is seen."""
    m = _Net()
    m.body[0].sizes = [1, 2]
    first = gk._module_state(m)
    assert gk._module_state(m) is first and walks[0] == 1
    m.body[0].sizes.append(3)
    after = gk._module_state(m)
    assert walks[0] == 2 and after.flags != first.flags


class _Holder:
    def __init__(self, obj):
        self.obj = obj


@pytest.mark.parametrize("make", [lambda m: {"a", "b"}, lambda m: (lambda x: x), lambda m: _Holder(m),
                                  lambda m: m.forward])
def test_unfollowed_attributes_walk_every_call(make, walks):
    """A set, a function, any other object (which could hold the module itself, as a bound method
    does): no memo, the walk runs at every call (so an in-place change is seen, and no memo keeps
    the module alive)."""
    m = _Net()
    attr = make(m)
    m.body[0].extra = attr
    a = gk._module_state(m)
    if isinstance(attr, set):
        attr.add("c")
    b = gk._module_state(m)
    assert walks[0] == 2
    if isinstance(attr, set):
        assert a.flags != b.flags
    assert id(m) not in gk._MEMOS


def test_module_with_a_bound_method_hook_is_freed():
    """A child holding a bound method of the root: freed once unreachable (no memo holds it)."""
    m = _Net()
    m.body[0].extra = m.forward
    gk._module_state(m)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_memo_dropped_with_the_module():
    m = _Net()
    gk._module_state(m)
    key = id(m)
    assert key in gk._MEMOS
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None
    assert key not in gk._MEMOS


def test_one_and_true_are_different_keys():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    a.flag, b.flag = 1, True
    assert gk._submodule_key(a) != gk._submodule_key(b)


@pytest.mark.parametrize("value", [1, True, 2.0, "s", None, torch.float32, torch.Size([2]), (2, 3), (), (1, "a", None),
                                   [1, 2], {"a": 1}, (1, [2])])
def test_flatten_keys_constants_as_const_does(value):
    """The guard's shortcuts for primitive and tuple-of-primitive arguments give _Const's key."""
    from curvrate_fast.capture import CompiledLoss
    _, layout, key = CompiledLoss(lambda v: None)._flatten((value,), {})
    assert key[0] == ("C", gk._Const(value).key) and layout[0] == ("C", value)
