"""Physical limits for the offline benchmarks: memory bandwidth and, where known, peak FLOPs.

A decode step must read every weight once plus the KV cache of every sequence in the batch,
so ``bytes moved / bandwidth`` is a lower bound on its time. The bandwidth is measured
here (a large device-to-device copy), not looked up; on the CPU it is a CPU memcpy figure.
Peak FLOPs are datasheet values for a few GPUs (dense bf16); unknown devices get None.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ferry.platform import synchronize

# Dense bf16 tensor-core peaks from vendor datasheets (FLOP/s); more specific names first.
_PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
                    ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
                    ("A10", 125e12), ("MI325X", 1307e12), ("MI300X", 1307e12),
                    ("MI250X", 383e12))


def peak_flops(device_name: str) -> float | None:
    """Datasheet dense bf16 FLOP/s of a known GPU name, else None."""
    for key, flops in _PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def measure_copy_bandwidth(device: torch.device, num_bytes: int | None = None,
                           repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (a read plus a write of each byte), best of N."""
    if num_bytes is None:
        num_bytes = 1 << 30 if device.type == "cuda" else 1 << 27
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up (allocation, page faults)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * num_bytes / best


@dataclass
class ModelCost:
    """Bytes and FLOPs of a model that bound its speed."""

    weight_bytes: int            # all parameters
    decode_weight_bytes: int     # read by one decode step (the input embedding is only gathered)
    kv_bytes_per_token: int      # keys + values of one token across all layers
    num_params: int
    num_layers: int
    attn_width: int              # num_attention_heads * head_dim

    def decode_step_bytes(self, batch: int, context_len: float) -> float:
        """Weights once plus the KV of ``batch`` sequences of ``context_len`` tokens."""
        return self.decode_weight_bytes + batch * context_len * self.kv_bytes_per_token

    def prefill_flops(self, batch: int, prompt_len: int) -> float:
        """Matmul FLOPs of prefilling ``batch`` prompts (2 per weight per token + causal attn)."""
        dense = 2.0 * self.num_params * batch * prompt_len
        attention = 2.0 * self.num_layers * self.attn_width * batch * prompt_len ** 2
        return dense + attention


def model_cost(model: torch.nn.Module, model_dir: str | Path, kv_dtype: torch.dtype) -> ModelCost:
    """Cost figures of a loaded ferry model (``engine.executor.runner.model``) and its
    config.json."""
    named = list(model.named_parameters())
    weight_bytes = sum(p.numel() * p.element_size() for _, p in named)
    has_lm_head = any("lm_head" in name for name, _ in named)
    # With a separate lm_head the embedding table is only gathered (a few rows per step).
    embed_bytes = sum(p.numel() * p.element_size() for name, p in named
                      if "embed_tokens" in name) if has_lm_head else 0
    hf = _hf_config(model_dir)
    num_heads = int(hf.get("num_attention_heads", model.num_kv_heads))
    elem = torch.empty((), dtype=kv_dtype).element_size()
    return ModelCost(
        weight_bytes=weight_bytes, decode_weight_bytes=weight_bytes - embed_bytes,
        kv_bytes_per_token=2 * model.num_layers * model.num_kv_heads * model.head_dim * elem,
        num_params=sum(p.numel() for _, p in named), num_layers=model.num_layers,
        attn_width=num_heads * model.head_dim)


def _hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data.get("text_config", data) if isinstance(data, dict) else {}
