"""PyTorch Lightning integration (the ``lightning`` extra: ``pip install "curvrate-fast[lightning]"``).

The CRR penalty belongs in the ``LightningModule``'s ``training_step`` (it is part of the loss)::

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.crit(self.model, x, y)             # crit = curvrate_fast.CRRLoss(...)

and :class:`CurvatureRateCallback` tracks λ on a fixed probe batch every N optimizer steps,
logged as ``curvature_rate`` (``self.log`` from the callback) and kept in ``history``.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("curvrate_fast.training.lightning needs PyTorch Lightning: "
                          "pip install 'curvrate-fast[lightning]'") from e

from ..curvature import curvature_rate
from .embedding import EmbeddingSpace

__all__ = ["CurvatureRateCallback"]


class CurvatureRateCallback(Callback):
    """λ (:func:`curvrate_fast.curvature_rate`) on the probe batch (x, y) every ``every_n_steps``
    optimizer steps (and before the first).

    Arguments:
        x, y: the probe batch; with ``embedding_space=True`` x holds token ids and λ is taken in
            the model's input-embedding space (:class:`EmbeddingSpace`).
        model: ``model(pl_module)`` gives the function to measure (default: the LightningModule).
        loss_fn: per-sample loss (default cross-entropy; next-token CE in the embedding space).
        seed: the directions come from a generator seeded with it at every measurement.
        kwargs: curvature_rate's settings (max_order, n_dirs, estimator, band...).

    Example::

        >>> import lightning.pytorch as pl
        >>> cb = CurvatureRateCallback(x_probe, y_probe, every_n_steps=50, max_order=4, n_dirs=2)
        >>> pl.Trainer(max_epochs=3, callbacks=[cb]).fit(module, loader)
        >>> cb.history[-1]          # (global step, λ)
    """

    def __init__(self, x: Tensor, y: Optional[Tensor], *, every_n_steps: int = 10,
                 model: Optional[Callable[[Any], Any]] = None, loss_fn=None, embedding_space: bool = False,
                 seed: int = 0, **kwargs: Any):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be ≥ 1, got {every_n_steps}")
        self.x, self.y = x, y
        self.every = every_n_steps
        self.model = model
        self.loss_fn = loss_fn
        self.embedding_space = embedding_space
        self.seed = seed
        self.kwargs = kwargs
        self.history: List[Tuple[int, float]] = []

    def measure(self, pl_module) -> float:
        fn = self.model(pl_module) if self.model is not None else pl_module
        device = pl_module.device
        x = self.x.to(device)
        y = self.y.to(device) if isinstance(self.y, Tensor) else self.y
        gen = torch.Generator(device=device).manual_seed(self.seed)
        with torch.no_grad():
            if self.embedding_space:
                lam = EmbeddingSpace(fn, loss_fn=self.loss_fn).curvature_rate(
                    x, x if y is None else y, generator=gen, **self.kwargs)
            else:
                lam = curvature_rate(fn, x, y, loss_fn=self.loss_fn, generator=gen, **self.kwargs)
        return float(lam.value)

    def _maybe(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step % self.every or (self.history and self.history[-1][0] == step):
            return
        value = self.measure(pl_module)
        self.history.append((step, value))
        pl_module.log("curvature_rate", value, on_step=True, on_epoch=False, prog_bar=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self._maybe(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe(trainer, pl_module)
