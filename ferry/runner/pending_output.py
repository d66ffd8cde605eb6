"""A step's sampled tokens on their way from the device to the host.

``ModelRunner.launch`` returns a ``PendingOutput`` as soon as the step's work is queued on
the device; ``result()`` waits for the tokens. Meanwhile the engine can schedule the next
step (async scheduling). On the CPU the step is already done when ``launch`` returns.

A request that verified draft tokens sampled one row per draft plus one: ``result()``
keeps the drafts that equal the token sampled before them and the token after the last
match. With greedy rows that is exactly greedy decoding; with random rows every kept
token is still a draw from the model given the tokens before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.outputs import RunnerOutput, TokenLogprobs
from ferry.platform import record_event


@dataclass
class SampledRequest:
    """Which rows of a step's samples are one request's, and the drafts they verify."""

    request_id: str
    num_rows: int
    draft_token_ids: list[int]


class PendingOutput:
    def __init__(self, requests: list[SampledRequest] | None = None,
                 tokens: torch.Tensor | None = None,
                 logprobs: list[TokenLogprobs | None] | None = None) -> None:
        """``tokens``: (R,) int64, the requests' rows in order; None for a step that sampled
        nothing or whose sampling waits (``set_tokens`` gives them then). The copy to the
        host starts now, behind the step's kernels."""
        self._requests = requests or []
        self.attention_traces: dict[str, list[dict]] = {}   # set by the runner when traced
        self.deferred = None   # the runner's DeferredSampling while the sampling waits
        self._host_tokens = None
        self._copied = None
        self.set_tokens(tokens, logprobs)

    def set_tokens(self, tokens: torch.Tensor | None,
                   logprobs: list[TokenLogprobs | None] | None = None) -> None:
        """The step's sampled tokens; their copy to the host starts now."""
        self._logprobs = logprobs or [None] * sum(r.num_rows for r in self._requests)
        self._host_tokens = tokens
        if tokens is not None and tokens.device.type != "cpu":
            # Pinned memory, so the copy is a real asynchronous DMA.
            self._host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host_tokens.copy_(tokens, non_blocking=True)
            self._copied = record_event(tokens.device)

    def result(self) -> RunnerOutput:
        """Wait for the step's tokens (if it still runs) and return them."""
        if self.deferred is not None:
            raise RuntimeError("a step's tokens were asked for before it sampled "
                               "(sample_deferred)")
        out = RunnerOutput(attention_traces=self.attention_traces)
        if self._host_tokens is None:
            return out
        if self._copied is not None:
            self._copied.synchronize()
        tokens = self._host_tokens.tolist()
        row = 0
        for request in self._requests:
            rows = tokens[row:row + request.num_rows]
            kept = 1 + num_accepted(request.draft_token_ids, rows)
            out.sampled_token_ids[request.request_id] = rows[:kept]
            logprobs = self._logprobs[row:row + kept]
            if logprobs and logprobs[0] is not None:
                out.logprobs[request.request_id] = logprobs
            row += request.num_rows
        return out


def num_accepted(drafts: list[int], sampled: list[int]) -> int:
    """Leading drafts equal to the token sampled at the position before each."""
    count = 0
    for draft, target in zip(drafts, sampled):
        if draft != target:
            break
        count += 1
    return count
