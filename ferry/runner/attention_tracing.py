"""The runner's side of the attention debug trace: which rows of a step to trace, and the
per-token records it hands back in ``RunnerOutput.attention_traces``.

A request is traced when its ``SamplingParams.debug_trace`` is set (the engine refuses it
unless ``debug_trace: attention``). Each step, the rows of traced requests go into the
step's ``AttentionMetadata.trace_rows``; every attention layer then appends the trace of
those rows (``kernels.attention_trace``). A step without a traced request sets nothing
and costs nothing. Rows: the one that samples (its output gives the next token), and with
``debug_trace_prompt`` every prompt row too; at most ``debug_trace_max_tokens`` positions
per request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ferry.kernels.attention_trace import AttentionTrace, TraceRows


@dataclass(frozen=True)
class TraceSettings:
    top_k: int = 8
    include_prompt: bool = False
    max_tokens: int = 256


@dataclass
class StepTrace:
    """The rows traced in one step and who they belong to."""

    rows: TraceRows
    request_ids: list[str]
    out: list[AttentionTrace] = field(default_factory=list)   # one per layer


class AttentionTracer:
    """Per-request counts of traced positions, and the plan of each step."""

    def __init__(self, settings: TraceSettings) -> None:
        self.settings = settings
        self._traced: dict[str, int] = {}

    def forget(self, request_id: str) -> None:
        self._traced.pop(request_id, None)

    def plan(self, requests: list, meta) -> StepTrace | None:
        """``requests``: the step's ``ScheduledState``s in batch order (``meta``'s
        sequences). None when no row of this step is traced."""
        into: tuple[list, list, list, list] = ([], [], [], [])
        start = 0
        for seq, item in enumerate(requests):
            query_len = meta.query_lens_cpu[seq]
            if item.state.sampling_params.debug_trace:
                if self.settings.include_prompt:
                    wanted = range(query_len)
                else:   # the row that samples (the last one when drafts are verified)
                    wanted = [query_len - 1] if item.num_sample_rows else []
                self._add_rows(item.state.request_id, seq, start, wanted,
                               meta.seq_lens_cpu[seq] - query_len, into)
            start += query_len
        rows, seqs, positions, owners = into
        if not rows:
            return None
        return StepTrace(TraceRows(rows, seqs, positions, self.settings.top_k), owners)

    def _add_rows(self, request_id: str, seq: int, start: int, wanted, first_position: int,
                  into: tuple[list, list, list, list]) -> None:
        done = self._traced.get(request_id, 0)
        for i in wanted:
            if done >= self.settings.max_tokens:   # memory stays bounded per request
                break
            into[0].append(start + i)
            into[1].append(seq)
            into[2].append(first_position + i)
            into[3].append(request_id)
            done += 1
        self._traced[request_id] = done


def records(step: StepTrace) -> dict[str, list[dict]]:
    """``{request_id: [{position, entropy, top_positions, top_weights}, ...]}``: per traced
    row, per layer, per head (plain lists; one host copy per step with traced rows)."""
    entropy = [t.entropy.tolist() for t in step.out]            # layer -> row -> head
    positions = [t.top_positions.tolist() for t in step.out]    # layer -> row -> head -> k
    weights = [t.top_weights.tolist() for t in step.out]
    out: dict[str, list[dict]] = {}
    for i, (request_id, position) in enumerate(zip(step.request_ids, step.rows.positions)):
        out.setdefault(request_id, []).append({
            "position": position,
            "entropy": [layer[i] for layer in entropy],
            "top_positions": [layer[i] for layer in positions],
            "top_weights": [[[round(w, 6) for w in head] for head in layer[i]]
                            for layer in weights],
        })
    return out
