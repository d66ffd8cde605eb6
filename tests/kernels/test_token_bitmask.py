"""Structured output's token mask: the C++ kernel against the PyTorch reference, and the
reference against a per-token loop written from the bit layout."""
from __future__ import annotations

import math

import pytest
import torch

from ferry.kernels import cpu, reference
from ferry.kernels.cpu import build


def _random_bitmask(rows: int, vocab: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.rand(rows, vocab, generator=gen) < density
    words = math.ceil(vocab / 32)
    bits = torch.zeros(rows, words * 32, dtype=torch.int64)
    bits[:, :vocab] = allowed.long()
    packed = (bits.view(rows, words, 32) << torch.arange(32)).sum(-1)   # uint32 values
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)        # as int32
    return packed.to(torch.int32)


def _loop_oracle(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    for mask_row, row in enumerate(rows):
        ok = [(int(bitmask[mask_row, t // 32]) >> (t % 32)) & 1 for t in range(logits.shape[1])]
        for t, allowed in enumerate(ok):
            if not allowed:
                out[row, t] = float("-inf")
        if all(math.isinf(v) and v < 0 for v in out[row].tolist()):
            for t, allowed in enumerate(ok):
                if allowed:
                    out[row, t] = 0.0
    return out


def test_reference_follows_the_bit_layout_including_an_emptied_row():
    vocab = 70                                   # a partial last word
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    bitmask = _random_bitmask(3, vocab, 0.3, seed=1)
    allowed = reference.unpack_bitmask(bitmask, vocab)
    logits[1, allowed[1]] = float("-inf")        # an earlier processor removed them all
    got = reference.apply_token_bitmask(logits, bitmask)
    assert torch.equal(got, _loop_oracle(logits, bitmask, [0, 1, 2]))
    assert torch.equal(got[1][allowed[1]], torch.zeros(int(allowed[1].sum())))


@pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler")
@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1000, 32000])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_cpu_kernel_equals_reference(vocab, density):
    rows = 5
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[0, : vocab // 2] = float("-inf")      # partly removed before the mask
    bitmask = _random_bitmask(rows, vocab, density, seed=vocab + 7)
    allowed = reference.unpack_bitmask(bitmask, vocab)
    logits[2, allowed[2]] = float("-inf")        # emptied: its allowed tokens get 0
    before = logits.clone()
    assert torch.equal(cpu.apply_token_bitmask(logits, bitmask),
                       reference.apply_token_bitmask(logits, bitmask))
    assert torch.equal(logits, before), "the input logits must not change"


@pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler")
def test_cpu_kernel_masks_only_the_chosen_rows():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(3))
    bitmask = _random_bitmask(2, 100, 0.2, seed=4)
    rows = torch.tensor([4, 1])
    got = cpu.apply_token_bitmask(logits, bitmask, rows)
    assert torch.equal(got, reference.apply_token_bitmask(logits, bitmask, rows))
    assert torch.equal(got, _loop_oracle(logits, bitmask, [4, 1]))
    untouched = [0, 2, 3, 5]
    assert torch.equal(got[untouched], logits[untouched])


@pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler")
def test_cpu_kernel_leaves_other_inputs_to_the_reference():
    logits = torch.randn(2, 64, dtype=torch.bfloat16)
    bitmask = _random_bitmask(2, 64, 0.5, seed=5)
    assert torch.equal(cpu.apply_token_bitmask(logits, bitmask),
                       reference.apply_token_bitmask(logits, bitmask))
    with pytest.raises(ValueError, match="mask rows"):
        cpu.apply_token_bitmask(torch.randn(3, 64), bitmask)
