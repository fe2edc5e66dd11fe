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


def test_require_finite_names_the_input_and_counts_the_bad_values():
    """One wording for every input check: the input's name and how many values are NaN or Inf."""
    from curvrate_fast.finite import require_finite
    for dtype in (torch.float32, torch.float16, torch.float64, torch.complex64):
        t = torch.ones(4, 5, dtype=dtype)
        require_finite(t, "x")                        # finite: nothing raised
        t[1, 2] = float("nan")
        t[3, 0] = float("-inf")
        with pytest.raises(ValueError, match=r"^x contains 2 NaN or Inf value\(s\)$"):
            require_finite(t, "x")
    if hasattr(torch, "float8_e4m3fn"):
        f8 = torch.tensor([1.0, float("nan"), 2.0]).to(torch.float8_e4m3fn)
        with pytest.raises(ValueError, match="u contains 1 NaN"):
            require_finite(f8, "u")
    require_finite(torch.arange(3), "labels")          # integers are finite
    import curvrate_fast as cf
    x = torch.randn(3, 2)
    x[0, 0] = float("inf")
    for call, name in ((lambda: cf.jet(torch.tanh, x, torch.ones_like(x), 2), "x"),
                       (lambda: cf.crr_penalty(torch.nn.Linear(2, 2), torch.randn(3, 2), torch.tensor([0, 1, 0]),
                                               directions=x), "directions")):
        with pytest.raises(ValueError, match=f"{name} contains 1 NaN or Inf value"):
            call()
