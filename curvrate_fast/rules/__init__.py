"""The Taylor rules, one module per op family; importing this package registers them all."""
from . import (activations, arithmetic, attention, dropout, linear, nn, norm, pooling,  # noqa: F401
               reductions, shape)
from .norm import SampleMixingError

__all__ = ["SampleMixingError"]
