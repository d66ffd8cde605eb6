"""The executor of a model spread over several ranks (tensor and/or pipeline parallel).

The engine's process is global rank 0 (tensor rank 0 of the first stage); it spawns this
node's other ranks (``worker_process.py``), while other nodes start theirs themselves
(``ferry serve --node-rank N`` or torchrun). Each call broadcasts a plain-data message
that every rank handles the same way (``rank_worker.py``), so the collectives inside the
forward pair up; rank 0 then returns its own runner's tokens (tensor parallel: every rank
sampled the same ones) or those the last stage sends it (pipeline parallel). LoRA
adapters reach every rank the same way (``add_lora`` / ``remove_lora`` messages).

Failure is loud and bounded: a local worker that exits is seen at once (its process
sentinel) and a collective that fails or waits longer than
``distributed_timeout_seconds`` raises with the rank named; both end the engine's process
with exit code 1 and a message, since a model missing a rank cannot answer. A start-up
that fails on rank 0 (a model that does not load: every rank usually fails alike) raises
rank 0's own error to the caller instead, after ending the workers: a worker that exits
while rank 0 is still starting gets ``STARTUP_GRACE_SECONDS`` for rank 0 to fail by
itself, so the user reads the cause, not "a worker exited" (the worker logs its error). While idle,
rank 0 pings the workers every quarter of the timeout, so an idle server never times out
and a remote worker learns within the timeout that rank 0 is gone.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from multiprocessing.connection import wait as wait_for_sentinels
from pathlib import Path
from typing import Any

from ferry.checkpoint import load_hf_config, resolve_model_dir
from ferry.config import EngineConfig, RuntimeConfig
from ferry.distributed.collectives import CollectiveError
from ferry.distributed.state import layouts_from_config
from ferry.distributed.teardown import destroy_group, leave
from ferry.executor.base import Executor
from ferry.executor.rank_worker import RankWorker, broadcast
from ferry.executor.worker_process import spawn_workers
from ferry.lora.adapter_config import LoRAError
from ferry.models.parallel_model import check_parallel_fit
from ferry.outputs import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

STARTUP_GRACE_SECONDS = 5.0


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fatal(message: str) -> None:
    """End the engine's process: a model that lost a rank cannot answer any request."""
    logger.critical("%s", message)
    print(f"ferry: fatal: {message}", file=sys.stderr, flush=True)
    os._exit(1)


class MultiprocessExecutor(Executor):
    """Rank 0's side: spawns the node's workers, joins the group, loads its part."""

    def __init__(self, config: EngineConfig, model_dir: Path | None = None,
                 on_failure=fatal) -> None:
        parallel = config.parallel
        if parallel.pipeline_parallel_size > 1 and config.scheduler.async_scheduling == "on":
            raise ValueError("async_scheduling=on does not work with pipeline_parallel_size > 1 "
                             "(the first stage never sees the sampled tokens); use auto or off")
        self.config = config
        self._on_failure = on_failure
        model_dir = model_dir or resolve_model_dir(config.model.model_path, config.model.revision)
        check_parallel_fit(load_hf_config(model_dir), parallel.tensor_parallel_size,
                           parallel.pipeline_parallel_size)
        layouts = layouts_from_config(parallel)
        if parallel.nnodes == 1 and "RANK" not in os.environ:
            # One node: a free port of our own, so that servers side by side (or a group
            # just torn down in this process) never meet at the default port.
            port = free_local_port()
            layouts = [dataclasses.replace(layout, master_addr="127.0.0.1", master_port=port)
                       for layout in layouts]
        if layouts[0].rank != 0:
            raise ValueError(f"this process is rank {layouts[0].rank}, not rank 0: run it "
                             f"with `ferry serve` (ranks other than 0 follow rank 0)")
        self._lock = threading.Lock()
        self._closing = False
        self._last_message = time.monotonic()
        self._start_settled = threading.Event()   # rank 0 started, or its start-up failed
        self._workers = spawn_workers(config, model_dir, layouts[1:], len(layouts))
        atexit.register(self.shutdown)
        threading.Thread(target=self._monitor, daemon=True, name="ferry-worker-monitor").start()
        try:
            self.rank0 = RankWorker(config, model_dir, layouts[0], len(layouts))
        except CollectiveError as exc:
            self._fail(str(exc))
            raise
        except BaseException:
            self.shutdown()             # the workers end, and their exits are expected now
            self._start_settled.set()
            raise
        self._start_settled.set()
        self.platform = self.rank0.platform
        self.self_test = self.rank0.self_test
        # Async scheduling needs the sampled tokens on rank 0's runner: pipelines lack them.
        self.supports_async_scheduling = parallel.pipeline_parallel_size == 1
        threading.Thread(target=self._heartbeat, daemon=True, name="ferry-heartbeat").start()

    # ------------------------------------------------------------------ the interface
    def profile(self) -> int:
        with self._call("profile"):
            return self.rank0.profile()

    def initialize_cache(self, num_blocks: int) -> RuntimeConfig:
        with self._call("init", num_blocks):
            return self.rank0.initialize_cache(num_blocks)

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        # One hold of the lock for the whole step: no ping between the broadcast and the
        # last stage's reply on the same group.
        with self._call("step", scheduler_output):
            return self.rank0.collect(self.rank0.launch(scheduler_output))

    def launch(self, scheduler_output: SchedulerOutput) -> Any:
        with self._call("step", scheduler_output):
            return self.rank0.launch(scheduler_output)

    def collect(self, handle: Any) -> RunnerOutput:
        try:
            return self.rank0.collect(handle)
        except CollectiveError as exc:
            self._fail(str(exc))
            raise

    def add_lora(self, lora_id: int, path: str) -> None:
        if self.rank0.lora is None:
            raise LoRAError("LoRA serving is off; start with enable_lora (or lora_modules / "
                            "lora_adapters_dir)")
        with self._call("add_lora", lora_id, path):
            self.rank0.add_lora(lora_id, path)

    def remove_lora(self, lora_id: int) -> None:
        if self.rank0.lora is not None:
            with self._call("remove_lora", lora_id):
                self.rank0.remove_lora(lora_id)

    def lora_stats(self) -> dict[str, int]:
        """Rank 0's counters (every rank swaps the same adapters at the same steps)."""
        return vars(self.rank0.lora.stats).copy() if self.rank0.lora is not None else {}

    def shutdown(self) -> None:
        """Tell every rank to stop, leave the group in order (``distributed/teardown.py``),
        wait for the local workers. A rank already gone is logged, not raised: a stop was
        asked for, so the server still exits 0."""
        if self._closing:
            return
        self._closing = True
        if not hasattr(self, "rank0"):   # start-up failed: the pipes end the workers
            for process, writer in self._workers:
                writer.close()
                process.join(timeout=10)
            destroy_group()   # rank 0 may have joined: a later start in this process joins anew
            return
        try:
            with self._lock:
                broadcast(self.rank0.ctx, ("stop",))
            told = True
        except Exception as exc:  # noqa: BLE001 - a broken group: the workers die with us
            logger.warning("could not tell the workers to stop: %s", exc)
            told = False
        if told:
            leave(self.rank0.ctx)   # every rank leaves before rank 0, the store's host
        for process, writer in self._workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            writer.close()
        destroy_group()

    # ------------------------------------------------------------------ internals
    class _Call:
        def __init__(self, executor: "MultiprocessExecutor", message: tuple):
            self.executor, self.message = executor, message

        def __enter__(self):
            executor = self.executor
            executor._lock.acquire()
            try:
                broadcast(executor.rank0.ctx, self.message)
            except CollectiveError as exc:
                executor._lock.release()
                executor._fail(str(exc))
                raise
            return self

        def __exit__(self, exc_type, exc, tb):
            self.executor._last_message = time.monotonic()
            self.executor._lock.release()
            if isinstance(exc, CollectiveError):
                self.executor._fail(str(exc))
            return False

    def _call(self, *message: Any) -> "_Call":
        return self._Call(self, tuple(message))

    def _fail(self, message: str) -> None:
        if not self._closing:
            self._on_failure(message)

    def _monitor(self) -> None:
        """A local worker that exits while the engine runs ends the engine's process."""
        sentinels = {process.sentinel: process for process, _ in self._workers}
        while sentinels:
            for sentinel in wait_for_sentinels(list(sentinels)):
                process = sentinels.pop(sentinel)
                process.join(timeout=1)   # its exit code
                starting = not self._start_settled.is_set()
                if starting:   # rank 0 likely fails the same way: let its error be the one
                    self._start_settled.wait(STARTUP_GRACE_SECONDS)
                if not self._closing:
                    when = " while starting (its error is logged above)" if starting else ""
                    self._fail(f"worker process {process.name} (pid {process.pid}) exited with "
                               f"code {process.exitcode}{when}; the model is missing that rank")

    def _heartbeat(self) -> None:
        period = self.config.parallel.distributed_timeout_seconds / 4
        while not self._closing:
            time.sleep(min(period, 5.0) if period > 5.0 else period)
            if self._closing or time.monotonic() - self._last_message < period:
                continue
            if not self._lock.acquire(timeout=period):
                continue
            try:
                if not self._closing:
                    broadcast(self.rank0.ctx, ("ping",))
                    self._last_message = time.monotonic()
            except CollectiveError as exc:
                self._fail(str(exc))
            finally:
                self._lock.release()
