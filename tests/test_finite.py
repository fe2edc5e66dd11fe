"""curvrate_fast.finite.all_finite against torch.isfinite(t).all() (the oracle): every floating
and complex dtype, a bad value at every kind of place, sums of finite values that overflow, and the
tensors that are finite by type (integers, bools, empty)."""
import pytest
import torch

from curvrate_fast.finite import all_finite

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]


def _oracle(t):
    return bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_agrees_with_isfinite(dtype):
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (128, 2), (3, 5, 11)]:
        base = torch.randn(shape, generator=g).to(dtype)
        assert all_finite(base) and _oracle(base)
        for bad in (float("nan"), float("inf"), float("-inf")):
            for where in (0, base.numel() // 2, base.numel() - 1):
                t = base.clone()
                t.view(-1)[where] = bad
                assert all_finite(t) is False and _oracle(t) is False, (shape, bad, where)
        if dtype.is_complex:     # a bad imaginary part alone
            t = base.clone()
            t.view(-1)[0] = complex(1.0, float("inf"))
            assert all_finite(t) is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_a_sum_that_overflows_is_still_finite(dtype):
    big = torch.finfo(dtype).max / 2
    t = torch.full((64,), big, dtype=dtype)
    if dtype != torch.float16:     # the quick sum overflows: the exact check answers
        assert torch.isinf(t.sum(dtype=torch.float64 if dtype == torch.float64 else torch.float32))
    assert all_finite(t) is True
    t2 = torch.tensor([big, -big, big, float("inf")], dtype=dtype)
    assert all_finite(t2) is False
    # +Inf and -Inf together sum to NaN: still caught
    t3 = torch.tensor([1.0, float("inf"), float("-inf")], dtype=dtype)
    assert all_finite(t3) is False


def test_finite_by_type_and_empty():
    assert all_finite(torch.tensor([1, 2, -3]))
    assert all_finite(torch.tensor([True, False]))
    assert all_finite(torch.zeros(0))
    assert all_finite(torch.zeros(0, 3, dtype=torch.float16))


def test_half_precision_sums_in_float32():
    # 4096 × 30000 overflows a float16 sum (max 65504) but not a float32 one: no slow path needed,
    # and the answer is right either way
    t = torch.full((4096,), 30000.0, dtype=torch.float16)
    assert all_finite(t)


def test_a_tensor_that_requires_grad_is_checked_without_a_graph():
    t = torch.randn(5, requires_grad=True)
    assert all_finite(t) and t.grad_fn is None and t.grad is None
    bad = t.detach().clone()
    bad[2] = float("nan")
    assert not all_finite(bad.requires_grad_(True))


@pytest.mark.parametrize("dtype", [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)],
                         ids=str)
def test_float8(dtype):
    assert all_finite(torch.randn(16).to(dtype))
    assert not all_finite(torch.tensor([1.0, float("nan")]).to(dtype))
