"""Taylor rule for scaled-dot-product attention: softmax(q kᵀ·scale + mask) v, written with ops
that have rules (matmul of two jets is a Cauchy product, softmax its exp/sum/division jets;
SPEC.md §2). PyTorch's nested derivatives of the fused attention fail (SPEC.md §2), so the fused
op is never differentiated: the rule is the primitive-op form that the oracle also uses
(``baseline.sdpa_primitive``), run on jets. ``nn.MultiheadAttention`` reaches it through the
decomposition of ``F.multi_head_attention_forward`` into its ops."""
from __future__ import annotations

import torch.nn.functional as F

from ..baseline import sdpa_primitive
from ..jets.registry import register

register(F.scaled_dot_product_attention)(sdpa_primitive)
