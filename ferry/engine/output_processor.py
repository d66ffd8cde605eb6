"""OutputProcessor: turns requests that got new tokens into user-facing RequestOutputs.

It owns the per-completion incremental detokenizers (stop strings are found here) and
groups the ``n`` child requests of a user request back into one RequestOutput. What an
output holds is the request's ``SamplingParams.output_kind``: CUMULATIVE outputs every
step it advances; DELTA outputs (the server's streams) only the new tokens, text and
logprobs of the completions that advanced, so a step's cost is what it produced, not the
length of the outputs so far; FINAL_ONLY (``LLM.generate``, ``stream=False``) one
cumulative output when it finishes.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ferry.engine.detokenizer import IncrementalDetokenizer
from ferry.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from ferry.request import Request
from ferry.sampling_params import RequestOutputKind, SamplingParams


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
    num_sent_tokens: int = 0       # DELTA: tokens (and logprobs) already in an output
    sent_finish: bool = False      # DELTA: its finish_reason was in an output


@dataclass
class _UserRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
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
        """``stream=False``: one output when it finishes, whatever ``params.output_kind``."""
        kind = params.output_kind if stream else RequestOutputKind.FINAL_ONLY
        user = _UserRequest(request_id, prompt, prompt_token_ids, kind)
        want_logprobs = params.logprobs is not None
        for index, child in enumerate(children):
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child.sampling_params,
                                           stream=kind != RequestOutputKind.FINAL_ONLY)
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

    def collect(self, on_finished: Callable[[RequestOutput, list[list[int]], bool], None]
                | None = None) -> list[RequestOutput]:
        """RequestOutputs for the user requests touched since the last call (all but
        FINAL_ONLY ones, and those that finished).

        ``on_finished(output, token_ids, aborted)`` sees each finished request before it
        is forgotten: every completion's output token ids (a DELTA output holds only the
        last ones) and whether its first completion was aborted.
        """
        final_only = RequestOutputKind.FINAL_ONLY
        touched = [user for user in self._touched.values()
                   if user.kind != final_only or user.finished]
        self._touched.clear()
        outputs = []
        for user in touched:
            output = self._to_output(user)
            if user.finished:
                if on_finished is not None:
                    on_finished(output, [c.token_ids for c in user.completions],
                                user.completions[0].finish_reason == "abort")
                self.pop(user.request_id)
            if output is not None:
                outputs.append(output)
        return outputs

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

    @classmethod
    def _to_output(cls, user: _UserRequest) -> RequestOutput | None:
        """The user request's output; None for a DELTA one with nothing new. A DELTA
        output lists the completions that advanced; the last one lists them all (those
        with nothing new empty), so it counts every completion's tokens."""
        if user.kind == RequestOutputKind.DELTA:
            finished = user.finished
            completions = [d for d in (cls._delta(c, finished) for c in user.completions)
                           if d is not None]
            if not completions:
                return None
        else:
            completions = [cls._cumulative(c) for c in user.completions]
        return cls._request_output(user, completions)

    @staticmethod
    def _cumulative(c: _Completion) -> CompletionOutput:
        return CompletionOutput(index=c.index, text=c.detokenizer.output_text,
                                token_ids=list(c.token_ids),
                                cumulative_logprob=c.cumulative_logprob,
                                logprobs=list(c.logprobs) if c.logprobs is not None else None,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    @staticmethod
    def _delta(c: _Completion, always: bool) -> CompletionOutput | None:
        """What is new in the completion since its last output (slices of the new part
        only); None when nothing is, unless ``always``."""
        start = c.num_sent_tokens
        new_ids = c.token_ids[start:]
        text = c.detokenizer.take_new_text()
        finishing = c.finish_reason is not None and not c.sent_finish
        if not (new_ids or text or finishing or always):
            return None
        c.num_sent_tokens, c.sent_finish = len(c.token_ids), c.finish_reason is not None
        return CompletionOutput(index=c.index, text=text, token_ids=new_ids,
                                cumulative_logprob=c.cumulative_logprob,
                                logprobs=c.logprobs[start:] if c.logprobs is not None else None,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                num_generated_tokens=len(c.token_ids))

    @staticmethod
    def _request_output(user: _UserRequest, completions: list[CompletionOutput]) -> RequestOutput:
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
