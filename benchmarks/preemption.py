"""Preemption benchmark: a burst that overflows the KV cache, then urgent requests; swap vs
recompute, in process on a small random Llama.

A burst of low-priority requests (``--burst`` x ``--prompt-len`` tokens, ``--max-tokens``
each) fills a KV cache of ``--kv-blocks`` blocks; after ``--urgent-after`` steps,
``--urgent`` requests of priority -1 arrive and preempt. Per mode: recomputed tokens (the
wasted prefill), preemptions, the urgent requests' TTFT, wall time and throughput, and
whether the tokens equal the other mode's (greedy).

    PYTHONPATH=. python benchmarks/preemption.py --json benchmarks/results/preemption.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_harness import machine  # noqa: E402


def build_model(path: Path) -> int:
    from offline_throughput import save_random_llama

    return save_random_llama(path, 8000, hidden_size=384, intermediate_size=1024,
                             num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                             max_position_embeddings=2048)


def run_mode(model: Path, mode: str, args: argparse.Namespace) -> dict:
    import torch

    from ferry import LLM, SamplingParams
    from ferry.runner.memory import kv_block_bytes

    block_bytes = kv_block_bytes(6, 6, 64, 16, torch.float32)
    llm = LLM(str(model), dtype="float32", block_size=16, preemption_mode=mode,
              kv_cache_memory=args.kv_blocks * block_bytes, swap_space=1.0,
              max_num_seqs=64, memory_pressure_threshold=1.0)
    engine = llm.engine
    rng = random.Random(0)
    low = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    high = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for i in range(args.burst):
        engine.add_request(f"low{i}", [rng.randrange(3, 8000) for _ in range(args.prompt_len)],
                           low, priority=5)
    finals, step, start = {}, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        if step == args.urgent_after:
            for i in range(args.urgent):
                engine.add_request(f"urgent{i}", [rng.randrange(3, 8000) for _ in range(64)],
                                   high, priority=-1)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        step += 1
    wall = time.perf_counter() - start
    stats = engine.get_stats()
    urgent_ttft = [finals[f"urgent{i}"].metrics.first_token_time
                   - finals[f"urgent{i}"].metrics.arrival_time for i in range(args.urgent)]
    tokens = sum(len(o.outputs[0].token_ids) for o in finals.values())
    return {"mode": mode, "wall_s": wall, "steps": step,
            "preemptions_swap": stats.preemptions_swap,
            "preemptions_recompute": stats.preemptions_recompute,
            "recomputed_tokens": stats.recomputed_tokens,
            "urgent_ttft_ms_max": 1000 * max(urgent_ttft),
            "urgent_ttft_ms_mean": 1000 * sum(urgent_ttft) / len(urgent_ttft),
            "output_tokens_per_s": tokens / wall,
            "kv_usage_at_end": stats.kv_cache_usage, "swapped_blocks_at_end": stats.swapped_blocks,
            "tokens": {rid: o.outputs[0].token_ids for rid, o in finals.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=12)
    parser.add_argument("--prompt-len", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--kv-blocks", type=int, default=100)
    parser.add_argument("--urgent", type=int, default=4)
    parser.add_argument("--urgent-after", type=int, default=12)
    parser.add_argument("--json")
    args = parser.parse_args()
    before = machine()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama"
        params = build_model(model)
        runs = [run_mode(model, mode, args) for mode in ("swap", "recompute")]
    same = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    for r in runs:
        del r["tokens"]
    report = {"machine_before": before, "machine_after": machine(), "parameters": params,
              "args": vars(args), "runs": runs, "identical_tokens_across_modes": same}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
