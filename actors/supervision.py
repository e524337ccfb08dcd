"""The stop protocol: how an execution ends while work is still running under it.

An ``Ending`` is created on the execution's actor thread when a stop arrives
(final status TERMINATED) or a node fails (final status FAILED). From then
on nothing new starts under the execution, and the ending waits for two
things: its own running nodes, and the acknowledgement of every child it
sent a ``CascadeStop``. Each of those may report on any thread: a node on
the actor thread, a child's acknowledgement on the writer thread (right
after the child's commit), the deadline on the timer thread. The last one to
report submits the execution's own write; its commit resolves ``result``,
which is the acknowledgement the parent (or the caller of ``Stop``) hears.

So the order is always: children terminal and committed, then this row,
then the acknowledgement. No thread ever blocks waiting for another.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any, Iterable

from actors.messages import CascadeStop, StopAck
from persistence import ExecutionStatus, MoveExecutions, MoveNodes, TerminateSubtree, utcnow

if TYPE_CHECKING:
    from actors.execution import ExecutionActor

# After the deadline, how long a parent still waits for children that are
# forcing their own work before it writes their subtrees itself.
CHILD_GRACE = 1.0


class Ending:
    """One execution's way to its final status, with its children and nodes."""

    def __init__(self, actor: "ExecutionActor", *, status: ExecutionStatus, reason: str,
                 deadline: float, error: str | None = None) -> None:
        self.actor = actor
        self.status = status
        self.reason = reason
        self.deadline = deadline
        self.error = error
        # Resolved with the StopAck after the final write committed.
        self.result: concurrent.futures.Future[StopAck] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._pending_nodes: set[str] = set()
        self._pending_children: set[str] = set()
        self._acks: list[StopAck] = []
        self._already_final: list[str] = []
        self._forced_nodes: set[str] = set()
        self._forced_children: tuple[str, ...] = ()
        self._submitted = False
        self._deadline_timer: Any = None

    # -- on the actor thread ----------------------------------------------

    def begin(self, running_nodes: Iterable[str], live_children: Iterable[str],
              ended_children: Iterable[str], queued_only: bool = False) -> None:
        """Signal the nodes, send the cascade, arm the deadline.

        Called after the stop request was persisted and the spawn gate closed
        (the actor set ``halted`` and will start nothing more).
        """
        actor = self.actor
        self._already_final.extend(ended_children)
        self._pending_nodes.update(running_nodes)
        self._pending_children.update(live_children)
        for node_id in list(self._pending_nodes):
            if actor.interrupt_node(node_id):
                self._pending_nodes.discard(node_id)
        # All children at once, with the one deadline of the whole tree: the
        # stop takes at most wait_timeout, never depth x wait_timeout.
        for child_id in list(self._pending_children):
            actor.tell_child(child_id, CascadeStop(
                reason=self.reason, deadline=self.deadline, queued_only=queued_only,
                on_ack=lambda ack, child_id=child_id: self.child_acked(child_id, ack)))
        with self._lock:
            if self._submitted:
                return  # every child acknowledged while we were still sending
            if not self._ready_to_submit():
                # Deeper executions are forced first when deadlines coincide.
                self._deadline_timer = actor.host.timers.call_at(
                    self.deadline, self.deadline_passed, priority=actor.identity.depth)
                return
        self._submit()

    def node_ended(self, node_id: str) -> None:
        with self._lock:
            self._pending_nodes.discard(node_id)
            if not self._ready_to_submit():
                return
        self._submit()

    # -- on any thread -----------------------------------------------------

    def child_acked(self, child_id: str, ack: StopAck) -> None:
        with self._lock:
            if child_id not in self._pending_children:
                return  # forced at the deadline already; this late ack adds nothing
            self._pending_children.discard(child_id)
            self._acks.append(ack)
            if not self._ready_to_submit():
                return
        self._submit()

    def deadline_passed(self) -> None:
        """Own work still running is terminated anyway (listed in ``forced``).

        Children share this deadline and force their own work at the same
        instant (deepest first), then acknowledge; they get ``CHILD_GRACE``
        more to do so, so that their report reaches ours. A child silent
        after that has its whole subtree written TERMINATED by us.
        """
        with self._lock:
            if self._submitted:
                return
            self._forced_nodes = set(self._pending_nodes)
            self._pending_nodes.clear()
            if self._pending_children:
                self._deadline_timer = self.actor.host.timers.call_later(CHILD_GRACE, self.children_overdue)
                return
            self._submitted = True
        self._submit()

    def children_overdue(self) -> None:
        with self._lock:
            if self._submitted:
                return
            self._forced_children = tuple(self._pending_children)
            self._pending_children.clear()
            self._submitted = True
        self._submit()

    def _ready_to_submit(self) -> bool:
        """Called under the lock; flips ``_submitted`` exactly once."""
        if self._submitted or self._pending_nodes or self._pending_children:
            return False
        self._submitted = True
        return True

    def _submit(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._submitted = True
        actor = self.actor
        own_id = actor.identity.execution_id
        now = utcnow()
        forced = bool(self._forced_nodes or self._forced_children)
        ops: list[Any] = [
            TerminateSubtree(execution_id=child_id, reason=self.reason, at=now, forced=True)
            for child_id in self._forced_children
        ]
        # Own nodes first, then own row: a reader never sees this execution
        # terminal while one of its nodes still reads RUNNING.
        ops.append(MoveNodes(execution_id=own_id, node_ids=None, target=ExecutionStatus.TERMINATED, at=now))
        ops.append(MoveExecutions(
            ids=(own_id,), target=self.status, at=now, error=self.error,
            stop_reason=self.reason if self.status is ExecutionStatus.TERMINATED else None,
            stop_forced=forced))
        actor.host.store.submit(*ops).add_done_callback(self._committed)

    def _committed(self, write: concurrent.futures.Future) -> None:
        """On the writer thread, right after the commit: acknowledge, then let the actor go."""
        error = write.exception()
        if error is not None:
            self.actor.ending_failed(self, error)
            self.result.set_exception(error)
            return
        results = write.result()
        forced_moved = [i for moved in results[:len(self._forced_children)] for i in moved]
        own_moved = bool(results[-1])
        own_id = self.actor.identity.execution_id
        terminated = [i for ack in self._acks for i in ack.terminated] + forced_moved
        already_final = self._already_final + [i for ack in self._acks for i in ack.already_final]
        forced = [i for ack in self._acks for i in ack.forced] + forced_moved
        if own_moved and self.status is ExecutionStatus.TERMINATED:
            terminated.insert(0, own_id)
            if self._forced_nodes:
                forced.insert(0, own_id)
        elif not own_moved:
            already_final.insert(0, own_id)
        self.actor.ended(self.status, error=self.error, stop_reason=self.reason, persisted=own_moved)
        self.result.set_result(StopAck(
            execution_id=own_id, terminated=tuple(terminated),
            already_final=tuple(already_final), forced=tuple(dict.fromkeys(forced))))
