"""Fixtures shared by every suite: one parametrized database fixture.

Each integration or acceptance test runs once on SQLite (a file under
tmp_path, never ``:memory:``) and once on PostgreSQL. PostgreSQL tests skip
locally with a clear reason when no server answers, and fail under CI=true.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pytest

from tests.helpers import Observer

POSTGRES_URL = os.environ.get(
    "ACTORGRAPH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
ACTORGRAPH_TABLES = ("node_execution", "graph_execution", "runtime", "graph_version", "schema_version")


def _admin_connection(url: str):  # type: ignore[no-untyped-def]
    import psycopg2

    try:
        conn = psycopg2.connect(url, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        reason = f"PostgreSQL at {url} does not answer ({str(exc).strip().splitlines()[0]})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(reason)
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this pytest process's own on the PostgreSQL server.

    Created from POSTGRES_URL's server and dropped at the end, so that two
    test runs on one server never see each other's rows.
    """
    with database_of_its_own(f"actorgraph_test_{os.getpid()}") as url:
        yield url


@contextlib.contextmanager
def database_of_its_own(name: str) -> Iterator[str]:
    """Create database ``name`` on POSTGRES_URL's server, yield its URL, drop it (WITH FORCE) after."""
    admin = _admin_connection(POSTGRES_URL)  # skips locally, fails under CI=true
    try:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cur.execute(f"CREATE DATABASE {name}")
        try:
            yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}"
        finally:
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.close()


def _reset_postgres(url: str) -> None:
    """Drop actorgraph's tables so that each test starts from an empty database."""
    conn = _admin_connection(url)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS " + ", ".join(ACTORGRAPH_TABLES) + " CASCADE")
    conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'actorgraph.db'}"
    url = request.getfixturevalue("postgres_url")
    _reset_postgres(url)
    return url


@pytest.fixture
def observer(database_url: str) -> Iterator[Observer]:
    """A separate connection; created lazily by tests after the runtime made the schema."""
    observers: list[Observer] = []

    class _Lazy:
        def __getattr__(self, name: str):
            if not observers:
                observers.append(Observer(database_url))
            return getattr(observers[0], name)

    yield _Lazy()  # type: ignore[misc]
    for obs in observers:
        obs.close()
