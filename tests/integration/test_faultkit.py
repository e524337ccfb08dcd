"""The fault kit itself (tests/faultkit.py): each fault does what the fault tests rely on.

These need real processes (a postmaster, a SQLite lock holder, a network
namespace), so they live in the integration suite, not in tests/unit.
"""
from __future__ import annotations

import sqlite3
import time

import psycopg2
import pytest

from tests.faultkit import port_accepts
from tests.integration.fault_fixtures import *  # noqa: F401,F403

# A query on a connection whose server vanished fails with one of these.
BROKEN = (psycopg2.OperationalError, psycopg2.InterfaceError)


def query_one(url: str, sql: str = "SELECT 1", **params: object) -> object:
    conn = psycopg2.connect(url, **{"connect_timeout": 5, **params})
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def open_connection(url: str, **params: object):  # type: ignore[no-untyped-def]
    conn = psycopg2.connect(url, connect_timeout=5, **params)
    conn.autocommit = True
    return conn


@pytest.mark.timeout(120)
def test_cluster_starts_answers_and_restarts(pg_cluster, fault_db):
    """The cluster answers on its own port and unix socket; restart keeps the data and the port."""
    assert pg_cluster.is_up()
    assert pg_cluster.port != 5432
    url = pg_cluster.url(fault_db)
    assert url == f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/{fault_db}"
    assert pg_cluster.unix_socket.exists()
    conn = open_connection(url)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (v int)")
        cur.execute("INSERT INTO kept VALUES (7)")

    pg_cluster.restart()

    assert pg_cluster.is_up()
    with pytest.raises(BROKEN):  # the restart ended every session
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    conn.close()
    assert query_one(url, "SELECT v FROM kept") == 7


@pytest.mark.timeout(120)
def test_cluster_stop_frees_the_port_and_start_brings_it_back(pg_cluster, fault_db):
    pg_cluster.stop()
    assert not pg_cluster.is_up()
    assert not port_accepts("127.0.0.1", pg_cluster.port)
    with pytest.raises(psycopg2.OperationalError):
        query_one(pg_cluster.url(fault_db))

    pg_cluster.start()

    assert query_one(pg_cluster.url(fault_db)) == 1


@pytest.mark.timeout(120)
def test_kill9_then_start_works_again(pg_cluster, fault_db):
    """A SIGKILLed postmaster breaks open sessions; start() recovers it, twice in a row."""
    url = pg_cluster.url(fault_db)
    for _ in range(2):
        conn = open_connection(url)
        pid = pg_cluster.postmaster_pid()

        pg_cluster.kill9()

        assert not pg_cluster.is_up()
        with pytest.raises(BROKEN):
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        conn.close()
        pg_cluster.start()
        assert pg_cluster.postmaster_pid() != pid
        assert query_one(url) == 1


@pytest.mark.timeout(60)
def test_proxy_forwards_queries(pg_cluster, fault_db, proxy):
    url = proxy.url_for(fault_db)
    assert url == f"postgresql://postgres@127.0.0.1:{proxy.port}/{fault_db}"
    assert query_one(url, "SELECT 41 + 1") == 42
    assert query_one(url, "SELECT current_database()") == fault_db
    assert proxy.accepted == 2 and proxy.forwarded == 2


@pytest.mark.timeout(60)
def test_proxy_cut_breaks_open_connections_until_heal(pg_cluster, fault_db, proxy):
    """cut() resets a live connection and refuses new ones; after heal() a new connection works."""
    url = proxy.url_for(fault_db)
    conn = open_connection(url)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")

    proxy.cut()

    with pytest.raises(BROKEN):
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg2.OperationalError):
        query_one(url)
    assert proxy.refused >= 1
    assert proxy.attempt_while_faulty.is_set()
    assert pg_cluster.is_up()  # only the path was cut, not the server

    proxy.heal()

    assert query_one(url) == 1


@pytest.mark.timeout(60)
def test_proxy_blackhole_forwards_nothing_until_heal(pg_cluster, fault_db, proxy):
    """A blackholed proxy accepts and stays silent: a connect with a timeout fails, heal() lets new ones in."""
    url = proxy.url_for(fault_db)
    proxy.blackhole()

    began = time.monotonic()
    with pytest.raises(psycopg2.OperationalError):
        query_one(url, connect_timeout=2)
    assert time.monotonic() - began >= 1.5  # it waited: nothing answered, nothing reset it
    assert proxy.blackholed >= 1

    proxy.heal()

    assert query_one(url) == 1


@pytest.mark.timeout(120)
def test_netns_link_blackhole_is_seen_only_by_tcp_timeouts(pg_cluster, fault_db, netns_link):
    """Packets vanish on a blackholed link: only tcp_user_timeout ends a query; heal() restores the path."""
    url = netns_link.url_for(fault_db)
    assert query_one(url) == 1
    conn = open_connection(url, keepalives=1, keepalives_idle=1, keepalives_interval=1, keepalives_count=2,
                           tcp_user_timeout=2000)

    netns_link.blackhole()

    began = time.monotonic()
    with pytest.raises(BROKEN):
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    waited = time.monotonic() - began
    assert 1.5 <= waited < 20, waited  # ended by the 2 s user timeout, not by a reset
    conn.close()
    with pytest.raises(psycopg2.OperationalError):
        query_one(url, connect_timeout=2)

    netns_link.heal()

    assert query_one(url, connect_timeout=10) == 1


@pytest.mark.timeout(60)
def test_sqlite_lock_holder_locks_out_a_second_writer(tmp_path, lock_holder):
    """While another process holds BEGIN IMMEDIATE, a writer with a short busy timeout gets 'database is locked'."""
    path = tmp_path / "locked.db"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=wal")
    setup.execute("CREATE TABLE t (v int)")
    setup.execute("INSERT INTO t VALUES (1)")
    setup.close()
    holder = lock_holder(path)

    holder.acquire()

    assert holder.holding
    writer = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        writer.execute("INSERT INTO t VALUES (2)")
    # WAL readers are not locked out.
    assert writer.execute("SELECT count(*) FROM t").fetchone() == (1,)

    holder.release()

    assert not holder.holding
    writer.execute("INSERT INTO t VALUES (2)")
    assert writer.execute("SELECT count(*) FROM t").fetchone() == (2,)
    writer.close()


@pytest.mark.timeout(60)
def test_sqlite_lock_holder_lets_go_after_max_hold(tmp_path, lock_holder):
    """A test that dies never leaves the database locked longer than max_hold."""
    path = tmp_path / "locked.db"
    sqlite3.connect(path).close()
    holder = lock_holder(path, mode="EXCLUSIVE", max_hold=1.0)
    holder.acquire()

    writer = sqlite3.connect(path, timeout=15, isolation_level=None)
    began = time.monotonic()
    writer.execute("CREATE TABLE t (v int)")  # waits in the busy handler until the holder lets go

    assert 0.3 <= time.monotonic() - began < 15
    writer.close()
