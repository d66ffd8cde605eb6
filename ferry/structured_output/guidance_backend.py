"""The llguidance backend: Earley-parser masks, strict about JSON-schema features (an
unsupported keyword is an error, not ignored). ``grammar`` constraints are Lark."""
from __future__ import annotations

from typing import Any

import numpy as np

from ferry.sampling_params import StructuredOutputsParams
from ferry.structured_output.backend import (GrammarError, check_accepts_something,
                                             choice_regex, schema_of)


class _Matcher:
    def __init__(self, matcher: Any, fill: Any) -> None:
        self._m, self._fill = matcher, fill

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.consume_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def fill_bitmask(self, bitmask: np.ndarray, index: int) -> None:
        self._fill(self._m, bitmask, index)

    def is_terminated(self) -> bool:
        return bool(self._m.is_stopped())


class _Compiled:
    def __init__(self, llg: Any, tokenizer: Any, grammar: str, fill: Any) -> None:
        self._llg, self._tokenizer, self._grammar, self._fill = llg, tokenizer, grammar, fill

    def matcher(self) -> _Matcher:
        return _Matcher(self._llg.LLMatcher(self._tokenizer, self._grammar), self._fill)


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
        self._llg = llguidance
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self.vocab_size = vocab_size
        eos = list(stop_token_ids) or None
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=eos)

    def compile(self, spec: StructuredOutputsParams) -> _Compiled:
        matcher_cls = self._llg.LLMatcher
        kind = spec.kind
        if kind == "json":
            grammar = matcher_cls.grammar_from_json_schema(
                schema_of(spec), defaults={"whitespace_flexible": False})
        elif kind == "json_object":
            grammar = matcher_cls.grammar_from_json_schema(
                {"type": "object"}, defaults={"whitespace_flexible": False})
        elif kind == "regex":
            grammar = matcher_cls.grammar_from_regex(spec.regex)
        elif kind == "choice":
            grammar = matcher_cls.grammar_from_regex(choice_regex(spec.choice))
        else:
            grammar = matcher_cls.grammar_from_lark(spec.grammar)
        is_error, messages = matcher_cls.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise GrammarError(f"invalid {kind} constraint: {messages[0] if messages else '?'}")
        compiled = _Compiled(self._llg, self._tokenizer, grammar, self._fill)
        check_accepts_something(compiled, self.vocab_size)
        return compiled
