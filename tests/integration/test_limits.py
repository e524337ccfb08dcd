"""Limits: max_depth, and running limits per user and per (user, graph) with a FIFO queue."""
from __future__ import annotations

from tests.helpers import TERMINAL_STATUSES, assert_stays, wait_status, wait_tree_running, wait_until
from tests.integration import graphs as g

USER = "alice"


def test_max_depth_fails_the_agent_node_naming_graph_and_depth(runtime_factory, observer):
    # "rec" starts itself; max_depth=2 allows depths 0, 1 and 2 only.
    rec = {"nodes": {"again": {"block": "agent", "input": {"graph": "rec", "inputs": {}}}}}
    rt = runtime_factory(g.graphs(rec=rec), max_depth=2)
    root = rt.start("rec", user_id=USER)

    wait_status(observer, root, *TERMINAL_STATUSES)

    rows = observer.subtree(root)
    assert sorted(r["depth"] for r in rows) == [0, 1, 2]
    deepest = next(r for r in rows if r["depth"] == 2)
    assert deepest["status"] == "FAILED"
    assert "rec" in deepest["error"] and ("3" in deepest["error"] or "2" in deepest["error"])
    assert "depth" in deepest["error"]
    node = observer.nodes(deepest["id"])
    assert [(n["node_id"], n["status"]) for n in node] == [("again", "FAILED")]
    # The failure surfaces up the chain.
    assert {r["status"] for r in rows} == {"FAILED"}


def test_max_depth_allows_a_tree_exactly_that_deep(runtime_factory, observer):
    rt = runtime_factory(g.graphs(**g.tree(2, 2, seconds=0.01)), max_depth=2)
    root = rt.start("level_0", user_id=USER)

    wait_status(observer, root, *TERMINAL_STATUSES)

    rows = observer.subtree(root)
    assert len(rows) == 7
    assert {r["status"] for r in rows} == {"COMPLETED"}


def test_user_limit_queues_roots_in_fifo_order(runtime_factory, observer):
    rt = runtime_factory(g.graphs(nap=g.sleeper()), max_running_per_user=1)
    ids = [rt.start("nap", user_id=USER, inputs={"order": i}) for i in range(4)]
    other_user = rt.start("nap", user_id="bob")

    wait_tree_running(observer, ids[0], executions=1, naps=1)
    wait_tree_running(observer, other_user, executions=1, naps=1)  # bob has his own slot
    assert [observer.status(i) for i in ids] == ["RUNNING", "QUEUED", "QUEUED", "QUEUED"]
    assert all(observer.execution(i)["started_at"] is None for i in ids[1:])

    for turn in range(1, 4):
        rt.stop(ids[turn - 1], user_id=USER)
        wait_status(observer, ids[turn], "RUNNING")
        expected = ["TERMINATED"] * turn + ["RUNNING"] + ["QUEUED"] * (3 - turn)
        assert [observer.status(i) for i in ids] == expected
    rt.stop(ids[3], user_id=USER)
    rt.stop(other_user, user_id="bob")


def test_natural_completion_frees_the_slot(runtime_factory, observer, gates):
    rt = runtime_factory(g.graphs(held=g.held()), blocks={"hold": gates.spec}, max_running_per_user=1)
    first = rt.start("held", user_id=USER, inputs={"key": "first"})
    second = rt.start("held", user_id=USER, inputs={"key": "second"})
    wait_until(lambda: gates.started == ["first"], what="first root holding")
    assert_stays(lambda: observer.status(second) == "QUEUED", 0.5, "second root QUEUED")
    assert gates.started == ["first"]

    gates.open("first")

    wait_status(observer, first, "COMPLETED")
    wait_status(observer, second, "RUNNING")
    wait_until(lambda: gates.started == ["first", "second"], what="second root holding")
    gates.open("second")
    wait_status(observer, second, "COMPLETED")


def test_graph_limit_counts_per_user_and_graph(runtime_factory, observer):
    rt = runtime_factory(g.graphs(nap=g.sleeper(), other=g.sleeper()), max_running_per_graph=1)
    first = rt.start("nap", user_id=USER)
    queued = rt.start("nap", user_id=USER)
    other_graph = rt.start("other", user_id=USER)
    other_user = rt.start("nap", user_id="bob")

    for running in (first, other_graph, other_user):
        wait_tree_running(observer, running, executions=1, naps=1)
    assert observer.status(queued) == "QUEUED"

    rt.stop(first, user_id=USER)

    wait_status(observer, queued, "RUNNING")


def test_children_never_wait_for_a_slot(runtime_factory, observer):
    rt = runtime_factory(
        g.graphs(leaf=g.leaf(), parent=g.agents("leaf", 3, {"seconds": g.LONG}), nap=g.sleeper()),
        max_running_per_user=1,
        max_running_per_graph=1,
    )
    root = rt.start("parent", user_id=USER)
    queued = rt.start("nap", user_id=USER)

    # The parent's three children run beside it although the user's one slot is taken.
    wait_tree_running(observer, root, executions=4, naps=3)
    assert observer.status(queued) == "QUEUED"

    rt.stop(root, user_id=USER)

    wait_status(observer, queued, "RUNNING")
