"""OpenAI-compatible request schemas, validated strictly (a string is never read as a number).

The bounds match ``SamplingParams`` so a request that passes here builds valid params. Fields
OpenAI defines but ferry does not implement are declared so a client that sends them gets a
clear 400 (``unsupported``) instead of a silently different result; harmless ones (``user``,
``metadata``, ``store``) are accepted and ignored. Unknown fields are rejected by name, which
catches typos such as ``max_token``.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator,
                      model_validator)

from ferry.sampling_params import (PRIORITY_MAX, PRIORITY_MIN, SamplingParams,
                                   StructuredOutputsParams)
from ferry.server.tool_calls.constraint import ToolMode, tool_constraint, tool_mode

MAX_N = 128
MAX_LOGPROBS = 20


class UnsupportedFieldError(ValueError):
    """A request field OpenAI defines that ferry does not implement."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    debug_trace: bool = False   # ferry: an attention trace (server started with --debug-trace attention)
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX)   # vLLM extra: smaller runs first
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # vLLM extra: token ids beside the text
    # vLLM extra: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    structured_outputs: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value < -1:
            raise ValueError("top_k must be -1 or 0 (disabled) or a positive integer")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, value: list[int] | None) -> list[int] | None:
        if value and any(t < 0 for t in value):
            raise ValueError("stop_token_ids must be non-negative integers")
        return value

    def check_supported(self) -> None:
        if self.logit_bias:
            raise UnsupportedFieldError("logit_bias", "logit_bias is not supported by ferry")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's params; ``None`` fields keep SamplingParams' defaults."""
        values: dict[str, Any] = dict(
            n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, max_tokens=max_tokens, logprobs=logprobs,
            min_tokens=self.min_tokens, priority=self.priority,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            debug_trace=self.debug_trace)
        optional = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        min_p=self.min_p, presence_penalty=self.presence_penalty,
                        frequency_penalty=self.frequency_penalty,
                        repetition_penalty=self.repetition_penalty)
        values.update({k: v for k, v in optional.items() if v is not None})
        constraint = self.constraint()
        if constraint is not None:
            values["structured_outputs"] = constraint
        return SamplingParams(**values)

    def constraint(self) -> StructuredOutputsParams | None:
        """The output constraint the request asks for (``ValueError`` when malformed)."""
        return StructuredOutputsParams.coerce(self.structured_outputs)


# Non-empty texts and token-id lists, so that the published schema says what is refused.
_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


def _prompt_shape(value: Any) -> str | None:
    """Which form a prompt takes, from its first item. Without it pydantic would try every
    form in turn and collect an error per item of each that fails: 24 s for 5M token ids."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "token_id_lists"
    return "token_ids" if isinstance(first, int) and not isinstance(first, bool) else "texts"


PromptInput = Annotated[
    Annotated[_Text, Tag("text")] | Annotated[list[_Text], Field(min_length=1), Tag("texts")]
    | Annotated[_TokenIds, Tag("token_ids")]
    | Annotated[list[_TokenIds], Field(min_length=1), Tag("token_id_lists")],
    Discriminator(_prompt_shape, custom_error_type="prompt_type",
                  custom_error_message="prompt must be a string, a list of strings, a list of "
                                       "token ids or a list of token-id lists")]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise UnsupportedFieldError("suffix", "suffix (insertion) is not supported by ferry")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedFieldError("best_of", "best_of different from n is not supported")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):   # validated: one form throughout, never empty
            return [list(self.prompt)]
        return list(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message: an assistant turn may carry ``tool_calls``, and a ``tool`` message
    answers one (``tool_call_id``)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_given(self) -> "ChatMessage":
        # OpenAI answers 400 to a null content; only an assistant's tool-call turn may omit it.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs a content (got null)")
        return self

    def check_supported(self, index: int) -> None:
        """``tool_calls`` only on assistant turns, ``tool_call_id`` only on tool messages."""
        if self.tool_calls is not None and self.role != "assistant":
            raise UnsupportedFieldError(f"messages.{index}.tool_calls",
                                        "only assistant messages carry tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise UnsupportedFieldError(f"messages.{index}.tool_call_id",
                                        "only tool messages carry a tool_call_id")

    def to_template(self) -> dict[str, Any]:
        """The dict a chat template reads; ``developer`` is OpenAI's new name for system."""
        text = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content or [])
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": text}
        if self.name:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [_template_call(call) for call in self.tool_calls]
        return message


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as chat templates read it: most (Qwen, Llama) render ``arguments`` with
    ``tojson`` and expect an object, so a JSON-text argument is parsed (as vLLM does)."""
    import json
    if not isinstance(call.get("function"), dict):
        return call   # the template decides (its error is a 400)
    function = dict(call["function"])
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass
    return {**call, "function": function}


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a 'json_schema' object")
        return self

    def constraint(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            schema = self.json_schema.schema_
            return StructuredOutputsParams(json=schema if schema is not None else {"type": "object"})
        return None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def check_supported(self) -> None:
        super().check_supported()
        for index, message in enumerate(self.messages):
            message.check_supported(index)
        if self.modalities and self.modalities != ["text"]:
            raise UnsupportedFieldError("modalities", "only the 'text' modality is supported")

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, str]]:
        return [m.to_template() for m in self.messages]

    def tool_mode(self) -> ToolMode:
        """none | auto | required | named (``ValueError`` when tools and choice disagree)."""
        return tool_mode(self.tools, self.tool_choice)

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template shows the model (none for ``tool_choice: none``)."""
        return self.tools if self.tools and self.tool_mode().kind != "none" else None

    def constraint(self) -> StructuredOutputsParams | None:
        """One constraint at most: a required / named tool choice, ``response_format``, or
        the ``structured_outputs`` extension."""
        found = [c for c in (tool_constraint(self.tools or [], self.tool_mode(),
                                             self.parallel_tool_calls),
                             self.response_format.constraint() if self.response_format else None,
                             super().constraint()) if c is not None]
        if len(found) > 1:
            raise ValueError("give one constraint at most: a required or named tool_choice, "
                             "response_format, or structured_outputs")
        return found[0] if found else None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def check_supported(self) -> None:
        for index, message in enumerate(self.messages or []):
            message.check_supported(index)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


# ---------------------------------------------------------------------------- responses
# Published in /openapi.json (the handlers build their bodies as plain dicts).
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every failure of every route answers with."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int
    quant_type: str = "none"     # weight format (ferry extension): none, gptq_int4, fp8, ...
    parent: str | None = None      # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok", "draining", "error"]
    reason: str | None = None


class VersionResponse(BaseModel):
    version: str


class LoadLoRAAdapterRequest(_Strict):
    """``POST /v1/load_lora_adapter``: ``lora_path`` is inside ``lora_adapters_dir`` (or a
    ``--lora-modules`` path); ``load_inplace`` replaces a loaded adapter of that name."""

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None    # accepted for vLLM clients; the name decides


class LoRAAdapterResponse(BaseModel):
    object: Literal["lora_adapter"] = "lora_adapter"
    id: str
    status: Literal["loaded", "reloaded", "unloaded"]
    in_flight: int = 0             # unload: requests still finishing on it
