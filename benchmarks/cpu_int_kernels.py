"""GB/s of the CPU int linears at decode sizes: float activations (``csrc/wna16.cpp``) vs
int8 activations (``csrc/wna8.cpp``, the ``cpu_int8_activations`` switch), and the LM
head in bfloat16 (``bf16_weight_linear``) vs int8, on the layer shapes of
``benchmarks/cpu_quant.py``'s model (hidden 512, intermediate 1408, vocab 32000).

GB/s = bytes of weight storage read (codes, scales, zeros; bf16 table) / time per call
(the best of 30 batches of 10 calls).

    python benchmarks/cpu_int_kernels.py [--rows 1] [--threads 2]
"""
from __future__ import annotations

import ferry  # noqa: F401  (first: sets OpenMP's wait policy before torch loads it)

import argparse
import os
import time

import torch

from ferry import kernels
from ferry.kernels import quant_reference as ref
from ferry.kernels.cpu import quant_linear as cpu

# (inputs K, outputs N) of each linear
SHAPES = {"qkv 512x1536": (512, 1536), "o 512x512": (512, 512), "gate_up 512x2816": (512, 2816),
          "down 1408x512": (1408, 512), "head 512x32000": (512, 32000)}


def seconds_per_call(fn, batches: int = 30, calls: int = 10) -> float:
    """The best batch's time per call: the machine's cores are shared, and the least
    disturbed batch is the kernel's own speed."""
    fn()
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"rows {args.rows}, group {args.group_size}, threads {args.threads}, "
          f"VNNI kernel: {cpu.int8_activations_fit(args.group_size)}")
    print(f"{'shape':18} {'bits':>4} {'float-act GB/s':>15} {'int8-act GB/s':>14}")
    for name, (k, n) in SHAPES.items():
        weight = torch.randn(n, k)
        x = torch.randn(args.rows, k)
        if name.startswith("head"):          # the float heads, for scale (DRAM-bound)
            dense = weight.t().contiguous().t()   # column-major, as the CPU head stores it
            t = seconds_per_call(lambda: kernels.dense_linear(x, dense))
            print(f"{name:18} {'fp32':>4} {dense.numel() * 4 / t / 1e9:15.1f} {'':>14}")
            table = weight.to(torch.bfloat16)
            t = seconds_per_call(lambda: cpu.bf16_weight_linear(x, table))
            print(f"{name:18} {'bf16':>4} {table.numel() * 2 / t / 1e9:15.1f} {'':>14}")
        for bits in (8, 4):
            q, s, z = ref.quantize_rtn(weight, bits, args.group_size)
            nbytes = sum(v.numel() * v.element_size() for v in (q, s, z))
            old = seconds_per_call(lambda: cpu.wna16_linear(x, q, s, z, bits, args.group_size))
            new = seconds_per_call(lambda: cpu.wna16_linear_a8(x, q, s, z, bits, args.group_size))
            print(f"{name:18} {bits:4} {nbytes / old / 1e9:15.1f} {nbytes / new / 1e9:14.1f}")


if __name__ == "__main__":
    main()
