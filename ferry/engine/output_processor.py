"""OutputProcessor: turns requests that got new tokens into user-facing RequestOutputs.

It owns the per-completion incremental detokenizers (stop strings are found here) and
groups the ``n`` child requests of a user request back into one RequestOutput. A streamed
request gets an output every step it advances; one that is not (``LLM.generate``) only
when it finishes, so a long generation is not copied into a new output at every token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ferry.engine.detokenizer import IncrementalDetokenizer
from ferry.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from ferry.request import Request
from ferry.sampling_params import SamplingParams


@dataclass
class _Completion:
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] | None
    cumulative_logprob: float | None
    token_ids: list[int] = field(default_factory=list)   # outputs up to a stop string
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _UserRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    stream: bool = True
    completions: list[_Completion] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _UserRequest] = {}
        self._completion_of: dict[str, tuple[_UserRequest, _Completion]] = {}
        self._touched: dict[str, _UserRequest] = {}

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams, children: list[Request], stream: bool = True) -> None:
        user = _UserRequest(request_id, prompt, prompt_token_ids, stream)
        want_logprobs = params.logprobs is not None
        for index, child in enumerate(children):
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child.sampling_params,
                                           stream=stream)
            completion = _Completion(index, child, detok, [] if want_logprobs else None,
                                     0.0 if want_logprobs else None)
            user.completions.append(completion)
            self._completion_of[child.request_id] = (user, completion)
        self._requests[request_id] = user

    def pop(self, request_id: str) -> list[str]:
        """Forget a user request (abort); returns its child request ids."""
        user = self._requests.pop(request_id, None)
        self._touched.pop(request_id, None)
        if user is None:
            return []
        for c in user.completions:
            self._completion_of.pop(c.request.request_id, None)
        return [c.request.request_id for c in user.completions]

    def process(self, updated: list[tuple[Request, list[int]]],
                logprobs: dict[str, list[TokenLogprobs]]) -> list[str]:
        """Feed each request's new tokens; returns child ids that hit a stop string."""
        stopped = []
        for request, token_ids in updated:
            entry = self._completion_of.get(request.request_id)
            if entry is None:
                continue
            user, completion = entry
            if self._advance(completion, request, token_ids, logprobs.get(request.request_id)):
                stopped.append(request.request_id)
            self._touched[user.request_id] = user
        return stopped

    def collect(self) -> list[RequestOutput]:
        """RequestOutputs for the user requests touched since the last call (streamed ones,
        and those that finished)."""
        touched = [user for user in self._touched.values() if user.stream or user.finished]
        self._touched.clear()
        for user in touched:
            if user.finished:
                self.pop(user.request_id)
        return [self._to_output(user) for user in touched]

    def _advance(self, completion: _Completion, request: Request, token_ids: list[int],
                 logprobs: list[TokenLogprobs] | None) -> bool:
        """Feed tokens one at a time: a stop string ends the completion at its token, and
        tokens the same step sampled after it are dropped."""
        for index, token_id in enumerate(token_ids):
            completion.token_ids.append(token_id)
            if logprobs and completion.logprobs is not None:
                completion.logprobs.append(logprobs[index])
                completion.cumulative_logprob += logprobs[index].logprob
            stop = completion.detokenizer.update([token_id])
            if stop is not None:
                completion.finish_reason, completion.stop_reason = "stop", stop
                completion.detokenizer.finish()
                return True
        if request.is_finished:
            completion.finish_reason = request.status.value
            completion.stop_reason = request.stop_reason
            completion.detokenizer.finish()
        return False

    @staticmethod
    def _to_output(user: _UserRequest) -> RequestOutput:
        completions = [
            CompletionOutput(index=c.index, text=c.detokenizer.output_text,
                             token_ids=list(c.token_ids),
                             cumulative_logprob=c.cumulative_logprob,
                             logprobs=list(c.logprobs) if c.logprobs is not None else None,
                             finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for c in user.completions
        ]
        first = user.completions[0].request
        first_token_times = [c.request.first_token_time for c in user.completions
                             if c.request.first_token_time is not None]
        finished = user.finished
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_token_time=min(first_token_times, default=None),
            finished_time=time.monotonic() if finished else None,
            num_cached_tokens=max(first.num_cached_tokens, 0),
        )
        energies = [c.request.energy_joules for c in user.completions
                    if c.request.energy_joules is not None]
        return RequestOutput(user.request_id, user.prompt, user.prompt_token_ids, completions,
                             finished, metrics, energy_joules=sum(energies) if energies else None)
