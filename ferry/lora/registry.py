"""The engine's view of LoRA adapters: names, load generations, in-flight counts (pure Python).

Every load gets a fresh ``lora_id`` (a reload in place too): requests carry it, the runner
keys its weights by it and the prefix cache salts by it, so KV computed with one version of
an adapter is never served to another. Unloading (or replacing) an adapter hides its name at
once; its weights stay until the requests already running with it finish ("retired").
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ferry.lora.adapter_config import LoRAError, LoRANotFoundError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    lora_id: int
    path: str
    source: str            # "cli", "dir", "api" or "python": who loaded it


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise LoRAError(f"invalid LoRA adapter name {name!r}: use letters, digits and . _ : - "
                        "(up to 128 characters, starting with a letter or digit)")
    return name


class LoRARegistry:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._by_name: dict[str, AdapterEntry] = {}
        self._in_flight: Counter[int] = Counter()
        self._retired: set[int] = set()
        self._next_id = 1
        self.requests_total: Counter[str] = Counter()

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._by_name.values(), key=lambda e: e.name)

    def get(self, name: str) -> AdapterEntry | None:
        return self._by_name.get(name)

    def resolve(self, name: str) -> AdapterEntry:
        entry = self._by_name.get(name)
        if entry is None:
            raise LoRANotFoundError(f"no LoRA adapter named {name!r} is loaded")
        return entry

    def new_id(self) -> int:
        lora_id, self._next_id = self._next_id, self._next_id + 1
        return lora_id

    def register(self, entry: AdapterEntry) -> int | None:
        """Make ``entry`` visible under its name; returns the id of the version it replaced
        when that one can be dropped from the runner now (no request in flight)."""
        old = self._by_name.get(entry.name)
        self._by_name[entry.name] = entry
        return self._retire(old.lora_id) if old is not None else None

    def unregister(self, name: str) -> tuple[AdapterEntry, int | None]:
        """Hide ``name``; returns its entry and its id when the runner may drop it now."""
        entry = self.resolve(name)
        del self._by_name[name]
        return entry, self._retire(entry.lora_id)

    def acquire(self, entry: AdapterEntry) -> None:
        self._in_flight[entry.lora_id] += 1
        self.requests_total[entry.name] += 1

    def release(self, lora_id: int) -> int | None:
        """One request with ``lora_id`` finished; returns the id when it can now be dropped."""
        self._in_flight[lora_id] -= 1
        if self._in_flight[lora_id] <= 0:
            del self._in_flight[lora_id]
            if lora_id in self._retired:
                self._retired.discard(lora_id)
                return lora_id
        return None

    def in_flight(self, name: str) -> int:
        entry = self._by_name.get(name)
        return self._in_flight.get(entry.lora_id, 0) if entry else 0

    def admits(self, request, running) -> bool:
        """Scheduler admission: a request's adapter must fit in the device slots beside the
        distinct adapters of the running requests."""
        if request.lora_id is None:
            return True
        active = {r.lora_id for r in running if r.lora_id is not None}
        return request.lora_id in active or len(active) < self.max_loras

    def _retire(self, lora_id: int) -> int | None:
        if self._in_flight.get(lora_id, 0) > 0:
            self._retired.add(lora_id)
            return None
        return lora_id
