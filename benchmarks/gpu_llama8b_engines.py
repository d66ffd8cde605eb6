"""The workloads of ``gpu_llama8b.py`` and how each engine runs them (one engine per process).

Both engines get the same prompts (random non-special token ids, seeded), greedy decoding
and exactly the asked number of output tokens (ferry: ``ignore_eos``; HF: ``min_new_tokens``).
Decode rates exclude the first token: (output tokens - 1) / (last token time - first token
time). Throughput is (prompt + output tokens) / wall time of the whole workload.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_llama8b_model import ModelShape

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKLOAD_NAMES = ("decode", "throughput256", "throughput1024")
DECODE_REPEATS = 3  # measured decode runs (median), after one warm-up run


@dataclass(frozen=True)
class Workload:
    name: str
    num_requests: int
    input_len: int
    output_len: int


def workloads(args: argparse.Namespace, every: bool = False) -> list[Workload]:
    """The workloads of this run (``--only``), or all of them with ``every``."""
    n = args.num_requests or (6 if args.smoke else 1000)
    if args.smoke:
        all_ = [Workload("decode", 1, 8, 16), Workload("throughput256", n, 16, 8),
                Workload("throughput1024", n, 32, 4)]
    else:
        all_ = [Workload("decode", 1, 32, 256), Workload("throughput256", n, 256, 256),
                Workload("throughput1024", n, 1024, 128)]
    return [w for w in all_ if every or w.name in args.only]


def make_prompts(w: Workload, shape: ModelShape, count: int, seed: int) -> list[list[int]]:
    """``count`` prompts of random non-special token ids, the same in every process."""
    rng = random.Random(seed * 1000 + WORKLOAD_NAMES.index(w.name))
    return [[rng.randrange(shape.bos_id) for _ in range(w.input_len)] for _ in range(count)]


def decode_prompts(w: Workload, shape: ModelShape, seed: int) -> list[list[int]]:
    """One warm-up prompt, then DECODE_REPEATS measured ones (fresh, so no prefix-cache hit)."""
    return make_prompts(w, shape, 1 + DECODE_REPEATS, seed)


def throughput_result(num_requests: int, prompt_tokens: int, output_tokens: int,
                      elapsed: float) -> dict:
    return {"num_requests": num_requests, "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "elapsed_s": elapsed,
            "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
            "output_tok_s": output_tokens / elapsed}


# ----------------------------------------------------------------------------- ferry
def run_ferry(args, shape: ModelShape, device: torch.device, out: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT))  # run from the source tree
    from ferry import LLM

    kwargs = {"dtype": args.dtype, "device": device.type, "seed": args.seed,
              "max_num_seqs": args.max_num_seqs, "enforce_eager": args.enforce_eager or None,
              "max_num_batched_tokens": args.max_num_batched_tokens,
              "gpu_memory_utilization": args.gpu_memory_utilization,
              "async_scheduling": args.async_scheduling}
    if device.type == "cpu":
        kwargs["kv_cache_memory"] = "256MiB"
    start = time.perf_counter()
    llm = LLM(str(args.model_dir), **{k: v for k, v in kwargs.items() if v is not None})
    cfg = llm.config.to_flat()
    # None: eager (flag, CPU, or capture failed)
    graphs = llm.engine.executor.runner.decode_graphs
    results: dict = {"load_s": time.perf_counter() - start,
                     "config": {key: cfg[key] for key in (
                         "max_num_seqs", "max_num_batched_tokens", "enforce_eager",
                         "gpu_memory_utilization", "enable_prefix_caching")},
                     "decode_graph_buckets": graphs.buckets if graphs is not None else None,
                     "async_scheduling": llm.engine.async_scheduling}
    print(f"ferry: loaded in {results['load_s']:.0f} s (decode graphs: "
          f"{'yes' if graphs is not None else 'no'}, async scheduling: "
          f"{'on' if llm.engine.async_scheduling else 'off'})", flush=True)
    for w in workloads(args):
        run = ferry_decode if w.name == "decode" else ferry_throughput
        results[w.name] = run(llm, w, shape, args.seed)
        print(f"ferry {w.name}: {results[w.name]}", flush=True)
        out.write_text(json.dumps(results, indent=2))


def ferry_decode(llm, w: Workload, shape: ModelShape, seed: int) -> dict:
    """Per request: (output tokens - 1) / (finish time - first token time), engine clocks."""
    from ferry import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True)
    rates = []
    for i, prompt in enumerate(decode_prompts(w, shape, seed)):
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        m, produced = out.metrics, len(out.outputs[0].token_ids)
        if m is None or m.first_token_time is None or m.finished_time is None:
            raise RuntimeError("ferry returned no request timings (RequestOutput.metrics)")
        if i > 0:  # the first one is a warm-up
            rates.append((produced - 1) / (m.finished_time - m.first_token_time))
    return {"input_len": w.input_len, "output_len": w.output_len,
            "decode_tok_s": statistics.median(rates), "decode_tok_s_runs": rates}


def ferry_throughput(llm, w: Workload, shape: ModelShape, seed: int) -> dict:
    from ferry import SamplingParams

    warm = make_prompts(w, shape, min(w.num_requests, 16), seed + 7919)
    llm.generate([{"prompt_token_ids": p} for p in warm],
                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    prompts = [{"prompt_token_ids": p} for p in make_prompts(w, shape, w.num_requests, seed)]
    params = SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    if produced != w.num_requests * w.output_len:
        raise RuntimeError(f"ferry produced {produced} tokens, expected "
                           f"{w.num_requests * w.output_len}")
    return throughput_result(len(outs), w.num_requests * w.input_len, produced, elapsed)


# ----------------------------------------------------------------------------- HF transformers
def run_hf(args, shape: ModelShape, device: torch.device, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir),
                                                 dtype=getattr(torch, args.dtype))
    model = model.to(device).eval()
    results: dict = {"load_s": time.perf_counter() - start,
                     "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    print(f"hf: loaded in {results['load_s']:.0f} s", flush=True)
    _hf_generate(model, [[1] * 8, [2] * 8], 4, shape, device)  # warm-up (cuBLAS, allocator)
    for w in workloads(args):
        if w.name == "decode":
            results[w.name] = hf_decode(model, w, shape, device, args.seed)
        else:
            results[w.name] = hf_throughput(model, w, shape, device, args)
        print(f"hf {w.name}: {results[w.name]}", flush=True)
        out.write_text(json.dumps(results, indent=2))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_generate(model, prompts: list[list[int]], new_tokens: int, shape: ModelShape,
                 device: torch.device, streamer=None):
    """Greedy, exactly ``new_tokens`` per prompt (EOS suppressed), left padding."""
    width = max(len(p) for p in prompts)
    pad = shape.eos_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                             streamer=streamer)
    _sync(device)
    return out


def hf_decode(model, w: Workload, shape: ModelShape, device: torch.device, seed: int) -> dict:
    """(output tokens - 1) / (last token time - first token time), timed by a streamer."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []  # [prompt, token 1, token 2, ...]

        def put(self, value):
            _sync(device)
            self.times.append(time.perf_counter())

        def end(self):
            pass

    rates = []
    for i, prompt in enumerate(decode_prompts(w, shape, seed)):
        clock = Clock()
        out = _hf_generate(model, [prompt], w.output_len, shape, device, streamer=clock)
        produced = out.shape[1] - len(prompt)
        if i > 0:
            rates.append((produced - 1) / (clock.times[-1] - clock.times[1]))
    return {"input_len": w.input_len, "output_len": w.output_len,
            "decode_tok_s": statistics.median(rates), "decode_tok_s_runs": rates}


def hf_throughput(model, w: Workload, shape: ModelShape, device: torch.device, args) -> dict:
    count = min(w.num_requests, args.hf_num_requests or (4 if args.smoke else 128))
    prompts = make_prompts(w, shape, count, args.seed)
    batch = args.hf_batch_size or (2 if args.smoke else 64)
    start = time.perf_counter()
    produced = 0
    for i in range(0, count, batch):
        chunk = prompts[i:i + batch]
        out = _hf_generate(model, chunk, w.output_len, shape, device)
        produced += (out.shape[1] - max(len(p) for p in chunk)) * len(chunk)
    result = throughput_result(count, count * w.input_len, produced, time.perf_counter() - start)
    return {**result, "batch_size": batch, "subset_of": w.num_requests}


