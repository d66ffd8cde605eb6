"""Throughput with the attention trace on server-wide but no traced request, against
tracing off: the same model and batch, A/B interleaved in one run (the shared cores' load
moves both alike). A traced request's cost is shown too.

    python benchmarks/debug_trace_overhead.py [--rounds 5] [--requests 16] [--tokens 32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry import LLM, SamplingParams  # noqa: E402


def tokens_per_second(llm: LLM, prompts: list[dict], params: SamplingParams,
                      traced: bool = False) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, debug_trace=traced)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    common = dict(kv_cache_memory="64MiB")
    off = LLM(None, **common)                                  # the demo model
    on = LLM(None, debug_trace="attention", **common)
    ids = off.engine.encode_chat([{"role": "user", "content": "Reverse: kitchen"}])
    prompts = [{"prompt_token_ids": ids}] * args.requests
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    for llm in (off, on):
        tokens_per_second(llm, prompts, params)                # warm-up
    rates = {"off": [], "on, none traced": [], "on, all traced": []}
    for _ in range(args.rounds):
        rates["off"].append(tokens_per_second(off, prompts, params))
        rates["on, none traced"].append(tokens_per_second(on, prompts, params))
        rates["on, all traced"].append(tokens_per_second(on, prompts, params, traced=True))
    print(f"load average {os.getloadavg()[0]:.1f}; {args.requests} requests x {args.tokens} "
          f"tokens, {args.rounds} interleaved rounds (median tokens/s)")
    base = statistics.median(rates["off"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  tracing {name:16s} {median:8.0f} tok/s  ({median / base:.3f}x of off)")


if __name__ == "__main__":
    main()
