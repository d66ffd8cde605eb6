"""Which slice of a checkpoint tensor each rank reads, from the layout attributes alone
(no processes here), and the rank-local config."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ferry.layers.parameter import new_parameter
from ferry.models.sharded_loader import rank_slice
from ferry.models.tensor_parallel import (COLUMN, ROW, VOCAB, RowParallelMethod, local_hf_config,
                                          local_kv_heads)


def _layer(kind, **attrs):
    return SimpleNamespace(tp_kind=kind, prefix="model.layers.0.x", **attrs)


def test_column_row_and_replicated_parts():
    weight = new_parameter((8, 16), torch.float32, output_dim=0, input_dim=1)
    assert rank_slice(weight, _layer(COLUMN), None, [16, 16], 1, 2) == (0, 8, 16, 8)
    weight = new_parameter((16, 8), torch.float32, output_dim=0, input_dim=1)
    assert rank_slice(weight, _layer(ROW), None, [16, 16], 1, 2) == (1, 8, 16, 8)
    bias = new_parameter((16,), torch.float32, output_dim=0, input_dim=None)
    assert rank_slice(bias, _layer(ROW), None, [16], 1, 2)[0] is None    # row bias: whole


def test_merged_shards_and_replicated_kv_heads():
    # q: 2 local heads of 4, k/v: 1 local head of 4 (the checkpoint has one KV head, 4 ranks)
    offsets = {"q": (0, 8), "k": (8, 4), "v": (12, 4)}
    qkv = new_parameter((16, 32), torch.float32, output_dim=0, input_dim=1)
    layer = _layer(COLUMN, shard_offsets=offsets, tp_replicated_shards=("k", "v"))
    assert rank_slice(qkv, layer, "q", [32, 32], 3, 4) == (0, 24, 32, 8)
    assert rank_slice(qkv, layer, "k", [4, 32], 3, 4) == (0, 0, 4, 4)
    two_kv = _layer(COLUMN, shard_offsets=offsets, tp_replicated_shards=("k", "v"))
    assert rank_slice(qkv, two_kv, "v", [8, 32], 1, 4) == (0, 0, 4, 4)   # ranks 0,1: head 0
    assert rank_slice(qkv, two_kv, "v", [8, 32], 2, 4) == (0, 4, 8, 4)   # ranks 2,3: head 1


def test_packed_dims_and_sizes_that_do_not_divide():
    # int4 packed 8 per int32 along the input dim of a row-parallel layer (GPTQ's qweight)
    qweight = new_parameter((4, 64), torch.int32, output_dim=1, input_dim=0, packed_dim=0,
                            pack_factor=8)
    assert rank_slice(qweight, _layer(ROW), None, [8, 64], 1, 2) == (0, 4, 8, 4)
    # column-parallel merged and packed along the output dim: offsets are logical values
    packed = new_parameter((16, 8), torch.int32, output_dim=1, input_dim=0, packed_dim=1,
                           pack_factor=8)
    layer = _layer(COLUMN, shard_offsets={0: (0, 32), 1: (32, 32)})
    assert rank_slice(packed, layer, 1, [16, 8], 1, 2) == (1, 4, 8, 4)
    scales = new_parameter((3, 64), torch.float32, output_dim=1, input_dim=0)
    with pytest.raises(ValueError, match="does not divide"):
        rank_slice(scales, _layer(ROW), None, [5, 64], 0, 2)   # 5 groups over 2 ranks


def test_vocabulary_padding_and_group_size_check():
    table = new_parameter((5, 8), torch.float32, output_dim=0, input_dim=1)
    assert rank_slice(table, _layer(VOCAB), None, [9, 8], 1, 2) == (0, 5, 9, 5)  # 4 rows + pad

    class Grouped:
        group_size = 128

        def create_weights(self, *args):
            pass

    with pytest.raises(ValueError, match="group size 128"):
        RowParallelMethod(Grouped(), None).create_weights(_layer(ROW), 192, [64], None)


def test_local_config_and_kv_rules():
    config = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                             intermediate_size=96, vocab_size=101)
    local = local_hf_config(config, 4)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size,
            local.vocab_size, local.head_dim) == (2, 1, 24, 26, 8)
    assert local_kv_heads(8, 2) == 4
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        local_kv_heads(3, 4)
    with pytest.raises(ValueError, match="num_attention_heads=8 does not divide"):
        local_hf_config(config, 3)


def test_micro_batches_split_a_step_by_tokens():
    from ferry.runner.pipeline_runner import split_micro_batches

    def item(n):
        return SimpleNamespace(scheduled=SimpleNamespace(num_tokens=n))

    items = [item(n) for n in (1, 1, 1, 1, 30, 2)]
    groups = split_micro_batches(items, 2)
    assert len(groups) == 2 and sum(len(g) for g in groups) == 6
    assert [i for g in groups for i in g] == items          # order kept
    assert split_micro_batches(items[:1], 4) == [items[:1]]  # never more groups than requests
    assert len(split_micro_batches([item(1) for _ in range(8)], 4)) == 4


def test_a_split_that_does_not_fit_is_refused_before_any_worker_starts(tiny_model_dir):
    from ferry import LLM

    path = str(tiny_model_dir("llama"))          # 4 heads, 2 KV heads, 2 layers
    with pytest.raises(ValueError, match="num_attention_heads=4 does not divide by "
                                         "tensor_parallel_size=3"):
        LLM(path, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="more than the model's 2 layers"):
        LLM(path, pipeline_parallel_size=3)
