"""POST /v1/completions: one or more prompts, ``n`` completions each, optionally streamed."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ferry.outputs import CompletionOutput, RequestOutput
from ferry.server.errors import APIError, sse_error_event
from ferry.server.trace_store import StreamedTraces, completion_trace
from ferry.server.protocol import CompletionRequest
from ferry.server.serving_common import (SSE_DONE, SSE_HEADERS, STREAM_ERRORS, DeltaTracker,
                                         ServerState, StreamUsage, add_or_raise, before_deadline,
                                         check_capacity, check_constraint, check_model,
                                         chunk_writer, close_streams, completion_logprobs,
                                         completion_tokens, encode_prompts, engine_error,
                                         last_output, merge_streams, new_request_id, parse_body,
                                         until_disconnect, usage, with_output_kind)


async def create_completion(request: Request, state: ServerState):
    deadline = state.engine.deadline()  # the time limit counts parsing and tokenizing
    body = await parse_body(request, CompletionRequest, state)
    lora_name = check_model(state, body.model)
    body.model = lora_name or state.model_name   # what the response names (vLLM: the adapter)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported (prompt logprobs)",
                       param="echo", code="unsupported_parameter")
    params = with_output_kind(_sampling_params(body), body.stream)
    texts_or_ids = body.prompts()
    check_capacity(state, params.n * len(texts_or_ids))  # before tokenizing
    await check_constraint(state, params)
    prompts = await before_deadline(state, deadline, encode_prompts(state, texts_or_ids))
    request_id = new_request_id("cmpl")
    streams = []
    try:
        for index, prompt in enumerate(prompts):
            streams.append(await add_or_raise(state, f"{request_id}-{index}", prompt, params,
                                              deadline=deadline, lora_name=lora_name))
    except BaseException:
        await close_streams(streams)
        raise
    if body.stream:
        return StreamingResponse(_stream(state, body, request_id, streams),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    finals = await until_disconnect(request, _collect(streams))
    return JSONResponse(_response(state, body, request_id, finals))


def _sampling_params(body: CompletionRequest):
    try:
        return body.to_sampling_params()
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None


async def _collect(streams) -> list[RequestOutput]:
    try:
        return list(await asyncio.gather(*(last_output(s) for s in streams)))
    except STREAM_ERRORS as exc:
        raise engine_error(exc) from None


def _prompt_text(state: ServerState, output: RequestOutput) -> str:
    if output.prompt is not None:
        return output.prompt
    return state.tokenizer.decode(output.prompt_token_ids)


def _choice(state: ServerState, body: CompletionRequest, index: int, output: RequestOutput,
            completion: CompletionOutput) -> dict[str, Any]:
    prefix = _prompt_text(state, output) if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(state, completion.logprobs or [], len(prefix))
    choice = {"index": index, "text": prefix + completion.text, "logprobs": logprobs,
              "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
    if body.return_token_ids:
        choice.update(prompt_token_ids=output.prompt_token_ids,
                      token_ids=list(completion.token_ids))
    if output.debug_trace is not None:   # ferry's extension
        choice["debug_trace"] = completion_trace(output.debug_trace, completion.index)
    return choice


def _response(state: ServerState, body: CompletionRequest, request_id: str,
              finals: list[RequestOutput]) -> dict[str, Any]:
    choices = [_choice(state, body, p * body.n + c.index, out, c)
               for p, out in enumerate(finals) for c in out.outputs]
    prompt_tokens = sum(len(out.prompt_token_ids) for out in finals)
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": body.model, "choices": choices, "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens(finals), finals)}


async def _stream(state: ServerState, body: CompletionRequest, request_id: str,
                  streams: list) -> AsyncIterator[str]:
    """The SSE events of the DELTA outputs of ``streams`` (one per prompt)."""
    trackers: dict[int, DeltaTracker] = {}
    stream_usage = StreamUsage()
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

    chunk = chunk_writer("text_completion", request_id, body.model, body.include_usage)
    traces = [StreamedTraces(blank={"text": ""}) for _ in streams]   # one request per prompt

    try:
        async for prompt_index, output in merge_streams(streams):
            stream_usage.observe(prompt_index, output)
            running_usage = stream_usage.value() if continuous else None
            for completion in output.outputs:
                index = prompt_index * body.n + completion.index
                choice = _delta_choice(state, body, trackers, index, output, completion)
                if choice is not None:
                    traces[prompt_index].on_choice(choice, output.debug_trace, completion.index)
                    yield chunk([choice], running_usage)
            for choice in traces[prompt_index].owed(output.debug_trace):   # n > 1
                yield chunk([choice], running_usage)
        if body.include_usage:
            yield chunk([], stream_usage.value())
    except STREAM_ERRORS as exc:
        yield sse_error_event(engine_error(exc))
    yield SSE_DONE


def _delta_choice(state: ServerState, body: CompletionRequest, trackers: dict[int, DeltaTracker],
                  index: int, output: RequestOutput,
                  completion: CompletionOutput) -> dict[str, Any] | None:
    first = index not in trackers
    tracker = trackers.setdefault(index, DeltaTracker())
    if tracker.finished:
        return None
    offset = tracker.text_len
    text, new_logprobs = tracker.take(completion)
    prefix = _prompt_text(state, output) if body.echo and first else ""
    new_tokens = completion.token_ids
    if not (prefix or text or new_logprobs or completion.finished
            or (body.return_token_ids and new_tokens)):
        return None
    tracker.finished = completion.finished
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(state, new_logprobs, offset)
    choice = {"index": index, "text": prefix + text, "logprobs": logprobs,
              "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
    if body.return_token_ids:
        choice["token_ids"] = new_tokens
        if first:
            choice["prompt_token_ids"] = output.prompt_token_ids
    return choice

