"""Drop-in equivalents of the reference code's public functions, computed in Taylor mode.

- :mod:`curvrate_fast.compat.flatgrad`: the ``flatgrad`` package of ``jacobposchl/flatgrad``
  (swap ``from flatgrad... import f`` for ``from curvrate_fast.compat.flatgrad import f``).

Example::

    >>> from curvrate_fast.compat import flatgrad as fg
    >>> torch.manual_seed(0)
    >>> fg.estimate_lambda_per_direction(model, x, y, loss_fn, max_order=4, K_dirs=5)["lambda_mean"]
"""
from . import flatgrad

__all__ = ["flatgrad"]
