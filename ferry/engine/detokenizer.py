"""Incremental detokenizer: generated ids -> text that is safe to show, with stop strings.

Decoding the whole sequence every step costs O(length) per token, so only a small window
is decoded (the prefix/read offset technique of HF text-generation-inference and vLLM):

* ``tokens[prefix_offset:read_offset]`` is text already emitted, decoded again only as
  context, and ``tokens[prefix_offset:]`` is the same plus the pending tokens. The new
  text is the difference of the two decodes. Context matters: SentencePiece decoders
  drop the leading space of the first token of what they decode, and byte-level BPE
  needs earlier bytes to form a character.
* When the longer decode ends with ``'\\ufffd'`` the pending tokens stop in the middle of
  a multi-byte character: nothing is emitted until a later token completes it.
* The window starts on the last few prompt tokens, so the first output token's leading
  space is right.

Stop strings are searched only in the new text plus the held-back tail before it. While
the request runs, a tail of the text that could still grow into a stop string is held
back, so shown text is never taken back. Shown text is kept as the pieces each update
released: ``take_new_text`` hands out the pieces since its last call (a DELTA output), so
no step copies or searches the text that came before; ``output_text`` joins them (a
cumulative output).

A completion nobody watches token by token (``stream=False``) and that has no stop
string to look for is decoded once, when it finishes: the same text, without a decode
per token.
"""
from __future__ import annotations

from typing import Any, Callable

from ferry.sampling_params import SamplingParams

# Prompt tokens decoded as context before the first output token (as vLLM).
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of one completion, built token by token.

    ``tokenizer`` is anything with ``decode(ids, skip_special_tokens=...)``: a
    ``transformers`` tokenizer or a ``tokenizers.Tokenizer``.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams,
                 stream: bool = True):
        self._decode_ids = fast_decoder(tokenizer)
        self._skip_special_tokens = params.skip_special_tokens
        self._stops: list[str] = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._num_context = len(context)
        self._window_ids: list[int] = context    # context + every generated id
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._shown: list[str] = []   # released text, a piece per update that released some
        self._num_taken = 0           # pieces take_new_text handed out
        self._joined = ""             # the first _num_joined pieces, joined (output_text)
        self._num_joined = 0
        self._held = ""               # tail that may still become a stop string (< longest)
        self._finished = False
        self._incremental = stream or bool(self._stops)

    # ------------------------------------------------------------ public interface
    @property
    def token_ids(self) -> list[int]:
        """Generated ids fed so far (prompt excluded)."""
        return self._window_ids[self._num_context:]

    @property
    def output_text(self) -> str:
        """Text safe to show: no broken character, no tail that may become a stop string."""
        if self._num_joined < len(self._shown):
            self._joined += "".join(self._shown[self._num_joined:])
            self._num_joined = len(self._shown)
        return self._joined

    def take_new_text(self) -> str:
        """The shown text released since the last call (all of it on the first)."""
        new = "".join(self._shown[self._num_taken:])
        self._num_taken = len(self._shown)
        return new

    @property
    def finished(self) -> bool:
        return self._finished

    def update(self, new_token_ids: list[int]) -> str | None:
        """Feed generated ids; return the stop string if one now appears in the text.

        On a stop string the text is trimmed just before it (just after it with
        ``include_stop_str_in_output``) and the detokenizer is finished.
        Raises ``RuntimeError`` when called after it finished.
        """
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.update called after the text finished "
                               "(stop string found or finish() called)")
        self._window_ids.extend(new_token_ids)
        if not new_token_ids or not self._incremental:
            return None
        return self._append(self._decode_pending(final=False))

    def finish(self) -> None:
        """The request ended for another reason (EOS, length, abort): release held text.

        Pending tokens are flushed as far as they decode to whole characters; an
        incomplete character at the very end is dropped. Idempotent.
        """
        if self._finished:
            return
        self._append(self._decode_pending(final=True))
        self._release(self._held)
        self._held = ""
        self._finished = True

    # ------------------------------------------------------------ decoding
    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, self._skip_special_tokens)

    def _decode_pending(self, final: bool) -> str:
        """New text of the tokens past ``read_offset``, or "" while a character is split."""
        ids = self._window_ids
        emitted = self._decode(ids[self._prefix_offset:self._read_offset])
        extended = self._decode(ids[self._prefix_offset:])
        if extended.endswith(_REPLACEMENT_CHAR):
            if not final:
                return ""
            extended = extended.rstrip(_REPLACEMENT_CHAR)
        if len(extended) <= len(emitted):
            return ""
        # Next window: the tokens just emitted become the context of the next ones.
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return extended[len(emitted):]

    # ------------------------------------------------------------ stop strings
    def _append(self, delta: str) -> str | None:
        """Add new text, look for a stop string, and release what may be shown.

        A stop string completed by ``delta`` starts inside the held-back tail or in
        ``delta`` (a match starting earlier would have made its start part of the tail),
        so only those two are searched.
        """
        if not delta:
            return None
        candidate = self._held + delta
        if not self._stops:
            self._release(candidate)
            return None
        found = self._find_stop(candidate)
        if found is not None:
            index, stop = found
            self._release(candidate[:index + len(stop) if self._include_stop else index])
            self._held = ""
            self._finished = True
            return stop
        keep = len(candidate) - self._held_back_length(candidate)
        self._release(candidate[:keep])
        self._held = candidate[keep:]
        return None

    def _release(self, text: str) -> None:
        if text:
            self._shown.append(text)

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The earliest stop string in ``text``: (its index, the stop string)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = text.find(stop)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _held_back_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string.

        Any later match must start inside that tail, so it is all that needs hiding. The
        tail never reaches before ``text`` (held tail + new text): shown text ends in no
        such prefix, or it would have been held.
        """
        for length in range(min(self._longest_stop - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0


def fast_decoder(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """``decode(ids, skip_special_tokens)`` for the tokenizer.

    A fast ``transformers`` tokenizer's own ``decode`` adds several Python layers around
    its Rust ``backend_tokenizer``; called twice per generated token they cost more than
    the decoding. Where the wrapper would not change the text (no
    ``clean_up_tokenization_spaces``), the backend is called directly.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)
