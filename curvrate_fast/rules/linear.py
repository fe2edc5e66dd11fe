"""Taylor rules for linear and bilinear maps: linear, matmul/mm/bmm/einsum, conv and transposed
conv (docs/math.md §2). A linear map with a constant weight runs all stored coefficients through ONE
call, stacked along the batch axis ((n+1)·B rows in one GEMM or convolution, so the weight is read
once); the bias joins coefficient 0 only. When both operands are jets (attention's q·kᵀ, a
hypernetwork's weight) the result is the Cauchy product (ab)_k = Σ_j a_j b_{k−j}."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cpu_gemm import eager_linear
from ..jets.registry import register, tracing
from ._common import (
    JetTensor,
    aliases,
    beta_input_plus_alpha_prod,
    cauchy_op,
    is_jet,
    lift,
    make_jet,
    order_of,
    per_coefficient,
)
from .activations import use_triton


def _add_bias0(y: Tensor, bias: Optional[Tensor], view_shape=None) -> Tensor:
    """Add a constant bias to coefficient 0 of stacked coefficients y (n+1, ...)."""
    if bias is None:
        return y
    b = bias if view_shape is None else bias.reshape(view_shape)
    # y is a fresh GEMM/conv output that its own backward does not need: add in place, no copy.
    y.select(0, 0).add_(b)
    return y


@register(F.linear, torch._C._nn.linear)
def linear(input, weight, bias=None):
    K = order_of(input, weight, bias)
    if is_jet(weight) or is_jet(bias):
        y = make_jet(cauchy_op(lambda a, w: F.linear(a, w), input, weight, K), K)
        return y + bias if bias is not None else y
    # (n+1, *, in) rows through one GEMM; an unbatched (in,) input stacks to (n+1, in) rows.
    x = input._coeffs
    if use_triton(x, K) and x.dtype == weight.dtype and x.device == weight.device:
        # Deferred: a following activation runs GEMM + bias + activation jet as one fused Triton
        # GEMM or as cuBLAS + one fused epilogue (whichever measured faster for this shape); any
        # other reader runs the GEMM then.
        return JetTensor.deferred_linear(x, weight, bias, K)
    # the eager engine's wide CPU products on oneDNN where it measures faster (a captured graph
    # makes that choice in its own GEMM pass, curvrate_fast.cpu_gemm.rewrite_graph)
    gemm = eager_linear if (x.device.type == "cpu" and not tracing()) else F.linear
    blocks = input.primal_blocks()
    if blocks > 1 and x.dim() >= 3 and (
            tracing() or _shared_primal_saving(x, weight, blocks) >= SHARED_PRIMAL_MIN_FLOP):
        return _linear_shared_primal(x, weight, bias, blocks, gemm, K)
    return make_jet(_add_bias0(gemm(x, weight), bias), K)


# An eager shared-primal product costs a few more ops (a second GEMM call, the output's assembly,
# their backward) than one stacked GEMM: worth it only where the rows it saves are a large product.
# Measured (one CPU thread, 4 directions, K = 4, batch 128): 64-wide layers 4.16 → 4.53 ms
# (slower), 128-wide 9.91 → 9.67, 256-wide 23.4 → 23.1, the MLP 784→512→512→10 57.3 → 49.5 ms.
# A captured graph always shares (the compiler fuses the assembly into its neighbours: the Two
# Moons CRR step 918 → 856 µs warm).
SHARED_PRIMAL_MIN_FLOP = 32e6


def _shared_primal_saving(x: Tensor, weight: Tensor, blocks: int) -> float:
    """FLOPs the shared-primal product saves: (blocks − 1) copies of the primal rows."""
    rows = x[0].numel() // x.shape[-1]
    return 2.0 * rows * (blocks - 1) / blocks * weight.shape[0] * weight.shape[1]


def _linear_shared_primal(x: Tensor, weight: Tensor, bias: Optional[Tensor], blocks: int, gemm, K: int) -> JetTensor:
    """The linear rule when coefficient 0 is ``blocks`` copies of its first N/blocks rows (the D
    direction rows of a sample share x: JetTensor.share_primal): the primal GEMM runs on one copy
    and is repeated, the others on all rows, so a pass over D directions multiplies
    1 + D·n instead of D·(n + 1) rows per sample. Exact: the function computed equals the plain
    rule's for every value of the inputs (the rows are equal by construction), so its gradient
    does too. The output keeps the claim (the same affine map of equal rows)."""
    s, N = x.shape[0], x.shape[1]
    B = N // blocks
    y0 = _add_bias0(gemm(x[:1, :B], weight), bias)                       # (1, B, ..., out)
    tail = tuple(y0.shape[2:])
    y0 = y0.unsqueeze(1).expand((1, blocks, B) + tail)
    if s == 1:
        y = y0.reshape((1, N) + tail)
    else:
        rest = gemm(x[1:], weight).reshape((s - 1, blocks, B) + tail)
        y = torch.cat([y0, rest]).reshape((s, N) + tail)
    return make_jet(y, K).share_primal(blocks)


def _matmul_one_jet(op, a, b, K):
    return per_coefficient(op, (a, b), {}, promote_constants=False)


@register(*aliases("matmul"), torch.Tensor.__matmul__, torch.linalg.matmul)
def matmul(input, other, *, out=None):
    K = order_of(input, other)
    if is_jet(input) and is_jet(other):
        return make_jet(cauchy_op(torch.matmul, input, other, K), K)
    if is_jet(input) and input.dim() >= 2 and not is_jet(other):
        # (n+1, ..., M, N) @ (N, P) broadcasts over the coefficient axis: one GEMM.
        if other.dim() >= 2:
            return make_jet(torch.matmul(lift(input._coeffs, other.dim()), other), K)
    if is_jet(other) and other.dim() >= 2 and not is_jet(input) and input.dim() >= 2:
        return make_jet(torch.matmul(input, lift(other._coeffs, input.dim())), K)
    return _matmul_one_jet(torch.matmul, input, other, K)


@register(torch.Tensor.__rmatmul__)
def rmatmul(input, other):
    return matmul(other, input)


@register(*aliases("einsum"))
def einsum(equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    K = order_of(operands)
    jets = [i for i, o in enumerate(operands) if is_jet(o)]
    if len(jets) == 1:
        return per_coefficient(lambda *ops: torch.einsum(equation, *ops), tuple(operands), {},
                               promote_constants=False)
    # Several jet operands: fold left with Cauchy products of pairs.
    if len(operands) != 2:
        raise NotImplementedError("einsum with more than two jet operands: split it into pairs")
    return make_jet(cauchy_op(lambda a, b: torch.einsum(equation, a, b), operands[0], operands[1], K), K)


def _check_matrices(name: str, first: Tensor, second: Tensor, batched: bool) -> None:
    """torch's operand checks of mm/bmm (and of addmm/baddbmm/addbmm's product), which
    torch.matmul's broadcasting would otherwise let through: 2-D (3-D with equal batch sizes)
    operands whose inner sizes agree."""
    nd = 3 if batched else 2
    for what, t in (("first", first), ("second", second)):
        if t.dim() != nd:
            raise RuntimeError(f"{name}: the {what} operand must be a {nd}-D tensor, got {t.dim()}-D "
                               f"{tuple(t.shape)}")
    if batched and first.shape[0] != second.shape[0]:
        raise RuntimeError(f"{name}: the batch sizes differ ({first.shape[0]} and {second.shape[0]})")
    if first.shape[-1] != second.shape[-2]:
        raise RuntimeError(f"{name}: shapes {tuple(first.shape)} and {tuple(second.shape)} cannot be multiplied")


def _product(name: str, a, b, batched: bool, out_dtype):
    """a @ b after torch's checks; with ``out_dtype`` the product of each pair of coefficients is
    torch's own ``op(a_i, b_j, out_dtype)`` (bilinear: per coefficient, or a Cauchy product)."""
    _check_matrices(name, a, b, batched)
    op = torch.bmm if batched else torch.mm
    if not (is_jet(a) or is_jet(b)):   # addmm's jet is its input only: a plain product
        return op(a, b) if out_dtype is None else op(a, b, out_dtype)
    if out_dtype is None:
        return matmul(a, b)
    if is_jet(a) and is_jet(b):
        K = order_of(a, b)
        return make_jet(cauchy_op(lambda x, y: op(x, y, out_dtype), a, b, K), K)
    return per_coefficient(lambda x, y: op(x, y, out_dtype), (a, b), {}, promote_constants=False)


@register(*aliases("mm"))
def mm(input, mat2, out_dtype=None, *, out=None):
    """input @ mat2 for matrices: the matmul rule after torch.mm's checks."""
    return _product("mm", input, mat2, False, out_dtype)


@register(*aliases("bmm"))
def bmm(input, mat2, out_dtype=None, *, out=None):
    """Batched input @ mat2 (3-D, equal batch sizes): the matmul rule after torch.bmm's checks."""
    return _product("bmm", input, mat2, True, out_dtype)


def _scaled_sum(name: str, input, prod, beta, alpha):
    """beta·input + alpha·prod as torch's addmm family: input must broadcast to the product's shape
    (it never enlarges the result) and is ignored when beta = 0 (its NaN or Inf do not propagate)."""
    if tuple(torch.broadcast_shapes(input.shape, prod.shape)) != tuple(prod.shape):
        raise RuntimeError(f"{name}: input of shape {tuple(input.shape)} does not broadcast to the product's "
                           f"shape {tuple(prod.shape)}")
    return beta_input_plus_alpha_prod(input, prod, beta, alpha)


@register(*aliases("addmm"))
def addmm(input, mat1, mat2, out_dtype=None, *, beta=1, alpha=1, out=None):
    """beta·input + alpha·(mat1 @ mat2): a sum of a linear and a bilinear map."""
    return _scaled_sum("addmm", input, _product("addmm", mat1, mat2, False, out_dtype), beta, alpha)


@register(*aliases("baddbmm"))
def baddbmm(input, batch1, batch2, out_dtype=None, *, beta=1, alpha=1, out=None):
    """beta·input + alpha·(batch1 @ batch2), batched: a sum of a linear and a bilinear map."""
    return _scaled_sum("baddbmm", input, _product("baddbmm", batch1, batch2, True, out_dtype), beta, alpha)


@register(*aliases("addbmm"))
def addbmm(input, batch1, batch2, *, beta=1, alpha=1, out=None):
    """beta·input + alpha·Σ_b batch1[b] @ batch2[b]."""
    return _scaled_sum("addbmm", input, _product("addbmm", batch1, batch2, True, None).sum(0), beta, alpha)


@register(F.bilinear, torch.bilinear)
def bilinear(input1, input2, weight, bias=None):
    """y = x1ᵀ W x2 + b: bilinear in (x1, x2), so a Cauchy product of the two jets with the op
    (a, b) ↦ F.bilinear(a, b, W); a jet weight joins through a second product; bias to coefficient 0."""
    if is_jet(weight):  # three jet factors: through the einsum and product rules
        y = (torch.einsum("...i,oij->...oj", input1, weight) * input2.unsqueeze(-2)).sum(-1)
        return y if bias is None else y + bias
    K = order_of(input1, input2, bias)

    def op(a, b):
        return torch.einsum("...i,oij,...j->...o", a, weight, b)
    if is_jet(input1) and is_jet(input2):
        y = make_jet(cauchy_op(op, input1, input2, K), K)
    else:
        y = per_coefficient(op, (input1, input2), {}, promote_constants=False)
    return y if bias is None else y + bias


def _conv_rule(conv_fn, transposed: bool, nd: int):
    def rule(input, weight, bias=None, *args, **kwargs):
        K = order_of(input, weight, bias)
        if is_jet(weight) or is_jet(bias):
            y = make_jet(cauchy_op(lambda a, w: conv_fn(a, w, None, *args, **kwargs), input, weight, K), K)
            if bias is None:
                return y
            shape = (-1,) + (1,) * nd
            return y + (bias.reshape(shape) if not is_jet(bias) else bias.reshape(shape))
        c = input._coeffs
        n1 = c.shape[0]
        batched = input.dim() == nd + 2
        flat = c.reshape((n1 * c.shape[1],) + tuple(c.shape[2:])) if batched else c
        out = conv_fn(flat, weight, None, *args, **kwargs)
        out = out.reshape((n1, c.shape[1]) + tuple(out.shape[1:])) if batched else out
        if bias is not None and use_triton(out, K):  # a following activation fuses the bias add
            return JetTensor(out, K, pending_bias=(bias, 1 if batched else 0))
        return make_jet(_add_bias0(out, bias, (-1,) + (1,) * nd), K)
    rule.__doc__ = (f"Jet of {conv_fn.__name__}: every stored coefficient through one convolution "
                    "(stacked on the batch axis), bias on coefficient 0 (docs/math.md §2, linear maps).")
    return rule


for _fn, _t, _nd in ((F.conv1d, False, 1), (F.conv2d, False, 2), (F.conv3d, False, 3),
                     (F.conv_transpose1d, True, 1), (F.conv_transpose2d, True, 2),
                     (F.conv_transpose3d, True, 3)):
    register(_fn)(_conv_rule(_fn, _t, _nd))
