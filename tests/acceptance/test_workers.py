"""Acceptance: many workers on one PostgreSQL (issue 9), run.py driven as real processes.

Workers are ``python run.py worker`` processes; roots are submitted by other
processes (``run.py submit``, or ``tests.acceptance.workers_submit``, an
``actors.Client`` submitting many roots); stops come from ``run.py stop``.
Every test has a PostgreSQL database of its own (a random name, dropped with
FORCE after) and reads outcomes through a connection of its own: a passing
test proves commits, not what a process says about itself.

PostgreSQL only: locally a test skips with the reason when no server answers,
under CI=true it fails (tests/conftest.py's ``_admin_connection``).
"""
from __future__ import annotations

import datetime
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.acceptance.support import parse_stop_output
from tests.acceptance.worker_blocks import RUNS_DDL, RUNS_TABLE
from tests.acceptance.workers_support import (
    ACTIVE,
    BLOCKS_MODULE,
    NAP_SECONDS,
    PARENT_SIZE,
    TERMINAL,
    Worker,
    Workers,
    active_rows,
    owner_of,
    runtime_pid,
    settled_parent,
    submitted_ids,
    tree_snapshot,
)
from tests.conftest import database_of_its_own
from tests.helpers import Observer, as_datetime, database_snapshot, wait_until
from tests.integration.fault_fixtures import fault_db, pg_cluster, proxy, scene  # noqa: F401

# The bound: a lost worker's executions are recovered elsewhere within 30 s.
RECOVERY_BOUND = 30.0
# How long the 300 one-node roots may take on a 2-core machine (they take far less).
ONCE_TIMEOUT = 120.0
# Two limited roots of one user that are claimed at the same moment by two workers may
# record their started_at in either order; a FIFO violation shows up a whole nap later.
FIFO_SLACK = 0.2
assert FIFO_SLACK < NAP_SECONDS


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def worker_db() -> Iterator[str]:
    """A database of this test's own on the local PostgreSQL, dropped WITH (FORCE) after."""
    with database_of_its_own(f"workers_{uuid.uuid4().hex[:12]}") as url:
        yield url


@pytest.fixture
def launcher(tmp_path: Path, worker_db: str) -> Iterator[Workers]:
    """Workers, submitters and commands on ``worker_db``; every process is killed in teardown."""
    made = Workers(tmp_path / "cwd", worker_db)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def db(worker_db: str) -> Iterator[Observer]:
    """The test's own connection to ``worker_db``."""
    observer = Observer(worker_db)
    try:
        yield observer
    finally:
        observer.close()


class RunningSampler:
    """Counts RUNNING roots per user through a connection of its own, every few milliseconds.

    One statement per sample: PostgreSQL reads it from one snapshot, so a
    count above the limit is a moment when that many roots really ran.
    """

    SQL = (
        "SELECT user_id, count(*) AS n, string_agg(id, ' ') AS ids FROM graph_execution"
        " WHERE parent_id IS NULL AND status = 'RUNNING' GROUP BY user_id"
    )

    def __init__(self, url: str, limit: int) -> None:
        self.url = url
        self.limit = limit
        self.samples = 0
        self.most: dict[str, int] = {}
        self.violations: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="running-sampler", daemon=True)

    def start(self) -> "RunningSampler":
        self._thread.start()
        wait_until(lambda: self.samples > 0 or self.error is not None, 30.0, "the sampler's first sample")
        assert self.error is None, f"the sampler failed: {self.error!r}"
        return self

    def _run(self) -> None:
        import psycopg2

        try:
            conn = psycopg2.connect(self.url, connect_timeout=10)
            conn.autocommit = True
            try:
                while not self._stop.is_set():
                    with conn.cursor() as cur:
                        cur.execute(self.SQL)
                        rows = cur.fetchall()
                    for user, count, ids in rows:
                        self.most[user] = max(self.most.get(user, 0), count)
                        if count > self.limit:
                            self.violations.append(f"{user}: {count} RUNNING roots: {ids}")
                    self.samples += 1
                    self._stop.wait(0.005)
            finally:
                conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture
def samplers() -> Iterator[Callable[[str, int], RunningSampler]]:
    made: list[RunningSampler] = []

    def make(url: str, limit: int) -> RunningSampler:
        sampler = RunningSampler(url, limit)
        made.append(sampler)
        return sampler.start()

    yield make
    for sampler in made:
        sampler.stop()


# -- helpers -------------------------------------------------------------------------------------


def _wait_settled(db: Observer, ids: list[str], workers: list[Worker], timeout: float) -> dict[str, str]:
    """Wait until none of ``ids`` is QUEUED or RUNNING (every worker alive all along); their statuses."""

    def settled() -> dict[str, str] | None:
        for worker in workers:
            assert worker.alive(), f"a worker died:\n{worker.process.describe()}"
        rows = db.query("SELECT id, status FROM graph_execution WHERE parent_id IS NULL")
        statuses = {row["id"]: row["status"] for row in rows if row["id"] in wanted}
        if len(statuses) == len(wanted) and not any(s in ACTIVE for s in statuses.values()):
            return statuses
        return None

    wanted = set(ids)
    return wait_until(settled, timeout, f"{len(ids)} roots to end")


def _wait_status(db: Observer, execution_id: str, status: str, timeout: float = 60.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        row = db.execution(execution_id)
        assert row is None or row["status"] not in TERMINAL or row["status"] == status, row
        return row if row is not None and row["status"] == status else None

    return wait_until(reached, timeout, f"{execution_id} to be {status}")


def _runtime_pids(db: Observer) -> dict[str, int]:
    return {row["id"]: row["pid"] for row in db.query("SELECT id, pid FROM runtime")}


# -- 1. exactly once -----------------------------------------------------------------------------


def test_300_roots_from_two_submitters_run_exactly_once_on_three_workers(launcher, db, worker_db):
    db.execute(RUNS_DDL)
    workers = launcher.workers(3)
    assert len({w.runtime_id for w in workers}) == 3, [w.runtime_id for w in workers]
    for worker in workers:
        assert runtime_pid(db, worker.runtime_id) == worker.pid, "a worker's runtime row names another pid"

    submitters = [launcher.start_submitter("once", ("alice", 150)),
                  launcher.start_submitter("once", ("bob", 150))]
    for submitter in submitters:
        assert submitter.wait(ONCE_TIMEOUT) == 0, submitter.describe()
    pairs = [pair for submitter in submitters for pair in submitted_ids(submitter)]
    ids = [execution_id for _, execution_id in pairs]
    assert len(ids) == 300 and len(set(ids)) == 300, f"{len(ids)} ids, {len(set(ids))} distinct"

    statuses = _wait_settled(db, ids, workers, ONCE_TIMEOUT)
    not_completed = {eid: s for eid, s in statuses.items() if s != "COMPLETED"}
    assert not not_completed, f"{len(not_completed)} roots did not complete: {list(not_completed.items())[:5]}"

    rows = {row["id"]: row for row in db.query("SELECT * FROM graph_execution")}
    assert set(rows) == set(ids), "the database holds other executions than the 300 submitted"
    users = {}
    for user, execution_id in pairs:
        users[execution_id] = user
    assert all(rows[eid]["user_id"] == users[eid] for eid in ids)
    assert all(rows[eid]["parent_id"] is None and rows[eid]["graph_version"] for eid in ids)

    # Each execution ran its block exactly once: one worker_runs row each, none for anything else.
    runs = db.query(f"SELECT execution_id, count(*) AS n, min(pid) AS pid FROM {RUNS_TABLE} GROUP BY execution_id")
    twice = [row for row in runs if row["n"] != 1]
    assert not twice, f"{len(twice)} executions ran more than once: {twice[:5]}"
    assert {row["execution_id"] for row in runs} == set(ids)

    # ... in a worker process, the one whose runtime claimed the row.
    worker_pids = {w.pid for w in workers}
    owners = _runtime_pids(db)
    wrong = [(row["execution_id"], row["pid"], rows[row["execution_id"]]["runtime_id"]) for row in runs
             if row["pid"] not in worker_pids or owners.get(rows[row["execution_id"]]["runtime_id"]) != row["pid"]]
    assert not wrong, f"blocks ran elsewhere than in the claiming worker: {wrong[:5]}"

    nodes = db.query("SELECT graph_execution_id, node_id, status FROM node_execution")
    assert sorted((n["graph_execution_id"], n["node_id"], n["status"]) for n in nodes) == \
        sorted((eid, "rec", "COMPLETED") for eid in ids)
    for worker in workers:
        assert worker.alive(), worker.process.describe()


def test_a_worker_without_a_graph_s_block_never_claims_it(launcher, db):
    db.execute(RUNS_DDL)
    plain = launcher.await_ready(launcher.cli.start("worker"))  # no --blocks: no record block
    needs_block = launcher.submit("once", "alice")
    later = launcher.submit("quick", "alice")

    # The plain worker claimed the later root, so it had its chance at the earlier one.
    assert _wait_status(db, later, "COMPLETED")["runtime_id"] == plain.runtime_id
    waiting = db.execution(needs_block)
    assert waiting["status"] == "QUEUED" and waiting["runtime_id"] is None, waiting

    equipped = launcher.worker()
    done = _wait_status(db, needs_block, "COMPLETED")
    assert done["runtime_id"] == equipped.runtime_id
    runs = db.query(f"SELECT pid FROM {RUNS_TABLE} WHERE execution_id = ?", (needs_block,))
    assert runs == [{"pid": equipped.pid}], runs


# -- 2. global limits ----------------------------------------------------------------------------


def test_global_per_user_limit_holds_across_workers_and_limited_roots_start_fifo(launcher, db, worker_db,
                                                                                  samplers):
    limit, per_user = 2, 6
    # Everything queued before any worker runs: both workers race for the same limited roots.
    submitter = launcher.start_submitter("nap", ("alice", per_user), ("bob", per_user))
    assert submitter.wait() == 0, submitter.describe()
    pairs = submitted_ids(submitter)
    assert len(pairs) == 2 * per_user
    sampler = samplers(worker_db, limit)

    # Room for 6 roots in all, so only the global per-user limit of 2 holds them back.
    workers = launcher.workers(2, "--concurrency", "3", "--max-running-per-user", str(limit))
    statuses = _wait_settled(db, [eid for _, eid in pairs], workers, 60.0)
    sampler.stop()

    assert sampler.error is None, f"the sampler failed: {sampler.error!r}"
    assert sampler.samples >= 20, f"only {sampler.samples} samples"
    assert not sampler.violations, "more RUNNING roots than the limit:\n" + "\n".join(sampler.violations[:10])
    assert set(statuses.values()) == {"COMPLETED"}, statuses
    # The limit was reached (the workers did run two at once, and the sampler could see it).
    assert sampler.most == {"alice": limit, "bob": limit}, sampler.most

    rows = db.query("SELECT id, user_id, created_at, started_at, ended_at FROM graph_execution"
                    " WHERE parent_id IS NULL ORDER BY created_at, id")
    for user in ("alice", "bob"):
        mine = [row for row in rows if row["user_id"] == user]
        # created_at order is the order this user's roots were submitted in.
        assert [row["id"] for row in mine] == [eid for u, eid in pairs if u == user]
        started = [as_datetime(row["started_at"]) for row in mine]
        late = [
            (mine[i]["id"], started[i].isoformat(), mine[j]["id"], started[j].isoformat())
            for i in range(len(mine)) for j in range(i + 1, len(mine))
            if (started[i] - started[j]).total_seconds() > FIFO_SLACK
        ]
        table = "\n".join(f"  {row['id']} created {row['created_at']} started {row['started_at']}" for row in mine)
        assert not late, f"{user}'s roots did not start in FIFO order: {late[:3]}\n{table}"
        # Limited: the third root of a user started only once one of the first two ended.
        # (The sampler proves it from outside; the rows' own timestamps must agree, within the slack.)
        ended = sorted(as_datetime(row["ended_at"]) for row in mine)
        starts = sorted(started)
        for k in range(limit, len(mine)):
            assert starts[k] >= ended[k - limit] - datetime.timedelta(seconds=FIFO_SLACK), \
                f"{user}: root {k + 1} started before a slot was free\n{table}"


# -- 3. stop from another process ----------------------------------------------------------------


def test_a_stop_from_another_process_ends_the_tree_on_the_worker_that_runs_it(launcher, db):
    workers = launcher.workers(2)
    root = launcher.submit("parent", "alice")
    rows = settled_parent(db, root, workers=workers)
    owner = owner_of(rows)
    assert owner in {w.runtime_id for w in workers}

    stop = launcher.cli.call("stop", root, "--user", "alice")

    assert stop.returncode == 0, stop.describe()
    # Terminal when stop returns: read at once, no waiting.
    assert db.subtree_statuses(root) == {eid: "TERMINATED" for eid in rows}, stop.describe()
    report = parse_stop_output(stop.stdout)
    assert report["root"] == [root]
    assert set(report["terminated"]) == set(rows), stop.stdout
    # The owner acknowledged: nothing had to be forced from outside.
    assert report["forced"] == [], stop.stdout
    assert not any(row["stop_forced"] for row in db.subtree(root))
    assert not active_rows(db), active_rows(db)
    for worker in workers:
        assert worker.alive(), worker.process.describe()


def test_a_stop_of_an_unclaimed_root_terminates_it_at_once_and_no_worker_claims_it(launcher, db):
    root = launcher.submit("quick", "alice")  # no worker runs yet
    queued = db.execution(root)
    assert queued["status"] == "QUEUED" and queued["runtime_id"] is None, queued

    stop = launcher.cli.call("stop", root, "--user", "alice")

    assert stop.returncode == 0, stop.describe()
    stopped = db.execution(root)
    assert stopped["status"] == "TERMINATED" and stopped["ended_at"] is not None, stopped

    worker = launcher.worker()
    later = launcher.submit("quick", "alice")
    done = _wait_status(db, later, "COMPLETED")
    assert done["runtime_id"] == worker.runtime_id
    # The worker claims FIFO: it passed the terminated root by, and never ran it.
    assert db.execution(root) == stopped
    assert db.nodes(root) == []


# -- 4. a killed worker --------------------------------------------------------------------------


def test_a_killed_worker_s_tree_is_recovered_by_another_worker_within_30s(launcher, db):
    workers = launcher.workers(2)
    root = launcher.submit("parent", "alice")
    rows = settled_parent(db, root, workers=workers)
    owner = owner_of(rows)
    victims = [w for w in workers if w.pid == runtime_pid(db, owner)]
    assert len(victims) == 1, f"runtime {owner} is none of the workers"
    victim = victims[0]
    survivor = next(w for w in workers if w is not victim)

    assert victim.process.kill_hard() == -signal.SIGKILL
    killed = time.monotonic()
    assert set(db.subtree_statuses(root).values()) == {"RUNNING"}  # nothing ended them yet

    def recovered() -> bool:
        assert survivor.alive(), survivor.process.describe()
        return all(status in TERMINAL for status in db.subtree_statuses(root).values())

    wait_until(recovered, RECOVERY_BOUND, f"the survivor to recover {owner}'s tree")
    took = time.monotonic() - killed

    after = {row["id"]: row for row in db.subtree(root)}
    assert set(after) == set(rows), "recovery must not start the tree again"
    for execution_id, row in after.items():
        assert row["status"] == "FAILED", (took, row)
        assert owner in (row["error"] or "") and "lost" in row["error"], row
    assert not active_rows(db), active_rows(db)

    # The survivor goes on working.
    later = launcher.submit("quick", "bob")
    assert _wait_status(db, later, "COMPLETED")["runtime_id"] == survivor.runtime_id


# -- 5. a partitioned worker ---------------------------------------------------------------------


@pytest.fixture
def partition(tmp_path: Path, pg_cluster, fault_db, proxy) -> Iterator[tuple[Workers, str, Any]]:  # noqa: F811
    """Workers on the suite's own cluster: ``(launcher, proxied_url, proxy)``; direct by default."""
    made = Workers(tmp_path / "cwd", pg_cluster.url(fault_db))
    try:
        yield made, proxy.url_for(fault_db), proxy
    finally:
        made.close()  # before the scene heals the proxy and drops the database


def test_a_partitioned_worker_is_recovered_elsewhere_and_writes_nothing_when_it_returns(partition):
    launcher, proxied, proxy = partition  # noqa: F811
    a = launcher.worker(db=proxied)
    db = Observer(launcher.url)
    try:
        root = launcher.submit("parent", "alice")
        rows = settled_parent(db, root, workers=[a])
        assert owner_of(rows) == a.runtime_id
        b = launcher.worker()  # direct: started after the claim, so the tree is A's

        proxy.blackhole()
        cut = time.monotonic()

        def recovered() -> bool:
            assert b.alive(), b.process.describe()
            return all(status in TERMINAL for status in db.subtree_statuses(root).values())

        wait_until(recovered, RECOVERY_BOUND, "worker B to recover partitioned worker A's tree")
        took = time.monotonic() - cut
        after = db.subtree(root)
        assert len(after) == PARENT_SIZE
        for row in after:
            assert row["status"] == "FAILED", (took, row)
            assert a.runtime_id in (row["error"] or ""), row
        recovered_state = tree_snapshot(db, root)
        assert not [r for r in active_rows(db) if r["id"] in rows], active_rows(db)

        proxy.heal()
        wait_until(lambda: any("lease lost" in line for line in a.process.stderr_lines), 60.0,
                   f"A to log 'lease lost':\n{a.process.describe()}")
        # Bounded: A is back under a new runtime id, and has written two heartbeats since.
        new_id = wait_until(lambda: next((i for i in a.ready_ids() if i != a.runtime_id), None), 60.0,
                            f"a second 'worker <id> ready' line from A:\n{a.process.describe()}")
        first = wait_until(lambda: db.query("SELECT pid, heartbeat_at FROM runtime WHERE id = ?", (new_id,)),
                           30.0, f"A's new runtime row {new_id}")[0]
        assert first["pid"] == a.pid
        beats = [first["heartbeat_at"]]

        def beat_again() -> bool:
            rows_now = db.query("SELECT heartbeat_at FROM runtime WHERE id = ?", (new_id,))
            if rows_now and rows_now[0]["heartbeat_at"] != beats[-1]:
                beats.append(rows_now[0]["heartbeat_at"])
            return len(beats) >= 3

        wait_until(beat_again, 30.0, f"two heartbeats of A's new runtime {new_id}")

        assert tree_snapshot(db, root) == recovered_state, "A wrote to executions it had lost"
        assert a.alive(), a.process.describe()
    finally:
        db.close()


# -- 6. draining ---------------------------------------------------------------------------------


def test_sigterm_lets_a_running_root_finish_then_the_worker_exits_0(launcher, db):
    worker = launcher.worker("--drain-timeout", "30")
    root = launcher.submit("short", "alice")

    def napping() -> bool:
        assert worker.alive(), worker.process.describe()
        naps = [n for n in db.nodes(root) if n["node_id"] == "nap"]
        return db.status(root) == "RUNNING" and bool(naps) and naps[0]["status"] == "RUNNING"

    wait_until(napping, 60.0, f"{root} to sleep on the worker")
    worker.process.send_signal(signal.SIGTERM)

    assert worker.process.wait(60.0) == 0, worker.process.describe()
    row = db.execution(root)
    assert row["status"] == "COMPLETED", row
    assert not active_rows(db), active_rows(db)


def test_sigterm_past_the_drain_timeout_terminates_the_tree_then_the_worker_exits_0(launcher, db):
    worker = launcher.worker("--drain-timeout", "1")
    root = launcher.submit("parent", "alice")
    rows = settled_parent(db, root, workers=[worker])

    worker.process.send_signal(signal.SIGTERM)

    assert worker.process.wait(60.0) == 0, worker.process.describe()
    assert db.subtree_statuses(root) == {eid: "TERMINATED" for eid in rows}
    assert not active_rows(db), active_rows(db)


# -- 7. bad input --------------------------------------------------------------------------------


def _one_clear_line(result) -> None:
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(result.stderr_lines) == 1, f"expected exactly one stderr line:\n{result.describe()}"


@pytest.mark.parametrize("command", ["submit", "worker"])
def test_submit_and_worker_on_sqlite_exit_2_and_create_nothing(command, tmp_path):
    path = tmp_path / "store.db"
    launcher = Workers(tmp_path / "cwd", f"sqlite:///{path}")
    try:
        if command == "submit":
            args = ("submit", "graphs.json", "quick", "--user", "alice", "--blocks", BLOCKS_MODULE)
        else:
            args = ("worker", "--blocks", BLOCKS_MODULE)
        result = launcher.cli.call(*args, timeout=30.0)
    finally:
        launcher.close()

    _one_clear_line(result)
    assert "postgresql" in result.stderr.lower(), result.describe()
    assert not path.exists(), "a SQLite database file was created"
    assert not list((tmp_path / "cwd").glob("*.db")), "a default database file was created"


BAD_POSTGRES_INPUTS = {
    "unknown graph id": ("submit", "graphs.json", "no_such_graph", "--user", "alice", "--blocks", BLOCKS_MODULE),
    "malformed --input": ("submit", "graphs.json", "quick", "--user", "alice", "--blocks", BLOCKS_MODULE,
                          "--input", "novalue"),
    "unknown input name": ("submit", "graphs.json", "quick", "--user", "alice", "--blocks", BLOCKS_MODULE,
                           "--input", "nope=1"),
    "missing input": ("submit", "graphs.json", "leaf", "--user", "alice", "--blocks", BLOCKS_MODULE),
    "worker --concurrency 0": ("worker", "--concurrency", "0", "--blocks", BLOCKS_MODULE),
    "worker --blocks no.such.module": ("worker", "--blocks", "no.such.module"),
}


@pytest.mark.parametrize("case", list(BAD_POSTGRES_INPUTS))
def test_bad_submit_and_worker_input_exits_2_and_writes_nothing(case, launcher, worker_db):
    seed = launcher.submit("quick", "alice")  # a used database: the schema and one QUEUED root
    before = database_snapshot(worker_db)
    assert [row for row in before["graph_execution"] if ("id", seed) in row]

    result = launcher.cli.call(*BAD_POSTGRES_INPUTS[case], timeout=30.0)

    _one_clear_line(result)
    assert database_snapshot(worker_db) == before, f"{case} changed the database"
