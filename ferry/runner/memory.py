"""How many KV blocks fit: from a memory budget, never a fixed guess."""
from __future__ import annotations

import logging
import math

import torch

from ferry.platform import memory_info

logger = logging.getLogger(__name__)


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: torch.dtype) -> int:
    """Bytes of one block across all layers: keys and values."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def max_useful_blocks(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks for every seat filled to the whole context; more would only idle.

    No floor (it was 1,024 blocks, for the prefix cache): a small configuration (16 seats
    of a short context) would reserve memory it can never fill with requests, and once
    the prefix cache holds enough blocks to push allocations past the warm and fresh ones
    (see ``engine.block_pool``), the cached blocks are cycled and every block of the
    cache ends up written, and resident. The prefix cache keeps what the seats' blocks
    hold between requests.
    """
    return max_num_seqs * math.ceil(max_model_len / block_size)


def num_kv_blocks_for_budget(budget_bytes: int, block_bytes: int, *, max_num_seqs: int,
                             max_model_len: int, block_size: int) -> int:
    """Blocks that fit in ``budget_bytes``, capped at what can ever be used."""
    if budget_bytes < block_bytes:
        raise ValueError(
            f"the KV cache budget ({budget_bytes / 2**20:.1f} MiB) does not hold a single block "
            f"({block_bytes / 2**20:.3f} MiB); raise kv_cache_memory (CPU) or "
            f"gpu_memory_utilization (GPU)")
    fits = budget_bytes // block_bytes
    return int(min(fits, max_useful_blocks(max_num_seqs, max_model_len, block_size)))


def gpu_kv_budget(device: torch.device, utilization: float, peak_activation_bytes: int) -> int:
    """Share ``utilization`` of the GPU's total memory, less what is already taken
    (weights, the framework) and the profiled activation peak of the largest batch."""
    free, total = memory_info(device)
    used = total - free
    budget = int(total * utilization) - used - peak_activation_bytes
    if budget <= 0:
        raise ValueError(
            f"the model does not leave room for a KV cache: {used / 2**30:.2f} GiB are used after "
            f"loading and the largest batch needs {peak_activation_bytes / 2**30:.2f} GiB more, "
            f"but gpu_memory_utilization={utilization} allows {total * utilization / 2**30:.2f} "
            f"GiB of {total / 2**30:.2f} GiB; raise it, lower max_num_batched_tokens, or use a "
            f"smaller or quantized model")
    return budget
