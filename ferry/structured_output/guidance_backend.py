"""The llguidance backend: Earley-parser masks, strict about JSON-schema features (an
unsupported keyword is an error, not ignored). ``grammar`` constraints are Lark."""
from __future__ import annotations

from typing import Any

import numpy as np

from ferry.sampling_params import StructuredOutputsParams
from ferry.structured_output.backend import (GrammarError, check_accepts_something,
                                             choice_regex, close_objects, schema_of)


class _Matcher:
    def __init__(self, matcher: Any, fill: Any, stop_ids: frozenset[int]) -> None:
        self._m, self._fill, self._stop_ids = matcher, fill, stop_ids
        self._ended = False   # a stop token was accepted (llguidance's "stopped" is earlier)

    def accept_token(self, token_id: int) -> bool:
        # consume_token of a forbidden token puts llguidance in a permanent error state;
        # try_consume_tokens leaves the state unchanged instead (the interface's promise).
        if token_id in self._stop_ids:
            ok = self._m.is_accepting() and bool(self._m.consume_token(token_id))
        else:
            ok = self._m.try_consume_tokens([token_id]) == 1
        self._ended = self._ended or (ok and token_id in self._stop_ids)
        return ok

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)
        if num_tokens > 0:
            self._ended = False   # a stop token is always the last one accepted

    def fill_bitmask(self, bitmask: np.ndarray, index: int) -> None:
        self._fill(self._m, bitmask, index)

    def is_terminated(self) -> bool:
        return self._ended


class _Compiled:
    def __init__(self, llg: Any, tokenizer: Any, grammar: str, fill: Any,
                 stop_ids: frozenset[int]) -> None:
        self._llg, self._tokenizer, self._grammar, self._fill = llg, tokenizer, grammar, fill
        self._stop_ids = stop_ids

    def matcher(self) -> _Matcher:
        return _Matcher(self._llg.LLMatcher(self._tokenizer, self._grammar), self._fill,
                        self._stop_ids)


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
        self._llg = llguidance
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._fill_par = llguidance.numpy.fill_next_token_bitmask_par
        self._executor = None   # made on first use
        self.vocab_size = vocab_size
        eos = list(stop_token_ids) or None
        self._stop_ids = frozenset(stop_token_ids)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=eos)

    def fill_batch(self, matchers: list[_Matcher], bitmask: np.ndarray) -> None:
        """Row ``i`` of ``bitmask`` for ``matchers[i]``, computed in parallel by llguidance's
        thread pool (without the GIL): one call per step instead of one per request."""
        if self._executor is None:
            self._executor = self._llg.LLExecutor()
        self._fill_par(self._executor, [(m._m, i) for i, m in enumerate(matchers)], bitmask)

    def compile(self, spec: StructuredOutputsParams) -> _Compiled:
        matcher_cls = self._llg.LLMatcher
        kind = spec.kind
        if kind == "json":
            grammar = matcher_cls.grammar_from_json_schema(
                close_objects(schema_of(spec)), defaults={"whitespace_flexible": False})
        elif kind == "json_object":
            grammar = matcher_cls.grammar_from_json_schema(
                {"type": "object"}, defaults={"whitespace_flexible": False})
        elif kind == "regex":
            grammar = matcher_cls.grammar_from_regex(spec.regex)
        elif kind == "choice":
            grammar = matcher_cls.grammar_from_regex(choice_regex(spec.choice))
        else:
            grammar = matcher_cls.grammar_from_lark(self._lark(spec.grammar))
        is_error, messages = matcher_cls.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise GrammarError(f"invalid {kind} constraint: {messages[0] if messages else '?'}")
        compiled = _Compiled(self._llg, self._tokenizer, grammar, self._fill, self._stop_ids)
        check_accepts_something(compiled, self.vocab_size, self._stop_ids)
        return compiled

    @staticmethod
    def _lark(text: str) -> str:
        """Lark as given; EBNF / GBNF (``root ::= ...``, xgrammar's syntax) converted."""
        from llguidance.gbnf_to_lark import any_to_lark
        try:
            return any_to_lark(text)
        except Exception as exc:  # noqa: BLE001 - the converter's parse errors
            raise GrammarError(f"invalid grammar constraint: {exc}") from None
