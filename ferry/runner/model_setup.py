"""The runner side of start-up: the device, the weights, and how many KV blocks fit.

``load_model`` builds the model on the platform's device; ``count_kv_blocks`` sizes the
KV cache from the memory budget (CPU bytes, or the GPU's share after profiling the
largest step). The engine never sees any of this: it gets a ``RuntimeConfig`` back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ferry.checkpoint import load_hf_config, resolve_max_model_len
from ferry.runner.kv_dtype import resolve_kv_cache_dtype
from ferry.config import EngineConfig
from ferry.distributed.state import ParallelContext
from ferry.outputs import ScheduledRequest
from ferry.quant import resolve_quantization
from ferry.platform import PeakMemory, Platform, apply_cpu_threads, detect_platform, empty_cache
from ferry.runner import memory
from ferry.runner.input_batch import ScheduledState, build_model_input
from ferry.runner.request_states import RequestState
from ferry.runner.sampler import Sampler, SamplingRow
from ferry.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RankSetup:
    """One rank of a model spread over several: its process group, device, CPU threads."""

    ctx: ParallelContext
    platform: Platform
    cpu_threads: int | None = None


@dataclass
class LoadedModel:
    platform: Platform
    model: torch.nn.Module
    dtype: torch.dtype
    max_model_len: int
    quant_type: str = "none"      # the resolved format, the metrics' label
    kv_dtype: torch.dtype | None = None   # None: the model dtype

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.kv_dtype or self.dtype

    @property
    def device(self) -> torch.device:
        return self.platform.torch_device


def load_model(config: EngineConfig, model_dir: Path,
               rank: RankSetup | None = None) -> LoadedModel:
    """Detect the device, size the CPU thread team, and load the checkpoint's weights.

    ``rank``: this rank's device and process group when the model spans several ranks
    (``ferry.executor.multiprocess``); it then holds its part of the weights only.
    """
    from ferry.models.loader import get_model

    check_features_available(config)
    platform = rank.platform if rank is not None else detect_platform(config.model.device)
    if not platform.is_gpu:
        # Here, on the thread that will run every step (the server builds the engine on
        # its engine thread), before the first parallel op gives this thread its team.
        apply_cpu_threads(rank.cpu_threads if rank is not None else config.parallel.cpu_threads)
    hf_config = load_hf_config(model_dir)
    quant = resolve_quantization(hf_config, config.model.quant_type,
                                 config.model.cpu_int8_activations, config.model.lm_head_dtype)
    dtype = resolve_dtype(config.model.dtype, hf_config, platform.torch_device)
    torch.manual_seed(config.model.seed)
    if rank is not None and rank.ctx.layout.world_size > 1:
        from ferry.models.parallel_model import build_rank_model

        model = build_rank_model(model_dir, hf_config, dtype, platform.torch_device, rank.ctx,
                                 weight_methods=quant.weight_methods)
    else:
        model = get_model(model_dir, hf_config, dtype, platform.torch_device,
                          weight_methods=quant.weight_methods)
    max_model_len = resolve_max_model_len(config.model.max_model_len, hf_config)
    kv_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, hf_config, dtype,
                                      platform.torch_device)
    return LoadedModel(platform, model, dtype, max_model_len, quant.quant_type, kv_dtype)


# Config keys whose non-default values name features that are not built yet: refuse them
# clearly rather than serve something other than what was asked for.
_NOT_YET: dict[str, tuple] = {}


def check_features_available(config: EngineConfig) -> None:
    flat = config.to_flat()
    for key, defaults in _NOT_YET.items():
        value = flat[key]
        if value not in defaults:
            raise ValueError(f"{key}={value!r} is not supported by this version of ferry yet; "
                             f"leave it at its default ({defaults[0]!r})")


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and less exact
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    declared = _DTYPES.get(str(declared).replace("torch.", ""), None) if declared else None
    return declared if declared in (torch.bfloat16, torch.float16) else torch.bfloat16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def count_kv_blocks(config: EngineConfig, loaded: LoadedModel) -> int:
    model, device = loaded.model, loaded.device
    block_size = config.cache.block_size
    block_bytes = memory.kv_block_bytes(model.num_layers, model.num_kv_heads, model.head_dim,
                                        block_size, loaded.kv_cache_dtype)
    if device.type == "cpu":
        budget = config.cache.kv_cache_memory
    else:
        peak = profile_peak_activation(model, config, device, loaded.kv_cache_dtype)
        budget = memory.gpu_kv_budget(device, config.cache.gpu_memory_utilization, peak)
    num_blocks = memory.num_kv_blocks_for_budget(budget, block_bytes,
                                                 max_num_seqs=config.scheduler.max_num_seqs,
                                                 max_model_len=loaded.max_model_len,
                                                 block_size=block_size)
    log_kv_cache_size(num_blocks, block_bytes, budget, device)
    return num_blocks


def log_kv_cache_size(num_blocks: int, block_bytes: int, budget: int,
                      device: torch.device) -> None:
    """What the cache takes, and why that much: the budget, or what the seats can use."""
    limit = "the memory budget" if num_blocks == budget // block_bytes else (
        "max_num_seqs x max_model_len")
    resident = ("; its pages become resident as blocks are first used" if device.type == "cpu"
                else "")
    logger.info("KV cache: %d blocks of %.0f KiB, %.1f MiB (sized by %s)%s", num_blocks,
                block_bytes / 2**10, num_blocks * block_bytes / 2**20, limit, resident)


@torch.inference_mode()
def profile_peak_activation(model, config: EngineConfig, device: torch.device,
                            kv_dtype: torch.dtype | None = None) -> int:
    """Activation memory of the largest step: one forward of max_num_batched_tokens tokens
    (as one prefill over a scratch cache), the logits of max_num_seqs rows, and sampling
    them with every filter on (top-k/top-p sort the whole vocabulary: the sampler's peak)."""
    from ferry.runner.model_runner import allocate_kv_caches

    tokens = config.scheduler.max_num_batched_tokens
    block_size = config.cache.block_size
    num_blocks = -(-tokens // block_size)
    caches = allocate_kv_caches(model, num_blocks, block_size, kv_dtype or model_dtype(model),
                                device)
    state = RequestState("profile", tokens, SamplingParams(), (), [0] * tokens,
                         list(range(num_blocks)))
    step = ScheduledState(ScheduledRequest("profile", [0] * tokens, 0, True), state)
    batch = build_model_input([step], block_size, device)
    every_filter = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05)
    with PeakMemory(device) as peak:
        hidden = model(batch.input_ids, batch.positions, caches, batch.attn_metadata)
        logits = model.compute_logits(hidden[-min(tokens, config.scheduler.max_num_seqs):])
        rows = [SamplingRow(every_filter, state.token_ids, tokens, tokens)] * logits.shape[0]
        Sampler().sample(logits, rows, [None] * logits.shape[0])
    del hidden, logits, caches
    empty_cache(device)
    return peak.bytes


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype
