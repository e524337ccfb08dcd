"""Wake-ups from other processes: stop requests, and roots waiting for a worker.

On PostgreSQL a dedicated connection LISTENs on a channel: each runtime on
its own stop channel (``stop_channel``), which the ``RequestStop`` write
NOTIFYs at commit, so the hosting runtime, and only it, reacts at once; and
workers on ``CLAIM_CHANNEL``, which a submit NOTIFYs. SQLite has no such
channel: ``wait`` simply times out, and the caller polls. Either way the
caller polls too, so a lost notice costs one interval. ``wake`` ends a wait
from another thread of this process (a worker's slot freed).

When the LISTEN connection breaks (a server restart, a network cut), the
listener polls meanwhile and reconnects with a bounded backoff.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any

import psycopg2

from persistence.database import connect_params
from persistence.outage import Backoff, Outage

logger = logging.getLogger(__name__)

CLAIM_CHANNEL = "actorgraph_claim"
# NOTIFYed by every transaction that changes a status: watchers read again.
STATUS_CHANNEL = "actorgraph_status"


def stop_channel(runtime_id: str) -> str:
    """The channel a runtime LISTENs on for stops of what it hosts (an identifier: 16 + 32 characters)."""
    return "actorgraph_stop_" + runtime_id.replace("-", "")


class Notices:
    def __init__(self, database: Any | None, channel: str) -> None:
        self._channel = channel
        self._closed = threading.Event()
        # A pipe that ``wake`` writes to: select() watches it beside the connection.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._params = connect_params(database) if database is not None else None
        self._connection: Any = None
        self._outage = Outage(logger, f"listener (LISTEN {channel})")
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
                cursor.execute(f"LISTEN {self._channel}")
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

    def wake(self) -> None:
        """End the current (or next) ``wait`` at once; safe from any thread."""
        try:
            os.write(self._wake_write, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake is pending anyway) or closed

    def wait(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for notices or a wake; return the notices' payloads."""
        if self._connection is None and self._params is not None and not self._closed.is_set() \
                and time.monotonic() >= self._next_attempt:
            self._connect()
        connection = self._connection
        watched: list[Any] = [self._wake_read] if connection is None else [self._wake_read, connection]
        try:
            readable, _, _ = select.select(watched, [], [], timeout)
            if self._wake_read in readable:
                self._drain_wakes()
            if connection is None or connection not in readable:
                return []
            connection.poll()
            payloads = [notice.payload for notice in connection.notifies]
            connection.notifies.clear()
            return payloads
        except Exception as exc:  # noqa: BLE001 - a broken listener polls until it reconnects
            if self._closed.is_set():
                return []
            self._outage.failed(exc)
            self._drop()
            self._next_attempt = time.monotonic() + self._backoff.next_delay()
            return []

    def _drain_wakes(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """End waiting: the current wait returns at once, and the connection is closed."""
        self._closed.set()
        self.wake()
        self._drop()

    def shut_down(self, waiter: threading.Thread, timeout: float = 10.0) -> None:
        """Close, wait for ``waiter`` (the thread that waits on these notices), then release the pipe.

        The pipe is released only if ``waiter`` exited: a thread still in
        ``wait`` must not find its descriptors closed under it.
        """
        self.close()
        waiter.join(timeout)
        if not waiter.is_alive():
            self.dispose()

    def dispose(self) -> None:
        """After close, once no thread waits any more: release the wake pipe."""
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001
                pass
