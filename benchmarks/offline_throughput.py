"""Offline throughput: ferry vs Hugging Face transformers on one workload, same run.

Workload (issue "Core engine"): 64 requests, prompt lengths uniform in 32-256, output
lengths uniform in 16-256 with ignore_eos, a ~15M-parameter Llama-shape random model
(hidden 384, 6 layers, vocab 8000), float32, 2 CPU threads. HF runs it one request at a
time and in static batches of 16 (left padding; a batch runs to its longest output; only
the tokens each request asked for are counted). Prints useful output tokens/s and ratios.

    python benchmarks/offline_throughput.py [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def save_random_llama(path: Path, vocab: int, **shape) -> int:
    """A random Llama of ``shape`` (LlamaConfig fields) with a word-level tokenizer over
    synthetic words (enough for text out, no download), saved at ``path``; its parameters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **shape))
    model.save_pretrained(path, safe_serialization=True)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def build_model(path: Path, vocab: int = 8000) -> Path:
    params = save_random_llama(path, vocab, hidden_size=384, intermediate_size=1024,
                               num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                               max_position_embeddings=1024)
    print(f"model: {params / 1e6:.1f}M parameters at {path}")
    return path


def make_workload(num: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(32, 256))], rng.randint(16, 256))
            for _ in range(num)]


def run_ferry(model_dir: Path, workload) -> float:
    from ferry import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="2GiB")
    prompts = [{"prompt_token_ids": p} for p, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]
    # Warm-up on prompts outside the workload: the prefix cache must not hold any of it.
    warmup = [{"prompt_token_ids": [3 + i] * 40} for i in range(4)]
    llm.generate(warmup, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                 use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(n for _, n in workload), "ferry produced a different token count"
    return produced / elapsed


def run_hf(model_dir: Path, workload, batch_size: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = 0
    useful = sum(n for _, n in workload)
    with torch.inference_mode():  # warm-up, as ferry gets one
        model.generate(input_ids=torch.tensor([[3] * 40]), max_new_tokens=8, do_sample=False,
                       pad_token_id=pad)
    start = time.perf_counter()
    for i in range(0, len(workload), batch_size):
        batch = workload[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=False, pad_token_id=pad)
    return useful / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "llama-15m")
        workload = make_workload(args.num_requests, args.seed, 8000)
        runs = {"ferry": [], "hf_one_at_a_time": [], "hf_static_batch_16": []}
        for r in range(args.repeats):
            runs["ferry"].append(run_ferry(model_dir, workload))
            runs["hf_static_batch_16"].append(run_hf(model_dir, workload, 16))
            runs["hf_one_at_a_time"].append(run_hf(model_dir, workload, 1))
            print(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in runs.items()))

    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "tokens_per_s_median": med,
        "ratio_vs_hf_one_at_a_time": med["ferry"] / med["hf_one_at_a_time"],
        "ratio_vs_hf_static_batch_16": med["ferry"] / med["hf_static_batch_16"],
        "runs": runs, "requests": args.num_requests, "threads": args.threads,
        "torch": torch.__version__,
    }
    print(f"\nuseful output tokens/s (median of {args.repeats}):")
    for k, v in med.items():
        print(f"  {k:<22} {v:8.0f}")
    print(f"ferry / HF one at a time : {result['ratio_vs_hf_one_at_a_time']:.2f}x (target >= 10x)")
    print(f"ferry / HF static batch 16: {result['ratio_vs_hf_static_batch_16']:.2f}x (target >= 2x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
