"""Database faults (issue #8): the runtime rides out restarts, crashes, partitions and locks.

Every PostgreSQL case runs on the suite's own cluster (tests/faultkit.py),
never on the shared server, and breaks it for real: ``pg_ctl restart``,
``pg_ctl stop``, a SIGKILLed postmaster, a proxy that resets connections, a
network link whose packets vanish. The SQLite case has another process hold
the write lock. State is checked through connections of the test's own, and
a background sampler proves throughout each test that no terminal status
ever changes.

What every case proves, once its fault healed:
- nothing stays RUNNING or QUEUED;
- no terminal status ever changes (the sampler);
- no node starts after a stop was acknowledged (node ``started_at`` is not
  later than the ack, and no node row is added after it);
- when ``stop`` returned normally, its subtree is TERMINATED at once.

The runtime must offer, for a stop it cannot persist because the database
does not answer: ``DatabaseError`` raised within ``wait_timeout`` plus a few
seconds, whose message says the stop will complete "when the database
answers", and which it then does complete on its own.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from actors import DatabaseError, StopAck, stop_execution
from actors.remote import GRACE
from persistence.database import SQLITE_BUSY_MS
from persistence.store import READ_PATIENCE
from tests.helpers import (
    TERMINAL_STATUSES,
    as_datetime,
    assert_stays,
    loads_json,
    wait_tree_running,
    wait_until,
)
from tests.integration import graphs as g
from tests.integration.fault_fixtures import *  # noqa: F401,F403
from tests.integration.fault_fixtures import ResilientObserver, StatusSampler, close_bounded, readable

USER = "alice"
ANY_ID = "00000000-0000-4000-8000-000000000000"
REPO = Path(__file__).resolve().parents[2]

# The promise a stop makes when it cannot persist: it will, later, by itself.
PROMISE = "when the database answers"
# A stop during an outage returns within its wait_timeout plus this.
STOP_SLACK = 5.0
# A running block sees a stop within this many seconds of the call, even with the database down.
STOP_SEEN_WITHIN = 3.0
# Once a fault healed, what was pending reaches the database within this.
RECOVERY_TIMEOUT = 30.0
# How long Runtime.close() may take, whatever the database does.
CLOSE_WITHIN = 60.0
# A stop of ``stubborn`` (a sleep that ignores it) ends at this deadline: it
# outlasts a read's patience (persistence/store.py, READ_PATIENCE, 5 s).
STUBBORN_WAIT = 8.0
# How long the cut and blackhole partitions last.
PARTITION_SECONDS = 2.0
# A runtime that uses TCP keepalives / tcp_user_timeout notices a dead connection within this.
BLACKHOLE_DETECTION = 30.0
# The runtime's SQLite busy timeout: the lock must outlast it, so that the
# runtime's writes fail (and are retried) instead of merely waiting.
SQLITE_BUSY_TIMEOUT = SQLITE_BUSY_MS / 1000
# A bad URL is reported by Runtime(...) within this, not retried forever.
PROMPT = 10.0
# Log hygiene during a 3 s outage: a few warnings in all, not one per poll.
OUTAGE_SECONDS = 3.0
MAX_OUTAGE_WARNINGS = 6
MAX_OUTAGE_TRACEBACKS = 3

# The tree every case runs: a root and three children that sleep far longer than any test.
TREE_SIZE, TREE_NAPS = 4, 3
FINISHING_SECONDS = 1.0
GRAPHS = g.graphs(
    leaf=g.leaf(),
    tree=g.agents("leaf", 3, {"seconds": g.LONG}),
    short=g.sleeper(0.2, value="done"),
    finishing=g.sleeper(FINISHING_SECONDS, value="done"),
    stubborn=g.sleeper(ignore_stop=True),
)
# With the user block ``watch`` (StopSeen) registered: two watching children and a sleeping one.
WATCHED_GRAPHS = g.graphs(
    leaf=g.leaf(),
    watched={"nodes": {"w": {"block": "watch"}}},
    watched_tree=g.parent(a=("watched", {}), b=("watched", {}), c=("leaf", {"seconds": g.LONG})),
)


# -- helpers ----------------------------------------------------------------------------


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def start_tree(rt: Any, observer: ResilientObserver) -> str:
    """Start ``tree`` and wait until its four executions run and its three naps sleep."""
    root = rt.start("tree", user_id=USER)
    wait_tree_running(observer, root, executions=TREE_SIZE, naps=TREE_NAPS, timeout=60)
    return root


class StopFromElsewhere:
    """``stop_execution`` run in a thread, as another process would run it.

    ``ack`` or ``error`` says how it ended, ``seconds`` how long it took;
    ``done`` is set then. ``join`` waits for it, bounded.
    """

    def __init__(self, url: str, root: str, wait_timeout: float) -> None:
        self.ack: StopAck | None = None
        self.error: Exception | None = None
        self.seconds: float | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, root, wait_timeout), daemon=True)
        self._thread.start()

    def _run(self, url: str, root: str, wait_timeout: float) -> None:
        began = time.monotonic()
        try:
            self.ack = stop_execution(url, root, USER, wait_timeout=wait_timeout)
        except Exception as exc:  # noqa: BLE001 - asserted by the test
            self.error = exc
        self.seconds = time.monotonic() - began
        self.done.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stop_execution did not return"


def assert_stopped_from_elsewhere(stopper: StopFromElsewhere, rt: Any, observer: ResilientObserver, root: str,
                                  statuses: StatusSampler) -> None:
    """The stop acknowledged the tree TERMINATED; then the runtime closes with nothing active."""
    assert stopper.error is None, f"the stop failed: {stopper.error!r}"
    assert stopper.ack is not None and root in stopper.ack.terminated, stopper.ack
    assert_subtree_terminated(observer, root, TREE_SIZE)
    close_bounded(rt, CLOSE_WITHIN)
    assert_nothing_active(observer)
    statuses.check()


def tree_nodes(observer: ResilientObserver, root: str) -> list[dict[str, Any]]:
    return [node for row in observer.subtree(root) for node in observer.nodes(row["id"])]


def assert_subtree_terminated(observer: ResilientObserver, root: str, expected: int) -> list[dict[str, Any]]:
    """Read at once, no wait: every row and node of the subtree is terminal, the rows TERMINATED."""
    rows = observer.subtree(root)
    assert len(rows) == expected, [(r["id"], r["status"]) for r in rows]
    assert {r["status"] for r in rows} == {"TERMINATED"}, {r["id"]: r["status"] for r in rows}
    assert all(r["ended_at"] is not None for r in rows)
    for node in tree_nodes(observer, root):
        assert node["status"] in TERMINAL_STATUSES, node
    return rows


def wait_subtree_terminated(observer: ResilientObserver, root: str, expected: int,
                            timeout: float = RECOVERY_TIMEOUT) -> list[dict[str, Any]]:
    def terminated() -> list[dict[str, Any]] | None:
        rows = observer.subtree(root)
        if len(rows) == expected and all(r["status"] == "TERMINATED" for r in rows):
            return rows
        return None

    wait_until(readable(terminated), timeout, f"the {expected} executions under {root} to be TERMINATED")
    return assert_subtree_terminated(observer, root, expected)


def wait_terminal(observer: ResilientObserver, execution_id: str, timeout: float = RECOVERY_TIMEOUT) -> str:
    def terminal() -> str | None:
        status = observer.status(execution_id)
        return status if status in TERMINAL_STATUSES else None

    return wait_until(readable(terminal), timeout, f"{execution_id} to reach a terminal status")


def assert_nothing_active(observer: ResilientObserver) -> None:
    """No execution and no node of the whole database is QUEUED or RUNNING."""
    assert observer.active_rows() == []


def assert_no_node_started_after(observer: ResilientObserver, root: str, moment: dt.datetime) -> None:
    for node in tree_nodes(observer, root):
        started = as_datetime(node["started_at"])
        assert started is None or started <= moment, f"node started after the stop: {node}"


def stop_while_the_database_is_away(rt: Any, root: str) -> tuple[float, dt.datetime]:
    """Stop with wait_timeout=1: it raises DatabaseError in time, promising to complete later.

    Returns when the stop was called (monotonic) and when it raised (UTC).
    """
    called = time.monotonic()
    with pytest.raises(DatabaseError) as raised:
        rt.stop(root, user_id=USER, wait_timeout=1.0)
    elapsed = time.monotonic() - called
    assert elapsed <= 1.0 + STOP_SLACK, f"stop took {elapsed:.1f}s with wait_timeout=1"
    assert PROMISE in str(raised.value), str(raised.value)
    return called, utc_now()


def assert_recovers_after_the_fault(rt: Any, observer: ResilientObserver, root: str, statuses: StatusSampler,
                                    *, stop_timeout: float = 15.0, stop_within: float = 30.0) -> None:
    """The ending shared by the faults that heal before anyone stops.

    ``stop`` succeeds and its subtree is TERMINATED at once; a new execution
    runs to COMPLETED; ``close`` returns and leaves nothing active; no node
    started after the ack.
    """
    began = time.monotonic()
    ack = rt.stop(root, user_id=USER, wait_timeout=stop_timeout)
    acked_at = utc_now()
    assert time.monotonic() - began < stop_within
    assert isinstance(ack, StopAck) and ack.execution_id == root
    rows = assert_subtree_terminated(observer, root, TREE_SIZE)
    assert set(ack.terminated) | set(ack.already_final) == {r["id"] for r in rows}
    nodes_at_ack = len(tree_nodes(observer, root))

    second = rt.start("short", user_id=USER)
    assert wait_terminal(observer, second) == "COMPLETED"
    close_bounded(rt, CLOSE_WITHIN)

    assert_nothing_active(observer)
    assert_no_node_started_after(observer, root, acked_at)
    assert len(tree_nodes(observer, root)) == nodes_at_ack
    statuses.check()


class StopSeen:
    """User block ``watch``: loops until its execution's stop_event is set, then records when it saw it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = 0
        self.seen_at: dict[str, float] = {}  # execution id -> time.monotonic() it saw the stop
        self.seen = threading.Event()        # set when every started block saw its stop

    def block(self, ctx: Any) -> dict[str, Any]:
        with self._lock:
            self.started += 1
        while not ctx.stop_event.is_set():
            ctx.stop_event.wait(0.05)
        with self._lock:
            self.seen_at[ctx.execution_id] = time.monotonic()
            if len(self.seen_at) == self.started:
                self.seen.set()
        return {"value": "stopped"}

    @property
    def spec(self) -> tuple:
        return (self.block, (), ("value",))


class OutageHost:
    """``python -m tests.integration.outage_host URL``: a runtime in its own process (see that module)."""

    def __init__(self, url: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ACTORGRAPH_DATABASE"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.outage_host", url], cwd=REPO, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="outage-host-stdout").start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def expect(self, word: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the runtime process did not print {word!r} within {timeout:.0f}s") from None
            if line is None:
                raise AssertionError(f"the runtime process ended before {word!r}: {self.stderr()}")
            if line.split()[:1] == [word]:
                return line.split()[1:]

    def close(self) -> tuple[float, str]:
        """Tell it to close; its close's duration and outcome (``ok`` or ``error TYPE: ...``)."""
        assert self.process.stdin is not None
        self.process.stdin.write("close\n")
        self.process.stdin.flush()
        words = self.expect("closed", CLOSE_WITHIN + 30)
        return float(words[0]), " ".join(words[1:])

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()[-3000:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def describe(records: list[logging.LogRecord]) -> str:
    return "\n".join(f"{r.name} {r.levelname} {r.getMessage()[:160]}{' [traceback]' if r.exc_info else ''}"
                     for r in records[:20])


# -- (a) a restart ---------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_restart_under_a_running_tree(pg_cluster, fault_db, runtimes, observe, sampler):
    """A PostgreSQL restart ends every session of the runtime under a running tree.

    Proves that the runtime reconnects by itself: afterwards a stop succeeds
    and leaves its subtree TERMINATED, a new execution runs to COMPLETED,
    and close leaves nothing RUNNING.
    """
    url = pg_cluster.url(fault_db)
    rt = runtimes(url, GRAPHS)
    observer = observe(url)
    root = start_tree(rt, observer)
    statuses = sampler(url)

    pg_cluster.restart()

    assert_recovers_after_the_fault(rt, observer, root, statuses)


# -- (b) the server down when the stop arrives ------------------------------------------------------


@pytest.mark.timeout(180)
def test_stop_while_the_server_is_down_completes_when_it_is_back(pg_cluster, fault_db, runtimes, observe, sampler):
    """A stop that cannot be persisted says so within its wait_timeout, stops the work, and persists later.

    With the server down, ``stop`` raises ``DatabaseError`` ("... when the
    database answers") within wait_timeout + a few seconds; the running
    blocks see the stop at once all the same; once the server is back, every
    row of the subtree ends TERMINATED without a second stop.
    """
    watch = StopSeen()
    url = pg_cluster.url(fault_db)
    rt = runtimes(url, WATCHED_GRAPHS, blocks={"watch": watch.spec})
    observer = observe(url)
    root = rt.start("watched_tree", user_id=USER)
    wait_tree_running(observer, root, executions=4, naps=1, timeout=60)
    wait_until(lambda: watch.started == 2, 30.0, "both watch blocks running")
    statuses = sampler(url)

    pg_cluster.stop()

    called, raised_at = stop_while_the_database_is_away(rt, root)
    # The running work was told while the server was still down.
    watch.seen.wait(max(0.0, called + STOP_SEEN_WITHIN - time.monotonic()))
    assert len(watch.seen_at) == 2, f"{len(watch.seen_at)} of 2 watch blocks saw the stop"
    assert max(watch.seen_at.values()) - called <= STOP_SEEN_WITHIN
    assert not pg_cluster.is_up()

    pg_cluster.start()

    wait_subtree_terminated(observer, root, 4)
    nodes = len(tree_nodes(observer, root))
    assert_no_node_started_after(observer, root, raised_at)
    assert_stays(lambda: len(tree_nodes(observer, root)) == nodes, 1.0, "no node added after the stop")
    close_bounded(rt, CLOSE_WITHIN)
    assert_nothing_active(observer)
    statuses.check()


# -- (c) a crash ---------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_completion_during_a_crash_is_persisted_when_the_server_is_back(pg_cluster, fault_db, runtimes, observe,
                                                                        sampler):
    """A SIGKILLed postmaster: work that ends naturally during the outage is not dropped.

    A 1 s sleeper started before the kill ends while the server is dead; its
    row reaches COMPLETED, with its outputs, once the server is back. A stop
    of the running tree then succeeds, and close leaves nothing RUNNING.
    """
    url = pg_cluster.url(fault_db)
    rt = runtimes(url, GRAPHS)
    observer = observe(url)
    root = start_tree(rt, observer)
    finishing = rt.start("finishing", user_id=USER)
    wait_tree_running(observer, finishing, executions=1, naps=1)
    statuses = sampler(url)

    pg_cluster.kill9()
    # The 1 s sleep, begun before the kill, ends during this outage.
    assert_stays(lambda: not pg_cluster.is_up(), FINISHING_SECONDS + 1.0, "the server down")
    pg_cluster.start()

    assert wait_terminal(observer, finishing) == "COMPLETED"
    assert loads_json(observer.execution(finishing)["outputs"]) == {"value": "done"}
    assert_recovers_after_the_fault(rt, observer, root, statuses)


# -- (d) partitions -------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_connections_reset_by_a_partition(pg_cluster, fault_db, proxy, runtimes, observe, sampler):
    """The runtime reaches the server through a proxy that resets every connection for 2 s.

    Proves the same as a restart: once the path heals, stop succeeds (its
    subtree TERMINATED), a new execution completes, close leaves nothing
    RUNNING. The observer connects directly, around the proxy.
    """
    url = pg_cluster.url(fault_db)
    rt = runtimes(proxy.url_for(fault_db), GRAPHS)
    observer = observe(url)
    root = start_tree(rt, observer)
    statuses = sampler(url)

    proxy.cut()
    assert_stays(lambda: proxy.mode == "cut", PARTITION_SECONDS, "the partition")
    proxy.heal()

    assert_recovers_after_the_fault(rt, observer, root, statuses)


@pytest.mark.timeout(240)
def test_packets_vanish_on_a_partition(pg_cluster, fault_db, netns_link, runtimes, observe, sampler):
    """The runtime reaches the server over a link whose far end is unplugged: packets vanish, nothing resets.

    The far side also forgets its connections, as a rebooted host would, so
    a connection the runtime holds is dead after the link heals. A runtime
    that uses TCP keepalives / tcp_user_timeout (or otherwise bounds its
    reads) notices within BLACKHOLE_DETECTION seconds; one that does not
    waits forever. Afterwards: the same as a restart.
    """
    url = pg_cluster.url(fault_db)
    rt = runtimes(netns_link.url_for(fault_db), GRAPHS)
    observer = observe(url)
    root = start_tree(rt, observer)
    statuses = sampler(url)

    netns_link.blackhole()
    assert_stays(lambda: netns_link.is_down, PARTITION_SECONDS + 1.0, "the blackhole")
    netns_link.heal()

    assert_recovers_after_the_fault(rt, observer, root, statuses, stop_timeout=BLACKHOLE_DETECTION,
                                    stop_within=BLACKHOLE_DETECTION + 15.0)


@pytest.mark.timeout(180)
def test_a_stop_from_elsewhere_cut_off_after_its_request_says_it_will_complete(pg_cluster, fault_db, proxy,
                                                                                runtimes, observe, sampler):
    """``stop_execution`` loses the database after its request was committed: its error says the stop goes on.

    The runtime hosting the execution reaches the server directly; the
    stopping process goes through a proxy, cut once its request is on
    record and for longer than a read's patience. The stopper's reads give
    up: it raises ``DatabaseError`` within its bound. Its request stands, so
    the message must say that the stop completes "when the database
    answers" and it does: the host ends the row TERMINATED at the request's
    deadline, without another call.
    """
    url = pg_cluster.url(fault_db)
    rt = runtimes(url, GRAPHS)
    observer = observe(url)
    root = rt.start("stubborn", user_id=USER)
    wait_tree_running(observer, root, executions=1, naps=1, timeout=60)
    statuses = sampler(url)
    stopper = StopFromElsewhere(proxy.url_for(fault_db), root, STUBBORN_WAIT)
    wait_until(lambda: observer.execution(root)["stop_requested_at"] is not None, 30.0, "the stop request on record")
    proxy.cut()
    stopper.join(STUBBORN_WAIT + GRACE + 10.0)
    proxy.heal()

    assert stopper.ack is None, f"acknowledged through the cut: {stopper.ack}"
    assert isinstance(stopper.error, DatabaseError), repr(stopper.error)
    assert PROMISE in str(stopper.error), str(stopper.error)
    assert stopper.seconds is not None and stopper.seconds <= STUBBORN_WAIT + GRACE
    assert wait_terminal(observer, root) == "TERMINATED"
    close_bounded(rt, CLOSE_WITHIN)
    assert_nothing_active(observer)
    statuses.check()


def test_a_stop_from_elsewhere_waits_for_a_server_that_is_away_as_it_begins(pg_cluster, fault_db, proxy, runtimes,
                                                                             observe, sampler):
    """``stop_execution`` begins while the server refuses connections (a restart): it waits, then stops.

    The host reaches the server directly; the stopping process goes through
    a proxy that is cut before it starts and healed once it has tried (and
    been refused). Its open waits for the database as long as a read does,
    so the stop completes: the tree TERMINATED, the ack naming it. (It
    raised "cannot open database" at once, having stopped nothing.)
    """
    url = pg_cluster.url(fault_db)
    rt = runtimes(url, GRAPHS)
    observer = observe(url)
    root = start_tree(rt, observer)
    statuses = sampler(url)
    proxy.cut()
    stopper = StopFromElsewhere(proxy.url_for(fault_db), root, 5.0)
    wait_until(proxy.attempt_while_faulty.is_set, 30.0, "the stop trying to connect through the cut")
    proxy.heal()
    stopper.join(5.0 + GRACE + 15.0)
    assert_stopped_from_elsewhere(stopper, rt, observer, root, statuses)


def test_a_stop_from_elsewhere_that_never_reaches_the_server_stops_nothing(pg_cluster, fault_db, proxy, runtimes,
                                                                           observe, sampler):
    """The server stays away through the open's patience: a clear error, in bounded time, and nothing changed."""
    url = pg_cluster.url(fault_db)
    rt = runtimes(url, GRAPHS)
    observer = observe(url)
    root = start_tree(rt, observer)
    statuses = sampler(url)
    proxy.cut()
    began = time.monotonic()
    with pytest.raises(DatabaseError, match="cannot open database"):
        stop_execution(proxy.url_for(fault_db), root, USER, wait_timeout=1.0)
    # It waited out the open's patience (as a read's), and at most one
    # connect attempt's timeout (5 s) more.
    assert READ_PATIENCE <= time.monotonic() - began <= READ_PATIENCE + 5.0 + STOP_SLACK
    proxy.heal()

    assert {r["status"] for r in observer.subtree(root)} == {"RUNNING"}
    assert observer.execution(root)["stop_requested_at"] is None
    assert root in rt.stop(root, USER, wait_timeout=5.0).terminated
    close_bounded(rt, CLOSE_WITHIN)
    assert_nothing_active(observer)
    statuses.check()


# -- (e) close during an outage ----------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("recovery", ["new_runtime", "run_py_stop"])
def test_close_during_an_outage_returns_and_a_later_process_recovers(pg_cluster, fault_db, runtimes, observe,
                                                                     sampler, recovery):
    """``close(timeout=1)`` with the server down returns in bounded time; later, the tree is cleaned up.

    The runtime runs in a process of its own (tests/integration/outage_host.py)
    that closes during the outage and exits. Once the server is back, opening
    a new Runtime on the database, or ``run.py stop``, ends every row of the
    tree (TERMINATED or FAILED): nothing stays RUNNING or QUEUED. close may
    report the outage as a DatabaseError, but must not hang.
    """
    url = pg_cluster.url(fault_db)
    host = OutageHost(url)
    try:
        (root,) = host.expect("root", 60)
        observer = observe(url)
        wait_tree_running(observer, root, executions=TREE_SIZE, naps=TREE_NAPS, timeout=60)
        statuses = sampler(url)

        pg_cluster.stop()
        seconds, outcome = host.close()

        assert seconds <= CLOSE_WITHIN, f"close took {seconds:.1f}s"
        assert outcome == "ok" or outcome.startswith("error DatabaseError"), outcome
        host.process.wait(30)  # a closed runtime lets its process exit
    finally:
        host.kill()
    pg_cluster.start()

    if recovery == "new_runtime":
        runtimes(url)
    else:
        env = {k: v for k, v in os.environ.items() if k != "ACTORGRAPH_DATABASE"}
        done = subprocess.run([sys.executable, "run.py", "stop", root, "--user", USER, "--db", url, "--timeout", "5"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"run.py stop exited {done.returncode}: {done.stderr.strip()}"

    def all_terminal() -> dict[str, str] | None:
        statuses_now = observer.subtree_statuses(root)
        done = len(statuses_now) == TREE_SIZE and set(statuses_now.values()) <= {"TERMINATED", "FAILED"}
        return statuses_now if done else None

    wait_until(readable(all_terminal), RECOVERY_TIMEOUT, "every row of the tree to be TERMINATED or FAILED")
    assert_nothing_active(observer)
    statuses.check()


# -- (f) SQLite: a writer from another process -----------------------------------------------------


@pytest.mark.timeout(180)
def test_sqlite_write_lock_held_past_the_busy_timeout(tmp_path, runtimes, observe, sampler, lock_holder):
    """Another process holds SQLite's write lock longer than the runtime's busy timeout.

    Slow by design (about 40 s): the lock must outlast the runtime's 30 s
    busy_timeout, so that its writes fail with "database is locked" instead
    of merely waiting. A stop during the lock raises DatabaseError ("... when
    the database answers") within wait_timeout + a few seconds; after the
    release every row of the tree is TERMINATED and a sleeper that ended
    during the lock is COMPLETED.
    """
    path = tmp_path / "actorgraph.db"
    url = f"sqlite:///{path}"
    rt = runtimes(url, GRAPHS)
    observer = observe(url)
    root = start_tree(rt, observer)
    finishing = rt.start("finishing", user_id=USER)
    wait_tree_running(observer, finishing, executions=1, naps=1)
    statuses = sampler(url)
    holder = lock_holder(path)

    holder.acquire()

    _, raised_at = stop_while_the_database_is_away(rt, root)
    assert holder.holding
    assert holder.acquired_at is not None
    hold_until = holder.acquired_at + SQLITE_BUSY_TIMEOUT + 3.0
    assert_stays(lambda: holder.holding, max(0.0, hold_until - time.monotonic()), "the write lock held")
    holder.release()

    wait_subtree_terminated(observer, root, TREE_SIZE)
    assert wait_terminal(observer, finishing) == "COMPLETED"
    assert loads_json(observer.execution(finishing)["outputs"]) == {"value": "done"}
    nodes = len(tree_nodes(observer, root))
    assert_no_node_started_after(observer, root, raised_at)
    close_bounded(rt, CLOSE_WITHIN)
    assert len(tree_nodes(observer, root)) == nodes
    assert_nothing_active(observer)
    statuses.check()


# -- (g) errors that are not outages ---------------------------------------------------------------------


BAD_URLS = {
    "refused_port": lambda cluster: "postgresql://postgres@127.0.0.1:1/x",
    "missing_database": lambda cluster: cluster.url("no_such_database"),
    "unknown_role": lambda cluster: f"postgresql://no_such_role@127.0.0.1:{cluster.port}/postgres",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_URLS))
def test_bad_url_fails_promptly(pg_cluster, runtimes, case):
    """A URL that can never work gives a prompt DatabaseError from Runtime(...), not an endless retry."""
    url = BAD_URLS[case](pg_cluster)
    began = time.monotonic()
    with pytest.raises(DatabaseError):
        runtimes(url)
    assert time.monotonic() - began < PROMPT


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["missing_database", "unknown_role"])
def test_stop_execution_refused_by_the_server_fails_at_once(pg_cluster, case):
    """``stop_execution`` (run.py stop) does not wait for a server that answered and refused: no wait helps.

    (It waited out the open's patience, as for a server that is away.)
    """
    began = time.monotonic()
    with pytest.raises(DatabaseError, match="does not exist"):
        stop_execution(BAD_URLS[case](pg_cluster), ANY_ID, USER)
    assert time.monotonic() - began < READ_PATIENCE


@pytest.mark.timeout(60)
def test_stop_execution_with_nothing_listening_fails_after_its_patience():
    """Nothing listens on the port, as while a server restarts: the stop waits as a read does, then says so."""
    began = time.monotonic()
    with pytest.raises(DatabaseError, match="cannot open database"):
        stop_execution(BAD_URLS["refused_port"](None), ANY_ID, USER)
    assert time.monotonic() - began < READ_PATIENCE + PROMPT


# -- (h) log hygiene -------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_an_outage_logs_a_few_warnings_not_one_per_poll(pg_cluster, fault_db, runtimes, observe, caplog):
    """While the server is down for 3 s, the runtime logs a bounded handful of warnings, not a traceback per poll."""
    url = pg_cluster.url(fault_db)
    rt = runtimes(url, GRAPHS)
    observer = observe(url)
    root = start_tree(rt, observer)
    caplog.set_level(logging.WARNING)
    first = len(caplog.records)

    pg_cluster.stop()
    assert_stays(lambda: not pg_cluster.is_up(), OUTAGE_SECONDS, "the server down")
    during = list(caplog.records[first:])
    pg_cluster.start()

    warnings = [r for r in during if r.levelno >= logging.WARNING]
    tracebacks = [r for r in during if r.exc_info]
    assert len(warnings) <= MAX_OUTAGE_WARNINGS, f"{len(warnings)} warnings:\n{describe(warnings)}"
    assert len(tracebacks) <= MAX_OUTAGE_TRACEBACKS, f"{len(tracebacks)} tracebacks:\n{describe(tracebacks)}"
    rt.stop(root, user_id=USER)
    assert_subtree_terminated(observer, root, TREE_SIZE)
    close_bounded(rt, CLOSE_WITHIN)
    assert_nothing_active(observer)


@pytest.mark.timeout(180)
def test_a_stop_from_elsewhere_waits_out_a_sqlite_write_lock(tmp_path, runtimes, observe, sampler, lock_holder):
    """``stop_execution`` on SQLite while another process holds the write lock past the busy timeout.

    Opening a database whose schema is current writes nothing, so it must
    not need that lock: the stop does not fail when the busy timeout runs
    out (it did, with "cannot prepare the database schema: database is
    locked"). Its request waits for the lock like any write, and once the
    lock is let go the stop completes: the tree TERMINATED, the ack naming it.
    """
    path = tmp_path / "actorgraph.db"
    url = f"sqlite:///{path}"
    rt = runtimes(url, GRAPHS)
    observer = observe(url)
    root = start_tree(rt, observer)
    statuses = sampler(url)
    holder = lock_holder(path)
    holder.acquire()
    stopper = StopFromElsewhere(url, root, 5.0)
    assert_stays(lambda: not stopper.done.is_set(), SQLITE_BUSY_TIMEOUT + 1.0, "the stop waiting for the lock")
    holder.release()
    stopper.join(5.0 + GRACE + 10.0)
    assert_stopped_from_elsewhere(stopper, rt, observer, root, statuses)


def test_a_new_sqlite_database_locked_by_another_process_is_waited_for(tmp_path, runtimes, lock_holder):
    """Two processes opening one new SQLite file at once: the second waits for the lock, it does not fail.

    Switching a new file to WAL needs its lock; the busy timeout must already
    be set then (it once came after, and the second process failed at once
    with "database is locked").
    """
    path = tmp_path / "actorgraph.db"
    holder = lock_holder(path)
    holder.acquire()
    outcome: dict[str, Any] = {}

    def open_runtime() -> None:
        try:
            outcome["runtime"] = runtimes(f"sqlite:///{path}", GRAPHS)
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            outcome["error"] = exc

    opener = threading.Thread(target=open_runtime, daemon=True)
    opener.start()
    assert_stays(lambda: not outcome, 1.0, "the runtime waiting for the lock")
    holder.release()
    opener.join(SQLITE_BUSY_TIMEOUT + 10.0)
    assert "error" not in outcome, f"opening failed: {outcome.get('error')}"
    assert "runtime" in outcome, "the runtime did not open after the lock was released"
    root = outcome["runtime"].start("finishing", user_id=USER)
    assert outcome["runtime"].wait(root, timeout=30.0).status.value == "COMPLETED"
