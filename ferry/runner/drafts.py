"""Draft-token proposers: the seam speculative decoding plugs into.

After a synchronous step the runner asks its proposer for the next drafts of each request
that sampled; the scheduler sends them back to be verified in the request's next step
(``ScheduledRequest.spec_token_ids``), and the runner keeps those the model agrees with.
"""
from __future__ import annotations

from typing import Protocol


class DraftProposer(Protocol):
    def propose(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> list[int]:
        """Draft tokens to follow ``token_ids`` (the request's prompt and every verified
        output so far); [] for none. It may propose any number: the scheduler schedules
        as many as the budget, the context and ``max_tokens`` allow."""
