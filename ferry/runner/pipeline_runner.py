"""The runner of one pipeline stage: a step's requests in micro-batches through the stages.

Every stage gets the same ``SchedulerOutput`` (the executor broadcasts it) and keeps the
same request states; each holds the KV cache of its own layers only. A step is split by
request into up to ``pp_size`` micro-batches. Stage ``p`` runs micro-batch ``m`` as soon
as it has received its activations (hidden, residual) from stage ``p - 1``, and sends its
own on without waiting (``isend``), so while stage 1 runs micro-batch 0, stage 0 already
runs micro-batch 1: the stages overlap within the step (GPipe's forward fill; a step
takes ``M + P - 1`` micro-batch slots instead of ``M * P``). The last stage computes
the logits of every micro-batch and samples once; the executor returns its tokens to
rank 0. Placeholder tokens (async scheduling) and drafts are not supported here.
LoRA: the step's adapters are made resident once, then each micro-batch runs with its
own token -> slot mapping.
"""
from __future__ import annotations

import torch

from ferry.distributed.collectives import isend_tensor, recv_tensor, wait
from ferry.distributed.state import ParallelContext
from ferry.outputs import SchedulerOutput
from ferry.runner.input_batch import ModelInput, ScheduledState, build_model_input
from ferry.runner.model_runner import ModelRunner
from ferry.runner.pending_output import PendingOutput


def split_micro_batches(items: list[ScheduledState], count: int) -> list[list[ScheduledState]]:
    """Up to ``count`` contiguous groups of requests with about equal token counts."""
    count = max(1, min(count, len(items)))
    total = sum(item.scheduled.num_tokens for item in items)
    groups: list[list[ScheduledState]] = [[]]
    done = 0
    for item in items:
        # close a group once it holds its share of the tokens (and requests remain for the rest)
        if groups[-1] and done >= total * len(groups) / count and len(groups) < count:
            groups.append([])
        groups[-1].append(item)
        done += item.scheduled.num_tokens
    return groups


class PipelineStageRunner(ModelRunner):
    """``ModelRunner`` for a ``PipelineStage`` model (``ferry.models.parallel_model``)."""

    def __init__(self, model, *, ctx: ParallelContext, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.ctx = ctx

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> PendingOutput:
        for request_id in sched.finished_request_ids:
            self._generators.pop(request_id, None)
        states = self.requests.update(sched)
        if sched.is_empty:
            return PendingOutput()
        items = [ScheduledState(s, state) for s, state in zip(sched.scheduled, states)]
        if any(s.num_placeholders or s.spec_token_ids for s in sched.scheduled):
            raise RuntimeError("pipeline parallelism runs neither async scheduling's "
                               "placeholders nor draft tokens")
        ctx, model = self.ctx, self.model
        sends, logits, sampling = [], [], []
        if self.lora is not None:
            self.lora.make_resident([item.state.lora_id for item in items])
        for group in split_micro_batches(items, ctx.pp_size):
            batch = build_model_input(group, self.block_size, self.device)
            received = None
            if not ctx.is_first_stage:
                received = self._receive(batch.input_ids.shape[0])
            hidden, residual = self._forward_stage(batch, received)
            if not ctx.is_last_stage:
                dst = ctx.stage_rank(ctx.pp_rank + 1)
                sends += [isend_tensor(ctx, hidden, dst), isend_tensor(ctx, residual, dst)]
                # keep the tensors alive until their sends complete
                sends.append((hidden, residual))
            elif batch.sampling_requests:
                logits.append(model.compute_logits(hidden[batch.logits_indices]))   # (R_m, V)
                sampling += batch.sampling_requests
        for work in sends:
            if not isinstance(work, tuple):
                wait(ctx, work, "send of activations to the next stage")
        if not logits:
            return PendingOutput()
        rows, generators, sampled = self._sampling_rows(sampling)
        token_ids, logprobs = self.sampler.sample(torch.cat(logits), rows, generators)
        return PendingOutput(sampled, token_ids, logprobs)

    def _forward_stage(self, batch: ModelInput, received):
        """This stage's layers on one micro-batch, with its LoRA mapping when it has one."""
        lora = self.lora
        if lora is not None:
            lora.batch.mapping = lora.prepare([r.state.lora_id for r in batch.requests],
                                              [r.scheduled.num_tokens for r in batch.requests])
        try:
            return self.model.forward_stage(batch.input_ids, batch.positions, self.kv_caches,
                                            batch.attn_metadata, received)
        finally:
            if lora is not None:
                lora.batch.mapping = None

    def _receive(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx, model = self.ctx, self.model
        src = ctx.stage_rank(ctx.pp_rank - 1)
        dtype = model.lm.model.norm.weight.dtype
        hidden = torch.empty(num_tokens, model.hidden_size, dtype=dtype, device=self.device)
        residual = torch.empty_like(hidden)
        recv_tensor(ctx, hidden, src)
        recv_tensor(ctx, residual, src)
        return hidden, residual
