"""How a vocabulary table is stored, looked up and multiplied by: the ``EmbeddingMethod`` strategy.

The token embedding looks rows up (``embedding``); the LM head multiplies by the same
kind of table (``apply``). Both layers get their method from ``WeightMethods``, so a
quantized head or embedding is one more method, as for linears.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ferry import kernels

from ferry.layers.linear_method import store_column_major
from ferry.layers.parameter import new_parameter


class EmbeddingMethod(ABC):
    """The weights, lookup and head matmul of one (vocab_size, hidden_size) table.

    Same contract as ``LinearMethod``: ``create_weights`` registers parameters that the
    loader fills by name, ``process_weights_after_loading`` runs once after loading, on
    the weights' device, and may read ``layer.looks_up_tokens`` (True when the table is
    also indexed by token, so its rows must stay addressable); ``embedding`` and
    ``apply`` run on every call.
    """

    @abstractmethod
    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype | None) -> None:
        """Register the parameters of a ``num_embeddings`` x ``embedding_dim`` table."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Prepare the loaded weights (default: nothing to do)."""

    @abstractmethod
    def embedding(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (T,) -> (T, embedding_dim)."""

    @abstractmethod
    def apply(self, layer: nn.Module, hidden: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """The head: hidden (N, embedding_dim) -> logits (N, num_embeddings), in the model dtype."""


class UnquantizedEmbeddingMethod(EmbeddingMethod):
    """A plain (vocab, hidden) table: ``F.embedding`` and ``kernels.dense_linear``.

    On the CPU a head that is only multiplied by takes the column-major matmul layout;
    a table looked up by token (the embedding, a head tied to it) keeps its row order.
    """

    def create_weights(self, layer: nn.Module, num_embeddings: int, embedding_dim: int,
                       params_dtype: torch.dtype | None) -> None:
        layer.weight = new_parameter((num_embeddings, embedding_dim), params_dtype,
                                     output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.device.type == "cpu" and not layer.looks_up_tokens:
            store_column_major(layer.weight)

    def embedding(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, layer.weight)                  # (T,) -> (T, hidden)

    def apply(self, layer: nn.Module, hidden: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.dense_linear(hidden, layer.weight, bias)       # (N, hidden) -> (N, vocab)
