"""Tiny random-init Hugging Face models shared by the test modules that need one, and token
ids for them (``transformers`` must be importable; the callers skip without it)."""

from __future__ import annotations

import torch
from torch import nn
import transformers


VOCAB = 100


def token_ids(seed: int = 0, batch: int = 4) -> torch.Tensor:
    """``batch`` sequences of 8 token ids below :data:`VOCAB`, seeded."""
    return torch.randint(0, VOCAB, (batch, 8), generator=torch.Generator().manual_seed(seed))


def tiny_bert(*, head: bool = True, n_heads: int = 4, attn: str | None = None) -> nn.Module:
    """A two-layer BERT (hidden size 32, ``n_heads`` heads), seeded: with a three-class
    classification head, or the bare encoder; ``attn`` picks the attention implementation
    (``None``: the transformers default)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        intermediate_size=64,
        num_labels=3,
        **({} if attn is None else {"attn_implementation": attn}),
    )
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    return cls(config)


def tiny_llama() -> nn.Module:
    """A two-layer Llama with grouped-query attention (4 query heads, 2 key/value heads) and a
    gated MLP, seeded."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(config)
