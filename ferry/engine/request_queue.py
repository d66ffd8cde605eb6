"""Waiting queues: one interface, two policies (``scheduling_policy`` = fcfs | priority).

- FCFS serves requests in the order they were added.
- Priority serves the smallest ``request.priority`` first, then the earliest
  ``arrival_time``, then the smaller request id (so the order is total and repeatable).

A preempted request goes back with :meth:`RequestQueue.prepend`: it keeps its place, its
original arrival, so it is served before every later arrival of its priority.

Each policy also defines :meth:`RequestQueue.sort_key`, the order of importance the
scheduler uses for running requests: the running request with the largest key is the
one preempted when blocks run out.
"""
from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from ferry.request import Request


class RequestQueue(ABC):
    """A queue of waiting requests; iteration yields them in service order."""

    @staticmethod
    @abstractmethod
    def sort_key(request: Request) -> tuple[Any, ...]:
        """Smaller is served first and preempted last."""

    @abstractmethod
    def add(self, request: Request) -> None:
        """Enqueue a newly arrived request."""

    @abstractmethod
    def prepend(self, request: Request) -> None:
        """Put back a preempted request, ahead of later arrivals of its priority."""

    @abstractmethod
    def peek(self) -> Request:
        """The next request to serve (IndexError when empty)."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return the next request to serve (IndexError when empty)."""

    @abstractmethod
    def remove(self, request: Request) -> bool:
        """Remove a request (abort); False when it was not queued."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...

    def __bool__(self) -> bool:
        return len(self) > 0

    def remove_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.remove(request)


class FCFSQueue(RequestQueue):
    """First come, first served: the order of :meth:`add`; :meth:`prepend` puts a request
    back at its arrival place (after earlier arrivals still waiting, e.g. ones preempted
    with it)."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    @staticmethod
    def sort_key(request: Request) -> tuple[Any, ...]:
        return (request.arrival_time, request.request_id)

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        key = self.sort_key(request)
        index = 0
        # Preempted requests are few and go near the front: scan from there.
        while index < len(self._queue) and self.sort_key(self._queue[index]) < key:
            index += 1
        self._queue.insert(index, request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> bool:
        try:
            self._queue.remove(request)
        except ValueError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityQueue(RequestQueue):
    """Smallest (priority, arrival_time, request_id) first, kept in a binary heap.

    A preempted request keeps its key, so adding it back already puts it ahead of later
    arrivals of its priority. Removal (abort) is O(n); aborts are rare next to pops.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[Any, ...], Request]] = []

    @staticmethod
    def sort_key(request: Request) -> tuple[Any, ...]:
        return (request.priority, request.arrival_time, request.request_id)

    def add(self, request: Request) -> None:
        # Keys are unique (they end with the request id), so the Request is never compared.
        heapq.heappush(self._heap, (self.sort_key(request), request))

    def prepend(self, request: Request) -> None:
        self.add(request)

    def peek(self) -> Request:
        return self._heap[0][1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[1]

    def remove(self, request: Request) -> bool:
        for index, (_, queued) in enumerate(self._heap):
            if queued is request:
                last = self._heap.pop()
                if index < len(self._heap):
                    self._heap[index] = last
                    heapq.heapify(self._heap)
                return True
        return False

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (request for _, request in sorted(self._heap, key=lambda item: item[0]))


_POLICIES: dict[str, type[RequestQueue]] = {"fcfs": FCFSQueue, "priority": PriorityQueue}


def create_request_queue(policy: str) -> RequestQueue:
    """A new empty queue for ``policy`` ("fcfs" or "priority")."""
    try:
        return _POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown scheduling_policy {policy!r}; choose one of "
                         f"{sorted(_POLICIES)}") from None
