"""Request state as the engine core sees it: tokens so far and how many have KV computed."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ferry.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"      # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"     # max_tokens or the model's context
    FINISHED_ABORTED = "abort"     # cancelled by the caller or the server

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
             RequestStatus.FINISHED_ABORTED}


@dataclass(eq=False)
class Request:
    """One sequence being generated.

    The single rule of the scheduler: ``num_computed_tokens`` (tokens whose KV is in the
    cache) catches up with ``num_tokens`` (prompt + generated). A prefill, a chunk of it,
    a decode step, a prefix-cache hit and a recompute after preemption are all that rule.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()   # empty when ignore_eos or the model has none
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    lora_name: str | None = None
    lora_id: int | None = None            # the adapter's load generation (new on each reload)

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1          # prefix-cache hit at first schedule (-1: not yet)
    num_preemptions: int = 0
    # Async scheduling: tokens scheduled as sampled by a step still running on the device,
    # not yet in ``all_token_ids`` (0 or 1 when a step is scheduled, 2 for a moment).
    num_output_placeholders: int = 0
    # Draft tokens to verify in the next step (speculative decoding; empty otherwise).
    spec_token_ids: list[int] = field(default_factory=list)
    # What the runner holds of it: whether it has the request at all, and how many leading
    # entries of its block table are still the scheduler's (SchedulerOutput sends deltas).
    sent_to_runner: bool = False
    num_runner_blocks: int = 0
    # Leading tokens the runner's copy holds (it is cut at each step's start_pos): a
    # request resumed after preemption may start from a prefix hit only within them.
    num_runner_tokens: int = 0
    # Waiting-queue age bound: steps in which a request behind this one was admitted first.
    num_bypasses: int = 0
    # Tokens whose KV a recompute preemption threw away (recomputed when it resumes).
    num_lost_tokens: int = 0
    # Joules of the steps it took part in, by its share of their tokens (None: no reading).
    energy_joules: float | None = None
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def cache_salt(self) -> str | None:
        """What the prefix cache keys this request's KV by besides its tokens: the adapter
        and its load generation, so an adapter reloaded in place never hits the old KV."""
        return self.lora_name if self.lora_id is None else f"{self.lora_name}#{self.lora_id}"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
