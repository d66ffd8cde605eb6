"""POST /v1/chat/completions: the chat template runs on the tokenizer pool, ``n`` choices."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ferry.outputs import CompletionOutput, RequestOutput
from ferry.server.errors import APIError, sse_error_event
from ferry.server.protocol import ChatCompletionRequest
from ferry.server.tool_calls.extract import calls_of, new_call_id, tool_call_dicts
from ferry.server.tool_calls.stream import ToolCallStream
from ferry.server.trace_store import StreamedTraces, completion_trace
from ferry.server.serving_common import (SSE_DONE, SSE_HEADERS, STREAM_ERRORS, DeltaTracker,
                                         ServerState, StreamUsage, add_or_raise,
                                         before_deadline, chat_logprobs, check_capacity,
                                         check_constraint, check_model, chunk_writer,
                                         completion_tokens, encode_chat, engine_error,
                                         last_output, merge_streams, new_request_id, parse_body,
                                         until_disconnect, usage, with_output_kind)


async def create_chat_completion(request: Request, state: ServerState):
    deadline = state.engine.deadline()  # the time limit counts parsing and templating
    body = await parse_body(request, ChatCompletionRequest, state)
    lora_name = check_model(state, body.model)
    body.model = lora_name or state.model_name   # what the response names (vLLM: the adapter)
    try:
        # Tool calls are parsed from the whole text each step: those streams read it whole.
        params = with_output_kind(body.to_sampling_params(), body.stream,
                                  whole_text=body.tool_mode().kind != "none")
        tools = body.template_tools()
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None
    check_capacity(state, params.n)  # before templating: a full server wastes no work
    await check_constraint(state, params)
    prompt_ids = await before_deadline(state, deadline, encode_chat(
        state, body.template_messages(), body.add_generation_prompt, tools))
    request_id = new_request_id("chatcmpl")
    stream = await add_or_raise(state, request_id, {"prompt_token_ids": prompt_ids}, params,
                                deadline=deadline, lora_name=lora_name)
    if body.stream:
        return StreamingResponse(_stream(state, body, request_id, stream),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        final = await until_disconnect(request, last_output(stream))
    except STREAM_ERRORS as exc:
        raise engine_error(exc) from None
    return JSONResponse(_response(state, body, request_id, final))


def _response(state: ServerState, body: ChatCompletionRequest, request_id: str,
              final: RequestOutput) -> dict[str, Any]:
    choices = [{"index": c.index, **_message(state, body, c),
                "logprobs": chat_logprobs(state, c.logprobs or []) if body.logprobs else None,
                "stop_reason": c.stop_reason}
               for c in final.outputs]
    response = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "system_fingerprint": None,
                "usage": usage(len(final.prompt_token_ids), completion_tokens([final]), [final])}
    if final.debug_trace is not None:   # ferry's extension
        for choice, completion in zip(choices, final.outputs):
            choice["debug_trace"] = completion_trace(final.debug_trace, completion.index)
    if body.return_token_ids:
        response["prompt_token_ids"] = final.prompt_token_ids
        for choice, completion in zip(choices, final.outputs):
            choice["token_ids"] = list(completion.token_ids)
    return response


def _message(state: ServerState, body: ChatCompletionRequest,
             completion: CompletionOutput) -> dict[str, Any]:
    """``message`` and ``finish_reason``: with tools, recognised calls go to ``tool_calls``
    (never left in ``content``) and a finished turn with calls says ``tool_calls``."""
    mode = body.tool_mode()
    if mode.kind == "none":
        return {"message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason}
    content, calls = calls_of(completion.text, mode, state.tool_parser)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    finish = completion.finish_reason
    if calls:
        message["tool_calls"] = tool_call_dicts(calls, [new_call_id() for _ in calls])
        finish = "tool_calls" if finish == "stop" else finish
    return {"message": message, "finish_reason": finish}


async def _stream(state: ServerState, body: ChatCompletionRequest, request_id: str,
                  stream) -> AsyncIterator[str]:
    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

    chunk = chunk_writer("chat.completion.chunk", request_id, body.model, body.include_usage)

    # The role comes first, before any token, as OpenAI sends it.
    for index in range(body.n):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
    trackers = [DeltaTracker() for _ in range(body.n)]
    mode = body.tool_mode()
    tool_streams = ([ToolCallStream(mode, state.tool_parser) for _ in range(body.n)]
                    if mode.kind != "none" else None)
    stream_usage = StreamUsage()
    traces = StreamedTraces(blank={"delta": {}})
    try:
        async for _, output in merge_streams([stream]):
            stream_usage.observe(0, output)
            running = stream_usage.value() if continuous else None
            for completion in output.outputs:
                if tool_streams is not None:
                    choices = _tool_choices(tool_streams[completion.index],
                                            trackers[completion.index], completion)
                else:
                    choice = _delta_choice(state, body, trackers[completion.index], completion)
                    choices = [] if choice is None else [choice]
                for choice in choices:
                    traces.on_choice(choice, output.debug_trace, completion.index)
                    yield chunk([choice], running)
            for choice in traces.owed(output.debug_trace):   # n > 1: choices done earlier
                yield chunk([choice], running)
        if body.include_usage:
            yield chunk([], stream_usage.value())
    except STREAM_ERRORS as exc:
        yield sse_error_event(engine_error(exc))
    yield SSE_DONE


def _delta_choice(state: ServerState, body: ChatCompletionRequest, tracker: DeltaTracker,
                  completion: CompletionOutput) -> dict[str, Any] | None:
    if tracker.finished:
        return None
    text, new_logprobs = tracker.take(completion)
    new_tokens = completion.token_ids
    if not (text or new_logprobs or completion.finished or (body.return_token_ids and new_tokens)):
        return None
    tracker.finished = completion.finished
    choice = {"index": completion.index, "delta": {"content": text} if text else {},
              "logprobs": chat_logprobs(state, new_logprobs) if body.logprobs else None,
              "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
    if body.return_token_ids:
        choice["token_ids"] = new_tokens
    return choice


def _tool_choices(stream: ToolCallStream, tracker: DeltaTracker,
                  completion: CompletionOutput) -> list[dict[str, Any]]:
    """The chunks' choices of a choice with tools: its deltas, the last with the reason."""
    if tracker.finished:
        return []
    tracker.finished = completion.finished
    choices = [{"index": completion.index, "delta": delta, "logprobs": None,
                "finish_reason": None} for delta in stream.deltas(completion)]
    if completion.finished:
        choices.append({"index": completion.index, "delta": {}, "logprobs": None,
                        "finish_reason": stream.finish_reason(completion),
                        "stop_reason": completion.stop_reason})
    return choices

