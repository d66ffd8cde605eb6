"""The OpenAI-compatible HTTP server: routes, API key, lifespan, graceful SIGTERM drain.

``build_app(engine, server_config)`` makes the FastAPI app around an already loaded
``Engine`` (tests can pass any object with the same interface); ``run_server(config)``
loads the model of ``config.engine`` and serves it with uvicorn until SIGTERM/SIGINT, then
drains and returns (exit code 0). The server reads ``ServerConfig`` (API key, address,
limits); only the engine reads ``EngineConfig``.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ferry.config import EngineConfig, FerryConfig, ServerConfig
from ferry.server.async_engine import AsyncEngine, engine_executor
from ferry.server.body_limit import BodySizeLimit
from ferry.server.body_parsing import LargeBodyCheck
from ferry.server.errors import APIError, install_error_handlers
from ferry.server.lora_routes import AdapterDirWatcher, adapter_cards, engine_lora, lora_router
from ferry.server.lora_metrics import LoRACollector
from ferry.server.metrics import ServerMetrics
from ferry.server.openapi import error_responses, generated, install_openapi, json_body, ok
from ferry.server.tool_calls.parsers import make_parser
from ferry.server.reload import ConfigReloader, ConfigSource, ReloadError
from ferry.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                   DetokenizeResponse, HealthResponse, LoadLoRAAdapterRequest,
                                   ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
                                   UnloadLoRAAdapterRequest, VersionResponse)
from ferry.server.response_models import (STREAM_MODELS, ChatCompletionResponse,
                                          ChatCompletionStreamResponse, CompletionResponse,
                                          CompletionStreamResponse)
from ferry.server.serving_chat import create_chat_completion
from ferry.server.serving_common import ServerState, check_model, encode_chat, parse_body
from ferry.server.serving_completions import create_completion
from ferry.server.tokenization import PromptTokenizer
from ferry.server.trace_store import RETENTION_SECONDS, TraceStore
from ferry.server.webui import webui_router

logger = logging.getLogger(__name__)

# The request bodies /openapi.json publishes (the handlers parse them themselves).
REQUEST_MODELS = [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest,
                  LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest,
                  *STREAM_MODELS]   # and the stream chunks, described in the SSE events
_GENERATION_ERRORS = (400, 401, 404, 413, 503, 504)


def ferry_version() -> str:
    import ferry

    version = getattr(ferry, "__version__", None)
    if version:
        return version
    try:
        from importlib.metadata import version as dist_version

        return dist_version("ferry")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0.0.0+source"


def build_state(engine: Any, config: ServerConfig,
                executor: ThreadPoolExecutor | None = None) -> ServerState:
    """Everything the handlers share, around ``engine``, limited by ``config``."""
    metrics = _server_metrics(engine)
    if getattr(engine, "lora", None) is not None:
        metrics.registry.register(LoRACollector(engine, metrics.common_labels))
    async_engine = AsyncEngine(engine, max_waiting_requests=config.max_waiting_requests,
                               metrics=metrics, executor=executor,
                               request_timeout=config.request_timeout_seconds)
    tokenizer = _own_tokenizer(engine.tokenizer)
    vocab_size = getattr(engine, "vocab_size", None) or len(tokenizer)
    model_path = _given_model_path(engine)
    prompts = PromptTokenizer(tokenizer, engine.max_model_len, engine.served_model_name)
    async_engine.traces = TraceStore()
    return ServerState(engine=async_engine, tokenizer=tokenizer,
                       model_name=engine.served_model_name, model_path=model_path,
                       model_root=str(getattr(engine, "model_dir", model_path)),
                       max_model_len=engine.max_model_len,
                       vocab_size=vocab_size, metrics=metrics, config=config, prompts=prompts,
                       grammars=getattr(getattr(engine, "structured_output", None), "compiler",
                                        None),
                       tool_parser=make_parser(getattr(config, "tool_call_parser", "auto"),
                                               getattr(tokenizer, "chat_template", None)),
                       quant_type=getattr(engine, "quant_type", "none"),
                       large_bodies=LargeBodyCheck(engine.max_model_len, prompts.max_prompt_chars))


def _given_model_path(engine: Any) -> str | None:
    """The model as named at start (``--model``), from the engine's own config if it has one."""
    config = getattr(engine, "config", None)
    return getattr(getattr(config, "model", None), "model_path", None)


def _server_metrics(engine: Any) -> ServerMetrics:
    """The server's metrics, with the platform's memory and energy probes where it has them
    (an engine without a platform, e.g. a test double, reports as a CPU)."""
    platform = getattr(engine, "platform", None)
    return ServerMetrics(engine.served_model_name, getattr(engine, "quant_type", "none"),
                         getattr(platform, "vendor", "cpu"),
                         memory_probe=platform.memory_probe() if platform else None,
                         energy_probe=platform.energy_probe() if platform else None)


def _own_tokenizer(tokenizer: Any) -> Any:
    """A copy for the event loop: a fast tokenizer used from two threads at once can fail
    ("Already borrowed"), and the engine thread uses the original."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception as exc:  # noqa: BLE001 - an exotic tokenizer: share it (decode only)
        logger.warning("could not copy the tokenizer (%s); sharing the engine's", exc)
        return tokenizer


def build_app(engine: Any, config: ServerConfig,
              executor: ThreadPoolExecutor | None = None,
              config_source: ConfigSource | None = None) -> FastAPI:
    """The app serving ``engine``; its lifespan starts and drains the engine loop.
    ``executor``: the engine's own thread (``async_engine.engine_executor``), if it has one.
    ``config_source``: the config file and flags it was started with, which
    ``POST /admin/reload`` and SIGHUP read again (none: nothing to reload)."""
    state = build_state(engine, config, executor)
    reloader = ConfigReloader(config_source or ConfigSource(None),
                              FerryConfig(engine=getattr(engine, "config", None) or EngineConfig(),
                                          server=config), state)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await state.engine.start()
        watcher = _start_lora_watcher(state)
        hangup = _install_sighup(reloader) if config_source is not None else False
        try:
            yield
        finally:
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if watcher is not None:
                await watcher.stop()
            await state.engine.shutdown(grace_seconds=config.shutdown_grace_seconds)
            state.prompts.shutdown()
            state.large_bodies.shutdown()

    app = FastAPI(title="ferry", version=ferry_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.ferry = state

    def on_error(request: Request, error: APIError) -> None:
        _count_error(state, request, error)

    install_error_handlers(app, on_error=on_error)
    # Outermost but for Starlette's own error middleware: a body too large is refused
    # before routing, authentication or parsing see it.
    app.add_middleware(BodySizeLimit, max_bytes=lambda: state.config.max_request_body_bytes,
                       on_error=on_error)
    app.include_router(_v1_router(state))
    app.include_router(_plain_router(state))
    app.include_router(_admin_router(state, reloader))
    app.include_router(_debug_router(state))
    if config.web_ui:
        app.include_router(webui_router())
    install_openapi(app, REQUEST_MODELS)
    return app


def _start_lora_watcher(state: ServerState) -> AdapterDirWatcher | None:
    """Watch ``lora_adapters_dir`` while serving, when LoRA serving is on and it is set."""
    if engine_lora(state) is None:
        return None
    root = state.engine.engine.config.lora.lora_adapters_dir
    if not root:
        return None
    watcher = AdapterDirWatcher(state, root)
    watcher.start()
    return watcher


def _count_error(state: ServerState, request: Request, error: APIError) -> None:
    if not request.url.path.startswith("/v1/") or error.status == 499:
        return  # a disconnect was already counted as aborted
    state.metrics.count_request("rejected" if error.status in (429, 503) else "error")


def _api_key_checker(api_key: str | None):
    async def require_api_key(request: Request) -> None:
        if not api_key:  # none configured (an empty key means none, too)
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                    api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return require_api_key


def _v1_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_checker(state.config.api_key))])

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "ferry", "root": state.model_root,
                "max_model_len": state.max_model_len, "quant_type": state.quant_type}

    @router.get("/models", response_model=None,
                responses={**ok(ModelList), **error_responses(401)})
    async def list_models() -> dict[str, Any]:
        base = model_card()
        return {"object": "list", "data": [base, *adapter_cards(state, base)]}

    @router.get("/models/{model_id:path}", response_model=None,
                responses={**ok(ModelCard), **error_responses(401, 404)})
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if check_model(state, model_id) is None:
            return model_card()
        return next(card for card in adapter_cards(state, model_card()) if card["id"] == model_id)

    @router.post("/completions", response_model=None, openapi_extra=json_body(CompletionRequest),
                 responses={**generated(CompletionResponse, CompletionStreamResponse),
                            **error_responses(*_GENERATION_ERRORS)})
    async def completions(request: Request):
        return await create_completion(request, state)

    @router.post("/chat/completions", response_model=None,
                 openapi_extra=json_body(ChatCompletionRequest),
                 responses={**generated(ChatCompletionResponse, ChatCompletionStreamResponse),
                            **error_responses(*_GENERATION_ERRORS)})
    async def chat_completions(request: Request):
        return await create_chat_completion(request, state)

    router.include_router(lora_router(state, parse_body))
    return router


def _plain_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=None,
                responses={**ok(HealthResponse),
                           503: {"model": HealthResponse, "description": "Draining or failed"}})
    async def health() -> JSONResponse:
        engine = state.engine
        if engine.dead_reason is not None:
            return JSONResponse({"status": "error", "reason": engine.dead_reason}, 503)
        if not engine.accepting:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok"})

    @router.get("/version", response_model=None, responses=ok(VersionResponse))
    async def version() -> dict[str, str]:
        return {"version": ferry_version()}

    @router.get("/metrics", response_class=PlainTextResponse, responses={200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # Tokenizing is work on the model's behalf, as generating is: under the same key.
    keyed = [Depends(_api_key_checker(state.config.api_key))]

    @router.post("/tokenize", dependencies=keyed, response_model=None,
                 openapi_extra=json_body(TokenizeRequest),
                 responses={**ok(TokenizeResponse), **error_responses(400, 401, 404, 413)})
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest, state)
        check_model(state, body.model)
        tokens = await _tokenize(state, body)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}

    @router.post("/detokenize", dependencies=keyed, response_model=None,
                 openapi_extra=json_body(DetokenizeRequest),
                 responses={**ok(DetokenizeResponse), **error_responses(400, 401, 404, 413)})
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, DetokenizeRequest, state)
        check_model(state, body.model)
        bad = [t for t in body.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {state.vocab_size}); got {bad[:5]}",
                           param="tokens", code="invalid_value")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    return router


def _admin_router(state: ServerState, reloader: ConfigReloader) -> APIRouter:
    router = APIRouter(prefix="/admin",
                       dependencies=[Depends(_api_key_checker(state.config.api_key))])

    @router.post("/reload", response_model=None, responses={
        200: {"description": "What was applied and which changed keys need a restart",
              "content": {"application/json": {"schema": {"type": "object"}}}},
        **error_responses(400, 401)})
    async def reload_config() -> dict[str, Any]:
        try:
            plan = await reloader.reload()
        except ReloadError as exc:
            raise APIError(400, str(exc), code="invalid_config") from None
        return plan.to_json()

    return router


def _debug_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/debug",
                       dependencies=[Depends(_api_key_checker(state.config.api_key))])

    @router.get("/trace/{request_id}", response_model=None, responses={
        200: {"description": "The attention trace of a finished traced request",
              "content": {"application/json": {"schema": {"type": "object"}}}},
        **error_responses(401, 404)})
    async def debug_trace(request_id: str) -> dict[str, Any]:
        trace = state.engine.traces.get(request_id)
        if trace is None:
            raise APIError(404, f"no attention trace for request {request_id!r}: traces of "
                                f"requests sent with \"debug_trace\": true are kept "
                                f"{RETENTION_SECONDS:.0f} s after they finish",
                           param="request_id", code="not_found")
        return {"request_id": request_id, "debug_trace": trace}

    return router


def _install_sighup(reloader: ConfigReloader) -> bool:
    """SIGHUP reloads the config file (where the loop may handle signals: the main
    thread on a POSIX system)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP,
                                lambda: loop.create_task(reloader.reload_logged()))
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return False
    return True


async def _tokenize(state: ServerState, body: TokenizeRequest) -> list[int]:
    """Tokenize on the tokenizer pool, exactly as a completion or chat request would (and
    refused by length the same way)."""
    if body.prompt is not None:
        return await state.prompts.encode(body.prompt)
    messages = [m.to_template() for m in body.messages]
    return await encode_chat(state, messages, body.add_generation_prompt)


class _DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT first drains the engine: the listener stays open and new
    requests get 503 with ``Retry-After`` (not "connection refused"), requests in flight get
    ``shutdown_grace_seconds`` to finish, the rest end with an error event; only then does
    uvicorn stop listening and shut down. A second signal closes the listener at once. The
    process exits 0 instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._ferry_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        engine = self._ferry_state.engine
        if engine.accepting:  # the first signal: drain while still listening
            engine.stop_accepting()
            engine.drain_soon(self._ferry_state.config.shutdown_grace_seconds,
                              then=self._stop_listening)
            return
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a drained shutdown is a clean exit

    def _stop_listening(self) -> None:
        """After the drain: uvicorn's own shutdown (close the listener, finish connections,
        the app's lifespan end)."""
        self.should_exit = True


def run_server(config: FerryConfig, engine: Any | None = None,
               executor: ThreadPoolExecutor | None = None,
               config_source: ConfigSource | None = None) -> None:
    """Load the model of ``config.engine`` (unless ``engine`` is given, built on
    ``executor``'s thread) and serve by ``config.server`` until SIGTERM; then drain: refuse
    new requests, let requests in flight finish for ``shutdown_grace_seconds``, abort the
    rest, return."""
    if engine is None:
        from ferry.engine.engine import Engine

        executor = engine_executor()
        engine = executor.submit(Engine, config.engine).result()   # built where it will run
    settings = config.server
    app = build_app(engine, settings, executor, config_source)
    uv_config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                               # a backstop: the engine's drain ends streams before it
                               timeout_graceful_shutdown=settings.shutdown_grace_seconds + 10,
                               lifespan="on", access_log=False)
    server = _DrainingServer(uv_config, app.state.ferry)
    logger.info("serving %s on http://%s:%d (OpenAI API under /v1)", engine.served_model_name,
                settings.host, settings.port)
    server.run()
