"""The Executor interface: the engine's only way to reach the model.

Everything crosses it as plain data: ``SchedulerOutput`` in, ``RunnerOutput`` out, and a
``RuntimeConfig`` from start-up, so an implementation may run its runners in other
processes. No torch here: the engine imports this module.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ferry.config import RuntimeConfig
from ferry.outputs import RunnerOutput, SchedulerOutput


class Executor(ABC):
    """Start-up is ``profile()`` then ``initialize_cache(num_blocks)``; then one
    ``execute`` per step, or ``launch`` + ``collect`` to overlap (async scheduling)."""

    #: The device the runners use (``ferry.platform.Platform``), for the server's probes.
    platform: Any
    #: ``launch_deferred`` + ``sample_deferred`` work: a step's forward pass can be
    #: launched before its grammar bitmask is known (async scheduling overlaps the mask).
    supports_deferred_sampling = False

    @abstractmethod
    def profile(self) -> int:
        """KV blocks that fit beside the loaded model (every worker's minimum)."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> RuntimeConfig:
        """Allocate ``num_blocks`` KV blocks (and device graphs); the resolved run-time view."""

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its tokens."""

    @abstractmethod
    def launch(self, scheduler_output: SchedulerOutput) -> Any:
        """Queue one step; returns a handle for :meth:`collect` (the device may still run it)."""

    @abstractmethod
    def collect(self, handle: Any) -> RunnerOutput:
        """Wait for a launched step's tokens."""

    def launch_deferred(self, scheduler_output: SchedulerOutput) -> Any:
        """Queue one step up to its logits; its sampling waits for ``sample_deferred``."""
        raise NotImplementedError(f"{type(self).__name__} cannot defer sampling")

    def sample_deferred(self, handle: Any, grammar_bitmask: Any) -> None:
        """Sample a ``launch_deferred`` step with its grammar bitmask (None: none)."""
        raise NotImplementedError(f"{type(self).__name__} cannot defer sampling")

    def add_lora(self, lora_id: int, path: str) -> None:
        """Load and check the LoRA adapter at ``path`` as ``lora_id`` on every runner; raises
        ``ferry.lora.adapter_config.LoRAError`` with the reason."""
        raise NotImplementedError(f"{type(self).__name__} does not serve LoRA adapters")

    def remove_lora(self, lora_id: int) -> None:
        """Forget adapter ``lora_id`` (no request uses it any more)."""

    def lora_stats(self) -> dict[str, int]:
        """Counters of the runners' adapter slots (swaps_in, swaps_out, host_loads)."""
        return {}

    def shutdown(self) -> None:
        """Release workers and devices (nothing to do in-process)."""
