"""The benchmark's own database connections, never the runtime's.

Everything here goes through a plain peewee ``Database`` opened from the URL
(``playhouse.db_url.connect``) with SQL against the fixed tables
``graph_execution(id, parent_id, status, ended_at)`` and
``node_execution(graph_execution_id, status, ended_at)``. On PostgreSQL the
benchmark's connections carry the application name ``actorgraph-bench`` so
that the runtime's own connections can be counted apart from them.
"""
from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import urlparse

import peewee
from playhouse import db_url

BENCH_APPLICATION_NAME = "actorgraph-bench"
ACTORGRAPH_TABLES = ("graph_execution", "node_execution", "runtime", "graph_version", "schema_version")
POLL_INTERVAL_SECONDS = 0.02
SQLITE_BUSY_TIMEOUT_SECONDS = 30

# Every execution under (and including) a root, in one recursive query. It is a
# subquery, not a prefix: sqlite3 reports no row count for a statement that
# starts with WITH.
_SUBTREE_IDS = (
    "(WITH RECURSIVE subtree(id) AS ("
    " SELECT id FROM graph_execution WHERE id = {p}"
    " UNION ALL"
    " SELECT child.id FROM graph_execution child JOIN subtree ON child.parent_id = subtree.id)"
    " SELECT id FROM subtree)"
)


def is_postgres(url: str) -> bool:
    return urlparse(url).scheme.startswith("postgres")


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///...`` URL."""
    return url[len("sqlite:///"):]


def open_database(url: str) -> peewee.Database:
    """A plain peewee database on ``url``, marked as the benchmark's own."""
    if is_postgres(url):
        return db_url.connect(url, application_name=BENCH_APPLICATION_NAME)
    return db_url.connect(url, timeout=SQLITE_BUSY_TIMEOUT_SECONDS)


def drop_actorgraph_tables(url: str) -> None:
    """Drop actorgraph's tables so that a shape starts from an empty PostgreSQL database."""
    database = open_database(url)
    try:
        database.execute_sql(f"DROP TABLE IF EXISTS {', '.join(ACTORGRAPH_TABLES)} CASCADE")
    finally:
        database.close()


def remove_sqlite_files(path: str) -> None:
    """Remove a SQLite database file and its WAL companions, if present."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass


class Observer:
    """Reads and resets rows through its own connection, as a second process would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db = open_database(url)
        self._subtree_ids = _SUBTREE_IDS.format(p=self._db.param)

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def status_counts(self, root_id: str) -> dict[str, int]:
        """How many executions of the subtree under ``root_id`` are in each status."""
        cursor = self._db.execute_sql(
            "SELECT status, count(*) FROM graph_execution"
            f" WHERE id IN {self._subtree_ids} GROUP BY status",
            (root_id,),
        )
        return {status: count for status, count in cursor.fetchall()}

    def wait_all_running(self, root_id: str, expected: int, timeout: float) -> None:
        """Poll until ``expected`` executions under ``root_id`` are RUNNING.

        The pause between two looks grows with the cost of a look, so that
        counting a large tree never takes more than a third of a core from the
        runtime that is building it.

        Raises:
            RuntimeError: an execution of the tree ended before any stop.
            TimeoutError: naming the counts reached, when ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            looked = time.monotonic()
            counts = self.status_counts(root_id)
            if counts.get("RUNNING", 0) >= expected:
                return
            ended = {s: n for s, n in counts.items() if s not in ("QUEUED", "RUNNING")}
            if ended:
                raise RuntimeError(f"tree {root_id}: {ended} before any stop ({counts})")
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"tree {root_id}: {counts} after {timeout:.0f}s, expected {expected} RUNNING")
            time.sleep(max(POLL_INTERVAL_SECONDS, 2 * (time.monotonic() - looked)))

    def subtree(self, root_id: str) -> list[str]:
        """The ids of every execution under (and including) ``root_id``."""
        cursor = self._db.execute_sql(f"SELECT id FROM graph_execution WHERE id IN {self._subtree_ids}",
                                      (root_id,))
        return [execution_id for (execution_id,) in cursor.fetchall()]

    def reset_to_running(self, root_id: str, nodes: bool = False) -> int:
        """Set every row under ``root_id`` back to RUNNING in one UPDATE; return the row count.

        With ``nodes``, their TERMINATED nodes too (those a stop ended), first.
        """
        with self._db.atomic():
            if nodes:
                self._db.execute_sql(
                    "UPDATE node_execution SET status = 'RUNNING', ended_at = NULL"
                    f" WHERE status = 'TERMINATED' AND graph_execution_id IN {self._subtree_ids}",
                    (root_id,),
                )
            cursor = self._db.execute_sql(
                "UPDATE graph_execution SET status = 'RUNNING', ended_at = NULL"
                f" WHERE id IN {self._subtree_ids}",
                (root_id,),
            )
        return cursor.rowcount

    def server_version(self) -> str:
        """The database server's version string."""
        if is_postgres(self.url):
            return str(self._db.execute_sql("SELECT version()").fetchone()[0])
        return "SQLite " + str(self._db.execute_sql("SELECT sqlite_version()").fetchone()[0])

    def runtime_connections(self, other_bench_connections: int) -> int:
        """How many connections this process holds to the database, less the benchmark's own.

        Counted from outside the runtime: on SQLite the open file descriptors
        on the database file, on PostgreSQL the process's established TCP
        connections to the server's port. The benchmark's own are this
        observer's and ``other_bench_connections`` (the reference's).
        """
        own = 0 if self._db.is_closed() else 1
        if is_postgres(self.url):
            held = _tcp_connections_to_port(urlparse(self.url).port or 5432)
        else:
            held = _open_descriptors_on(sqlite_path(self.url))
        return held - own - other_bench_connections


def _open_descriptors_on(path: str) -> int:
    target = os.path.realpath(path)
    return sum(1 for link in _own_descriptor_links() if link == target)


def _tcp_connections_to_port(port: int) -> int:
    """This process's established TCP connections whose remote port is ``port``."""
    own_sockets = {link[len("socket:["):-1] for link in _own_descriptor_links()
                   if link.startswith("socket:[")}
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table, encoding="ascii") as lines:
                next(lines)  # the header
                for line in lines:
                    fields = line.split()
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    established = fields[3] == "01"
                    if established and remote_port == port and fields[9] in own_sockets:
                        count += 1
        except OSError:
            continue
    return count


def _own_descriptor_links() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return links


def describe_url(url: str) -> dict[str, Any]:
    """The URL without credentials, for the report."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    return {"scheme": parsed.scheme, "host": host, "port": parsed.port, "database": parsed.path.lstrip("/")}
