"""Token embedding and the LM head (which may share the embedding's weight).

Both get an ``EmbeddingMethod`` from their ``WeightMethods`` by checkpoint prefix, which
registers the table and runs the lookup (embedding) or the matmul (head).
"""
from __future__ import annotations

import torch
from torch import nn

from ferry.layers.weight_methods import UNQUANTIZED, WeightMethods


class VocabEmbedding(nn.Module):
    """input_ids (T,) -> (T, hidden_size)."""

    looks_up_tokens = True   # rows are gathered by token: the method keeps them in order

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None,
                 prefix: str = "", weight_methods: WeightMethods | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.prefix = prefix
        self.weight_method = (weight_methods or UNQUANTIZED).embedding_method(prefix, self)
        self.weight_method.create_weights(self, vocab_size, hidden_size, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight_method.embedding(self, input_ids)          # (T,) -> (T, hidden)


class LMHead(nn.Module):
    """hidden (N, hidden_size) -> logits (N, vocab_size) in float32.

    With ``tie_to`` (tie_word_embeddings) the head has no weights of its own: it computes
    with the embedding's parameters and method, so they load once, are processed once
    (with the embedding) and keep the row order the token lookup wants.
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None,
                 prefix: str = "lm_head", weight_methods: WeightMethods | None = None,
                 tie_to: VocabEmbedding | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.prefix = prefix
        if tie_to is not None:
            self._share(tie_to)
            return
        self.looks_up_tokens = False   # only multiplied by: free to take the matmul layout
        self.weight_method = (weight_methods or UNQUANTIZED).embedding_method(prefix, self)
        self.weight_method.create_weights(self, vocab_size, hidden_size, dtype)

    def _share(self, embedding: VocabEmbedding) -> None:
        for name, param in embedding.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.weight_method = embedding.weight_method
        self.looks_up_tokens = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weight_method.apply(self, hidden).float()         # (N, hidden) -> (N, vocab)
