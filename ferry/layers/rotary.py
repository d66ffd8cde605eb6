"""Rotary position embedding (neox style, as HF Llama) with Llama-3.1 / linear scaling.

Reads both config spellings: transformers 5 ``rope_parameters`` (a dict with rope_type,
rope_theta, ...) and the older ``rope_theta`` + ``rope_scaling``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ferry import kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def get_rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The config's rope settings as one dict with at least ``rope_type`` and ``rope_theta``."""
    params: dict[str, Any] = {}
    for source in (getattr(hf_config, "rope_scaling", None), getattr(hf_config, "rope_parameters", None)):
        if isinstance(source, dict):
            params.update(source)
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")  # old configs spell it "type"
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    return params


def compute_inv_freq(head_dim: int, rope_parameters: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) float32 for the given rope type."""
    rope_type = rope_parameters["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; ferry supports {list(SUPPORTED_ROPE_TYPES)}")
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    base = float(rope_parameters["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base ** exponents)                    # (D/2,)
    if rope_type == "linear":
        return inv_freq / float(_required(rope_parameters, "factor"))
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_parameters)
    return inv_freq


def _required(rope_parameters: dict[str, Any], key: str) -> Any:
    if rope_parameters.get(key) is None:
        raise ValueError(f"rope type {rope_parameters['rope_type']!r} needs '{key}' in rope_scaling")
    return rope_parameters[key]


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend in between."""
    factor = float(_required(params, "factor"))
    low_freq_factor = float(_required(params, "low_freq_factor"))
    high_freq_factor = float(_required(params, "high_freq_factor"))
    original_len = float(_required(params, "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_len / low_freq_factor
    high_freq_wavelen = original_len / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k at the given positions.

    Holds ``cos_sin_cache`` (max_position, head_dim) float32 = cat(cos, sin) of the
    head_dim / 2 frequencies, the layout ``kernels.apply_rotary`` expects.
    """

    def __init__(self, head_dim: int, max_position: int, rope_parameters: dict[str, Any]):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, rope_parameters)                 # (D/2,)
        positions = torch.arange(max_position, dtype=torch.int64).to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]                         # (P, D/2)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)                  # (P, D)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,), query (T, H, D), key (T, Hkv, D) -> rotated (query, key)."""
        return kernels.apply_rotary(query, key, positions, self.cos_sin_cache)
