"""Executions run to their end: outputs, failures surfacing in parents, and Runtime.close()."""
from __future__ import annotations

import logging
import threading
import time

from actors import ExecutionStatus, Runtime
from tests.helpers import (
    TERMINAL_STATUSES,
    loads_json,
    wait_status,
    wait_tree_running,
    wait_until,
)
from tests.integration import graphs as g

USER = "alice"


def test_issue_example_runs_to_completion(runtime_factory, observer):
    rt = runtime_factory(
        g.graphs(
            leaf=g.leaf(),
            parent=g.parent(a=("leaf", {"seconds": 0.05}), b=("leaf", {"seconds": 0.1})),
        )
    )
    root = rt.start("parent", user_id=USER, inputs={"n": 3})

    record = rt.wait(root, timeout=30)

    assert record.status is ExecutionStatus.COMPLETED
    rows = observer.subtree(root)
    assert len(rows) == 3
    assert {r["status"] for r in rows} == {"COMPLETED"}
    assert loads_json(observer.execution(root)["inputs"]) == {"n": 3}
    children = [r for r in rows if r["id"] != root]
    assert {r["parent_id"] for r in children} == {root}
    assert sorted(loads_json(r["inputs"])["seconds"] for r in children) == [0.05, 0.1]
    for row in rows:
        assert row["started_at"] is not None and row["ended_at"] is not None
        assert all(n["status"] == "COMPLETED" for n in observer.nodes(row["id"]))
    for child in children:
        assert sorted(n["node_id"] for n in observer.nodes(child["id"])) == ["in", "nap", "out"]
        assert set(loads_json(child["outputs"])) == {"slept"}


def test_outputs_flow_through_links_and_agents(runtime_factory, observer):
    wrapper = {
        "nodes": {
            "child": {"block": "agent", "input": {"graph": "quick", "inputs": {}}},
            "out": {"block": "output", "input": {"name": "from_child"}},
        },
        "links": [{"from": "child.outputs", "to": "out.value"}],
    }
    rt = runtime_factory(g.graphs(quick=g.quick(7), wrapper=wrapper, nap=g.sleeper(0.01, value="x")))
    root = rt.start("wrapper", user_id=USER)
    nap = rt.start("nap", user_id=USER)

    wait_status(observer, root, "COMPLETED")
    wait_status(observer, nap, "COMPLETED")

    assert loads_json(observer.execution(root)["outputs"]) == {"from_child": {"answer": 7}}
    assert loads_json(observer.execution(nap)["outputs"]) == {"value": "x"}
    assert rt.get(root).outputs == {"from_child": {"answer": 7}}


def test_child_failure_surfaces_in_the_parent(runtime_factory, observer):
    rt = runtime_factory(
        g.graphs(
            leaf=g.leaf(),
            failing=g.failing("boom"),
            parent=g.parent(bad=("failing", {}), slow=("leaf", {"seconds": g.LONG})),
        )
    )
    root = rt.start("parent", user_id=USER)

    wait_status(observer, root, *TERMINAL_STATUSES)

    rows = observer.subtree(root)
    assert len(rows) == 3
    failed = next(r for r in rows if r["graph_id"] == "failing")
    slow = next(r for r in rows if r["graph_id"] == "leaf")
    parent = observer.execution(root)
    assert parent["status"] == "FAILED"
    assert failed["status"] == "FAILED" and "boom" in failed["error"]
    assert failed["id"] in parent["error"] and "boom" in parent["error"]
    # No execution outlives its parent's end.
    assert slow["status"] == "TERMINATED"
    nodes = {n["node_id"]: n for n in observer.nodes(root)}
    assert nodes["bad"]["status"] == "FAILED" and failed["id"] in nodes["bad"]["error"]
    assert nodes["slow"]["status"] == "TERMINATED"
    record = rt.wait(root, timeout=30)
    assert record.status is ExecutionStatus.FAILED and failed["id"] in record.error


def test_child_stopped_on_its_own_fails_the_parent_agent_node(runtime_factory, observer):
    rt = runtime_factory(g.graphs(leaf=g.leaf(), parent=g.parent(a=("leaf", {"seconds": g.LONG}))))
    root = rt.start("parent", user_id=USER)
    rows = wait_tree_running(observer, root, executions=2, naps=1)
    child = next(r["id"] for r in rows if r["id"] != root)

    ack = rt.stop(child, user_id=USER)

    assert ack.terminated == (child,)
    assert observer.status(child) == "TERMINATED"
    wait_status(observer, root, *TERMINAL_STATUSES)
    parent = observer.execution(root)
    assert parent["status"] == "FAILED"
    assert child in parent["error"]
    node = next(n for n in observer.nodes(root) if n["node_id"] == "a")
    assert node["status"] == "FAILED" and child in node["error"]
    assert observer.status(child) == "TERMINATED"


def test_failing_node_terminates_running_siblings_first(runtime_factory, observer, gates):
    graph = {
        "nodes": {
            "hold": {"block": "hold", "input": {"key": "h"}},
            "slow": {"block": "agent", "input": {"graph": "leaf", "inputs": {"seconds": g.LONG}}},
            "wait": {"block": "sleep", "input": {"seconds": 0.2, "value": "late failure"}},
            "f": {"block": "fail"},
        },
        "links": [{"from": "wait.value", "to": "f.message"}],
    }
    rt = runtime_factory(g.graphs(leaf=g.leaf(), mixed=graph), blocks={"hold": gates.spec})
    root = rt.start("mixed", user_id=USER)

    wait_status(observer, root, *TERMINAL_STATUSES)

    row = observer.execution(root)
    assert row["status"] == "FAILED" and "late failure" in row["error"]
    nodes = {n["node_id"]: n["status"] for n in observer.nodes(root)}
    assert nodes["f"] == "FAILED"
    assert nodes["hold"] == "TERMINATED" and nodes["slow"] == "TERMINATED"
    children = [r for r in observer.subtree(root) if r["id"] != root]
    assert [c["status"] for c in children] == ["TERMINATED"]
    wait_until(lambda: gates.outcomes.get("h") == "stopped", what="hold block told to stop")


def test_close_stops_every_live_execution_and_leaves_no_thread(database_url, observer):
    threads_before = set(threading.enumerate())
    rt = Runtime(database=database_url)
    try:
        rt.load(g.graphs(**g.tree(2, 2), nap=g.sleeper()))
        tree = rt.start("level_0", user_id=USER)
        lone = rt.start("nap", user_id="bob")
        wait_tree_running(observer, tree, executions=7, naps=4)
        wait_tree_running(observer, lone, executions=1, naps=1)
    finally:
        rt.close()

    rows = observer.subtree(tree) + observer.subtree(lone)
    assert len(rows) == 8
    assert {r["status"] for r in rows} == {"TERMINATED"}
    wait_until(
        lambda: not [t for t in threading.enumerate() if t not in threads_before and t.is_alive()],
        what="every runtime thread to end",
    )


def test_context_manager_closes_the_runtime(database_url, observer):
    with Runtime(database=database_url) as rt:
        rt.load(g.graphs(nap=g.sleeper()))
        root = rt.start("nap", user_id=USER)
        wait_tree_running(observer, root, executions=1, naps=1)
    assert observer.status(root) == "TERMINATED"


def test_database_outlives_the_runtime(database_url, observer, runtime_factory):
    first = Runtime(database=database_url)
    try:
        first.load(g.graphs(quick=g.quick()))
        done = first.start("quick", user_id=USER)
        wait_status(observer, done, "COMPLETED")
    finally:
        first.close()

    second = runtime_factory(g.graphs(quick=g.quick()))
    record = second.get(done, user_id=USER)
    assert record.status is ExecutionStatus.COMPLETED and record.outputs == {"answer": 42}
    again = second.start("quick", user_id=USER)
    wait_status(observer, again, "COMPLETED")
    assert len(observer.query("SELECT id FROM graph_execution")) == 2


def test_close_after_every_execution_ended_is_clean_and_prompt(database_url, observer, caplog):
    """A finished execution is not live: close() has nothing to stop, nothing to wait for."""
    caplog.set_level(logging.WARNING)
    for attempt in range(8):
        rt = Runtime(database=database_url)
        try:
            rt.load(g.graphs(quick=g.quick(), failing=g.failing()))
            done = [rt.start("quick", user_id=USER), rt.start("failing", user_id=USER)]
            for exec_id in done:
                rt.wait(exec_id, timeout=30)
        finally:
            began = time.monotonic()
            rt.close()
            elapsed = time.monotonic() - began
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [], attempt
        # The stop deadline (15 s) is the only thing that could take this long.
        assert elapsed < 10, (attempt, elapsed)
        assert [observer.status(e) for e in done] == ["COMPLETED", "FAILED"]
