"""ModelRunner: owns the model, the KV cache tensors and per-request sampling state.

``execute(scheduler_output) -> RunnerOutput`` is its one verb: build the flat batch, run
the model, sample one token for each request whose chunk reached its last token.
``launch`` is the same step without waiting for the tokens (async scheduling): it returns
a ``PendingOutput``, and fills the step's placeholder tokens from the previous launch's
samples on the device.
"""
from __future__ import annotations

import logging

import torch

from ferry import kernels
from ferry.outputs import RunnerOutput, SchedulerOutput
from ferry.platform import DeviceGraphCapture, empty_on_huge_pages
from ferry.runner.cuda_graphs import DecodeGraphs, GraphCapture
from ferry.runner.input_batch import ModelInput, build_model_input, device_tensor
from ferry.runner.pending_output import PendingOutput
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
        # The last launched step's sampled tokens (N,) on the device and each request's row.
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its tokens."""
        return self.launch(sched).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> PendingOutput:
        """Queue one step; on a GPU this returns while the device still runs it."""
        self.release(sched.finished_request_ids)
        if sched.is_empty:
            return PendingOutput()
        batch = build_model_input(sched, self.block_size, self.device)
        self._fill_placeholders(batch)
        hidden = None
        if self.decode_graphs is not None:
            hidden = self.decode_graphs.try_run(batch.input_ids, batch.positions, batch.attn_metadata)
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn_metadata)
        requests = batch.sampling_requests
        if not requests:
            self._last_sampled = None
            return PendingOutput()
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # (N, V) float32
        generators = [self._generator(r.request_id, r.sampling_params.seed) for r in requests]
        token_ids, logprobs = self.sampler.sample(
            logits, requests, generators, eos_token_ids=[r.eos_token_ids for r in requests])
        request_ids = [r.request_id for r in requests]
        self._last_sampled = (token_ids, {rid: row for row, rid in enumerate(request_ids)})
        return PendingOutput(request_ids, token_ids, logprobs)

    def _fill_placeholders(self, batch: ModelInput) -> None:
        """Write the previous launch's sampled tokens over this step's placeholders."""
        if not batch.placeholder_positions:
            return
        if self._last_sampled is None:
            raise RuntimeError("a step has placeholder tokens but the previous step sampled none")
        tokens, rows = self._last_sampled
        source = device_tensor([rows[rid] for rid in batch.placeholder_request_ids],
                               torch.int64, self.device)
        target = device_tensor(batch.placeholder_positions, torch.int64, self.device)
        batch.input_ids[target] = tokens[source]

    def capture_decode_graphs(self, *, max_num_seqs: int, max_model_len: int,
                              capture: GraphCapture | None = None) -> bool:
        """Capture device graphs for decode steps (``cuda_graphs.py``). Returns False, with
        a warning, when capture fails: the runner then stays eager, which is always correct."""
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
