"""A run process killed with SIGKILL never leaves executions RUNNING forever."""
from __future__ import annotations

import signal

from tests.acceptance.support import TERMINAL, parse_stop_output, start_tree, statuses_in
from tests.helpers import wait_until

RECOVERY_TIMEOUT = 60.0


def _kill_mid_tree(cli, observer):
    run, root_id, rows = start_tree(cli, observer)
    runtime_ids = {row["runtime_id"] for row in rows.values()}
    assert run.kill_hard() == -signal.SIGKILL
    # Killed: nothing ended the rows, they still read RUNNING.
    assert set(statuses_in(observer, root_id).values()) == {"RUNNING"}
    return root_id, rows, runtime_ids


def test_kill_9_then_a_new_runtime_recovers_the_tree(cli, observer):
    root_id, rows, runtime_ids = _kill_mid_tree(cli, observer)

    # A new runtime opens the database (a new run process) and recovers it.
    other = cli.call("run", "graphs.json", "quick", "--user", "bob")
    assert other.returncode == 0, other.describe()
    wait_until(
        lambda: set(statuses_in(observer, root_id).values()) <= TERMINAL,
        RECOVERY_TIMEOUT,
        "the dead runtime's executions to be recovered",
    )

    listing = cli.call("list", "--json")
    assert listing.returncode == 0, listing.describe()
    by_id = {record["id"]: record for record in listing.json()}
    assert set(rows) <= set(by_id)
    assert not [r for r in by_id.values() if r["status"] in ("RUNNING", "QUEUED")], listing.stdout
    # No stop was requested: recovery marks them FAILED, naming the lost runtime.
    for execution_id in rows:
        record = by_id[execution_id]
        assert record["status"] == "FAILED", record
        assert any(rid and rid in (record["error"] or "") for rid in runtime_ids), record
    assert statuses_in(observer, root_id) == {eid: "FAILED" for eid in rows}


def test_kill_9_then_stop_terminates_every_row(cli, observer):
    root_id, rows, _ = _kill_mid_tree(cli, observer)

    stop = cli.call("stop", root_id, "--user", "alice")

    assert stop.returncode == 0, stop.describe()
    # The stop request is persisted before recovery: the crashed tree ends TERMINATED.
    assert statuses_in(observer, root_id) == {eid: "TERMINATED" for eid in rows}
    report = parse_stop_output(stop.stdout)
    assert report["root"] == [root_id]
    assert set(report["terminated"]) | set(report["forced"]) == set(rows)
