"""check_paged_attention_args: the argument contract all three attention backends share."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from attention_cases import make_batch
from ferry.kernels import reference
from ferry.kernels.checks import check_paged_attention_args


@pytest.fixture
def batch():
    meta, cache = make_batch([1, 3], [5, 3], 2, 16, torch.float32, "cpu")  # 4 tokens, Hkv 2
    return meta, cache


def test_a_valid_batch_passes_padding_rows_included(batch):
    meta, cache = batch
    check_paged_attention_args(torch.randn(6, 4, 16), cache, meta, None)
    check_paged_attention_args(torch.randn(4, 4, 16), cache, meta, 1)


@pytest.mark.parametrize("query_shape,window,match", [
    ((4, 4, 16), 0, "sliding_window"),
    ((4, 64), None, r"\(T, H, D\)"),
    ((4, 4, 8), None, "head dim"),
    ((4, 3, 16), None, "multiple"),
    ((3, 4, 16), None, "covers 4 tokens"),
])
def test_bad_query_or_window(batch, query_shape, window, match):
    meta, cache = batch
    with pytest.raises(ValueError, match=match):
        check_paged_attention_args(torch.randn(query_shape), cache, meta, window)


@pytest.mark.parametrize("change,match", [
    (dict(block_size=8), "block size"),
    (dict(seq_lens_cpu=[5, 400]), "block_tables"),
    (dict(num_decodes=2), "num_decodes"),
])
def test_bad_metadata(batch, change, match):
    meta, cache = batch
    with pytest.raises(ValueError, match=match):
        check_paged_attention_args(torch.randn(4, 4, 16), cache, dataclasses.replace(meta, **change), None)


def test_bad_cache_rank(batch):
    meta, cache = batch
    with pytest.raises(ValueError, match="kv_cache"):
        check_paged_attention_args(torch.randn(4, 4, 16), cache[0], meta, None)


def test_the_reference_applies_it(batch):
    meta, cache = batch
    with pytest.raises(ValueError, match="block_tables"):
        reference.paged_attention(torch.randn(4, 4, 16), cache,
                                  dataclasses.replace(meta, seq_lens_cpu=[5, 400]), 1.0)
