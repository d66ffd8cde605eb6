"""Multi-LoRA serving against PEFT: random adapters on tiny random Llama and Qwen2 models.

Three adapters (different ranks, targets, alpha and rsLoRA) and the base model run in ONE
batch; for each request ferry's greedy tokens must equal PEFT's ``merge_and_unload()``
model's and its top logprobs must equal that model's log-softmax (float32), with chunked
prefill, preemption, async scheduling and fewer device slots than adapters (swapping).
"""
from __future__ import annotations

import random

import pytest

pytest.importorskip("peft")

from ferry import LLM, LoRARequest, SamplingParams  # noqa: E402
from hf_reference import NEAR_TIE  # noqa: E402
from peft_adapters import make_adapter, merged_greedy  # noqa: E402
from test_engine_e2e import _budget_for_blocks  # noqa: E402

STEPS = 6
ADAPTERS = {   # name -> make_adapter options
    "all-r8": dict(seed=11, r=8, alpha=16),
    "qv-r4-rslora": dict(seed=12, r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True),
    "mlp-o-r16": dict(seed=13, r=16, alpha=8, targets=("o_proj", "gate_proj", "up_proj",
                                                       "down_proj")),
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir(request.param)
    root = tmp_path_factory.mktemp(f"adapters_{request.param}")
    adapters = {name: str(make_adapter(base, root / name, **opts))
                for name, opts in ADAPTERS.items()}
    return str(base), adapters


def _batch(seed: int, adapters: dict[str, str]):
    """8 prompts cycling base, adapter 1, 2, 3 (a shared prefix gives prefix-cache hits)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 256) for _ in range(12)]
    names = [None, *adapters]
    prompts = [prefix + [rng.randrange(3, 256) for _ in range(rng.randint(2, 30))]
               for _ in range(8)]
    return prompts, [names[i % 4] for i in range(8)]


def _check(llm: LLM, base: str, adapters: dict[str, str], prompts, loras, context: str):
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=3)
    requests = [None if n is None else LoRARequest(n, i + 1, adapters[n])
                for i, n in enumerate(loras)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        lora_request=requests)
    differs = 0
    for prompt, name, out in zip(prompts, loras, outs):
        completion = out.outputs[0]
        want = merged_greedy(base, adapters.get(name), prompt, STEPS)
        if name is not None:
            differs += [t for t, _, _ in want] != [t for t, _, _ in
                                                   merged_greedy(base, None, prompt, STEPS)]
        for step, (got, lp, (token, logsoftmax, gap)) in enumerate(
                zip(completion.token_ids, completion.logprobs, want)):
            if got != token:
                assert gap < NEAR_TIE, f"{context}/{name}: step {step}: {got} != PEFT {token}"
                break
            for top_id, top_logprob in lp.top:
                assert abs(top_logprob - float(logsoftmax[top_id])) < 2e-4, (
                    f"{context}/{name}: step {step}: logprob of {top_id}")
    assert differs >= 2, "the adapters must change the outputs, or the test proves nothing"
    stats = llm.engine.get_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    assert llm.engine.lora.num_in_flight() == 0


MODES = {
    "plain": dict(),
    "chunked": dict(max_num_batched_tokens=16),
    "preempt": dict(max_num_seqs=8),            # KV budget set below
    "async": dict(async_scheduling="on", max_num_batched_tokens=16),
    "two-slots": dict(max_loras=2, max_cpu_loras=1),   # swaps and waits; host re-reads
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_batch_matches_peft_merged(setup, mode):
    base, adapters = setup
    kwargs = dict(MODES[mode])
    kwargs["kv_cache_memory"] = (_budget_for_blocks(base, 18) if mode == "preempt" else "64MiB")
    llm = LLM(base, dtype="float32", block_size=4, enable_lora=True, max_lora_rank=16, **kwargs)
    prompts, loras = _batch(seed=3, adapters=adapters)
    _check(llm, base, adapters, prompts, loras, mode)
    if mode == "preempt":
        assert llm.engine.get_stats().preemptions > 0
    if mode == "two-slots":
        stats = llm.engine.executor.lora_stats()
        assert stats["swaps_out"] > 0 and stats["host_loads"] > len(adapters)
