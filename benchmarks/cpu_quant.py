"""CPU speed and memory of weight-only quantization: fp32, bf16, int8 and int4, same run.

The ~58M random Llama of the memory benchmark (hidden 512, intermediate 1408, 8 layers,
8 heads, vocab 32000, untied head), through ``ferry.LLM`` set up as a user would. int8/int4
are on-load RTN (``quant_type``, group size 128, symmetric), in two settings, both in every
run:

- ``int8``/``int4``: float32 activations (exact against the dequantized model), the LM
  head in bfloat16 (``--head``: ``lm_head_dtype`` bfloat16 by default, or as loaded, or
  int8);
- ``int8-a8``/``int4-a8``: llama.cpp's way, ``cpu_int8_activations: true`` (activations
  quantized to int8 per group, integer dot products) and ``lm_head_dtype: int8`` (as
  llama.cpp's Q8_0 files store the head).

bf16 is the checkpoint run in bfloat16. Each round runs every format once, interleaved
(the machine's 2 cores are shared with other work: the load is printed), and the medians
over rounds are reported:

- batch-1 decode: one request, 8 prompt tokens, ``--decode-tokens`` greedy tokens;
- offline throughput: 16 concurrent requests, 64 prompt + 64 output tokens each.

With ``llama-cpp-python`` and ``gguf`` installed, llama.cpp runs the same weights in the
same rounds, single stream: an f32 GGUF (``cpu_serving.write_gguf``) and its Q8_0 and
Q4_0 quantizations (``llama_model_quantize``, llama.cpp's own quantizer), the same prompt
and token count, one ``eval`` per token, paired with fp32, int8(-a8) and int4(-a8).

Memory: bytes of weights per format (parameters, codes + scales + zeros for the
quantized linears), and the KV blocks a ``kv_cache_memory`` budget gives per KV dtype.

    python benchmarks/cpu_quant.py [--rounds 3] [--head bf16|int8|model] [--json out.json]
"""
from __future__ import annotations

import ferry  # noqa: F401  (first: sets OpenMP's wait policy before torch loads it)

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from offline_throughput import save_random_llama  # noqa: E402

FORMATS = ("fp32", "bf16", "int8", "int4", "int8-a8", "int4-a8")
# llama.cpp's file type for each ferry format it is compared with
LLAMA_CPP_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}


def build_model(path: Path) -> int:
    return save_random_llama(path, 32000, hidden_size=512, intermediate_size=1408,
                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=2048)


def make_llm(model_dir: Path, fmt: str, head: str, threads: int):
    """An LLM of the format, set up as a user would: ``quant_type`` int8/int4 (RTN on load),
    ``lm_head_dtype`` and, for the ``-a8`` formats, ``cpu_int8_activations``."""
    from ferry import LLM

    quant = {}
    if fmt.startswith("int"):
        a8 = fmt.endswith("-a8")
        quant = dict(quant_type=fmt[:4], lm_head_dtype="int8" if a8 else _HEADS[head],
                     cpu_int8_activations=a8)
    return LLM(str(model_dir), dtype="bfloat16" if fmt == "bf16" else "float32",
               kv_cache_memory="512MiB", max_num_seqs=16, cpu_threads=threads, **quant)


_HEADS = {"model": "auto", "bf16": "bfloat16", "int8": "int8"}   # --head -> lm_head_dtype


def weight_bytes(llm) -> int:
    model = llm.engine.executor.runner.model
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed_generate(llm, prompts, max_tokens: int) -> float:
    from ferry import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == max_tokens * len(prompts)
    return produced / elapsed


def kv_blocks(budget: str = "512MiB") -> dict[str, int]:
    """KV blocks of the benchmark model per KV dtype for one CPU budget."""
    from ferry.config import parse_size
    from ferry.runner import memory
    sizes = {}
    for name, dtype in (("auto (float32)", torch.float32), ("auto (bfloat16)", torch.bfloat16),
                        ("fp8", torch.float8_e4m3fn)):
        block = memory.kv_block_bytes(8, 8, 64, 16, dtype)
        sizes[name] = parse_size(budget) // block
    return sizes


def llama_cpp_models(model_dir: Path, tmp: Path, threads: int) -> dict:
    """ferry format -> a llama_cpp.Llama of the same weights in the paired GGUF type; {}
    without llama-cpp-python or gguf."""
    try:
        import llama_cpp
        from cpu_serving import write_gguf
        f32 = tmp / "model-f32.gguf"
        write_gguf(model_dir, f32)
    except ImportError as exc:
        print(f"llama.cpp: skipped ({exc}; pip install llama-cpp-python gguf)")
        return {}
    paths = {"fp32": f32}
    for fmt, ftype in (("int8", "Q8_0"), ("int4", "Q4_0")):
        paths[fmt] = tmp / f"model-{ftype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(paths[fmt]).encode(),
                                            ctypes.byref(params)):
            raise RuntimeError(f"llama.cpp could not quantize to {ftype}")
    return {fmt: llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads,
                                 n_threads_batch=threads, verbose=False)
            for fmt, path in paths.items()}


def llama_cpp_tok_s(llm, prompt: list[int], max_tokens: int) -> float:
    """Greedy tokens/s of one stream, prompt included, as ``timed_generate`` counts it."""
    import numpy as np
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    for _ in range(max_tokens - 1):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        llm.eval([int(np.argmax(logits))])
    return max_tokens / (time.perf_counter() - start)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--head", choices=list(_HEADS), default="bf16",
                        help="LM head of int8/int4 (the -a8 formats' is int8): model dtype, "
                             "bfloat16 (16-bit policy) or int8 RTN")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        params = build_model(Path(tmp))
        llms = {fmt: make_llm(Path(tmp), fmt, args.head, args.threads)
                for fmt in FORMATS}
        decode = {fmt: [] for fmt in FORMATS}
        offline = {fmt: [] for fmt in FORMATS}
        prompt = [[3 + i for i in range(8)]]
        batch = [[100 + 7 * r + i for i in range(64)] for r in range(16)]
        peers = llama_cpp_models(Path(tmp), Path(tmp), args.threads)
        peer_decode = {fmt: [] for fmt in peers}
        for llm in llms.values():                    # warm-up: kernels built, pools touched
            timed_generate(llm, prompt, 4)
        for peer in peers.values():
            llama_cpp_tok_s(peer, prompt[0], 4)
        for _ in range(args.rounds):
            for fmt, llm in llms.items():
                decode[fmt].append(timed_generate(llm, prompt, args.decode_tokens))
                offline[fmt].append(timed_generate(llm, batch, 64))
            for fmt, peer in peers.items():
                peer_decode[fmt].append(llama_cpp_tok_s(peer, prompt[0], args.decode_tokens))
        sizes = {fmt: weight_bytes(llm) for fmt, llm in llms.items()}
    result = {"params": params, "rounds": args.rounds, "head": args.head, "threads": args.threads,
              "load_before": load_before, "load_after": uptime(),
              "decode_tok_s": {f: statistics.median(v) for f, v in decode.items()},
              "offline_tok_s": {f: statistics.median(v) for f, v in offline.items()},
              "llama_cpp_decode_tok_s": {f"{f} ({LLAMA_CPP_TYPES[f]})": statistics.median(v)
                                         for f, v in peer_decode.items()},
              "decode_rounds": decode, "llama_cpp_rounds": peer_decode,
              "weight_bytes": sizes, "kv_blocks_512MiB": kv_blocks()}
    base_d, base_o = result["decode_tok_s"]["fp32"], result["offline_tok_s"]["fp32"]
    print(f"model: {params / 1e6:.1f}M parameters; int8/int4 head: {args.head}; -a8: int8 "
          f"activations and head; threads: {args.threads}")
    print(f"{'format':8} {'batch-1 tok/s':>14} {'x fp32':>7} {'16-conc tok/s':>14} {'x fp32':>7} {'weights MiB':>12}")
    for fmt in FORMATS:
        d, o = result["decode_tok_s"][fmt], result["offline_tok_s"][fmt]
        print(f"{fmt:8} {d:14.1f} {d / base_d:7.2f} {o:14.1f} {o / base_o:7.2f} {sizes[fmt] / 2**20:12.1f}")
    for fmt, values in peer_decode.items():
        peer = statistics.median(values)
        ours = ", ".join(f"ferry {f} {result['decode_tok_s'][f] / peer:.2f}x"
                         for f in FORMATS if f.removesuffix("-a8") == fmt)
        print(f"llama.cpp {LLAMA_CPP_TYPES[fmt]:5} batch-1 {peer:8.1f} tok/s; {ours}")
    for setting, suffix in (("float activations", ""), ("int8 activations and head", "-a8")):
        x8, x4 = (result["decode_tok_s"][f"{b}{suffix}"] / base_d for b in ("int8", "int4"))
        print(f"targets, {setting}: int8 {x8:.2f}x fp32 (>= 1.8), int4 {x4:.2f}x (>= 2.5)")
    spans = {**{f"ferry {f}": v for f, v in decode.items()},
             **{f"llama.cpp {LLAMA_CPP_TYPES[f]}": v for f, v in peer_decode.items()}}
    print("batch-1 tok/s, min-max over rounds:",
          "; ".join(f"{name} {min(v):.0f}-{max(v):.0f}" for name, v in spans.items()))
    print("KV blocks in 512 MiB:", result["kv_blocks_512MiB"])
    print("load before:", load_before, "\nload after: ", result["load_after"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
