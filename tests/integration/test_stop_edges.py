"""A stop at the edges: meeting a failure, children failing together, zero wait, deep chains."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from actors import InvalidInput, execution
from tests.helpers import wait_status, wait_tree_running, wait_until
from tests.integration import graphs as g

USER = "alice"


def failing_after(seconds: float) -> g.Graph:
    """Sleeps ``seconds``, then its ``fail`` node fails: children of this graph fail together."""
    return {
        "nodes": {
            "nap": {"block": "sleep", "input": {"seconds": seconds, "value": "boom"}},
            "f": {"block": "fail"},
        },
        "links": [{"from": "nap.value", "to": "f.message"}],
    }


def chain(length: int) -> dict[str, g.Graph]:
    """``link_0`` starts ``link_1`` ... ``link_{length-1}``, which sleeps LONG: ``length`` executions."""
    graphs = {f"link_{k}": g.agents(f"link_{k + 1}", 1) for k in range(length - 1)}
    graphs[f"link_{length - 1}"] = g.sleeper()
    return graphs


def running_chain(runtime_factory, observer, length: int):
    """A runtime running ``chain(length)`` down to its sleeping last link: (runtime, root id, every id)."""
    rt = runtime_factory(g.graphs(**chain(length)), max_depth=max(length, 32))
    root = rt.start("link_0", user_id=USER)
    wait_until(lambda: observer.query(
        "SELECT COUNT(*) AS n FROM node_execution WHERE block = 'sleep' AND status = 'RUNNING'")[0]["n"] == 1,
        timeout=120.0, what="the deepest link to sleep")
    ids = {r["id"] for r in observer.subtree(root)}
    assert len(ids) == length
    return rt, root, ids


def slow_to_stop(ctx) -> dict:
    """Works until stopped, then takes 0.3 s to wind down: its execution stays ending meanwhile."""
    ctx.stop_event.wait(60)
    time.sleep(0.3)  # the block's own wind-down, not a test synchronisation
    return {}


def test_children_failing_together_end_their_parent_promptly(runtime_factory, observer):
    # Each child fails a node while a block of its own is still winding
    # down, so each is ending FAILED when the parent's cascade (started by
    # the first failure) arrives. Their ends must still reach the parent:
    # it ends well before its failure_timeout.
    child = failing_after(0.3)
    child["nodes"]["work"] = {"block": "slow_to_stop"}
    rt = runtime_factory(g.graphs(fails=child, parent=g.agents("fails", 4)), failure_timeout=20.0,
                         blocks={"slow_to_stop": (slow_to_stop, [], [])})
    root = rt.start("parent", user_id=USER)
    began = time.monotonic()

    wait_status(observer, root, "FAILED", timeout=30.0)

    elapsed = time.monotonic() - began
    assert elapsed < 5.0, f"parent took {elapsed:.1f}s to fail (failure_timeout is 20s)"
    rows = observer.subtree(root)
    assert len(rows) == 5
    assert {r["status"] for r in rows[1:]} <= {"FAILED", "TERMINATED"}
    assert any(r["status"] == "FAILED" for r in rows[1:])
    assert "fails" in observer.execution(root)["error"]


def test_stop_meeting_a_failure_keeps_its_own_deadline_and_names_the_execution(runtime_factory, observer):
    # A node fails while a child sleeps through any stop: the execution is
    # ending FAILED with a deadline of failure_timeout (30 s). A stop with
    # wait_timeout=0.5 arrives: the earlier deadline wins.
    rt = runtime_factory(
        g.graphs(stubborn=g.sleeper(seconds=60, ignore_stop=True), fails=failing_after(0.5),
                 parent=g.parent(a=("stubborn", {}), b=("fails", {}))),
        failure_timeout=30.0)
    root = rt.start("parent", user_id=USER)
    wait_until(lambda: any(r["status"] == "FAILED" for r in observer.subtree(root)[1:]),
               what="the failing child to fail")

    began = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=0.5)
    elapsed = time.monotonic() - began

    assert elapsed < 0.5 + 3.0, f"stop took {elapsed:.1f}s with wait_timeout=0.5 (failure_timeout 30s)"
    assert ack.execution_id == root
    assert root in ack.terminated + ack.already_final
    row = observer.execution(root)
    assert row["status"] in ("FAILED", "TERMINATED")
    if row["status"] == "FAILED":
        assert root in ack.already_final  # ended by the failure, not by this stop
    statuses = observer.subtree_statuses(root)
    assert all(status in ("FAILED", "TERMINATED") for status in statuses.values()), statuses


def test_wait_timeout_zero_forces_at_once_and_the_subtree_is_terminal(runtime_factory, observer):
    rt = runtime_factory(g.graphs(stubborn=g.sleeper(seconds=60, ignore_stop=True),
                                  parent=g.agents("stubborn", 3)))
    root = rt.start("parent", user_id=USER)
    rows = wait_tree_running(observer, root, executions=4, naps=3)

    began = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=0)
    elapsed = time.monotonic() - began

    assert elapsed < 3.0, f"wait_timeout=0 took {elapsed:.1f}s"
    assert set(ack.terminated) == {r["id"] for r in rows}
    assert set(ack.forced) == {r["id"] for r in rows[1:]}  # the children's work was cut short
    assert set(observer.subtree_statuses(root).values()) == {"TERMINATED"}
    for row in rows:
        assert all(node["status"] != "RUNNING" for node in observer.nodes(row["id"]))


@pytest.mark.parametrize("bad", [-1, -0.001, "soon", None, float("nan"), float("inf"), True])
def test_bad_wait_timeout_is_invalid_input_and_changes_nothing(runtime_factory, observer, bad):
    rt = runtime_factory(g.graphs(nap=g.sleeper()))
    root = rt.start("nap", user_id=USER)
    wait_tree_running(observer, root, executions=1, naps=1)
    before = observer.snapshot()

    with pytest.raises(InvalidInput, match="wait_timeout"):
        rt.stop(root, user_id=USER, wait_timeout=bad)

    assert observer.snapshot() == before


def test_a_second_stop_with_an_earlier_deadline_wins(runtime_factory, observer):
    rt = runtime_factory(g.graphs(stubborn=g.sleeper(seconds=60, ignore_stop=True),
                                  parent=g.agents("stubborn", 2)))
    root = rt.start("parent", user_id=USER)
    wait_tree_running(observer, root, executions=3, naps=2)
    first: dict = {}

    def slow_stop() -> None:
        first["ack"] = rt.stop(root, user_id=USER, wait_timeout=30.0)
        first["at"] = time.monotonic()

    thread = threading.Thread(target=slow_stop)
    thread.start()
    try:
        wait_until(lambda: observer.execution(root)["stop_requested_at"] is not None, what="first stop on record")
        began = time.monotonic()
        second = rt.stop(root, user_id=USER, wait_timeout=0.3)
        elapsed = time.monotonic() - began
    finally:
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert elapsed < 0.3 + 3.0, f"the earlier deadline did not win: {elapsed:.1f}s"
    assert first["at"] - began < 0.3 + 3.0  # the slow stop shares the ending, and its end
    assert second == first["ack"]
    assert set(observer.subtree_statuses(root).values()) == {"TERMINATED"}


def test_cascading_stop_reaches_children_a_non_cascading_stop_left_running(runtime_factory, observer):
    rt = runtime_factory(g.graphs(nap=g.sleeper(), parent=g.agents("nap", 2)))
    root = rt.start("parent", user_id=USER)
    rows = wait_tree_running(observer, root, executions=3, naps=2)
    first = rt.stop(root, user_id=USER, cascade=False)
    assert first.terminated == (root,)
    assert {observer.status(r["id"]) for r in rows[1:]} == {"RUNNING"}

    ack = rt.stop(root, user_id=USER)

    assert root in ack.already_final
    assert set(ack.terminated) == {r["id"] for r in rows[1:]}
    assert set(observer.subtree_statuses(root).values()) == {"TERMINATED"}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("wait_timeout", [5.0, 0.0])
def test_a_chain_of_600_stops_in_time_and_acknowledges_every_execution(runtime_factory, observer, caplog,
                                                                       wait_timeout):
    # The way up is messages, so depth costs turns, not stack frames. With
    # wait_timeout=0 the deadline passes at every level at once, and each
    # level passes it on once (it once took 1.6 s and acknowledged 2 of 600).
    length = 600
    rt, root, ids = running_chain(runtime_factory, observer, length)

    with caplog.at_level(logging.WARNING):
        began = time.monotonic()
        ack = rt.stop(root, user_id=USER, wait_timeout=wait_timeout)
        elapsed = time.monotonic() - began

    assert elapsed < 5.0, f"a chain of {length} took {elapsed:.1f}s to stop (wait_timeout {wait_timeout} s)"
    assert set(ack.terminated) == ids
    assert ack.forced == ()
    assert set(observer.subtree_statuses(root).values()) == {"TERMINATED"}
    assert wait_until(lambda: rt.live_count == 0, timeout=30.0, what="every actor gone")
    assert not [r for r in caplog.records if "RecursionError" in r.getMessage() or r.exc_info]


def test_cascading_stop_of_an_ancestor_reaches_children_left_running(runtime_factory, observer):
    rt = runtime_factory(g.graphs(nap=g.sleeper(), parent=g.agents("nap", 2), top=g.agents("parent", 1)))
    root = rt.start("top", user_id=USER)
    rows = wait_tree_running(observer, root, executions=4, naps=2)
    parent = next(r["id"] for r in rows if r["parent_id"] == root)
    rt.stop(parent, user_id=USER, cascade=False)
    left_running = {r["id"] for r in rows if r["parent_id"] == parent}
    assert {observer.status(i) for i in left_running} == {"RUNNING"}

    # The parent, stopped on its own, failed the root's agent node: the root
    # ended FAILED, its cascade never reaching the children left running.
    wait_status(observer, root, "FAILED")

    ack = rt.stop(root, user_id=USER)

    assert root in ack.already_final
    assert set(ack.terminated) == left_running
    statuses = observer.subtree_statuses(root)
    assert statuses == {root: "FAILED", parent: "TERMINATED", **{i: "TERMINATED" for i in left_running}}


@pytest.mark.timeout(240)
def test_children_still_working_after_the_grace_are_waited_for_not_written_over(
        runtime_factory, observer, caplog, monkeypatch):
    # A grace far shorter than the cascade takes: every level looks at its
    # child while the child is still working its way through its subtree.
    # A live child gets more time; before, every level wrote the subtree
    # below it again, and the ack named only some of the executions.
    monkeypatch.setattr(execution, "CHILD_GRACE", 0.001)
    rt, root, ids = running_chain(runtime_factory, observer, 300)

    with caplog.at_level(logging.WARNING):
        ack = rt.stop(root, user_id=USER, wait_timeout=0)

    assert set(ack.terminated) == ids
    assert ack.forced == ()
    assert set(observer.subtree_statuses(root).values()) == {"TERMINATED"}
    assert not [r for r in caplog.records if "writing their subtrees" in r.getMessage()]
