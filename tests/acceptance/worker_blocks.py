"""User blocks of the worker acceptance tests: ``run.py worker --blocks tests.acceptance.worker_blocks``.

``record`` proves that a node ran, and where: it inserts one row
``(execution_id, node_id, pid, tag)`` into the test-owned table
``worker_runs`` of the database named by the environment variable
``WORKER_TEST_RECORD_DB``. The test creates that table and reads it through a
connection of its own, so a row there is a commit made by the worker process
that ran the block, not something the runtime says about itself.
"""
from __future__ import annotations

import os
import threading
from typing import Any

RECORD_DB_ENV = "WORKER_TEST_RECORD_DB"
RUNS_TABLE = "worker_runs"
RUNS_DDL = (
    f"CREATE TABLE {RUNS_TABLE} ("
    " execution_id TEXT NOT NULL,"
    " node_id TEXT NOT NULL,"
    " pid INTEGER NOT NULL,"
    " tag TEXT,"
    " recorded_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())"
)

# One connection per pool thread: a block never shares a connection with another thread.
_local = threading.local()


def _connection() -> Any:
    import psycopg2

    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        url = os.environ.get(RECORD_DB_ENV)
        if not url:
            raise RuntimeError(f"the record block needs ${RECORD_DB_ENV} (the test database URL)")
        conn = psycopg2.connect(url, connect_timeout=10)
        conn.autocommit = True
        _local.conn = conn
    return conn


def record(ctx: Any, tag: Any = None) -> dict[str, Any]:
    """Insert ``(execution_id, node_id, pid, tag)`` into ``worker_runs``; output the pid."""
    conn = _connection()
    with conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO {RUNS_TABLE} (execution_id, node_id, pid, tag) VALUES (%s, %s, %s, %s)",
            (ctx.execution_id, ctx.node_id, os.getpid(), None if tag is None else str(tag)),
        )
    return {"value": os.getpid()}


def register(registry: Any) -> None:
    """Called by ``--blocks``: ``registry`` is the worker's (or a Client's) block registry."""
    registry.register_block("record", record, inputs=("tag",), outputs=("value",))
