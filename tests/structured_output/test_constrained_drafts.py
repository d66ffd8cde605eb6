"""Constrained requests verify draft tokens: each sampled position gets the mask of the
grammar after the drafts before it. Greedy tokens must equal those without drafts, drafts
must be accepted, and at temperature 1.0 with wrong drafts the output must still match
its schema (rows after a forbidden draft are thrown away, never used)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ferry import LLM
from ferry.config import EngineConfig
from ferry.engine.engine import Engine
from ferry.llm import _grammar_compiler_factory
from ferry.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "runner"))
from test_draft_tokens import CountingExecutor, SeededDrafter, _generate  # noqa: E402

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "tags"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9999},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["red", "green", "blue"]}}}}
PROMPTS = [[5, 9, 14, 200], [31, 7], [100, 101, 102, 103, 104, 105], [66]]
COMMON = dict(dtype="float32", block_size=4, max_model_len=128, kv_cache_memory="16MiB")


def _params(temperature: float, seed: int) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=48,
                          structured_outputs={"json": SCHEMA})


def _engine(model_dir: str, drafter) -> tuple[Engine, CountingExecutor]:
    config = EngineConfig.from_flat(model=model_dir, **COMMON)
    executor = CountingExecutor(config, drafter)
    return Engine(config, executor, grammar_compiler_factory=_grammar_compiler_factory(config)), \
        executor


def _assert_blocks_free(engine: Engine) -> None:
    pool = engine.scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model_dir = str(tiny_model_dir("llama"))
    plain = LLM(model_dir, **COMMON)
    params = [_params(0.0, i) for i in range(len(PROMPTS))]
    outs = plain.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return model_dir, params, [list(o.outputs[0].token_ids) for o in outs], plain.get_tokenizer()


@pytest.mark.parametrize("k, p_right", [(2, 0.7), (4, 1.0), (3, 0.0)])
def test_greedy_constrained_tokens_with_drafts_equal_those_without(setup, k, p_right):
    model_dir, params, reference, _ = setup
    drafter = SeededDrafter({tuple(p): r for p, r in zip(PROMPTS, reference)}, k, p_right,
                            seed=k, vocab=256)
    engine, executor = _engine(model_dir, drafter)
    assert _generate(engine, PROMPTS, params) == reference
    assert executor.drafts_scheduled > 0
    if p_right > 0:
        assert executor.drafts_accepted > 0
    else:
        assert executor.drafts_accepted == 0
    _assert_blocks_free(engine)


def test_random_constrained_outputs_with_wrong_drafts_match_the_schema(setup):
    model_dir, _, reference, tokenizer = setup
    # Greedy continuations drafted for random requests: some fit the grammar, most not.
    drafter = SeededDrafter({tuple(p): r for p, r in zip(PROMPTS, reference)}, 3, 0.5,
                            seed=1, vocab=256)
    engine, executor = _engine(model_dir, drafter)
    tokens = _generate(engine, PROMPTS, [_params(1.0, 10 + i) for i in range(len(PROMPTS))])
    for ids in tokens:
        jsonschema.validate(json.loads(tokenizer.decode(ids, skip_special_tokens=True)), SCHEMA)
    assert executor.drafts_scheduled > 0
    _assert_blocks_free(engine)
