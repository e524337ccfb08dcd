"""Helpers shared by the test suites: bounded waits and an observer connection.

Tests observe persisted state through their own database connection, never
through the runtime's memory, so that a passing test proves a commit.
"""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")

# The only place where the suites sleep: between two looks at a condition.
POLL_INTERVAL = 0.02


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


class Observer:
    """A separate connection to the runtime's database, for reading committed state."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = urlparse(url)
        self.is_sqlite = parsed.scheme == "sqlite"
        if self.is_sqlite:
            self._conn: Any = sqlite3.connect(url[len("sqlite:///"):], timeout=30, isolation_level=None)
            self._conn.execute("PRAGMA foreign_keys=ON")
        else:
            import psycopg2

            self._conn = psycopg2.connect(url)
            self._conn.autocommit = True

    def _sql(self, sql: str) -> str:
        return sql if self.is_sqlite else sql.replace("?", "%s")

    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        """Run a read (``?`` placeholders on both databases) and return dict rows."""
        cur = self._conn.cursor()
        cur.execute(self._sql(sql), params)
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, row)) for row in cur.fetchall()]
        cur.close()
        return rows

    def execute(self, sql: str, params: tuple = ()) -> int:
        """Run a write in its own transaction; return the row count."""
        cur = self._conn.cursor()
        cur.execute(self._sql(sql), params)
        count = cur.rowcount
        cur.close()
        return count

    def execution(self, execution_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM graph_execution WHERE id = ?", (execution_id,))
        return rows[0] if rows else None

    def status(self, execution_id: str) -> str | None:
        row = self.execution(execution_id)
        return row["status"] if row else None

    def subtree(self, root_id: str) -> list[dict[str, Any]]:
        """Every row of the subtree under ``root_id`` (included), read level by level."""
        found: list[dict[str, Any]] = []
        frontier = [root_id]
        while frontier:
            marks = ",".join("?" for _ in frontier)
            rows = self.query(f"SELECT * FROM graph_execution WHERE id IN ({marks})", tuple(frontier))
            found.extend(rows)
            children = self.query(f"SELECT id FROM graph_execution WHERE parent_id IN ({marks})", tuple(frontier))
            frontier = [r["id"] for r in children]
        return found

    def subtree_statuses(self, root_id: str) -> dict[str, str]:
        return {row["id"]: row["status"] for row in self.subtree(root_id)}

    def nodes(self, execution_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM node_execution WHERE graph_execution_id = ? ORDER BY id", (execution_id,)
        )

    def snapshot(self) -> list[tuple]:
        """Every row of both tables, for 'nothing changed' assertions."""
        executions = self.query("SELECT * FROM graph_execution ORDER BY id")
        nodes = self.query("SELECT * FROM node_execution ORDER BY id")
        return [tuple(sorted((k, str(v)) for k, v in row.items())) for row in executions + nodes]

    def close(self) -> None:
        self._conn.close()


def loads_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


ACTORGRAPH_TABLES = ("graph_execution", "node_execution", "runtime", "graph_version", "schema_version")


def database_snapshot(url: str) -> dict[str, Any]:
    """Every actorgraph table that exists and its rows, read without creating anything.

    Unlike ``Observer.snapshot`` this also covers the ``runtime`` and
    ``schema_version`` tables and tells a missing table (or, on SQLite, a
    missing file) apart from an empty one, so that 'nothing was written to the
    database' can be asserted even on a database that has no schema yet.
    """
    if urlparse(url).scheme == "sqlite":
        path = url[len("sqlite:///"):]
        try:
            conn: Any = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        except sqlite3.OperationalError:
            return {"<no database file>": True}
        existing_sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    else:
        import psycopg2

        conn = psycopg2.connect(url)
        conn.autocommit = True
        existing_sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    try:
        cur = conn.cursor()
        cur.execute(existing_sql)
        existing = {row[0] for row in cur.fetchall()}
        snapshot: dict[str, Any] = {}
        for table in ACTORGRAPH_TABLES:
            if table not in existing:
                continue
            cur.execute(f"SELECT * FROM {table}")
            names = [d[0] for d in cur.description]
            rows = [tuple(sorted((n, str(v)) for n, v in zip(names, row))) for row in cur.fetchall()]
            snapshot[table] = sorted(rows)
        cur.close()
        return snapshot
    finally:
        conn.close()


# --- Added for the integration suite ------------------------------------------

import datetime as _dt
import threading as _threading
from collections import defaultdict as _defaultdict

ACTIVE_STATUSES = ("QUEUED", "RUNNING")
TERMINAL_STATUSES = ("COMPLETED", "FAILED", "TERMINATED")
ALL_STATUSES = ACTIVE_STATUSES + TERMINAL_STATUSES


def assert_stays(predicate: Callable[[], Any], duration: float = 1.0, what: str = "condition") -> int:
    """Check ``predicate`` on every poll for ``duration`` seconds; return the number of polls.

    This is the suites' 'pause': time is proven to pass by the monotonic clock
    and by the count of polls, and the condition is checked all along.
    """
    start = time.monotonic()
    polls = 0

    def held_long_enough() -> bool:
        nonlocal polls
        polls += 1
        assert predicate(), f"{what} stopped holding after {time.monotonic() - start:.2f}s"
        return polls >= 5 and time.monotonic() - start >= duration

    wait_until(held_long_enough, timeout=duration + 30.0, what=f"{what} to hold for {duration}s")
    return polls


def as_datetime(value: Any) -> _dt.datetime | None:
    """A timestamp column as an aware UTC datetime (SQLite gives text, PostgreSQL datetimes)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value


def wait_tree_running(observer: Any, root_id: str, executions: int, naps: int, timeout: float = 30.0) -> list[dict]:
    """Wait until the subtree holds ``executions`` rows, all RUNNING, with ``naps`` RUNNING ``nap`` nodes."""

    def ready() -> list[dict] | None:
        rows = observer.subtree(root_id)
        if len(rows) != executions or any(r["status"] != "RUNNING" for r in rows):
            return None
        running_naps = 0
        for row in rows:
            running_naps += sum(
                1 for n in observer.nodes(row["id"]) if n["node_id"] == "nap" and n["status"] == "RUNNING"
            )
        return rows if running_naps == naps else None

    return wait_until(ready, timeout, f"{executions} RUNNING executions with {naps} RUNNING naps under {root_id}")


def wait_status(observer: Any, execution_id: str, *statuses: str, timeout: float = 30.0) -> str:
    """Wait until the row of ``execution_id`` is in one of ``statuses``; return it."""

    def reached() -> str | None:
        status = observer.status(execution_id)
        return status if status in statuses else None

    return wait_until(reached, timeout, f"{execution_id} to reach {statuses}")


class Gates:
    """A user block ``hold(key)`` that waits until the test opens gate ``key`` or its execution stops.

    Register it with ``gates.register(rt)`` (a Runtime or a Client), or pass ``gates.spec``.
    It outputs ``"released"`` or ``"stopped"``; ``started`` lists the keys it ran for.
    """

    def __init__(self) -> None:
        self._lock = _threading.Lock()
        self._events: dict[str, _threading.Event] = _defaultdict(_threading.Event)
        self.started: list[str] = []
        self.outcomes: dict[str, str] = {}

    def _event(self, key: str) -> _threading.Event:
        with self._lock:
            return self._events[key]

    def open(self, key: str) -> None:
        self._event(key).set()

    def open_all(self) -> None:
        with self._lock:
            events = list(self._events.values())
        for event in events:
            event.set()

    def block(self, ctx: Any, key: str) -> dict[str, Any]:
        gate = self._event(key)
        with self._lock:
            self.started.append(key)
        wait_until(lambda: gate.is_set() or ctx.stop_event.is_set(), 120.0, f"gate {key}")
        outcome = "released" if gate.is_set() else "stopped"
        with self._lock:
            self.outcomes[key] = outcome
        return {"value": outcome}

    @property
    def spec(self) -> tuple:
        """``(fn, inputs, outputs)`` for the runtime_factory's ``blocks=``."""
        return (self.block, ("key",), ("value",))

    def register(self, target: Any) -> None:
        """Register the ``hold`` block on ``target``, a Runtime or a Client."""
        fn, inputs, outputs = self.spec
        target.register_block("hold", fn, inputs=inputs, outputs=outputs)


class Recorder:
    """A user block ``mark(value)`` that records every call: proof that a node ran."""

    def __init__(self) -> None:
        self._lock = _threading.Lock()
        self.calls: list[tuple[str, Any]] = []

    def block(self, ctx: Any, value: Any = None) -> dict[str, Any]:
        with self._lock:
            self.calls.append((ctx.execution_id, value))
        return {"value": value}

    def count(self) -> int:
        with self._lock:
            return len(self.calls)

    @property
    def spec(self) -> tuple:
        return (self.block, ("value",), ("value",))


def tree_state(observer: Any, root_id: str) -> list[tuple]:
    """Every row of the subtree under ``root_id`` and of its nodes, for 'nothing changed' checks."""
    rows = sorted(observer.subtree(root_id), key=lambda r: r["id"])
    nodes = [n for r in rows for n in observer.nodes(r["id"])]
    return [tuple(sorted((k, str(v)) for k, v in row.items())) for row in rows + nodes]
