"""SamplingParams: how one request's tokens are chosen, validated once at construction."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

_GREEDY_EPS = 1e-5
_CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object")


class RequestOutputKind(enum.Enum):
    """What each of a request's ``RequestOutput``s holds (vLLM's names and meaning).

    ``CUMULATIVE``: everything so far (text, token ids, logprobs), every step it advances.
    ``DELTA``: only what is new since its previous output, so building one costs what
    changed, not the output's length (the server's streams); the concatenation of a
    completion's deltas is its cumulative output. ``FINAL_ONLY``: one cumulative output,
    when it finishes.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One output constraint (vLLM's ``structured_outputs``): exactly one of ``json`` (a
    JSON schema, dict or string), ``regex``, ``choice`` (a list of strings), ``grammar``
    (EBNF / GBNF, or Lark for the guidance backend) or ``json_object=True`` (any JSON object).
    Plain data: the engine compiles it with its structured-output backend."""

    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [k for k in _CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, "
                             f"grammar or json_object, got {given or 'none'}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured_outputs.json must be a JSON schema (object or string)")

    @property
    def kind(self) -> str:
        return next(k for k in _CONSTRAINT_KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A hashable canonical form: the compile cache's key (with the tokenizer)."""
        value: Any = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("structured_outputs.json is not valid JSON") from None
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return self.kind, text

    @classmethod
    def coerce(cls, value: "StructuredOutputsParams | dict | None") -> "StructuredOutputsParams | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(_CONSTRAINT_KINDS)
            if unknown:
                raise ValueError(f"structured_outputs has unknown keys {sorted(unknown)}; "
                                 f"allowed: {list(_CONSTRAINT_KINDS)}")
            return cls(**{k: v for k, v in value.items() if v is not None})
        raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict")


# ``priority`` is an int32: a sort key and a metrics label, never an unbounded number
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1


def check_priority(priority: object) -> None:
    """ValueError unless ``priority`` is an integer (not a bool) in [PRIORITY_MIN, PRIORITY_MAX]."""
    if (not isinstance(priority, int) or isinstance(priority, bool)
            or not PRIORITY_MIN <= priority <= PRIORITY_MAX):
        raise ValueError(f"priority must be an integer in [{PRIORITY_MIN}, {PRIORITY_MAX}], "
                         f"got {priority!r}")


@dataclass
class SamplingParams:
    """Per-request sampling settings (same names and meaning as vLLM's).

    Validation happens in ``__post_init__``: a bad value raises ``ValueError`` naming the field.
    ``priority``: a smaller value is served first (0 is the default).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    priority: int = 0
    debug_trace: bool = False   # an attention trace (needs the server's debug_trace: attention)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | dict | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k not in (0, -1)):
            bad("top_k", "must be -1 or 0 (disabled) or an integer >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", "must be in [0, max_tokens]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        check_priority(self.priority)
        if not isinstance(self.debug_trace, bool):
            bad("debug_trace", "must be true or false")
        if not isinstance(self.output_kind, RequestOutputKind):
            bad("output_kind", "must be a RequestOutputKind")
        if self.structured_outputs is not None and self.ignore_eos:
            # The grammar ends the output with EOS; nothing may follow it.
            bad("ignore_eos", "cannot be combined with structured_outputs")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1.0)

    @property
    def reads_output_tokens(self) -> bool:
        """True when a logits processor reads this request's output tokens on the host
        (penalties; a grammar, whose next mask depends on them). With async scheduling such a
        request is not scheduled again until its token in flight is known, except that a
        grammar alone waits only before sampling where the executor can defer it
        (``Engine._launch_before_mask``)."""
        return self.has_penalties or self.structured_outputs is not None

    def clone(self, **changes) -> "SamplingParams":
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        values.update(changes)
        return SamplingParams(**values)
