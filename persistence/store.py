"""The store: the only persistence entry point that actors call.

Reads run on pooled connections from the caller's thread; writes go through
the single group-committing ``Writer``. Driver errors are translated into
``DatabaseError`` here, so nothing above this layer sees peewee or psycopg2.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

import peewee

from persistence import database as databases
from persistence.dialect import Dialect, marks, utcnow
from persistence.errors import DatabaseError
from persistence.notifications import CLAIM_CHANNEL, STATUS_CHANNEL, Notices, stop_channel
from persistence.outage import Backoff, Outage
from persistence.promise import Promise
from persistence.records import ExecutionRecord, NodeRecord, StopRequest, loads
from persistence.schema import LATEST_VERSION, current_version, ensure_schema
from persistence.status import ACTIVE, ExecutionStatus
from persistence.writer import Writer
from persistence.writes import LostRuntime, Operation, RecoverLostRuntimes

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ACTIVE = tuple(sorted(s.value for s in ACTIVE))

# An execution's nodes, through the unique (graph_execution_id, node_id) index.
NODES_SQL = ("SELECT graph_execution_id, node_id, block, status, started_at, ended_at, error"
             " FROM node_execution WHERE graph_execution_id = ? ORDER BY id")

# The stop watcher's poll, ten times a second: its runtime's active rows with
# a stop request (the index on (runtime_id, status) finds them without
# reading the rows it finished), less the requests the runtime made itself
# (its actors have them already), and less those that a pending cascading
# request on the parent covers: its cascade reaches the row with a deadline
# as early (a shorter wait_timeout of the row's own is still handed on).
PENDING_STOPS_SQL = (
    "SELECT g.id, g.user_id, g.stop_cascade, g.stop_reason, g.stop_wait_timeout FROM graph_execution g"
    " LEFT JOIN graph_execution p ON p.id = g.parent_id"
    f" WHERE g.runtime_id = ? AND g.stop_requested_at IS NOT NULL AND g.status IN ({marks(_ACTIVE)})"
    " AND (g.stop_requested_by IS NULL OR g.stop_requested_by <> ?)"
    f" AND NOT (p.id IS NOT NULL AND p.stop_requested_at IS NOT NULL AND p.stop_cascade = ?"
    f" AND p.status IN ({marks(_ACTIVE)})"
    " AND (g.stop_wait_timeout IS NULL OR p.stop_wait_timeout IS NULL"
    " OR g.stop_wait_timeout >= p.stop_wait_timeout)) ORDER BY g.depth"
)
_RECORD_COLUMNS = (
    "id, graph_id, user_id, status, parent_id, created_at, started_at, ended_at,"
    " inputs, outputs, error, stop_reason"
)

# A runtime's lease: it renews its heartbeat every 2 s (actors/remote.py), and
# is presumed gone when the heartbeat is older than this. Another process
# then recovers its executions (and fences it: see writes.begin_transaction). Hosts'
# clocks must agree to well within this (NTP does).
STALE_AFTER = dt.timedelta(seconds=15)

# How long a read keeps retrying a database that is away before it fails.
READ_PATIENCE = 5.0

# Runtimes of this process that closed without unregistering (the database
# was away): their rows are recovered like those of a dead process, by the
# next runtime of this process, without waiting for their heartbeat to age.
_CLOSED_RUNTIMES: set[str] = set()
_CLOSED_LOCK = threading.Lock()


def forget_runtime(runtime_id: str) -> None:
    """Mark a runtime of this process as closed: recovery may end what it left active."""
    with _CLOSED_LOCK:
        _CLOSED_RUNTIMES.add(runtime_id)


def _translated(method: Callable[..., T]) -> Callable[..., T]:
    """Raise driver errors as DatabaseError, naming the operation."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except (peewee.PeeweeException, peewee.DatabaseError) as exc:
            raise DatabaseError(f"{method.__name__} failed: {databases.first_line(exc)}") from exc

    return wrapper


class Store:
    """Reads and writes graph executions on one database."""

    def __init__(self, database: databases.Database, url: str, *, writable: bool = True) -> None:
        self.url = url
        self._database = database
        self._sql = Dialect(database)
        self.writer = Writer(database) if writable else None
        self.empty = False
        self._reads = Outage(logger, "database reads")

    @classmethod
    def open(cls, url: str | None = None, *, read_only: bool = False, patient: bool = False) -> "Store":
        """Open ``url`` (default: env ACTORGRAPH_DATABASE, else sqlite:///actorgraph.db).

        A writable store creates or migrates the schema. A read-only store
        changes nothing: on a database without actorgraph's tables it reads
        as empty, and it refuses a schema older than this code's.
        A ``patient`` open waits for a database that is away as long as a
        read does (READ_PATIENCE); otherwise one that does not answer is
        an error at once.
        """
        url = url or databases.default_url()
        if read_only:
            databases.require_existing(url)
        database = databases.open_database(url, patience=READ_PATIENCE if patient else 0.0)
        if not read_only:
            ensure_schema(database)
            return cls(database, url)
        store = cls(database, url, writable=False)
        with database.connection_context():
            version = current_version(database)
        if version == 0:
            store.empty = True
        elif version != LATEST_VERSION:
            raise DatabaseError(f"database schema is version {version}, this actorgraph reads version "
                                f"{LATEST_VERSION}: open it once with a Runtime to migrate it")
        return store

    @property
    def dialect(self) -> str:
        return "sqlite" if self._sql.is_sqlite else "postgresql"

    @property
    def connections_opened(self) -> int:
        """How many database connections this store has opened since it was created."""
        return self._database.connections_opened

    def close(self, drain_timeout: float = 30.0) -> None:
        """Commit what is queued (for up to ``drain_timeout`` s; see Writer.close), then close."""
        if self.writer is not None:
            self.writer.close(drain_timeout)
        self._database.close_all()

    # -- writes -----------------------------------------------------------

    def submit(self, *ops: Operation,
               after: Iterable[Promise] = ()) -> Promise[list[Any]]:
        """Queue ``ops`` for the writer; the future resolves after the commit (see Writer.submit)."""
        if self.writer is None:
            raise DatabaseError("this store was opened read-only")
        return self.writer.submit(*ops, after=tuple(after))

    def write(self, *ops: Operation, timeout: float = 60.0, independent: bool = False) -> list[Any]:
        """Run ``ops`` in one transaction and wait for the commit (see Writer.write)."""
        if self.writer is None:
            raise DatabaseError("this store was opened read-only")
        return self.writer.write(*ops, timeout=timeout, independent=independent)

    # -- reads ------------------------------------------------------------

    def _read(self, statement: str, params: Iterable[Any] = ()) -> list[tuple]:
        """Run a read on a pooled connection, retrying for READ_PATIENCE s while the database is away."""
        if self.empty:
            return []
        if self.writer is not None and self.writer.thread is threading.current_thread():
            raise RuntimeError("the writer thread must not read through the pool")
        params = list(params)
        give_up = time.monotonic() + READ_PATIENCE
        backoff = Backoff()
        while True:
            try:
                with self._database.connection_context():
                    rows = self._sql.fetchall(statement, params)
            except Exception as exc:
                if not databases.is_transient(exc) or time.monotonic() >= give_up:
                    raise
                self._reads.failed(exc)
                # A restarted server leaves every idle pooled connection dead.
                self._database.close_idle()
                time.sleep(backoff.next_delay())
                continue
            if self._reads.active:
                self._reads.succeeded()
            return rows

    def database_away(self, patience: float = 0.5) -> bool:
        """Whether the database is unavailable to this store's writes right now (see Writer.unavailable)."""
        return self.writer is not None and self.writer.unavailable(patience)

    @_translated
    def get(self, execution_id: str) -> ExecutionRecord | None:
        rows = self._read(f"SELECT {_RECORD_COLUMNS} FROM graph_execution WHERE id = ?", [execution_id])
        return self._record(rows[0]) if rows else None

    @_translated
    def children(self, execution_id: str) -> list[ExecutionRecord]:
        rows = self._read(
            f"SELECT {_RECORD_COLUMNS} FROM graph_execution WHERE parent_id = ? ORDER BY created_at, id",
            [execution_id],
        )
        return [self._record(row) for row in rows]

    @_translated
    def subtree(self, execution_id: str) -> list[dict[str, Any]]:
        """Every row under ``execution_id`` (included), in one recursive query, parents first."""
        rows = self._read(
            "WITH RECURSIVE subtree(id, level) AS ("
            " SELECT id, 0 FROM graph_execution WHERE id = ?"
            " UNION ALL SELECT g.id, s.level + 1 FROM graph_execution g JOIN subtree s ON g.parent_id = s.id)"
            " SELECT g.id, g.graph_id, g.user_id, g.status, g.parent_id, g.runtime_id, g.stop_forced, s.level,"
            " g.created_at, g.started_at, g.ended_at, g.error, g.stop_reason"
            " FROM subtree s JOIN graph_execution g ON g.id = s.id ORDER BY s.level, g.created_at, g.id",
            [execution_id],
        )
        keys = ("id", "graph_id", "user_id", "status", "parent_id", "runtime_id", "stop_forced", "level",
                "created_at", "started_at", "ended_at", "error", "stop_reason")
        found = [dict(zip(keys, row)) for row in rows]
        for row in found:
            for column in ("created_at", "started_at", "ended_at"):
                row[column] = Dialect.read_time(row[column])
        return found

    @_translated
    def root_of(self, execution_id: str) -> str | None:
        """The root of ``execution_id``'s tree (itself for a root); None if it does not exist."""
        rows = self._read(
            "WITH RECURSIVE up(id, parent_id) AS ("
            " SELECT id, parent_id FROM graph_execution WHERE id = ?"
            " UNION ALL SELECT g.id, g.parent_id FROM graph_execution g JOIN up u ON g.id = u.parent_id)"
            " SELECT id FROM up WHERE parent_id IS NULL",
            [execution_id],
        )
        return rows[0][0] if rows else None

    def status_notices(self) -> Notices:
        """A listener that wakes when any status change commits (PostgreSQL LISTEN; polls on SQLite)."""
        return Notices(self._database if not self._sql.is_sqlite else None, STATUS_CHANNEL)

    @_translated
    def list_executions(self, user_id: str | None = None, status: ExecutionStatus | None = None,
                        limit: int = 50, roots_only: bool = False) -> list[ExecutionRecord]:
        clauses: list[str] = ["parent_id IS NULL"] if roots_only else []
        params: list[Any] = []
        if user_id is not None:
            clauses.append("user_id = ?")
            params.append(user_id)
        if status is not None:
            clauses.append("status = ?")
            params.append(ExecutionStatus(status).value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(
            f"SELECT {_RECORD_COLUMNS} FROM graph_execution{where} ORDER BY created_at DESC, id LIMIT ?",
            [*params, limit],
        )
        return [self._record(row) for row in rows]

    @_translated
    def nodes(self, execution_id: str) -> list[NodeRecord]:
        rows = self._read(NODES_SQL, [execution_id])
        return [NodeRecord(r[0], r[1], r[2], ExecutionStatus(r[3]), Dialect.read_time(r[4]),
                           Dialect.read_time(r[5]), r[6]) for r in rows]

    @_translated
    def count_active(self, ids: list[str]) -> int:
        """How many of ``ids`` are still QUEUED or RUNNING."""
        if not ids:
            return 0
        rows = self._read(
            f"SELECT COUNT(*) FROM graph_execution WHERE id IN ({marks(ids)}) AND status IN ({marks(_ACTIVE)})",
            [*ids, *_ACTIVE],
        )
        return int(rows[0][0])

    @_translated
    def pending_stops(self, runtime_id: str) -> list[StopRequest]:
        """Stop requests from elsewhere aimed at executions ``runtime_id`` hosts.

        Only the top of each stopped subtree: a descendant whose parent carries
        a pending cascading request is reached by that parent's cascade,
        unless its own request has a shorter wait_timeout.
        """
        rows = self._read(PENDING_STOPS_SQL, [runtime_id, *_ACTIVE, runtime_id, True, *_ACTIVE])
        return [StopRequest(execution_id=row[0], user_id=row[1], cascade=bool(row[2]), reason=row[3],
                            wait_timeout=None if row[4] is None else float(row[4])) for row in rows]

    @_translated
    def runtime_of(self, execution_id: str) -> dict[str, Any] | None:
        """The runtime row hosting ``execution_id``, if it is registered."""
        rows = self._read(
            "SELECT r.id, r.host, r.pid, r.heartbeat_at FROM graph_execution g"
            " JOIN runtime r ON r.id = g.runtime_id WHERE g.id = ?",
            [execution_id],
        )
        if not rows:
            return None
        runtime_id, host, pid, heartbeat = rows[0]
        return {"id": runtime_id, "host": host, "pid": pid, "heartbeat_at": Dialect.read_time(heartbeat)}

    # -- runtimes that are gone ------------------------------------------

    @_translated
    def lost_runtimes(self, now: dt.datetime | None = None) -> list[LostRuntime]:
        """Runtimes that still own active executions but are gone.

        Gone means: on this host with a dead pid, or anywhere with a stale
        heartbeat, or not registered at all (its row was already removed).
        """
        now = now or utcnow()
        rows = self._read(
            "SELECT DISTINCT g.runtime_id, r.host, r.pid, r.heartbeat_at FROM graph_execution g"
            " LEFT JOIN runtime r ON r.id = g.runtime_id"
            f" WHERE g.runtime_id IS NOT NULL AND g.status IN ({marks(_ACTIVE)})",
            list(_ACTIVE),
        )
        lost = []
        with _CLOSED_LOCK:
            closed = set(_CLOSED_RUNTIMES)
        for runtime_id, host, pid, heartbeat in rows:
            seen = Dialect.read_time(heartbeat)
            seen = seen.replace(tzinfo=None) if seen is not None else None
            if host is None:
                lost.append(LostRuntime(runtime_id, f"{runtime_id} (unregistered)", None))
            elif runtime_id in closed:
                lost.append(LostRuntime(runtime_id, f"{runtime_id} (closed while the database was unavailable)",
                                        seen))
            elif is_gone(host, pid, Dialect.read_time(heartbeat), now):
                lost.append(LostRuntime(runtime_id, f"{runtime_id} (host {host}, pid {pid})", seen))
        return lost

    def recover_lost(self) -> tuple[str, ...]:
        """End the executions of every lost runtime (see RecoverLostRuntimes); returns their ids."""
        lost = self.lost_runtimes()
        if not lost:
            return ()
        # In a transaction of its own on PostgreSQL: it neither holds up the
        # actors' writes nor waits behind them.
        (ended,) = self.write(RecoverLostRuntimes(runtimes=tuple(lost), at=utcnow()), independent=True)
        if ended:
            logger.warning("recovered %d executions of lost runtimes %s", len(ended),
                           ", ".join(runtime.description for runtime in lost))
        return ended

    def stop_notices(self, runtime_id: str) -> Notices:
        """A listener that wakes when another process requests a stop of what ``runtime_id`` hosts."""
        return Notices(self._database if not self._sql.is_sqlite else None, stop_channel(runtime_id))

    def claim_notices(self) -> Notices:
        """A listener that wakes when a root is submitted for the workers (PostgreSQL LISTEN)."""
        return Notices(self._database if not self._sql.is_sqlite else None, CLAIM_CHANNEL)

    def hold_lease(self, runtime_id: str, on_lost: Callable[[], None]) -> None:
        """Fence every later write by ``runtime_id``'s lease (see Writer.fence)."""
        if self.writer is None:
            raise DatabaseError("this store was opened read-only")
        self.writer.fence(runtime_id, on_lost)

    # -- graph versions ------------------------------------------------------

    @_translated
    def graph_versions(self) -> list[str]:
        """Every stored graph version."""
        return [row[0] for row in self._read("SELECT version FROM graph_version")]

    @_translated
    def graph_definition(self, version: str) -> tuple[str, str] | None:
        """A stored version's (graph id, canonical JSON definition)."""
        rows = self._read("SELECT graph_id, definition FROM graph_version WHERE version = ?", [version])
        return (rows[0][0], rows[0][1]) if rows else None

    def _record(self, row: tuple) -> ExecutionRecord:
        (id_, graph_id, user_id, status, parent_id, created, started, ended,
         inputs, outputs, error, stop_reason) = row
        return ExecutionRecord(
            id=id_, graph_id=graph_id, user_id=user_id, status=ExecutionStatus(status),
            parent_id=parent_id, created_at=_required(Dialect.read_time(created), "created_at"),
            started_at=Dialect.read_time(started), ended_at=Dialect.read_time(ended),
            inputs=loads(inputs) or {}, outputs=loads(outputs), error=error, stop_reason=stop_reason,
        )


def _required(value: dt.datetime | None, column: str) -> dt.datetime:
    if value is None:
        raise DatabaseError(f"graph_execution.{column} is NULL")
    return value


def is_gone(host: str, pid: int, heartbeat: dt.datetime | None, now: dt.datetime) -> bool:
    """Whether a registered runtime no longer runs.

    On this host a dead pid says so at once. Anywhere, a heartbeat older than
    STALE_AFTER does too (this also covers a pid reused by another process).
    """
    if host == socket.gethostname() and not pid_alive(pid):
        return True
    return heartbeat is None or now.replace(tzinfo=dt.timezone.utc) - heartbeat > STALE_AFTER


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True

