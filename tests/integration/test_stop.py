"""The cascading Stop: persisted before it is acknowledged, bounded in time, on both databases."""
from __future__ import annotations

import threading
import time

import pytest

from actors import NotFound, PermissionDenied, StopAck
from tests.helpers import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    assert_stays,
    tree_state,
    wait_status,
    wait_tree_running,
    wait_until,
)
from tests.integration import graphs as g

USER = "alice"


def assert_all_terminated(observer, root_id: str, expected: int) -> list[dict]:
    """Read at once (no wait): stop() returned, so every write must be committed."""
    rows = observer.subtree(root_id)
    assert len(rows) == expected
    assert {r["status"] for r in rows} == {"TERMINATED"}, {r["id"]: r["status"] for r in rows}
    assert all(r["ended_at"] is not None for r in rows)
    for row in rows:
        for node in observer.nodes(row["id"]):
            assert node["status"] in TERMINAL_STATUSES, (row["id"], node)
    return rows


def test_stop_running_root_without_children(runtime_factory, observer):
    rt = runtime_factory(g.graphs(nap=g.sleeper()))
    root = rt.start("nap", user_id=USER)
    wait_tree_running(observer, root, executions=1, naps=1)

    began = time.monotonic()
    ack = rt.stop(root, user_id=USER)
    elapsed = time.monotonic() - began

    assert isinstance(ack, StopAck)
    assert ack.execution_id == root
    assert ack.terminated == (root,)
    assert ack.already_final == () and ack.forced == ()
    row = assert_all_terminated(observer, root, 1)[0]
    assert row["stop_requested_at"] is not None
    assert row["stop_reason"] == "stopped by user"
    assert row["started_at"] is not None
    assert [(n["node_id"], n["status"]) for n in observer.nodes(root)] == [("nap", "TERMINATED")]
    # The sleep ends early when stopped: far from its 60 s.
    assert elapsed < 20


def test_stop_tree_of_fanout_3_and_depth_2(runtime_factory, observer):
    rt = runtime_factory(g.graphs(**g.tree(3, 2)))
    root = rt.start("level_0", user_id=USER)
    rows = wait_tree_running(observer, root, executions=13, naps=9)
    by_graph = {}
    for row in rows:
        by_graph.setdefault(row["graph_id"], []).append(row)
    assert {k: len(v) for k, v in by_graph.items()} == {"level_0": 1, "level_1": 3, "level_2": 9}
    level_1 = {r["id"] for r in by_graph["level_1"]}
    assert all(r["parent_id"] == root for r in by_graph["level_1"])
    assert all(r["parent_id"] in level_1 for r in by_graph["level_2"])
    assert all(r["user_id"] == USER for r in rows)

    ack = rt.stop(root, user_id=USER)

    assert set(ack.terminated) == {r["id"] for r in rows}
    assert len(ack.terminated) == 13
    assert ack.already_final == () and ack.forced == ()
    after = assert_all_terminated(observer, root, 13)
    # The stop keeps the supervision links.
    assert {r["id"]: r["parent_id"] for r in after} == {r["id"]: r["parent_id"] for r in rows}


def test_stop_chain_of_20_executions(runtime_factory, observer):
    # 20 executions in all: the root and 19 levels below it.
    rt = runtime_factory(g.graphs(**g.tree(1, 19, prefix="chain")))
    root = rt.start("chain_0", user_id=USER)
    rows = wait_tree_running(observer, root, executions=20, naps=1)
    parent_of = {r["id"]: r["parent_id"] for r in rows}
    # A single line: walk it from the deepest execution up to the root.
    deepest = next(r["id"] for r in rows if r["graph_id"] == "chain_19")
    line = [deepest]
    while parent_of[line[-1]] is not None:
        line.append(parent_of[line[-1]])
    assert line[-1] == root and len(line) == 20
    assert sorted(r["depth"] for r in rows) == list(range(20))

    ack = rt.stop(root, user_id=USER)

    assert set(ack.terminated) == set(line) and len(ack.terminated) == 20
    assert ack.forced == ()
    assert_all_terminated(observer, root, 20)


def test_stop_ten_running_children_in_bounded_time(runtime_factory, observer):
    rt = runtime_factory(g.graphs(leaf=g.leaf(), ten=g.agents("leaf", 10, {"seconds": g.LONG})))
    root = rt.start("ten", user_id=USER)
    rows = wait_tree_running(observer, root, executions=11, naps=10)

    began = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=15.0)
    elapsed = time.monotonic() - began

    # Ten 60 s sleeps stopped in parallel: well under one of them.
    assert elapsed < 20
    assert set(ack.terminated) == {r["id"] for r in rows}
    assert ack.forced == ()
    assert_all_terminated(observer, root, 11)


def test_stop_queued_root(runtime_factory, observer):
    rt = runtime_factory(g.graphs(nap=g.sleeper(), quick=g.quick()), max_running_per_user=1)
    running = rt.start("nap", user_id=USER)
    queued = rt.start("nap", user_id=USER)
    wait_tree_running(observer, running, executions=1, naps=1)
    assert observer.status(queued) == "QUEUED"

    ack = rt.stop(queued, user_id=USER)

    assert ack.terminated == (queued,) and ack.already_final == ()
    row = observer.execution(queued)
    assert row["status"] == "TERMINATED"
    assert row["started_at"] is None
    assert row["ended_at"] is not None
    assert observer.nodes(queued) == []
    assert observer.status(running) == "RUNNING"

    # Free the slot: the stopped root must not start; the next queued one does.
    after = rt.start("quick", user_id=USER)
    rt.stop(running, user_id=USER)
    wait_status(observer, after, "COMPLETED")
    row = observer.execution(queued)
    assert row["status"] == "TERMINATED" and row["started_at"] is None
    assert observer.nodes(queued) == []


@pytest.mark.parametrize("graph, status", [("quick", "COMPLETED"), ("failing", "FAILED")])
def test_stop_of_final_execution_changes_nothing(runtime_factory, observer, graph, status):
    rt = runtime_factory(g.graphs(quick=g.quick(), failing=g.failing()))
    done = rt.start(graph, user_id=USER)
    wait_status(observer, done, status)
    before = observer.snapshot()

    ack = rt.stop(done, user_id=USER)

    assert ack.execution_id == done
    assert ack.already_final == (done,)
    assert ack.terminated == () and ack.forced == ()
    assert observer.snapshot() == before
    row = observer.execution(done)
    assert row["status"] == status
    assert row["stop_requested_at"] is None and row["stop_reason"] is None


def test_stop_by_another_user_is_denied_and_changes_nothing(runtime_factory, observer):
    rt = runtime_factory(g.graphs(leaf=g.leaf(), parent=g.agents("leaf", 2, {"seconds": g.LONG})))
    root = rt.start("parent", user_id=USER)
    rows = wait_tree_running(observer, root, executions=3, naps=2)
    child = next(r["id"] for r in rows if r["id"] != root)
    before = observer.snapshot()

    for target in (root, child):
        with pytest.raises(PermissionDenied) as denied:
            rt.stop(target, user_id="mallory")
        assert target in str(denied.value)

    assert observer.snapshot() == before
    assert all(r["stop_requested_at"] is None for r in observer.subtree(root))
    # The tree still runs and its owner can still stop it.
    ack = rt.stop(root, user_id=USER)
    assert len(ack.terminated) == 3
    assert_all_terminated(observer, root, 3)


def test_stop_unknown_id_raises_not_found(runtime_factory, observer):
    rt = runtime_factory(g.graphs(quick=g.quick()))
    known = rt.start("quick", user_id=USER)
    wait_status(observer, known, "COMPLETED")
    before = observer.snapshot()
    missing = "00000000-0000-4000-8000-000000000000"

    with pytest.raises(NotFound) as not_found:
        rt.stop(missing, user_id=USER)

    assert missing in str(not_found.value)
    assert observer.snapshot() == before



def _start_stubborn_tree(runtime_factory, observer):
    """A root with two children: one sleeps through any stop, one sleeps LONG. Returns (rt, root, rows)."""
    rt = runtime_factory(
        g.graphs(
            leaf=g.leaf(),
            stubborn=g.sleeper(seconds=20, ignore_stop=True),
            mixed=g.parent(a=("stubborn", {}), b=("leaf", {"seconds": g.LONG})),
        )
    )
    root = rt.start("mixed", user_id=USER)
    return rt, root, wait_tree_running(observer, root, executions=3, naps=2)

def test_two_stops_while_one_is_in_progress_get_the_same_ack(runtime_factory, observer):
    # The stubborn child keeps the first stop in progress for its whole wait_timeout.
    rt, root, rows = _start_stubborn_tree(runtime_factory, observer)
    first: dict = {}

    def stop_first() -> None:
        try:
            first["ack"] = rt.stop(root, user_id=USER, wait_timeout=5.0)
        except BaseException as exc:  # reported by the assertions below
            first["error"] = exc
        first["done_at"] = time.monotonic()

    thread = threading.Thread(target=stop_first)
    thread.start()
    try:
        wait_until(lambda: observer.execution(root)["stop_requested_at"] is not None, what="first stop persisted")
        second_sent_at = time.monotonic()
        second = rt.stop(root, user_id=USER, wait_timeout=5.0)
    finally:
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert "error" not in first, first.get("error")

    ack = first["ack"]
    assert set(ack.terminated) == {r["id"] for r in rows}
    if first["done_at"] > second_sent_at:
        assert second == ack  # waited for the stop in progress
    else:  # only on a machine stalled for seconds: the first had finished
        assert root in second.already_final and second.terminated == ()
    assert_all_terminated(observer, root, 3)

    late = rt.stop(root, user_id=USER)
    assert root in late.already_final
    assert late.terminated == () and late.forced == ()


def test_simultaneous_stops_both_acknowledge(runtime_factory, observer):
    rt = runtime_factory(g.graphs(**g.tree(2, 2)))
    root = rt.start("level_0", user_id=USER)
    rows = wait_tree_running(observer, root, executions=7, naps=4)
    barrier = threading.Barrier(2, timeout=30)
    results: list = [None, None]

    def stop(slot: int) -> None:
        barrier.wait()
        try:
            results[slot] = rt.stop(root, user_id=USER)
        except BaseException as exc:
            results[slot] = exc

    threads = [threading.Thread(target=stop, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

    assert all(isinstance(r, StopAck) for r in results), results
    everything = {r["id"] for r in rows}
    full = [r for r in results if set(r.terminated) == everything]
    assert full, results
    for r in results:
        assert r == full[0] or (root in r.already_final and r.terminated == ())
    assert_all_terminated(observer, root, 7)


def test_cascade_false_stops_only_that_execution(runtime_factory, observer, gates):
    rt = runtime_factory(
        g.graphs(held=g.held(), parent=g.parent(a=("held", {"key": "a"}), b=("held", {"key": "b"}))),
        blocks={"hold": gates.spec},
    )
    root = rt.start("parent", user_id=USER)
    wait_until(lambda: sorted(gates.started) == ["a", "b"], what="both children holding")
    children = wait_until(lambda: len(observer.subtree(root)) == 3 and observer.subtree(root)[1:])
    child_ids = {c["id"] for c in children}

    ack = rt.stop(root, user_id=USER, cascade=False)

    assert ack.terminated == (root,)
    assert observer.status(root) == "TERMINATED"
    for child in child_ids:
        row = observer.execution(child)
        assert row["status"] == "RUNNING" and row["parent_id"] == root
    # The children run on, untouched by the parent's end ...
    assert_stays(lambda: {observer.status(c) for c in child_ids} == {"RUNNING"}, 1.0, "children RUNNING")
    assert gates.outcomes == {}

    # ... to their own end, keeping their parent link.
    gates.open("a")
    gates.open("b")
    for child in child_ids:
        wait_status(observer, child, "COMPLETED")
        row = observer.execution(child)
        assert row["parent_id"] == root
    assert gates.outcomes == {"a": "released", "b": "released"}
    assert observer.status(root) == "TERMINATED"


def test_ignore_stop_work_is_forced_at_the_deadline(runtime_factory, observer):
    rt, root, rows = _start_stubborn_tree(runtime_factory, observer)
    stubborn = next(r["id"] for r in rows if r["graph_id"] == "stubborn")
    polite = next(r["id"] for r in rows if r["graph_id"] == "leaf")

    began = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=2.0)
    elapsed = time.monotonic() - began

    # Bounded by wait_timeout, not by the 20 s of the stubborn sleep.
    assert elapsed < 15
    assert stubborn in ack.forced
    assert polite not in ack.forced
    assert set(ack.terminated) == {root, stubborn, polite}
    assert_all_terminated(observer, root, 3)
    assert observer.execution(stubborn)["stop_forced"] in (True, 1)
    assert observer.execution(polite)["stop_forced"] in (False, 0)
    assert [(n["node_id"], n["status"]) for n in observer.nodes(stubborn)] == [("nap", "TERMINATED")]


def test_late_result_of_forced_work_is_discarded(runtime_factory, observer):
    rt = runtime_factory(g.graphs(stubborn=g.sleeper(seconds=3, ignore_stop=True, value="late"), proof=g.sleeper(4)))
    root = rt.start("stubborn", user_id=USER)
    wait_tree_running(observer, root, executions=1, naps=1)

    ack = rt.stop(root, user_id=USER, wait_timeout=0.5)

    assert ack.forced == (root,) and ack.terminated == (root,)
    after_stop = tree_state(observer, root)
    # The stubborn sleep (3 s, started before) has ended once this 4 s one completes.
    proof = rt.start("proof", user_id=USER)
    wait_status(observer, proof, "COMPLETED")
    assert_stays(lambda: observer.status(root) == "TERMINATED", 0.5, "TERMINATED")
    row = observer.execution(root)
    assert row["status"] == "TERMINATED"
    assert row["outputs"] in (None, "{}", "null")
    assert tree_state(observer, root) == after_stop


def test_stop_time_is_bounded_by_wait_timeout_not_depth(runtime_factory, observer):
    # A chain of 20 executions whose deepest one ignores the stop: a stop
    # that waited wait_timeout per level would take 20 x 2 s.
    levels = g.tree(1, 19, prefix="deep")
    levels["deep_19"] = g.sleeper(seconds=30, ignore_stop=True)
    rt = runtime_factory(g.graphs(**levels))
    root = rt.start("deep_0", user_id=USER)
    rows = wait_tree_running(observer, root, executions=20, naps=1)
    deepest = next(r["id"] for r in rows if r["graph_id"] == "deep_19")

    began = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=2.0)
    elapsed = time.monotonic() - began

    assert elapsed < 15
    assert deepest in ack.forced
    assert len(ack.terminated) == 20
    assert_all_terminated(observer, root, 20)


def test_stop_racing_natural_completion(runtime_factory, observer):
    rt = runtime_factory(
        g.graphs(**{f"short_{i}": g.sleeper(seconds=s, value="done") for i, s in enumerate((0, 0.01, 0.05, 0.1, 0.2))}),
    )
    outcomes = []
    for i in range(5):
        for wait_running in (False, True):
            exec_id = rt.start(f"short_{i}", user_id=USER)
            if wait_running:
                wait_status(observer, exec_id, "RUNNING", *TERMINAL_STATUSES)
            ack = rt.stop(exec_id, user_id=USER)
            status = observer.status(exec_id)  # at once: stop() returned
            if exec_id in ack.terminated:
                assert status == "TERMINATED" and ack.already_final == ()
            else:
                assert ack.already_final == (exec_id,) and status == "COMPLETED"
            assert rt.wait(exec_id, timeout=30).status.value == status
            outcomes.append((exec_id, status))

    states = {e: tree_state(observer, e) for e, _ in outcomes}
    proof = rt.start("short_4", user_id=USER)
    wait_status(observer, proof, "COMPLETED")
    assert_stays(lambda: all(observer.status(e) == s for e, s in outcomes), 1.0, "terminal statuses")
    assert {e: tree_state(observer, e) for e, _ in outcomes} == states
    for exec_id, status in outcomes:
        assert all(n["status"] in TERMINAL_STATUSES for n in observer.nodes(exec_id))
        if status == "TERMINATED":
            assert observer.execution(exec_id)["outputs"] in (None, "{}", "null")


def test_child_made_ready_after_stop_never_runs_a_node(runtime_factory, observer, recorder):
    """The agent nodes become ready only after the parent's stop began: no child may run a node."""
    stop_futures = []

    def trigger(ctx) -> dict:
        stop_futures.append(rt.stop(ctx.execution_id, user_id=USER, block=False))
        # The spawn gate is closed before running nodes are signalled.
        wait_until(ctx.stop_event.is_set, 30.0, "stop signalled to the trigger")
        return {"inputs": {"value": "child ran"}}

    marked = {"nodes": {"m": {"block": "mark"}}}
    spawner = {
        "nodes": {
            "trigger": {"block": "trigger"},
            **{f"c{i}": {"block": "agent", "input": {"graph": "marked"}} for i in range(5)},
        },
        "links": [{"from": "trigger.inputs", "to": f"c{i}.inputs"} for i in range(5)],
    }
    rt = runtime_factory(
        g.graphs(marked=marked, spawner=spawner),
        blocks={"mark": recorder.spec, "trigger": (trigger, (), ("inputs",))},
    )
    root = rt.start("spawner", user_id=USER)
    wait_until(lambda: stop_futures, what="trigger to request the stop")
    ack = stop_futures[0].get(timeout=30)

    assert root in ack.terminated
    rows = observer.subtree(root)
    for row in rows:
        assert row["status"] == "TERMINATED", row
        if row["id"] != root:
            assert row["parent_id"] == root
            assert row["started_at"] is None or all(n["status"] == "TERMINATED" for n in observer.nodes(row["id"]))
    assert recorder.count() == 0
    proof = rt.start("marked", user_id=USER, inputs={})
    wait_status(observer, proof, "COMPLETED")
    assert recorder.calls == [(proof, None)]
    assert len(observer.subtree(root)) == len(rows)


def test_children_spawned_while_parent_stops_end_terminated(runtime_factory, observer, recorder):
    """Release five agent nodes at the moment the stop is sent, a few times over.

    Whatever the interleaving, when stop() returns every execution created
    under the parent is TERMINATED, and none runs a node afterwards.
    """
    current: dict[str, threading.Barrier] = {}

    def release(ctx) -> dict:
        current["barrier"].wait()
        return {"inputs": {}}

    child = {
        "nodes": {"m": {"block": "mark"}, "nap": {"block": "sleep", "input": {"seconds": g.LONG}}},
        "links": [{"from": "m.value", "to": "nap.value"}],
    }
    spawner = {
        "nodes": {
            "go": {"block": "release"},
            **{f"c{i}": {"block": "agent", "input": {"graph": "child"}} for i in range(5)},
        },
        "links": [{"from": "go.inputs", "to": f"c{i}.inputs"} for i in range(5)],
    }
    rt = runtime_factory(
        g.graphs(child=child, spawner=spawner),
        blocks={"mark": recorder.spec, "release": (release, (), ("inputs",))},
    )
    for _ in range(3):
        barrier = current["barrier"] = threading.Barrier(2, timeout=30)
        root = rt.start("spawner", user_id=USER)
        wait_until(
            lambda: any(n["node_id"] == "go" and n["status"] == "RUNNING" for n in observer.nodes(root)),
            what="release node running",
        )
        barrier.wait()
        ack = rt.stop(root, user_id=USER)

        rows = observer.subtree(root)
        assert {r["status"] for r in rows} == {"TERMINATED"}, rows
        assert set(ack.terminated) | set(ack.already_final) >= {r["id"] for r in rows}
        for row in rows:
            assert all(n["status"] in TERMINAL_STATUSES for n in observer.nodes(row["id"]))
        marks = recorder.count()
        before = tree_state(observer, root)
        assert_stays(lambda: recorder.count() == marks, 0.5, "no node starting after stop")
        assert tree_state(observer, root) == before


def test_after_stop_returns_nothing_starts_and_no_row_changes(runtime_factory, observer, recorder):
    # Each leaf has work queued behind its sleep: a node that would start if
    # the spawn gate let it, and an agent that would start a grandchild.
    staged = {
        "nodes": {
            "nap": {"block": "sleep", "input": {"seconds": g.LONG, "value": {"value": "after nap"}}},
            "m": {"block": "mark"},
            "more": {"block": "agent", "input": {"graph": "marked"}},
            "out": {"block": "output", "input": {"name": "value"}},
        },
        "links": [
            {"from": "nap.value", "to": "m.value"},
            {"from": "m.value", "to": "out.value"},
            {"from": "nap.value", "to": "more.inputs"},
        ],
    }
    marked = {"nodes": {"m": {"block": "mark"}}}
    rt = runtime_factory(
        g.graphs(staged=staged, marked=marked, top=g.agents("staged", 3), proof=g.sleeper(0.5)),
        blocks={"mark": recorder.spec},
    )
    root = rt.start("top", user_id=USER)
    wait_tree_running(observer, root, executions=4, naps=3)

    ack = rt.stop(root, user_id=USER)

    assert len(ack.terminated) == 4
    rows = assert_all_terminated(observer, root, 4)
    before = tree_state(observer, root)
    proof = rt.start("proof", user_id=USER)
    wait_status(observer, proof, "COMPLETED")
    polls = assert_stays(lambda: tree_state(observer, root) == before, 1.0, "the stopped tree unchanged")
    assert polls >= 5
    assert recorder.count() == 0
    assert len(observer.subtree(root)) == len(rows)
    tree_nodes = [n for r in rows for n in observer.nodes(r["id"])]
    assert {n["node_id"] for n in tree_nodes} <= {"c0", "c1", "c2", "nap"}
    assert not [n for n in tree_nodes if n["status"] in ACTIVE_STATUSES]
