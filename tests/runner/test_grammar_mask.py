"""The sampler's grammar mask: bits unpacked as the backends pack them, only constrained
rows change, and the grammar wins over min_tokens."""
from __future__ import annotations

import numpy as np
import torch

from ferry.runner.grammar_mask import GrammarMaskProcessor, unpack_bitmask
from ferry.runner.sampler import Sampler
from ferry.runner.logits_processors import SamplingRow
from ferry.sampling_params import SamplingParams

VOCAB = 70


def _bitmask(allowed: list[int]) -> np.ndarray:
    words = np.zeros((VOCAB + 31) // 32, dtype=np.uint32)
    for t in allowed:
        words[t // 32] |= np.uint32(1) << np.uint32(t % 32)
    return words.view(np.int32)


def _row(mask=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [1, 2], 2, 2, (5,), token_bitmask=mask)


def test_unpack_matches_the_bit_layout():
    allowed = [0, 31, 32, 33, 63, 64, 69]
    bools = unpack_bitmask(torch.from_numpy(np.stack([_bitmask(allowed)])), VOCAB)
    assert bools.shape == (1, VOCAB)
    assert torch.nonzero(bools[0]).flatten().tolist() == allowed


def test_only_constrained_rows_change():
    logits = torch.randn(3, VOCAB)
    rows = [_row(), _row(_bitmask([3, 7])), _row()]
    out = GrammarMaskProcessor()(logits, rows)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [3, 7]
    assert torch.equal(out[1, [3, 7]], logits[1, [3, 7]])


def test_sampled_tokens_are_always_allowed_at_temperature_one():
    sampler = Sampler()
    allowed = [4, 9, 40]
    rows = [_row(_bitmask(allowed), temperature=1.0) for _ in range(64)]
    tokens, _ = sampler.sample(torch.randn(64, VOCAB) * 5, rows, [None] * 64)
    assert set(tokens.tolist()) <= set(allowed)


def test_grammar_wins_when_min_tokens_bans_the_only_allowed_token():
    rows = [_row(_bitmask([5]), temperature=0.0, min_tokens=3)]   # 5 is the EOS
    tokens, _ = Sampler().sample(torch.randn(1, VOCAB), rows, [None])
    assert tokens.tolist() == [5]
