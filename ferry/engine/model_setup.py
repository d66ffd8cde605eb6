"""Everything the engine needs before its first step: platform, weights, tokenizer, KV size."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ferry.config import EngineConfig
from ferry.platform import PeakMemory, empty_cache
from ferry.runner import memory

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    platform: object
    model: torch.nn.Module
    tokenizer: object
    model_dir: Path
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    num_blocks: int


def load_model_for_engine(config: EngineConfig) -> LoadedModel:
    from ferry.models.loader import get_model, load_hf_config
    from ferry.platform import detect_platform

    check_features_available(config)
    platform = detect_platform(config.model.device)
    device = platform.torch_device
    model_dir = resolve_model_dir(config)
    hf_config = load_hf_config(model_dir)
    check_checkpoint_unquantized(hf_config, model_dir)
    dtype = resolve_dtype(config.model.dtype, hf_config, device)
    torch.manual_seed(config.model.seed)
    model = get_model(model_dir, hf_config, dtype, device)
    tokenizer = load_tokenizer(config, model_dir)
    max_model_len = resolve_max_model_len(config, hf_config)
    num_blocks = count_kv_blocks(config, model, dtype, device, max_model_len)
    eos = resolve_eos_token_ids(model_dir, hf_config, tokenizer)
    return LoadedModel(platform, model, tokenizer, model_dir, dtype, device, max_model_len,
                       eos, num_blocks)


# Config keys whose non-default values name features that are not built yet: refuse them
# clearly rather than serve something other than what was asked for.
_NOT_YET = {
    "quant_type": ("auto", "none"),
    "kv_cache_dtype": ("auto",),
    "tensor_parallel_size": (1,),
    "lora_adapters_dir": (None,),
    "debug_trace": ("none",),
}


def check_features_available(config: EngineConfig) -> None:
    flat = config.to_flat()
    for key, defaults in _NOT_YET.items():
        value = flat[key]
        if value not in defaults:
            raise ValueError(f"{key}={value!r} is not supported by this version of ferry yet; "
                             f"leave it at its default ({defaults[0]!r})")


def check_checkpoint_unquantized(hf_config, model_dir: Path) -> None:
    quant = getattr(hf_config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        raise ValueError(f"{model_dir} is a quantized checkpoint ({method}); loading quantized "
                         f"checkpoints is not supported by this version of ferry yet")


def resolve_model_dir(config: EngineConfig) -> Path:
    from ferry.models.loader import resolve_model_path

    if config.model.model_path is None:
        from ferry.demo import demo_model_path
        return demo_model_path()
    return resolve_model_path(config.model.model_path, config.model.revision)


def load_tokenizer(config: EngineConfig, model_dir: Path):
    from transformers import AutoTokenizer

    source = config.model.tokenizer or str(model_dir)
    try:
        return AutoTokenizer.from_pretrained(source,
                                             trust_remote_code=config.model.trust_remote_code)
    except Exception as exc:
        raise ValueError(f"could not load a tokenizer from {source}: {exc}") from None


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and less exact
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    declared = _DTYPES.get(str(declared).replace("torch.", ""), None) if declared else None
    return declared if declared in (torch.bfloat16, torch.float16) else torch.bfloat16


def resolve_max_model_len(config: EngineConfig, hf_config) -> int:
    model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
    if config.model.max_model_len is None:
        return int(model_max)
    if config.model.max_model_len > model_max:
        raise ValueError(f"max_model_len={config.model.max_model_len} is longer than the model's "
                         f"max_position_embeddings ({model_max})")
    return config.model.max_model_len


def resolve_eos_token_ids(model_dir: Path, hf_config, tokenizer) -> tuple[int, ...]:
    """EOS ids from generation_config.json (may be a list), else config, else tokenizer."""
    candidates = []
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        candidates.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    candidates += [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    for value in candidates:
        if value is not None:
            return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
    return ()


def count_kv_blocks(config: EngineConfig, model, dtype: torch.dtype, device: torch.device,
                    max_model_len: int) -> int:
    block_bytes = memory.kv_block_bytes(model.num_layers, model.num_kv_heads, model.head_dim,
                                        config.cache.block_size, dtype)
    if device.type == "cpu":
        budget = config.cache.kv_cache_memory
    else:
        peak = profile_peak_activation(model, config, device)
        budget = memory.gpu_kv_budget(device, config.cache.gpu_memory_utilization, peak)
    return memory.num_kv_blocks_for_budget(budget, block_bytes,
                                           max_num_seqs=config.scheduler.max_num_seqs,
                                           max_model_len=max_model_len,
                                           block_size=config.cache.block_size)


@torch.inference_mode()
def profile_peak_activation(model, config: EngineConfig, device: torch.device) -> int:
    """Activation memory of the largest step: one forward of max_num_batched_tokens tokens
    (as one prefill over a scratch cache), the logits of max_num_seqs rows, and sampling
    them with every filter on (top-k/top-p sort the whole vocabulary: the sampler's peak)."""
    from ferry.outputs import ScheduledRequest, SchedulerOutput
    from ferry.runner.input_batch import build_model_input
    from ferry.runner.model_runner import allocate_kv_caches
    from ferry.runner.sampler import Sampler
    from ferry.sampling_params import SamplingParams

    tokens = config.scheduler.max_num_batched_tokens
    num_blocks = -(-tokens // config.cache.block_size)
    caches = allocate_kv_caches(model, num_blocks, config.cache.block_size, model_dtype(model),
                                device)
    req = ScheduledRequest("profile", [0] * tokens, 0, list(range(num_blocks)), True,
                           SamplingParams(), [0] * tokens, tokens)
    batch = build_model_input(SchedulerOutput([req]), config.cache.block_size, device)
    with PeakMemory(device) as peak:
        hidden = model(batch.input_ids, batch.positions, caches, batch.attn_metadata)
        logits = model.compute_logits(hidden[-min(tokens, config.scheduler.max_num_seqs):])
        every_filter = replace(req, sampling_params=SamplingParams(
            temperature=1.0, top_k=50, top_p=0.9, min_p=0.05))
        Sampler().sample(logits, [every_filter] * logits.shape[0], [None] * logits.shape[0])
    del hidden, logits, caches
    empty_cache(device)
    return peak.bytes


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype
