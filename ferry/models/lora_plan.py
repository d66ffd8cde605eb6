"""The LoRA shard plan of one rank's model: how its modules relate to the whole model's.

An adapter is checked against the whole model's projection shapes (so every rank of a
tensor/pipeline-parallel model refuses a bad adapter with the same message) and then cut
to the rank's part by ``ferry.layers.lora``: the plan names each local module by its
checkpoint path (a pipeline stage counts its layers from 0) and gives the full shapes.
"""
from __future__ import annotations

import re
from typing import Any

from ferry.distributed.state import ParallelContext
from ferry.layers.lora import LoRAShardPlan

_LOCAL_LAYER = re.compile(r"^(?:lm\.)?(model\.layers\.)(\d+)(\..*)$")


def whole_model_targets(hf_config: Any) -> dict[str, tuple[int, int]]:
    """Every adaptable projection of the whole model -> (in_features, out_features)."""
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    inter = hf_config.intermediate_size
    shapes = {"self_attn.q_proj": (hidden, heads * head_dim),
              "self_attn.k_proj": (hidden, kv_heads * head_dim),
              "self_attn.v_proj": (hidden, kv_heads * head_dim),
              "self_attn.o_proj": (heads * head_dim, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}
    return {f"model.layers.{i}.{module}": shape
            for i in range(hf_config.num_hidden_layers) for module, shape in shapes.items()}


def rank_lora_plan(hf_config: Any, ctx: ParallelContext, first_layer: int) -> LoRAShardPlan:
    """The plan of the rank holding layers from ``first_layer`` on, tensor rank ``ctx.tp_rank``."""
    def global_name(local: str) -> str:
        match = _LOCAL_LAYER.match(local)
        if match is None:
            raise ValueError(f"{local!r} is not a decoder layer's projection")
        return f"{match.group(1)}{int(match.group(2)) + first_layer}{match.group(3)}"

    return LoRAShardPlan(global_name, whole_model_targets(hf_config), ctx.tp_rank, ctx.tp_size)
