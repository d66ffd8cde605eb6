"""Config hot reload: ``POST /admin/reload`` or SIGHUP re-reads the config file.

The file is read and validated exactly as at start (the same command-line flags applied on
top, so a flag still wins over the file); an invalid file is refused and the running
configuration stays. Of the keys whose value changed, the ones that can change while
serving are applied at once, without dropping a request or a stream:

- ``max_num_seqs``, ``max_num_batched_tokens`` (each at most its start value, which sized
  the KV cache, the activation profile and the device graphs), ``prefill_parallelism``:
  handed to the engine between two steps;
- ``max_waiting_requests``, ``request_timeout_seconds`` (for requests added from now on),
  ``max_request_body_bytes``, ``log_level``: the server's.

Every other changed key is reported as needing a restart and keeps its running value.
``lora_adapters_dir`` is one of them (its watcher starts with the server).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.config import PART_OF_KEY, SERVER_PART, FerryConfig, SchedulerConfig, ServerConfig
from ferry.server.cli_flags import build_config

logger = logging.getLogger(__name__)

ENGINE_RELOADABLE = frozenset({"max_num_seqs", "max_num_batched_tokens", "prefill_parallelism"})
SERVER_RELOADABLE = frozenset({"max_waiting_requests", "request_timeout_seconds",
                               "max_request_body_bytes", "log_level"})
# Sized memory or device graphs at start: may go down, or back up to the start value.
CAPPED_AT_START = frozenset({"max_num_seqs", "max_num_batched_tokens"})


class ReloadError(ValueError):
    """The file could not be reloaded (missing, not YAML, invalid); nothing changed."""


@dataclass(frozen=True)
class ConfigSource:
    """Where the running configuration came from: the file and the flags given with it."""

    path: Path | None
    flags: dict[str, Any] = field(default_factory=dict)
    use_env_api_key: bool = False

    def load(self) -> FerryConfig:
        """The file and flags validated again; ``ValueError`` names what is wrong."""
        return build_config(self.path, dict(self.flags), use_env_api_key=self.use_env_api_key)


@dataclass
class ReloadPlan:
    """What a reload does: ``applied`` and ``needs_restart`` map a key to
    ``{"running": old, "file": new}`` (and a ``reason`` for the latter)."""

    applied: dict[str, dict[str, Any]] = field(default_factory=dict)
    needs_restart: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"status": "reloaded" if self.applied else "unchanged",
                "applied": self.applied, "needs_restart": self.needs_restart}


def plan_reload(running: FerryConfig, loaded: FerryConfig, started: FerryConfig) -> ReloadPlan:
    """Compare the running configuration with the reloaded one, key by key (pure)."""
    plan = ReloadPlan()
    now, new, start = running.to_flat(), loaded.to_flat(), started.to_flat()
    for key, value in new.items():
        old = now.get(key)
        if value == old:
            continue
        change = {"running": _shown(key, old), "file": _shown(key, value)}
        if key not in ENGINE_RELOADABLE | SERVER_RELOADABLE:
            plan.needs_restart[key] = {**change, "reason": "fixed while serving"}
        elif key in CAPPED_AT_START and value > start[key]:
            plan.needs_restart[key] = {**change, "reason": f"above its start value "
                                       f"{start[key]}, which sized memory and graphs"}
        else:
            plan.applied[key] = change
    return plan


def _shown(key: str, value: Any) -> Any:
    return "<hidden>" if key == "api_key" and value else value


def merged(running: FerryConfig, loaded: FerryConfig, keys: set[str]) -> FerryConfig:
    """``running`` with the values of ``keys`` taken from ``loaded`` (both validated)."""
    new = loaded.to_flat()
    parts = {}
    for part in ("scheduler", SERVER_PART):
        current = running.server if part == SERVER_PART else running.engine.scheduler
        update = {k: new[k] for k in keys if PART_OF_KEY[k] == part}
        parts[part] = current.model_copy(update=update) if update else current
    engine = running.engine.model_copy(update={"scheduler": parts["scheduler"]})
    return running.model_copy(update={"engine": engine, "server": parts[SERVER_PART]})


class ConfigReloader:
    """Reloads ``source`` into a serving app's state (``ServerState``): one reload at a
    time, each answered with its plan."""

    def __init__(self, source: ConfigSource, config: FerryConfig, state: Any) -> None:
        self.source = source
        self.started = config
        self.running = config
        self.state = state
        self._lock = asyncio.Lock()

    async def reload(self) -> ReloadPlan:
        """Re-read and apply; ``ReloadError`` (nothing changed) when the file is bad."""
        if self.source.path is None:
            raise ReloadError("the server was started without --config: there is no config "
                              "file to reload")
        async with self._lock:
            try:
                loaded = self.source.load()
            except ValueError as exc:
                raise ReloadError(f"the config file was not reloaded, the running "
                                  f"configuration stays: {exc}") from None
            plan = plan_reload(self.running, loaded, self.started)
            new = merged(self.running, loaded, set(plan.applied))
            await self._apply(new.engine.scheduler, new.server, set(plan.applied))
            self.running = new
        logger.info("config reloaded from %s: applied %s; need a restart: %s", self.source.path,
                    sorted(plan.applied) or "nothing", sorted(plan.needs_restart) or "nothing")
        return plan

    async def reload_logged(self) -> None:
        """``reload`` for SIGHUP: a bad file is logged, not raised."""
        try:
            await self.reload()
        except ReloadError as exc:
            logger.error("%s", exc)

    async def _apply(self, scheduler: SchedulerConfig, server: ServerConfig,
                     keys: set[str]) -> None:
        if keys & ENGINE_RELOADABLE:
            await self.state.engine.call(lambda engine: engine.update_scheduling(scheduler))
        engine = self.state.engine
        engine.max_waiting_requests = server.max_waiting_requests
        engine.request_timeout = server.request_timeout_seconds or None
        self.state.config = server   # the body limit reads it per request
        if "log_level" in keys:
            apply_log_level(server.log_level)


def apply_log_level(level: str) -> None:
    """The root logger's level (the server configures logging once, at start)."""
    logging.getLogger().setLevel(level.upper())
