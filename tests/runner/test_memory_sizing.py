"""KV cache sizing: blocks from a budget, the GPU budget, and the profile of the largest step.

The GPU functions read ``torch.cuda`` memory counters; here those are replaced by fakes so
that the arithmetic, the error messages and what the profile runs are checked on the CPU.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ferry import LLM
from ferry.runner import model_setup
from ferry.runner.model_setup import profile_peak_activation
from ferry.platform import process_rss_bytes
from ferry.runner import memory
from ferry.runner.model_runner import allocate_kv_caches
from ferry.runner.sampler import Sampler
from tiny_models import make_tiny_model

GIB = 2**30


def test_blocks_fit_the_budget_and_stop_at_what_can_be_used():
    block = memory.kv_block_bytes(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4,
                                  dtype=torch.float32)
    assert block == 2 * 2 * 4 * 2 * 16 * 4
    assert memory.num_kv_blocks_for_budget(10 * block + 5, block, max_num_seqs=64,
                                           max_model_len=4096, block_size=4) == 10
    # 2 seats of 8 tokens use 4 blocks: a large budget is not taken beyond them.
    assert memory.num_kv_blocks_for_budget(10**9, block, max_num_seqs=2, max_model_len=8,
                                           block_size=4) == 4
    with pytest.raises(ValueError, match="does not hold a single block"):
        memory.num_kv_blocks_for_budget(block - 1, block, max_num_seqs=1, max_model_len=8,
                                        block_size=4)


def test_small_configurations_take_what_their_seats_use_large_ones_the_budget():
    """16 seats of a 512-token context of a 58M model: 512 blocks (256 MiB), not the 4 GiB
    budget; 256 seats of 2,048 tokens would use 16 GiB: the budget's 8,192 blocks."""
    block = memory.kv_block_bytes(num_layers=8, num_kv_heads=8, head_dim=64, block_size=16,
                                  dtype=torch.float32)
    assert block == 512 * 2**10
    assert memory.num_kv_blocks_for_budget(4 * GIB, block, max_num_seqs=16, max_model_len=512,
                                           block_size=16) == 16 * 32
    assert memory.num_kv_blocks_for_budget(4 * GIB, block, max_num_seqs=256,
                                           max_model_len=2048, block_size=16) == 8192
    # A context that is not a whole number of blocks still fits in each seat.
    assert memory.num_kv_blocks_for_budget(4 * GIB, block, max_num_seqs=3, max_model_len=17,
                                           block_size=16) == 6


def test_a_fresh_cpu_kv_cache_is_not_resident_and_reads_zeros():
    """1 GiB of KV cache: the pages become resident as blocks are written, not at start;
    a block never written reads 0 (padded block tables point at block 0)."""
    model = SimpleNamespace(num_layers=4, num_kv_heads=4, head_dim=64)
    num_blocks, block_size = 8192, 16                     # 256 MiB per layer
    size = 4 * 2 * num_blocks * block_size * 4 * 64 * 4
    before = process_rss_bytes()
    caches = allocate_kv_caches(model, num_blocks, block_size, torch.float32, torch.device("cpu"))
    grown = process_rss_bytes() - before
    assert before > 0 and sum(c.numel() * c.element_size() for c in caches) == size
    assert grown < size / 16, f"allocating {size >> 20} MiB made {grown >> 20} MiB resident"
    caches[0][:, 3] = 1.0                                 # a block in use
    assert caches[0][:, 3].eq(1).all()
    assert caches[0][:, 0].eq(0).all() and caches[-1][:, -1].eq(0).all()
    assert torch.count_nonzero(caches[1]) == 0


def test_gpu_budget_is_the_share_less_what_is_used_and_the_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GIB, 80 * GIB))
    budget = memory.gpu_kv_budget(torch.device("cuda"), 0.9, peak_activation_bytes=2 * GIB)
    assert budget == int(80 * GIB * 0.9) - 20 * GIB - 2 * GIB
    with pytest.raises(ValueError, match=r"20\.00 GiB are used.*needs 60\.00 GiB more.*"
                                         r"gpu_memory_utilization=0\.9"):
        memory.gpu_kv_budget(torch.device("cuda"), 0.9, peak_activation_bytes=60 * GIB)


def test_profile_runs_the_largest_forward_and_samples_every_row(tmp_path, monkeypatch):
    model_dir = str(make_tiny_model("llama", tmp_path / "llama"))
    llm = LLM(model_dir, dtype="float32", kv_cache_memory="8MiB", max_num_seqs=6,
              max_num_batched_tokens=40)

    class FakePeak:                                # the platform's GPU counters, faked
        def __init__(self, device):
            self.bytes = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.bytes = 12345
    monkeypatch.setattr(model_setup, "PeakMemory", FakePeak)
    seen = {}
    sample = Sampler.sample

    def spy(self, logits, requests, generators, **kwargs):
        seen["rows"], seen["params"] = logits.shape[0], requests[0].sampling_params
        return sample(self, logits, requests, generators, **kwargs)
    monkeypatch.setattr(Sampler, "sample", spy)

    forward_tokens = []
    model = llm.engine.executor.runner.model
    monkeypatch.setattr(model, "forward", lambda ids, *a, _f=model.forward: (
        forward_tokens.append(ids.shape[0]), _f(ids, *a))[1])
    peak = profile_peak_activation(model, llm.config, torch.device("cpu"))
    assert peak == 12345
    assert forward_tokens == [40]                  # max_num_batched_tokens in one forward
    assert seen["rows"] == 6                       # max_num_seqs rows of logits sampled
    p = seen["params"]
    assert p.top_k > 0 and p.top_p < 1 and p.min_p > 0 and not p.greedy
