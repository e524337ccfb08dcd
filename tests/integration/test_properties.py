"""Properties of the stop protocol on random graphs, starts and stops, on both databases.

Each hypothesis example (see property_support.py for the scenarios) runs on
a fresh runtime: it loads a few random graphs (agents starting later graphs,
sleeps that may ignore the stop, failing nodes, cooperative, stubborn and
exploding user blocks), starts 1 to 3 roots, and sends 1 to 4 stops of roots
or of descendants picked from the database, with random ``cascade`` and
``wait_timeout`` (0 included: "force everything now"), some in the
background and some twice at once from two threads; one in four comes
"from elsewhere" (``stop_execution`` on the URL, as another process stops
it, through the database and the host's stop watcher). About half the
examples also plant a bug: the n-th message of one type that any execution
actor handles raises (property_support.broken_turns), and in half of
those the salvage of that actor raises too (its runtime then writes it from
outside); the execution whose turn broke must end FAILED with every
invariant below intact. A sampler thread reads
every row of the example every ~20 ms; every stop reads its subtree right
after it returned; the example ends with ``rt.close()``. Then:

1. A cascading stop leaves its execution's subtree terminal, nodes included,
   when it returns. A non-cascading one leaves the execution terminal, and
   none of its children QUEUED at that moment ever runs.
2. A stop returns within ``wait_timeout + SLACK``.
3. The ack names the execution, in ``terminated`` or ``already_final``, and a
   stop returns an ack at all (rather than raising).
4. A terminal row (execution or node) never changes status, started_at or ended_at.
5. No sample shows a terminal execution with an active child.
6. After a stop returned, no node and no child starts in what it stopped.
7. After ``rt.close()`` nothing is QUEUED or RUNNING.

A non-cascading stop ends only its execution: its RUNNING children run on
("abandoned", README: the stop protocol), so a TERMINATED parent whose row
says ``stop_cascade = false`` may have RUNNING (never QUEUED) children. A
later cascading stop of that execution or of an ancestor answers for them
too: it finds them in the database and stops them.

Rows of earlier examples stay in the PostgreSQL database: every read is
scoped to the example's runtime (``runtime_id``) or to a stopped subtree.

``test_stop_properties_through_outages`` runs the same scenarios with one
or two drawn outages (50 ms to 7 s) on both databases: on PostgreSQL, the
fault tests' own cluster, reached through a ``TcpProxy`` that the outages
cut or reset while the test reads around it; on SQLite, another process
holds the file's write lock. The invariants hold, except that a stop that met an outage may
raise ``DatabaseError`` within ``wait_timeout + OUTAGE_SLACK``; and:

8. A stop that raised promising to complete "when the database answers"
   does: its subtree is terminal soon after the heal, without another call,
   and nothing in it started after it raised.

Number of examples: ``ACTORGRAPH_PROPERTY_EXAMPLES`` (default 25 per
database), and ``ACTORGRAPH_OUTAGE_EXAMPLES`` with outages (default three
fifths of it). SLACK: ``ACTORGRAPH_PROPERTY_SLACK`` seconds (default 1.5, see SLACK).
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Callable, Iterable, Iterator

import pytest
from hypothesis import HealthCheck, event, given, note, settings

from actors import DatabaseError
from tests.faultkit import TcpProxy
from tests.helpers import as_datetime
from tests.integration.fault_fixtures import *  # noqa: F401,F403 - pg_cluster, fault_db
from tests.integration.property_support import (
    ACTIVE,
    PROMISE,
    TERMINAL,
    FaultPath,
    LockedSqlite,
    Outcome,
    Sample,
    StopRecord,
    abandons,
    outages,
    run_example,
    scenarios,
    short,
    stopped_ids,
)

EXAMPLES = int(os.environ.get("ACTORGRAPH_PROPERTY_EXAMPLES", "25"))
# How late a stop may return (invariant 2). A correct stop returns within
# wait_timeout + its commits, + CHILD_GRACE (1 s, actors/supervision.py) in
# the rare case of a child silent after the deadline. Measured on a 2-core
# machine with the sampler running (634 stops, both databases), a stop whose
# subtree had no failure returned at most 0.45 s after its wait_timeout
# (99% within 0.01 s). 1.5 s leaves room for a slower machine and still
# sees a stop wait for a failure's deadline (failure_timeout is 2 s, see
# property_support.FAILURE_TIMEOUT) instead of its own, which a 3 s slack
# would hide. Raise it on a much slower machine.
SLACK = float(os.environ.get("ACTORGRAPH_PROPERTY_SLACK", "1.5"))
# Stops sent this close together (the two of a "concurrent" step) may reach
# the actor in either order.
SKEW = 0.1
# Hypothesis may shrink a failure for up to 300 s after the examples ran.
TEST_TIMEOUT = 120 + 20 * EXAMPLES + 330
# Each check reports at most this many violations (the rest are counted).
SHOWN = 5

# Examples with outages, per database: ACTORGRAPH_OUTAGE_EXAMPLES, by
# default three fifths of ACTORGRAPH_PROPERTY_EXAMPLES.
OUTAGE_EXAMPLES = int(os.environ.get("ACTORGRAPH_OUTAGE_EXAMPLES", str(max(1, EXAMPLES * 3 // 5))))
# A stop that met an outage may wait for the database: it returns, or raises
# DatabaseError, within wait_timeout + this (as tests/integration/test_faults.py holds it).
OUTAGE_SLACK = 5.0
# A stop under way up to this long after an outage healed may still meet it:
# the runtime's connections retry with a backoff of up to 2 s (persistence/outage.py).
AFTER_HEAL = 3.0
OUTAGE_TEST_TIMEOUT = 120 + 30 * OUTAGE_EXAMPLES + 330


@pytest.fixture
def example_url(database_url: str, tmp_path_factory: pytest.TempPathFactory):
    """``make()`` -> the database URL for one example: a fresh SQLite file, or the test's PostgreSQL database."""

    def make() -> str:
        if database_url.startswith("sqlite"):
            return f"sqlite:///{tmp_path_factory.mktemp('example') / 'actorgraph.db'}"
        return database_url

    return make


@pytest.mark.timeout(TEST_TIMEOUT)
@settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenario=scenarios())
def test_stop_properties(example_url, scenario) -> None:
    outcome = run_example(example_url(), scenario, SLACK)
    note(outcome.timeline())
    harness = [f"{r.label}: {r.harness_error!r}" for r in outcome.records if r.harness_error is not None]
    assert not harness, f"the test's own machinery failed (not an invariant): {harness}"

    # One assert per invariant, each on its own line of this function:
    # hypothesis tells failures apart by the line that raised them, and
    # shrinks each one on its own. Stops that raised are checked last, so
    # that an example where one stop raised still shows what the others broke.
    assert not (v := subtree_not_terminal_after_stop(outcome)), report("1: subtree active after the stop", v)
    assert not (v := queued_child_ran_after_non_cascading_stop(outcome)), report("1: QUEUED child ran", v)
    assert not (v := terminal_parent_with_active_child(outcome)), report("5: terminal parent, active child", v)
    assert not (v := terminal_row_changed(outcome)), report("4: a terminal row changed", v)
    assert not (v := started_after_ack(outcome)), report("6: started after the stop returned", v)
    assert not (v := active_after_close(outcome)), report("7: QUEUED or RUNNING after rt.close()", v)
    assert not (v := stop_too_slow(outcome)), report(f"2: longer than wait_timeout + {SLACK}s", v)
    assert not (v := ack_without_execution(outcome)), report("3: the ack does not name the execution", v)
    assert not (v := stop_raised(outcome)), report("3: the stop raised instead of acknowledging", v)


# -- the same properties through outages (both databases) ----------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def outage_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """``make()`` -> a context manager of (the URL the test reads, the runtime's URL, what the outages break).

    PostgreSQL: the fault tests' own cluster, the runtime through a fresh
    ``TcpProxy`` per example. SQLite: a fresh file per example, whose write
    lock another process takes.
    """
    if request.param == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        database = request.getfixturevalue("fault_db")

        @contextlib.contextmanager
        def through_proxy() -> Iterator[tuple[str, str, FaultPath]]:
            with TcpProxy(target_port=cluster.port) as proxy:
                yield cluster.url(database), proxy.url_for(database), proxy

        return through_proxy

    @contextlib.contextmanager
    def lockable_file() -> Iterator[tuple[str, str, FaultPath]]:
        path = tmp_path_factory.mktemp("example") / "actorgraph.db"
        locked = LockedSqlite(str(path))
        try:
            yield f"sqlite:///{path}", f"sqlite:///{path}", locked
        finally:
            locked.heal()

    return lockable_file


@pytest.mark.timeout(OUTAGE_TEST_TIMEOUT)
@settings(max_examples=OUTAGE_EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenario=scenarios(), planned=outages())
def test_stop_properties_through_outages(outage_target, scenario, planned) -> None:
    """The scenarios above, with the database away for a while as they run.

    The runtime, and the stops from elsewhere, reach PostgreSQL through a
    ``TcpProxy`` that the drawn outages cut or reset, or find SQLite's write
    lock held by another process; the sampler and every read of the test
    go around the proxy (SQLite readers are never locked out). Every
    invariant above holds, except that a stop that met an outage may raise
    ``DatabaseError``, and may take longer (``slack_of``). One that
    promises to complete by itself ("when the database answers") must: its
    subtree is terminal within PROMISE_KEPT_WITHIN s of the heal, and
    nothing in it started after it raised.
    """
    with outage_target() as (url, runtime_url, path):
        outcome = run_example(url, scenario, SLACK, path=path, runtime_url=runtime_url, planned=planned)
    note(outcome.timeline())
    harness = [f"{r.label}: {r.harness_error!r}" for r in outcome.records if r.harness_error is not None]
    assert not harness, f"the test's own machinery failed (not an invariant): {harness}"

    for record in outcome.records:  # what the examples covered: --hypothesis-show-statistics
        if met_outage(outcome, record):
            event(f"a stop from {record.via} met an outage and {how_it_ended(record)}")

    def slack_of(record: StopRecord) -> float:
        if not met_outage(outcome, record):
            return SLACK
        # A stop from elsewhere waits for its request's commit (up to 60 s) before its wait_timeout begins.
        return OUTAGE_SLACK + (sum(off - on for on, off in outages_met(outcome, record)) if record.via == "elsewhere" else 0.0)

    def excused(record: StopRecord) -> bool:
        return isinstance(record.error, DatabaseError) and met_outage(outcome, record)

    assert not (v := subtree_not_terminal_after_stop(outcome)), report("1: subtree active after the stop", v)
    assert not (v := queued_child_ran_after_non_cascading_stop(outcome)), report("1: QUEUED child ran", v)
    assert not (v := terminal_parent_with_active_child(outcome)), report("5: terminal parent, active child", v)
    assert not (v := terminal_row_changed(outcome)), report("4: a terminal row changed", v)
    assert not (v := started_after_ack(outcome)), report("6: started after the stop returned", v)
    assert not (v := started_after_promise(outcome)), report("6: started after the stop raised", v)
    assert not (v := outcome.broken_promises), report("8: a promised stop did not complete after the heal", v)
    assert not (v := active_after_close(outcome)), report("7: QUEUED or RUNNING after rt.close()", v)
    assert not (v := stop_too_slow(outcome, slack_of)), report("2: longer than wait_timeout + slack", v)
    assert not (v := ack_without_execution(outcome)), report("3: the ack does not name the execution", v)
    assert not (v := stop_raised(outcome, excused)), report("3: raised, and not a DatabaseError in an outage", v)


def how_it_ended(record: StopRecord) -> str:
    """A stop's end, in words that group like with like (no ports, database names or ids)."""
    if record.ack is not None:
        return "acknowledged"
    if PROMISE in str(record.error):
        return "raised, promising to complete"
    # What failed: the message up to its first ':' (the cause after it names the server), URLs elided.
    what = re.sub(r"\S+://\S+?(?=:?(\s|$))", "<url>", str(record.error)).split(":")[0]
    return f"raised {type(record.error).__name__}: {what[:60]}"


def outages_met(outcome: Outcome, record: StopRecord) -> list[tuple[float, float]]:
    """The outages during which the stop was under way, or that ended up to AFTER_HEAL s before it began."""
    ended = record.returned_at if record.returned_at is not None else float("inf")
    return [(on, off) for on, off in outcome.outages if record.sent_at <= off + AFTER_HEAL and ended >= on]


def met_outage(outcome: Outcome, record: StopRecord) -> bool:
    return bool(outages_met(outcome, record))


def report(invariant: str, violations: list[str]) -> str:
    shown = "\n  ".join(violations[:SHOWN])
    more = f"\n  ... and {len(violations) - SHOWN} more" if len(violations) > SHOWN else ""
    return f"invariant {invariant}:\n  {shown}{more}"


# -- what a stop answers for ---------------------------------------------------------

def acknowledged(outcome: Outcome) -> Iterable[StopRecord]:
    return (r for r in outcome.records if r.ack is not None and r.returned_at is not None)


def every_sample(outcome: Outcome) -> list[Sample]:
    return outcome.samples + ([outcome.final] if outcome.final is not None else [])


def describe(record: StopRecord) -> str:
    return (f"{record.label} of {short(record.target)} (from {record.via}, cascade={record.cascade}, "
            f"wait_timeout={record.wait_timeout})")


# -- invariants ------------------------------------------------------------------------

def subtree_not_terminal_after_stop(outcome: Outcome) -> list[str]:
    """1: read right after the return, what the stop answers for is terminal, nodes included."""
    violations = []
    for record in acknowledged(outcome):
        rows = {r["id"]: r for r in record.rows}
        if record.target not in rows:
            violations.append(f"{describe(record)}: its row is missing")
            continue
        ids = stopped_ids(record)
        active = sorted(f"{short(i)}={rows[i]['status']}" for i in ids if rows[i]["status"] in ACTIVE)
        nodes = sorted(f"{short(n['graph_execution_id'])}.{n['node_id']}={n['status']}" for n in record.nodes
                       if n["graph_execution_id"] in ids and n["status"] in ACTIVE)
        if active or nodes:
            violations.append(f"{describe(record)} returned after {record.duration:.3f}s with "
                              f"executions {active} and nodes {nodes} still active")
    return violations


def queued_child_ran_after_non_cascading_stop(outcome: Outcome) -> list[str]:
    """1: a child QUEUED when a non-cascading stop of its parent returned never becomes RUNNING."""
    violations = []
    for record in acknowledged(outcome):
        if record.cascade:
            continue
        queued = {r["id"] for r in record.rows if r["parent_id"] == record.target and r["status"] == "QUEUED"}
        for sample in every_sample(outcome):
            if sample.begun < record.returned_at:
                continue
            for child in queued:
                row = sample.executions.get(child)
                if row is not None and (row["status"] == "RUNNING" or row["started_at"] is not None):
                    violations.append(f"{describe(record)}: child {short(child)}, QUEUED when it returned, "
                                      f"is {row['status']} (started_at {row['started_at']}) "
                                      f"{sample.begun - record.returned_at:.3f}s later")
                    queued.discard(child)
                    break
    return violations


def terminal_parent_with_active_child(outcome: Outcome) -> list[str]:
    """5: in every sample (one SELECT, one snapshot) and every read after a stop."""
    violations: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    snapshots = [(f"sample at {s.begun - outcome.began:.3f}s", s.executions) for s in every_sample(outcome)]
    snapshots += [(f"read after {r.label}", {row["id"]: row for row in r.rows}) for r in acknowledged(outcome)]
    for where, rows in snapshots:
        for row in rows.values():
            parent = rows.get(row["parent_id"])
            if parent is None or row["status"] not in ACTIVE or parent["status"] not in TERMINAL:
                continue
            if abandons(parent) and row["status"] == "RUNNING":
                continue  # a non-cascading stop lets its running children run on
            key = (parent["id"], row["id"], row["status"])
            if key not in seen:
                seen.add(key)
                violations.append(f"{where}: parent {short(parent['id'])} is {parent['status']} while child "
                                  f"{short(row['id'])} is {row['status']}")
    return violations


def terminal_row_changed(outcome: Outcome) -> list[str]:
    """4: once terminal, the same (status, started_at, ended_at) in every later sample."""
    violations = []
    first: dict[tuple[str, Any], tuple[float, tuple]] = {}
    for sample in every_sample(outcome):
        for table, rows in (("execution", sample.executions), ("node", sample.nodes)):
            for key, row in rows.items():
                state = (row["status"], str(row["started_at"]), str(row["ended_at"]))
                if (table, key) in first:
                    at, was = first[(table, key)]
                    if state != was:
                        name = short(key if table == "execution" else row["graph_execution_id"])
                        name += "" if table == "execution" else f".{row['node_id']}"
                        violations.append(f"{table} {name} was {was} at {at - outcome.began:.3f}s, "
                                          f"then {state} at {sample.begun - outcome.began:.3f}s")
                        first[(table, key)] = (sample.begun, state)
                elif row["status"] in TERMINAL:
                    first[(table, key)] = (sample.begun, state)
    return violations


def started_after_ack(outcome: Outcome) -> list[str]:
    """6: after a stop returned, what it answers for keeps the same nodes (same started_at) and children."""
    violations = []
    for record in acknowledged(outcome):
        ids = stopped_ids(record)
        known = {r["id"] for r in record.rows}
        nodes = {n["id"]: str(n["started_at"]) for n in record.nodes if n["graph_execution_id"] in ids}
        for sample in every_sample(outcome):
            if sample.begun < record.returned_at:
                continue
            now = {k: str(n["started_at"]) for k, n in sample.nodes.items() if n["graph_execution_id"] in ids}
            new_children = sorted(short(i) for i, r in sample.executions.items()
                                  if r["parent_id"] in ids and i not in known)
            if now != nodes or new_children:
                added = sorted(f"{short(n['graph_execution_id'])}.{n['node_id']}" for k, n in sample.nodes.items()
                               if k in now and now[k] != nodes.get(k))
                violations.append(f"{describe(record)}: {sample.begun - record.returned_at:.3f}s after it "
                                  f"returned, nodes started or restarted {added}, new children {new_children}")
                break
    return violations


def active_after_close(outcome: Outcome) -> list[str]:
    """7: rt.close() stops everything: no row of the example is QUEUED or RUNNING."""
    if outcome.final is None:
        return ["no read after rt.close()"]
    executions = sorted(f"{short(i)}={r['status']}" for i, r in outcome.final.executions.items()
                        if r["status"] in ACTIVE)
    nodes = sorted(f"{short(n['graph_execution_id'])}.{n['node_id']}={n['status']}"
                   for n in outcome.final.nodes.values() if n["status"] in ACTIVE)
    return [f"executions {executions}, nodes {nodes}"] if executions or nodes else []


def stop_too_slow(outcome: Outcome, slack_of: Callable[[StopRecord], float] = lambda record: SLACK) -> list[str]:
    """2: a stop returns within wait_timeout + SLACK; one that never returned counts too.

    A stop that arrives while another is in progress gets that stop's ack
    (README: the stop protocol), so it may wait for that stop's deadline:
    its bound is the largest wait_timeout of the stops under way when it
    was sent (any target, to stay on the safe side). A failure in progress
    gives no such allowance: a stop must not wait for a failure's deadline.
    """
    violations = []
    for record in outcome.records:
        if record.harness_error is not None:
            continue
        if record.returned_at is None:
            violations.append(f"{describe(record)} had not returned when the example ended")
            continue
        under_way = [other for other in outcome.records if other is not record
                     and other.sent_at <= record.sent_at + SKEW
                     and (other.returned_at is None or other.returned_at > record.sent_at)]
        wait_timeout = max([record.wait_timeout] + [other.wait_timeout for other in under_way])
        if record.duration > wait_timeout + slack_of(record):
            others = f" (stops under way: {[o.label for o in under_way]})" if under_way else ""
            violations.append(f"{describe(record)} took {record.duration:.3f}s{others}")
    return violations


def started_after_promise(outcome: Outcome) -> list[str]:
    """6: a stop that raised its promise had halted its subtree: nothing in it started after it raised.

    Read after rt.close(): rows whose writes waited out the outage are in by then.
    """
    if outcome.final is None:
        return []
    executions, nodes = outcome.final.executions, outcome.final.nodes
    violations = []
    for record in outcome.records:
        if record.error is None or PROMISE not in str(record.error) or record.returned_wall is None:
            continue
        ids = {record.target}
        if record.cascade:
            grew = True
            while grew:
                more = {i for i, row in executions.items() if row["parent_id"] in ids} - ids
                ids |= more
                grew = bool(more)
        late = sorted(short(i) for i in ids if i in executions
                      and (as_datetime(executions[i]["started_at"]) or record.returned_wall) > record.returned_wall)
        late += sorted(f"{short(n['graph_execution_id'])}.{n['node_id']}" for n in nodes.values()
                       if n["graph_execution_id"] in ids
                       and (as_datetime(n["started_at"]) or record.returned_wall) > record.returned_wall)
        if late:
            violations.append(f"{describe(record)} raised, and then {late} started")
    return violations


def ack_without_execution(outcome: Outcome) -> list[str]:
    """3: ack.execution_id is the stopped id, and the id is in terminated or already_final."""
    violations = []
    for record in acknowledged(outcome):
        ack = record.ack
        status = {r["id"]: r["status"] for r in record.rows}.get(record.target)
        if ack.execution_id != record.target or record.target not in ack.terminated + ack.already_final:
            violations.append(f"{describe(record)}: {ack!r} (its row: {status})")
    return violations


def stop_raised(outcome: Outcome, excused: Callable[[StopRecord], bool] = lambda record: False) -> list[str]:
    """3: every stop of an existing execution of one's own returns an ack (or raises, where ``excused``)."""
    return [f"{describe(record)} raised {record.error!r}" for record in outcome.records
            if record.error is not None and not excused(record)]
