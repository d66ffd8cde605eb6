"""Resident memory of ``ferry serve`` of a 58M-parameter model, at start and after a load.

Builds a random Llama of 58.6M parameters (hidden 512, intermediate 1408, 8 layers, 8 heads
and 8 KV heads of 64, vocab 32,000, context 2,048; float32: 234 MB of weights) with
transformers, serves it with default settings (``max_num_seqs`` 256, ``kv_cache_memory``
4 GiB) and reads VmRSS from ``/proc/<pid>/status`` once the server is healthy and again
after a short ``ferry bench serve`` load.

    python benchmarks/serve_memory.py [--json out.json] [-- extra serve flags]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from serve_harness import bench_serve, machine, rss_bytes, served


def build_model(path: Path, vocab: int = 32000) -> tuple[Path, int]:
    """A random 58M Llama with a word-level tokenizer; returns (path, parameters)."""
    from offline_throughput import save_random_llama

    params = save_random_llama(path, vocab, hidden_size=512, intermediate_size=1408,
                               num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                               max_position_embeddings=2048)
    return path, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json")
    parser.add_argument("serve_flags", nargs="*", help="extra ferry serve flags (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, params = build_model(Path(tmp) / "llama58m")
        with served([str(model_dir), *args.serve_flags]) as (proc, url):
            at_start = rss_bytes(proc.pid)
            summary = bench_serve(url, num_prompts=args.num_prompts, input_len=args.input_len,
                                  output_len=args.output_len, concurrency=args.concurrency)
            after_load = rss_bytes(proc.pid)
    result = {"machine": machine(), "parameters": params, "serve_flags": args.serve_flags,
              "rss_at_start_mib": at_start / 2**20, "rss_after_load_mib": after_load / 2**20,
              "completed": summary["completed"],
              "output_throughput": summary["output_throughput"]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
