"""LoRA over HTTP: load/unload routes, adapter model cards, the adapters-directory watcher.

- ``POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace}``: the path must lie
  inside ``lora_adapters_dir`` or be a ``--lora-modules`` path (``ferry.lora.paths``); the
  adapter is read and checked completely before its name answers (400 with the reason for
  a bad adapter or a path outside, 404 when nothing is there, never a false success).
- ``POST /v1/unload_lora_adapter {lora_name}``: the name stops answering at once; requests
  already running on it finish on its weights, which are freed after them (the answer's
  ``in_flight`` says how many). Unknown name: 404.
- The watcher polls ``lora_adapters_dir`` every ``WATCH_INTERVAL_SECONDS`` (``ferry.lora.watcher``).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request

from ferry.lora.adapter_config import LoRAError, LoRANotFoundError
from ferry.lora.paths import resolve_adapter_path
from ferry.lora.watcher import Action, DirectoryScanner
from ferry.server.errors import APIError
from ferry.server.openapi import error_responses, json_body, ok
from ferry.server.protocol import (LoadLoRAAdapterRequest, LoRAAdapterResponse,
                                   UnloadLoRAAdapterRequest)

logger = logging.getLogger(__name__)

WATCH_INTERVAL_SECONDS = 1.0


def engine_lora(state: Any) -> Any:
    """The engine's ``LoRAAdapters`` (None when LoRA serving is off)."""
    return getattr(state.engine.engine, "lora", None)


def lora_config(state: Any) -> Any:
    return state.engine.engine.config.lora


def lora_error(exc: LoRAError, param: str | None = None) -> APIError:
    if isinstance(exc, LoRANotFoundError):
        return APIError(404, str(exc), param=param, code="lora_adapter_not_found")
    return APIError(400, str(exc), param=param, code="invalid_lora_adapter")


def adapter_of_model(state: Any, name: str | None) -> str | None:
    """The adapter a request's ``model`` names, or None for the base model (404 otherwise)."""
    if name is None or name in (state.model_name, state.model_path):
        return None
    lora = engine_lora(state)
    if lora is not None and name in lora.registry:
        return name
    known = f"'{state.model_name}'" + (" or a loaded LoRA adapter" if lora is not None else "")
    raise APIError(404, f"the model '{name}' does not exist; this server serves {known} "
                        "(see /v1/models)", param="model", code="model_not_found")


def adapter_cards(state: Any, base_card: dict[str, Any]) -> list[dict[str, Any]]:
    lora = engine_lora(state)
    if lora is None:
        return []
    return [{**base_card, "id": e.name, "root": e.path, "parent": state.model_name}
            for e in lora.registry.entries()]


def allowed_paths(state: Any) -> tuple[str, ...]:
    return tuple((lora_config(state).lora_modules or {}).values())


async def load_adapter(state: Any, name: str, path: str, load_inplace: bool,
                       source: str = "api") -> str:
    """Resolve, read, check and register; returns "loaded" or "reloaded"."""
    lora = engine_lora(state)
    if lora is None:
        raise LoRAError("LoRA serving is off; start the server with --lora-adapters-dir, "
                        "--lora-modules or --enable-lora")
    real = resolve_adapter_path(path, lora_config(state).lora_adapters_dir, allowed_paths(state))
    existed = name in lora.registry
    await state.engine.call(lambda engine: engine.lora.load(
        name, str(real), load_inplace=load_inplace, source=source))
    return "reloaded" if existed else "loaded"


async def unload_adapter(state: Any, name: str) -> int:
    """Hide ``name``; returns how many requests still finish on it."""
    def unload(engine: Any) -> int:
        if engine.lora is None:
            raise LoRAError("LoRA serving is off")
        in_flight = engine.lora.registry.in_flight(name)
        engine.lora.unload(name)
        return in_flight
    return await state.engine.call(unload)


def lora_router(state: Any, parse_body) -> APIRouter:
    router = APIRouter()

    @router.post("/load_lora_adapter", response_model=None,
                 openapi_extra=json_body(LoadLoRAAdapterRequest),
                 responses={**ok(LoRAAdapterResponse), **error_responses(400, 401, 404, 413)})
    async def load(request: Request) -> dict[str, Any]:
        body = await parse_body(request, LoadLoRAAdapterRequest)
        try:
            status = await load_adapter(state, body.lora_name, body.lora_path, body.load_inplace)
        except LoRAError as exc:
            raise lora_error(exc, "lora_path") from None
        return {"object": "lora_adapter", "id": body.lora_name, "status": status}

    @router.post("/unload_lora_adapter", response_model=None,
                 openapi_extra=json_body(UnloadLoRAAdapterRequest),
                 responses={**ok(LoRAAdapterResponse), **error_responses(400, 401, 404, 413)})
    async def unload(request: Request) -> dict[str, Any]:
        body = await parse_body(request, UnloadLoRAAdapterRequest)
        try:
            in_flight = await unload_adapter(state, body.lora_name)
        except LoRAError as exc:
            raise lora_error(exc, "lora_name") from None
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded",
                "in_flight": in_flight}

    return router


class AdapterDirWatcher:
    """Polls ``lora_adapters_dir`` and applies its changes through the engine thread."""

    def __init__(self, state: Any, root: str, interval: float = WATCH_INTERVAL_SECONDS):
        self.state = state
        self.scanner = DirectoryScanner(root)
        self.interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ferry-lora-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                for action in await asyncio.to_thread(self.scanner.poll):
                    await self._apply(action)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a watcher hiccup must not stop serving
                logger.exception("LoRA directory watcher")
            await asyncio.sleep(self.interval)

    async def _apply(self, action: Action) -> None:
        try:
            if action.kind == "unload":
                await unload_adapter(self.state, action.name)
            else:
                await load_adapter(self.state, action.name, action.path,
                                   load_inplace=action.kind == "reload", source="dir")
            logger.info("LoRA directory: %s %r", action.kind, action.name)
        except LoRAError as exc:
            # e.g. a subdirectory that is not a valid adapter: skipped until it changes
            logger.warning("LoRA directory: cannot %s %r: %s", action.kind, action.name, exc)
