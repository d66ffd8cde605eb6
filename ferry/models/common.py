"""The shared decoder-only transformer behind every supported architecture.

embedding -> N x [RMSNorm, attention with rotary, residual, RMSNorm, SwiGLU MLP, residual]
-> final RMSNorm -> lm_head. Architectures differ only by a few ``DecoderOptions``.
Module names mirror HF's so checkpoint names map 1:1, except the packed projections
(``qkv_proj``, ``gate_up_proj``) described by ``CausalLM.packed_modules_mapping``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ferry.layers.activation import SiluAndMul
from ferry.layers.attention import Attention
from ferry.layers.embedding import LMHead, VocabEmbedding
from ferry.layers.linear import Linear, MergedLinear, QKVLinear
from ferry.layers.norm import RMSNorm
from ferry.layers.rotary import RotaryEmbedding, get_rope_parameters
from ferry.layers.weight_methods import WeightMethods, child_prefix
from ferry.models.fused_decode import DecoderStackRunner
from ferry.kernels.attn_metadata import AttentionMetadata


@dataclass(frozen=True)
class DecoderOptions:
    """Per-architecture differences of the shared decoder."""

    qkv_bias: bool = False                # bias on q/k/v projections (Qwen2)
    o_bias: bool = False                  # bias on o_proj (Llama attention_bias)
    mlp_bias: bool = False                # bias on gate/up/down (Llama mlp_bias)
    qk_norm: bool = False                 # per-head RMSNorm on q and k before rotary (Qwen3)
    head_dim: int | None = None           # explicit head_dim; None = hidden_size // num_heads
    layer_sliding_windows: tuple[int | None, ...] = ()  # per layer; empty = all full attention
    tie_word_embeddings: bool = False     # lm_head shares embed_tokens.weight
    rope_parameters: dict[str, Any] = field(default_factory=dict)


def resolve_head_dim(hf_config: Any) -> int:
    """Explicit ``head_dim`` when the config sets one, else hidden_size // num_heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def base_options(hf_config: Any, **overrides: Any) -> DecoderOptions:
    """Options every architecture reads the same way; ``overrides`` adds the rest."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf_config.hidden_act!r}; ferry's MLP is SwiGLU (silu)")
    values: dict[str, Any] = dict(
        head_dim=resolve_head_dim(hf_config),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        rope_parameters=get_rope_parameters(hf_config),
    )
    values.update(overrides)
    return DecoderOptions(**values)


class DecoderAttention(nn.Module):
    """qkv_proj -> (q/k norm) -> rotary -> paged attention -> o_proj."""

    def __init__(self, hf_config: Any, options: DecoderOptions, layer_index: int,
                 dtype: torch.dtype | None, prefix: str = "", weight_methods: WeightMethods | None = None):
        super().__init__()
        hidden_size = hf_config.hidden_size
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = options.head_dim or hidden_size // self.num_heads
        self.qkv_proj = QKVLinear(hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
                                  bias=options.qkv_bias, dtype=dtype,
                                  prefix=child_prefix(prefix, "qkv_proj"), weight_methods=weight_methods)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden_size, bias=options.o_bias, dtype=dtype,
                             prefix=child_prefix(prefix, "o_proj"), weight_methods=weight_methods)
        self.q_norm = self.k_norm = None
        if options.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(self.head_dim, hf_config.max_position_embeddings,
                                          options.rope_parameters)
        windows = options.layer_sliding_windows
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                              sliding_window=windows[layer_index] if windows else None)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = q.view(num_tokens, self.num_heads, self.head_dim)        # (T, H, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)     # (T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v, kv_cache, attn_metadata)
        return self.o_proj(out)                                       # (T, hidden)


class DecoderMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)) with gate/up packed."""

    def __init__(self, hf_config: Any, options: DecoderOptions, dtype: torch.dtype | None,
                 prefix: str = "", weight_methods: WeightMethods | None = None):
        super().__init__()
        inter = hf_config.intermediate_size
        self.gate_up_proj = MergedLinear(hf_config.hidden_size, {0: inter, 1: inter},
                                         bias=options.mlp_bias, dtype=dtype,
                                         prefix=child_prefix(prefix, "gate_up_proj"),
                                         weight_methods=weight_methods)
        self.act_fn = SiluAndMul()
        self.down_proj = Linear(inter, hf_config.hidden_size, bias=options.mlp_bias, dtype=dtype,
                                prefix=child_prefix(prefix, "down_proj"), weight_methods=weight_methods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))     # (T, hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is carried separately so norms fuse the add."""

    def __init__(self, hf_config: Any, options: DecoderOptions, layer_index: int,
                 dtype: torch.dtype | None, prefix: str = "", weight_methods: WeightMethods | None = None):
        super().__init__()
        self.self_attn = DecoderAttention(hf_config, options, layer_index, dtype,
                                          child_prefix(prefix, "self_attn"), weight_methods)
        self.mlp = DecoderMLP(hf_config, options, dtype, child_prefix(prefix, "mlp"), weight_methods)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """embed_tokens -> layers -> norm (HF's ``model.`` prefix)."""

    def __init__(self, hf_config: Any, options: DecoderOptions, dtype: torch.dtype | None,
                 prefix: str = "model", weight_methods: WeightMethods | None = None):
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size, dtype,
                                           child_prefix(prefix, "embed_tokens"), weight_methods)
        self.layers = nn.ModuleList(
            DecoderLayer(hf_config, options, i, dtype, child_prefix(prefix, f"layers.{i}"), weight_methods)
            for i in range(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, dtype)
        self.fused_layers = DecoderStackRunner()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)                         # (T, hidden)
        fused = self.fused_layers.run(self.layers, hidden, positions, kv_caches, attn_metadata)
        if fused is not None:   # every layer in one C++ call (models/fused_decode.py)
            hidden, residual = fused
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """A decoder-only LM as the runner sees it.

    Subclasses implement ``decoder_options(hf_config)``. Parameters start uninitialised;
    ``ferry.models.loader.get_model`` fills them from the checkpoint. ``weight_methods``
    picks each layer's weight format by checkpoint prefix (None: all unquantized).
    """

    # HF checkpoint sub-module -> (packed module here, shard id)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, Any]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # checkpoint tensors that are expected but unused (substring match)
    ignored_checkpoint_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    # older checkpoint name suffix -> current suffix (a format may add some, e.g. KV scales)
    checkpoint_renames: ClassVar[dict[str, str]] = {}

    def __init__(self, hf_config: Any, dtype: torch.dtype | None = None,
                 weight_methods: WeightMethods | None = None):
        super().__init__()
        options = self.decoder_options(hf_config)
        self.options = options
        self.num_layers: int = hf_config.num_hidden_layers
        self.num_kv_heads: int = (getattr(hf_config, "num_key_value_heads", None)
                                  or hf_config.num_attention_heads)
        self.head_dim: int = options.head_dim or resolve_head_dim(hf_config)
        self.vocab_size: int = hf_config.vocab_size
        self.sliding_window: int | None = _uniform_window(options.layer_sliding_windows, self.num_layers)
        self.model = DecoderModel(hf_config, options, dtype, "model", weight_methods)
        tied = self.model.embed_tokens if options.tie_word_embeddings else None
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size, dtype, "lm_head",
                              weight_methods, tie_to=tied)

    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) int64; kv_caches: one per layer -> hidden (T, hidden_size)."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} KV caches (one per layer), got {len(kv_caches)}")
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden_size) -> (N, vocab_size) float32."""
        return self.lm_head(hidden)


def _uniform_window(windows: tuple[int | None, ...], num_layers: int) -> int | None:
    """The model-wide window when every layer uses the same one, else None.

    NOTE: None means "some layer needs the full history", so a KV manager must keep it all.
    """
    if len(windows) == num_layers and windows and len(set(windows)) == 1:
        return windows[0]
    return None


def layer_sliding_windows(hf_config: Any) -> tuple[int | None, ...]:
    """Per-layer sliding windows from ``layer_types`` / ``use_sliding_window`` (Qwen, transformers 5).

    A layer typed "sliding_attention" gets ``sliding_window``; configs without
    ``layer_types`` follow Qwen2's rule (layers >= max_window_layers when
    use_sliding_window is set). Empty tuple = full attention everywhere.
    """
    window = getattr(hf_config, "sliding_window", None)
    num_layers = hf_config.num_hidden_layers
    if not window or not getattr(hf_config, "use_sliding_window", True):
        return ()
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    first = getattr(hf_config, "max_window_layers", 0)
    return tuple(window if i >= first else None for i in range(num_layers))
