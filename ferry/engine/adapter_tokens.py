"""Prompt and generated tokens per LoRA adapter, for the metrics' ``adapter`` label.

The label is the adapter's name, or ``""`` for base-model requests (``BASE``). Only
names still in use are reported (``snapshot(live)``): an unloaded adapter's counts are
dropped once its last request finished, so the metrics carry at most the loaded
adapters, plus the base model.
"""
from __future__ import annotations

BASE = ""   # the adapter label of requests without a LoRA adapter


class AdapterTokenCounts:
    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {BASE: [0, 0]}   # label -> [prompt, generated]

    def add(self, adapter: str | None, prompt: int = 0, generated: int = 0) -> None:
        counts = self._counts.setdefault(adapter or BASE, [0, 0])
        counts[0] += prompt
        counts[1] += generated

    def snapshot(self, live: set[str]) -> dict[str, tuple[int, int]]:
        """label -> (prompt, generated) totals of the base model and the ``live`` adapters
        (others are forgotten)."""
        self._counts = {name: c for name, c in self._counts.items() if name == BASE or name in live}
        return {name: (c[0], c[1]) for name, c in self._counts.items()}
