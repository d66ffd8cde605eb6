"""AsyncEngine: drives a synchronous Engine from asyncio for many concurrent requests.

One background task owns the engine. Every engine call (add, abort, step, stats, tokenizer
work) runs on one dedicated worker thread, one "turn" at a time, so the engine is never used
from two threads and the event loop stays free to accept requests while a step runs.
Handlers hand commands to the task (thread-safe because they only touch loop-owned lists);
each request gets its own ``asyncio.Queue`` of its ``RequestOutput``s (cumulative or, with
``RequestOutputKind.DELTA``, only what is new: a reader that fell behind gets the queued
deltas as one). When there is nothing to do the task sleeps on an event instead of spinning.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ferry.outputs import RequestOutput
from ferry.sampling_params import RequestOutputKind, SamplingParams
from ferry.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

PromptSource = str | list[int] | dict | Callable[[Any], list[int]]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the client should retry later."""


class EngineStoppedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


class EngineStepError(RuntimeError):
    """A step failed; the requests in flight were aborted."""


class RequestTimeoutError(RuntimeError):
    """The request ran past ``request_timeout_seconds`` and was aborted."""


@dataclass
class _Command:
    fn: Callable[[Any], Any]
    future: asyncio.Future | None = None
    num_new_requests: int = 0


@dataclass
class _TurnResult:
    results: list[tuple[_Command, Any, BaseException | None]] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)
    step_error: BaseException | None = None
    stats: Any = None
    busy: bool = False


def engine_executor() -> ThreadPoolExecutor:
    """The one thread that builds an Engine and then runs every call on it.

    NOTE: build the Engine on this thread too
    (``executor.submit(Engine, config.engine).result()``), not on the main thread. libgomp
    gives each thread that opens a parallel region its own team of OpenMP threads; with the
    main thread's team and the engine thread's both alive there are more OpenMP threads than
    cores, libgomp then stops spinning between regions, and every PyTorch op waits for its
    threads to wake up: a CPU decode step of the demo model measured 3.3x slower (4.0 ms
    instead of 1.2 ms). Building it here also sizes this thread's team: the runner applies
    ``cpu_threads`` (``torch.set_num_threads``) in ``load_model`` on the thread it runs on.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferry-engine")


class AsyncEngine:
    """Owns ``engine``; call ``start()`` inside the event loop and ``shutdown()`` at the end.

    ``executor``: the single-thread executor the engine was built on (see
    :func:`engine_executor`); a new one when not given. ``request_timeout``: seconds a
    request may run before it is aborted (0 or None: no limit), from the ``deadline`` its
    handler gives (see :meth:`deadline`: from its arrival, tokenizing included) or else
    from when it is added.
    """

    def __init__(self, engine: Any, *, max_waiting_requests: int,
                 metrics: ServerMetrics | None = None,
                 executor: ThreadPoolExecutor | None = None,
                 request_timeout: float | None = None) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.request_timeout = request_timeout or None
        self.metrics = metrics
        self._executor = executor or engine_executor()
        self._commands: list[_Command] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._adapters: dict[str, str] = {}   # request id -> its LoRA adapter (metrics label)
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._busy = False
        self._accepting = True
        self._stopping = False
        self.stats: Any = None
        self.dead_reason: str | None = None
        self.traces: Any = None   # a TraceStore: finished attention traces, by request id

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.stats = await self._loop.run_in_executor(self._executor, self.engine.get_stats)
        self._observe_stats(self.stats)
        self._task = asyncio.create_task(self._run(), name="ferry-engine-loop")

    def stop_accepting(self) -> None:
        """New requests are refused from now on; requests in flight continue."""
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting and self.dead_reason is None

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new requests, give those in flight ``grace_seconds`` to finish, then abort
        the rest (their streams end with an error saying the server shut down)."""
        self.stop_accepting()
        if self._queues:
            logger.info("draining: %d requests in flight get up to %.1f s to finish",
                        len(self._queues), grace_seconds)
        deadline = time.monotonic() + grace_seconds
        while self._queues and time.monotonic() < deadline and self.dead_reason is None:
            await asyncio.sleep(0.05)
        if self._queues:
            logger.warning("aborting %d requests still running after the grace period",
                           len(self._queues))
        for request_id in list(self._queues):
            self._fail(request_id, EngineStoppedError(
                "the server shut down before this request finished"))
            self.abort(request_id)

    def drain_soon(self, grace_seconds: float,
                   then: Callable[[], None] | None = None) -> None:
        """``drain`` scheduled from a signal handler (thread-safe, returns at once); ``then``
        runs in the loop once the drain is over (the server stops listening only then)."""
        async def drain_then() -> None:
            try:
                await self.drain(grace_seconds)
            finally:
                if then is not None:
                    then()

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(drain_then()))
        elif then is not None:  # not started: nothing to drain
            then()

    async def shutdown(self, grace_seconds: float = 0.0) -> None:
        """Drain, then stop the loop task and the engine thread."""
        await self.drain(grace_seconds)
        if self._task is not None and not self._task.done():
            self._stopping = True
            self._enqueue(_Command(lambda engine: None))  # let the last aborts run
            await self._task
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ requests
    def check_capacity(self, num_new_requests: int = 1) -> None:
        """Raise if the engine is not taking requests or its waiting queue is full."""
        if self.dead_reason is not None:
            raise EngineStoppedError(f"the engine stopped: {self.dead_reason}")
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down")
        pending = sum(c.num_new_requests for c in self._commands)
        waiting = (self.stats.num_waiting if self.stats is not None else 0) + pending
        if waiting + num_new_requests > self.max_waiting_requests:
            raise EngineOverloadedError(
                f"the server is at capacity ({waiting} requests waiting, limit "
                f"max_waiting_requests={self.max_waiting_requests}); retry shortly")

    def deadline(self) -> float | None:
        """The ``time.monotonic()`` by which a request arriving now must be done, or None."""
        return time.monotonic() + self.request_timeout if self.request_timeout else None

    def timeout_error(self) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"the request ran longer than the server's limit of {self.request_timeout:g} "
            "seconds (request_timeout_seconds) and was aborted")

    async def add_request(self, request_id: str, prompt: PromptSource, params: SamplingParams,
                          *, priority: int | None = None, lora_name: str | None = None,
                          deadline: float | None = None) -> AsyncGenerator[RequestOutput, None]:
        """Add a request; once the engine accepted it, return the stream of its outputs.

        Raises what the engine raises (``ValueError`` for a bad or too long prompt) before
        anything is streamed, so the caller can still answer with a 4xx. ``prompt`` may be a
        callable run on the engine thread that returns token ids (the chat template runs there).
        The stream yields ``RequestOutput``s of ``params.output_kind`` until one is finished
        (a FINAL_ONLY request's only one); closing it early
        (or losing it) aborts the request and frees its KV blocks, and so does running past
        ``request_timeout`` (the stream then raises ``RequestTimeoutError``), counted from
        ``deadline`` (from :meth:`deadline` when the request arrived) when given.
        """
        stream = self._stream(request_id, prompt, params, priority, lora_name, deadline)
        await stream.__anext__()  # runs up to "accepted"
        return stream

    async def generate(self, request_id: str, prompt: PromptSource, params: SamplingParams, *,
                       priority: int | None = None) -> AsyncIterator[RequestOutput]:
        """``add_request`` and iterate: yields outputs until the request finishes."""
        stream = await self.add_request(request_id, prompt, params, priority=priority)
        async with aclosing(stream):
            async for output in stream:
                yield output

    async def _stream(self, request_id: str, prompt: PromptSource, params: SamplingParams,
                      priority: int | None, lora_name: str | None = None,
                      deadline: float | None = None) -> AsyncGenerator[RequestOutput | None, None]:
        self.check_capacity(params.n)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = time.monotonic()

        def add(engine: Any) -> None:
            source = prompt(engine) if callable(prompt) else prompt
            extra = {"lora_name": lora_name} if lora_name is not None else {}
            engine.add_request(request_id, source, params, priority=priority,
                               arrival_time=arrival, **extra)

        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        if lora_name is not None:
            self._adapters[request_id] = lora_name
        delta = params.output_kind == RequestOutputKind.DELTA
        rejected = finished = False
        if deadline is None and self.request_timeout:
            deadline = arrival + self.request_timeout
        try:
            try:
                await self._submit(_Command(add, num_new_requests=params.n))
            except Exception:
                rejected = True  # the engine refused it (a cancellation still aborts below)
                raise
            yield None  # accepted
            while not finished:
                output = await self._next_output(queue, deadline, delta)
                finished = output.finished
                yield output
        finally:
            # No await here: this also runs while the task is being cancelled.
            adapter = self._adapters.pop(request_id, None)
            if self._queues.pop(request_id, None) is not None and not (rejected or finished):
                self._abort_in_engine(request_id)
                if self.metrics is not None:
                    self.metrics.count_request("aborted", adapter)

    def abort(self, request_id: str) -> None:
        """Abort a request now (callable from any coroutine, also while being cancelled)."""
        self._abort_in_engine(request_id)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        return await self._submit(_Command(fn))

    # ------------------------------------------------------------------ internals
    async def _next_output(self, queue: asyncio.Queue, deadline: float | None = None,
                           delta: bool = False) -> RequestOutput:
        """The newest output, or with ``delta`` the queued ones folded into one; past
        ``deadline`` (monotonic), ``RequestTimeoutError``: the caller's ``finally`` then
        aborts the request, which frees its KV blocks."""
        if deadline is None:
            item = await queue.get()
        else:
            try:
                item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise self.timeout_error() from None
        while not queue.empty() and not isinstance(item, BaseException):
            later = queue.get_nowait()
            if delta and not isinstance(later, BaseException):
                item.add_delta(later)
            else:   # a cumulative output says it all (and an error ends the stream)
                item = later
        if isinstance(item, BaseException):
            raise item
        return item

    async def _submit(self, command: _Command) -> Any:
        if self.dead_reason is not None:
            raise EngineStoppedError(f"the engine stopped: {self.dead_reason}")
        command.future = asyncio.get_running_loop().create_future()
        self._enqueue(command)
        return await command.future

    def _enqueue(self, command: _Command) -> None:
        self._commands.append(command)
        if self._wakeup is not None:
            self._wakeup.set()

    def _abort_in_engine(self, request_id: str) -> None:
        self._enqueue(_Command(lambda engine: engine.abort_request(request_id)))

    def _fail(self, request_id: str, error: BaseException) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(error)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._commands and not self._busy:
                    if self._stopping:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                commands, self._commands = self._commands, []
                result = await loop.run_in_executor(self._executor, self._turn, commands,
                                                    not self._stopping)
                self._apply(result)
        except Exception as exc:  # the loop itself broke: fail everything, refuse new work
            logger.exception("the engine loop stopped")
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            for request_id in list(self._queues):
                self._fail(request_id, EngineStepError(self.dead_reason))
            for command in self._commands:
                if command.future is not None and not command.future.done():
                    command.future.set_exception(EngineStoppedError(self.dead_reason))

    def _turn(self, commands: list[_Command], may_step: bool) -> _TurnResult:
        """Runs on the engine thread: apply commands, then one step if there is work."""
        turn = _TurnResult()
        for command in commands:
            try:
                turn.results.append((command, command.fn(self.engine), None))
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                turn.results.append((command, None, exc))
        if may_step and self.engine.has_unfinished_requests():
            try:
                turn.outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - reported to the requests in flight
                logger.exception("engine step failed")
                turn.step_error = exc
        turn.stats = self.engine.get_stats()
        turn.busy = may_step and self.engine.has_unfinished_requests()
        return turn

    def _apply(self, turn: _TurnResult) -> None:
        for command, value, error in turn.results:
            if command.future is None or command.future.done():
                continue
            if error is not None:
                command.future.set_exception(error)
            else:
                command.future.set_result(value)
        for output in turn.outputs:
            self._deliver(output)
        if turn.step_error is not None:
            self._fail_all_in_flight(turn.step_error)
        self._busy = turn.busy
        self.stats = turn.stats
        self._observe_stats(turn.stats)

    def _deliver(self, output: RequestOutput) -> None:
        queue = self._queues.get(output.request_id)
        if queue is None:  # the client left; its abort is already queued
            return
        if output.finished and output.debug_trace is not None and self.traces is not None:
            self.traces.put(output.request_id, output.debug_trace)   # before the client sees it
        queue.put_nowait(output)
        if output.finished and self.metrics is not None:
            aborted = any(c.finish_reason == "abort" for c in output.outputs)
            adapter = self._adapters.get(output.request_id)
            self.metrics.count_request("aborted" if aborted else "ok", adapter)
            self.metrics.observe_finished(output, adapter)

    def _fail_all_in_flight(self, error: BaseException) -> None:
        message = f"the engine failed while generating: {type(error).__name__}: {error}"
        for request_id in list(self._queues):
            self._fail(request_id, EngineStepError(message))
            self._queues.pop(request_id)
            self._abort_in_engine(request_id)
            if self.metrics is not None:
                self.metrics.count_request("error", self._adapters.get(request_id))

    def _observe_stats(self, stats: Any) -> None:
        if self.metrics is not None and stats is not None:
            self.metrics.observe_stats(stats)
