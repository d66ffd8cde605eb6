"""Watch ``lora_adapters_dir``: each subdirectory is an adapter named after it (pure Python).

``DirectoryScanner.poll()`` compares the directory with what it saw last and returns what
to do: load a new adapter, reload a changed one, unload a removed one. An adapter is acted
on only once its files look the same on two polls in a row (names, sizes and mtimes of
``adapter_config.json`` and ``adapter_model.safetensors``), so one still being written is
left alone until it is complete; a write-then-rename of the directory is picked up whole.
Polling costs one ``stat`` per file per interval and works on every filesystem, network
mounts included; the server runs it on a timer (``ferry/server/lora_routes.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ferry.lora.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from ferry.lora.registry import _NAME

Signature = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Action:
    kind: str          # "load", "reload" or "unload"
    name: str
    path: str


class DirectoryScanner:
    def __init__(self, root: str) -> None:
        self.root = root
        self._active: dict[str, Signature] = {}      # what is loaded (or was refused), by name
        self._pending: dict[str, Signature] = {}     # seen once with this signature

    def forget(self, name: str) -> None:
        """Treat ``name`` as not loaded (e.g. after its load failed): retried on change."""
        self._active.pop(name, None)

    def poll(self) -> list[Action]:
        current = self._scan()
        actions: list[Action] = []
        for name in sorted(set(self._active) - set(current)):
            del self._active[name]
            self._pending.pop(name, None)
            actions.append(Action("unload", name, os.path.join(self.root, name)))
        for name, signature in sorted(current.items()):
            if self._active.get(name) == signature:
                self._pending.pop(name, None)
                continue
            if self._pending.get(name) != signature:
                self._pending[name] = signature      # changed since the last poll: wait
                continue
            del self._pending[name]
            kind = "reload" if name in self._active else "load"
            self._active[name] = signature
            actions.append(Action(kind, name, os.path.join(self.root, name)))
        return actions

    def _scan(self) -> dict[str, Signature]:
        """name -> file signature of each complete-looking adapter subdirectory."""
        found: dict[str, Signature] = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return found
        for entry in entries:
            if entry.name.startswith(".") or not _NAME.match(entry.name):
                continue    # hidden (e.g. a temporary dir before its rename) or not a name
            try:
                if not entry.is_dir():
                    continue
                found[entry.name] = tuple(self._stat(entry.path, f)
                                          for f in (CONFIG_FILE, WEIGHTS_FILE))
            except OSError:
                continue    # incomplete: a file is missing for now
        return found

    @staticmethod
    def _stat(directory: str, name: str) -> tuple[str, int, int]:
        st = os.stat(os.path.join(directory, name))
        return name, st.st_size, st.st_mtime_ns
