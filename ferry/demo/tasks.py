"""Synthetic, checkable tasks the bundled demo model is trained on.

Every problem has exactly one right answer, so an end-to-end run of the
engine can be scored: the same accuracy must hold with or without batching,
prefix caching or preemption.

Task kinds:
  - ``add``:     "What is 48+76?"        -> "124"      (operands 0..99)
  - ``reverse``: "Reverse: kitchen"      -> "nehctik"  (3..8 lowercase letters)
  - ``upper``:   "Uppercase: kitchen"    -> "KITCHEN"  (3..8 lowercase letters)

The train and test ("held-out") splits are decided by a hash of the problem
itself, not by the random generator, so no seed can ever leak a test problem
into training.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, field
from typing import Callable

TASK_KINDS: tuple[str, ...] = ("add", "reverse", "upper")
SPLITS: tuple[str, ...] = ("train", "test")

# Two-digit operands: a 3M-parameter model learns them in minutes on a CPU;
# three-digit sums (answer written most significant digit first) need far
# more training (see docs/demo_model.md).
MAX_OPERAND = 99
MIN_WORD_LEN = 3
MAX_WORD_LEN = 8

# One problem in TEST_BUCKETS out of HASH_BUCKETS is held out.
HASH_BUCKETS = 10
TEST_BUCKETS = 1


@dataclass(frozen=True)
class Problem:
    """One task instance: a chat with a single user message and its answer."""

    kind: str
    question: str
    answer: str
    messages: list[dict[str, str]] = field(compare=False, hash=False)


def _draw_add(rng: random.Random) -> tuple[str, str]:
    # Draw the number of digits first so short operands are not vanishingly rare.
    a = _draw_operand(rng)
    b = _draw_operand(rng)
    return f"What is {a}+{b}?", str(a + b)


def _draw_operand(rng: random.Random) -> int:
    num_digits = rng.randint(1, len(str(MAX_OPERAND)))
    low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
    return rng.randint(low, min(10**num_digits - 1, MAX_OPERAND))


def _draw_word(rng: random.Random) -> str:
    length = rng.randint(MIN_WORD_LEN, MAX_WORD_LEN)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def _draw_reverse(rng: random.Random) -> tuple[str, str]:
    word = _draw_word(rng)
    return f"Reverse: {word}", word[::-1]


def _draw_upper(rng: random.Random) -> tuple[str, str]:
    word = _draw_word(rng)
    return f"Uppercase: {word}", word.upper()


_DRAWERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _draw_add,
    "reverse": _draw_reverse,
    "upper": _draw_upper,
}


def split_of(question: str) -> str:
    """Return the split ("train" or "test") a question belongs to (hash based)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % HASH_BUCKETS
    return "test" if bucket < TEST_BUCKETS else "train"


def make_problem(kind: str, question: str, answer: str) -> Problem:
    """Build a Problem whose chat is one user message holding the question."""
    return Problem(kind, question, answer, [{"role": "user", "content": question}])


def make_problems(
    n: int, seed: int, split: str, kinds: tuple[str, ...] | list[str] = TASK_KINDS
) -> list[Problem]:
    """Return ``n`` problems of ``split``, the same list for the same arguments.

    Kinds are assigned round-robin (problem ``i`` has kind ``kinds[i % len]``),
    so any prefix of the list is balanced across kinds. Problems may repeat
    within a split (the train split is sampled with replacement).
    """
    _check_args(n, split, kinds)
    # A string seed is hashed deterministically by random.Random (not PYTHONHASHSEED).
    rng = random.Random(f"ferry-demo/{seed}/{split}")
    problems = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        question, answer = _draw_in_split(rng, kind, split)
        problems.append(make_problem(kind, question, answer))
    return problems


def _draw_in_split(rng: random.Random, kind: str, split: str) -> tuple[str, str]:
    # Rejection sampling: about 1 draw in HASH_BUCKETS lands in the test split.
    while True:
        question, answer = _DRAWERS[kind](rng)
        if split_of(question) == split:
            return question, answer


def _check_args(n: int, split: str, kinds: tuple[str, ...] | list[str]) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if len(kinds) == 0:
        raise ValueError(f"kinds must name at least one of {TASK_KINDS}")
    unknown = [k for k in kinds if k not in _DRAWERS]
    if unknown:
        raise ValueError(f"unknown task kinds {unknown}; choose from {TASK_KINDS}")


def check(problem: Problem, completion_text: str) -> bool:
    """True when the completion, stripped of surrounding whitespace, is the answer."""
    return completion_text.strip() == problem.answer


def accuracy_by_kind(problems: list[Problem], completions: list[str]) -> dict[str, float]:
    """Share of correct completions per task kind, plus ``"all"``."""
    if len(problems) != len(completions):
        raise ValueError(
            f"got {len(completions)} completions for {len(problems)} problems"
        )
    totals: dict[str, list[int]] = {}
    for problem, text in zip(problems, completions):
        ok = int(check(problem, text))
        for key in (problem.kind, "all"):
            totals.setdefault(key, [0, 0])
            totals[key][0] += ok
            totals[key][1] += 1
    return {key: right / count for key, (right, count) in totals.items()}
