"""Ending: what a leaf's ending holds stays out of the garbage collector's way."""
from __future__ import annotations

import gc
import time

from actors.messages import AckTree, ChildEnded
from actors.supervision import Ending
from persistence import ExecutionStatus, Promise


def test_a_leaf_ending_holds_nothing_the_garbage_collector_tracks():
    # An ending lives from the stop to the final commit, long enough for its
    # objects to reach the collector's oldest generation; see Ending's doc.
    ending = Ending("leaf", status=ExecutionStatus.TERMINATED, reason="stopped",
                    deadline=time.monotonic() + 5)
    ending.wait_for(["sleep"], [])
    ending.node_ended("sleep")
    assert ending.ready_to_submit()
    containers = {name: value for name, value in vars(ending).items()
                  if isinstance(value, (dict, list, set, tuple))}
    assert "pending_nodes" in containers
    assert sorted(name for name, value in containers.items() if gc.is_tracked(value)) == []
    assert ending._result is None  # no Stop was asked of it: no promise either


def test_a_parent_ending_waits_for_its_childrens_writes_and_acks():
    ending = Ending("parent", status=ExecutionStatus.TERMINATED, reason="stopped",
                    deadline=time.monotonic() + 5)
    ending.wait_for([], ["a", "b"])
    ending.child_already_final("c")
    assert not ending.ready_to_submit()
    writes: dict[str, Promise[list[object]]] = {child: Promise() for child in ("a", "b")}
    for child, write in writes.items():
        ending.child_write_queued(child, write)
    assert ending.ready_to_submit()
    final = ending.final_write()
    assert final.after == (writes["a"], writes["b"])
    ending.committed(((), ("parent",)))
    assert not ending.ready_to_acknowledge()  # the children's acks are still due
    for child in ("b", "a"):
        ending.child_ended(ChildEnded(child_id=child, status=ExecutionStatus.TERMINATED, outputs=None,
                                      error=None, stop_reason="stopped",
                                      ack=AckTree(terminated=(child,))))
    assert ending.ready_to_acknowledge()
    ack = ending.acknowledgement().flatten("parent")
    assert ack.terminated == ("parent", "b", "a")
    assert ack.already_final == ("c",)
