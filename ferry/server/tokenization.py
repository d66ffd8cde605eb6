"""Prompts to token ids off the engine thread, with a length bound checked before tokenizing.

Tokenizing a long prompt on the engine's thread stalls every request's steps for as long as
it takes (a 20 MB prompt: 37 s). Here it runs on a small pool of worker threads, each with
its own copy of the tokenizer (a fast tokenizer used from two threads at once can fail with
"Already borrowed"); the HF fast tokenizer releases the GIL while it encodes, so the engine
thread keeps stepping. The engine then receives token ids.

Before any of that, a prompt is refused by its length in characters alone: no token covers
more characters than the longest token of the vocabulary, so a prompt longer than
``max_model_len`` times that many characters cannot fit in the context, and tokenizing it
would be wasted work (exact for byte-level BPE and SentencePiece vocabularies, whose
tokens keep every character of the text).
"""
from __future__ import annotations

import asyncio
import copy
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ferry.engine.engine import apply_chat_template
from ferry.server.body_parsing import context_length_error

T = TypeVar("T")
DEFAULT_WORKERS = 2


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters any one vocabulary entry stands for (at least 1).

    The vocabulary's strings are an upper bound of the text a token decodes to: a
    byte-level BPE entry has one character per byte (the text has at most as many), a
    SentencePiece entry is its text, and an added token (``<|im_start|>``) is its text.
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: no bound
        return 0
    return max((len(token) for token in vocab), default=0)


class PromptTokenizer:
    """Encodes prompts and chat messages on ``workers`` threads; refuses what cannot fit.

    ``max_prompt_chars`` is 0 when the tokenizer has no readable vocabulary (no check).
    """

    def __init__(self, tokenizer: Any, max_model_len: int, model_name: str,
                 workers: int = DEFAULT_WORKERS) -> None:
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.max_prompt_chars = max_model_len * longest_token_chars(tokenizer)
        # One copy per worker, handed out per job, so no copy is ever used by two threads.
        self._copies: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(workers):
            self._copies.put(copy.deepcopy(tokenizer))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ferry-tokenize")

    def check_length(self, num_chars: int, param: str) -> None:
        """400 when ``num_chars`` of text cannot fit in the context, whatever its tokens."""
        error = context_length_error(self.max_model_len, self.max_prompt_chars, num_chars, param)
        if error is not None:
            raise error

    async def encode(self, text: str) -> list[int]:
        """``text``'s token ids (as the engine would encode it), after the length check."""
        self.check_length(len(text), "prompt")
        return await self._run(lambda tokenizer: list(tokenizer.encode(text)))

    async def encode_chat(self, messages: list[dict[str, str]],
                          add_generation_prompt: bool = True,
                          tools: list[dict] | None = None) -> list[int]:
        """The chat template's token ids; ``ValueError`` when it does not apply. The content
        is a lower bound of the templated text, so it is checked before templating."""
        self.check_length(sum(len(m.get("content") or "") for m in messages), "messages")
        return await self._run(lambda tokenizer: apply_chat_template(
            tokenizer, messages, add_generation_prompt, self.model_name, tools))

    async def _run(self, fn: Callable[[Any], T]) -> T:
        def job() -> T:
            tokenizer = self._copies.get()
            try:
                return fn(tokenizer)
            finally:
                self._copies.put(tokenizer)

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
