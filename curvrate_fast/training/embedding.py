"""λ and CRR of a language model in its input-embedding space (docs/training.md).

Token ids are integers: derivatives along x + t·u need a real input. The input of a language
model's smooth part is the output of its token embedding, so λ and the CRR penalty are taken
there: x = embedding(input_ids), u a unit direction per sample over all its positions and
features, and the model runs on the jet (x, u) from the embedding on.

:class:`EmbeddingSpace` does this with a forward hook on the embedding module: the model is
called as usual with ``input_ids`` (so DDP's and FSDP2's forwards run as in training: FSDP2
gathers the sharded embedding table inside its root forward), and the hook adds the jet
(0, u, 0, …) to the embedding's output. The entry points of the library see a zero tensor
x₀ of shape (B, T, H) as "the input" and take their random subset, directions and polarization
rows over it; the helper tiles the ids and any per-sample keyword arguments (``attention_mask``)
to the rows of the jet. The penalty's gradient reaches every parameter, the embedding table
included (through x), as in nested autograd on x = embedding(input_ids).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..crr import CRRLoss, _crr, _subset_split, crr_penalty, subset_indices
from ..curvature import curvature_rate
from ..jets.tensor import JetError

__all__ = ["EmbeddingSpace", "causal_lm_loss", "unwrap_model"]

# crr_penalty's settings that EmbeddingSpace.loss passes on, with crr_penalty's own defaults
_CRR_DEFAULTS = {n: p.default for n, p in inspect.signature(crr_penalty).parameters.items()
                 if n in ("orders", "n_dirs", "directions", "order_reduction", "scale")}


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-sample next-token cross-entropy, shape (B,): position t predicts ``labels[:, t + 1]``
    (the Hugging Face causal-LM convention, labels = input ids), averaged over each sample's
    positions whose label is not ``ignore_index``. Works on jets and plain tensors."""
    if logits.dim() != 3 or labels.dim() != 2:
        raise ValueError(f"causal_lm_loss expects logits (B, T, V) and labels (B, T), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    B, T, V = logits.shape
    target = labels[:, 1:]
    tok = F.cross_entropy(logits[:, :-1].reshape(B * (T - 1), V), target.reshape(-1),
                          reduction="none", ignore_index=ignore_index).reshape(B, T - 1)
    count = (target != ignore_index).sum(1).clamp(min=1).to(tok.dtype)
    return tok.sum(1) / count


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / ``torch.compile`` / DataParallel wrappers (FSDP2 keeps the module)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        else:
            return model


def _find_embedding(model: nn.Module) -> nn.Module:
    base = unwrap_model(model)
    get = getattr(base, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Module):
        raise TypeError(f"{type(base).__name__} has no get_input_embeddings(); pass the token "
                        "embedding module as EmbeddingSpace(model, embedding=...)")
    return emb


def _refuse_compile(crr: Optional[Dict[str, Any]], method: str) -> None:
    """EmbeddingSpace runs eagerly: its jet enters the model through a forward hook on the
    embedding module, and a captured graph refuses hooks (it would run them once, while it is
    recorded). Said here, where the user asked for it, instead of as the capture's complaint about
    a function that is not a module (which the user never wrote)."""
    if crr and (crr.get("compile") or crr.get("compile_options")):
        raise ValueError(f"EmbeddingSpace.{method}: compile is not supported here (the jet enters the model "
                         "through a forward hook on the embedding module, which a captured graph cannot "
                         "replay); leave compile out (the eager engine), or, for a model that takes "
                         "inputs_embeds, capture curvrate_fast.CRRLoss(compile=True) on a module whose "
                         "forward calls model(inputs_embeds=...) yourself")


class EmbeddingSpace:
    """The input-embedding space of a language model, for λ and CRR.

    Arguments:
        model: the module to call (plain, DDP- or FSDP2-wrapped, a Hugging Face model): it is
            called as ``model(input_ids=..., **kwargs)``.
        embedding: the token-embedding module (default ``get_input_embeddings()`` of the model
            inside its wrappers); its output is where the derivatives are taken.
        loss_fn: per-sample loss ``loss_fn(logits, labels) -> (B,)``; default
            :func:`causal_lm_loss`.
        output: how to get the logits from the model's output (default: ``.logits`` when it has
            one, else the output itself).

    Example::

        >>> space = EmbeddingSpace(hf_model)
        >>> R = space.penalty(batch["input_ids"], batch["input_ids"],
        ...                   attention_mask=batch["attention_mask"], orders=(1, 4), scale=0.1)
        >>> lam = space.curvature_rate(ids, ids, max_order=4).value
    """

    def __init__(self, model: nn.Module, embedding: Optional[nn.Module] = None,
                 loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 output: Optional[Callable[[Any], Tensor]] = None):
        self.model = model
        self.embedding = embedding if embedding is not None else _find_embedding(model)
        self.loss_fn = loss_fn or causal_lm_loss
        self.output = output or (lambda out: getattr(out, "logits", out))

    # -- the pieces --------------------------------------------------------------------------
    def origin(self, input_ids: Tensor) -> Tensor:
        """x₀: zeros of shape (B, T, H) standing for the embedding output (the jet adds to it)."""
        w = self.embedding.weight
        dim = getattr(self.embedding, "embedding_dim", None) or w.shape[-1]
        return torch.zeros(tuple(input_ids.shape) + (dim,), dtype=w.dtype, device=input_ids.device)

    def forward_fn(self, input_ids: Tensor, **kwargs: Any) -> Callable[[Tensor], Tensor]:
        """``fn(x) -> logits``: the model at ``input_ids`` with ``x`` added to its embedding output.
        ``x`` may hold k·B rows (k directions or polarization rows per sample, in the library's
        order: k blocks of the B samples); the ids and every keyword argument with a leading batch
        dimension of B are tiled to match."""
        B = input_ids.shape[0]

        def fn(x: Tensor) -> Tensor:
            rows = x.shape[0]
            if rows % B:
                raise ValueError(f"the input holds {rows} rows, not a multiple of the batch {B}")
            k = rows // B
            ids = input_ids.repeat((k,) + (1,) * (input_ids.dim() - 1)) if k > 1 else input_ids
            kw = {n: (v.repeat((k,) + (1,) * (v.dim() - 1))
                      if k > 1 and isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
                  for n, v in kwargs.items()}
            calls = []

            def add_jet(module, inputs, out):
                if calls:
                    raise JetError("the token embedding ran twice in one forward; EmbeddingSpace takes "
                                   "the derivatives at its single output")
                calls.append(True)
                if tuple(out.shape) != tuple(x.shape):
                    raise ValueError(f"the embedding output has shape {tuple(out.shape)}, the input "
                                     f"{tuple(x.shape)}")
                return out + x

            handle = self.embedding.register_forward_hook(add_jet)
            try:
                out = self.output(self.model(input_ids=ids, **kw))
            finally:
                handle.remove()
            if not calls:
                raise JetError("the model did not call its token embedding module; pass the module "
                               "it uses as EmbeddingSpace(model, embedding=...)")
            return out

        return fn

    def task_loss(self, input_ids: Tensor, labels: Tensor, **kwargs: Any) -> Tensor:
        """The mean per-sample loss of an ordinary forward."""
        return self.loss_fn(self.output(self.model(input_ids=input_ids, **kwargs)), labels).mean()

    # -- λ and CRR ---------------------------------------------------------------------------
    def _subset(self, subset, generator, input_ids, labels, kwargs):
        idx = subset_indices(subset, input_ids.shape[0], generator, input_ids.device)
        if idx is None:
            return input_ids, labels, kwargs
        return self._rows(idx, input_ids, labels, kwargs)

    @staticmethod
    def _rows(idx: Tensor, input_ids: Tensor, labels: Tensor, kwargs: Dict[str, Any]):
        """The ids, labels and per-sample keyword arguments of the samples ``idx``."""
        B = input_ids.shape[0]
        kw = {n: (v[idx.to(v.device)] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
              for n, v in kwargs.items()}
        return input_ids[idx], labels[idx.to(labels.device)], kw

    def penalty(self, input_ids: Tensor, labels: Tensor, *, subset: Optional[Union[int, float]] = None,
                generator: Optional[torch.Generator] = None, crr: Optional[Dict[str, Any]] = None,
                **kwargs: Any) -> Tensor:
        """The CRR penalty (:func:`curvrate_fast.crr_penalty`) in the embedding space. ``subset``
        and ``generator`` choose the penalized samples; ``crr`` holds crr_penalty's other
        arguments (orders, n_dirs, directions, order_reduction, scale); the remaining keyword
        arguments go to the model (``attention_mask``...)."""
        _refuse_compile(crr, "penalty")
        ids, lab, kw = self._subset(subset, generator, input_ids, labels, kwargs)
        return crr_penalty(self.forward_fn(ids, **kw), self.origin(ids), lab, loss_fn=self.loss_fn,
                           generator=generator, **(crr or {}))

    def loss(self, input_ids: Tensor, labels: Tensor, *, subset: Optional[Union[int, float]] = None,
             generator: Optional[torch.Generator] = None, crr: Optional[Dict[str, Any]] = None,
             **kwargs: Any) -> Tensor:
        """Task loss + CRR penalty. The penalized samples' task losses are coefficient 0 of the
        jet pass, as in :class:`curvrate_fast.CRRLoss`: penalizing the whole batch takes ONE
        forward, and a subset adds an ordinary forward of the other samples only."""
        _refuse_compile(crr, "loss")
        crr = dict(crr or {})
        split = None if subset is None else _subset_split(subset, input_ids.shape[0], generator, input_ids.device)
        if split is None:
            crit = CRRLoss(loss_fn=self.loss_fn, generator=generator, **crr)
            return crit(self.forward_fn(input_ids, **kwargs), self.origin(input_ids), labels)
        idx, rest = split
        ids, lab, kw = self._rows(idx, input_ids, labels, kwargs)
        kw_crr = dict(_CRR_DEFAULTS)
        unknown = sorted(set(crr) - set(kw_crr))
        if unknown:
            raise TypeError(f"EmbeddingSpace.loss: crr holds unknown arguments {unknown}; it takes "
                            f"{sorted(kw_crr)}")
        kw_crr.update(crr)
        R, _, losses0, _ = _crr(self.forward_fn(ids, **kw), self.origin(ids), lab, loss_fn=self.loss_fn,
                                subset=None, generator=generator, **kw_crr)
        ids_r, lab_r, kw_r = self._rows(rest, input_ids, labels, kwargs)
        others = self.loss_fn(self.output(self.model(input_ids=ids_r, **kw_r)), lab_r)
        return (losses0.sum() + others.sum()) / input_ids.shape[0] + R

    def curvature_rate(self, input_ids: Tensor, labels: Tensor, *, max_order: int = 4, n_dirs: int = 2,
                       estimator: str = "slope", generator: Optional[torch.Generator] = None,
                       directions: Optional[Tensor] = None, eval_mode: Optional[bool] = True,
                       **kwargs: Any):
        """λ (:func:`curvrate_fast.curvature_rate`) in the embedding space, on every sample given.
        A DDP-wrapped model is measured through its module: a measurement has no backward, and a
        DDP forward with grad mode on would leave DDP waiting for one."""
        inner = unwrap_model(self.model)
        space = EmbeddingSpace(inner, self.embedding, self.loss_fn, self.output)
        if eval_mode:
            modes = [(m, m.training) for m in inner.modules()]
            inner.eval()
        try:
            return curvature_rate(space.forward_fn(input_ids, **kwargs), self.origin(input_ids), labels,
                                  loss_fn=self.loss_fn, max_order=max_order, n_dirs=n_dirs,
                                  estimator=estimator, generator=generator, directions=directions,
                                  eval_mode=None)
        finally:
            if eval_mode:
                for m, mode in modes:
                    m.training = mode
