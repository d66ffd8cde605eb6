"""Multi-LoRA throughput: base model vs LoRA enabled but unused vs 1, 4 and 16 adapters.

One run, interleaved rounds (so a load change on shared cores hits every configuration
alike): each round runs the same workload on
  base       LLM without LoRA;
  unused     LLM with enable_lora (16 slots, rank 16), no request names an adapter;
  N adapters the same LLM, requests spread round-robin over N distinct adapters (rank 8).
Targets (issue 15): unused >= 0.97x base, 16 adapters >= 0.7x base. Output tokens/s are
medians over the rounds; ratios are against base.

Model: the ~15M-parameter random Llama of offline_throughput.py (hidden 384, 6 layers),
float32. Adapters: random PEFT-format files on all seven projections.

    python benchmarks/lora_throughput.py [--rounds 3] [--requests 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from offline_throughput import build_model  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(path: Path, model_dir: Path, seed: int, rank: int = 8) -> Path:
    """A random LoRA adapter in PEFT's file format for the model at ``model_dir``."""
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inter),
              "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name in MODULES:
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{name}"
            in_f, out_f = shapes[name]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": MODULES,
         "bias": "none"}))
    return path


def make_workload(num: int, seed: int, vocab: int, out_len: int):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(32, 128))] for _ in range(num)]


def timed(llm, prompts, out_len: int, names) -> float:
    from ferry import LoRARequest, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    loras = None if names is None else [
        None if n is None else LoRARequest(n) for n in names]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        lora_request=loras)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == len(prompts) * out_len
    return produced / elapsed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from ferry import LLM

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp(prefix="ferry-lora-bench-"))
    model_dir = build_model(root / "model")
    adapters = {f"ad{i}": str(write_adapter(root / f"ad{i}", model_dir, seed=100 + i))
                for i in range(16)}
    common = dict(dtype="float32", kv_cache_memory="1GiB", enable_prefix_caching=False)
    base = LLM(str(model_dir), **common)
    lora = LLM(str(model_dir), enable_lora=True, max_loras=16, max_lora_rank=16, **common)
    for name, path in adapters.items():
        lora.load_lora(name, path)
    prompts = make_workload(args.requests, seed=0, vocab=8000, out_len=args.output_len)
    names = list(adapters)
    configs = {
        "base": (base, None),
        "unused": (lora, None),
        **{f"{n} adapters": (lora, [names[i % n] for i in range(len(prompts))]) for n in (1, 4, 16)},
    }
    warm = prompts[:4]
    for llm, picks in configs.values():     # warm-up: kernels built, adapters swapped in
        timed(llm, warm, 4, None if picks is None else picks[:4])
    results: dict[str, list[float]] = {name: [] for name in configs}
    load = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    for round_index in range(args.rounds):
        for name, (llm, picks) in configs.items():
            results[name].append(timed(llm, prompts, args.output_len, picks))
            print(f"round {round_index}: {name}: {results[name][-1]:.1f} tok/s", flush=True)
    load.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    medians = {name: statistics.median(v) for name, v in results.items()}
    report = {"tokens_per_s": medians, "ratio_to_base": {n: m / medians["base"]
                                                        for n, m in medians.items()},
              "runs": results, "uptime": load, "threads": torch.get_num_threads(),
              "requests": args.requests, "output_len": args.output_len}
    print(f"{'config':<12} {'tok/s':>8} {'x base':>7}   runs")
    for name, median in medians.items():
        runs = " ".join(f"{v:.0f}" for v in results[name])
        print(f"{name:<12} {median:8.1f} {median / medians['base']:7.3f}   {runs}")
    print("load:", *load, sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
