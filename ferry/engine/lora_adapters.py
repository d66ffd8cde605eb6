"""The engine's LoRA adapters: loading through the executor, naming, admission, release.

Pure Python: the tensors live in the runner (``ferry.lora.slots``); the engine knows each
adapter's name, load generation (``lora_id``) and how many requests run with it. The
scheduler admits a request only while its adapter fits in the device slots beside the
running requests' adapters (``LoRARegistry.admits``); one that does not fit waits without
holding up the requests behind it.
"""
from __future__ import annotations

import logging
from typing import Any

from ferry.config import LoRAConfig
from ferry.lora.adapter_config import LoRAError
from ferry.lora.registry import AdapterEntry, LoRARegistry, check_adapter_name
from ferry.request import Request

logger = logging.getLogger(__name__)


class LoRAAdapters:
    def __init__(self, config: LoRAConfig, executor: Any, scheduler: Any,
                 base_names: set[str]) -> None:
        self.config = config
        self.executor = executor
        self.registry = LoRARegistry(config.max_loras)
        self.base_names = base_names
        self._tracked: list[Request] = []
        # A request whose adapter has no free device slot is passed over this step.
        scheduler.add_admission_predicate(
            lambda request: self.registry.admits(request, scheduler.running))
        for name, path in (config.lora_modules or {}).items():
            try:
                self.load(name, path, source="cli")
            except LoRAError as exc:
                raise ValueError(f"lora_modules {name}={path}: {exc}") from None

    def load(self, name: str, path: str, *, load_inplace: bool = False,
             source: str = "api") -> AdapterEntry:
        """Load and check the adapter, then make it visible as ``name``. With
        ``load_inplace`` an adapter of that name is replaced (its running requests finish
        on the old weights); without, an existing name is refused."""
        check_adapter_name(name)
        if name in self.base_names:
            raise LoRAError(f"{name!r} is the base model's name; choose another adapter name")
        if name in self.registry and not load_inplace:
            raise LoRAError(f"a LoRA adapter named {name!r} is already loaded; unload it first "
                            "or pass load_inplace=true to replace it")
        entry = AdapterEntry(name, self.registry.new_id(), str(path), source)
        self.executor.add_lora(entry.lora_id, entry.path)   # raises with the reason
        self._drop(self.registry.register(entry))
        logger.info("LoRA adapter %r loaded from %s (id %d)", name, path, entry.lora_id)
        return entry

    def unload(self, name: str) -> AdapterEntry:
        """Hide ``name`` now; its weights go once its running requests finish."""
        entry, drop = self.registry.unregister(name)
        self._drop(drop)
        logger.info("LoRA adapter %r unloaded%s", name,
                    "" if drop is not None else " (freed when its running requests finish)")
        return entry

    def attach(self, requests: list[Request], name: str) -> None:
        """Run ``requests`` with adapter ``name`` (raises ``LoRANotFoundError``)."""
        entry = self.registry.resolve(name)
        for request in requests:
            request.lora_name, request.lora_id = entry.name, entry.lora_id
            self.registry.acquire(entry)
            self._tracked.append(request)

    def sweep(self) -> None:
        """Release the adapters of finished requests (and drop retired versions)."""
        if not any(r.is_finished for r in self._tracked):
            return
        still = []
        for request in self._tracked:
            if request.is_finished:
                self._drop(self.registry.release(request.lora_id))
            else:
                still.append(request)
        self._tracked = still

    def names_in_use(self) -> set[str]:
        """Loaded adapters, and unloaded ones whose last requests still run."""
        return {e.name for e in self.registry.entries()} | {r.lora_name for r in self._tracked}

    def num_in_flight(self) -> int:
        return len(self._tracked)

    def _drop(self, lora_id: int | None) -> None:
        if lora_id is not None:
            self.executor.remove_lora(lora_id)
