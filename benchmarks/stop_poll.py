"""The stop watcher's poll on a runtime with many finished rows.

``python -m benchmarks.stop_poll [--rows N] [--postgres URL]``

Every runtime asks the database ten times a second for stop requests aimed
at what it hosts (``Store.pending_stops``, from ``actors/remote.py``). A
long-lived runtime, a worker above all, hosts a growing number of finished
rows. For each database this fills a fresh one with ``--rows`` TERMINATED
rows of one runtime and a handful of active ones, then times the poll twice
in the same run: with the schema's index on ``(runtime_id, status)``, and
with the index on ``runtime_id`` alone that schema version 3 had.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from typing import Iterator

from benchmarks.database import drop_actorgraph_tables, is_postgres, open_database
from persistence import Store
from persistence.schema import RUNTIME_STATUS_INDEX

POLLS = 50
ACTIVE_ROWS = 5
INSERT_CHUNK = 1000


def fill(url: str, runtime_id: str, finished: int) -> None:
    """``finished`` TERMINATED rows and ACTIVE_ROWS RUNNING ones, all of ``runtime_id``."""
    database = open_database(url)
    mark = database.param
    true = "TRUE" if is_postgres(url) else "1"
    false = "FALSE" if is_postgres(url) else "0"
    statuses = ["TERMINATED"] * finished + ["RUNNING"] * ACTIVE_ROWS
    try:
        with database.atomic():
            for start in range(0, len(statuses), INSERT_CHUNK):
                part = statuses[start:start + INSERT_CHUNK]
                values = ", ".join(f"({mark}, 'g', 'u', {mark}, {mark}, '2026-01-01 00:00:00', 0, '{{}}',"
                                   f" {true}, {false})" for _ in part)
                params = [value for status in part for value in (str(uuid.uuid4()), status, runtime_id)]
                database.execute_sql(
                    "INSERT INTO graph_execution (id, graph_id, user_id, status, runtime_id, created_at, depth,"
                    f" inputs, stop_cascade, stop_forced) VALUES {values}", params)
        if is_postgres(url):
            database.execute_sql("ANALYZE graph_execution")
    finally:
        database.close()


def time_polls(store: Store, runtime_id: str) -> float:
    """The median time of one poll, in milliseconds."""
    times = []
    for _ in range(POLLS):
        started = time.perf_counter()
        store.pending_stops(runtime_id)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def use_version_3_index(url: str) -> None:
    """Put back the index schema version 3 had, in place of version 4's."""
    database = open_database(url)
    try:
        database.execute_sql(f"DROP INDEX {RUNTIME_STATUS_INDEX}")
        database.execute_sql("CREATE INDEX graph_execution_runtime_id ON graph_execution (runtime_id)")
        if is_postgres(url):
            database.execute_sql("ANALYZE graph_execution")
    finally:
        database.close()


def measure(url: str, finished: int) -> tuple[float, float]:
    """(version 4 index, version 3 index): median poll in ms on a fresh database at ``url``."""
    runtime_id = str(uuid.uuid4())
    Store.open(url).close()  # creates the schema
    fill(url, runtime_id, finished)
    store = Store.open(url)
    try:
        now = time_polls(store, runtime_id)
        use_version_3_index(url)
        before = time_polls(store, runtime_id)
    finally:
        store.close()
    return now, before


def databases(postgres: str | None) -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as directory:
        yield "sqlite", f"sqlite:///{directory}/poll.db"
    if postgres:
        drop_actorgraph_tables(postgres)
        yield "postgresql", postgres
        drop_actorgraph_tables(postgres)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="finished rows of the runtime")
    parser.add_argument("--postgres", metavar="URL", help="also measure on this PostgreSQL database")
    args = parser.parse_args()
    if args.rows < 0:
        parser.error(f"--rows must be 0 or more, not {args.rows}")
    print(f"stop watcher's poll, {args.rows} finished rows and {ACTIVE_ROWS} active ones of one runtime; "
          f"median of {POLLS} polls, ms")
    print(f"{'db':<11} {'(runtime_id, status) [v4]':>26} {'runtime_id [v3]':>16}")
    for name, url in databases(args.postgres):
        now, before = measure(url, args.rows)
        print(f"{name:<11} {now:>26.3f} {before:>16.3f}")


if __name__ == "__main__":
    main()
