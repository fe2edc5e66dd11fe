"""Hugging Face ``Trainer`` integration (the ``hf`` extra: ``pip install "curvrate-fast[hf]"``).

- :class:`CRRTrainer`: a ``transformers.Trainer`` whose loss is the model's own loss plus the CRR
  penalty taken in the input-embedding space (:class:`EmbeddingSpace`), on a subset of the batch
  and every k-th step if asked. Under DDP (``torchrun``) the penalty's forward runs through the
  wrapped model like the loss's, so gradients are all-reduced as usual (docs/training.md).
- :class:`CurvatureRateCallback`: a ``TrainerCallback`` that measures λ on a fixed probe batch
  every N optimizer steps and adds it to the logs (``curvature_rate``).

Example::

    >>> trainer = CRRTrainer(model=model, args=args, train_dataset=ds,
    ...                      crr=dict(orders=(1, 4), scale=0.1), crr_subset=0.25, crr_every=1,
    ...                      callbacks=[CurvatureRateCallback(probe_ids, every=10)])
    >>> trainer.train()
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("curvrate_fast.training.hf needs transformers and accelerate: "
                      "pip install 'curvrate-fast[hf]'") from e

from .embedding import EmbeddingSpace

__all__ = ["CRRTrainer", "CurvatureRateCallback"]

_MODEL_INPUTS = ("attention_mask", "token_type_ids", "position_ids")


def _batch(inputs: Dict[str, Any]) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    ids = inputs["input_ids"]
    labels = inputs.get("labels")
    if labels is None:
        labels = ids
    return ids, labels, {k: inputs[k] for k in _MODEL_INPUTS if inputs.get(k) is not None}


class CRRTrainer(Trainer):
    """``Trainer`` with the CRR penalty added to the model's loss.

    Arguments (besides ``Trainer``'s):
        crr: :func:`curvrate_fast.crr_penalty`'s arguments (orders, n_dirs, directions,
            order_reduction, scale); ``scale`` 0 or ``crr=None`` trains without the penalty.
        crr_subset: penalize a random subset of each batch (an int or a fraction).
        crr_every: add the penalty on every k-th optimizer step only.
        crr_loss_fn: per-sample loss for the penalty (default: next-token cross-entropy,
            :func:`causal_lm_loss`; labels -100 are ignored).
        crr_seed: seed of the generator that draws the subsets and directions.

    After each penalized step ``last_penalty`` holds the penalty's value; it is logged as
    ``crr_penalty``.

    Example::

        >>> trainer = CRRTrainer(model=model, args=TrainingArguments("out"), train_dataset=ds,
        ...                      crr=dict(orders=(1, 4), scale=50.0), crr_subset=0.25)
        >>> trainer.train()
    """

    def __init__(self, *args: Any, crr: Optional[Dict[str, Any]] = None,
                 crr_subset: Optional[Union[int, float]] = None, crr_every: int = 1,
                 crr_loss_fn=None, crr_seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if crr_every < 1:
            raise ValueError(f"crr_every must be ≥ 1, got {crr_every}")
        self.crr = dict(crr or {})
        self.crr_subset = crr_subset
        self.crr_every = crr_every
        self.crr_loss_fn = crr_loss_fn
        self.crr_generator = torch.Generator().manual_seed(crr_seed)
        self.last_penalty: Optional[float] = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training and self.crr and float(self.crr.get("scale", 1.0)) != 0.0 \
                and self.state.global_step % self.crr_every == 0:
            ids, labels, kw = _batch(inputs)
            space = EmbeddingSpace(model, loss_fn=self.crr_loss_fn)
            gen = self.crr_generator
            if gen.device != ids.device:
                self.crr_generator = gen = torch.Generator(device=ids.device).manual_seed(
                    int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
            R = space.penalty(ids, labels, subset=self.crr_subset, generator=gen, crr=self.crr, **kw)
            self.last_penalty = float(R.detach())
            loss = loss + R
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.last_penalty is not None and "loss" in logs:
            logs = dict(logs, crr_penalty=self.last_penalty)
        super().log(logs, *args, **kwargs)


class CurvatureRateCallback(TrainerCallback):
    """λ on a fixed probe batch every ``every`` optimizer steps (and at step 0), in the model's
    input-embedding space, logged as ``curvature_rate``; ``history`` holds (step, λ).

    Arguments:
        input_ids, labels: the probe batch (labels default to the ids: next-token loss);
        attention_mask: its mask, if any;
        every: the period in optimizer steps;
        max_order, n_dirs, estimator, seed: :func:`curvrate_fast.curvature_rate`'s settings (the
            directions come from a generator seeded with ``seed`` at every measurement, so the
            measurements differ only by the model).

    Example::

        >>> cb = CurvatureRateCallback(probe_ids, every=50)
        >>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
        >>> cb.history[-1]          # (global step, λ)
    """

    def __init__(self, input_ids: Tensor, labels: Optional[Tensor] = None, *,
                 attention_mask: Optional[Tensor] = None, every: int = 10, max_order: int = 4,
                 n_dirs: int = 2, estimator: str = "slope", seed: int = 0, loss_fn=None):
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.input_ids = input_ids
        self.labels = input_ids if labels is None else labels
        self.attention_mask = attention_mask
        self.every = every
        self.settings = dict(max_order=max_order, n_dirs=n_dirs, estimator=estimator)
        self.seed = seed
        self.loss_fn = loss_fn
        self.history: List[Tuple[int, float]] = []

    def measure(self, model) -> float:
        device = next(model.parameters()).device
        kw = {} if self.attention_mask is None else {"attention_mask": self.attention_mask.to(device)}
        gen = torch.Generator(device=device).manual_seed(self.seed)
        with torch.no_grad():
            lam = EmbeddingSpace(model, loss_fn=self.loss_fn).curvature_rate(
                self.input_ids.to(device), self.labels.to(device), generator=gen, **self.settings, **kw)
        return float(lam.value)

    def _maybe(self, state, model) -> None:
        step = state.global_step
        if model is None or step % self.every or (self.history and self.history[-1][0] == step):
            return
        self.history.append((step, self.measure(model)))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._maybe(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe(state, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.history:
            logs["curvature_rate"] = self.history[-1][1]
