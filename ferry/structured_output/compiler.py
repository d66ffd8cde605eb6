"""Compiles constraints off the engine thread, once per (constraint, tokenizer).

One ``GrammarCompiler`` serves one engine (one tokenizer), so its cache key is the
constraint's canonical form. ``submit`` returns a future the engine polls without waiting;
the server calls ``compile_async`` first, so a bad constraint is a 400 before the request
reaches the engine (and the engine then finds it compiled).
"""
from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ferry.sampling_params import StructuredOutputsParams
from ferry.structured_output.backend import CompiledGrammar, GrammarBackend, GrammarError

BACKENDS = ("auto", "xgrammar", "guidance")
CACHE_SIZE = 256


def make_backend(name: str, tokenizer: Any, vocab_size: int,
                 stop_token_ids: list[int]) -> GrammarBackend:
    """``auto`` is llguidance, else xgrammar (whichever is installed).

    Why llguidance first: xgrammar 0.2 lets a JSON string take UTF-8 surrogate code points
    (bytes ED A0-BF, which decode to U+FFFD) and, when its length is bounded, raw control
    characters; both break the schema (tests/structured_output/test_backends.py). llguidance
    masks neither wrongly, and refuses schema keywords it cannot enforce.
    """
    if name not in BACKENDS:
        raise ValueError(f"structured_output_backend must be one of {BACKENDS}, got {name!r}")
    order = {"auto": ("guidance", "xgrammar"), "guidance": ("guidance",),
             "xgrammar": ("xgrammar",)}[name]
    for choice in order:
        try:
            if choice == "guidance":
                from ferry.structured_output.guidance_backend import GuidanceBackend
                return GuidanceBackend(tokenizer, vocab_size, stop_token_ids)
            from ferry.structured_output.xgrammar_backend import XGrammarBackend
            return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
        except ImportError:
            continue
    needs = "xgrammar or llguidance" if name == "auto" else {"guidance": "llguidance"}.get(name, name)
    raise ImportError(f"structured_output_backend={name} needs {needs}: "
                      "pip install 'ferry[structured]'")


class GrammarCompiler:
    """Thread-safe compile cache (LRU of futures, so concurrent requests for one constraint
    compile it once). Backends are built lazily, on the first constrained request."""

    def __init__(self, backend_name: str, tokenizer: Any, vocab_size: int,
                 stop_token_ids: list[int], workers: int = 1) -> None:
        if backend_name not in BACKENDS:
            raise ValueError(f"structured_output_backend must be one of {BACKENDS}, "
                             f"got {backend_name!r}")
        self.backend_name = backend_name
        self.vocab_size = vocab_size
        self._args = (tokenizer, vocab_size, list(stop_token_ids))
        self._backend: GrammarBackend | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ferry-grammar")

    def submit(self, spec: StructuredOutputsParams) -> "Future[CompiledGrammar]":
        """A future of the compiled grammar; it raises ``GrammarError`` when it fails."""
        try:
            key = spec.key()
        except ValueError as exc:
            return _failed(GrammarError(str(exc)))
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: self._forget_failure(key, f))
        return future

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Compile now (waits on the pool); raises ``GrammarError``."""
        return self.submit(spec).result()

    async def compile_async(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        return await asyncio.wrap_future(self.submit(spec))

    def _compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        with self._lock:
            if self._backend is None:
                try:
                    self._backend = make_backend(self.backend_name, *self._args)
                except ImportError as exc:
                    raise GrammarError(f"structured output is not available: {exc}") from None
            backend = self._backend
        try:
            return backend.compile(spec)
        except GrammarError:
            raise
        except Exception as exc:  # noqa: BLE001 - a library's own complaint about the input
            raise GrammarError(f"invalid {spec.kind} constraint: {exc}") from None

    def _forget_failure(self, key: tuple, future: Future) -> None:
        # Only a user's bad constraint is remembered; anything else is tried again.
        if future.exception() is not None and not isinstance(future.exception(), GrammarError):
            with self._lock:
                self._cache.pop(key, None)

    def fill_bitmasks(self, matchers: list, bitmask: Any) -> None:
        """Row ``i`` of ``bitmask`` (K, W) for ``matchers[i]``: in one batched call where
        the backend has one (llguidance), else one matcher at a time."""
        fill_batch = getattr(self._backend, "fill_batch", None)
        if fill_batch is not None and len(matchers) > 1:
            fill_batch(matchers, bitmask)
            return
        for index, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask, index)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_compiler(backend_name: str, tokenizer: Any, vocab_size: int,
                  stop_token_ids: list[int]) -> GrammarCompiler:
    return GrammarCompiler(backend_name, tokenizer, vocab_size, stop_token_ids)


def _failed(exc: Exception) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future
