"""The stop protocol: how an execution ends while work is still running under it.

An ``Ending`` is created in the execution actor's turn when a stop arrives
(final status TERMINATED) or a node fails (final status FAILED). From then
on nothing new starts under the execution, and the ending waits for two
things: its own running nodes, and every child it sent a ``CascadeStop``.

A child counts as done as soon as its own final write is *queued* with the
writer. The writer's queue is FIFO and committed in order, so our write,
submitted after it, can only commit in the same transaction or a later
one; it is also declared to depend on it, so if the child's write fails
ours fails too. No reader can
ever see us terminal while a child is not, and nobody is acknowledged before
the commit that holds their row: the acknowledgement is sent from the
writer's commit callback. What this buys: a whole subtree's writes go into
one or a few transactions instead of one commit per level.

Reports may come from any thread: a node in the actor's turn, a child's
write in the child's turn or on the committing thread, the deadline on the
timer thread. The last one submits our write. No thread ever blocks on another.
"""
from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable

from actors.messages import CascadeStop, StopAck
from persistence import ExecutionStatus, MoveExecutions, MoveNodes, Promise, TerminateSubtree, utcnow

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
        self.result: Promise[StopAck] = Promise()
        self._lock = threading.Lock()
        self._pending_nodes: set[str] = set()
        self._pending_children: set[str] = set()
        self._child_writes: list[Promise] = []
        self._acks: list[StopAck] = []
        self._already_final: list[str] = []
        self._forced_nodes: set[str] = set()
        self._forced_children: tuple[str, ...] = ()
        self._submitted = False
        self._write: Promise | None = None
        self._write_listeners: list[Callable[[Promise], None]] = []
        self._deadline_timer: Any = None

    # -- in the actor's turn ----------------------------------------------

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
                on_queued=functools.partial(self.child_queued, child_id),
                on_ack=functools.partial(self.child_acked, child_id)))
        with self._lock:
            if self._submitted:
                return  # every child reported while we were still sending
            if not self._claim_submission():
                # Deeper executions are forced first when deadlines coincide.
                self._deadline_timer = actor.host.timers.call_at(
                    self.deadline, self.deadline_passed, priority=actor.identity.depth)
                return
        self._submit()

    def node_ended(self, node_id: str) -> None:
        with self._lock:
            self._pending_nodes.discard(node_id)
            if not self._claim_submission():
                return
        self._submit()

    @property
    def write_queued(self) -> bool:
        return self._write is not None

    def on_write_queued(self, listener: Callable[[Promise], None]) -> None:
        """Call ``listener`` with our final write's future once it is queued (at once if it is)."""
        with self._lock:
            if self._write is None:
                self._write_listeners.append(listener)
                return
        listener(self._write)

    # -- on any thread -----------------------------------------------------

    def child_queued(self, child_id: str, write: Promise) -> None:
        """A child's final write is queued: ours may follow it."""
        with self._lock:
            if child_id not in self._pending_children:
                return
            self._pending_children.discard(child_id)
            self._child_writes.append(write)
            if not self._claim_submission():
                return
        self._submit()

    def child_acked(self, child_id: str, ack: StopAck) -> None:
        """A child's report, after its commit (for an already final child, its only signal)."""
        with self._lock:
            self._acks.append(ack)
            if child_id not in self._pending_children:
                return
            self._pending_children.discard(child_id)
            if not self._claim_submission():
                return
        self._submit()

    def deadline_passed(self) -> None:
        """Own work still running is terminated anyway (listed in ``forced``).

        Children share this deadline and force their own work at the same
        instant (deepest first); they get ``CHILD_GRACE`` more to report. A
        child silent after that has its whole subtree written TERMINATED by us.
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

    def _claim_submission(self) -> bool:
        """Under the lock: True exactly once, when nothing is pending any more."""
        if self._submitted or self._pending_nodes or self._pending_children:
            return False
        self._submitted = True
        return True

    def _submit(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
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
        write = actor.host.store.submit(*ops, after=self._child_writes)
        with self._lock:
            self._write = write
            listeners, self._write_listeners = self._write_listeners, []
        for listener in listeners:
            listener(write)
        write.add_done_callback(self._committed)

    def _committed(self, write: Promise) -> None:
        """On the committing thread, right after the commit: acknowledge, then let the actor go.

        Children's writes were queued before ours, so their acknowledgements
        (run from the same or an earlier commit) are already in ``_acks``.
        """
        error = write.exception()
        if error is not None:
            self.actor.ending_failed(self, error)
            self.result.set_exception(error)
            return
        results = write.result()
        forced_moved = [i for moved in results[:len(self._forced_children)] for i in moved]
        own_moved = bool(results[-1])
        own_id = self.actor.identity.execution_id
        with self._lock:
            acks = list(self._acks)
        terminated = [i for ack in acks for i in ack.terminated] + forced_moved
        already_final = self._already_final + [i for ack in acks for i in ack.already_final]
        forced = [i for ack in acks for i in ack.forced] + forced_moved
        if own_moved and self.status is ExecutionStatus.TERMINATED:
            terminated.insert(0, own_id)
            if self._forced_nodes:
                forced.insert(0, own_id)
        elif not own_moved:
            already_final.insert(0, own_id)
        # Acknowledge first (this may run the parent's acknowledgement too),
        # then let the actor go: its teardown is not on the way up.
        # A child forced at the deadline may still report before our commit:
        # each id is listed once.
        self.result.set_result(StopAck(
            execution_id=own_id, terminated=tuple(dict.fromkeys(terminated)),
            already_final=tuple(dict.fromkeys(already_final)), forced=tuple(dict.fromkeys(forced))))
        self.actor.ended(self.status, error=self.error, stop_reason=self.reason, persisted=own_moved)
