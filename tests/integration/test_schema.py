"""The schema as the issue fixes it: names, keys, indexes, versions and migration."""
from __future__ import annotations

import pytest

import persistence
from actors import ExecutionStatus, Runtime
from tests.helpers import Observer, wait_status, wait_tree_running
from tests.integration import graphs as g

USER = "alice"

GRAPH_EXECUTION_COLUMNS = {
    "id", "graph_id", "user_id", "status", "parent_id", "created_at", "started_at", "ended_at",
    "stop_requested_at", "stop_reason", "inputs", "outputs", "error", "depth", "runtime_id", "stop_forced",
    "stop_wait_timeout", "stop_requested_by",
}
NODE_EXECUTION_COLUMNS = {"id", "graph_execution_id", "node_id", "block", "status", "started_at", "ended_at", "error"}


def columns(observer, table: str) -> set[str]:
    if observer.is_sqlite:
        return {r["name"] for r in observer.query(f"PRAGMA table_info({table})")}
    rows = observer.query("SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))
    return {r["column_name"] for r in rows}


def indexed_columns(observer, table: str) -> set[str]:
    """Columns that lead an index of ``table``."""
    if observer.is_sqlite:
        found = set()
        for index in observer.query(f"PRAGMA index_list({table})"):
            info = observer.query(f"PRAGMA index_info('{index['name']}')")
            found.add(min(info, key=lambda r: r["seqno"])["name"])
        return found
    rows = observer.query("SELECT indexdef FROM pg_indexes WHERE tablename = ?", (table,))
    return {r["indexdef"].split("(", 1)[1].split(")")[0].split(",")[0].strip().strip('"') for r in rows}


def index_columns(observer, table: str) -> set[tuple[str, ...]]:
    """The column lists of the indexes of ``table``, each in index order."""
    if observer.is_sqlite:
        found = set()
        for index in observer.query(f"PRAGMA index_list({table})"):
            info = observer.query(f"PRAGMA index_info('{index['name']}')")
            found.add(tuple(r["name"] for r in sorted(info, key=lambda r: r["seqno"])))
        return found
    rows = observer.query("SELECT indexdef FROM pg_indexes WHERE tablename = ?", (table,))
    return {tuple(c.strip().strip('"') for c in r["indexdef"].rsplit("(", 1)[1].rstrip(")").split(","))
            for r in rows}


def test_tables_columns_and_indexes(runtime_factory, observer):
    runtime_factory()

    assert columns(observer, "graph_execution") >= GRAPH_EXECUTION_COLUMNS
    assert columns(observer, "node_execution") >= NODE_EXECUTION_COLUMNS
    assert columns(observer, "runtime") >= {"id", "host", "pid", "started_at", "heartbeat_at"}
    assert columns(observer, "schema_version") >= {"version"}
    assert "parent_id" in indexed_columns(observer, "graph_execution")
    assert ("runtime_id", "status") in index_columns(observer, "graph_execution")
    assert_node_indexes(observer)
    versions = [r["version"] for r in observer.query("SELECT version FROM schema_version")]
    assert max(versions) == persistence.LATEST_VERSION


def assert_node_indexes(observer) -> None:
    """One index serves node lookups by execution: the unique one that leads with it (version 6)."""
    indexes = index_columns(observer, "node_execution")
    assert ("graph_execution_id", "node_id") in indexes
    assert ("graph_execution_id",) not in indexes


def test_the_stop_watchers_poll_reads_only_active_rows_through_the_runtime_status_index(tmp_path):
    """Ten polls a second must not read every row a long-lived runtime ever finished."""
    from persistence.store import PENDING_STOPS_SQL

    url = f"sqlite:///{tmp_path / 'poll.db'}"
    Runtime(database=url).close()
    observer = Observer(url)
    try:
        plan = observer.query(f"EXPLAIN QUERY PLAN {PENDING_STOPS_SQL}",
                              ("runtime", "QUEUED", "RUNNING", "runtime", True, "QUEUED", "RUNNING"))
        details = [row["detail"] for row in plan]
        outer = next(d for d in details if d.startswith("SEARCH g ") or d.startswith("SCAN g"))
        assert "graph_execution_runtime_id_status (runtime_id=? AND status=?)" in outer, details
    finally:
        observer.close()


def test_an_executions_nodes_are_read_through_the_unique_index(tmp_path):
    """Version 6 dropped the index on graph_execution_id alone: the unique one must serve the read."""
    from persistence.store import NODES_SQL

    url = f"sqlite:///{tmp_path / 'nodes.db'}"
    Runtime(database=url).close()
    observer = Observer(url)
    try:
        plan = observer.query(f"EXPLAIN QUERY PLAN {NODES_SQL}", ("execution",))
        details = [row["detail"] for row in plan]
        assert any("node_execution_graph_execution_id_node_id (graph_execution_id=?)" in d
                   for d in details), details
    finally:
        observer.close()


def test_status_check_rejects_unknown_strings(runtime_factory, observer):
    rt = runtime_factory(g.graphs(quick=g.quick()))
    done = rt.start("quick", user_id=USER)
    wait_status(observer, done, "COMPLETED")

    with pytest.raises(Exception):
        observer.execute("UPDATE graph_execution SET status = 'DONE' WHERE id = ?", (done,))

    assert observer.status(done) == "COMPLETED"


def test_deleting_a_parent_row_sets_children_parent_id_null(runtime_factory, observer):
    rt = runtime_factory(g.graphs(quick=g.quick(), parent=g.agents("quick", 2)))
    root = rt.start("parent", user_id=USER)
    wait_status(observer, root, "COMPLETED")
    children = [r["id"] for r in observer.subtree(root) if r["id"] != root]
    assert len(children) == 2 and observer.nodes(root)

    deleted = observer.execute("DELETE FROM graph_execution WHERE id = ?", (root,))

    assert deleted == 1
    for child in children:
        row = observer.execution(child)
        assert row is not None and row["parent_id"] is None and row["status"] == "COMPLETED"
    # node_execution rows go with their execution (ON DELETE CASCADE).
    assert observer.nodes(root) == []
    assert rt.get(children[0]).parent_id is None


def test_sqlite_runs_in_wal_mode(tmp_path):
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    rt = Runtime(database=url)
    try:
        rt.load(g.graphs(quick=g.quick()))
        rt.wait(rt.start("quick", user_id=USER), timeout=30)
        observer = Observer(url)
        try:
            assert observer.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
        finally:
            observer.close()
    finally:
        rt.close()


def _create_version_1(observer) -> None:
    """The tables of schema version 1, as an older actorgraph created them (no schema_version)."""
    node_id = "INTEGER PRIMARY KEY AUTOINCREMENT" if observer.is_sqlite else "SERIAL PRIMARY KEY"
    timestamp = "DATETIME" if observer.is_sqlite else "TIMESTAMP"
    observer.execute(
        "CREATE TABLE graph_execution ("
        " id VARCHAR(36) NOT NULL PRIMARY KEY, graph_id VARCHAR(255) NOT NULL,"
        " user_id VARCHAR(255) NOT NULL, status VARCHAR(16) NOT NULL,"
        " parent_id VARCHAR(36) REFERENCES graph_execution (id) ON DELETE SET NULL,"
        f" depth INTEGER NOT NULL DEFAULT 0, created_at {timestamp} NOT NULL,"
        f" started_at {timestamp}, ended_at {timestamp}, stop_requested_at {timestamp},"
        " stop_reason TEXT, inputs TEXT NOT NULL DEFAULT '{}', outputs TEXT, error TEXT)"
    )
    observer.execute("CREATE INDEX graph_execution_parent_id ON graph_execution (parent_id)")
    observer.execute("CREATE INDEX graph_execution_user_id ON graph_execution (user_id)")
    observer.execute(
        f"CREATE TABLE node_execution (id {node_id},"
        " graph_execution_id VARCHAR(36) NOT NULL REFERENCES graph_execution (id) ON DELETE CASCADE,"
        " node_id VARCHAR(255) NOT NULL, block VARCHAR(255) NOT NULL, status VARCHAR(16) NOT NULL,"
        f" started_at {timestamp}, ended_at {timestamp}, error TEXT)"
    )
    # The two indexes peewee gave node_execution up to version 5.
    observer.execute("CREATE INDEX node_execution_graph_execution_id ON node_execution (graph_execution_id)")
    observer.execute("CREATE UNIQUE INDEX node_execution_graph_execution_id_node_id"
                     " ON node_execution (graph_execution_id, node_id)")
    observer.execute(
        "INSERT INTO graph_execution (id, graph_id, user_id, status, depth, created_at, started_at,"
        " ended_at, inputs, outputs) VALUES (?, 'quick', ?, 'COMPLETED', 0,"
        " '2024-01-02 03:04:05', '2024-01-02 03:04:05', '2024-01-02 03:04:06', '{}', '{\"answer\": 1}')",
        ("11111111-1111-4111-8111-111111111111", USER),
    )
    observer.execute(
        "INSERT INTO graph_execution (id, graph_id, user_id, status, parent_id, depth, created_at, inputs)"
        " VALUES (?, 'quick', ?, 'COMPLETED', ?, 1, '2024-01-02 03:04:05', '{}')",
        ("22222222-2222-4222-8222-222222222222", USER, "11111111-1111-4111-8111-111111111111"),
    )
    observer.execute(
        "INSERT INTO node_execution (graph_execution_id, node_id, block, status, started_at, ended_at)"
        " VALUES (?, 'v', 'value', 'COMPLETED', '2024-01-02 03:04:05', '2024-01-02 03:04:06')",
        ("11111111-1111-4111-8111-111111111111",),
    )


def test_a_version_1_database_is_migrated_when_a_runtime_opens_it(database_url, observer, runtime_factory):
    old = "11111111-1111-4111-8111-111111111111"
    _create_version_1(observer)
    assert "runtime_id" not in columns(observer, "graph_execution")

    rt = runtime_factory(g.graphs(quick=g.quick(), nap=g.sleeper()))

    assert columns(observer, "graph_execution") >= GRAPH_EXECUTION_COLUMNS
    assert columns(observer, "runtime") >= {"id", "host", "pid", "started_at", "heartbeat_at"}
    versions = [r["version"] for r in observer.query("SELECT version FROM schema_version")]
    assert max(versions) == persistence.LATEST_VERSION
    indexes = index_columns(observer, "graph_execution")
    assert ("runtime_id", "status") in indexes and ("runtime_id",) not in indexes
    assert_node_indexes(observer)
    # The old rows survive and read as before.
    record = rt.get(old, user_id=USER)
    assert record.status is ExecutionStatus.COMPLETED and record.outputs == {"answer": 1}
    assert [n["node_id"] for n in observer.nodes(old)] == ["v"]
    child = "22222222-2222-4222-8222-222222222222"
    assert observer.execution(child)["parent_id"] == old
    assert [c.id for c in rt.children(old, user_id=USER)] == [child]
    # And the migrated database runs and stops executions.
    done = rt.start("quick", user_id=USER)
    wait_status(observer, done, "COMPLETED")
    nap = rt.start("nap", user_id=USER)
    wait_tree_running(observer, nap, executions=1, naps=1)
    assert rt.stop(nap, user_id=USER).terminated == (nap,)
    assert observer.status(nap) == "TERMINATED"
