"""CPU serving speed on a 56M-parameter random Llama: ferry against llama.cpp, and the roofline.

The model of issue 12 (hidden 512, intermediate 1408, 8 layers, 8 heads / 4 KV heads,
vocab 32,000, float32) is built once with random weights. Three parts:

1. **Batch-1 decode, in process.** ``LLM.generate`` of one 96-token prompt and 96 output
   tokens (greedy, ``ignore_eos``); ms per output token from the request's first-token and
   finish times. Against it: the weight bytes one decode step reads (every parameter but the
   input embedding) divided by this machine's measured read bandwidth (a large float32
   ``sum`` on the same threads), the roofline; and, when ``llama-cpp-python`` and ``gguf``
   are installed, llama.cpp on the same weights (an f32 GGUF written here, q/k permuted to
   its rotary layout) decoding the same prompt token by token. Their greedy tokens are
   compared, which checks the GGUF.
2. **Serving.** ``ferry bench serve`` (streaming ``/v1/completions``, closed loop, 96 in /
   96 out, ``ignore_eos``) against ``ferry serve`` at concurrency 1, 4, 16 and 64,
   ``--repeats`` runs each of ``--prompts-per-stream`` x concurrency requests; medians and min/max of output tok/s and TPOT p50, and the
   server's peak RSS. llama-cpp-python's server runs one request at a time, so llama.cpp is
   compared at concurrency 1 only, by its in-process decode time (no HTTP: a bound in its
   favour).
3. **A CPU-burning neighbour** on one core (``shared_cores.neighbour``) while concurrency 16
   runs ``--repeats`` times; the slowdown against quiet (target <= 2.5x).

    python benchmarks/cpu_serving.py [--repeats 5] [--json benchmarks/results/cpu_serving.json]

Times on a shared machine are noisy: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from offline_throughput import save_random_llama
from serve_harness import bench_serve, machine, served
from shared_cores import neighbour

SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
VOCAB = 32000
PROMPT_LEN = OUTPUT_LEN = 96


# ---------------------------------------------------------------- roofline

def read_bandwidth(num_bytes: int = 1 << 29, repeats: int = 7) -> float:
    """Bytes/s of reading a large float32 tensor once (a ``sum``), best of ``repeats``."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def decode_weight_bytes(model_dir: Path) -> int:
    """Bytes of every float32 weight but the input embedding (only gathered per step)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                if "embed_tokens" not in name:
                    tensor = handle.get_slice(name)
                    numel = 1
                    for dim in tensor.get_shape():
                        numel *= dim
                    total += numel * 4
    return total


# ---------------------------------------------------------------- batch-1 decode

def ferry_decode(model_dir: Path, prompt: list[int]) -> tuple[float, list[int]]:
    """ms per output token of one greedy request in process (after a warm-up request)."""
    from ferry import LLM, SamplingParams

    llm = LLM(model=str(model_dir), enable_prefix_caching=False, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt[::-1]}], params)           # warm-up
    times = []
    for _ in range(3):
        out = llm.generate([{"prompt_token_ids": prompt}], params)[0]
        m = out.metrics
        times.append((m.finished_time - m.first_token_time) / (OUTPUT_LEN - 1) * 1e3)
    return statistics.median(times), list(out.outputs[0].token_ids)


def write_gguf(model_dir: Path, path: Path) -> None:
    """An f32 GGUF of the HF Llama at ``model_dir`` (llama.cpp's ``llama`` architecture)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(cfg["vocab_size"])
    add_vocab(writer, cfg["vocab_size"])
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    for name, tensor in tensors.items():
        gguf_name, tensor = gguf_tensor(name, tensor.float(), heads, kv_heads)
        writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_vocab(writer, vocab_size: int) -> None:
    """A SentencePiece-style vocabulary of the word tokens (prompts are sent as ids): byte
    tokens after the three specials, so llama.cpp finds its byte fallbacks."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581w{i}" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.NORMAL] * (vocab_size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_tensor(name: str, tensor: torch.Tensor, heads: int, kv_heads: int):
    """llama.cpp's name for an HF tensor, and the tensor with q/k rows in its rotary order."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name], tensor
    _, _, layer, rest = name.split(".", 3)                    # model.layers.N.<module>.weight
    module = rest.removesuffix(".weight")
    if module == "self_attn.q_proj":
        tensor = rotary_interleave(tensor, heads)
    elif module == "self_attn.k_proj":
        tensor = rotary_interleave(tensor, kv_heads)
    return f"blk.{layer}.{_LAYER_NAMES[module]}.weight", tensor


def rotary_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotates the two halves of each head; llama.cpp's ``llama`` rotates adjacent
    pairs: reorder each head's rows from (half, i) to (i, half)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape).contiguous())


def llama_cpp_decode(gguf_path: Path, prompt: list[int], threads: int
                     ) -> tuple[float, list[int]]:
    """ms per output token of llama.cpp decoding greedily, one token per ``eval``."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=512, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    def last_logits():   # eval keeps no scores unless logits_all: read the context's row
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    times, tokens = [], []
    for _ in range(4):                                        # the first is a warm-up
        llm.reset()
        llm.eval(prompt)
        tokens = []
        start = time.perf_counter()
        for _ in range(OUTPUT_LEN - 1):
            token = int(np.argmax(last_logits()))
            tokens.append(token)
            llm.eval([token])
        times.append((time.perf_counter() - start) / (OUTPUT_LEN - 1) * 1e3)
    tokens.append(int(np.argmax(last_logits())))
    return statistics.median(times[1:]), tokens


def decode_section(model_dir: Path, tmp: Path) -> dict:
    prompt = [random.Random(0).randrange(3, VOCAB) for _ in range(PROMPT_LEN)]
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    bandwidth = read_bandwidth()
    weight_bytes = decode_weight_bytes(model_dir)
    roofline_ms = weight_bytes / bandwidth * 1e3
    ferry_ms, ferry_tokens = ferry_decode(model_dir, prompt)
    result = {"weight_bytes_per_step": weight_bytes, "read_bandwidth_gb_s": bandwidth / 1e9,
              "roofline_ms_per_token": roofline_ms, "ferry_ms_per_token": ferry_ms,
              "ferry_share_of_roofline": roofline_ms / ferry_ms}
    print(f"decode: {weight_bytes / 1e6:.1f} MB of weights per step, read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s -> roofline {roofline_ms:.2f} ms/token; ferry "
          f"{ferry_ms:.2f} ms/token = {roofline_ms / ferry_ms:.0%} of the roofline", flush=True)
    try:
        gguf_path = tmp / "model-f32.gguf"
        write_gguf(model_dir, gguf_path)
        llama_ms, llama_tokens = llama_cpp_decode(gguf_path, prompt, threads)
    except ImportError as exc:
        print(f"llama.cpp: skipped ({exc}; pip install llama-cpp-python gguf)", flush=True)
        return result
    same = next((i for i, (a, b) in enumerate(zip(ferry_tokens, llama_tokens)) if a != b),
                len(ferry_tokens))
    result.update(llama_cpp_ms_per_token=llama_ms, ferry_vs_llama_cpp=llama_ms / ferry_ms,
                  greedy_tokens_equal_before_first_difference=same)
    print(f"llama.cpp: {llama_ms:.2f} ms/token; ferry is {llama_ms / ferry_ms:.2f}x its "
          f"speed; greedy tokens equal for the first {same} of {OUTPUT_LEN}", flush=True)
    return result


# ---------------------------------------------------------------- serving

def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def serve_runs(url: str, concurrency: int, repeats: int, busy: bool,
               prompts_per_stream: int) -> list[dict]:
    runs = []
    for _ in range(repeats):
        with neighbour(busy):
            summary = bench_serve(url, num_prompts=max(8, prompts_per_stream * concurrency),
                                  input_len=PROMPT_LEN, output_len=OUTPUT_LEN,
                                  concurrency=concurrency, max_duration=300.0)
        runs.append({"output_tok_s": summary["output_throughput"],
                     "tpot_p50_ms": summary["tpot_ms"]["median"]})
    return runs


def summarize(label: str, runs: list[dict]) -> dict:
    tok_s = [r["output_tok_s"] for r in runs]
    median = statistics.median(tok_s)
    result = {"runs": runs, "median_output_tok_s": median,
              "min_output_tok_s": min(tok_s), "max_output_tok_s": max(tok_s),
              "spread": (max(tok_s) - min(tok_s)) / (2 * median),
              "median_tpot_p50_ms": statistics.median(r["tpot_p50_ms"] for r in runs)}
    print(f"{label:22s} {median:7.1f} output tok/s (min {min(tok_s):.1f}, max "
          f"{max(tok_s):.1f}, +-{result['spread']:.0%}), TPOT p50 "
          f"{result['median_tpot_p50_ms']:.1f} ms", flush=True)
    return result


def serving_section(model_dir: Path, args: argparse.Namespace) -> dict:
    results = {}
    with served(["--model", str(model_dir)]) as (proc, url):
        bench_serve(url, num_prompts=8, input_len=PROMPT_LEN, output_len=OUTPUT_LEN,
                    concurrency=4)                                      # warm-up
        for concurrency in args.concurrency:
            results[f"c{concurrency}"] = summarize(
                f"concurrency {concurrency}", serve_runs(url, concurrency, args.repeats, False,
                                                   args.prompts_per_stream))
        if args.neighbour_concurrency:
            c = args.neighbour_concurrency
            busy = summarize(f"concurrency {c} + busy", serve_runs(url, c, args.repeats, True,
                                                                    args.prompts_per_stream))
            quiet = results.get(f"c{c}")
            if quiet:
                busy["slowdown_vs_quiet"] = (quiet["median_output_tok_s"]
                                             / busy["median_output_tok_s"])
                print(f"neighbour slowdown: {busy['slowdown_vs_quiet']:.2f}x (target <= 2.5x)")
            results[f"c{c}_neighbour"] = busy
        results["peak_rss_mib"] = peak_rss_mib(proc.pid)
        print(f"server peak RSS: {results['peak_rss_mib']:.0f} MiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts-per-stream", type=int, default=8,
                        help="requests per round = this x concurrency (longer rounds: the "
                             "ramp-up and the tail weigh less, so rounds agree better)")
    parser.add_argument("--neighbour-concurrency", type=int, default=16,
                        help="concurrency run again with a CPU-burning neighbour (0: skip)")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    before = machine()
    print(before, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama-56m"
        params = save_random_llama(model_dir, VOCAB, **SHAPE)
        print(f"model: {params / 1e6:.1f}M parameters, float32", flush=True)
        result = {"machine": before, "args": {k: str(v) for k, v in vars(args).items()}}
        if not args.skip_decode:
            result["decode"] = decode_section(model_dir, Path(tmp))
        if not args.skip_serving:
            result["serving"] = serving_section(model_dir, args)
    result["uptime_after"] = machine()["uptime"]
    print(result["uptime_after"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
