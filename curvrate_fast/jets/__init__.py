"""The jet engine: the ``JetTensor`` type, the rule registry, and the generic fallback."""
from .registry import OpReport, engine_settings, register, track_ops
from .tensor import JetError, JetTensor, RuleMissingError, is_jet, make_jet

__all__ = ["JetTensor", "JetError", "RuleMissingError", "OpReport", "engine_settings", "register",
           "track_ops", "is_jet", "make_jet"]
