"""CPU kernel micro-benchmarks: the figures behind the CPU fast path's design choices.

1. Matmul weight layout: ``F.linear`` with the (out, in) weight row-major (as loaded) vs
   column-major (what ferry stores on the CPU), at the row counts of decode steps, on the
   matmul shapes of the offline benchmark's model (hidden 384, intermediate 1024, vocab 8000).
2. With ``--gemv``: ferry's float32 GEMV (``kernels.cpu.dense_linear``, on ferry's worker
   pool) vs MKL (``F.linear``) on the column-major weights of the 56M Llama of issue 12
   (hidden 512, intermediate 1408, 8 layers, 8/4 heads) and its row-major LM head (vocab
   32,000), the weights of a whole decode step, interleaved and best of N (robust on
   shared cores).
3. Paged attention: the C++ kernel (``ferry.kernels.cpu``) vs the PyTorch reference, on
   decode batches and a prefill, with blocks scattered over the cache as a block pool
   leaves them.

    python benchmarks/cpu_kernels.py [--threads 2] [--gemv] [--json out.json]

Prints medians; the ratios are measured side by side in one process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ferry.kernels import cpu, reference
from ferry.kernels.attn_metadata import AttentionMetadata

MATMUL_SHAPES = [(384, 640), (384, 384), (384, 2048), (1024, 384), (384, 8000)]  # (in, out)
ROWS = [1, 4, 8, 16, 32, 48, 64, 128]


def median_seconds(fn, repeats: int = 50) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_layouts() -> list[dict]:
    results = []
    for rows in ROWS:
        flops, seconds = 0, {"row_major": 0.0, "column_major": 0.0}
        for in_features, out_features in MATMUL_SHAPES:
            x = torch.randn(rows, in_features)
            row_major = torch.randn(out_features, in_features)
            column_major = row_major.t().contiguous().t()     # same values and shape
            flops += 2 * rows * in_features * out_features
            seconds["row_major"] += median_seconds(lambda: F.linear(x, row_major))
            seconds["column_major"] += median_seconds(lambda: F.linear(x, column_major))
        gflops = {k: flops / v / 1e9 for k, v in seconds.items()}
        results.append({"rows": rows, **{f"{k}_gflops": v for k, v in gflops.items()},
                        "speedup": gflops["column_major"] / gflops["row_major"]})
    return results


GEMV_LAYERS = [(512, 1024), (512, 512), (512, 2816), (1408, 512)] * 8     # (in, out): qkv, o, gate/up, down
GEMV_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def gemv_vs_mkl(repeats: int = 15) -> list[dict]:
    from ferry.kernels.cpu.dense import dense_linear
    from ferry.layers.linear_method import store_column_major

    weights = []
    for in_features, out_features in GEMV_LAYERS:
        param = torch.nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)
        store_column_major(param)
        weights.append(param.data)
    weights.append(torch.randn(32000, 512))                               # the LM head, row-major
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    results = []
    for rows in GEMV_ROWS:
        inputs = {k: torch.randn(rows, k) for k in (512, 1408)}
        step = {name: (lambda fn=fn: [fn(inputs[w.shape[1]], w) for w in weights])
                for name, fn in (("mkl", F.linear), ("ferry", dense_linear))}
        best = {name: float("inf") for name in step}
        for _ in range(repeats):                     # interleaved: both see the same load
            for name, fn in step.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        flops = 2 * rows * weight_bytes / 4
        results.append({"rows": rows, "mkl_ms": best["mkl"] * 1e3, "ferry_ms": best["ferry"] * 1e3,
                        "ferry_weight_gb_s": weight_bytes / best["ferry"] / 1e9,
                        "ferry_gflops": flops / best["ferry"] / 1e9,
                        "speedup": best["mkl"] / best["ferry"]})
    return results


def paged_batch(query_lens: list[int], seq_lens: list[int], num_heads: int = 6,
                num_kv_heads: int = 2, head_dim: int = 64, block_size: int = 16):
    """A cache with each sequence's blocks scattered, plus its metadata and queries."""
    pages = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(pages) + 8
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))
    tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    taken = 0
    for i, n in enumerate(pages):
        tables[i, :n] = order[taken:taken + n]
        taken += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64), query_start_loc=starts,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
        num_decodes=sum(1 for q in query_lens if q == 1), block_size=block_size)
    return torch.randn(sum(query_lens), num_heads, head_dim), cache, meta


def attention_cases() -> list[dict]:
    cases = [("decode, 8 x 128", [1] * 8, [128] * 8), ("decode, 32 x 300", [1] * 32, [300] * 32),
             ("decode, 64 x 400", [1] * 64, [400] * 64), ("prefill, 8 x 144", [144] * 8, [144] * 8)]
    results = []
    for name, query_lens, seq_lens in cases:
        query, cache, meta = paged_batch(query_lens, seq_lens)
        ours = median_seconds(lambda: cpu.paged_attention(query, cache, meta, 0.125), 30)
        ref = median_seconds(lambda: reference.paged_attention(query, cache, meta, 0.125), 30)
        kv_bytes = sum(seq_lens) * 2 * cache.shape[3] * cache.shape[4] * cache.element_size()
        results.append({"case": name, "cpp_us": ours * 1e6, "reference_us": ref * 1e6,
                        "speedup": ref / ours, "cpp_kv_read_gb_s": kv_bytes / ours / 1e9})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gemv", action="store_true", help="only ferry's GEMV vs MKL")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit("the C++ CPU kernels are not available here (no compiler, or "
                         "FERRY_CPU_KERNELS=0)")
    if args.gemv:
        return print_gemv(args)
    layouts, attention = matmul_layouts(), attention_cases()
    print(f"matmul GFLOP/s over the 5 shapes, {args.threads} threads")
    print(f"{'rows':>5} {'row-major':>10} {'column-major':>13} {'speedup':>8}")
    for r in layouts:
        print(f"{r['rows']:>5} {r['row_major_gflops']:>10.0f} {r['column_major_gflops']:>13.0f} "
              f"{r['speedup']:>7.2f}x")
    print(f"\npaged attention, median microseconds per call, {args.threads} threads")
    print(f"{'case':<20} {'C++':>8} {'reference':>10} {'speedup':>8} {'C++ KV GB/s':>12}")
    for r in attention:
        print(f"{r['case']:<20} {r['cpp_us']:>8.0f} {r['reference_us']:>10.0f} "
              f"{r['speedup']:>7.1f}x {r['cpp_kv_read_gb_s']:>12.1f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                         "matmul_layout": layouts, "paged_attention": attention},
                                        indent=2))


def print_gemv(args) -> None:
    results = gemv_vs_mkl()
    print(f"a decode step's weights (56M Llama, float32), best of 15, {args.threads} threads")
    print(f"{'rows':>5} {'MKL ms':>8} {'ferry ms':>9} {'ferry GB/s':>11} {'GFLOP/s':>8} {'speedup':>8}")
    for r in results:
        print(f"{r['rows']:>5} {r['mkl_ms']:>8.2f} {r['ferry_ms']:>9.2f} {r['ferry_weight_gb_s']:>11.1f} "
              f"{r['ferry_gflops']:>8.0f} {r['speedup']:>7.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                         "gemv": results}, indent=2))


if __name__ == "__main__":
    main()
