"""Prompt text of an exact token length, with the model's tokenizer or (without one) by words.

A benchmark that asks for 1024-token prompts should send 1024-token prompts. With the
tokenizer at hand we build text from whole-word vocabulary entries, re-encode it as the
server will (special tokens such as BOS included) and adjust until the count is exact.
Without a local tokenizer we use common English words and count them with the server's
``/tokenize`` route where it has one (still exact); otherwise one word stands for one token,
which is close for most BPE vocabularies but not exact, and the result says so.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

# Without a tokenizer: short common words that are one token in most BPE vocabularies.
_FALLBACK_WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be "
    "has had it or not but her they one all been their more when there can who so up out "
    "time new about some than them into only other its two may first then year also after "
    "made most over would such these state city many used later where him well between both"
).split()

_MAX_FIX_ROUNDS = 16


def load_tokenizer(name: str | None) -> tuple[Any | None, str]:
    """Load a tokenizer from a local dir or the local Hugging Face cache (never downloads).

    Returns ``(tokenizer or None, note)``; the note says why it could not be loaded.
    """
    if not name:
        return None, "no tokenizer given (--tokenizer, or --model as a local directory)"
    try:
        from transformers import AutoTokenizer

        local_only = not Path(name).is_dir()
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        return tok, f"tokenizer {name}"
    except Exception as exc:  # any failure means "approximate", never a crash
        return None, f"could not load tokenizer {name!r} ({type(exc).__name__})"


def count_tokens(tokenizer: Any | None, text: str) -> int:
    """Tokens of ``text`` without special tokens; by words when there is no tokenizer."""
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class PromptMaker:
    """Makes random prompt text of a requested token length.

    Lengths are counted with the local ``tokenizer`` when there is one, else with
    ``counter`` (the server's own count, e.g. its ``/tokenize`` route), else approximated
    by words; ``exact`` says whether they are real token counts. ``num_special`` is the
    number of tokens the tokenizer adds by itself (BOS), counted in a prompt's length
    because the server counts them too.
    """

    tokenizer: Any | None
    rng: random.Random
    counter: Callable[[str], int] | None = None

    def __post_init__(self) -> None:
        self.exact = self.tokenizer is not None or self.counter is not None
        if self.tokenizer is not None:
            self._word_ids = _whole_word_token_ids(self.tokenizer)
        self.num_special = self.length("") if self.exact else 0

    def length(self, text: str) -> int:
        """Token count of a prompt as the server sees it (special tokens included)."""
        if self.tokenizer is not None:
            return len(self.tokenizer(text, verbose=False)["input_ids"])
        if self.counter is not None:
            return self.counter(text)
        return len(text.split())

    def content_length(self, text: str) -> int:
        """Token count of ``text`` without the special tokens the tokenizer adds."""
        return self.length(text) - self.num_special if text else 0

    def words(self, num_tokens: int) -> str:
        """Text of ``num_tokens`` content tokens (no special tokens), e.g. a shared prefix;
        exact when lengths are counted, else one word per token."""
        if num_tokens <= 0:
            return ""
        if self.exact:
            return self.prompt(num_tokens + self.num_special)
        return self._text(self._pieces(num_tokens))

    def prompt(self, num_tokens: int, prefix: str = "") -> str:
        """``prefix`` + random text whose full encoding has ``num_tokens`` tokens.

        The count includes special tokens the tokenizer adds. Whole pieces (vocabulary words
        or plain words) are added or dropped until the count is right; if pieces never land
        on it (several tokens per word), the text is cut character by character. When even
        that cannot hit the count (a merge jumps over it) the closest text is returned.
        """
        if num_tokens < 1:
            raise ValueError(f"a prompt needs at least 1 token, got {num_tokens}")
        base = self.num_special + self.content_length(prefix)
        pieces = self._pieces(max(num_tokens - base, 0))
        best, best_error = "", None
        for _ in range(_MAX_FIX_ROUNDS):
            text = _join(prefix, self._text(pieces))
            error = self.length(text) - num_tokens
            if best_error is None or abs(error) < abs(best_error):
                best, best_error = text, error
            if error == 0:
                return text
            # Tokens per piece so far: words may be several tokens each.
            per_piece = max(1.0, (error + num_tokens - base) / max(len(pieces), 1))
            if error > 0:
                pieces = pieces[:max(len(pieces) - max(1, int(error / per_piece)), 0)]
            else:
                pieces += self._pieces(max(1, math.ceil(-error / per_piece)))
        over = best
        while self.length(over) < num_tokens:   # every piece adds at least one token
            over = _join(over, self._text(self._pieces(num_tokens - self.length(over))))
        return self._cut(prefix, over[len(prefix):], num_tokens) or best

    def _cut(self, prefix: str, suffix: str, num_tokens: int) -> str | None:
        """The longest ``prefix + suffix[:k]`` with exactly ``num_tokens`` tokens, if any
        (binary search: the count grows with k)."""
        low, high = 0, len(suffix)
        while low < high:
            mid = (low + high + 1) // 2
            if self.length(prefix + suffix[:mid]) <= num_tokens:
                low = mid
            else:
                high = mid - 1
        text = prefix + suffix[:low]
        return text if self.length(text) == num_tokens else None

    def _pieces(self, num: int) -> list:
        if self.tokenizer is not None:
            return [self.rng.choice(self._word_ids) for _ in range(num)]
        return [self.rng.choice(_FALLBACK_WORDS) for _ in range(num)]

    def _text(self, pieces: list) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(pieces)
        return " ".join(pieces)


class ServerTokenCounter:
    """Token counts from a server's ``POST /tokenize`` (ferry and vLLM: ``{"count": n}``).

    ``probe()`` says whether the server offers it; a failure later raises ``ValueError``.
    """

    def __init__(self, base_url: str, model: str, headers: dict[str, str],
                 timeout: float = 10.0) -> None:
        self.url, self.model, self.headers = f"{base_url}/tokenize", model, headers
        self.client = httpx.Client(timeout=timeout, trust_env=False)

    def __call__(self, text: str) -> int:
        try:
            resp = self.client.post(self.url, json={"model": self.model, "prompt": text},
                                    headers=self.headers)
            data = resp.json() if resp.status_code == 200 else {}
        except (httpx.HTTPError, ValueError) as exc:
            raise ValueError(f"the server's /tokenize failed: {exc}") from None
        count = data.get("count") if isinstance(data, dict) else None
        if not isinstance(count, int):
            tokens = data.get("tokens") if isinstance(data, dict) else None
            if not isinstance(tokens, list):
                raise ValueError(f"the server's /tokenize gave no count (HTTP {resp.status_code})")
            count = len(tokens)
        return count

    def probe(self) -> bool:
        try:
            return self("hello world") >= 1
        except ValueError:
            return False

    def close(self) -> None:
        self.client.close()


def _join(prefix: str, suffix: str) -> str:
    if not prefix:
        return suffix
    if not suffix:
        return prefix
    # Whole-word tokens carry their own leading space in most vocabularies.
    return prefix + suffix if suffix[0].isspace() else prefix + " " + suffix


def _whole_word_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of whole words with their leading space ('Ġword', '▁word'): they do not merge
    with their neighbours, so a sequence of them re-encodes to itself.

    Falls back to every non-special id when the vocabulary has no such entries.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words = [i for i, piece in zip(ids, pieces)
             if isinstance(piece, str) and len(piece) >= 3 and piece[0] in "Ġ▁ "
             and piece[1:].isascii() and piece[1:].isalpha()]
    return words if len(words) >= 16 else ids
