"""Wake-ups for stop requests made by other processes.

On PostgreSQL a dedicated connection LISTENs on ``actorgraph_stop``; the
``RequestStop`` write NOTIFYs it at commit, so the hosting runtime reacts at
once. SQLite has no such channel: ``wait`` simply times out, and the caller
polls. Either way the caller polls too, so a lost notice costs one interval.

When the LISTEN connection breaks (a server restart, a network cut), the
listener polls meanwhile and reconnects with a bounded backoff.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any

import psycopg2

from persistence.database import connect_params
from persistence.outage import Backoff, Outage

logger = logging.getLogger(__name__)

CHANNEL = "actorgraph_stop"


class StopNotices:
    def __init__(self, database: Any | None) -> None:
        self._closed = threading.Event()
        self._params = connect_params(database) if database is not None else None
        self._connection: Any = None
        self._outage = Outage(logger, "stop listener (LISTEN)")
        self._backoff = Backoff()
        self._next_attempt = 0.0
        if self._params is not None:
            self._connect()

    def _connect(self) -> None:
        """Open the LISTEN connection; on failure, try again after a backoff."""
        try:
            connection = psycopg2.connect(**self._params)  # type: ignore[arg-type]
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
        except psycopg2.Error as exc:
            self._outage.failed(exc)
            self._next_attempt = time.monotonic() + self._backoff.next_delay()
            return
        self._connection = connection
        self._backoff.reset()
        if self._outage.active:
            self._outage.succeeded()

    @property
    def listening(self) -> bool:
        """Whether a LISTEN connection is open (one more connection than the pool's)."""
        return self._connection is not None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a notice; True if one (or more) arrived."""
        if self._connection is None and self._params is not None and not self._closed.is_set() \
                and time.monotonic() >= self._next_attempt:
            self._connect()
        connection = self._connection
        if connection is None:
            self._closed.wait(timeout)
            return False
        try:
            readable, _, _ = select.select([connection], [], [], timeout)
            if not readable:
                return False
            connection.poll()
            arrived = bool(connection.notifies)
            connection.notifies.clear()
            return arrived
        except Exception as exc:  # noqa: BLE001 - a broken listener polls until it reconnects
            if self._closed.is_set():
                return False
            self._outage.failed(exc)
            self._drop()
            self._next_attempt = time.monotonic() + self._backoff.next_delay()
            return False

    def close(self) -> None:
        self._closed.set()
        self._drop()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001
                pass
