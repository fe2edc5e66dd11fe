"""The Taylor rules, one module per op family; importing this package registers them all."""
from . import (  # noqa: F401
               activations,
               arithmetic,
               attention,
               complex,
               distances,
               dropout,
               histogram,
               linalg,
               linear,
               losses,
               nn,
               norm,
               pooling,
               random,
               recurrent,
               reductions,
               resample,
               scatter,
               shape,
               sorting,
               special,
)
from .norm import SampleMixingError

__all__ = ["SampleMixingError"]
