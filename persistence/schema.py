"""Schema versions: create a new database at the latest version, migrate older ones.

Version 1: graph_execution and node_execution.
Version 2: the runtime registry (table ``runtime``) and the columns that let
           another process stop and recover executions: ``runtime_id``,
           ``stop_cascade``, ``stop_forced``.
Version 3: stored graph versions (table ``graph_version``) and the version
           each execution runs (``graph_execution.graph_version``): what lets
           a worker run exactly the graph that was submitted.
Version 4: the index on ``runtime_id`` becomes one on ``(runtime_id, status)``.
           The stop watcher asks ten times a second for its runtime's active
           rows with a stop request; with ``runtime_id`` alone SQLite read
           every row the runtime ever hosted (11 to 17 ms per poll at
           100,000: benchmarks/stop_poll.py).
Version 5: a stop request carries its ``wait_timeout`` to the hosting runtime
           (``stop_wait_timeout``), and names the runtime that asked when it
           hosts the row itself (``stop_requested_by``). Before, the host
           applied 15 s to every request from elsewhere, and its own stop
           watcher handed its own requests back to it with 15 s, cutting a
           longer ``wait_timeout`` short.
Version 6: node_execution loses its index on ``graph_execution_id`` alone,
           which the unique (graph_execution_id, node_id) index made
           redundant. On PostgreSQL a node's status write rarely finds room
           on its row's page (a HOT update), so every index of the table gets
           a new entry: the redundant one made a stop's node statement about
           a third slower.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import peewee

from persistence.errors import DatabaseError
from persistence.models import MODELS, GraphVersionRow, RuntimeRow, SchemaVersion

logger = logging.getLogger(__name__)

LATEST_VERSION = 6

# The name peewee gives the (runtime_id, status) index of models.py, which
# the migration to version 4 creates under the same name.
RUNTIME_STATUS_INDEX = "graph_execution_runtime_id_status"

# node_execution's unique (graph_execution_id, node_id) index, by the name
# peewee gives it, and the index its foreign key had up to version 5.
NODE_INDEX = "node_execution_graph_execution_id_node_id"
REDUNDANT_NODE_INDEX = "node_execution_graph_execution_id"

# bind_ctx rebinds the model classes for the whole process: one at a time.
_BIND_LOCK = threading.Lock()


def _to_version_2(database: peewee.Database) -> None:
    # Plain ALTER TABLE ... ADD COLUMN with a default: peewee's migrator
    # would rebuild the SQLite table for NOT NULL, and dropping the old
    # table cascades into node_execution.
    sqlite = isinstance(database, peewee.SqliteDatabase)
    boolean, true, false = ("INTEGER", "1", "0") if sqlite else ("BOOLEAN", "TRUE", "FALSE")
    for statement in (
        "ALTER TABLE graph_execution ADD COLUMN runtime_id VARCHAR(255)",
        f"ALTER TABLE graph_execution ADD COLUMN stop_cascade {boolean} NOT NULL DEFAULT {true}",
        f"ALTER TABLE graph_execution ADD COLUMN stop_forced {boolean} NOT NULL DEFAULT {false}",
        "CREATE INDEX graph_execution_runtime_id ON graph_execution (runtime_id)",
    ):
        database.execute_sql(statement)
    database.create_tables([RuntimeRow])


def _to_version_3(database: peewee.Database) -> None:
    database.execute_sql("ALTER TABLE graph_execution ADD COLUMN graph_version VARCHAR(64)")
    database.create_tables([GraphVersionRow])


def _to_version_4(database: peewee.Database) -> None:
    database.execute_sql("DROP INDEX IF EXISTS graph_execution_runtime_id")
    database.execute_sql(f"CREATE INDEX {RUNTIME_STATUS_INDEX} ON graph_execution (runtime_id, status)")


def _to_version_5(database: peewee.Database) -> None:
    database.execute_sql("ALTER TABLE graph_execution ADD COLUMN stop_wait_timeout DOUBLE PRECISION")
    database.execute_sql("ALTER TABLE graph_execution ADD COLUMN stop_requested_by VARCHAR(255)")


def _to_version_6(database: peewee.Database) -> None:
    # Every version created the unique index; it is made sure of first all the
    # same, so that no database is left without an index on the column.
    database.execute_sql(f"CREATE UNIQUE INDEX IF NOT EXISTS {NODE_INDEX}"
                         " ON node_execution (graph_execution_id, node_id)")
    database.execute_sql(f"DROP INDEX IF EXISTS {REDUNDANT_NODE_INDEX}")


MIGRATIONS: dict[int, Callable[[peewee.Database], None]] = {
    2: _to_version_2, 3: _to_version_3, 4: _to_version_4, 5: _to_version_5, 6: _to_version_6}


def current_version(database: peewee.Database) -> int:
    """0 for an empty database, else the version stamped in schema_version."""
    if not database.table_exists("schema_version"):
        return 1 if database.table_exists("graph_execution") else 0
    row = database.execute_sql("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def ensure_schema(database: peewee.Database) -> int:
    """Bring the database to ``LATEST_VERSION``; return the version it had.

    A new database gets the latest tables at once; an older one runs each
    migration after its version, in order. All of it happens in one
    transaction that holds the schema lock (SQLite: BEGIN IMMEDIATE;
    PostgreSQL: an advisory lock), so two processes opening the same new
    database at once do not both create it, and a failure changes nothing.
    """
    with _BIND_LOCK, database.bind_ctx(MODELS), database.connection_context():
        try:
            # A database already at this version (the common case) is only
            # read, without the schema lock: SQLite's is its write lock, which
            # another process may hold past the busy timeout, and a stop from
            # elsewhere must not fail for it. Under the lock the version is
            # read again: another process may have migrated meanwhile.
            found = current_version(database)
            if found == LATEST_VERSION:
                return found
            with database.atomic():
                _lock_schema(database)
                return _upgrade(database)
        except peewee.PeeweeException as exc:
            raise DatabaseError(f"cannot prepare the database schema: {exc}") from exc


def _lock_schema(database: peewee.Database) -> None:
    if isinstance(database, peewee.PostgresqlDatabase):
        database.execute_sql("SELECT pg_advisory_xact_lock(?)".replace("?", "%s"), (_ADVISORY_KEY,))


def _upgrade(database: peewee.Database) -> int:
    found = current_version(database)
    if found == LATEST_VERSION:
        return found
    if found == 0:
        database.create_tables(MODELS)
        SchemaVersion.insert(version=LATEST_VERSION).execute()
        return found
    if found > LATEST_VERSION:
        raise DatabaseError(
            f"database schema version {found} is newer than this actorgraph ({LATEST_VERSION})")
    if not database.table_exists("schema_version"):
        database.create_tables([SchemaVersion])
    for version in range(found + 1, LATEST_VERSION + 1):
        MIGRATIONS[version](database)
        SchemaVersion.insert(version=version).execute()
        logger.info("migrated database schema to version %d", version)
    return found


# Any constant works; it names "actorgraph's schema" among advisory locks.
_ADVISORY_KEY = 0x6163746F72
