"""The runner's copy of each request, kept up to date from the SchedulerOutput deltas.

The scheduler sends a request's prompt and sampling parameters once (``NewRequest``) and
then only what changed (``ScheduledRequest``: this step's tokens, block ids to append).
Everything the runner knows about a request is built here from those messages, so a
runner in another process (tensor parallelism) sees exactly what an in-process one does.
Pure Python: the fake runners of the scheduler tests use it too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ferry.outputs import NewRequest, ScheduledRequest, SchedulerOutput
from ferry.sampling_params import SamplingParams


@dataclass
class RequestState:
    """One request as the runner holds it.

    ``token_ids`` are the prompt and the outputs up to the last token the runner was sent
    (this step's tokens and drafts included); with async scheduling a token it filled in
    on the device is ``PLACEHOLDER_TOKEN`` here, which is why a request whose logits
    processors read its outputs (penalties) is never sent one.
    """

    request_id: str
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    lora_id: int | None = None


class RequestStates:
    """request id -> :class:`RequestState`, updated by :meth:`update` once per step."""

    def __init__(self) -> None:
        self._states: dict[str, RequestState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def get(self, request_id: str) -> RequestState:
        return self._states[request_id]

    def update(self, sched: SchedulerOutput) -> list[RequestState]:
        """Apply one step's message; returns the states of its scheduled requests, in order.

        Order matters: finished ids first (an id may be reused by a new request in the same
        step), then preempted (their blocks were freed), new requests, then the deltas.
        """
        for request_id in sched.finished_request_ids:
            self._states.pop(request_id, None)
        for request_id in sched.preempted_request_ids:
            if (state := self._states.get(request_id)) is not None:
                state.block_ids.clear()
        for new in sched.new_requests:
            self._states[new.request_id] = _new_state(new)
        return [self._apply(scheduled) for scheduled in sched.scheduled]

    def _apply(self, scheduled: ScheduledRequest) -> RequestState:
        state = self._states.get(scheduled.request_id)
        if state is None:
            raise ValueError(f"step schedules request {scheduled.request_id!r}, which the "
                             "runner was never sent")
        if scheduled.start_pos > len(state.token_ids):
            raise ValueError(f"request {scheduled.request_id!r} starts at {scheduled.start_pos} "
                             f"but the runner knows {len(state.token_ids)} of its tokens")
        del state.block_ids[scheduled.num_kept_blocks:]
        state.block_ids.extend(scheduled.new_block_ids)
        del state.token_ids[scheduled.start_pos:]
        state.token_ids.extend(scheduled.token_ids)
        state.token_ids.extend(scheduled.spec_token_ids)
        return state


def _new_state(new: NewRequest) -> RequestState:
    return RequestState(new.request_id, len(new.prompt_token_ids), new.sampling_params,
                        tuple(new.eos_token_ids), list(new.prompt_token_ids),
                        lora_id=new.lora_id)
