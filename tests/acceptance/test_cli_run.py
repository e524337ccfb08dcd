"""run.py run: exit codes, --input parsing, Ctrl-C; tree and list only read."""
from __future__ import annotations

import signal
from datetime import datetime

from tests.acceptance.support import STATUSES, is_uuid, start_tree, statuses_in
from tests.helpers import loads_json

RECORD_KEYS = {
    "id", "graph_id", "user_id", "status", "parent_id", "created_at", "started_at",
    "ended_at", "inputs", "outputs", "error", "stop_reason",
}


def _json_column(value):
    return loads_json(value) if isinstance(value, str) else value


def test_run_of_a_completed_graph_exits_0_with_inputs_parsed_as_json(cli, observer):
    run = cli.call("run", "graphs.json", "echo", "--user", "alice",
                   "--input", "seconds=0.1", "--input", "word=hello")

    assert run.returncode == 0, run.describe()
    root_id = run.stdout.splitlines()[0]
    assert is_uuid(root_id), run.describe()
    row = observer.execution(root_id)
    assert row["status"] == "COMPLETED"
    assert row["user_id"] == "alice"
    # "0.1" parses as JSON (a number); "hello" does not and stays a string.
    assert _json_column(row["inputs"]) == {"seconds": 0.1, "word": "hello"}
    assert _json_column(row["outputs"]) == {"word": "hello"}
    assert "COMPLETED" in run.stdout, "the final tree is printed"


def test_run_of_a_failing_graph_exits_1(cli, observer):
    run = cli.call("run", "graphs.json", "boom", "--user", "alice")

    assert run.returncode == 1, run.describe()
    root_id = run.stdout.splitlines()[0]
    row = observer.execution(root_id)
    assert row["status"] == "FAILED"
    assert "kaboom" in (row["error"] or "")
    assert "Traceback" not in run.stderr


def test_sigint_on_run_stops_the_tree_prints_it_and_exits_3(cli, observer):
    run, root_id, rows = start_tree(cli, observer)

    run.send_signal(signal.SIGINT)

    assert run.wait() == 3, run.describe()
    assert statuses_in(observer, root_id) == {eid: "TERMINATED" for eid in rows}
    after_id = "\n".join(run.stdout_lines[1:])
    assert "TERMINATED" in after_id, f"no final tree printed:\n{run.describe()}"
    assert "RUNNING" not in run.stdout_lines[-1]
    assert "Traceback" not in run.stderr


def test_tree_and_list_json_are_valid_and_never_change_a_row(cli, observer):
    run, root_id, rows = start_tree(cli, observer)
    children = set(rows) - {root_id}
    before = observer.snapshot()

    tree = cli.call("tree", root_id, "--json")
    listing = cli.call("list", "--json")
    filtered = cli.call("list", "--user", "alice", "--status", "RUNNING", "--limit", "2", "--json")
    nobody = cli.call("list", "--user", "nobody", "--json")

    assert observer.snapshot() == before, "tree/list changed a row of a live runtime"
    for result in (tree, listing, filtered, nobody):
        assert result.returncode == 0, result.describe()

    document = tree.json()
    assert {"id", "graph_id", "status", "parent_id", "children"} <= set(document)
    assert (document["id"], document["graph_id"], document["status"]) == (root_id, "parent", "RUNNING")
    assert document["parent_id"] is None
    assert {child["id"] for child in document["children"]} == children
    for child in document["children"]:
        assert (child["parent_id"], child["graph_id"], child["status"]) == (root_id, "leaf", "RUNNING")
        assert child["children"] == []

    records = listing.json()
    assert isinstance(records, list)
    by_id = {record["id"]: record for record in records}
    assert set(by_id) == set(rows)
    for record in records:
        assert RECORD_KEYS <= set(record), record
        assert record["status"] in STATUSES
        assert record["status"] == "RUNNING"
        datetime.fromisoformat(record["created_at"])
        datetime.fromisoformat(record["started_at"])
        assert record["ended_at"] is None
    assert by_id[root_id]["parent_id"] is None
    assert all(by_id[child]["parent_id"] == root_id for child in children)

    limited = filtered.json()
    assert len(limited) == 2
    assert all(r["user_id"] == "alice" and r["status"] == "RUNNING" for r in limited)
    assert nobody.json() == []

    assert run.popen.poll() is None, "the run process must still be running"


def test_a_second_runtime_never_touches_a_live_runtimes_executions(cli, observer):
    run, root_id, rows = start_tree(cli, observer)
    before = _tree_rows(observer, rows)

    # Opening a runtime recovers executions of dead runtimes only.
    other = cli.call("run", "graphs.json", "quick", "--user", "bob")

    assert other.returncode == 0, other.describe()
    assert _tree_rows(observer, rows) == before
    assert run.popen.poll() is None, run.describe()


def test_run_stop_after_terminates_the_tree_and_exits_3(cli, observer):
    run = cli.call("run", "graphs.json", "parent", "--user", "alice", "--stop-after", "1")

    assert run.returncode == 3, run.describe()
    root_id = run.stdout.splitlines()[0]
    statuses = statuses_in(observer, root_id)
    assert len(statuses) == 3
    assert set(statuses.values()) == {"TERMINATED"}


def _tree_rows(observer, ids) -> list:
    """The tree's execution and node rows, as comparable tuples."""
    found = []
    for execution_id in sorted(ids):
        for row in [observer.execution(execution_id), *observer.nodes(execution_id)]:
            found.append(tuple(sorted((k, str(v)) for k, v in row.items())))
    return found
