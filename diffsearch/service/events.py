"""A search's event log: appended from the runner thread, followed by SSE streams on the loop.

Every event is kept (a search makes one per finished work batch), so a client that connects late,
or reconnects with ``Last-Event-ID``, gets the whole history in order and then the live tail.
Writers never block on readers: appending takes a lock for a list append and schedules a wake-up
on the event loop with ``call_soon_threadsafe``; each follower sleeps on an ``asyncio.Event``
that the wake-up sets and replaces.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]

    def sse(self) -> str:
        """The event as a server-sent-events frame."""
        return f"id: {self.id}\nevent: {self.kind}\ndata: {json.dumps(self.data)}\n\n"


class EventLog:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._closed = False
        self._wakeup = asyncio.Event()

    def append(self, kind: str, data: dict[str, Any]) -> None:
        """Add an event (from any thread). Ignored once the log is closed."""
        with self._lock:
            if self._closed:
                return
            self._events.append(Event(len(self._events), kind, data))
        self._wake()

    def close(self) -> None:
        """No more events: followers end after delivering what is there (from any thread)."""
        with self._lock:
            self._closed = True
        self._wake()

    def reopen(self) -> None:
        """Take events again after :meth:`close` (a resumed search). Followers that ended stay
        ended; new ones get the whole log, then the new events."""
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

    async def follow(self, after: int = -1, heartbeat: float = 15.0
                     ) -> AsyncIterator[Event | None]:
        """Events with id > ``after``, then live ones until the log closes. Yields None after
        ``heartbeat`` seconds without events (a keep-alive that also detects gone clients)."""
        position = after + 1
        while True:
            with self._lock:
                new = self._events[position:]
                closed = self._closed
                waiter = self._wakeup
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
