"""The activations with fused jet kernels: one table, read by the rules (``rules/activations.py``),
the pure-PyTorch reference (``activation_jet.py``), the Triton kernels (``triton_kernels/``) and the
C++ kernels (``cpp_backend.py``, ``csrc/jet_activation.cpp``), and the highest order the kernels are
built for.

Each row: the name the rules use, the integer code the kernels dispatch on (the Triton ``ACT``
constexpr and the C++ enum, which ``tests/test_activation_kinds.py`` checks against this table),
the parameters with their defaults in the order the kernels take them (p0, p1), and whether the map
is piecewise linear (y_k = m·u_k, so known-zero coefficients stay zero).

Adding an activation with a fused kernel: a row here, its jet recurrence in
``activation_jet.activation_series_with_derivative``, its branch in the Triton and C++ kernels, and
its test rows (docs/design.md, "Adding an activation").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

__all__ = ["Activation", "ACTIVATIONS", "KINDS", "MAX_KERNEL_ORDER", "kernel_params"]

#: the highest order the fused kernels (Triton, C++) are built for: they unroll O(K²) terms; above
#: it the reference recurrences run (any order)
MAX_KERNEL_ORDER = 8


@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    params: Tuple[Tuple[str, float], ...] = ()
    piecewise_linear: bool = False
    aliases: Dict[str, str] = field(default_factory=dict)  # accepted other names of a parameter


ACTIVATIONS: Dict[str, Activation] = {a.name: a for a in (
    Activation("tanh", 0),
    Activation("sigmoid", 1),
    Activation("gelu", 2),
    Activation("gelu_tanh", 3),
    Activation("silu", 4),
    Activation("softplus", 5, (("beta", 1.0), ("threshold", 20.0))),
    Activation("relu", 6, piecewise_linear=True),
    Activation("leaky_relu", 7, (("negative_slope", 0.01),), piecewise_linear=True,
               aliases={"slope": "negative_slope"}),
    Activation("identity", 8),  # bias only: the epilogue of a linear layer without activation
)}

#: the activations with a jet recurrence (``identity`` is the kernels' bias-only mode)
KINDS = tuple(n for n in ACTIVATIONS if n != "identity")


def kernel_params(kind: Optional[str], params: Dict) -> Tuple[str, float, float]:
    """(kind, p0, p1) as the kernels take them, from an activation name (None: bias only) and its
    keyword parameters; ``gelu`` with ``approximate="tanh"`` is ``gelu_tanh``."""
    kind = "identity" if kind is None else kind
    params = dict(params)
    params.pop("inplace", None)
    if kind in ("gelu", "gelu_tanh"):
        if params.pop("approximate", "none") == "tanh":
            kind = "gelu_tanh"
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}; supported: {tuple(ACTIVATIONS)}")
    act = ACTIVATIONS[kind]
    for alias, name in act.aliases.items():
        if alias in params:
            params.setdefault(name, params.pop(alias))
    values = [float(params.pop(name, default)) for name, default in act.params]
    if params:
        raise TypeError(f"unexpected parameters for {kind}: {sorted(params)}")
    if kind == "softplus" and values[0] == 0.0:
        raise ValueError("softplus needs beta != 0")
    values += [0.0] * (2 - len(values))
    return kind, values[0], values[1]
