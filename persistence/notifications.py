"""Wake-ups for stop requests made by other processes.

On PostgreSQL a dedicated connection LISTENs on ``actorgraph_stop``; the
``RequestStop`` write NOTIFYs it at commit, so the hosting runtime reacts at
once. SQLite has no such channel: ``wait`` simply times out, and the caller
polls. Either way the caller polls too, so a lost notice costs one interval.
"""
from __future__ import annotations

import logging
import select
import threading

import peewee

from persistence.database import connect_params

logger = logging.getLogger(__name__)

CHANNEL = "actorgraph_stop"


class StopNotices:
    def __init__(self, database: peewee.Database | None) -> None:
        self._closed = threading.Event()
        self._connection = None
        if database is not None:
            self._connection = self._listen(database)

    @staticmethod
    def _listen(database: peewee.Database):  # type: ignore[no-untyped-def]
        import psycopg2

        try:
            connection = psycopg2.connect(**connect_params(database))
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
            return connection
        except psycopg2.Error as exc:
            logger.warning("LISTEN unavailable, falling back to polling: %s", exc)
            return None

    @property
    def listening(self) -> bool:
        """Whether a LISTEN connection is open (one more connection than the pool's)."""
        return self._connection is not None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a notice; True if one (or more) arrived."""
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
        except Exception as exc:  # noqa: BLE001 - a broken listener degrades to polling
            if self._closed.is_set():
                return False
            logger.warning("LISTEN connection failed, falling back to polling: %s", exc)
            self._drop()
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
