"""Leases and fencing (issue #9), with the partition made for real.

Worker A reaches the suite's own cluster through a proxy, worker B directly.
A runs a tree; the proxy cuts A off; B finds A's lease lapsed and recovers
A's executions (FAILED, naming A). When the path heals, A finds its lease
gone: it halts the tree here (a running block sees ``stop_event``), and
writes nothing for it, although one of its blocks finished meanwhile and
its completion was waiting to be written.
"""
from __future__ import annotations

import logging

import pytest

from actors import Client, Runtime
from tests.helpers import Gates, tree_state, wait_until
from tests.integration import graphs as g
from tests.integration.fault_fixtures import *  # noqa: F401,F403

# STALE_AFTER (15 s) + a recovery round (2 s) + slack for a 2-core machine.
RECOVERED_WITHIN = 30.0


@pytest.mark.timeout(120)
def test_a_partitioned_worker_is_recovered_elsewhere_and_writes_nothing_when_it_returns(
        pg_cluster, fault_db, proxy, scene, observe, caplog):
    gates = Gates()
    try:
        _partition_and_return(pg_cluster, fault_db, proxy, scene, observe, caplog, gates)
    finally:
        gates.open_all()  # no held block outlives the test


def _partition_and_return(pg_cluster, fault_db, proxy, scene, observe, caplog, gates: Gates) -> None:
    caplog.set_level(logging.WARNING)
    direct = pg_cluster.url(fault_db)
    client = Client(direct)
    scene.runtimes.append(client)
    gates.register(client)
    client.load(g.graphs(held=g.held(), parent=g.parent(a=("held", {"key": "a"}), b=("held", {"key": "b"}))))
    cut_off = Runtime(proxy.url_for(fault_db), worker=True)
    scene.runtimes.append(cut_off)
    gates.register(cut_off)
    # The recoverer has no `hold` block: it never claims this graph itself.
    recoverer = Runtime(direct, worker=True)
    scene.runtimes.append(recoverer)
    observer = observe(direct)

    root = client.submit("parent", user_id="u")
    wait_until(lambda: sorted(gates.started) == ["a", "b"], 30.0, "both held blocks running on the worker")
    rows = observer.subtree(root)
    assert {r["runtime_id"] for r in rows} == {cut_off.runtime_id} and len(rows) == 3

    proxy.cut()
    wait_until(lambda: {r["status"] for r in observer.subtree(root)} == {"FAILED"}, RECOVERED_WITHIN,
               "the other worker to recover the cut-off worker's tree")
    assert all(cut_off.runtime_id in (r["error"] or "") for r in observer.subtree(root))
    assert not observer.query("SELECT id FROM runtime WHERE id = ?", (cut_off.runtime_id,))
    recovered = tree_state(observer, root)
    # Block "a" finishes while its worker is cut off: its writes wait for the database.
    gates.open("a")
    wait_until(lambda: gates.outcomes.get("a") == "released", 10.0, "block a to finish")

    proxy.heal()
    wait_until(cut_off.lease_lost.is_set, 30.0, "the worker to find its lease lost")
    wait_until(lambda: cut_off.live_count == 0, 10.0, "the worker to halt its tree")
    wait_until(lambda: gates.outcomes.get("b") == "stopped", 10.0, "block b to see stop_event")
    assert tree_state(observer, root) == recovered, "the worker wrote for executions it lost"
    assert any("lost its lease" in r.getMessage() for r in caplog.records)
    assert any("halted here, nothing written" in r.getMessage() and root in r.getMessage()
               for r in caplog.records), "each halted execution logs it, with its ids"
    # The recoverer goes on working: a new root (of a graph it can run) completes on it.
    client.load(g.graphs(quick=g.quick()))
    later = client.submit("quick", user_id="u")
    wait_until(lambda: observer.status(later) == "COMPLETED", 30.0, "a new root on the healthy worker")
    assert observer.execution(later)["runtime_id"] == recoverer.runtime_id
