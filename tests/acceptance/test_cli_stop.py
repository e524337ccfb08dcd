"""run.py stop from another process than the one running the tree."""
from __future__ import annotations

import uuid

from tests.acceptance.support import parse_stop_output, start_tree, statuses_in


def test_stop_from_another_process_terminates_the_whole_tree(cli, observer):
    run, root_id, rows = start_tree(cli, observer)

    stop = cli.call("stop", root_id, "--user", "alice", "--timeout", "30")

    assert stop.returncode == 0, stop.describe()
    # stop returns only once the whole subtree is terminal in the database.
    assert statuses_in(observer, root_id) == {eid: "TERMINATED" for eid in rows}
    report = parse_stop_output(stop.stdout)
    assert report["root"] == [root_id]
    assert set(report["terminated"]) == set(rows)
    assert report["already_final"] == []
    assert run.wait() == 3, run.describe()
    assert "Traceback" not in run.stderr + stop.stderr


def test_stop_with_timeout_0_from_another_process_forces_the_tree_at_once(cli, observer):
    # The run process applies the stop's --timeout: 0 forces the naps that
    # ignore stops at once (it used to give them 15 s, and this stop gave up
    # after 5 s with the tree still RUNNING).
    run, root_id, rows = start_tree(cli, observer, graph="stubborn_parent")

    stop = cli.call("stop", root_id, "--user", "alice", "--timeout", "0")

    assert stop.returncode == 0, stop.describe()
    assert statuses_in(observer, root_id) == {eid: "TERMINATED" for eid in rows}
    report = parse_stop_output(stop.stdout)
    assert set(report["terminated"]) == set(rows)
    assert set(report["forced"]) == set(rows) - {root_id}
    assert run.wait() == 3, run.describe()
    assert "Traceback" not in run.stderr + stop.stderr


def test_stop_no_cascade_leaves_children_running_to_their_end(cli, observer):
    run, root_id, rows = start_tree(cli, observer, graph="short_parent")
    children = set(rows) - {root_id}

    stop = cli.call("stop", root_id, "--user", "alice", "--no-cascade")

    assert stop.returncode == 0, stop.describe()
    assert observer.status(root_id) == "TERMINATED"
    report = parse_stop_output(stop.stdout)
    assert report["root"] == [root_id]
    assert report["terminated"] == [root_id]
    # The abandoned children are not stopped: they run to their own end in the
    # run process, keep their parent link, and only then does run exit 3.
    assert run.wait() == 3, run.describe()
    final = {row["id"]: row for row in observer.subtree(root_id)}
    assert final[root_id]["status"] == "TERMINATED"
    for child in children:
        assert final[child]["status"] == "COMPLETED", final[child]
        assert final[child]["parent_id"] == root_id


def test_stop_by_another_user_exits_4_and_changes_nothing(cli, observer):
    run, root_id, rows = start_tree(cli, observer)
    before = observer.snapshot()

    stop = cli.call("stop", root_id, "--user", "mallory")

    assert stop.returncode == 4, stop.describe()
    assert len(stop.stderr_lines) == 1, stop.describe()
    assert "Traceback" not in stop.stderr
    assert observer.snapshot() == before
    assert all(row["stop_requested_at"] is None for row in observer.subtree(root_id))
    assert run.popen.poll() is None, run.describe()


def test_stop_of_an_unknown_id_exits_5(cli, observer):
    # A database with a schema and one finished run, so the id is truly unknown.
    seed = cli.call("run", "graphs.json", "quick", "--user", "alice")
    assert seed.returncode == 0, seed.describe()
    before = observer.snapshot()

    unknown = str(uuid.uuid4())
    stop = cli.call("stop", unknown, "--user", "alice")

    assert stop.returncode == 5, stop.describe()
    assert len(stop.stderr_lines) == 1, stop.describe()
    assert unknown in stop.stderr
    assert "Traceback" not in stop.stderr
    assert observer.snapshot() == before


def test_stop_of_a_finished_execution_reports_it_already_final(cli, observer):
    run = cli.call("run", "graphs.json", "quick", "--user", "alice")
    assert run.returncode == 0, run.describe()
    root_id = run.stdout.splitlines()[0].strip()
    before = observer.snapshot()

    stop = cli.call("stop", root_id, "--user", "alice")

    assert stop.returncode == 0, stop.describe()
    report = parse_stop_output(stop.stdout)
    assert report["root"] == [root_id]
    assert report["already_final"] == [root_id]
    assert report["terminated"] == []
    assert observer.status(root_id) == "COMPLETED"
    assert observer.snapshot() == before

