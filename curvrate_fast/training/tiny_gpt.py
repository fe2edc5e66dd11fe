"""A tiny GPT-style causal language model (token + position embeddings, pre-LayerNorm blocks with
causal scaled-dot-product attention and a GELU MLP, a linear head), for the examples, the tests
and the measurements of the training stack (docs/training.md).

Its ``forward`` takes ``input_ids`` or ``inputs_embeds`` as Hugging Face models do, so the CRR
penalty can be taken in the input-embedding space (:class:`curvrate_fast.training.EmbeddingSpace`).
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TinyGPT", "Block"]


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, mlp_ratio * d)
        self.out = nn.Linear(mlp_ratio * d, d)
        self.dropout = dropout

    def forward(self, h: Tensor) -> Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(D, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        h = h + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class TinyGPT(nn.Module):
    """``TinyGPT(vocab, d, heads, layers, max_len)``: logits (B, T, vocab) of a causal LM.

    Example::

        >>> model = TinyGPT(vocab=64, d=32, heads=2, layers=2, max_len=64)
        >>> logits = model(torch.randint(0, 64, (4, 16)))              # (4, 16, 64)
        >>> e = model.get_input_embeddings()(torch.randint(0, 64, (4, 16)))
        >>> logits = model(inputs_embeds=e)                              # the same path from embeddings
    """

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 2, layers: int = 2, max_len: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList([Block(d, heads, dropout=dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok

    def forward(self, input_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.tok(input_ids) if inputs_embeds is None else inputs_embeds
        T = h.shape[1]
        h = h + self.pos.weight[:T]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))
