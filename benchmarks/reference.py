"""The reference algorithm that the runtime replaces.

A recursive ``asyncio`` stop: for each execution, select its children with
one query, stop them all with ``asyncio.gather(..., return_exceptions=True)``,
then commit its own status TERMINATED in its own transaction. Every peewee
call goes through ``asyncio.to_thread``, so the default executor's threads
each hold their own connection (peewee keeps one per thread).

The event loop and its executor live as long as the ``Reference``, so that
repetitions after the first reuse warm connections, as the runtime does.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from benchmarks.database import is_postgres, open_database

# asyncio's own default for its executor, made explicit.
DEFAULT_WORKERS = min(32, (os.cpu_count() or 1) + 4)
CLOSE_TIMEOUT_SECONDS = 30.0


class Reference:
    """Runs the reference stop on the rows of an existing tree."""

    def __init__(self, url: str, workers: int = DEFAULT_WORKERS) -> None:
        self._db = open_database(url)
        self._postgres = is_postgres(url)
        p = self._db.param
        self._select_sql = f"SELECT id FROM graph_execution WHERE parent_id = {p}"
        self._terminate_sql = (
            f"UPDATE graph_execution SET status = 'TERMINATED', ended_at = {p}"
            f" WHERE id = {p} AND status IN ('QUEUED', 'RUNNING')")
        self._workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reference")
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self._executor)
        self._connections = 0
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def open_connections(self) -> int:
        """How many connections the reference's threads have opened (and keep)."""
        return self._connections

    def close(self) -> None:
        """Close every worker's connection, then stop the executor and the loop."""
        self._close_worker_connections()
        self._loop.run_until_complete(self._loop.shutdown_default_executor())
        self._loop.close()

    def _close_worker_connections(self) -> None:
        # peewee keeps one connection per thread and only that thread may close
        # it (sqlite3 checks), so every worker runs one close task: the barrier
        # holds each task until all workers have one, so no worker takes two.
        barrier = threading.Barrier(self._workers)

        def close_own() -> None:
            barrier.wait(timeout=CLOSE_TIMEOUT_SECONDS)
            self._db.close()

        for task in [self._executor.submit(close_own) for _ in range(self._workers)]:
            task.result(timeout=CLOSE_TIMEOUT_SECONDS)
        self._connections = 0

    def time_stop(self, root_id: str) -> float:
        """Stop the tree under ``root_id``; return the elapsed seconds."""
        return self._loop.run_until_complete(self._timed_stop(root_id))

    async def _timed_stop(self, root_id: str) -> float:
        started = time.perf_counter()
        await self._stop(root_id)
        return time.perf_counter() - started

    async def _stop(self, execution_id: str) -> None:
        children = await asyncio.to_thread(self._select_children, execution_id)
        # Children first, all at once; a child's failure must not keep the parent running.
        results = await asyncio.gather(*(self._stop(child) for child in children),
                                       return_exceptions=True)
        self.errors.extend(r for r in results if isinstance(r, BaseException))
        await asyncio.to_thread(self._commit_terminated, execution_id)

    def _select_children(self, execution_id: str) -> list[str]:
        self._ensure_connection()
        cursor = self._db.execute_sql(self._select_sql, (execution_id,))
        return [row[0] for row in cursor.fetchall()]

    def _commit_terminated(self, execution_id: str) -> None:
        self._ensure_connection()
        now = datetime.now(timezone.utc)
        ended_at = now if self._postgres else now.isoformat(sep=" ")
        with self._db.atomic():
            self._db.execute_sql(self._terminate_sql, (ended_at, execution_id))

    def _ensure_connection(self) -> None:
        if self._db.connect(reuse_if_open=True):
            with self._lock:
                self._connections += 1
