"""The interface every structured-output backend implements, and what they share.

A ``GrammarBackend`` compiles a ``StructuredOutputsParams`` for one tokenizer into a
``CompiledGrammar``; ``matcher()`` gives a fresh ``GrammarMatcher`` per request. Bitmasks
are numpy ``int32`` rows of ``ceil(vocab / 32)`` words: bit ``t % 32`` of word ``t // 32``
set means token ``t`` is allowed (the layout both libraries use).
"""
from __future__ import annotations

import json
from typing import Any, Protocol

import numpy as np

from ferry.sampling_params import StructuredOutputsParams


class GrammarError(ValueError):
    """The constraint cannot be honoured (bad syntax, unsupported feature, accepts nothing);
    the message names the problem and is shown to the user (a 400)."""


class GrammarMatcher(Protocol):
    """One request's position in its grammar."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) when the grammar forbids it."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""

    def fill_bitmask(self, bitmask: np.ndarray, index: int) -> None:
        """Write the allowed next tokens into row ``index`` of ``bitmask`` (K, W) int32;
        the stop tokens are allowed only where the grammar may end."""

    def is_terminated(self) -> bool:
        """True once the grammar accepted a stop token (nothing more may follow)."""


class CompiledGrammar(Protocol):
    def matcher(self) -> GrammarMatcher: ...


class GrammarBackend(Protocol):
    name: str
    vocab_size: int

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Compile ``spec``; raises ``GrammarError`` naming the problem."""


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def schema_of(spec: StructuredOutputsParams) -> dict:
    """The JSON schema of a ``json`` constraint as a dict (``GrammarError`` if not JSON)."""
    value: Any = spec.json
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(value, (dict, bool)):
        raise GrammarError("a JSON schema must be an object")
    return value


def close_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists
    ``properties`` and says nothing about others. OpenAI's structured outputs require it
    (strict mode) and xgrammar assumes it; without it a model may add keys forever.
    """
    if isinstance(schema, list):
        return [close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: close_objects(child) for name, child in value.items()}
        else:
            out[key] = close_objects(value)
    if "properties" in out and "additionalProperties" not in out \
            and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def choice_regex(choices: tuple[str, ...]) -> str:
    """A regex that matches exactly one of ``choices`` (each escaped)."""
    return "(" + "|".join(_escape_regex(c) for c in choices) + ")"


def _escape_regex(text: str) -> str:
    # Both backends read ECMAScript-style regexes: escape every metacharacter.
    return "".join("\\" + ch if ch in r"\^$.|?*+()[]{}/-" else ch for ch in text)


def check_accepts_something(compiled: CompiledGrammar, vocab_size: int,
                            stop_token_ids: frozenset[int] | set[int] = frozenset()) -> None:
    """``GrammarError`` when no first token, or only a stop token, is allowed: no output
    (or only the empty one) satisfies the constraint, which is surely a mistake."""
    bitmask = np.zeros((1, bitmask_width(vocab_size)), dtype=np.int32)
    compiled.matcher().fill_bitmask(bitmask, 0)
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab_size]
    allowed = set(np.flatnonzero(bits).tolist())
    if not allowed - set(stop_token_ids):
        raise GrammarError("the constraint accepts no output at all (an empty grammar, or a "
                           "schema no value satisfies)" if not allowed else
                           "the constraint accepts only the empty output (an empty grammar?)")
