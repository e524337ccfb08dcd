"""A turn of an execution actor that raises (a bug of ours) ends its execution FAILED, never RUNNING for good.

The bugs are made by patching one handler of ``execution._HANDLERS`` to
raise for one execution. Before, pykka stopped that actor without a word:
its rows, and its subtree's, stayed RUNNING until a stop or ``close()``,
its parent's agent node waited for good, and a stop of a broken root
raised ``StopTimeout``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import pytest

from actors import execution, runtime, supervision
from actors.messages import CascadeStop, DeadlinePassed, FinalCommitted, NodeFinished, Stop
from actors import stop_execution
from tests.helpers import wait_status, wait_tree_running, wait_until
from tests.integration import graphs as g
from tests.integration.test_stop_edges import running_chain

USER = "alice"
BUG = "a bug in this execution's turn"


def break_handler(monkeypatch: pytest.MonkeyPatch, message_type: type,
                  breaks: Callable[[execution.ExecutionActor], bool]) -> None:
    """Make the handler of ``message_type`` raise in the executions ``breaks`` picks."""
    handle = execution._HANDLERS[message_type]

    def broken(actor: execution.ExecutionActor, message: Any) -> Any:
        if breaks(actor):
            raise RuntimeError(BUG)
        return handle(actor, message)

    monkeypatch.setitem(execution._HANDLERS, message_type, broken)


def break_salvage(monkeypatch: pytest.MonkeyPatch, breaks: Callable[[execution.ExecutionActor], bool]) -> None:
    """Make the salvage raise too in the executions ``breaks`` picks: pykka stops their actors without a word."""
    salvage = execution.ExecutionActor._salvage

    def broken(actor: execution.ExecutionActor, error: str) -> Any:
        if breaks(actor):
            raise RuntimeError("the salvage broke too")
        return salvage(actor, error)

    monkeypatch.setattr(execution.ExecutionActor, "_salvage", broken)


def no_write_at_death(monkeypatch: pytest.MonkeyPatch) -> None:
    """As when the write at an actor's death could not commit (the database was away): nothing is written then.

    Patched before the runtime is made: its host keeps the bound method.
    """
    monkeypatch.setattr(runtime.Runtime, "_on_failed", lambda self, identity, error: None)


def with_agent_and_nap(nap_seconds: float) -> g.Graph:
    """Starts a child that sleeps LONG, and sleeps ``nap_seconds`` itself (its NodeFinished comes then)."""
    return {"nodes": {"child": {"block": "agent", "input": {"graph": "nap", "inputs": {}}},
                      "short": {"block": "sleep", "input": {"seconds": nap_seconds}}}}


def assert_nothing_active(observer, root: str) -> None:
    assert not [r for r in observer.subtree(root) if r["status"] in ("RUNNING", "QUEUED")]
    ids = tuple(observer.subtree_statuses(root))
    marks = ",".join("?" for _ in ids)
    assert not observer.query(
        f"SELECT * FROM node_execution WHERE status = 'RUNNING' AND graph_execution_id IN ({marks})", ids)


def test_a_turn_that_breaks_fails_its_execution_ends_its_subtree_and_fails_its_parent(
        runtime_factory, observer, caplog, monkeypatch):
    rt = runtime_factory(g.graphs(nap=g.sleeper(), middle=with_agent_and_nap(0.2), top=g.agents("middle", 1)))
    break_handler(monkeypatch, NodeFinished, lambda actor: actor.identity.graph_id == "middle")
    with caplog.at_level(logging.ERROR):
        root = rt.start("top", user_id=USER)
        wait_status(observer, root, "FAILED")

    rows = {r["graph_id"]: r for r in observer.subtree(root)}
    middle, below = rows["middle"], rows["nap"]
    assert middle["status"] == "FAILED"
    assert middle["error"] == f"internal error while handling NodeFinished: RuntimeError: {BUG}"
    assert below["status"] == "TERMINATED"
    assert middle["id"] in rows["top"]["error"]  # the parent's agent node failed with its child
    assert_nothing_active(observer, root)
    wait_until(lambda: rt.live_count == 0, what="every actor of the tree gone")
    broken = [r for r in caplog.records if "handling NodeFinished failed" in r.getMessage()]
    assert broken and broken[0].execution_id == middle["id"] and broken[0].root_id == root


def test_a_root_whose_turn_breaks_frees_its_slot_and_a_stop_finds_it_final(
        runtime_factory, observer, monkeypatch):
    rt = runtime_factory(g.graphs(nap=g.sleeper(), top=with_agent_and_nap(0.2), quick=g.quick()),
                         max_running_per_user=1)
    break_handler(monkeypatch, NodeFinished, lambda actor: actor.identity.graph_id == "top")
    root = rt.start("top", user_id=USER)
    waiting = rt.start("quick", user_id=USER)  # admitted only once the root's slot is free
    assert observer.status(waiting) == "QUEUED"

    wait_status(observer, root, "FAILED")
    # The queued root runs only once the broken root's actor has ended and
    # let go of its slot: the stop then finds the root final in the database.
    # (A stop that reaches the actor before is answered with the salvage's
    # ack, which also names the child it terminated.)
    wait_status(observer, waiting, "COMPLETED")
    ack = rt.stop(root, user_id=USER, wait_timeout=1.0)

    assert ack.already_final == (root,) and ack.terminated == ()
    assert set(observer.subtree_statuses(root).values()) == {"FAILED", "TERMINATED"}
    assert_nothing_active(observer, root)


def test_a_turn_that_breaks_after_its_final_write_reports_what_was_written(
        runtime_factory, observer, monkeypatch):
    # The child's COMPLETED is committed; the turn that hears so breaks.
    # The salvage then finds the row final and tells the parent COMPLETED,
    # with the outputs: the parent completes as if nothing had happened.
    rt = runtime_factory(g.graphs(quick=g.quick(7), top=g.agents("quick", 1)))
    break_handler(monkeypatch, FinalCommitted, lambda actor: actor.identity.graph_id == "quick")
    root = rt.start("top", user_id=USER)

    wait_status(observer, root, "COMPLETED")
    statuses = observer.subtree_statuses(root)
    assert set(statuses.values()) == {"COMPLETED"} and len(statuses) == 2
    wait_until(lambda: rt.live_count == 0, what="both actors gone")


def test_a_stop_whose_own_turn_breaks_is_answered_with_its_subtree_terminal(
        runtime_factory, observer, monkeypatch):
    rt = runtime_factory(g.graphs(nap=g.sleeper(), top=g.agents("nap", 3)))
    root = rt.start("top", user_id=USER)
    rows = wait_tree_running(observer, root, executions=4, naps=3)
    children = {r["id"] for r in rows} - {root}
    break_handler(monkeypatch, Stop, lambda actor: actor.identity.execution_id == root)

    began = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=5.0)
    elapsed = time.monotonic() - began

    # It names the execution: FAILED by the bug, not by this stop.
    assert ack.already_final == (root,)
    assert set(ack.terminated) == children
    assert elapsed < 5.0, f"the stop took {elapsed:.1f}s: the broken root waited for its deadline"
    statuses = observer.subtree_statuses(root)
    assert statuses == {root: "FAILED", **{i: "TERMINATED" for i in children}}


def test_a_turn_that_breaks_during_a_stop_is_answered_without_the_grace(
        runtime_factory, observer, monkeypatch):
    rt, root, ids = running_chain(runtime_factory, observer, 4)
    middle = next(r["id"] for r in observer.subtree(root) if r["parent_id"] == root)
    below = ids - {root, middle}
    break_handler(monkeypatch, CascadeStop, lambda actor: actor.identity.execution_id == middle)

    began = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=0)
    elapsed = time.monotonic() - began

    assert elapsed < supervision.CHILD_GRACE, f"the stop took {elapsed:.1f}s"
    assert set(ack.terminated) == {root, *below}
    assert ack.already_final == (middle,)
    assert observer.subtree_statuses(root) == {root: "TERMINATED", middle: "FAILED",
                                               **{i: "TERMINATED" for i in below}}
    wait_until(lambda: rt.live_count == 0, what="the actors below the broken one gone too")


def test_an_actor_whose_salvage_breaks_too_is_written_with_its_subtree_by_its_parent(
        runtime_factory, observer, caplog, monkeypatch):
    # The salvage raises as well, and pykka stops the actor without a word
    # to its parent; and the runtime's write at its death did not commit.
    # The parent's grace finds it stopped and writes its subtree; the live
    # actors under it end too.
    monkeypatch.setattr(execution, "CHILD_GRACE", 0.05)
    no_write_at_death(monkeypatch)
    rt, root, ids = running_chain(runtime_factory, observer, 4)
    middle = next(r["id"] for r in observer.subtree(root) if r["parent_id"] == root)
    below = ids - {root, middle}
    break_handler(monkeypatch, CascadeStop, lambda actor: actor.identity.execution_id == middle)
    break_salvage(monkeypatch, lambda actor: actor.identity.execution_id == middle)

    with caplog.at_level(logging.WARNING):
        began = time.monotonic()
        ack = rt.stop(root, user_id=USER, wait_timeout=0)
        elapsed = time.monotonic() - began

    # Not left until CHILD_GRACE_LIMIT, when even a live child is written.
    assert elapsed < supervision.CHILD_GRACE_LIMIT, f"the stop took {elapsed:.1f}s"
    assert set(ack.terminated) == {root, middle, *below}
    assert set(ack.forced) == {middle, *below}
    assert set(observer.subtree_statuses(root).values()) == {"TERMINATED"}
    assert [r for r in caplog.records if "stopped without ending" in r.getMessage() and middle in r.getMessage()]
    wait_until(lambda: rt.live_count == 0, what="the actors below the failed one gone too")


def test_a_broken_execution_writes_a_child_whose_actor_broke_for_good(
        runtime_factory, observer, monkeypatch):
    # The middle execution's turn breaks while its child's actor is gone
    # (its turn and its salvage broke, and the runtime's write at its death
    # did not commit): the middle waits for its live children, finds this
    # one stopped after the grace, and writes it.
    monkeypatch.setattr(execution, "CHILD_GRACE", 0.05)
    no_write_at_death(monkeypatch)
    rt = runtime_factory(g.graphs(nap=g.sleeper(), middle=with_agent_and_nap(0.2), top=g.agents("middle", 1)))
    # The child's actor stops at the cascade from its parent's salvage,
    # which starts when the middle's short nap ends and its turn breaks.
    in_child = lambda actor: actor.identity.graph_id == "nap"  # noqa: E731
    break_handler(monkeypatch, CascadeStop, in_child)
    break_salvage(monkeypatch, in_child)
    break_handler(monkeypatch, NodeFinished, lambda actor: actor.identity.graph_id == "middle")
    root = rt.start("top", user_id=USER)

    wait_status(observer, root, "FAILED")
    rows = {r["graph_id"]: r["id"] for r in observer.subtree(root)}
    middle, child = rows["middle"], rows["nap"]
    assert observer.subtree_statuses(root) == {root: "FAILED", middle: "FAILED", child: "TERMINATED"}
    assert observer.execution(child)["stop_forced"]
    assert_nothing_active(observer, root)
    wait_until(lambda: rt.live_count == 0, what="every actor gone, the broken child's included")


def broken_for_good(runtime_factory, observer, monkeypatch, caplog, root_graph: str,
                    written_at_death: bool = True, **runtime_kwargs: Any) -> tuple[Any, str, dict[str, str]]:
    """A tree whose ``middle`` execution's actor stops without ending; ``root_graph`` is ``top`` or ``middle``.

    ``top`` starts a ``middle``, which starts a ``nap`` and sleeps 0.2 s
    itself: the turn that hears that sleep end breaks, and so does the
    salvage. Without ``written_at_death``, the runtime's write at its death
    does not happen (see no_write_at_death). Returns the runtime, the root
    and the ids by graph, once the ``middle`` actor is gone.
    """
    if not written_at_death:
        no_write_at_death(monkeypatch)
    rt = runtime_factory(g.graphs(nap=g.sleeper(), middle=with_agent_and_nap(0.2), top=g.agents("middle", 1),
                                  quick=g.quick()), **runtime_kwargs)
    in_middle = lambda actor: actor.identity.graph_id == "middle"  # noqa: E731
    break_handler(monkeypatch, NodeFinished, in_middle)
    break_salvage(monkeypatch, in_middle)
    caplog.set_level(logging.ERROR)
    root = rt.start(root_graph, user_id=USER)
    wait_until(lambda: len(observer.subtree(root)) == (3 if root_graph == "top" else 2),
               what="the tree down to the nap")
    ids = {r["graph_id"]: r["id"] for r in observer.subtree(root)}
    wait_until(lambda: any(r.getMessage().endswith("actor failed") and r.execution_id == ids["middle"]
                           for r in caplog.records), what="the middle actor to stop without ending")
    return rt, root, ids


def test_an_execution_whose_actor_broke_for_good_is_written_failed_by_its_runtime(
        runtime_factory, observer, monkeypatch, caplog):
    # Before, it stayed RUNNING until a stop, and its parent's agent node
    # waited for good.
    rt, root, ids = broken_for_good(runtime_factory, observer, monkeypatch, caplog, "top")

    wait_status(observer, root, "FAILED")
    statuses = observer.subtree_statuses(root)
    assert statuses == {root: "FAILED", ids["middle"]: "FAILED", ids["nap"]: "TERMINATED"}
    middle = observer.execution(ids["middle"])
    assert middle["error"] == ("internal error: its actor failed: RuntimeError: the salvage broke too")
    assert ids["middle"] in observer.execution(root)["error"]  # its agent node failed with it
    assert_nothing_active(observer, root)
    wait_until(lambda: rt.live_count == 0, what="every actor of the tree gone")


def test_a_root_whose_actor_broke_for_good_is_written_failed_and_frees_its_slot(
        runtime_factory, observer, monkeypatch, caplog):
    rt, root, ids = broken_for_good(runtime_factory, observer, monkeypatch, caplog, "middle",
                                    max_running_per_user=1)
    waiting = rt.start("quick", user_id=USER)  # admitted only once the root's slot is free

    wait_status(observer, root, "FAILED")
    assert observer.subtree_statuses(root) == {root: "FAILED", ids["nap"]: "TERMINATED"}
    assert_nothing_active(observer, root)
    wait_status(observer, waiting, "COMPLETED")
    wait_until(lambda: rt.live_count == 0, what="every actor gone")


@pytest.mark.parametrize("where", ["here", "elsewhere"])
def test_an_execution_whose_actor_broke_for_good_is_ended_by_a_stop(
        where, runtime_factory, observer, monkeypatch, caplog, database_url):
    # If the write at its death did not commit, a stop ends it. Before,
    # nothing could while its runtime ran: a stop here or from another
    # process raised StopTimeout, the rows still RUNNING.
    rt, root, ids = broken_for_good(runtime_factory, observer, monkeypatch, caplog, "middle",
                                    written_at_death=False)

    if where == "here":
        ack = rt.stop(root, user_id=USER, wait_timeout=1.0)
    else:
        ack = stop_execution(database_url, root, USER, wait_timeout=1.0)

    assert set(ack.terminated) == set(ids.values())
    assert ids["middle"] in ack.forced
    assert set(observer.subtree_statuses(root).values()) == {"TERMINATED"}
    assert_nothing_active(observer, root)
    wait_until(lambda: rt.live_count == 0, what="every actor of the tree gone")


def test_a_child_whose_actor_broke_for_good_is_ended_by_a_stop_and_fails_its_parent(
        runtime_factory, observer, monkeypatch, caplog):
    rt, root, ids = broken_for_good(runtime_factory, observer, monkeypatch, caplog, "top",
                                    written_at_death=False)

    ack = rt.stop(ids["middle"], user_id=USER, wait_timeout=1.0)

    assert set(ack.terminated) == {ids["middle"], ids["nap"]}
    # Its parent hears of it as of any stopped child: its agent node fails.
    wait_status(observer, root, "FAILED")
    assert f"child execution {ids['middle']}" in observer.execution(root)["error"]
    assert observer.subtree_statuses(root) == {root: "FAILED", ids["middle"]: "TERMINATED",
                                               ids["nap"]: "TERMINATED"}
    wait_until(lambda: rt.live_count == 0, what="every actor of the tree gone")


def test_close_ends_a_root_whose_actor_broke_for_good(runtime_factory, observer, monkeypatch, caplog):
    # Before, close() waited its whole timeout and left the tree RUNNING
    # for the next runtime's recovery.
    rt, root, ids = broken_for_good(runtime_factory, observer, monkeypatch, caplog, "middle",
                                    written_at_death=False)

    rt.close(timeout=30.0)

    assert set(observer.subtree_statuses(root).values()) == {"TERMINATED"}
    assert_nothing_active(observer, root)


def test_a_stop_waiting_on_an_actor_that_breaks_for_good_is_answered_when_its_runtime_writes_it(
        runtime_factory, observer, monkeypatch):
    # The stop is under way (its child naps through it) when the root's
    # deadline turn breaks, and its salvage too. Before, that stop's answer
    # died with the actor: it raised StopTimeout 17 s past its deadline.
    rt = runtime_factory(g.graphs(stubborn=g.sleeper(ignore_stop=True), top=g.agents("stubborn", 1)))
    root = rt.start("top", user_id=USER)
    rows = wait_tree_running(observer, root, executions=2, naps=1)
    child = next(r["id"] for r in rows if r["id"] != root)
    is_root = lambda actor: actor.identity.execution_id == root  # noqa: E731
    break_handler(monkeypatch, DeadlinePassed, is_root)
    break_salvage(monkeypatch, is_root)

    began = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=0.3)
    elapsed = time.monotonic() - began

    assert elapsed < supervision.CHILD_GRACE_LIMIT, f"the stop took {elapsed:.1f}s"
    assert ack.already_final[0] == root  # FAILED by the bug, not by this stop
    assert observer.status(root) == "FAILED"
    wait_status(observer, child, "TERMINATED")
    assert_nothing_active(observer, root)
    wait_until(lambda: rt.live_count == 0, what="both actors gone")


def test_a_stop_whose_own_turn_and_salvage_break_is_answered_and_its_execution_written(
        runtime_factory, observer, monkeypatch):
    # pykka hands the error of an asked message to the asker and runs the
    # actor on. Before, the stop raised RuntimeError at once, and the
    # execution it asked to stop ran on (a nap ended it COMPLETED).
    rt = runtime_factory(g.graphs(nap=g.sleeper(), top=g.agents("nap", 2)))
    root = rt.start("top", user_id=USER)
    rows = wait_tree_running(observer, root, executions=3, naps=2)
    children = {r["id"] for r in rows} - {root}
    is_root = lambda actor: actor.identity.execution_id == root  # noqa: E731
    break_handler(monkeypatch, Stop, is_root)
    break_salvage(monkeypatch, is_root)

    ack = rt.stop(root, user_id=USER, wait_timeout=5.0)

    assert ack.already_final[0] == root  # FAILED by the bug, not by this stop
    assert observer.execution(root)["error"] == (
        "internal error: its actor failed: RuntimeError: the salvage broke too")
    assert observer.subtree_statuses(root) == {root: "FAILED", **{i: "TERMINATED" for i in children}}
    assert_nothing_active(observer, root)
    wait_until(lambda: rt.live_count == 0, what="every actor of the tree gone")


def test_the_running_blocks_of_an_actor_that_broke_for_good_see_stop_event(
        runtime_factory, observer, monkeypatch, gates):
    # Before, a cooperative block of the dead actor ran on until it ended by
    # itself: nobody set its stop_event.
    graph = {"nodes": {"held": {"block": "hold", "input": {"key": "k"}},
                       "short": {"block": "sleep", "input": {"seconds": 0.05}}}}
    rt = runtime_factory(g.graphs(top=graph), blocks={"hold": gates.spec})
    is_top = lambda actor: actor.identity.graph_id == "top"  # noqa: E731
    break_handler(monkeypatch, NodeFinished, is_top)
    break_salvage(monkeypatch, is_top)

    root = rt.start("top", user_id=USER)

    wait_until(lambda: gates.outcomes.get("k") == "stopped", 30.0, "the held block to see stop_event")
    wait_status(observer, root, "FAILED")
    assert_nothing_active(observer, root)
