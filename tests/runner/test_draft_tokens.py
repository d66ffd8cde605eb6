"""The multi-token step: draft tokens verified in one forward give plain greedy decoding.

A test-only drafter proposes k tokens per step; a seeded rule makes some of them the
greedy continuation and some wrong. Whatever it proposes, the tokens must be exactly
those of plain greedy decoding (itself checked against HF transformers), across chunked
prefill, prefix hits, preemption and the end of the context, with no leaked KV blocks.
"""
from __future__ import annotations

import random

import pytest

from ferry import LLM
from ferry.config import EngineConfig
from ferry.engine.engine import Engine
from ferry.executor.in_process import InProcessExecutor
from ferry.sampling_params import SamplingParams
from hf_reference import assert_greedy_matches, hf_greedy
from test_decode_graphs import CountingReplay, _skip_on_the_reference_backend
from test_engine_e2e import _budget_for_blocks
from tiny_models import make_tiny_model


class SeededDrafter:
    """Proposes ``k`` tokens: each the reference's next token with probability
    ``p_right``, else a wrong one; the choice is a function of (seed, request, position)."""

    def __init__(self, references: dict[tuple[int, ...], list[int]], k: int, p_right: float,
                 seed: int, vocab: int) -> None:
        self.references, self.k, self.p_right, self.seed, self.vocab = (
            references, k, p_right, seed, vocab)
        self.proposed = 0

    def propose(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> list[int]:
        reference = self.references[tuple(token_ids[:num_prompt_tokens])]
        position = len(token_ids) - num_prompt_tokens
        rng = random.Random(f"{self.seed}/{request_id}/{position}")
        drafts = []
        for j in range(self.k):
            right = reference[position + j] if position + j < len(reference) else 0
            drafts.append(right if rng.random() < self.p_right else (right + 1) % self.vocab)
        self.proposed += len(drafts)
        return drafts


class CountingExecutor(InProcessExecutor):
    """Counts the drafts scheduled and the tokens returned for them."""

    def __init__(self, config, proposer):
        super().__init__(config, proposer=proposer)
        self.drafts_scheduled = self.drafts_accepted = 0

    def execute(self, scheduler_output):
        output = super().execute(scheduler_output)
        for scheduled in scheduler_output.scheduled:
            if scheduled.spec_token_ids:
                self.drafts_scheduled += len(scheduled.spec_token_ids)
                self.drafts_accepted += len(output.sampled_token_ids[scheduled.request_id]) - 1
        return output


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("drafts") / "llama"))


def _prompts(count: int) -> list[list[int]]:
    rng = random.Random(11)
    prefix = [rng.randrange(3, 256) for _ in range(16)]
    prompts = [(prefix if i % 2 else []) + [rng.randrange(3, 256) for _ in range(rng.randint(3, 30))]
               for i in range(count)]
    return prompts + [[rng.randrange(3, 256) for _ in range(50)]]   # runs into max_model_len


def _generate(engine: Engine, prompts, params) -> list[list[int]]:
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return [tokens[f"r{i}"] for i in range(len(prompts))]


MODES = {
    "plain": dict(),
    "penalties": dict(),   # rows of one request count only the drafts before them
    "chunked": dict(max_num_batched_tokens=12),
    "preempt": dict(blocks=17, max_num_seqs=6),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("k, p_right", [(1, 0.5), (3, 0.7), (4, 0.0), (5, 1.0)])
def test_drafts_give_exactly_the_greedy_tokens_and_free_every_block(llama_dir, mode, k, p_right):
    settings = dict(MODES[mode])
    blocks = settings.pop("blocks", None)
    kv_memory = _budget_for_blocks(llama_dir, blocks) if blocks else "16MiB"
    common = dict(dtype="float32", block_size=4, max_model_len=64, kv_cache_memory=kv_memory,
                  **settings)
    prompts = _prompts(7)
    max_tokens = [12, 3, 16, 1, 9, 20, 7, None]   # None: up to max_model_len
    penalties = dict(repetition_penalty=1.5, frequency_penalty=0.5) if mode == "penalties" else {}
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **penalties)
              for n in max_tokens]
    plain = LLM(llama_dir, **common)
    reference = [o.outputs[0].token_ids for o in plain.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]

    config = EngineConfig.from_flat(model=llama_dir, **common)
    drafter = SeededDrafter({tuple(p): r for p, r in zip(prompts, reference)}, k, p_right,
                            seed=k, vocab=256)
    executor = CountingExecutor(config, drafter)
    engine = Engine(config, executor)
    assert _generate(engine, prompts, params) == reference
    stats = engine.get_stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_running == stats.num_waiting == 0
    pool = engine.scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks
    assert executor.drafts_scheduled > 0
    if p_right == 0.0:
        assert executor.drafts_accepted == 0
    elif p_right == 1.0:
        assert executor.drafts_accepted == executor.drafts_scheduled
    else:
        assert 0 < executor.drafts_accepted < executor.drafts_scheduled
    if mode == "preempt":
        assert stats.preemptions > 0
    if mode == "plain" and k == 3:
        for prompt, tokens, n in zip(prompts, reference, max_tokens):
            assert_greedy_matches(tokens, hf_greedy(llama_dir, prompt, len(tokens)), "drafts")
    # Fewer steps than tokens when drafts are accepted: the point of verifying them.
    assert engine.get_stats().num_generation_tokens_total == sum(map(len, reference))


class EveryOtherStep(SeededDrafter):
    """Drafts only at even output positions: decode-only steps without drafts come between."""

    def propose(self, request_id, token_ids, num_prompt_tokens):
        drafts = super().propose(request_id, token_ids, num_prompt_tokens)
        return drafts if (len(token_ids) - num_prompt_tokens) % 2 == 0 else []


def test_steps_with_drafts_run_eagerly_and_the_others_replay_decode_graphs(llama_dir):
    _skip_on_the_reference_backend()
    common = dict(dtype="float32", block_size=4, max_model_len=64, kv_cache_memory="16MiB",
                  max_num_seqs=8)
    prompts = _prompts(5)
    max_tokens = [12, 9, 16, 5, 11, 10]
    reference = [o.outputs[0].token_ids for o in LLM(llama_dir, **common).generate(
        [{"prompt_token_ids": p} for p in prompts],
        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens],
        use_tqdm=False)]
    config = EngineConfig.from_flat(model=llama_dir, **common)
    drafter = EveryOtherStep({tuple(p): r for p, r in zip(prompts, reference)}, k=2,
                             p_right=0.6, seed=3, vocab=256)
    executor = CountingExecutor(config, drafter)
    engine = Engine(config, executor)
    capture = CountingReplay()
    runner = executor.runner
    assert runner.capture_decode_graphs(max_num_seqs=8, max_model_len=64, capture=capture)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    assert _generate(engine, prompts, params) == reference
    assert executor.drafts_scheduled > 0 and sum(capture.replays) > 0
