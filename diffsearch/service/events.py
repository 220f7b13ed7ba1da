"""A search's event log: appended from the runner thread, followed by SSE streams on the loop.

The log keeps the newest ``max_events`` events (a search makes one per finished work batch, so
a long search would otherwise grow without bound). A client that connects, or reconnects with
``Last-Event-ID``, gets every kept event after its id in order and then the live tail. A client
whose next event is no longer kept (it fell out of the window), or whose id this log never gave
(one from before a restart), gets a ``snapshot`` event first: the search's state now, carrying
the id just before the oldest kept event, then every kept event. So it never loops asking for
events that are gone, and it always ends with the final status, which is always kept.

Event ids keep counting across restarts and across a record being dropped from memory and read
back (the record saves the next id), so a reconnecting client is never handed a stale id's
successors from an older log.

Writers never block on readers: appending takes a lock for a deque append and schedules a
wake-up on the event loop with ``call_soon_threadsafe``; each follower sleeps on an
``asyncio.Event`` that the wake-up sets and replaces.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_EVENTS = 1000
"""Events a search's log keeps unless the service says otherwise (``--max-events``)."""


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]

    def sse(self) -> str:
        """The event as a server-sent-events frame."""
        return f"id: {self.id}\nevent: {self.kind}\ndata: {json.dumps(self.data)}\n\n"


class EventLog:
    def __init__(self, loop: asyncio.AbstractEventLoop, *,
                 max_events: int = DEFAULT_MAX_EVENTS, first_id: int = 0) -> None:
        """``first_id``: the id of the first event (a log read back goes on from the saved id)."""
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        self._loop = loop
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=max_events)
        self._next = first_id
        self._closed = False
        self._wakeup = asyncio.Event()

    @property
    def next_id(self) -> int:
        """The id the next event will get (what a saved record keeps)."""
        with self._lock:
            return self._next

    def append(self, kind: str, data: dict[str, Any]) -> None:
        """Add an event (from any thread), dropping the oldest beyond ``max_events``. Ignored
        once the log is closed."""
        with self._lock:
            if self._closed:
                return
            self._events.append(Event(self._next, kind, data))
            self._next += 1
        self._wake()

    def close(self) -> None:
        """No more events: followers end after delivering what is there (from any thread)."""
        with self._lock:
            self._closed = True
        self._wake()

    def reopen(self) -> None:
        """Take events again after :meth:`close` (a resumed search). Followers that ended stay
        ended; new ones get the kept events, then the new ones."""
        with self._lock:
            self._closed = False

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._notify)
        except RuntimeError:  # the loop is closed: the service is gone, nobody is following
            pass

    def _notify(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def follow(self, after: int, snapshot: Callable[[], dict[str, Any]],
                     heartbeat: float = 15.0) -> AsyncIterator[Event | None]:
        """Events with id > ``after``, then live ones until the log closes; a ``snapshot``
        event (``snapshot()``'s data) first whenever events the follower has not had were
        dropped, or ``after`` is an id this log never gave. Yields None after ``heartbeat``
        seconds without events (a keep-alive that also detects gone clients)."""
        position = after + 1  # the id of the next event this follower needs
        while True:
            with self._lock:
                first = self._next - len(self._events)
                missed = position < first or position > self._next
                if missed:
                    position = first
                new = list(itertools.islice(self._events, position - first, None))
                closed = self._closed
                waiter = self._wakeup
            if missed and first > 0:  # (from id 0, every event is still there: no snapshot)
                yield Event(first - 1, "snapshot", snapshot())
            for event in new:
                yield event
            position += len(new)
            if new:
                continue
            if closed:
                return
            try:
                await asyncio.wait_for(waiter.wait(), timeout=heartbeat)
            except TimeoutError:  # the builtin TimeoutError from Python 3.11
                yield None


class TooManyStreams(Exception):
    pass


class StreamSlots:
    """How many event streams each search has open, at most ``limit`` each: every open stream
    holds a follower and a connection for as long as its search runs."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def take(self, search_id: str) -> Callable[[], None]:
        """Reserve a stream of ``search_id`` (:class:`TooManyStreams` when all are taken);
        returns its release, which may be called more than once."""
        with self._lock:
            count = self._open.get(search_id, 0)
            if count >= self.limit:
                raise TooManyStreams(
                    f"search {search_id} has {count} event streams open, the most this service "
                    f"allows per search (max_event_streams); close one, or poll "
                    f"GET /v1/searches/{search_id}")
            self._open[search_id] = count + 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                left = self._open[search_id] - 1
                if left:
                    self._open[search_id] = left
                else:
                    del self._open[search_id]

        return release
