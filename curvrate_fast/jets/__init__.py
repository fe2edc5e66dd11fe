"""The jet engine: the ``JetTensor`` type, the rule table and settings, the dispatcher and the
rule-authoring kit (``kit``)."""
from . import dispatcher  # noqa: F401  (installs the dispatcher into JetTensor)
from .registry import OpReport, RuleRegistrationError, configure, engine_settings, register, track_ops, unregister
from .tensor import JetError, JetTensor, RuleMissingError, is_jet, make_jet
from .through import jet_through

__all__ = ["JetTensor", "JetError", "RuleMissingError", "RuleRegistrationError", "OpReport",
           "engine_settings", "configure", "register", "unregister", "track_ops", "is_jet",
           "make_jet", "jet_through"]
