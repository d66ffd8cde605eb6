"""``ferry bench throughput`` and ``ferry bench latency``: ferry in-process, no HTTP.

- throughput: a whole workload through ``LLM.generate`` (continuous batching); tokens/s.
- latency: ``batch_size`` prompts stepped through the engine one ``step()`` at a time; the
  time until every request has its first token (prefill) and the time of each later step
  (decode).
Both compare what they measured with the physical limits of ``roofline``.
"""
from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from ferry.bench.datasets import DatasetOptions, build_workload
from ferry.bench.metrics import distribution_ms
from ferry.bench.roofline import ModelCost, measure_copy_bandwidth, model_cost, peak_flops
from ferry.sampling_params import SamplingParams


def load_llm(model: str | None, engine_args: dict[str, Any]):
    """An ``LLM`` for ``model`` (None: the demo model) with config overrides."""
    from ferry.llm import LLM

    return LLM(model=model, **{k: v for k, v in engine_args.items() if v is not None})


def device_limits(llm) -> tuple[ModelCost, dict[str, Any]]:
    """The model's cost figures and the device's measured bandwidth / known peak FLOPs."""
    engine = llm.engine
    runner_model = engine.executor.runner.model
    kv_dtype = next(runner_model.parameters()).dtype
    cost = model_cost(runner_model, engine.model_dir, kv_dtype)
    platform = engine.platform
    device = platform.torch_device
    info = {"device": platform.device_name, "device_kind": platform.kind,
            "copy_bandwidth_gb_s": measure_copy_bandwidth(device) / 1e9,
            "bandwidth_note": ("CPU memcpy bandwidth (a CPU figure)" if device.type == "cpu"
                               else "device-to-device copy bandwidth"),
            "peak_bf16_tflops": (peak_flops(platform.device_name) or 0) / 1e12 or None,
            "weight_bytes": cost.weight_bytes, "decode_weight_bytes": cost.decode_weight_bytes,
            "kv_bytes_per_token": cost.kv_bytes_per_token}
    return cost, info


def run_throughput(llm, options: DatasetOptions, temperature: float = 0.0) -> dict[str, Any]:
    """Generate the whole workload at once and report throughput against the limits."""
    workload = build_workload(options, llm.get_tokenizer())
    prompts = [s.prompt for s in workload.requests]
    params = [SamplingParams(max_tokens=s.output_len, ignore_eos=True, temperature=temperature)
              for s in workload.requests]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    result = {"kind": "throughput", "model": llm.engine.served_model_name,
              "dataset": options.__dict__, "notes": workload.notes,
              "num_requests": len(outputs), "elapsed_s": elapsed,
              "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
              "request_throughput": len(outputs) / elapsed,
              "output_throughput": output_tokens / elapsed,
              "total_token_throughput": (prompt_tokens + output_tokens) / elapsed}
    cost, info = device_limits(llm)
    result["limits"] = {**info, **_throughput_bound(llm, cost, info, outputs, elapsed)}
    return result


def _throughput_bound(llm, cost: ModelCost, info: dict[str, Any], outputs, elapsed: float):
    """Lower bound on the run's time: decode steps at full batch, each moving its bytes at the
    measured bandwidth, plus prefill at peak FLOPs where the peak is known."""
    batch = min(len(outputs), llm.engine.config.scheduler.max_num_seqs)
    prompt_lens = [len(o.prompt_token_ids) for o in outputs]
    out_lens = [len(o.outputs[0].token_ids) for o in outputs]
    context = float(np.mean(prompt_lens) + np.mean(out_lens) / 2)
    bandwidth = info["copy_bandwidth_gb_s"] * 1e9
    step_s = cost.decode_step_bytes(batch, context) / bandwidth
    decode_s = sum(out_lens) / batch * step_s
    bound = {"assumed_decode_batch": batch,
             "decode_bound_output_tok_s": batch / step_s,
             "decode_time_lower_bound_s": decode_s}
    peak = info["peak_bf16_tflops"]
    if peak:
        prefill_s = sum(cost.prefill_flops(1, n) for n in prompt_lens) / (peak * 1e12)
        bound["prefill_time_lower_bound_s"] = prefill_s
        decode_s += prefill_s
    bound["time_lower_bound_s"] = decode_s
    bound["speed_of_light_ratio"] = decode_s / elapsed
    return bound


def run_latency(llm, batch_size: int, input_len: int, output_len: int, num_iters: int = 3,
                num_warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Prefill time and per-step decode time of one batch, over ``num_iters`` runs."""
    engine = llm.engine
    if engine.has_unfinished_requests():
        raise ValueError("the engine is busy; run the latency benchmark on a fresh LLM")
    rng = random.Random(seed)
    special = set(getattr(engine.tokenizer, "all_special_ids", []) or [])
    vocab = [t for t in range(engine.vocab_size) if t not in special]
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    prefill, decode_steps, e2e = [], [], []
    for it in range(num_warmup + num_iters):
        # Fresh random prompts every iteration, so the prefix cache never helps.
        prompts = [[rng.choice(vocab) for _ in range(input_len)] for _ in range(batch_size)]
        p, steps, total = _one_batch(engine, prompts, params, f"lat{it}")
        if it >= num_warmup:
            prefill.append(p)
            decode_steps += steps
            e2e.append(total)
    result = {"kind": "latency", "model": engine.served_model_name, "batch_size": batch_size,
              "input_len": input_len, "output_len": output_len, "num_iters": num_iters,
              "num_decode_steps": len(decode_steps),
              "prefill_ms": distribution_ms(prefill),
              "decode_step_ms": distribution_ms(decode_steps),
              "e2e_ms": distribution_ms(e2e)}
    cost, info = device_limits(llm)
    result["limits"] = {**info, **_latency_bounds(cost, info, result)}
    return result


def _one_batch(engine, prompts: list[list[int]], params: SamplingParams, tag: str):
    """(seconds until every request had a token, each later step's seconds, total seconds)."""
    ids = [f"bench-{tag}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    started: set[str] = set()
    prefill_s, steps = None, []
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        if prefill_s is not None:
            steps.append(now - step_start)
        started.update(o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids)
        if prefill_s is None and len(started) == len(ids):
            prefill_s = now - start
    return prefill_s or 0.0, steps, time.perf_counter() - start


def _latency_bounds(cost: ModelCost, info: dict[str, Any], result: dict[str, Any]):
    batch, input_len, output_len = result["batch_size"], result["input_len"], result["output_len"]
    bandwidth = info["copy_bandwidth_gb_s"] * 1e9
    step_bytes = cost.decode_step_bytes(batch, input_len + output_len / 2)
    bounds: dict[str, Any] = {"decode_step_bytes": step_bytes,
                              "decode_step_lower_bound_ms": step_bytes / bandwidth * 1000}
    median_step = result["decode_step_ms"]["median"]
    if median_step:
        bounds["decode_bandwidth_utilization"] = bounds["decode_step_lower_bound_ms"] / median_step
        bounds["decode_achieved_gb_s"] = step_bytes / (median_step / 1000) / 1e9
    peak = info["peak_bf16_tflops"]
    median_prefill = result["prefill_ms"]["median"]
    flops = cost.prefill_flops(batch, input_len)
    bounds["prefill_flops"] = flops
    if median_prefill:
        bounds["prefill_achieved_tflops"] = flops / (median_prefill / 1000) / 1e12
        if peak:
            bounds["prefill_lower_bound_ms"] = flops / (peak * 1e12) * 1000
            bounds["prefill_mfu"] = bounds["prefill_lower_bound_ms"] / median_prefill
    return bounds
