"""Per-step overhead of constrained decoding: ferry with and without a JSON-schema
constraint, at batch 1, 16 and 64, in one run, interleaved (free, constrained, free, ...).

Model: a random ~58M Llama (hidden 512, 8 layers, float32) with a byte-level BPE
tokenizer of 32,000 tokens trained here on installed Python sources (a realistic vocabulary
for the grammar libraries; no download). Each measurement adds B requests (the same prompt,
temperature 1.0, seeded), and times every engine step while all B decode; the figure is
the median step time. The constrained requests use a JSON schema whose output cannot end
within the measured steps (an array of at least 50 objects), so all B stay constrained.

    PYTHONPATH=. python benchmarks/structured_output.py [--backends guidance xgrammar]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = {"type": "array", "minItems": 50, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "tags"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                   "name": {"type": "string", "maxLength": 12},
                   "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}}}}}
VOCAB = 32000


def _corpus(limit_bytes: int = 6_000_000) -> list[str]:
    import json
    root = Path(json.__file__).parent.parent   # the standard library's sources
    texts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text)
        if size > limit_bytes:
            break
    return texts


def build_model(path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), bos_token_id=1, eos_token_id=2, hidden_size=512,
                         intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    print(f"model: vocab {len(fast)}, at {path}", flush=True)


def median_step_ms(llm, batch: int, constrained: bool, steps: int, seed: int) -> float:
    from ferry import SamplingParams
    engine = llm.engine
    extra = {"structured_outputs": {"json": SCHEMA}} if constrained else {}
    for i in range(batch):
        params = SamplingParams(temperature=1.0, seed=seed + i, max_tokens=steps + 4, **extra)
        engine.add_request(f"r{seed}-{i}", "def main():", params, stream=False)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        stats = engine.scheduler.get_stats()
        if stats.num_running == batch and stats.num_waiting == 0:
            times.append(elapsed)
    decode_times = times[2:]   # past the prefill and the first decode
    return 1000 * statistics.median(decode_times) if decode_times else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["guidance", "xgrammar"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir())
                        / "ferry-structured-output-bench", help="built once, then reused")
    args = parser.parse_args()
    from ferry import LLM
    path = args.model_dir
    if not (path / "config.json").exists():
        build_model(path)
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}", flush=True)
    print("| backend | batch | free ms/step | constrained ms/step | overhead |")
    print("|---|---|---|---|---|")
    for backend in args.backends:
        llm = LLM(model=str(path), kv_cache_memory="1GiB", max_num_seqs=64,
                  structured_output_backend=backend)
        median_step_ms(llm, 2, True, 4, 0)   # warm up (and compile the schema once)
        for batch in args.batches:
            free, json_ = [], []
            for repeat in range(args.repeats):   # interleaved A/B
                free.append(median_step_ms(llm, batch, False, args.steps, 1000 * repeat))
                json_.append(median_step_ms(llm, batch, True, args.steps, 1000 * repeat))
            f, c = statistics.median(free), statistics.median(json_)
            print(f"| {backend} | {batch} | {f:.1f} | {c:.1f} | {100 * (c / f - 1):+.1f}% |",
                  flush=True)
        del llm
    print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
