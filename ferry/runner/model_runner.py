"""ModelRunner: owns the model, the KV cache tensors and per-request sampling state.

``execute(scheduler_output) -> RunnerOutput`` is its one verb: update its copy of each
request from the message (``request_states.py``), build the flat batch, run the model,
sample a token for each request whose chunk reached its last token (and one per draft
token it verifies).
``launch`` is the same step without waiting for the tokens (async scheduling): it returns
a ``PendingOutput``, and fills the step's placeholder tokens from the previous launch's
samples on the device. ``launch(defer_sampling=True)`` queues the forward pass and the
logits only; ``sample_deferred`` samples them once the step's grammar bitmask is known
(the engine computes it from the previous step's tokens while the device runs this one).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ferry import kernels
from ferry.outputs import RunnerOutput, SchedulerOutput
from ferry.lora.slots import LoRASlots
from ferry.platform import DeviceGraphCapture, zeros_on_demand
from ferry.runner.attention_tracing import AttentionTracer, StepTrace, TraceSettings
from ferry.runner.attention_tracing import records as trace_records
from ferry.runner.cuda_graphs import DecodeGraphs, GraphCapture
from ferry.runner.drafts import DraftProposer
from ferry.runner.input_batch import ModelInput, ScheduledState, build_model_input, device_tensor
from ferry.runner.kv_swap import HostKVCache
from ferry.runner.pending_output import PendingOutput, SampledRequest
from ferry.runner.request_states import RequestStates
from ferry.runner.grammar_mask import attach_bitmasks
from ferry.runner.sampler import Sampler, SamplingRow

logger = logging.getLogger(__name__)


@dataclass
class DeferredSampling:
    """A launched step's logits waiting for their grammar bitmask."""

    logits: torch.Tensor                      # (R, V) float32
    rows: list[SamplingRow]
    generators: list[torch.Generator | None]
    sampled: list[SampledRequest]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, *, num_blocks: int, block_size: int,
                 device: torch.device, kv_dtype: torch.dtype,
                 proposer: DraftProposer | None = None, num_host_blocks: int = 0,
                 lora: LoRASlots | None = None, trace: TraceSettings | None = None) -> None:
        """``trace``: the attention debug trace's settings when it is on (None: off)."""
        self.model = model
        self.lora = lora   # LoRA serving: the adapters' slots (None: LoRA is off)
        self.tracer = AttentionTracer(trace) if trace is not None else None
        self.block_size = block_size
        self.device = device
        self.kv_caches = allocate_kv_caches(model, num_blocks, block_size, kv_dtype, device)
        # KV blocks of requests preempted by swapping (SchedulerOutput.swap_out / swap_in).
        self.host_kv = HostKVCache(self.kv_caches, num_host_blocks)
        logger.info("kernels: %s", kernels.prepare(device))
        self.sampler = Sampler()
        self.proposer = proposer
        self.decode_graphs: DecodeGraphs | None = None
        # Everything known about each request comes from the SchedulerOutput messages.
        self.requests = RequestStates()
        # Seeded requests keep their generator for their whole life, preemption included,
        # so a seed gives the same tokens alone, in any batch, or after a recompute.
        self._generators: dict[str, torch.Generator] = {}
        # The last launched step's sampled tokens (R,) on the device and each request's
        # last row in them.
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step, wait for its tokens, and propose drafts for the next."""
        output = self.launch(sched).result()
        if self.proposer is not None:
            self._propose_drafts(sched, output)
        return output

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, defer_sampling: bool = False) -> PendingOutput:
        """Queue one step; on a GPU this returns while the device still runs it. With
        ``defer_sampling`` the step stops at its logits: ``sample_deferred`` samples them."""
        for request_id in sched.finished_request_ids:
            self._generators.pop(request_id, None)
            if self.tracer is not None:
                self.tracer.forget(request_id)
        states = self.requests.update(sched)
        self.host_kv.apply(sched)          # before the forward, which may reuse freed blocks
        if sched.is_empty:
            return PendingOutput()
        batch = build_model_input([ScheduledState(s, state) for s, state in
                                   zip(sched.scheduled, states)], self.block_size, self.device)
        self._fill_placeholders(batch)
        traced = self._plan_trace(batch)
        hidden = self._forward_lora(batch) if self.lora is not None else None
        if hidden is None and self.decode_graphs is not None and traced is None:   # a graph runs no trace
            hidden = self.decode_graphs.try_run(batch.input_ids, batch.positions, batch.attn_metadata)
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn_metadata)
        if not batch.sampling_requests:
            self._last_sampled = None
            return _with_trace(PendingOutput(), traced)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # (R, V) float32
        rows, generators, sampled = self._sampling_rows(batch.sampling_requests)
        pending = _with_trace(PendingOutput(sampled), traced)
        self._last_sampled = None   # a next launch before the sampling fails loudly
        pending.deferred = DeferredSampling(logits, rows, generators, sampled)
        if not defer_sampling:
            self.sample_deferred(pending, sched.grammar_bitmask)
        return pending

    @torch.inference_mode()
    def sample_deferred(self, pending: PendingOutput, grammar_bitmask) -> None:
        """Sample a launched step's logits with its grammar bitmask (None: no constrained
        row); the tokens then fill the next launch's placeholders."""
        step = pending.deferred
        if step is None:
            return   # the step sampled nothing
        pending.deferred = None
        attach_bitmasks(step.rows, step.sampled, grammar_bitmask)
        token_ids, logprobs = self.sampler.sample(step.logits, step.rows, step.generators)
        self._last_sampled = (token_ids, _last_rows(step.sampled))
        pending.set_tokens(token_ids, logprobs)

    def _plan_trace(self, batch: ModelInput) -> StepTrace | None:
        """The step's traced rows, handed to every attention layer through the metadata."""
        if self.tracer is None:
            return None
        traced = self.tracer.plan(batch.requests, batch.attn_metadata)
        if traced is not None:
            batch.attn_metadata.trace_rows = traced.rows
            batch.attn_metadata.trace_out = traced.out
        return traced

    def _forward_lora(self, batch: ModelInput) -> torch.Tensor | None:
        """The forward of a step with LoRA requests (eager: graphs hold no LoRA); None when
        the step has none, so it runs as if LoRA were off."""
        mapping = self.lora.prepare([r.state.lora_id for r in batch.requests],
                                    [r.scheduled.num_tokens for r in batch.requests])
        if mapping is None:
            return None
        self.lora.batch.mapping = mapping
        try:
            return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn_metadata)
        finally:
            self.lora.batch.mapping = None

    def _sampling_rows(self, requests: list[ScheduledState]
                       ) -> tuple[list[SamplingRow], list[torch.Generator | None], list[SampledRequest]]:
        """One row per sampled position: row j of a request with k drafts sees its tokens
        up to draft j (the last k - j tokens of its list are later drafts)."""
        rows: list[SamplingRow] = []
        generators: list[torch.Generator | None] = []
        sampled: list[SampledRequest] = []
        for item in requests:
            state, drafts = item.state, item.scheduled.spec_token_ids
            generator = self._generator(state.request_id, state.sampling_params.seed)
            first_visible = len(state.token_ids) - len(drafts)
            for j in range(item.num_sample_rows):
                rows.append(SamplingRow(state.sampling_params, state.token_ids, first_visible + j,
                                        state.num_prompt_tokens, state.eos_token_ids))
                generators.append(generator)
            sampled.append(SampledRequest(state.request_id, item.num_sample_rows, drafts))
        return rows, generators, sampled

    def _fill_placeholders(self, batch: ModelInput) -> None:
        """Write the previous launch's sampled tokens over this step's placeholders."""
        if not batch.placeholder_positions:
            return
        if self._last_sampled is None:
            raise RuntimeError("a step has placeholder tokens but the previous step sampled none")
        tokens, last_row = self._last_sampled
        source = device_tensor([last_row[rid] + 1 + offset for rid, offset in
                                zip(batch.placeholder_request_ids, batch.placeholder_offsets)],
                               torch.int64, self.device)
        target = device_tensor(batch.placeholder_positions, torch.int64, self.device)
        batch.input_ids[target] = tokens[source]

    def _propose_drafts(self, sched: SchedulerOutput, output: RunnerOutput) -> None:
        for scheduled in sched.scheduled:
            new_tokens = output.sampled_token_ids.get(scheduled.request_id)
            if not new_tokens:
                continue
            state = self.requests.get(scheduled.request_id)
            verified = state.token_ids[:scheduled.start_pos + len(scheduled.token_ids)] + new_tokens
            drafts = self.proposer.propose(state.request_id, verified, state.num_prompt_tokens)
            if drafts:
                output.spec_token_ids[state.request_id] = list(drafts)

    def capture_decode_graphs(self, *, max_num_seqs: int, max_model_len: int,
                              capture: GraphCapture | None = None) -> bool:
        """Capture device graphs for decode steps (``cuda_graphs.py``). Returns False, with
        a warning, when capture fails: the runner then stays eager, which is always correct.

        The PyTorch reference attention groups rows by their host-side lengths
        (``seq_lens_cpu``), which a graph would freeze at capture: it is never captured."""
        if kernels.prepare(self.device) == "reference":
            logger.warning("decode graphs need the Triton or C++ attention; the PyTorch "
                           "reference reads host-side lengths a graph would freeze: running "
                           "eagerly")
            return False
        graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs=max_num_seqs,
                              max_model_len=max_model_len, block_size=self.block_size,
                              device=self.device, capture=capture or DeviceGraphCapture(self.device))
        try:
            graphs.capture_all()
        except Exception as exc:  # a driver or compiler limit must not stop the server
            logger.warning("could not capture decode graphs (%s: %s); running eagerly",
                           type(exc).__name__, exc)
            return False
        self.decode_graphs = graphs
        return True

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            # Sampling draws its noise on the host generator's device; CPU keeps it portable.
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request_id] = gen
        return gen


def _with_trace(pending: PendingOutput, traced: StepTrace | None) -> PendingOutput:
    if traced is not None:
        pending.attention_traces = trace_records(traced)
    return pending


def _last_rows(sampled: list[SampledRequest]) -> dict[str, int]:
    """Each request's last row in the step's sampled tokens."""
    rows, end = {}, 0
    for request in sampled:
        end += request.num_rows
        rows[request.request_id] = end - 1
    return rows


def kv_cache_shape(model: torch.nn.Module, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)


def allocate_kv_caches(model: torch.nn.Module, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One zeroed tensor per layer. On the CPU its pages become resident only as blocks
    are first written (``zeros_on_demand``), so memory follows the blocks in use."""
    # Zeroed, not empty: padded block-table entries point at block 0 and a NaN there
    # would survive a masked softmax as 0 * NaN.
    shape = kv_cache_shape(model, num_blocks, block_size)
    if device.type == "cpu":
        return [zeros_on_demand(shape, dtype) for _ in range(model.num_layers)]
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
