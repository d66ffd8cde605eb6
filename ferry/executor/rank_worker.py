"""What every rank runs, the engine's rank 0 included: join, load its part, serve messages.

``RankWorker`` owns one rank's model and runner. Rank 0 (in the engine's process) calls
it directly; every other rank runs ``serve_messages``: it waits for the next message
rank 0 broadcasts and does the same thing rank 0 does with it, so the collectives inside
the forward pair up. The messages are plain data: ``("profile",)``,
``("init", num_blocks)``, ``("step", SchedulerOutput)``, ``("add_lora", lora_id, path)``,
``("remove_lora", lora_id)``, ``("ping",)`` (rank 0 is alive but idle) and ``("stop",)``.

LoRA adapters are loaded by every rank from the same path (a filesystem every node sees)
and cut to the rank's part; the ranks then agree with one all-reduce whether every one
of them accepted it, so an adapter is on all ranks or on none.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ferry.config import EngineConfig, RuntimeConfig
from ferry.distributed.collectives import (all_reduce_min, broadcast_object, end_of_startup,
                                           recv_object, send_object)
from ferry.distributed.selftest import SelfTestResult, run_self_test
from ferry.distributed.state import ParallelContext, RankLayout, init_distributed
from ferry.lora.adapter_config import LoRAError
from ferry.lora.slots import LoRASlots, build_lora_slots
from ferry.models.tensor_parallel import rank_weight_bytes
from ferry.outputs import RunnerOutput, SchedulerOutput
from ferry.platform import detect_platform, usable_cpu_count
from ferry.runner.memory import kv_block_bytes
from ferry.runner.model_runner import ModelRunner
from ferry.runner.model_setup import LoadedModel, RankSetup, count_kv_blocks, dtype_name, load_model
from ferry.runner.pending_output import PendingOutput
from ferry.runner.pipeline_runner import PipelineStageRunner

logger = logging.getLogger(__name__)


def rank_platform(config: EngineConfig, layout: RankLayout):
    """The device of a rank: GPU ``local_rank`` of its node, or the CPU."""
    platform = detect_platform(config.model.device)
    if platform.is_gpu and layout.local_rank:
        platform = detect_platform(f"{platform.kind}:{layout.local_rank}")
    return platform


def rank_cpu_threads(config: EngineConfig, ranks_on_node: int) -> int:
    """The node's cores shared by its ranks, unless ``cpu_threads`` is set."""
    return config.parallel.cpu_threads or max(1, usable_cpu_count() // ranks_on_node)


class RankWorker:
    """One rank: its process group membership, its part of the model, its runner."""

    def __init__(self, config: EngineConfig, model_dir: Path, layout: RankLayout,
                 ranks_on_node: int) -> None:
        self.config = config
        self.platform = rank_platform(config, layout)
        self.ctx: ParallelContext = init_distributed(layout, self.platform.torch_device)
        self.self_test: SelfTestResult = run_self_test(self.ctx, self.platform.torch_device)
        setup = RankSetup(self.ctx, self.platform, rank_cpu_threads(config, ranks_on_node))
        self.loaded: LoadedModel = load_model(config, model_dir, setup)
        self.weight_bytes = rank_weight_bytes(self.loaded.model)
        logger.info("%s holds %.1f MiB of weights", layout.describe(), self.weight_bytes / 2**20)
        lora, loaded = config.lora, self.loaded
        # Slots before profiling: the KV cache is sized around them.
        self.lora: LoRASlots | None = build_lora_slots(
            loaded.model, lora.max_loras, lora.max_cpu_loras, lora.max_lora_rank, loaded.dtype,
            loaded.device) if lora.enabled else None
        self.runner: ModelRunner | None = None
        # Loading may take much longer on one rank than another: the long start-up
        # timeout until here, then the short one, so a hang while serving shows quickly.
        end_of_startup(self.ctx)

    # --------------------------------------------------------------- the messages
    def profile(self) -> int:
        """KV blocks this rank fits, then the minimum over all ranks."""
        return all_reduce_min(self.ctx, count_kv_blocks(self.config, self.loaded))

    def initialize_cache(self, num_blocks: int) -> RuntimeConfig:
        loaded, config = self.loaded, self.config
        kwargs = dict(num_blocks=num_blocks, block_size=config.cache.block_size,
                      device=loaded.device, kv_dtype=loaded.kv_cache_dtype, lora=self.lora)
        if self.ctx.pp_size > 1:
            self.runner = PipelineStageRunner(loaded.model, ctx=self.ctx, **kwargs)
        else:
            self.runner = ModelRunner(loaded.model, **kwargs)
        # Device graphs stay off across ranks: a capture that failed on one rank only
        # would leave the ranks running different collectives (a hang).
        # kv_block_bytes is this rank's (its KV heads, its stage's layers): the bytes a
        # block takes on each device, what the KV cache was sized by.
        model = loaded.model
        return RuntimeConfig(
            dtype=dtype_name(loaded.dtype), kv_cache_dtype=dtype_name(loaded.kv_cache_dtype),
            max_model_len=loaded.max_model_len, num_blocks=num_blocks,
            block_size=config.cache.block_size, device=str(loaded.device),
            device_kind=self.platform.kind, gpu_vendor=self.platform.vendor,
            vocab_size=model.vocab_size, quant_type=loaded.quant_type,
            kv_block_bytes=kv_block_bytes(model.num_layers, model.num_kv_heads, model.head_dim,
                                          config.cache.block_size, loaded.kv_cache_dtype))

    def launch(self, sched: SchedulerOutput) -> PendingOutput:
        return self.runner.launch(sched)

    def add_lora(self, lora_id: int, path: str) -> None:
        """Load the adapter on this rank, then agree with every rank: kept only if all
        accepted it. Raises ``LoRAError`` on every rank that holds a reason (rank 0's is
        the one the user sees)."""
        error = None
        try:
            self.lora.add(lora_id, path)
        except LoRAError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - any failure must still reach the agreement
            logger.exception("LoRA adapter %s failed to load on %s", path, self.ctx.layout.describe())
            error = LoRAError(f"the LoRA adapter at {path} could not be loaded: "
                              f"{type(exc).__name__}: {exc}")
        if all_reduce_min(self.ctx, 0 if error else 1, "agreement on a LoRA adapter"):
            return
        self.lora.remove(lora_id)
        raise error or LoRAError(f"the LoRA adapter at {path} was refused by another rank "
                                 "(its log says why); it is loaded on no rank")

    def remove_lora(self, lora_id: int) -> None:
        self.lora.remove(lora_id)

    @property
    def output_rank(self) -> int:
        """The rank whose sampled tokens rank 0 returns: tensor rank 0 of the last stage."""
        return (self.ctx.pp_size - 1) * self.ctx.tp_size

    def collect(self, pending: PendingOutput) -> RunnerOutput:
        """Rank 0: the step's tokens, from the last stage when there are several."""
        if self.ctx.pp_size == 1:
            return pending.result()
        return recv_object(self.ctx, self.output_rank)

    def handle(self, message: tuple) -> bool:
        """Do what rank 0 does with ``message`` (other ranks); False on ``stop``."""
        kind = message[0]
        if kind == "ping":
            return True
        if kind == "stop":
            return False
        if kind == "profile":
            self.profile()
        elif kind == "init":
            self.initialize_cache(message[1])
        elif kind == "add_lora":
            try:
                self.add_lora(message[1], message[2])
            except LoRAError as exc:   # rank 0 answers the user; the worker goes on
                logger.warning("LoRA adapter %s not loaded: %s", message[2], exc)
        elif kind == "remove_lora":
            self.remove_lora(message[1])
        elif kind == "step":
            output = self.launch(message[1]).result()
            if self.ctx.pp_size > 1 and self.ctx.rank == self.output_rank:
                send_object(self.ctx, output, 0)
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")
        return True

    def serve_messages(self) -> None:
        """Follow rank 0's messages until ``stop`` (ranks other than 0)."""
        while self.handle(broadcast_object(self.ctx, None, src=0)):
            pass


def broadcast(ctx: ParallelContext, message: tuple) -> Any:
    """Rank 0 sends ``message`` to every rank."""
    return broadcast_object(ctx, message, src=0)
