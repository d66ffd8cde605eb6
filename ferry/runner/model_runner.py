"""ModelRunner: owns the model, the KV cache tensors and per-request sampling state.

``execute(scheduler_output) -> RunnerOutput`` is its one verb: build the flat batch, run
the model, sample one token for each request whose chunk reached its last token.
"""
from __future__ import annotations

import logging

import torch

from ferry import kernels
from ferry.outputs import RunnerOutput, SchedulerOutput
from ferry.platform import empty_on_huge_pages
from ferry.runner.cuda_graphs import CudaGraphCapture, DecodeGraphs, GraphCapture
from ferry.runner.input_batch import build_model_input
from ferry.runner.sampler import Sampler

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, *, num_blocks: int, block_size: int,
                 device: torch.device, kv_dtype: torch.dtype) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_caches = allocate_kv_caches(model, num_blocks, block_size, kv_dtype, device)
        logger.info("kernels: %s", kernels.prepare(device))
        self.sampler = Sampler()
        self.decode_graphs: DecodeGraphs | None = None
        # Seeded requests keep their generator for their whole life, preemption included,
        # so a seed gives the same tokens alone, in any batch, or after a recompute.
        self._generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.release(sched.finished_request_ids)
        if sched.is_empty:
            return RunnerOutput()
        batch = build_model_input(sched, self.block_size, self.device)
        hidden = None
        if self.decode_graphs is not None:
            hidden = self.decode_graphs.try_run(batch.input_ids, batch.positions, batch.attn_metadata)
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn_metadata)
        if not batch.sampling_requests:
            return RunnerOutput()
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # (N, V) float32
        requests = batch.sampling_requests
        generators = [self._generator(r.request_id, r.sampling_params.seed) for r in requests]
        token_ids, logprobs = self.sampler(logits, requests, generators,
                                           eos_token_ids=[r.eos_token_ids for r in requests])
        out = RunnerOutput()
        for req, token_id, lp in zip(requests, token_ids, logprobs):
            out.sampled_token_ids[req.request_id] = token_id
            if lp is not None:
                out.logprobs[req.request_id] = lp
        return out

    def capture_decode_graphs(self, *, max_num_seqs: int, max_model_len: int,
                              capture: GraphCapture | None = None) -> bool:
        """Capture device graphs for decode steps (``cuda_graphs.py``). Returns False, with
        a warning, when capture fails: the runner then stays eager, which is always correct."""
        graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs=max_num_seqs,
                              max_model_len=max_model_len, block_size=self.block_size,
                              device=self.device, capture=capture or CudaGraphCapture(self.device))
        try:
            graphs.capture_all()
        except Exception as exc:  # a driver or compiler limit must not stop the server
            logger.warning("could not capture decode graphs (%s: %s); running eagerly",
                           type(exc).__name__, exc)
            return False
        self.decode_graphs = graphs
        return True

    def release(self, request_ids: set[str]) -> None:
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            # Sampling draws its noise on the host generator's device; CPU keeps it portable.
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request_id] = gen
        return gen


def kv_cache_shape(model: torch.nn.Module, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)


def allocate_kv_caches(model: torch.nn.Module, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    # Zeroed, not empty: padded block-table entries point at block 0 and a NaN there
    # would survive a masked softmax as 0 * NaN.
    shape = kv_cache_shape(model, num_blocks, block_size)
    if device.type == "cpu":
        return [empty_on_huge_pages(shape, dtype).zero_() for _ in range(model.num_layers)]
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
