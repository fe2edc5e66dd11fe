"""Taylor rule for scaled-dot-product attention: softmax(q kᵀ·scale + mask) v, written with ops
that have rules (matmul of two jets is a Cauchy product, softmax its exp/sum/division jets;
SPEC.md §2). PyTorch's nested derivatives of the fused attention fail (SPEC.md §2), so the fused
op is never differentiated. ``nn.MultiheadAttention`` reaches this through the decomposition of
``F.multi_head_attention_forward`` into its ops."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..jets.registry import register
from ._common import is_jet, primal


@register(F.scaled_dot_product_attention)
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False):
    L, S = query.shape[-2], key.shape[-2]
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * s
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=primal(query).device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        attn_mask = primal(attn_mask) if not is_jet(attn_mask) else attn_mask
        if not is_jet(attn_mask) and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, True)
    return torch.matmul(weights, value)
