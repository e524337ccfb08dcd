"""Workers in one process: submit, claim, versions, limits, stops of unclaimed roots, drain, fencing.

Workers need PostgreSQL; on SQLite only the refusals are tested. The
multi-process scenarios (kill -9, partitions through a proxy, SIGTERM) are
in tests/acceptance/test_workers.py; the lease here is lost for real too,
through the suite's own cluster behind a proxy.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import pytest

from actors import Client, InvalidInput, NotFound, Runtime
from tests.conftest import _reset_postgres
from tests.helpers import Gates, Observer, assert_stays, wait_until
from tests.integration import graphs as g

TIMEOUT = 30.0


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    """Workers need PostgreSQL: these tests run on it alone (the SQLite refusal is tested below)."""
    _reset_postgres(postgres_url)
    return postgres_url


@pytest.fixture
def make(pg_url: str) -> Iterator[Callable[..., Any]]:
    """``make(kind, **kwargs)``: a Runtime (kind="worker"/"runtime") or Client, closed in teardown."""
    made: list[Any] = []

    def build(kind: str, **kwargs: Any) -> Any:
        if kind == "client":
            thing: Any = Client(pg_url)
        else:
            thing = Runtime(pg_url, worker=kind == "worker", **kwargs)
        made.append(thing)
        return thing

    yield build
    for thing in reversed(made):
        thing.close()


# -- refusals -------------------------------------------------------------------------


def test_on_sqlite_submit_and_worker_refuse_and_write_nothing(tmp_path):
    path = tmp_path / "never.db"
    with pytest.raises(InvalidInput, match="PostgreSQL"):
        Runtime(f"sqlite:///{path}", worker=True)
    assert not path.exists()
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    with Runtime(url) as rt:
        rt.load(g.graphs(quick=g.quick()))
        observer = Observer(url)
        before = observer.snapshot()
        with pytest.raises(InvalidInput, match="PostgreSQL"):
            rt.submit("quick", user_id="u")
        assert observer.snapshot() == before
        observer.close()


def test_submit_validates_before_writing(pg_url, make):
    client = make("client")
    client.load(g.graphs(leaf=g.leaf()))
    observer = Observer(pg_url)
    before = observer.snapshot()
    with pytest.raises(NotFound):
        client.submit("nope", user_id="u")
    for bad in ({}, {"seconds": 1, "extra": 2}, {"seconds": object()}, ["seconds"]):
        with pytest.raises(InvalidInput):
            client.submit("leaf", user_id="u", inputs=bad)
    with pytest.raises(InvalidInput):
        client.submit("leaf", user_id="", inputs={"seconds": 1})
    assert observer.snapshot() == before
    observer.close()


# -- claiming and versions ---------------------------------------------------------------


def test_a_submitted_root_waits_unowned_then_a_worker_runs_it(pg_url, make):
    client = make("client")
    client.load(g.graphs(quick=g.quick(7)))
    root = client.submit("quick", user_id="u")
    observer = Observer(pg_url)
    row = observer.execution(root)
    assert row["status"] == "QUEUED" and row["runtime_id"] is None and row["graph_version"]
    worker = make("worker")
    wait_until(lambda: observer.status(root) == "COMPLETED", TIMEOUT, "the worker to run the root")
    row = observer.execution(root)
    assert row["runtime_id"] == worker.runtime_id
    assert '"answer": 7' in row["outputs"] or '"answer":7' in row["outputs"]
    observer.close()


def test_a_worker_runs_the_version_that_was_submitted(pg_url, make):
    """The graph is changed and loaded again after the first submit: each root runs its own version."""
    client = make("client")
    client.load(g.graphs(answer=g.quick("first"), parent=g.agents("answer", 1)))
    first = client.submit("parent", user_id="u")
    client.load(g.graphs(answer=g.quick("second")))
    second = client.submit("parent", user_id="u")
    observer = Observer(pg_url)
    versions = {r: observer.execution(r)["graph_version"] for r in (first, second)}
    assert versions[first] != versions[second]
    make("worker")
    wait_until(lambda: all(observer.status(r) == "COMPLETED" for r in (first, second)), TIMEOUT, "both roots")
    for root, expected in ((first, "first"), (second, "second")):
        (child,) = observer.query("SELECT * FROM graph_execution WHERE parent_id = ?", (root,))
        assert child["graph_version"] == versions[root], "a child records its root's version"
        assert expected in child["outputs"]
    stored = observer.query("SELECT version FROM graph_version")
    assert {versions[first], versions[second]} <= {r["version"] for r in stored}
    observer.close()


def test_a_worker_without_the_block_never_claims_the_graph(pg_url, make):
    gates = Gates()
    client = make("client")
    gates.register(client)
    client.load(g.graphs(held=g.held()))
    root = client.submit("held", user_id="u", inputs={"key": "k"})
    plain = make("worker")
    observer = Observer(pg_url)
    # Two claim rounds at least (the poll is 1 s; the submit's NOTIFY came first).
    assert_stays(lambda: observer.status(root) == "QUEUED", 2.5, "the root unclaimed by a worker without `hold`")
    able = make("worker")
    gates.register(able)
    wait_until(lambda: observer.execution(root)["runtime_id"] == able.runtime_id, TIMEOUT, "the able worker")
    gates.open("k")
    wait_until(lambda: observer.status(root) == "COMPLETED", TIMEOUT, "the root to complete")
    assert plain.stats()["claimed_running"] == 0
    gates.open_all()
    observer.close()


def test_concurrency_bounds_the_roots_running_on_a_worker(pg_url, make):
    gates = Gates()
    client = make("client")
    gates.register(client)
    client.load(g.graphs(held=g.held()))
    roots = [client.submit("held", user_id="u", inputs={"key": f"k{i}"}) for i in range(5)]
    worker = make("worker", concurrency=2)
    gates.register(worker)
    observer = Observer(pg_url)

    def running() -> int:
        return sum(observer.status(r) == "RUNNING" for r in roots)

    wait_until(lambda: running() == 2, TIMEOUT, "two roots running")
    assert_stays(lambda: running() == 2, 1.5, "no more than concurrency=2 running")
    for i in range(5):
        gates.open(f"k{i}")
    wait_until(lambda: all(observer.status(r) == "COMPLETED" for r in roots), TIMEOUT, "all five completed")
    observer.close()


def test_global_limits_hold_across_workers_and_start_fifo(pg_url, make):
    gates = Gates()
    client = make("client")
    gates.register(client)
    client.load(g.graphs(held=g.held()))
    roots = [client.submit("held", user_id="alice", inputs={"key": f"a{i}"}) for i in range(6)]
    other = client.submit("held", user_id="bob", inputs={"key": "b0"})
    workers = [make("worker", concurrency=4, max_running_per_user=2) for _ in range(2)]
    for worker in workers:
        gates.register(worker)
    observer = Observer(pg_url)
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        sampler = Observer(pg_url)
        while not done.is_set():
            rows = sampler.query("SELECT COUNT(*) AS n FROM graph_execution WHERE user_id = 'alice'"
                                 " AND parent_id IS NULL AND status = 'RUNNING'")
            seen.append(rows[0]["n"])
        sampler.close()

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        wait_until(lambda: observer.status(other) == "RUNNING", TIMEOUT, "bob's root, beside alice's limit")
        for i in range(6):
            wait_until(lambda i=i: observer.status(roots[i]) == "RUNNING", TIMEOUT, f"alice's root {i}")
            gates.open(f"a{i}")
        gates.open("b0")
        wait_until(lambda: all(observer.status(r) == "COMPLETED" for r in roots + [other]), TIMEOUT, "all")
    finally:
        done.set()
        thread.join(10)
        gates.open_all()
    assert seen and max(seen) <= 2, f"alice had {max(seen)} running roots (limit 2)"
    started = [observer.execution(r)["started_at"] for r in roots]
    assert started == sorted(started), "alice's roots started in the order they were submitted"
    observer.close()


# -- stopping --------------------------------------------------------------------------------


def test_a_stop_of_an_unclaimed_root_ends_it_at_once_and_it_is_never_claimed(pg_url, make):
    client = make("client")
    client.load(g.graphs(quick=g.quick()))
    root = client.submit("quick", user_id="u")
    ack = client.stop(root, user_id="u", wait_timeout=0)
    assert ack.terminated == (root,)
    observer = Observer(pg_url)
    assert observer.status(root) == "TERMINATED"
    make("worker")
    later = client.submit("quick", user_id="u")
    wait_until(lambda: observer.status(later) == "COMPLETED", TIMEOUT, "a later root to run")
    row = observer.execution(root)
    assert row["status"] == "TERMINATED" and row["runtime_id"] is None and row["started_at"] is None
    observer.close()


def test_a_client_stops_a_tree_on_whichever_worker_runs_it(pg_url, make):
    client = make("client")
    client.load(g.graphs(nap=g.sleeper(), parent=g.agents("nap", 3)))
    workers = [make("worker") for _ in range(2)]
    root = client.submit("parent", user_id="u")
    observer = Observer(pg_url)
    wait_until(lambda: len([r for r in observer.subtree(root) if r["status"] == "RUNNING"]) == 4, TIMEOUT,
               "the tree running")
    owner = observer.execution(root)["runtime_id"]
    assert owner in {w.runtime_id for w in workers}
    ack = client.stop(root, user_id="u", wait_timeout=5)
    statuses = observer.subtree_statuses(root)
    assert set(statuses.values()) == {"TERMINATED"} and len(statuses) == 4
    assert set(ack.terminated) == set(statuses)
    observer.close()


def test_only_a_stop_from_elsewhere_wakes_the_hosting_runtimes_stop_channel(pg_url, make):
    """A runtime stopping what it hosts does not NOTIFY itself; a Client's stop does, once."""
    import psycopg2

    from persistence.notifications import stop_channel

    rt = make("runtime")
    rt.load(g.graphs(nap=g.sleeper()))
    local, remote = rt.start("nap", user_id="u"), rt.start("nap", user_id="u")
    observer = Observer(pg_url)
    wait_until(lambda: {observer.status(local), observer.status(remote)} == {"RUNNING"}, TIMEOUT, "both running")
    listener = psycopg2.connect(pg_url)
    listener.autocommit = True
    try:
        listener.cursor().execute(f"LISTEN {stop_channel(rt.runtime_id)}")
        rt.stop(local, user_id="u", wait_timeout=5)
        make("client").stop(remote, user_id="u", wait_timeout=5)
        # NOTIFYs arrive in commit order: the local stop committed first, so
        # had it notified, its payload would come before the remote one's.
        payloads: list[str] = []

        def remote_notice_arrived() -> bool:
            listener.poll()
            payloads.extend(n.payload for n in listener.notifies)
            listener.notifies.clear()
            return remote in payloads

        wait_until(remote_notice_arrived, TIMEOUT, "the remote stop's notice")
        assert payloads == [remote]
        assert observer.status(local) == observer.status(remote) == "TERMINATED"
    finally:
        listener.close()
        observer.close()


def test_drain_lets_running_trees_finish_then_stops_the_rest(pg_url, make):
    gates = Gates()
    client = make("client")
    gates.register(client)
    client.load(g.graphs(held=g.held(), nap=g.sleeper()))
    worker = make("worker")
    gates.register(worker)
    finishing = client.submit("held", user_id="u", inputs={"key": "f"})
    sleeping = client.submit("nap", user_id="u")
    observer = Observer(pg_url)
    wait_until(lambda: observer.status(finishing) == observer.status(sleeping) == "RUNNING", TIMEOUT, "both")
    threading.Timer(0.3, gates.open, ("f",)).start()
    worker.drain(1.5)
    assert observer.status(finishing) == "COMPLETED"
    assert observer.status(sleeping) == "TERMINATED"
    late = client.submit("held", user_id="u", inputs={"key": "late"})
    assert_stays(lambda: observer.status(late) == "QUEUED", 1.5, "nothing claimed after drain")
    gates.open_all()
    observer.close()


# -- leases --------------------------------------------------------------------------------------


def test_a_runtime_that_renewed_its_lease_after_it_was_judged_lost_is_not_recovered(database_url):
    """Recovery is compare-and-delete: the heartbeat it judged stale must still be the row's."""
    import datetime as dt

    from persistence import Store, utcnow
    from persistence.writes import RecoverLostRuntimes

    with Runtime(database_url) as rt:
        rt.load(g.graphs(nap=g.sleeper()))
        root = rt.start("nap", user_id="u")
        observer = Observer(database_url)
        wait_until(lambda: observer.status(root) == "RUNNING", TIMEOUT, "the root running")
        stale = utcnow() - dt.timedelta(minutes=5)
        # As if the runtime had stalled: its heartbeat is five minutes old.
        observer.execute("UPDATE runtime SET heartbeat_at = ? WHERE id = ?", (stale, rt.runtime_id))
        other = Store.open(database_url)
        try:
            lost = other.lost_runtimes()
            assert [runtime.id for runtime in lost] == [rt.runtime_id]
            # It renews its lease before the recovery commits.
            observer.execute("UPDATE runtime SET heartbeat_at = ? WHERE id = ?", (utcnow(), rt.runtime_id))
            (ended,) = other.write(RecoverLostRuntimes(runtimes=tuple(lost), at=utcnow()))
        finally:
            other.close()
        assert ended == ()
        assert observer.status(root) == "RUNNING"
        assert observer.query("SELECT id FROM runtime WHERE id = ?", (rt.runtime_id,))
        assert not rt.lease_lost.is_set()
        ack = rt.stop(root, user_id="u", wait_timeout=1)
        assert ack.terminated == (root,) and observer.status(root) == "TERMINATED"
        observer.close()
