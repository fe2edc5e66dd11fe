"""CRR in the large-model training stack (docs/training.md): the input-embedding space of language
models, the trainer integrations (Hugging Face ``Trainer``, PyTorch Lightning; optional extras,
imported from their own modules), and a tiny GPT-style LM for examples and tests."""
from .embedding import EmbeddingSpace, causal_lm_loss, unwrap_model
from .tiny_gpt import TinyGPT

__all__ = ["EmbeddingSpace", "causal_lm_loss", "unwrap_model", "TinyGPT"]
