"""StepPlan: the requests one step schedules and what of the step's limits is left.

The scheduler fills it in phases (decodes and short prefills of running requests, fast-lane
admissions, long prefill chunks, other admissions) and may take an entry back out when it
preempts a request it had already planned. Pure Python.
"""
from __future__ import annotations

from ferry.request import Request


class StepPlan:
    """Entries ``request -> tokens`` in the order added, the token budget left and the
    number of prefills (entries of more than one token), capped by ``prefill_parallelism``."""

    def __init__(self, budget: int, prefill_parallelism: int, prefill_budget: int | None = None
                 ) -> None:
        self.budget = budget
        self.prefill_parallelism = prefill_parallelism
        # Tokens prefills may take in all (the thermal guard lowers it); decodes are exempt.
        self.prefill_budget = budget if prefill_budget is None else prefill_budget
        self.num_prefills = 0
        self.long_prefill_tokens = 0   # tokens of long (beyond the fast lane) prefills
        self._entries: dict[Request, tuple[int, bool, bool]] = {}

    def __contains__(self, request: Request) -> bool:
        return request in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[Request, int]]:
        return [(request, n) for request, (n, _, _) in self._entries.items()]

    def can_prefill(self) -> bool:
        return self.num_prefills < self.prefill_parallelism and self.prefill_budget > 0

    def tokens_for(self, remaining: int, is_prefill: bool) -> int:
        """How many of ``remaining`` tokens fit in what is left of the step."""
        cap = min(self.budget, self.prefill_budget) if is_prefill else self.budget
        return max(0, min(remaining, cap))

    def add(self, request: Request, num_tokens: int, is_prefill: bool,
            is_long: bool = False) -> None:
        self._entries[request] = (num_tokens, is_prefill, is_long)
        self.budget -= num_tokens
        self.long_prefill_tokens += num_tokens if is_long else 0
        if is_prefill:
            self.num_prefills += 1
            self.prefill_budget -= num_tokens

    def remove(self, request: Request) -> None:
        """Take a planned request back out (it was preempted); its share returns."""
        num_tokens, is_prefill, is_long = self._entries.pop(request)
        self.budget += num_tokens
        self.long_prefill_tokens -= num_tokens if is_long else 0
        if is_prefill:
            self.num_prefills -= 1
            self.prefill_budget += num_tokens
