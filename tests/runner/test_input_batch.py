"""The flat batch of a step: positions, slots, the rows that sample, and placeholders."""
from __future__ import annotations

import torch

from ferry.outputs import PLACEHOLDER_TOKEN, ScheduledRequest
from ferry.runner.input_batch import ScheduledState, build_model_input
from ferry.runner.model_runner import ModelRunner
from ferry.runner.request_states import RequestState
from ferry.sampling_params import SamplingParams

CPU = torch.device("cpu")


def _item(request_id, token_ids, start, blocks, *, spec=(), placeholders=0, sample=True):
    scheduled = ScheduledRequest(request_id, list(token_ids), start, sample,
                                 num_placeholders=placeholders, spec_token_ids=list(spec))
    tokens = [7] * start + list(token_ids) + list(spec)
    return ScheduledState(scheduled, RequestState(request_id, 2, SamplingParams(), (), tokens,
                                                  list(blocks)))


def test_drafts_sample_one_row_each_plus_one_and_decodes_come_first():
    prefill = _item("p", [1, 2, 3], 0, [0], sample=False)
    verify = _item("v", [5], 4, [1, 2], spec=[6, 8])       # positions 4, 5, 6
    decode = _item("d", [9], 2, [3])
    batch = build_model_input([prefill, verify, decode], block_size=4, device=CPU)
    assert [r.scheduled.request_id for r in batch.requests] == ["d", "p", "v"]
    assert batch.input_ids.tolist() == [9, 1, 2, 3, 5, 6, 8]
    assert batch.positions.tolist() == [2, 0, 1, 2, 4, 5, 6]
    assert batch.attn_metadata.slot_mapping.tolist() == [14, 0, 1, 2, 8, 9, 10]
    assert batch.attn_metadata.num_decodes == 1            # a verify step is no decode
    assert batch.logits_indices.tolist() == [0, 4, 5, 6]   # decode, then 1 + 2 drafts
    assert [r.num_sample_rows for r in batch.sampling_requests] == [1, 3]


def test_several_placeholders_of_a_request_take_its_last_samples_in_order():
    a = _item("a", [4, PLACEHOLDER_TOKEN, PLACEHOLDER_TOKEN], 3, [0, 1], placeholders=2)
    b = _item("b", [PLACEHOLDER_TOKEN], 5, [2, 3], placeholders=1)
    batch = build_model_input([a, b], block_size=4, device=CPU)
    # b decodes (first); a's placeholders are its last two known tokens.
    assert batch.placeholder_request_ids == ["b", "a", "a"]
    assert batch.placeholder_positions == [0, 2, 3]
    assert batch.placeholder_offsets == [-1, -2, -1]

    class Runner:        # the state _fill_placeholders reads
        device = CPU
        _last_sampled = (torch.tensor([11, 12, 13, 21]), {"a": 2, "b": 3})  # a: rows 0-2
    ModelRunner._fill_placeholders(Runner(), batch)
    assert batch.input_ids.tolist() == [21, 4, 12, 13]
