"""The xgrammar backend: token bitmasks from a compiled grammar, with rollback.

xgrammar compiles a JSON schema leniently: a keyword it does not enforce is ignored, which
would be a constraint silently not honoured. ``unsupported_keyword`` refuses those first.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from ferry.sampling_params import StructuredOutputsParams
from ferry.structured_output.backend import (GrammarError, check_accepts_something,
                                             choice_regex, schema_of)

# JSON-schema keywords that change which values are valid but that xgrammar ignores.
_UNENFORCED = ("not", "if", "then", "else", "dependentSchemas", "dependentRequired",
               "unevaluatedProperties", "unevaluatedItems", "propertyNames", "contains",
               "minContains", "maxContains", "uniqueItems", "multipleOf", "patternProperties",
               "minProperties", "maxProperties")
# Keys whose value maps names (not keywords) to schemas.
_NAME_MAPS = ("properties", "$defs", "definitions", "dependentSchemas", "patternProperties")


def unsupported_keyword(schema: Any, path: str = "") -> str | None:
    """The JSON path of the first keyword of ``schema`` the backend would not enforce."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            found = unsupported_keyword(item, f"{path}/{i}")
            if found:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key in _UNENFORCED:
            return where
        if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
            return f"{where} (only local '#/...' references)"
        children = ([(f"{where}/{name}", child) for name, child in value.items()]
                    if key in _NAME_MAPS and isinstance(value, dict) else [(where, value)])
        for child_path, child in children:
            found = unsupported_keyword(child, child_path)
            if found:
                return found
    return None


def length_as_pattern(schema: Any) -> Any:
    """``schema`` with string ``minLength``/``maxLength`` written as ``pattern: ^.{m,n}$``.

    xgrammar 0.2's grammar for a length-bounded string lets raw control characters
    (U+0000-U+001F) through, which is not JSON; its pattern grammar escapes them properly.
    The two say the same (both count code points). A string with a pattern keeps both.
    """
    if isinstance(schema, list):
        return [length_as_pattern(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: length_as_pattern(value) for key, value in schema.items()}
    if ("minLength" in out or "maxLength" in out) and "pattern" not in out \
            and "format" not in out and out.get("type") in ("string", None):
        low, high = out.pop("minLength", 0), out.pop("maxLength", None)
        out["pattern"] = f"^.{{{low},{'' if high is None else high}}}$"
    return out


class _Matcher:
    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def fill_bitmask(self, bitmask: np.ndarray, index: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, index)

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())


class _Compiled:
    def __init__(self, xgr: Any, grammar: Any) -> None:
        self._xgr, self._grammar = xgr, grammar

    def matcher(self) -> _Matcher:
        return _Matcher(self._xgr.GrammarMatcher(self._grammar))


class XGrammarBackend:
    """``tokenizer``: a Hugging Face tokenizer; ``vocab_size``: the model's logits width
    (may exceed the tokenizer's); ``stop_token_ids``: the ids that end a request."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr
        self._xgr = xgr
        self.vocab_size = vocab_size
        self._stop_ids = frozenset(stop_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile(self, spec: StructuredOutputsParams) -> _Compiled:
        try:
            grammar = self._compile(spec)
        except GrammarError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError with its reason
            raise GrammarError(f"invalid {spec.kind} constraint: {_reason(exc)}") from None
        compiled = _Compiled(self._xgr, grammar)
        check_accepts_something(compiled, self.vocab_size, self._stop_ids)
        return compiled

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        kind = spec.kind
        if kind == "json":
            schema = schema_of(spec)
            where = unsupported_keyword(schema)
            if where:
                raise GrammarError(f"the JSON schema uses {where}, which the xgrammar backend "
                                   "cannot enforce; drop it or use structured_output_backend="
                                   "guidance")
            return self._compiler.compile_json_schema(json.dumps(length_as_pattern(schema)),
                                                      any_whitespace=False)
        if kind == "json_object":
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return self._compiler.compile_regex(spec.regex)
        if kind == "choice":
            return self._compiler.compile_regex(choice_regex(spec.choice))
        return self._compiler.compile_grammar(spec.grammar)


def _reason(exc: Exception) -> str:
    # "[05:01:15] /project/cpp/x.cc:94: Regex parsing error ..." -> the part after the source.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    head, sep, tail = text.partition(".cc:")
    return tail.split(": ", 1)[-1] if sep else text
