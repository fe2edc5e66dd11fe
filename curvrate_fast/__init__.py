"""curvrate-fast: Taylor-mode higher-order input derivatives of PyTorch models, the curvature
rate λ and the CRR loss.

Example::

    >>> import torch, curvrate_fast
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    >>> x, y = torch.randn(128, 2), torch.randint(0, 2, (128,))
    >>> u = torch.nn.functional.normalize(torch.randn(128, 2), dim=1)
    >>> d = curvrate_fast.loss_directional_derivatives(model, x, y, u, order=4)   # (4, 128)
"""
from . import compat
from .api import directional_derivatives, input_jet, jet, loss_directional_derivatives
from .calibration import expected_calibration_error, hard_fraction_accuracy, reliability_bins
from .capture import CaptureError, CompiledLoss, compile
from .crr import CRRLoss, crr_penalty
from .curvature import (
                   Band,
                   BandSelection,
                   CurvatureRate,
                   CurvatureWarning,
                   band_indices,
                   curvature_rate,
                   estimate_from_derivatives,
                   ols_slope,
                   select_band,
)
from .directions import normalize_directions, polarization, sample_directions
from .jets import (
                   JetError,
                   JetTensor,
                   OpReport,
                   RuleMissingError,
                   RuleRegistrationError,
                   configure,
                   engine_settings,
                   jet_through,
                   kit,
                   register,
                   track_ops,
                   unregister,
)
from .rules import SampleMixingError
from .tracking import LambdaTracker

__version__ = "0.1.0"

__all__ = [
    "jet", "directional_derivatives", "loss_directional_derivatives", "input_jet",
    "JetTensor", "JetError", "RuleMissingError", "RuleRegistrationError", "SampleMixingError",
    "OpReport", "track_ops", "engine_settings", "configure", "register", "unregister", "kit", "jet_through",
    "__version__",
]
__all__ += [
    "curvature_rate", "CurvatureRate", "CurvatureWarning", "estimate_from_derivatives", "ols_slope",
    "select_band", "band_indices", "Band", "BandSelection", "crr_penalty", "CRRLoss",
    "sample_directions", "normalize_directions", "polarization", "expected_calibration_error",
    "hard_fraction_accuracy", "reliability_bins", "LambdaTracker", "compat",
    "compile", "CompiledLoss", "CaptureError",
]
