"""What the completion and chat handlers share: server state, body parsing, SSE, logprobs."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from ferry.config import ServerConfig
from ferry.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from ferry.sampling_params import RequestOutputKind, SamplingParams
from ferry.server.async_engine import (AsyncEngine, EngineOverloadedError, EngineStepError,
                                       EngineStoppedError, RequestTimeoutError)
from ferry.lora.adapter_config import LoRANotFoundError
from ferry.server.body_parsing import (PARSE_OFF_LOOP_BYTES, LargeBodyCheck, parse_large_body,
                                       validate_body)
from ferry.server.errors import APIError
from ferry.server.lora_routes import adapter_of_model
from ferry.server.metrics import ServerMetrics
from ferry.server.tokenization import PromptTokenizer

RETRY_AFTER_SECONDS = 1
# What a request's stream may raise after it was accepted (answered by ``engine_error``).
STREAM_ERRORS = (EngineStepError, EngineStoppedError, RequestTimeoutError)
Model = TypeVar("Model", bound=BaseModel)
T = TypeVar("T")


@dataclass
class ServerState:
    """Everything a handler needs. ``tokenizer`` is the server's own copy: the engine's is
    used on the engine thread only (fast tokenizers must not be shared across threads)."""

    engine: AsyncEngine
    tokenizer: Any
    model_name: str
    model_path: str | None      # the model as named at start (accepted as a model name too)
    model_root: str             # the model's directory (or hub id)
    max_model_len: int
    vocab_size: int
    metrics: ServerMetrics
    config: ServerConfig
    prompts: PromptTokenizer    # tokenization and chat templates, off the engine thread
    grammars: Any = None        # the engine's GrammarCompiler (structured output), if any
    tool_parser: Any = None     # the model family's tool-call parser
    large_bodies: LargeBodyCheck | None = None   # large bodies checked in another process
    created: int = field(default_factory=lambda: int(time.time()))
    quant_type: str = "none"    # the engine's weight format (metrics label, /v1/models)
    _token_text: dict[int, str] = field(default_factory=dict)

    def token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI shows it in logprobs (cached)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._token_text) < 200_000:
                self._token_text[token_id] = text
        return text


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def parse_body(request: Request, model_cls: type[Model],
                     state: ServerState | None = None) -> Model:
    """Read and validate a JSON body; every problem becomes a 400 (the size limit is the
    ``BodySizeLimit`` middleware's: 413 while the body is read). A large body is checked
    in ``state.large_bodies``'s process, then validated on a worker thread, so the event
    loop keeps serving meanwhile (see ``body_parsing``)."""
    body = await request.body()
    if len(body) > PARSE_OFF_LOOP_BYTES:
        check = state.large_bodies if state is not None else None
        return await parse_large_body(body, model_cls, check)
    return validate_body(body, model_cls)


def check_model(state: ServerState, name: str | None) -> str | None:
    """``name`` must be the served name (the model path as given at start is accepted too)
    or a loaded LoRA adapter's; returns the adapter's name, None for the base model."""
    return adapter_of_model(state, name)


def engine_error(exc: Exception) -> APIError:
    """Map what ``AsyncEngine.add_request`` or a request's stream raises to an HTTP error."""
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), code="request_timeout")
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), code="server_overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc), code="server_unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), code="engine_error")
    if isinstance(exc, ValueError):
        message = str(exc)
        code = "context_length_exceeded" if "context length" in message else "invalid_value"
        return APIError(400, message, code=code)
    raise exc


def with_output_kind(params: SamplingParams, stream: bool,
                     whole_text: bool = False) -> SamplingParams:
    """The outputs a route reads: a stream reads DELTA ones (what each step added, so
    its cost does not grow with the output's length), unless it parses the whole text
    every step (``whole_text``: tool calls); a plain answer reads only the final one."""
    if not stream:
        kind = RequestOutputKind.FINAL_ONLY
    else:
        kind = RequestOutputKind.CUMULATIVE if whole_text else RequestOutputKind.DELTA
    return params.clone(output_kind=kind)


def check_capacity(state: ServerState, num_new_requests: int) -> None:
    """503 now (draining, or the waiting queue full), before any work on the prompt."""
    try:
        state.engine.check_capacity(num_new_requests)
    except RuntimeError as exc:
        raise engine_error(exc) from None


async def encode_prompts(state: ServerState, prompts: list[str | list[int]]) -> list[dict]:
    """The engine's prompts for ``prompts`` (texts or token ids): token ids, the text beside
    them (echo shows it); every text is length-checked first, then tokenized off the engine
    thread."""
    for text in prompts:
        if isinstance(text, str):
            if not text:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
            state.prompts.check_length(len(text), "prompt")
    encoded = []
    for prompt in prompts:
        if isinstance(prompt, str):
            encoded.append({"prompt_token_ids": await state.prompts.encode(prompt),
                            "prompt": prompt})
        else:
            encoded.append({"prompt_token_ids": prompt})
    return encoded


async def encode_chat(state: ServerState, messages: list[dict[str, str]],
                      add_generation_prompt: bool, tools: list[dict] | None = None) -> list[int]:
    """The chat template's token ids, computed off the engine thread; 400 when it fails."""
    try:
        return await state.prompts.encode_chat(messages, add_generation_prompt, tools)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages", code="invalid_value") from None


async def before_deadline(state: ServerState, deadline: float | None, work: Awaitable[T]) -> T:
    """Await ``work`` (tokenizing, templating) within the request's time limit: 504 past
    ``deadline`` (from ``state.engine.deadline()`` when the request arrived)."""
    if deadline is None:
        return await work
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise engine_error(state.engine.timeout_error()) from None


async def check_constraint(state: ServerState, params: Any) -> None:
    """Compile the request's output constraint (off the engine thread, cached): a
    constraint that cannot be honoured is a 400 before any token is generated."""
    spec = getattr(params, "structured_outputs", None)
    if spec is None:
        return
    if state.grammars is None:
        raise APIError(400, "structured output is not available on this server (no grammar "
                            "backend installed)", code="unsupported_parameter")
    try:
        await state.grammars.compile_async(spec)
    except ValueError as exc:
        raise APIError(400, str(exc), param="response_format", code="invalid_value") from None


async def add_or_raise(state: ServerState, request_id: str, prompt: Any, params: Any,
                       priority: int | None = None, deadline: float | None = None,
                       lora_name: str | None = None):
    """``AsyncEngine.add_request`` with its errors turned into API errors."""
    try:
        return await state.engine.add_request(request_id, prompt, params, priority=priority,
                                              deadline=deadline, lora_name=lora_name)
    except LoRANotFoundError as exc:   # unloaded between the check and the engine
        raise APIError(404, str(exc), param="model", code="model_not_found") from None
    except (ValueError, RuntimeError) as exc:
        raise engine_error(exc) from None


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; cancel it (which aborts its requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise APIError(499, "the client disconnected")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def last_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Drain a request's stream; its final (finished) cumulative output."""
    final = None
    try:
        async for output in stream:
            final = output
    finally:
        await stream.aclose()
    return final


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' streams as (stream index, output), in arrival order.

    Leaving early closes every stream, which aborts their requests.
    """
    if len(streams) == 1:  # the common case, without helper tasks
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await _close_quietly(streams[0])
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
            queue.put_nowait((index, done))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:  # cancelling a pump closes its stream, which aborts its request
            task.cancel()


async def _close_quietly(stream: AsyncIterator[RequestOutput]) -> None:
    try:
        await stream.aclose()
    except Exception:  # noqa: BLE001 - closing must not hide the original error
        pass


async def close_streams(streams: list[AsyncIterator[RequestOutput]]) -> None:
    for stream in streams:
        await _close_quietly(stream)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def chunk_writer(object_name: str, request_id: str, model: str,
                 include_usage: bool) -> Callable[..., str]:
    """``chunk(choices, usage_value=None) -> str``: one SSE chunk of a streamed response,
    with the stream's fixed fields (id, object, created, model) and ``usage`` when asked."""
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], usage_value: Any = None) -> str:
        payload = {"id": request_id, "object": object_name, "created": created,
                   "model": model, "choices": choices}
        if include_usage:
            payload["usage"] = usage_value
        return sse(payload)

    return chunk


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def usage(prompt_tokens: int, completion_tokens: int,
          outputs: list[RequestOutput] = (), energies: list[float] | None = None
          ) -> dict[str, Any]:
    """OpenAI's usage object; with the extension ``energy_joules`` (the joules the engine
    charged to ``outputs``, or the ``energies`` given) only where the hardware reports
    energy."""
    result: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
    if energies is None:
        energies = [o.energy_joules for o in outputs if o.energy_joules is not None]
    if energies:
        result["energy_joules"] = sum(energies)
    return result


def completion_tokens(outputs: list[RequestOutput]) -> int:
    return sum(c.num_generated_tokens for out in outputs for c in out.outputs)


class StreamUsage:
    """The usage of a streamed response, kept up to date from its outputs (a DELTA output
    lists only the completions that advanced, so counts are kept per completion)."""

    def __init__(self) -> None:
        self._prompt_tokens: dict[int, int] = {}
        self._generated: dict[tuple[int, int], int] = {}
        self._energy: dict[int, float] = {}

    def observe(self, prompt_index: int, output: RequestOutput) -> None:
        self._prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        for completion in output.outputs:
            self._generated[prompt_index, completion.index] = completion.num_generated_tokens
        if output.energy_joules is not None:
            self._energy[prompt_index] = output.energy_joules

    def value(self) -> dict[str, Any]:
        return usage(sum(self._prompt_tokens.values()), sum(self._generated.values()),
                     energies=list(self._energy.values()))


@dataclass
class DeltaTracker:
    """What of a streamed completion was already sent; its outputs are DELTA ones, each
    with only what is new."""

    text_len: int = 0        # characters sent (a logprob's text_offset counts from here)
    finished: bool = False

    def take(self, completion: CompletionOutput) -> tuple[str, list[TokenLogprobs]]:
        """The new text and logprobs of ``completion`` (a DELTA output)."""
        self.text_len += len(completion.text)
        return completion.text, completion.logprobs or []


def completion_logprobs(state: ServerState, entries: list[TokenLogprobs],
                        offset: int) -> dict[str, Any]:
    """Legacy /v1/completions logprobs: parallel lists of tokens and their logprobs."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        text = state.token_text(entry.token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        top.append({state.token_text(t): lp for t, lp in entry.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(state: ServerState, entries: list[TokenLogprobs]) -> dict[str, Any]:
    """Chat logprobs: one entry per token with its bytes and top alternatives."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(item(e.token_id, e.logprob),
                             top_logprobs=[item(t, lp) for t, lp in e.top]) for e in entries]}
