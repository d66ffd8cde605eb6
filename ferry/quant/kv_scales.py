"""Per-layer K/V cache scales from a checkpoint (compressed-tensors ``kv_cache_scheme``).

The checkpoint stores ``model.layers.{i}.self_attn.k_scale`` and ``v_scale`` (one float
each). ``attach_kv_scales`` registers them as parameters of each layer's ``self_attn`` so
the loader fills them by name (a missing scale is then a load error); once loaded, each
value is also set as ``k_scale`` / ``v_scale`` (Python floats) on that layer's ``Attention``
module (``self_attn.attn``), where the FP8 KV cache reads them. Without a scheme the
attention layers carry no such attributes (callers use 1.0).

Older checkpoints (llm-compressor before 0.2, AutoFP8, ModelOpt) store the same scales under
the projections' names, ``self_attn.k_proj.output_scale`` / ``v_proj.output_scale`` (or
``k_proj.k_scale`` / ``v_proj.v_scale``); ``LEGACY_KV_SCALE_NAMES`` maps them onto the
current names (as vLLM's ``maybe_remap_kv_scale_name`` does), so they load the same way.
"""
from __future__ import annotations

import torch
from torch import nn

from ferry.layers.parameter import new_parameter


# older checkpoint name suffix -> the suffix ferry's parameter has
LEGACY_KV_SCALE_NAMES = {
    "k_proj.output_scale": "k_scale",
    "v_proj.output_scale": "v_scale",
    "k_proj.k_scale": "k_scale",
    "v_proj.v_scale": "v_scale",
}


def attach_kv_scales(model: nn.Module) -> None:
    """Register ``k_scale`` / ``v_scale`` on every module that has an ``attn`` child, and
    let the loader read them under their older names too."""
    model.checkpoint_renames = {**getattr(model, "checkpoint_renames", {}), **LEGACY_KV_SCALE_NAMES}
    for module in model.modules():
        attn = getattr(module, "attn", None)
        if attn is None or not isinstance(attn, nn.Module):
            continue
        for name in ("k_scale", "v_scale"):
            param = new_parameter((), torch.float32, output_dim=None, input_dim=None)
            param.weight_loader = _loader(attn, name)
            setattr(module, name, param)


def _loader(attn: nn.Module, name: str):
    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(loaded.shape)}")
        param.data.copy_(loaded.reshape(()))
        setattr(attn, name, float(loaded.reshape(())))
    return load
