"""Database selection: one URL in, one configured peewee database out.

Every database-specific setting lives here: SQLite's pragmas and lock mode,
PostgreSQL's connection parameters, and the pool that bounds how many
connections a runtime may hold, however many actors it runs.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from typing import Any
from urllib.parse import urlparse

import peewee
import psycopg2
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from persistence.errors import DatabaseError
from persistence.outage import Backoff

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///actorgraph.db"

# One connection for the writer thread, a few for readers and for callers
# that commit their own writes (API calls from
# user threads, the stop poller, the heartbeat). More readers than this wait
# for a free connection, up to POOL_WAIT seconds, instead of opening more.
MAX_CONNECTIONS = 8
POOL_WAIT = 30.0

# A connection must notice a dead server or a broken network on its own:
# a connect gives up after 5 s, and TCP keepalives plus tcp_user_timeout end
# a connection whose peer stopped answering within about 10 s, so that the
# writer retries on a new one instead of waiting forever on the old one.
PG_CONNECTION_PARAMS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    # The server's side of the same: a session that vanished inside a
    # transaction (its worker was cut off mid-commit) would hold its row
    # locks, and with them its lease row (see writes.begin_transaction), until the
    # server's own TCP noticed, hours later. Our transactions never wait on
    # the client, so 10 s idle inside one means the client is gone.
    "options": "-c idle_in_transaction_session_timeout=10000",
}

# SQLSTATE classes of errors that a later attempt may not meet: connection
# exceptions (08), operator intervention such as a shutdown or a server still
# starting (57), insufficient resources (53), and transaction rollbacks such as
# serialization failures and deadlocks (40).
TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")

# WAL lets readers run beside the one writer; synchronous=NORMAL is durable
# against a crash of the process (not of the machine) and keeps commits cheap;
# the busy timeout covers the rare writer from another process (run.py stop).
# A lock held longer than that is an outage like a server away: the writer
# retries (see is_transient), so the timeout only bounds one attempt.
SQLITE_BUSY_MS = 5_000
# The busy timeout comes first: switching a new file to WAL needs its lock,
# and without a busy handler a second process opening the same new database
# at the same moment would fail at once with "database is locked".
SQLITE_PRAGMAS = (
    ("busy_timeout", SQLITE_BUSY_MS),
    ("journal_mode", "wal"),
    ("foreign_keys", 1),
    ("synchronous", "normal"),
)


class _CountsConnections:
    """Counts the driver connections a database object opens (the benchmark reports it).

    It sits below the pool in the method order, so only real connects count,
    not check-outs of pooled connections.
    """

    connections_opened = 0

    def _connect(self) -> Any:
        connection = super()._connect()  # type: ignore[misc]
        self.connections_opened += 1
        return connection


class _CountingSqlite(_CountsConnections, peewee.SqliteDatabase):
    pass


class _CountingPostgresql(_CountsConnections, peewee.PostgresqlDatabase):
    pass


class SqliteDatabase(PooledSqliteDatabase, _CountingSqlite):
    dialect = "sqlite"


class PostgresqlDatabase(PooledPostgresqlDatabase, _CountingPostgresql):
    """PostgreSQL, whose transactions send their BEGIN with their first statement.

    peewee sends ``BEGIN`` on its own, then each statement, then ``COMMIT``:
    a round trip each. Here ``begin`` only notes the BEGIN, and the
    transaction's first statement carries it (``BEGIN; <statement>``, one
    round trip; the driver returns the statement's result). A transaction
    whose BEGIN was never sent has nothing to commit or roll back. The note
    names the connection it was made on, so that it can never reach
    another one (a connection that broke and was replaced).
    """

    dialect = "postgresql"

    def begin(self, isolation_level: Any = None) -> None:
        level = isolation_level if isolation_level is not None else self._isolation_level
        statement = "BEGIN"
        if level:
            statement = f"BEGIN TRANSACTION ISOLATION LEVEL {self._adapter.isolation_level_str(level)}"
        # connection() connects first if need be, as peewee's own BEGIN does:
        # the transaction's first statement must find the connection it began on.
        self._state.deferred_begin = (self.connection(), statement)

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        deferred = self._pop_deferred_begin()
        if deferred is not None and deferred[0] is self._state.conn:
            sql = f"{deferred[1]}; {sql}"
        return super().execute_sql(sql, params)

    def commit(self) -> None:
        if self._pop_deferred_begin() is None:
            super().commit()

    def rollback(self) -> None:
        if self._pop_deferred_begin() is None:
            super().rollback()

    def _pop_deferred_begin(self) -> tuple[Any, str] | None:
        """The BEGIN not sent yet, with the connection it was made on (None if it was sent)."""
        deferred: tuple[Any, str] | None = getattr(self._state, "deferred_begin", None)
        self._state.deferred_begin = None
        return deferred


# What open_database returns: a pooled peewee database of either kind.
Database = SqliteDatabase | PostgresqlDatabase


def default_url() -> str:
    """The URL used when none is given: env ACTORGRAPH_DATABASE, else a file in the cwd."""
    return os.environ.get("ACTORGRAPH_DATABASE") or DEFAULT_URL


def open_database(url: str | None = None, *, patience: float = 0.0) -> SqliteDatabase | PostgresqlDatabase:
    """Create a pooled database for ``url`` and check that it answers.

    ``patience``: how long to go on trying while the database is away (a
    server restarting, or refusing connections for a moment); by default a
    server that does not answer is an error at once.

    Raises:
        DatabaseError: the URL is malformed, names an unsupported database,
            or the server cannot be reached (within ``patience``).
    """
    url = url or default_url()
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        database = _sqlite(url)
    elif parsed.scheme in ("postgresql", "postgres"):
        database = _postgresql(parsed)
    else:
        raise DatabaseError(
            f"unsupported database URL {url!r}: use sqlite:///file.db or postgresql://user@host:port/db"
        )
    try:
        _first_connect(database, patience)
    except peewee.PeeweeException as exc:
        raise DatabaseError(f"cannot open database {redact(url)}: {first_line(exc)}") from exc
    return database


def require_existing(url: str | None = None) -> None:
    """Refuse a SQLite URL whose file does not exist (a server's database is checked by connecting).

    For whoever only reads or stops what is there: opening would create an
    empty database, and a mistyped path would look like an unknown id.

    Raises:
        DatabaseError: the file does not exist.
    """
    url = url or default_url()
    if urlparse(url).scheme == "sqlite" and not os.path.exists(url[len("sqlite:///"):]):
        raise DatabaseError(f"database file {url[len('sqlite:///'):]} does not exist")


def _first_connect(database: SqliteDatabase | PostgresqlDatabase, patience: float) -> None:
    """Connect once, retrying for ``patience`` s while the database is away.

    SQLite always waits at least its busy timeout while another process
    holds the lock: switching a new file to WAL takes its exclusive lock,
    and SQLite answers "database is locked" at once, without its busy
    handler, when waiting could deadlock (this connection already reads,
    another one writes): two processes opening one new database at the
    same moment meet exactly that.
    """
    if isinstance(database, SqliteDatabase):
        patience = max(patience, SQLITE_BUSY_MS / 1000)
    give_up = time.monotonic() + patience
    backoff = Backoff()
    while True:
        try:
            database.connect(reuse_if_open=True)
            database.close()
            return
        except peewee.OperationalError as exc:
            if not is_transient(exc) or _refused_for_good(exc) or time.monotonic() >= give_up:
                raise
            if not database.is_closed():
                database.manual_close()
            time.sleep(backoff.next_delay())


def _sqlite(url: str) -> SqliteDatabase:
    path = url[len("sqlite:///"):]
    if not path or path == ":memory:":
        # Each actor thread would get its own empty in-memory database.
        raise DatabaseError(f"SQLite URL {url!r} must name a file, e.g. sqlite:///actorgraph.db")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DatabaseError(f"cannot open database {url}: directory {directory} does not exist")
    return SqliteDatabase(
        path,
        pragmas=SQLITE_PRAGMAS,
        # BEGIN IMMEDIATE takes the write lock at the start of a transaction,
        # so a write never fails half-way with 'database is locked'.
        lock_type="IMMEDIATE",
        check_same_thread=False,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT,
        stale_timeout=None,
    )


def _postgresql(parsed: Any) -> PostgresqlDatabase:
    name = parsed.path.lstrip("/")
    if not name:
        raise DatabaseError(f"PostgreSQL URL {redact(parsed.geturl())!r} must name a database")
    params: dict[str, Any] = dict(PG_CONNECTION_PARAMS)
    if parsed.hostname:
        params["host"] = parsed.hostname
    if parsed.port:
        params["port"] = parsed.port
    if parsed.username:
        params["user"] = parsed.username
    if parsed.password:
        params["password"] = parsed.password
    return PostgresqlDatabase(
        name, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT, stale_timeout=None, **params
    )


def connect_params(database: SqliteDatabase | PostgresqlDatabase) -> dict[str, Any]:
    """What a side connection (PostgreSQL LISTEN) needs to reach the same server."""
    return {"dbname": database.database, **database.connect_params}


def is_postgresql(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (checked before anything is opened or created)."""
    return urlparse(url).scheme in ("postgresql", "postgres")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


# What a server says when it answered a connection and refused it for good:
# waiting does not help. libpq reports a refused connection without its
# SQLSTATE, so only the server's message tells it from "the database system
# is starting up" (transient). A server whose messages are not in English is
# waited for as if it were away, and the error comes after the patience.
REFUSED_FOR_GOOD = ("does not exist", "authentication failed", "no pg_hba.conf entry", "permission denied")


def _refused_for_good(exc: peewee.OperationalError) -> bool:
    """Whether a failed connect was answered by the server with a refusal that no retry changes."""
    return any(text in str(exc) for text in REFUSED_FOR_GOOD)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the database was unavailable, rather than that the work was wrong.

    Such a failure is retried: every write is guarded by status, so running
    it again after a connection broke mid-commit changes nothing twice.
    Anything else (a constraint, a bad statement, a bad URL) is not.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, psycopg2.InterfaceError):
            return True  # "connection already closed"
        if isinstance(cause, psycopg2.OperationalError):
            code = getattr(cause, "pgcode", None)
            return code is None or code[:2] in TRANSIENT_SQLSTATE_CLASSES
        if isinstance(cause, sqlite3.OperationalError):
            text = str(cause).lower()
            return "locked" in text or "busy" in text
        # peewee keeps the driver's error as ``orig``.
        cause = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
    return False


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
