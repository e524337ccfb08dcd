"""PostgreSQL transactions send their BEGIN with their first statement.

Observed from the server's side: the suite's own cluster logs every
statement of a database made for the test (``log_statement = 'all'``), and
the test reads what arrived, and how. Atomicity is checked through a
separate connection.
"""
from __future__ import annotations

import uuid
from typing import Iterator

import psycopg2
import pytest

from persistence.database import PostgresqlDatabase, open_database
from tests.faultkit import PostgresCluster
from tests.helpers import wait_until
from tests.integration.fault_fixtures import *  # noqa: F401,F403 - pg_cluster, scene, fault_db

WAIT = 10.0


@pytest.fixture
def logged_db(pg_cluster: PostgresCluster, fault_db: str) -> Iterator[tuple[PostgresqlDatabase, str]]:
    """The database of ``fault_db``, every statement to it logged, opened as the runtime opens its own."""
    admin = psycopg2.connect(pg_cluster.url("postgres"))
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"ALTER DATABASE {fault_db} SET log_statement = 'all'")
    admin.close()
    database = open_database(pg_cluster.url(fault_db))
    assert isinstance(database, PostgresqlDatabase)
    database.execute_sql("CREATE TABLE probe (id integer PRIMARY KEY)")
    yield database, fault_db
    database.close_all()


def _statements(cluster: PostgresCluster, marker: str) -> list[str]:
    """The logged statements that mention ``marker``, in the order the server received them."""
    text = cluster.logfile.read_text(encoding="utf-8", errors="replace")
    return [line.split("statement: ", 1)[1] for line in text.splitlines()
            if "statement: " in line and marker in line]


def _probe_ids(cluster: PostgresCluster, name: str) -> list[int]:
    """The ids in the probe table, read through a connection of the test's own."""
    with psycopg2.connect(cluster.url(name)) as observer, observer.cursor() as cursor:
        cursor.execute("SELECT id FROM probe ORDER BY id")
        return [probe_id for (probe_id,) in cursor.fetchall()]


def _insert_twice_in_one_transaction(database: PostgresqlDatabase, probe_id: int) -> None:
    """A transaction whose second statement fails (a duplicate key): it must leave nothing."""
    with pytest.raises(Exception, match="duplicate key"):
        with database.atomic():
            database.execute_sql(f"INSERT INTO probe VALUES ({probe_id})")
            database.execute_sql(f"INSERT INTO probe VALUES ({probe_id})")


def test_a_transactions_begin_travels_with_its_first_statement(pg_cluster, logged_db):
    database, _ = logged_db
    marker = f"m{uuid.uuid4().hex[:10]}"
    with database.atomic():
        database.execute_sql(f"INSERT INTO probe VALUES (1) -- {marker} first")
        database.execute_sql(f"INSERT INTO probe VALUES (2) -- {marker} second")
    logged = wait_until(lambda: len(_statements(pg_cluster, marker)) == 2 and _statements(pg_cluster, marker),
                        WAIT, "the server to log both statements")
    assert logged[0].startswith("BEGIN; INSERT INTO probe VALUES (1)")
    assert logged[1].startswith("INSERT INTO probe VALUES (2)")
    assert _probe_ids(pg_cluster, logged_db[1]) == [1, 2]


def test_a_failed_statement_still_rolls_the_whole_transaction_back(pg_cluster, logged_db):
    database, name = logged_db
    _insert_twice_in_one_transaction(database, 7)
    assert _probe_ids(pg_cluster, name) == []
    # The connection is usable again, outside and inside a transaction.
    with database.atomic():
        database.execute_sql("INSERT INTO probe VALUES (8)")
    assert database.execute_sql("SELECT id FROM probe").fetchall() == [(8,)]


def test_an_empty_transaction_sends_nothing_and_leaves_no_transaction_open(pg_cluster, logged_db):
    database, _ = logged_db
    with database.atomic():
        pass
    marker = f"m{uuid.uuid4().hex[:10]}"
    # Outside any transaction: if a BEGIN were still pending, it would ride on this statement.
    database.execute_sql(f"SELECT 1 -- {marker}")
    logged = wait_until(lambda: _statements(pg_cluster, marker), WAIT, "the server to log the statement")
    assert logged == [f"SELECT 1 -- {marker}"]
    assert database.connection().get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_a_transaction_opened_on_a_closed_connection_is_still_one_transaction(pg_cluster, logged_db):
    database, name = logged_db
    database.close()  # the next transaction connects first
    assert database.is_closed()
    _insert_twice_in_one_transaction(database, 9)
    assert _probe_ids(pg_cluster, name) == []
