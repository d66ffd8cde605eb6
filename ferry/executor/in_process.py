"""The executor of one device in the engine's own process: a ModelRunner called directly."""
from __future__ import annotations

from pathlib import Path

from ferry.checkpoint import resolve_model_dir
from ferry.config import EngineConfig, RuntimeConfig
from ferry.executor.base import Executor
from ferry.outputs import RunnerOutput, SchedulerOutput
from ferry.runner.drafts import DraftProposer
from ferry.runner.model_runner import ModelRunner
from ferry.runner.model_setup import LoadedModel, count_kv_blocks, dtype_name, load_model
from ferry.runner.pending_output import PendingOutput


class InProcessExecutor(Executor):
    """Loads the model at construction; the runner exists after ``initialize_cache``."""

    def __init__(self, config: EngineConfig, model_dir: Path | None = None,
                 proposer: DraftProposer | None = None) -> None:
        self.config = config
        model_dir = model_dir or resolve_model_dir(config.model.model_path, config.model.revision)
        self._loaded: LoadedModel = load_model(config, model_dir)
        self.platform = self._loaded.platform
        self._proposer = proposer
        self.runner: ModelRunner | None = None

    def profile(self) -> int:
        return count_kv_blocks(self.config, self._loaded)

    def initialize_cache(self, num_blocks: int) -> RuntimeConfig:
        loaded, config = self._loaded, self.config
        self.runner = ModelRunner(loaded.model, num_blocks=num_blocks,
                                  block_size=config.cache.block_size, device=loaded.device,
                                  kv_dtype=loaded.kv_cache_dtype, proposer=self._proposer)
        if self.platform.is_gpu and not config.model.enforce_eager:
            self.runner.capture_decode_graphs(max_num_seqs=config.scheduler.max_num_seqs,
                                              max_model_len=loaded.max_model_len)
        return RuntimeConfig(
            dtype=dtype_name(loaded.dtype), kv_cache_dtype=dtype_name(loaded.kv_cache_dtype),
            max_model_len=loaded.max_model_len, num_blocks=num_blocks,
            block_size=config.cache.block_size, device=str(loaded.device),
            device_kind=self.platform.kind, gpu_vendor=self.platform.vendor,
            vocab_size=loaded.model.vocab_size)

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(scheduler_output)

    def launch(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        return self.runner.launch(scheduler_output)

    def collect(self, handle: PendingOutput) -> RunnerOutput:
        return handle.result()
