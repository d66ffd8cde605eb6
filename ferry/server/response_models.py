"""The bodies /v1/completions and /v1/chat/completions answer, as pydantic models.

The handlers build these bodies as plain dicts (one per step of a stream, so no model
validation on the hot path); these models publish their shape in /openapi.json, and
tests validate real responses against that document. Fields that are always sent have
no default (they are required in the schema); those sent only on request
(``return_token_ids``, ``stream_options.include_usage``) default to absent. Unknown
fields are allowed: OpenAI adds fields over time and clients ignore what they do not use.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

_FINISH = ("Why the completion ended: \"stop\" (end of sequence, a stop string or stop token "
           "id), \"length\" (max_tokens or the context), \"abort\"; null while streaming")
_STOP_REASON = ("The stop string or stop token id that ended the completion; null for an "
                "end-of-sequence token or any other finish")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# ---------------------------------------------------------------- /v1/completions
class CompletionLogprobs(BaseModel):
    """Legacy logprobs: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None = Field(description=_FINISH)
    stop_reason: int | str | None = Field(description=_STOP_REASON)
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids "
                                               "(in a stream: the choice's first chunk)")
    token_ids: list[int] | None = Field(None, description="With return_token_ids (in a "
                                        "stream: the tokens new in this chunk)")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None
    usage: Usage


class CompletionStreamResponse(BaseModel):
    """One event of a streamed completion: ``choices`` carry the text new since the last."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="With stream_options.include_usage: null "
                                "but in the last chunk (every chunk with continuous_usage_stats)")


# ---------------------------------------------------------------- /v1/chat/completions
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None = Field(description=_FINISH)
    stop_reason: int | str | None = Field(description=_STOP_REASON)
    token_ids: list[int] | None = Field(None, description="With return_token_ids")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None
    usage: Usage
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids")


class ChatDelta(BaseModel):
    """What a chunk adds to the message: the role once (first chunk), then content."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None = Field(description=_FINISH)
    stop_reason: int | str | None = Field(None, description=_STOP_REASON)
    token_ids: list[int] | None = Field(None, description="With return_token_ids: the "
                                        "tokens new in this chunk")


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = Field(None, description="With stream_options.include_usage: null "
                                "but in the last chunk (every chunk with continuous_usage_stats)")


STREAM_MODELS = [CompletionStreamResponse, ChatCompletionStreamResponse]
