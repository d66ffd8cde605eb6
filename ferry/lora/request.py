"""LoRARequest: vLLM's shape of "run this prompt with that adapter" (pure data)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """``lora_name`` selects the adapter; ``lora_path`` loads it first if that name is not
    loaded yet. ``lora_int_id`` is accepted for vLLM compatibility: ferry numbers adapters
    itself (a new id on every load, so a reload never shares prefix-cache entries)."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str | None = None

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str | None:
        return self.lora_path
