"""Block sizes of the attention kernels: the configurations the dispatcher chooses from.

The rules were set from the AOT matrix (``scripts/kernel_matrix.py`` -> docs/kernels.md):
register use, spills and shared memory per target, not from timings (no GPU measured yet).

* Keys per step (``block_n``): 64; halved for fp32 (no tensor cores: the dots run on FMA
  units and spill or overflow AMD's 64 KiB LDS with bigger tiles) and again for fp32 at
  head dims >= 128; halved for head dims over 128 and on RDNA (256 VGPRs per lane spill
  otherwise); never below 16, the smallest ``tl.dot`` tile.
* Pipelining: 2 stages, but 1 on RDNA (software pipelining spills there).
* Prefill rows (``block_m``): 16 for chunks of <= 16 tokens, else 64 (32 on RDNA at head
  dims over 128, which spill with 64); the large tile takes 8 warps at head dims >= 128,
  on RDNA and for fp32 (4 warps spill there).
* Decode rows: 16 query heads of a GQA group (the smallest ``tl.dot`` tile); a larger
  group takes several programs, so one configuration serves every group size.
"""
from __future__ import annotations

from dataclasses import dataclass

from ferry.kernels.triton._common import next_power_of_2
from ferry.platform import arch_family

SMALL_PREFILL_ROWS = 16
LARGE_PREFILL_ROWS = 64


@dataclass(frozen=True)
class AttentionConfig:
    """Compile-time choices: ``block_m`` query rows (decode: GQA heads) x ``block_n`` keys."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def key_block(head_dim: int, dtype: str, arch: str) -> int:
    block_n = 64
    if dtype == "fp32":
        block_n //= 2 if head_dim < 128 else 4
    if next_power_of_2(head_dim) > 128:
        block_n //= 2
    if arch_family(arch) == "amd_rdna":
        block_n //= 2
    return max(block_n, 16)


def _stages(arch: str) -> int:
    return 1 if arch_family(arch) == "amd_rdna" else 2


DECODE_ROWS = 16


def decode_config(head_dim: int, dtype: str, arch: str) -> AttentionConfig:
    """Config of the decode kernel: DECODE_ROWS query heads of one GQA group per program."""
    return AttentionConfig(block_m=DECODE_ROWS,
                           block_n=key_block(head_dim, dtype, arch), num_stages=_stages(arch))


def prefill_configs(head_dim: int, dtype: str, arch: str) -> tuple[AttentionConfig, AttentionConfig]:
    """(small, large) configs of the prefill kernel: all that :func:`prefill_config` returns."""
    block_n = key_block(head_dim, dtype, arch)
    rdna = arch_family(arch) == "amd_rdna"
    wide = head_dim >= 128 or dtype == "fp32" or rdna
    large_warps = 8 if wide else 4
    # RDNA's 256 VGPRs per lane hold a 64-row tile of head dim > 128 only with spills.
    large_rows = LARGE_PREFILL_ROWS // 2 if rdna and head_dim > 128 else LARGE_PREFILL_ROWS
    return (AttentionConfig(SMALL_PREFILL_ROWS, block_n, 4, _stages(arch)),
            AttentionConfig(large_rows, block_n, large_warps, _stages(arch)))


def prefill_config(head_dim: int, dtype: str, arch: str, max_query_len: int) -> AttentionConfig:
    """Short chunks take 16-row tiles, so few rows are padding; longer ones the large tile."""
    small, large = prefill_configs(head_dim, dtype, arch)
    return small if max_query_len <= small.block_m else large
