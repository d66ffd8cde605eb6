"""The executor of one device in the engine's own process: a ModelRunner called directly."""
from __future__ import annotations

from pathlib import Path

from ferry.checkpoint import resolve_model_dir
from ferry.config import EngineConfig, RuntimeConfig
from ferry.executor.base import Executor
from ferry.lora.adapter_config import LoRAError
from ferry.lora.slots import LoRASlots, build_lora_slots
from ferry.outputs import RunnerOutput, SchedulerOutput
from ferry.runner.attention_tracing import TraceSettings
from ferry.runner.drafts import DraftProposer
from ferry.runner.memory import kv_block_bytes
from ferry.runner.model_runner import ModelRunner
from ferry.runner.model_setup import LoadedModel, count_kv_blocks, dtype_name, load_model
from ferry.runner.pending_output import PendingOutput


class InProcessExecutor(Executor):
    """Loads the model at construction; the runner exists after ``initialize_cache``."""

    supports_deferred_sampling = True

    def __init__(self, config: EngineConfig, model_dir: Path | None = None,
                 proposer: DraftProposer | None = None) -> None:
        self.config = config
        model_dir = model_dir or resolve_model_dir(config.model.model_path, config.model.revision)
        self._loaded: LoadedModel = load_model(config, model_dir)
        self.platform = self._loaded.platform
        self._proposer = proposer
        self.runner: ModelRunner | None = None
        lora, loaded = config.lora, self._loaded
        # Slots before profiling: the KV cache is sized around them.
        self._lora: LoRASlots | None = build_lora_slots(
            loaded.model, lora.max_loras, lora.max_cpu_loras, lora.max_lora_rank, loaded.dtype,
            loaded.device) if lora.enabled else None

    def profile(self) -> int:
        return count_kv_blocks(self.config, self._loaded)

    def initialize_cache(self, num_blocks: int) -> RuntimeConfig:
        loaded, config = self._loaded, self.config
        block_bytes = kv_block_bytes(loaded.model.num_layers, loaded.model.num_kv_heads,
                                     loaded.model.head_dim, config.cache.block_size,
                                     loaded.kv_cache_dtype)
        num_host_blocks = int(config.cache.swap_space * 2**30) // block_bytes
        self.runner = ModelRunner(loaded.model, num_blocks=num_blocks,
                                  block_size=config.cache.block_size, device=loaded.device,
                                  kv_dtype=loaded.kv_cache_dtype, proposer=self._proposer,
                                  num_host_blocks=num_host_blocks,
                                  lora=self._lora, trace=_trace_settings(config))
        if self.platform.is_gpu and not config.model.enforce_eager:
            self.runner.capture_decode_graphs(max_num_seqs=config.scheduler.max_num_seqs,
                                              max_model_len=loaded.max_model_len)
        return RuntimeConfig(
            dtype=dtype_name(loaded.dtype), kv_cache_dtype=dtype_name(loaded.kv_cache_dtype),
            max_model_len=loaded.max_model_len, num_blocks=num_blocks,
            block_size=config.cache.block_size, device=str(loaded.device),
            device_kind=self.platform.kind, gpu_vendor=self.platform.vendor,
            vocab_size=loaded.model.vocab_size, num_host_blocks=num_host_blocks,
            kv_block_bytes=block_bytes,
            kv_copy_bytes_per_second=self.runner.host_kv.measure_bandwidth(),
            quant_type=loaded.quant_type)

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(scheduler_output)

    def launch(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        return self.runner.launch(scheduler_output)

    def collect(self, handle: PendingOutput) -> RunnerOutput:
        return handle.result()

    def launch_deferred(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        return self.runner.launch(scheduler_output, defer_sampling=True)

    def sample_deferred(self, handle: PendingOutput, grammar_bitmask) -> None:
        self.runner.sample_deferred(handle, grammar_bitmask)

    def add_lora(self, lora_id: int, path: str) -> None:
        if self._lora is None:
            raise LoRAError("LoRA serving is off; start with enable_lora (or lora_modules / "
                            "lora_adapters_dir)")
        self._lora.add(lora_id, path)

    def remove_lora(self, lora_id: int) -> None:
        if self._lora is not None:
            self._lora.remove(lora_id)

    def lora_stats(self) -> dict[str, int]:
        return vars(self._lora.stats).copy() if self._lora is not None else {}

def _trace_settings(config: EngineConfig) -> TraceSettings | None:
    """The attention trace's settings when ``debug_trace: attention`` (else off)."""
    obs = config.observability
    if obs.debug_trace != "attention":
        return None
    return TraceSettings(top_k=obs.debug_trace_top_k, include_prompt=obs.debug_trace_prompt,
                         max_tokens=obs.debug_trace_max_tokens)
