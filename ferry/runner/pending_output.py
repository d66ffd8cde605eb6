"""A step's sampled tokens on their way from the device to the host.

``ModelRunner.launch`` returns a ``PendingOutput`` as soon as the step's work is queued on
the device; ``result()`` waits for the tokens. Meanwhile the engine can schedule the next
step (async scheduling). On the CPU the step is already done when ``launch`` returns.
"""
from __future__ import annotations

import torch

from ferry.outputs import RunnerOutput, TokenLogprobs
from ferry.platform import record_event


class PendingOutput:
    def __init__(self, request_ids: list[str] | None = None, tokens: torch.Tensor | None = None,
                 logprobs: list[TokenLogprobs | None] | None = None) -> None:
        """``tokens``: (N,) int64, one per id in ``request_ids``; None for a step that sampled
        nothing. The copy to the host starts now, behind the step's kernels."""
        self._request_ids = request_ids or []
        self._logprobs = logprobs or [None] * len(self._request_ids)
        self._host_tokens = tokens
        self._copied = None
        if tokens is not None and tokens.device.type != "cpu":
            # Pinned memory, so the copy is a real asynchronous DMA.
            self._host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host_tokens.copy_(tokens, non_blocking=True)
            self._copied = record_event(tokens.device)

    def result(self) -> RunnerOutput:
        """Wait for the step's tokens (if it still runs) and return them."""
        out = RunnerOutput()
        if self._host_tokens is None:
            return out
        if self._copied is not None:
            self._copied.synchronize()
        for request_id, token_id, logprobs in zip(self._request_ids, self._host_tokens.tolist(),
                                                  self._logprobs):
            out.sampled_token_ids[request_id] = token_id
            if logprobs is not None:
                out.logprobs[request_id] = logprobs
        return out
