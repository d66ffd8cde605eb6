"""AsyncEngine against a scripted fake engine: ownership, aborts, errors, load shedding."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ferry.engine.engine import EngineStats
from ferry.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ferry.sampling_params import RequestOutputKind, SamplingParams
from ferry.server.async_engine import (AsyncEngine, EngineOverloadedError, EngineStepError,
                                       EngineStoppedError, RequestTimeoutError)


class FakeEngine:
    """One 'x' per step per request; every call records the thread it ran on."""

    def __init__(self, fail_on_step: int | None = None) -> None:
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.threads: set[int] = set()
        self.steps = 0
        self.fail_on_step = fail_on_step

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())

    def add_request(self, request_id, prompt, params, *, priority=None, arrival_time=None):
        self._touch()
        if prompt == "":
            raise ValueError("the prompt is empty")
        self.requests[request_id] = [params.max_tokens, 0, arrival_time, params.output_kind]

    def abort_request(self, request_ids):
        self._touch()
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def step(self):
        self._touch()
        self.steps += 1
        if self.steps == self.fail_on_step:
            raise RuntimeError("boom")
        outputs = []
        for request_id, state in list(self.requests.items()):
            state[1] += 1
            done = state[1] >= state[0]
            reason = "length" if done else None
            if state[3] == RequestOutputKind.DELTA:   # only this step's token
                completion = CompletionOutput(0, "x", [state[1] - 1], finish_reason=reason,
                                              num_generated_tokens=state[1])
            else:
                completion = CompletionOutput(0, "x" * state[1], list(range(state[1])),
                                              finish_reason=reason)
            outputs.append(RequestOutput(request_id, "p", [1], [completion], done,
                                         RequestMetrics(state[2], state[2], state[2] + 1)))
            if done:
                del self.requests[request_id]
        return outputs

    def has_unfinished_requests(self):
        self._touch()
        return bool(self.requests)

    def get_stats(self):
        self._touch()
        return EngineStats(num_running=len(self.requests))


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def _started(engine: FakeEngine, **kw) -> AsyncEngine:
    async_engine = AsyncEngine(engine, max_waiting_requests=kw.pop("limit", 100), **kw)
    await async_engine.start()
    return async_engine


def test_requests_complete_and_the_engine_stays_on_one_thread():
    async def main():
        engine = FakeEngine()
        async_engine = await _started(engine)
        finals = []
        for i, tokens in enumerate((3, 5, 1)):
            params = SamplingParams(max_tokens=tokens)
            stream = await async_engine.add_request(f"r{i}", "hi", params)
            final = None
            async for final in stream:
                pass
            finals.append(final.outputs[0].text)
        await async_engine.shutdown()
        return engine, finals

    engine, finals = _run(main())
    assert finals == ["xxx", "xxxxx", "x"]
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads


def test_an_engine_built_on_the_engine_executor_runs_on_that_same_thread():
    """The server builds its Engine on the executor thread that later runs it (see
    engine_executor: an OpenMP team on the main thread as well slows every step 3x)."""
    from ferry.server.async_engine import engine_executor

    executor = engine_executor()
    engine = executor.submit(FakeEngine).result()
    engine_thread = executor.submit(threading.get_ident).result()

    async def main():
        async_engine = await _started(engine, executor=executor)
        async for _ in async_engine.generate("r", "hi", SamplingParams(max_tokens=3)):
            pass
        await async_engine.shutdown()

    _run(main())
    assert engine.threads == {engine_thread}


def test_closing_a_stream_aborts_its_request():
    async def main():
        engine = FakeEngine()
        async_engine = await _started(engine)
        stream = await async_engine.add_request("r", "hi", SamplingParams(max_tokens=10**6))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if engine.aborted:
                break
            await asyncio.sleep(0.01)
        await async_engine.shutdown()
        return engine

    engine = _run(main())
    assert engine.aborted == ["r"] and not engine.requests


def test_engine_value_error_reaches_the_caller_before_streaming():
    async def main():
        async_engine = await _started(FakeEngine())
        try:
            with pytest.raises(ValueError, match="empty"):
                await async_engine.add_request("r", "", SamplingParams())
        finally:
            await async_engine.shutdown()

    _run(main())


def test_a_failing_step_fails_requests_in_flight_and_keeps_serving():
    async def main():
        engine = FakeEngine(fail_on_step=2)
        async_engine = await _started(engine)
        stream = await async_engine.add_request("r", "hi", SamplingParams(max_tokens=50))
        with pytest.raises(EngineStepError):
            async for _ in stream:
                pass
        again = await async_engine.add_request("s", "hi", SamplingParams(max_tokens=2))
        texts = [out.outputs[0].text async for out in again]
        await async_engine.shutdown()
        return engine, texts

    engine, texts = _run(main())
    assert "r" in engine.aborted and texts[-1] == "xx"


def test_waiting_limit_and_draining_refuse_new_requests():
    async def main():
        async_engine = await _started(FakeEngine(), limit=2)
        with pytest.raises(EngineOverloadedError):
            async_engine.check_capacity(3)
        async_engine.check_capacity(2)
        async_engine.stop_accepting()
        with pytest.raises(EngineStoppedError):
            await async_engine.add_request("r", "hi", SamplingParams())
        await async_engine.shutdown()

    _run(main())


def test_a_request_past_its_time_limit_is_aborted():
    async def main():
        engine = FakeEngine()
        async_engine = await _started(engine, request_timeout=0.2)
        start = time.monotonic()
        stream = await async_engine.add_request("r", "hi", SamplingParams(max_tokens=10**6))
        with pytest.raises(RequestTimeoutError, match="request_timeout_seconds"):
            async for _ in stream:
                pass
        elapsed = time.monotonic() - start
        quick = [out.outputs[0].text async for out in async_engine.generate(
            "s", "hi", SamplingParams(max_tokens=2))]  # a short one is unaffected
        await async_engine.shutdown()
        return engine, elapsed, quick

    engine, elapsed, quick = _run(main())
    assert 0.2 <= elapsed < 2 and engine.aborted == ["r"] and quick[-1] == "xx"


def test_drain_soon_calls_back_once_the_requests_in_flight_finished():
    async def main():
        async_engine = await _started(FakeEngine())
        stream = await async_engine.add_request("r", "hi", SamplingParams(max_tokens=20))
        drained = asyncio.Event()
        async_engine.drain_soon(30, then=drained.set)
        await asyncio.sleep(0.2)  # the request is done in the engine, not yet read
        assert not drained.is_set() and not async_engine.accepting
        texts = [out.outputs[0].text async for out in stream]
        await asyncio.wait_for(drained.wait(), 5)
        await async_engine.shutdown()
        return texts

    assert _run(main())[-1] == "x" * 20


def test_a_reader_that_fell_behind_gets_the_queued_deltas_folded_into_one():
    """Cumulative outputs: the newest says it all. DELTA ones: the queued ones are added up,
    so nothing a step produced is lost."""
    async def main():
        engine = FakeEngine()
        async_engine = await _started(engine)
        params = SamplingParams(max_tokens=20, output_kind=RequestOutputKind.DELTA)
        stream = await async_engine.add_request("r", "p", params)
        while engine.requests:           # every step runs before the first read
            await asyncio.sleep(0.01)
        outputs = [output async for output in stream]
        await async_engine.shutdown()
        return outputs

    outputs = _run(main())
    assert len(outputs) == 1 and outputs[0].finished
    completion = outputs[0].outputs[0]
    assert completion.text == "x" * 20 and completion.token_ids == list(range(20))
    assert completion.num_generated_tokens == 20 and completion.finish_reason == "length"
