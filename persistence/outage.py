"""Riding out a database that is away: bounded backoff, and one log line each way.

Every connection the runtime holds (the writer's, the pool's readers, the
LISTEN connection, the stop watcher's polls) meets the same outage when a
server restarts or the network breaks. Each keeps an ``Outage``: the first
failure logs one warning, the retries stay quiet, and the first success
logs one line saying how long it lasted. No traceback per attempt.
"""
from __future__ import annotations

import logging
import threading
import time

# Retry delays: short at first (a restart is often over within a second),
# doubling up to a ceiling, so a long outage costs one attempt per 2 s.
FIRST_DELAY = 0.05
MAX_DELAY = 2.0


class Backoff:
    """The delays between attempts: FIRST_DELAY, doubling, at most MAX_DELAY."""

    def __init__(self, first: float = FIRST_DELAY, ceiling: float = MAX_DELAY) -> None:
        self._first = first
        self._ceiling = ceiling
        self._next = first

    def next_delay(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self._ceiling)
        return delay

    def reset(self) -> None:
        self._next = self._first


class Outage:
    """Whether one component currently finds the database away, and since when.

    Args:
        logger: where the two lines go.
        what: names the component in them ("writer", "stop watcher", ...).
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._lock = threading.Lock()
        self._since: float | None = None
        self._failures = 0

    @property
    def active(self) -> bool:
        return self._since is not None

    @property
    def since(self) -> float | None:
        """``time.monotonic()`` of the failure that started the outage, if one is on."""
        return self._since

    def failed(self, error: BaseException) -> bool:
        """Record a failed attempt; True if it started an outage (and was logged)."""
        with self._lock:
            self._failures += 1
            if self._since is not None:
                return False
            self._since = time.monotonic()
        self._logger.warning("%s: the database is unavailable (%s); retrying until it answers",
                             self._what, _first_line(error))
        return True

    def succeeded(self) -> None:
        """Record a successful attempt; ends the outage (one line) if one was on."""
        with self._lock:
            since, self._since = self._since, None
            failures, self._failures = self._failures, 0
        if since is not None:
            self._logger.info("%s: the database answers again after %.1fs (%d failed attempts)",
                                 self._what, time.monotonic() - since, failures)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
