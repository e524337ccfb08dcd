"""Watches (issue #10): StatusChanged messages for a tree, in order, complete, never before their commit.

Each test checks the feed against the database, read through a connection
of the test's own: every execution of the tree appears, each one's changes
come in the status machine's order and end with its status in the database,
the watched execution's end comes last, and when a change is delivered the
database already shows it (checked inside the watcher, as it is delivered).
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors import Client, NotFound, StatusChanged
from tests.helpers import Gates, Observer, wait_until
from tests.integration import graphs as g

TIMEOUT = 30.0
ORDER = {"QUEUED": 0, "RUNNING": 1, "COMPLETED": 2, "FAILED": 2, "TERMINATED": 2}
REPO = Path(__file__).resolve().parents[2]


class CommitChecker:
    """A watcher that, for every change it receives, reads the row: it must already show that change.

    It opens its own connection on the watch thread (SQLite connections stay on their thread).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.changes: list[StatusChanged] = []
        self.early: list[tuple[StatusChanged, str | None]] = []
        self._local = threading.local()
        self._observers: list[Observer] = []

    def __call__(self, change: StatusChanged) -> None:
        if not hasattr(self._local, "observer"):
            self._local.observer = Observer(self.url)
            self._observers.append(self._local.observer)
        now = self._local.observer.status(change.execution_id)
        if now is None or ORDER[now] < ORDER[change.status.value]:
            self.early.append((change, now))
        self.changes.append(change)

    def close(self) -> None:
        for observer in self._observers:
            try:
                observer.close()
            except sqlite3.ProgrammingError:
                pass  # made on the watch thread; SQLite closes it when that thread's objects go


def check_feed(changes: list[StatusChanged], observer: Observer, watched: str) -> None:
    """Complete, ordered per execution, ending with the database's statuses, the watched end last."""
    rows = {row["id"]: row for row in observer.subtree(watched)}
    by_execution: dict[str, list[str]] = {}
    for change in changes:
        by_execution.setdefault(change.execution_id, []).append(change.status.value)
    assert set(by_execution) == set(rows), "every execution of the subtree, and nothing else"
    for execution_id, statuses in by_execution.items():
        ranks = [ORDER[status] for status in statuses]
        assert ranks == sorted(ranks) and len(set(statuses)) == len(statuses), (execution_id, statuses)
        assert statuses[-1] == rows[execution_id]["status"], (execution_id, statuses)
        assert statuses[0] in ("QUEUED", "RUNNING"), (execution_id, statuses)
    last = changes[-1]
    assert last.execution_id == watched and last.status.value == rows[watched]["status"]
    for change in changes:
        assert change.parent_id == rows[change.execution_id]["parent_id"]
        assert change.graph_id == rows[change.execution_id]["graph_id"]


@pytest.fixture
def checker(database_url: str):
    made = CommitChecker(database_url)
    yield made
    made.close()


def test_a_completing_tree_is_watched_from_start_to_end(runtime_factory, database_url, checker):
    rt = runtime_factory(g.graphs(answer=g.quick(), parent=g.agents("answer", 3), top=g.agents("parent", 2)))
    root = rt.start("top", user_id="u")
    rt.watch(root, checker)
    record = rt.wait(root, timeout=TIMEOUT)
    assert record.status.value == "COMPLETED"
    wait_until(lambda: checker.changes and checker.changes[-1].execution_id == root
               and checker.changes[-1].status.value == "COMPLETED", TIMEOUT, "the root's end in the feed")
    observer = Observer(database_url)
    check_feed(checker.changes, observer, root)
    assert len(observer.subtree(root)) == 9
    assert not checker.early, f"delivered before their commit: {checker.early[:3]}"
    assert all(change.root_id == root for change in checker.changes)
    observer.close()


def test_a_stopped_tree_and_a_failed_one_with_the_reason_and_the_error(runtime_factory, database_url, checker):
    gates = Gates()
    rt = runtime_factory(g.graphs(held=g.held(), nap=g.sleeper(), parent=g.agents("nap", 2),
                                  boom=g.failing("kaboom"), fails=g.parent(a=("boom", {}), b=("nap", {}))),
                         blocks={"hold": gates.spec})
    observer = Observer(database_url)
    stopped = rt.start("parent", user_id="u")
    rt.watch(stopped, checker)
    wait_until(lambda: sum(c.status.value == "RUNNING" for c in checker.changes) == 3, TIMEOUT, "3 RUNNING")
    rt.stop(stopped, user_id="u", reason="enough")
    wait_until(lambda: checker.changes[-1].execution_id == stopped and checker.changes[-1].status.is_terminal,
               TIMEOUT, "the stopped root's end")
    check_feed(checker.changes, observer, stopped)
    assert {c.stop_reason for c in checker.changes if c.status.value == "TERMINATED"} == {"enough"}

    failing: list[StatusChanged] = list(rt.changes(rt.start("fails", user_id="u"), timeout=TIMEOUT))
    root = failing[-1].execution_id
    check_feed(failing, observer, root)
    assert failing[-1].status.value == "FAILED" and "kaboom" in failing[-1].error
    assert not checker.early
    observer.close()


def test_watching_a_finished_execution_gets_its_history_at_once(runtime_factory, database_url):
    rt = runtime_factory(g.graphs(answer=g.quick(), parent=g.agents("answer", 2)))
    root = rt.start("parent", user_id="u")
    rt.wait(root, timeout=TIMEOUT)
    changes = list(rt.changes(root, timeout=5.0))
    observer = Observer(database_url)
    check_feed(changes, observer, root)
    # A watch of one child: its subtree only, its root id still the tree's.
    child = observer.subtree(root)[1]["id"]
    mine = list(rt.changes(child, timeout=5.0))
    assert {c.execution_id for c in mine} == {child} and mine[-1].root_id == root
    observer.close()
    with pytest.raises(NotFound):
        rt.watch("no-such-execution", print)


def test_a_dead_watcher_actor_is_dropped_and_the_others_go_on(runtime_factory, database_url):
    class Collector(pykka.ThreadingActor):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[StatusChanged] = []

        def on_receive(self, message: Any) -> Any:
            if isinstance(message, StatusChanged):
                self.seen.append(message)
            elif message == "seen":
                return list(self.seen)
            return None

    gates = Gates()
    rt = runtime_factory(g.graphs(held=g.held()), blocks={"hold": gates.spec})
    root = rt.start("held", user_id="u", inputs={"key": "k"})
    doomed, survivor = Collector.start(), Collector.start()
    try:
        rt.watch(root, doomed)
        rt.watch(root, survivor)
        wait_until(lambda: len(survivor.ask("seen")) >= 1 and len(doomed.ask("seen")) >= 1, TIMEOUT, "first")
        doomed.stop()
        gates.open("k")
        wait_until(lambda: any(c.status.value == "COMPLETED" for c in survivor.ask("seen")), TIMEOUT,
                   "the survivor to see the end")
        observer = Observer(database_url)
        check_feed(survivor.ask("seen"), observer, root)
        observer.close()
    finally:
        gates.open_all()
        survivor.stop()
        if doomed.is_alive():
            doomed.stop()


def test_unwatch_ends_delivery(runtime_factory):
    gates = Gates()
    rt = runtime_factory(g.graphs(held=g.held()), blocks={"hold": gates.spec})
    root = rt.start("held", user_id="u", inputs={"key": "k"})
    seen: list[StatusChanged] = []
    watch = rt.watch(root, seen.append)
    wait_until(lambda: seen, TIMEOUT, "the first change")
    rt.unwatch(watch)
    count = len(seen)
    gates.open("k")
    rt.wait(root, timeout=TIMEOUT)
    # A second watch sees the end: the first, unwatched, got nothing more.
    assert list(rt.changes(root, timeout=5.0))[-1].status.value == "COMPLETED"
    assert len(seen) == count


def test_a_tree_hosted_by_another_process_is_watched_and_stopped_from_here(database_url, tmp_path, checker):
    graphs = tmp_path / "graphs.json"
    graphs.write_text(__import__("json").dumps(g.graphs(nap=g.sleeper(), parent=g.agents("nap", 2))))
    host = subprocess.Popen([sys.executable, str(REPO / "run.py"), "run", str(graphs), "parent", "--user", "u",
                             "--db", database_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        root = host.stdout.readline().strip()
        with Client(database_url) as client:
            seen: list[StatusChanged] = []
            done = threading.Event()

            def follow() -> None:
                seen.extend(client.changes(root, timeout=TIMEOUT))
                done.set()

            threading.Thread(target=follow, daemon=True).start()
            client.watch(root, checker)  # the same feed, each change checked against the database
            wait_until(lambda: sum(c.status.value == "RUNNING" for c in seen) == 3, TIMEOUT, "3 RUNNING")
            client.stop(root, user_id="u", wait_timeout=5)
            assert done.wait(TIMEOUT), "the feed did not end with the root's end"
            observer = Observer(database_url)
            check_feed(seen, observer, root)
            assert seen[-1].status.value == "TERMINATED"
            wait_until(lambda: checker.changes and checker.changes[-1].status.value == "TERMINATED"
                       and checker.changes[-1].execution_id == root, TIMEOUT, "the checked feed's end")
            check_feed(checker.changes, observer, root)
            assert not checker.early, f"delivered before their commit: {checker.early[:3]}"
            observer.close()
        assert host.wait(timeout=TIMEOUT) == 3
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(10)
