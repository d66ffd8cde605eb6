"""Engine: the synchronous core loop. add_request -> step() -> RequestOutputs.

Data flows request -> Scheduler (+ KVCacheManager) -> ModelRunner (model, Sampler) ->
Scheduler.update_from_output -> detokenizers -> RequestOutput. One owner calls ``step``.

With async scheduling (on a GPU by default) ``step`` schedules and launches step N, then
finishes step N-1 while the device runs N, so the host's scheduling, input building and
detokenizing hide behind the device's work instead of leaving it idle between steps.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry import checkpoint
from ferry.config import EngineConfig, RuntimeConfig, SchedulerConfig
from ferry.engine.adapter_tokens import AdapterTokenCounts
from ferry.engine.debug_trace import TraceCollector
from ferry.engine.lora_adapters import LoRAAdapters
from ferry.engine.output_processor import OutputProcessor
from ferry.engine.preemption import DEFAULT_COPY_BYTES_PER_SECOND, PreemptionCosts
from ferry.engine.scheduler import Scheduler
from ferry.engine.step_meter import StepMeter
from ferry.engine.thermal import ThermalGuard
from ferry.engine.structured_output import StructuredOutputManager
from ferry.executor.base import Executor
from ferry.outputs import RequestOutput, RunnerOutput, SchedulerOutput, SchedulerStats
from ferry.request import Request, RequestStatus
from ferry.sampling_params import SamplingParams, check_priority

logger = logging.getLogger(__name__)


def apply_chat_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool,
                        model_name: str, tools: list[dict] | None = None) -> list[int]:
    """The token ids of ``messages`` through ``tokenizer``'s chat template (``tools``: the
    OpenAI tool definitions the template shows the model); ``ValueError`` (the caller's
    messages are wrong, or the model has no template) otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the model {model_name} has no chat template")
    extra = {"tools": tools} if tools else {}
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **extra)
    except Exception as exc:  # template errors are the caller's messages being wrong
        raise ValueError(f"could not apply the chat template: {exc}") from None
    # transformers 5 may return a BatchEncoding; 4.x returns a list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@dataclass
class EngineStats(SchedulerStats):
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    # adapter label ("" = base model) -> (prompt, generated) tokens: base and live adapters
    tokens_by_adapter: dict[str, tuple[int, int]] = field(default_factory=dict)


class Engine:
    """``executor`` holds the model (``ferry.llm.build_engine`` makes one from the config);
    the engine reads the tokenizer and generation config itself, and the run-time view
    (context length, KV blocks, device) from the executor's start-up."""

    def __init__(self, config: EngineConfig, executor: Executor,
                 model_dir: Path | None = None, grammar_compiler_factory: Any = None) -> None:
        """``model_dir``: the checkpoint directory when the caller resolved it already
        (a hub id is then not looked up twice). ``grammar_compiler_factory(tokenizer,
        vocab_size, stop_token_ids)``: the structured-output compiler (None: constrained
        requests are refused)."""
        self.config = config
        model = config.model
        self.model_dir = model_dir or checkpoint.resolve_model_dir(model.model_path, model.revision)
        self.tokenizer = checkpoint.load_tokenizer(model.tokenizer or str(self.model_dir),
                                                   model.trust_remote_code)
        self.eos_token_ids = checkpoint.resolve_eos_token_ids(
            self.model_dir, checkpoint.load_hf_config(self.model_dir), self.tokenizer)
        self.executor = executor
        self.runtime: RuntimeConfig = executor.initialize_cache(executor.profile())
        self.platform = executor.platform
        self.max_model_len = self.runtime.max_model_len
        self.vocab_size = self.runtime.vocab_size
        self.num_blocks = self.runtime.num_blocks
        self.quant_type = self.runtime.quant_type
        self.served_model_name = model.served_model_name or checkpoint.default_served_name(
            model.model_path)
        # Overlap pays where the device runs asynchronously; on the CPU it only delays outputs.
        mode = config.scheduler.async_scheduling
        self.async_scheduling = (mode == "on" or (mode == "auto" and self.runtime.is_gpu)) and (
            getattr(executor, "supports_async_scheduling", True))
        self._in_flight: tuple[SchedulerOutput, object] | None = None
        # A constrained request's mask for step N+1 is computed while N runs: the executor
        # launches N+1's forward, then samples it once the mask is known.
        self._defers_sampling = self.async_scheduling and getattr(
            executor, "supports_deferred_sampling", False)
        self.num_deferred_samplings = 0   # steps launched before their masks (a counter)
        costs = PreemptionCosts(copy_bytes_per_second=self.runtime.kv_copy_bytes_per_second
                                or DEFAULT_COPY_BYTES_PER_SECOND)
        self.scheduler = Scheduler(config.scheduler, config.cache,
                                   max_model_len=self.max_model_len, num_blocks=self.num_blocks,
                                   async_scheduling=self.async_scheduling,
                                   num_host_blocks=self.runtime.num_host_blocks,
                                   kv_block_bytes=self.runtime.kv_block_bytes, costs=costs)
        self.meter = StepMeter(_probe(self.platform, "energy_probe"), costs)
        self.thermal = ThermalGuard(config.scheduler.thermal_limit_c,
                                    config.scheduler.power_limit_w,
                                    temperature=_probe(self.platform, "temperature_probe"),
                                    power=_probe(self.platform, "power_probe"))
        self.outputs = OutputProcessor(self.tokenizer)
        self.structured_output = StructuredOutputManager(
            None if grammar_compiler_factory is None else grammar_compiler_factory(
                self.tokenizer, self.vocab_size, list(self.eos_token_ids)))
        self.lora: LoRAAdapters | None = None
        if config.lora.enabled:
            self.lora = LoRAAdapters(config.lora, executor, self.scheduler,
                                     {self.served_model_name, str(model.model_path)})
        obs = config.observability
        self.traces = TraceCollector(max_tokens=obs.debug_trace_max_tokens,
                                     entropy_jump=obs.debug_trace_entropy_jump,
                                     trace_dir=obs.debug_trace_dir)
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._adapter_tokens = AdapterTokenCounts()
        logger.info("engine ready: %s on %s, %d KV blocks of %d tokens, max_model_len %d",
                    self.model_dir, self.runtime.device, self.num_blocks, self.runtime.block_size,
                    self.max_model_len)

    # ------------------------------------------------------------------ hot reload
    def update_scheduling(self, scheduler: SchedulerConfig) -> None:
        """Apply new batching limits between steps (config hot reload): the scheduler
        reads ``max_num_seqs``, ``max_num_batched_tokens`` and ``prefill_parallelism``
        afresh every step, so requests in flight keep running. The caller keeps the first
        two at most their start values, which sized the KV cache, the activation profile
        and the device graphs; the queue's ``scheduling_policy`` is not changed here."""
        self.scheduler.max_num_seqs = scheduler.max_num_seqs
        self.scheduler.max_num_batched_tokens = scheduler.max_num_batched_tokens
        self.scheduler.prefill_parallelism = scheduler.prefill_parallelism
        self.config = self.config.model_copy(update={"scheduler": scheduler})

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams,
                    *, priority: int | None = None, arrival_time: float | None = None,
                    stream: bool = True, lora_name: str | None = None) -> None:
        """Queue a request. Raises ``ValueError`` with a user-facing message on bad input.

        ``step()`` reports a streamed request every step it advances, and one with
        ``stream=False`` once, when it finishes. ``lora_name`` runs it with that loaded
        LoRA adapter (``ferry.lora``).
        """
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if self.outputs.has(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.debug_trace and self.config.observability.debug_trace != "attention":
            raise ValueError("debug_trace: this server does not trace attention; start it "
                             "with --debug-trace attention (config debug_trace: attention)")
        prompt_text, token_ids = self._tokenize_prompt(prompt)
        params = self._with_max_tokens(params, len(token_ids))
        self._check_fits(len(token_ids), params.max_tokens)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        priority = params.priority if priority is None else priority
        check_priority(priority)   # LLM.generate(priority=[...]) bypasses SamplingParams
        eos = () if params.ignore_eos else self.eos_token_ids
        children = []
        for index in range(params.n):
            child_params = params if params.n == 1 else self._child_params(params, index)
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            children.append(Request(child_id, token_ids, child_params, eos_token_ids=eos,
                                    arrival_time=arrival, priority=priority))
        if params.structured_outputs is not None:
            self.structured_output.check_available()
        if lora_name is not None:
            if self.lora is None:
                raise ValueError(f"LoRA adapter {lora_name!r} requested but LoRA serving is off; "
                                 "start with enable_lora (or lora_modules / lora_adapters_dir)")
            self.lora.attach(children, lora_name)
        self.outputs.add(request_id, prompt_text, token_ids, params, children, stream)
        for child in children:
            if params.structured_outputs is not None:
                self.structured_output.hold(child)   # scheduled once its grammar compiled
            else:
                self.scheduler.add_request(child)
        self._prompt_tokens_total += len(token_ids)
        self._adapter_tokens.add(lora_name, prompt=len(token_ids))

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Drop requests now and free their KV blocks; unknown ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        child_ids = list(itertools.chain.from_iterable(self.outputs.pop(i) for i in ids))
        self.structured_output.drop(child_ids)
        for request_id in ids:
            self.traces.drop(request_id)
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        if self.lora is not None:
            self.lora.sweep()

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs of the requests it advanced."""
        self.scheduler.prefill_throttled = self.thermal.update()
        self.meter.begin()
        failed = self._admit_grammar_ready()
        if not self.async_scheduling:
            sched_out = self._schedule()
            return failed + self._finish_step(sched_out, self.executor.execute(sched_out))
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and self.scheduler.has_host_tokens_in_flight(
                grammar_overlaps=self._defers_sampling):
            outputs = self._finish_in_flight()   # e.g. penalties need every token on the host
        sched_out = self.scheduler.schedule()
        previous = self._in_flight
        if previous is not None and self._mask_waits_for_tokens(sched_out):
            outputs, pending = self._launch_before_mask(sched_out, previous)
            previous = None
        else:
            sched_out.grammar_bitmask = self.structured_output.bitmask(sched_out, self.vocab_size)
            pending = self.executor.launch(sched_out)
        self._in_flight = None if sched_out.is_empty else (sched_out, pending)
        if previous is not None:
            outputs = self._finish_step(previous[0], self.executor.collect(previous[1]))
        return failed + outputs

    def _mask_waits_for_tokens(self, sched_out: SchedulerOutput) -> bool:
        """Whether a constrained request samples this step with its previous token still
        in flight (its mask depends on that token) and the executor can wait for it."""
        if not self._defers_sampling:
            return False
        so = self.structured_output
        return any(s.sample and s.num_placeholders and so.is_constrained(s.request_id)
                   for s in sched_out.scheduled)

    def _launch_before_mask(self, sched_out: SchedulerOutput,
                            previous: tuple[SchedulerOutput, object]
                            ) -> tuple[list[RequestOutput], object]:
        """Launch the step's forward pass, finish the step in flight while the device runs
        it (its tokens advance the matchers), then sample with the masks they give.
        Returns the finished step's outputs and the new step's handle."""
        pending = self.executor.launch_deferred(sched_out)
        self.num_deferred_samplings += 1
        outputs = self._finish_step(previous[0], self.executor.collect(previous[1]))
        sched_out.grammar_bitmask = self.structured_output.bitmask(sched_out, self.vocab_size)
        self.executor.sample_deferred(pending, sched_out.grammar_bitmask)
        return outputs, pending

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or self._in_flight is not None
                or self.structured_output.num_pending > 0)

    def _schedule(self) -> SchedulerOutput:
        """The scheduler's step plus the bitmasks of its constrained requests."""
        sched_out = self.scheduler.schedule()
        sched_out.grammar_bitmask = self.structured_output.bitmask(sched_out, self.vocab_size)
        return sched_out

    def _admit_grammar_ready(self) -> list[RequestOutput]:
        """Hand the requests whose grammar compiled to the scheduler; end those whose
        compile failed (their outputs say ``finish_reason="abort"``)."""
        so = self.structured_output
        if not so.num_pending:
            return []
        if not self.scheduler.has_unfinished_requests() and self._in_flight is None:
            so.wait_any(timeout=0.05)   # nothing else to run: do not spin
        ready, failed = so.take_ready()
        for request in ready:
            self.scheduler.add_request(request)
        if not failed:
            return []
        for request, reason in failed:
            logger.warning("request %s: its constraint failed to compile: %s",
                           request.request_id, reason)
            request.status = RequestStatus.FINISHED_ABORTED
        self.outputs.process([(request, []) for request, _ in failed], {})
        return self.outputs.collect()

    def _finish_in_flight(self) -> list[RequestOutput]:
        sched_out, pending = self._in_flight
        self._in_flight = None
        return self._finish_step(sched_out, self.executor.collect(pending))

    def _finish_step(self, sched_out: SchedulerOutput,
                     runner_out: RunnerOutput) -> list[RequestOutput]:
        """Append the step's tokens, apply stop conditions, and build the outputs."""
        if sched_out.is_empty:
            return []
        self.meter.end(sched_out, self.scheduler.get_request)   # before finished ones leave
        updated = self.scheduler.update_from_output(sched_out, runner_out)
        for request, tokens in updated:
            self.structured_output.accept(request, tokens)
        generated = sum(len(tokens) for _, tokens in updated)
        self._generation_tokens_total += generated
        if self.lora is None:
            self._adapter_tokens.add(None, generated=generated)
        else:
            for request, tokens in updated:
                self._adapter_tokens.add(request.lora_name, generated=len(tokens))
        stopped = self.outputs.process(updated, runner_out.logprobs)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
            self.structured_output.drop(stopped)
        if self.lora is not None:
            self.lora.sweep()
        if runner_out.attention_traces:
            self.traces.add(runner_out.attention_traces)
        return self.outputs.collect(on_finished=self._attach_trace)

    def _attach_trace(self, output: RequestOutput | None, token_ids: list[list[int]],
                      aborted: bool) -> None:
        """A finished traced request's attention trace, on its output."""
        if output is None or aborted or not self.traces.is_traced(output.request_id):
            return
        output.debug_trace = self.traces.finish(output.request_id,
                                                self._texts(output.prompt_token_ids, token_ids))

    def _texts(self, prompt_ids: list[int], token_ids: list[list[int]]) -> list[list[str]]:
        """Each completion's sequence as text per token (a trace shows its positions)."""
        decode = self.tokenizer.convert_ids_to_tokens
        prompt = list(decode(list(prompt_ids)))
        return [prompt + list(decode(list(ids))) for ids in token_ids]

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished_requests() + self.structured_output.num_pending

    def get_stats(self) -> EngineStats:
        """Scheduler stats; requests waiting for their grammar count as waiting."""
        stats = self.scheduler.get_stats()
        stats.energy_joules = self.meter.energy_joules
        stats.thermal_throttles = self.thermal.num_throttles
        stats.device_temperature_c = self.thermal.temperature_c
        stats.num_waiting += self.structured_output.num_pending
        live = self.lora.names_in_use() if self.lora is not None else set()
        return EngineStats(**vars(stats), num_prompt_tokens_total=self._prompt_tokens_total,
                           num_generation_tokens_total=self._generation_tokens_total,
                           tokens_by_adapter=self._adapter_tokens.snapshot(live))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt,
                                   self.served_model_name)

    # ------------------------------------------------------------------ helpers
    def _tokenize_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if set(prompt) - {"prompt_token_ids", "prompt"} or "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt must be {'prompt_token_ids': [int, ...]}")
            # The text, when given, is the one the ids came from (echo shows it as sent).
            return prompt.get("prompt"), self._check_token_ids(prompt["prompt_token_ids"])
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, list(self.tokenizer.encode(prompt))
        return None, self._check_token_ids(prompt)

    def _check_token_ids(self, prompt: Any) -> list[int]:
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("a prompt must be a non-empty string or a non-empty list of token ids")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        return list(prompt)

    def _with_max_tokens(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        if params.max_tokens is not None:
            return params
        # No max_tokens: up to the context, or what the whole KV cache holds when that is
        # less (a small cache must not refuse every request that leaves max_tokens out).
        capacity = min(self.max_model_len, self.num_blocks * self.config.cache.block_size)
        room = capacity - prompt_len
        if room < 1:
            self._check_fits(prompt_len, 1)
        return params.clone(max_tokens=room)

    def _check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the "
                f"request asks for {prompt_len + max_tokens} ({prompt_len} in the prompt and "
                f"{max_tokens} to generate); shorten the prompt or lower max_tokens")
        blocks_needed = -(-(prompt_len + max_tokens) // self.config.cache.block_size)
        if blocks_needed > self.num_blocks:
            raise ValueError(
                f"the request needs {blocks_needed} KV blocks but the cache holds "
                f"{self.num_blocks}; raise kv_cache_memory or gpu_memory_utilization")

    @staticmethod
    def _child_params(params: SamplingParams, index: int) -> SamplingParams:
        # Each of the n samples draws its own stream; a seed stays reproducible.
        seed = None if params.seed is None else params.seed + index
        return params.clone(n=1, seed=seed)



def _probe(platform: Any, name: str):
    """The platform's ``name`` probe (None where the platform has none or it fails)."""
    getter = getattr(platform, name, None)
    try:
        return getter() if callable(getter) else None
    except Exception:  # noqa: BLE001 - a missing vendor library means no reading
        return None
