"""Logits processors: per-row changes to the logits before logprobs and sampling filters.

The sampler runs them in order on every step's rows: ``min_tokens`` and the penalties are
built in; a grammar's bitmask or an adapter's bias plug in as more. A ``SamplingRow`` says
what a row samples for: the request's parameters and the tokens it has seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ferry.outputs import PLACEHOLDER_TOKEN
from ferry.runner.input_batch import float_tensor, index_tensor
from ferry.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What one row of logits samples for: the request's parameters and the tokens it
    sees, ``token_ids[:num_tokens]`` (prompt first, then outputs and accepted drafts).
    ``token_ids`` may be longer (the request's later drafts): rows share one list."""

    sampling_params: SamplingParams
    token_ids: list[int]
    num_tokens: int
    num_prompt_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    # Structured output: this row's allowed tokens, a numpy (ceil(V / 32),) int32 bitmask
    # the engine built (``GrammarBitmask``); None when the request is not constrained.
    token_bitmask: Any = None

    @property
    def num_outputs(self) -> int:
        # Placeholders (async scheduling) count: outputs the step before is still sampling.
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:self.num_tokens]


class LogitsProcessor(Protocol):
    """Changes the logits of the rows it applies to, before logprobs and sampling filters.

    ``__call__(logits (N, V) float32, rows) -> logits`` may return a new tensor or the
    same one; it must not change rows it does not apply to, nor sync with the device
    except to read host values of ``rows``.
    """

    reads_output_tokens: bool

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor: ...


class MinTokensProcessor:
    """Forbid EOS and stop token ids for rows that have not reached ``min_tokens`` yet."""

    reads_output_tokens = False

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        return _mask_min_tokens(logits, rows)


class PenaltiesProcessor:
    """Repetition (prompt + output), presence and frequency (output only) penalties."""

    reads_output_tokens = True

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        return _apply_penalties(logits, rows)


# ---------------------------------------------------------------- min_tokens
def _mask_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    vocab = logits.shape[1]
    row_index: list[int] = []
    cols: list[int] = []
    for i, row in enumerate(rows):
        if row.num_outputs >= row.sampling_params.min_tokens:
            continue
        banned = set(row.sampling_params.stop_token_ids) | set(row.eos_token_ids)
        banned = [t for t in banned if t < vocab]  # ids past the vocab can never be sampled
        row_index.extend([i] * len(banned))
        cols.extend(banned)
    if not row_index:
        return logits
    index = (index_tensor(row_index, logits.device), index_tensor(cols, logits.device))
    return logits.index_put(index, torch.full((), float("-inf"), device=logits.device))


# ---------------------------------------------------------------- penalties
def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    chosen_rows = [i for i, row in enumerate(rows) if row.sampling_params.has_penalties]
    if not chosen_rows:
        return logits
    device = logits.device
    chosen = [rows[i] for i in chosen_rows]
    if any(PLACEHOLDER_TOKEN in row.output_token_ids for row in chosen):
        # The engine resolves the step in flight before scheduling penalized requests.
        raise RuntimeError("penalties need every output token; got a placeholder")
    sub = logits[index_tensor(chosen_rows, device)]  # (P, V), a copy
    output_counts = _token_counts(chosen, sub.shape[1], device, prompt=False)  # (P, V)
    if any(row.sampling_params.repetition_penalty != 1.0 for row in chosen):
        rep = _row_param(chosen, "repetition_penalty", device)  # (P, 1)
        prompt_counts = _token_counts(chosen, sub.shape[1], device, prompt=True)  # (P, V)
        seen = (prompt_counts > 0) | (output_counts > 0)
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
    presence = _row_param(chosen, "presence_penalty", device)  # (P, 1)
    frequency = _row_param(chosen, "frequency_penalty", device)  # (P, 1)
    sub = sub - presence * (output_counts > 0) - frequency * output_counts
    return logits.index_copy(0, index_tensor(chosen_rows, device), sub)


def _token_counts(rows: list[SamplingRow], vocab: int, device: torch.device,
                  prompt: bool) -> torch.Tensor:
    """(P, V) float counts of each token in the prompts (or the outputs) of ``rows``."""
    flat_index: list[int] = []
    for i, row in enumerate(rows):
        part = row.token_ids[:row.num_prompt_tokens] if prompt else row.output_token_ids
        flat_index.extend(i * vocab + t for t in part if 0 <= t < vocab)
    counts = torch.zeros(len(rows) * vocab, device=device)
    if flat_index:
        index = index_tensor(flat_index, device)
        counts.scatter_add_(0, index, torch.ones(len(flat_index), device=device))
    return counts.view(len(rows), vocab)


def _row_param(rows: list[SamplingRow], name: str, device: torch.device) -> torch.Tensor:
    """(P, 1) float tensor of one sampling parameter, one value per row."""
    values = [float(getattr(row.sampling_params, name)) for row in rows]
    return float_tensor(values, device).unsqueeze(1)
