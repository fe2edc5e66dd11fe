"""Taylor rules for ops that draw random numbers.

A random op is a function of its inputs for one fixed draw; the rule must make that draw exactly
once, from the same generator state as the plain call, so that the primal equals the plain
model's value and the random stream afterwards is the same (a seeded run then draws the same
dropout masks as nested autograd does). Where the derivative needs the draw itself (normal's
z, alpha-dropout's mask) the draw is recovered by replaying the generator from the state before
the call with a standard parameter and restoring the state after the call.

- in-place fills (``uniform_``, ``normal_``, ``bernoulli_``, ``exponential_``, ...): the jet becomes a
  constant (its new values do not depend on the old ones);
- ``bernoulli``, ``poisson``, ``multinomial``, ``binomial``: integer-valued draws, constants;
- ``normal(mean, std)`` = mean + std·z: linear in (mean, std) for the draw z;
- ``rrelu`` in training mode: y = x·a with a random slope a per element for x < 0 (1 for x ≥ 0);
- ``alpha_dropout``/``feature_alpha_dropout`` in training mode: y = a·m·x + b, affine in x with the
  random mask m and the constants a, b of the op.

In a pass with per-order directions every rule draws for one group of polarization rows and
repeats the draw for the others (``jets/draws.py``): the rows of a sample see one function.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..jets.draws import grouped, shared_draw
from ..jets.registry import op_name, record, register, settings
from ..jets.tensor import primals
from ._common import JetError, is_jet, make_jet, order_of, primal


@contextlib.contextmanager
def replayed(device: torch.device, generator: Optional[torch.Generator] = None) -> Iterator:
    """Yields ``again``: a context manager that runs its block from the generator state this one
    started with, and afterwards leaves the generator in the state the first run left it in."""
    if generator is not None:
        get, set_ = generator.get_state, generator.set_state
    elif device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        get = lambda: torch.cuda.get_rng_state(idx)  # noqa: E731
        set_ = lambda s: torch.cuda.set_rng_state(s, idx)  # noqa: E731
    elif device.type == "cpu":
        get, set_ = torch.get_rng_state, torch.set_rng_state
    else:
        raise JetError(f"random ops on {device.type} tensors: the generator state cannot be replayed "
                       "here, so the draw cannot be made once and reused")
    before = get()
    after = []

    @contextlib.contextmanager
    def again():
        after.append(get())
        set_(before)
        try:
            yield
        finally:
            set_(after[0])
    yield again


# -- in-place fills and integer draws: constants ---------------------------------------------------

def _fill_rule(func):
    def rule(input, *args, **kwargs):
        record("constants", func)
        if not is_jet(input):
            return func(input, *primals(args), **primals(kwargs))
        if not input.writable():
            raise JetError(f"in-place {func.__name__} on a view of a jet would not reach the tensor it "
                           "views; fill a fresh tensor instead")
        value = shared_draw(input._coeffs[0].detach().clone(),
                            lambda t: func(t, *primals(args), **primals(kwargs)), func.__name__)
        input.assign(value.unsqueeze(0))
        return input
    rule.__doc__ = f"{func.__name__}: overwrites the jet with random values, a constant."
    return rule


for _name in ("uniform_", "normal_", "bernoulli_", "exponential_", "geometric_", "log_normal_",
              "cauchy_", "random_"):
    _f = getattr(torch.Tensor, _name, None)
    if _f is not None:
        register(_f)(_fill_rule(_f))


def _constant_draw(func):
    def rule(*args, **kwargs):
        record("constants", func)
        plain = primals(args)
        if grouped() and plain and isinstance(plain[0], Tensor):   # a draw per row of its first argument
            n = plain[0].shape[0] if plain[0].dim() else -1
            return shared_draw(plain[0], lambda t: func(t, *_first_rows(plain[1:], n, t.shape[0]),
                                                        **primals(kwargs)), op_name(func))
        return func(*plain, **primals(kwargs))
    rule.__doc__ = f"{getattr(func, '__name__', func)}: an integer-valued draw, a constant."
    return rule


def _first_rows(args, n: int, rows: int):
    """The tensors among ``args`` that have a row per row of the pass (dim 0 = n), cut to the
    first group's ``rows``; the rest as they are (broadcast)."""
    return [a[:rows] if isinstance(a, Tensor) and a.dim() and a.shape[0] == n and n > 0 else a for a in args]


for _f in (torch.bernoulli, torch.Tensor.bernoulli, torch.poisson, torch.multinomial,
           torch.Tensor.multinomial, torch.binomial):
    register(_f)(_constant_draw(_f))


# -- normal: linear in (mean, std) for the draw z ----------------------------------------------------

@register(torch.normal)
def normal(mean, std=1.0, *args, generator=None, **kwargs):
    """y = mean + std·z, z ~ N(0, 1) drawn once: y_k = mean_k + std_k·z (k ≥ 1). z is recovered by
    replaying the generator with (mean, std) = (0, 1): torch draws z and then scales and shifts it,
    so the draw does not depend on the parameters (checked against the plain value)."""
    if not (is_jet(mean) or is_jet(std)):
        return torch.normal(mean, std, *args, generator=generator, **kwargs)
    K = order_of(mean, std)
    m0, s0 = primal(mean), primal(std)
    like = m0 if isinstance(m0, Tensor) else s0
    if grouped():
        out = torch.broadcast_shapes(*(t.shape for t in (m0, s0) if isinstance(t, Tensor)))
        if len(out) == 0:
            raise JetError("torch.normal of a 0-d jet inside a CRR pass with per-order directions: the draw "
                           "cannot be shared by the polarization rows; use directions='fixed'")
        n = out[0]

        def draw(_):
            return _normal_draw(*_first_rows((m0, s0), n, n // settings.draw_groups[0]), args, kwargs, generator)
        y0, z = shared_draw(torch.empty(out, device=like.device), draw, "torch.normal")
    else:
        y0, z = _normal_draw(m0, s0, args, kwargs, generator)
    check = m0 + s0 * z
    if check.shape != y0.shape:
        check = check.expand(y0.shape)
    if not torch.allclose(check.detach(), y0.detach(), rtol=1e-6, atol=1e-6 * float(check.abs().max()) + 1e-30):
        raise JetError("torch.normal: the replayed draw does not reproduce the value (this torch "
                       "build draws differently); its Taylor coefficients cannot be formed exactly")
    # coefficient 0 as mean + std·z too, not torch.normal's own value (equal up to rounding: checked
    # above): autograd gives torch.normal no derivative in mean and std, and the parameter gradient
    # of the primal must follow the same pathwise form as the higher coefficients
    coeffs = [check]
    n = max(mean._coeffs.shape[0] if is_jet(mean) else 1, std._coeffs.shape[0] if is_jet(std) else 1)
    for k in range(1, n):
        term = torch.zeros_like(y0)
        if is_jet(mean) and k < mean._coeffs.shape[0]:
            term = term + mean._coeffs[k]
        if is_jet(std) and k < std._coeffs.shape[0]:
            term = term + std._coeffs[k] * z
        coeffs.append(term)
    return make_jet(coeffs, K)


def _normal_draw(m0, s0, args, kwargs, generator):
    """(torch.normal(m0, s0), its standard draw z), z recovered by replaying the generator."""
    like = m0 if isinstance(m0, Tensor) else s0
    with replayed(like.device, generator) as again:
        y0 = torch.normal(m0, s0, *args, generator=generator, **kwargs)
        with again():
            z = torch.normal(torch.zeros_like(y0), torch.ones_like(y0), generator=generator)
    return y0, z


# -- rrelu -----------------------------------------------------------------------------------------

def _rrelu(input, lower: float = 1.0 / 8.0, upper: float = 1.0 / 3.0, training: bool = False,
           generator=None):
    """Randomized leaky ReLU. Evaluation: a leaky ReLU with slope (lower + upper)/2. Training: a
    slope a ~ U(lower, upper) per element where x < 0 (1 where x ≥ 0), drawn once exactly as the
    plain call draws it (``rrelu_with_noise`` writes the slopes it used): y_k = a·x_k."""
    if not training:
        return F.leaky_relu(input, (lower + upper) / 2.0)
    y0, noise = shared_draw(input._coeffs[0], lambda x0: _rrelu_draw(x0, lower, upper, generator), "rrelu")
    c = input._coeffs
    return make_jet(torch.cat([y0.unsqueeze(0), c[1:] * noise]), input._order)


def _rrelu_draw(x0, lower, upper, generator):
    noise = torch.empty_like(x0)
    return torch._C._nn.rrelu_with_noise(x0, noise, lower, upper, True, generator), noise


@register(F.rrelu, torch.rrelu)
def rrelu(input, lower: float = 1.0 / 8.0, upper: float = 1.0 / 3.0, training: bool = False,
          inplace: bool = False, generator=None):
    return _rrelu(input, lower, upper, training, generator)


@register(torch._C._nn.rrelu_with_noise)
def rrelu_with_noise(input, noise, lower=1.0 / 8.0, upper=1.0 / 3.0, training=False, generator=None):
    if not training:
        noise.fill_(1.0)  # as torch does in evaluation mode
        return F.leaky_relu(input, (lower + upper) / 2.0)
    y0, drawn = shared_draw(input._coeffs[0], lambda x0: _rrelu_draw(x0, lower, upper, generator), "rrelu")
    noise.copy_(drawn)          # the slopes it used, as torch writes them
    c = input._coeffs
    return make_jet(torch.cat([y0.unsqueeze(0), c[1:] * noise]), input._order)


# -- alpha dropout ------------------------------------------------------------------------------

_SELU_ALPHA_PRIME = 1.7580993408473766  # −λ·α of SELU, the value alpha dropout drops to (ATen's)


def _alpha_dropout_rule(op):
    def rule(input, p: float = 0.5, train: bool = False, inplace: bool = False):
        """y = a·m·x + b with the random keep-mask m (per element, or per channel for feature alpha
        dropout) and a = 1/√((α′²p + 1)(1 − p)) (ATen's constants): affine in x for the draw, so
        y_k = a·m·x_k. The mask is recovered by replaying the generator on a zero input (y = b)
        and a one input (y = a·m + b): m = [y(1) ≠ y(0)]."""
        if not train or p == 0.0:
            return input
        if p == 1.0:  # everything dropped: a constant
            return shared_draw(input._coeffs[0], lambda x0: op(x0, p, True), op_name(op))
        y0, scale = shared_draw(input._coeffs[0], lambda x0: _alpha_draw(op, x0, p), op_name(op))
        c = input._coeffs
        return make_jet(torch.cat([y0.unsqueeze(0), c[1:] * scale]), input._order)
    return rule


def _alpha_draw(op, x0: Tensor, p: float):
    """(the op's value at x0, a·m): m recovered by replaying the generator on 0 and 1 inputs."""
    with replayed(x0.device) as again:
        y0 = op(x0, p, True)
        with again():
            y_zero = op(torch.zeros_like(x0), p, True)
        with again():
            y_one = op(torch.ones_like(x0), p, True)
    a = 1.0 / math.sqrt((_SELU_ALPHA_PRIME ** 2 * p + 1.0) * (1.0 - p))
    return y0, (y_one != y_zero).to(x0.dtype) * a


register(torch.alpha_dropout)(_alpha_dropout_rule(torch.alpha_dropout))
register(torch.feature_alpha_dropout)(_alpha_dropout_rule(torch.feature_alpha_dropout))


@register(F.alpha_dropout)
def alpha_dropout(input, p: float = 0.5, training: bool = False, inplace: bool = False):
    return _alpha_dropout_rule(torch.alpha_dropout)(input, p, training)


@register(F.feature_alpha_dropout)
def feature_alpha_dropout(input, p: float = 0.5, training: bool = False, inplace: bool = False):
    return _alpha_dropout_rule(torch.feature_alpha_dropout)(input, p, training)
