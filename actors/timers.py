"""One thread for every timer in a runtime: sleeping nodes, stop deadlines, housekeeping.

A sleeping node holds an entry in a heap, not a thread, so ten thousand
sleeping executions cost ten thousand small tuples. Callbacks run on the
timer thread and must be quick (typically: tell an actor).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

# Every this many timers set, cancelled entries are swept out of the heap.
COMPACT_EVERY = 4096


class TimerHandle:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Callable[[], None] | None = callback
        self.cancelled = False

    def cancel(self) -> bool:
        """Cancel; True if the callback had not run yet.

        The callback is dropped at once: a cancelled entry stays in the heap
        until it is due (a stopped leaf may have slept for an hour), and its
        closure would keep the whole stopped actor, and through it its
        ending and its parent's, alive until then.
        """
        was_pending = not self.cancelled
        self.cancelled = True
        self.callback = None
        return was_pending


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, TimerHandle]] = []
        self._sequence = itertools.count()
        self._condition = threading.Condition()
        self._closed = False
        self._pushes = 0
        self._thread = threading.Thread(target=self._loop, name="actorgraph-timers", daemon=True)
        self._thread.start()

    def call_at(self, when: float, callback: Callable[[], None], priority: int = 0) -> TimerHandle:
        """Run ``callback`` at ``time.monotonic() >= when``.

        Among timers due at the same instant, higher ``priority`` runs first
        (stop deadlines use the depth, so children are forced before parents).
        """
        handle = TimerHandle(callback)
        with self._condition:
            self._pushes += 1
            if self._pushes % COMPACT_EVERY == 0:
                self._drop_cancelled()
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (when, -priority, next(self._sequence), handle))
            # Wake the thread only if it now has to fire sooner: a stop arms
            # a thousand deadlines for the same instant, and one wake will do.
            if earliest is None or when < earliest:
                self._condition.notify()
        return handle

    def _drop_cancelled(self) -> None:
        """Under the lock: forget cancelled entries, so cancelling never grows the heap for long."""
        live = [entry for entry in self._heap if not entry[3].cancelled]
        if len(live) < len(self._heap):
            heapq.heapify(live)
            self._heap = live

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return self.call_at(time.monotonic() + max(0.0, delay), callback)

    def call_soon(self, callback: Callable[[], None]) -> TimerHandle:
        return self.call_at(0.0, callback, priority=1 << 30)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(10)

    def _loop(self) -> None:
        while True:
            handle = self._next_due()
            if handle is None:
                return
            callback, handle.callback = handle.callback, None
            if handle.cancelled or callback is None:
                continue
            handle.cancelled = True
            try:
                callback()
            except Exception:  # noqa: BLE001 - one bad callback must not stop every timer
                logger.exception("timer callback failed")

    def _next_due(self) -> TimerHandle | None:
        with self._condition:
            while not self._closed:
                if self._heap:
                    when = self._heap[0][0]
                    delay = when - time.monotonic()
                    if delay <= 0:
                        return heapq.heappop(self._heap)[3]
                    self._condition.wait(delay)
                else:
                    self._condition.wait()
            return None
