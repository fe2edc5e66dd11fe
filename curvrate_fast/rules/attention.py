"""Taylor rule for scaled-dot-product attention (docs/math.md, bilinear maps and softmax).

    out = softmax(q kᵀ·s + mask) v

written with ops that have rules: q kᵀ of two jets is a Cauchy product of matmuls, the softmax is
the exp jet of the scores shifted by their primal maximum, summed and divided (an exact
recurrence), and the product with v another Cauchy product. PyTorch's nested derivatives of the
fused attention kernels fail, so the fused op is never differentiated. As in PyTorch's math
implementation, a row whose every score is masked (−inf) gives zeros, not NaN (``_safe_softmax``).
``nn.MultiheadAttention`` reaches this rule through the op-by-op decomposition of
``F.multi_head_attention_forward``. The test oracle (``baseline.sdpa_primitive``) is a separate
implementation, and ``tests/test_rules_nn.py`` compares this rule with ``F.scaled_dot_product_attention``
itself.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..jets.registry import register, tracing
from ._common import JetError, is_jet, primal


def _repeat_kv(t, rep: int):
    """Grouped-query attention: each key/value head serves ``rep`` consecutive query heads."""
    return t if rep == 1 else t.repeat_interleave(rep, dim=-3)


@register(F.scaled_dot_product_attention)
def scaled_dot_product_attention(query, key, value, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: Optional[float] = None, enable_gqa: bool = False):
    L, S = query.shape[-2], key.shape[-2]
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: is_causal and attn_mask cannot both be set")
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        if query.shape[-3] % key.shape[-3]:
            raise ValueError("enable_gqa: the number of query heads must be a multiple of the "
                             "number of key/value heads")
        rep = query.shape[-3] // key.shape[-3]
        key, value = _repeat_kv(key, rep), _repeat_kv(value, rep)
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * s
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=primal(query).device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    elif attn_mask is not None:
        if is_jet(attn_mask) and attn_mask.dtype == torch.bool:
            raise JetError("a boolean attention mask cannot be a jet")
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # rows with no admissible key: zeros (PyTorch's _safe_softmax), decided by the primal; a
    # captured graph (docs/design.md §6) cannot branch on the values, so it always masks
    dead = torch.isneginf(primal(scores)).all(dim=-1, keepdim=True)
    if tracing() or bool(dead.any()):
        scores = scores.masked_fill(dead, 0.0)
        weights = torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, True)
    return torch.matmul(weights, value)
