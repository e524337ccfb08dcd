"""Database selection: one URL in, one configured peewee database out.

Every database-specific setting lives here: SQLite's pragmas and lock mode,
PostgreSQL's connection parameters, and the pool that bounds how many
connections a runtime may hold, however many actors it runs.
"""
from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlparse

import peewee
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from persistence.errors import DatabaseError

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///actorgraph.db"

# One connection for the writer thread, a few for readers and for callers
# that commit their own writes (API calls from
# user threads, the stop poller, the heartbeat). More readers than this wait
# for a free connection, up to POOL_WAIT seconds, instead of opening more.
MAX_CONNECTIONS = 8
POOL_WAIT = 30.0

# WAL lets readers run beside the one writer; synchronous=NORMAL is durable
# against a crash of the process (not of the machine) and keeps commits cheap;
# the busy timeout covers the rare writer from another process (run.py stop).
SQLITE_PRAGMAS = (
    ("journal_mode", "wal"),
    ("foreign_keys", 1),
    ("busy_timeout", 30_000),
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
    dialect = "postgresql"


def default_url() -> str:
    """The URL used when none is given: env ACTORGRAPH_DATABASE, else a file in the cwd."""
    return os.environ.get("ACTORGRAPH_DATABASE") or DEFAULT_URL


def open_database(url: str | None = None) -> SqliteDatabase | PostgresqlDatabase:
    """Create a pooled database for ``url`` and check that it answers.

    Raises:
        DatabaseError: the URL is malformed, names an unsupported database,
            or the server cannot be reached.
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
        database.connect(reuse_if_open=True)
        database.close()
    except peewee.PeeweeException as exc:
        raise DatabaseError(f"cannot open database {redact(url)}: {first_line(exc)}") from exc
    return database


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
    params: dict[str, Any] = {"connect_timeout": 5}
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


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
