"""A stop request carries its wait_timeout to the runtime that hosts the tree.

A stop asked in another process (``run.py stop``, ``stop_execution``, a
``Client``) is persisted as a request, and the hosting runtime's stop watcher
hands it to the actor. The actor must apply the requester's ``wait_timeout``:
0 forces at once, and of several requests the shortest wins. A stop asked in
the hosting runtime itself is persisted too (for recovery), but its watcher
must not hand it back to its own actor with another timeout.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

import pytest

from actors import StopAck, stop_execution
from persistence import RequestStop, Store, StopRequest, utcnow
from tests.helpers import Observer, wait_tree_running, wait_until
from tests.integration import graphs as g

USER = "alice"
# Bounds every wait of a thread that runs a stop; a healthy one returns in well under a second.
STOP_RETURNS_WITHIN = 60.0
# The wind-down of `slow_wind_down`: longer than the 15 s a stop used to be cut to.
WIND_DOWN_SECONDS = 16.0


def stubborn_tree() -> dict[str, Any]:
    """``mixed`` starts a child that sleeps ignoring stops and one that ends at a stop."""
    return g.graphs(
        mixed={"nodes": {"a": {"block": "agent", "input": {"graph": "stubborn"}},
                         "b": {"block": "agent", "input": {"graph": "cooperative"}}}},
        stubborn=g.sleeper(ignore_stop=True),
        cooperative=g.sleeper(),
    )


def children_by_graph(observer, root: str) -> dict[str, str]:
    return {row["graph_id"]: row["id"] for row in observer.subtree(root) if row["id"] != root}


class StopInThread:
    """``stop_execution`` (as ``run.py stop`` runs it) on a thread: its ack or its error, bounded."""

    def __init__(self, database_url: str, execution_id: str, wait_timeout: float) -> None:
        self.outcome: StopAck | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(database_url, execution_id, wait_timeout),
                                        daemon=True)
        self._thread.start()

    def _run(self, database_url: str, execution_id: str, wait_timeout: float) -> None:
        try:
            self.outcome = stop_execution(database_url, execution_id, USER, wait_timeout=wait_timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.outcome = exc

    def result(self) -> StopAck:
        self._thread.join(STOP_RETURNS_WITHIN)
        assert not self._thread.is_alive(), f"the stop did not return within {STOP_RETURNS_WITHIN}s"
        assert isinstance(self.outcome, StopAck), self.outcome
        return self.outcome


def assert_forced_terminal(observer, root: str, stubborn: str) -> None:
    rows = {row["id"]: row for row in observer.subtree(root)}
    assert {row["status"] for row in rows.values()} == {"TERMINATED"}, rows
    assert rows[stubborn]["stop_forced"]
    assert [n["status"] for n in observer.nodes(stubborn) if n["node_id"] == "nap"] == ["TERMINATED"]


def test_a_stop_from_elsewhere_with_wait_timeout_0_forces_the_hosted_tree_at_once(
        runtime_factory, observer, database_url):
    # Before, the host gave every request from elsewhere 15 s: the ignoring
    # nap ran on, and the stop raised StopTimeout after its 0 + 5 s.
    rt = runtime_factory(stubborn_tree())
    root = rt.start("mixed", user_id=USER)
    rows = wait_tree_running(observer, root, executions=3, naps=2)
    stubborn = children_by_graph(observer, root)["stubborn"]

    ack = stop_execution(database_url, root, USER, wait_timeout=0)

    assert set(ack.terminated) == {row["id"] for row in rows}
    assert stubborn in ack.forced
    assert_forced_terminal(observer, root, stubborn)


def test_the_hosts_own_request_is_on_record_but_not_handed_back_to_it(runtime_factory, observer, database_url):
    rt = runtime_factory(stubborn_tree())
    root = rt.start("mixed", user_id=USER)
    rows = wait_tree_running(observer, root, executions=3, naps=2)
    children = children_by_graph(observer, root)

    here = rt.stop(root, user_id=USER, wait_timeout=600, block=False)

    wait_until(lambda: observer.status(children["cooperative"]) == "TERMINATED", 30.0,
               "the stop to end the cooperative child")
    row = observer.execution(root)
    assert row["status"] == "RUNNING"  # its stubborn child still naps
    # On record, so that recovery would end the tree TERMINATED...
    assert row["stop_requested_at"] is not None and row["stop_wait_timeout"] == 600.0
    assert row["stop_requested_by"] == rt.runtime_id
    # ...but not for the runtime's own watcher: its actor has the stop.
    store = Store.open(database_url, read_only=True)
    try:
        assert store.pending_stops(rt.runtime_id) == []
    finally:
        store.close()
    forced = rt.stop(root, user_id=USER, wait_timeout=0)  # the earlier deadline wins
    assert_forced_terminal(observer, root, children["stubborn"])
    assert set(forced.terminated) | set(forced.already_final) == {r["id"] for r in rows}
    assert root in here.get(timeout=STOP_RETURNS_WITHIN).terminated


def test_a_shorter_stop_from_elsewhere_wins_over_one_handed_on_before(runtime_factory, observer, database_url):
    rt = runtime_factory(stubborn_tree())
    root = rt.start("mixed", user_id=USER)
    rows = wait_tree_running(observer, root, executions=3, naps=2)
    children = children_by_graph(observer, root)
    store = Store.open(database_url)
    try:
        first = StopInThread(database_url, root, wait_timeout=300)
        # The cooperative child ends only once the host's actor has the request.
        wait_until(lambda: observer.status(children["cooperative"]) == "TERMINATED", 30.0,
                   "the host to hand the request on")
        request = StopRequest(execution_id=root, user_id=USER, cascade=True, reason="stopped by user",
                              wait_timeout=300.0)
        assert store.pending_stops(rt.runtime_id) == [request]
        # A longer request written after it does not lengthen it.
        store.write(RequestStop(execution_id=root, reason="another stop", cascade=True, at=utcnow(),
                                wait_timeout=900))
        assert store.pending_stops(rt.runtime_id) == [request]

        # A shorter one reaches the actor although the first was handed on
        # already, and forces the tree at once.
        ack = stop_execution(database_url, root, USER, wait_timeout=0)
    finally:
        store.close()

    assert_forced_terminal(observer, root, children["stubborn"])
    assert set(ack.terminated) == {row["id"] for row in rows} - {children["cooperative"]}
    earlier = first.result()
    assert set(earlier.terminated) == {row["id"] for row in rows}


def test_a_shorter_stop_from_elsewhere_of_a_child_wins_over_its_parents_stop_here(
        runtime_factory, observer, database_url):
    # The parent's pending cascading stop reaches the child anyway, so a
    # request on the child used to be left to it: with 600 s, although the
    # child's own request asked for 0.
    rt = runtime_factory(stubborn_tree())
    root = rt.start("mixed", user_id=USER)
    wait_tree_running(observer, root, executions=3, naps=2)
    children = children_by_graph(observer, root)
    here = rt.stop(root, user_id=USER, wait_timeout=600, block=False)
    wait_until(lambda: observer.status(children["cooperative"]) == "TERMINATED", 30.0,
               "the stop asked here to end the cooperative child")

    ack = stop_execution(database_url, children["stubborn"], USER, wait_timeout=0)

    assert ack.terminated == (children["stubborn"],) and ack.forced == (children["stubborn"],)
    assert_forced_terminal(observer, root, children["stubborn"])
    own = here.get(timeout=STOP_RETURNS_WITHIN)
    assert root in own.terminated and children["stubborn"] in own.already_final + own.terminated


def slow_wind_down(ctx) -> dict:
    """Works until stopped, then takes WIND_DOWN_SECONDS to wind down (its own work, not a test wait)."""
    ctx.stop_event.wait(120)
    time.sleep(WIND_DOWN_SECONDS)
    return {}


def test_a_stop_asked_here_keeps_a_wait_timeout_longer_than_15s(runtime_factory, observer):
    # Before, the runtime's stop watcher found the runtime's own request and
    # handed it back to the actor with the default 15 s, which won as the
    # earlier deadline: this block was forced at 15 s of its 16.
    rt = runtime_factory(g.graphs(slow={"nodes": {"work": {"block": "slow_wind_down"}}}),
                         blocks={"slow_wind_down": (slow_wind_down, [], [])})
    root = rt.start("slow", user_id=USER)
    wait_until(lambda: [n["status"] for n in observer.nodes(root)] == ["RUNNING"], 30.0, "the block to run")

    started = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=60)

    assert time.monotonic() - started >= WIND_DOWN_SECONDS
    assert ack.terminated == (root,) and ack.forced == ()
    row = observer.execution(root)
    assert row["status"] == "TERMINATED" and not row["stop_forced"]


@contextlib.contextmanager
def row_locked(database_url: str, execution_id: str, mode: str) -> Iterator[None]:
    """Hold a row lock (``FOR <mode>``) on the execution's row from a connection of the test's own."""
    holder = Observer(database_url)
    try:
        holder.execute("BEGIN")
        holder.query(f"SELECT id FROM graph_execution WHERE id = ? FOR {mode}", (execution_id,))
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def lock_waiters(observer) -> int:
    """Backends of this database waiting for a lock (PostgreSQL)."""
    return observer.query("SELECT count(*) AS n FROM pg_stat_activity"
                          " WHERE wait_event_type = 'Lock' AND datname = current_database()")[0]["n"]


# PostgreSQL only: a row lock holds both writes back after the stopper's
# read, and pg_stat_activity shows when both wait. SQLite shows nobody
# waiting for its lock: the test could not tell that the stopper had read.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("ends", ["released", "raises"])
def test_a_stop_from_elsewhere_names_an_execution_that_ended_otherwise_meanwhile(
        ends, runtime_factory, observer, database_url, gates):
    # The execution ends on its own (COMPLETED, or FAILED) between the
    # stopper's read of the subtree and its request reaching the host.
    # Before, the ack named it nowhere: not in terminated (it did not end
    # TERMINATED), not in already_final (it was active when read).

    def hold_then(ctx: Any, key: str) -> dict[str, Any]:
        gates.block(ctx, key)
        if ends == "raises":
            raise RuntimeError("the work failed on its own")
        return {"value": "done"}

    rt = runtime_factory(g.graphs(held={"nodes": {"h": {"block": "hold", "input": {"key": "h"}}}}),
                         blocks={"hold": (hold_then, ("key",), ("value",))})
    root = rt.start("held", user_id=USER)
    wait_until(lambda: gates.started == ["h"] and observer.status(root) == "RUNNING", 30.0, "the hold to run")
    with row_locked(database_url, root, "UPDATE"):
        gates.open("h")  # the execution ends; its final write waits for the row
        wait_until(lambda: lock_waiters(observer) == 1, 30.0, "the host's final write to wait for the row")
        stop = StopInThread(database_url, root, wait_timeout=5.0)  # reads it RUNNING, then waits too
        wait_until(lambda: lock_waiters(observer) == 2, 30.0, "the stop request to wait for the row")

    ack = stop.result()

    status = "COMPLETED" if ends == "released" else "FAILED"
    assert observer.status(root) == status
    assert ack.already_final == (root,) and ack.terminated == ()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # as above
def test_a_stop_from_elsewhere_names_a_child_born_after_it_read_the_subtree(
        runtime_factory, observer, database_url, gates):
    # The root's agent starts a child after the stopper read the subtree
    # and before its request reached the host; the host's cascade ends it.
    # Before, the ack left it out: it named only the rows it had read.
    def hold_then_name(ctx: Any, key: str) -> dict[str, Any]:
        gates.block(ctx, key)
        return {"value": "nap"}  # the graph the agent then starts

    graph = {"nodes": {"h": {"block": "hold", "input": {"key": "h"}},
                       "spawn": {"block": "agent", "input": {"inputs": {}}}},
             "links": [{"from": "h.value", "to": "spawn.graph"}]}
    rt = runtime_factory(g.graphs(top=graph, nap=g.sleeper()),
                         blocks={"hold": (hold_then_name, ("key",), ("value",))})
    root = rt.start("top", user_id=USER)
    wait_until(lambda: gates.started == ["h"] and observer.status(root) == "RUNNING", 30.0, "the hold to run")
    # NO KEY UPDATE: the request's UPDATE waits, a child's insert (a key share) does not.
    with row_locked(database_url, root, "NO KEY UPDATE"):
        stop = StopInThread(database_url, root, wait_timeout=5.0)  # reads the root alone, then waits
        wait_until(lambda: lock_waiters(observer) == 1, 30.0, "the stop request to wait for the row")
        gates.open("h")
        wait_until(lambda: len(observer.subtree(root)) == 2, 30.0, "the child to be born")

    ack = stop.result()

    child = next(row["id"] for row in observer.subtree(root) if row["id"] != root)
    assert set(observer.subtree_statuses(root).values()) == {"TERMINATED"}
    assert set(ack.terminated) == {root, child}
