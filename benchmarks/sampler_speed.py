"""Time of one ``Sampler.sample`` call on random (batch, 32000) float32 logits, temperature
1.0, unseeded and seeded (one generator per row), batch 16 and 64; median of 30 calls.

To compare two checkouts, run it under each in turn (interleaved, same run):

    for r in 1 2 3; do for t in /tmp/base /work/main; do
        echo -n "$t: "; PYTHONPATH=$t python benchmarks/sampler_speed.py; done; done
"""
from __future__ import annotations

import statistics
import time

import torch

from ferry.runner.logits_processors import SamplingRow
from ferry.runner.sampler import Sampler
from ferry.sampling_params import SamplingParams

VOCAB = 32000


def median_ms(sampler: Sampler, batch: int, seeded: bool, calls: int = 30) -> float:
    logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch))
    rows = [SamplingRow(SamplingParams(temperature=1.0, seed=i if seeded else None), [1, 2], 2, 1)
            for i in range(batch)]
    generators = [torch.Generator().manual_seed(i) if seeded else None for i in range(batch)]
    for _ in range(3):
        sampler.sample(logits, rows, generators)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sampler.sample(logits, rows, generators)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    sampler = Sampler()
    figures = {f"batch {b}{' seeded' if s else ''}": median_ms(sampler, b, s)
               for b in (16, 64) for s in (False, True)}
    print("; ".join(f"{name}: {ms:.2f} ms" for name, ms in figures.items()))


if __name__ == "__main__":
    main()
