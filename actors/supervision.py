"""The stop protocol: how an execution ends while work is still running under it.

An ``Ending`` belongs to one execution actor and is read and written only in
that actor's turns; it has no lock, because no other thread touches it. It
is created when a stop arrives (final status TERMINATED) or a node fails
(final status FAILED). From then on nothing new starts under the execution,
and the ending waits for two things: its own running nodes, and every child
it sent a ``CascadeStop``.

Everything reaches it as a message in the actor's mailbox: a node's end, a
child's ``ChildWriteQueued`` and ``ChildEnded``, the timer's
``DeadlinePassed``, the writer's ``FinalCommitted``. Nothing recurses per
level of the tree: a chain of a thousand executions is a thousand turns.

A child counts as done once its final write is *queued*. The writer's queue
is FIFO and committed in order, so our write, submitted after it, commits in
the same transaction or a later one; it is also declared to depend on it,
so if the child's write fails ours fails too. No reader can ever see us
terminal while a child is not, and a whole subtree's writes go into one or a
few transactions instead of one commit per level. We acknowledge only after
our own commit *and* every such child's ``ChildEnded``, whose ack we fold
into ours.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from actors.messages import AckTree, ChildEnded, StopAck
from persistence import ExecutionStatus, MoveExecutions, MoveNodes, Operation, Promise, TerminateSubtree, utcnow

# After the deadline, how long a parent waits before it looks at children
# that have not said their write is queued. One whose actor stopped without
# a word is written (with its subtree) by the parent at once. A live one is
# still working its way through its subtree: a cascade through thousands of
# executions takes longer than a second, and a wait_timeout of 0 starts the
# clock at once. It gets twice as long again each time (1, 3, 7 s after the
# deadline), and is written by the parent only CHILD_GRACE_LIMIT after it.
CHILD_GRACE = 1.0
CHILD_GRACE_LIMIT = 7.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinalWrite:
    """What an ending submits once nothing is pending: its ops and their dependencies."""

    ops: tuple[Operation, ...]
    after: tuple[Promise[Any], ...]


class Ending:
    """One execution's way to its final status, with its children and nodes.

    Its sets of ids are dicts (``dict[str, None]``): an ending lives from
    the stop until the final commit, so everything it holds survives the
    young collections of the garbage collector and counts towards the next
    full one, which walks every live object. A dict that holds only
    strings is not tracked by the collector; a set always is, even empty.
    A leaf's ending is then one tracked object instead of ten (with the
    other changes of 4d7c091, the collector's share of an 11,111-execution
    stop went from 0.7-1.1 s to 0.4-0.55 s; see the README).
    """

    def __init__(self, execution_id: str, *, status: ExecutionStatus, reason: str,
                 deadline: float, error: str | None = None, cascade: bool = True) -> None:
        self.execution_id = execution_id
        self.status = status
        self.reason = reason
        self.deadline = deadline
        self.error = error
        # False for a stop that does not cascade: started children run on.
        self.cascade = cascade
        # The StopAck's promise, made only if a Stop is asked of this
        # execution (``asked``; see ``result``): a cascade's children answer
        # their parent with an AckTree instead.
        self._result: Promise[StopAck] | None = None
        self.asked = False
        self.acknowledged = False
        self.pending_nodes: dict[str, None] = {}
        self.pending_children: dict[str, None] = {}
        # Child id -> its queued final write (ours follows it), then -> its ack.
        self._child_writes: dict[str, Promise[Any]] = {}
        self._awaited_acks: dict[str, None] = {}
        self._acks: dict[str, AckTree] = {}
        self._already_final: dict[str, None] = {}
        self._forced_nodes: dict[str, None] = {}
        self._forced_children: tuple[str, ...] = ()
        self.submitted = False
        self._results: tuple[Any, ...] | None = None
        # The armed timer (a TimerHandle), so that a tighter deadline can replace it.
        self.timer: Any = None
        # The deadline whose passing we told our pending children, and
        # whose grace timer is armed: each deadline is passed on once.
        self.graced_deadline: float | None = None

    @property
    def result(self) -> Promise[StopAck]:
        """Resolved with the StopAck once the final write committed and every
        child whose write ours followed has told us its ack."""
        if self._result is None:
            self._result = Promise()
        return self._result

    # -- what is pending -----------------------------------------------------

    def wait_for(self, running_nodes: Iterable[str], live_children: Iterable[str]) -> None:
        self.pending_nodes.update(dict.fromkeys(running_nodes))
        self.pending_children.update(dict.fromkeys(live_children))

    def child_already_final(self, child_id: str) -> None:
        self._already_final[child_id] = None

    def child_write_queued(self, child_id: str, write: Promise[Any]) -> None:
        """The child's final write is queued: ours may follow it; we still want its ack."""
        if self.submitted or child_id in self._awaited_acks or child_id in self._forced_children:
            return
        self.pending_children.pop(child_id, None)
        self._child_writes[child_id] = write
        self._awaited_acks[child_id] = None

    def child_ended(self, message: ChildEnded) -> None:
        self.pending_children.pop(message.child_id, None)
        self._awaited_acks.pop(message.child_id, None)
        self._acks[message.child_id] = message.ack

    def child_gone(self, child_id: str) -> None:
        """A child that will never report (its row was never written, or it runs on)."""
        self.pending_children.pop(child_id, None)
        self._awaited_acks.pop(child_id, None)

    def node_ended(self, node_id: str) -> None:
        self.pending_nodes.pop(node_id, None)

    def ready_to_submit(self) -> bool:
        return not self.submitted and not self.pending_nodes and not self.pending_children

    # -- the deadline --------------------------------------------------------

    def force_nodes(self) -> None:
        """At the deadline: own work still running is terminated anyway (listed in ``forced``)."""
        self._forced_nodes.update(self.pending_nodes)
        self.pending_nodes.clear()

    def force_children(self, child_ids: Iterable[str]) -> None:
        """After the grace: these silent children get their whole subtree written by us."""
        forced = tuple(child_ids)
        for child_id in forced:
            self.pending_children.pop(child_id, None)
            self._awaited_acks.pop(child_id, None)
        self._forced_children += forced

    # -- the final write -----------------------------------------------------

    def final_write(self) -> FinalWrite:
        self.submitted = True
        now = utcnow()
        forced = bool(self._forced_nodes or self._forced_children)
        ops: list[Operation] = [
            TerminateSubtree(execution_id=child_id, reason=self.reason, at=now, forced=True)
            for child_id in self._forced_children
        ]
        # Own nodes first, then own row: a reader never sees this execution
        # terminal while one of its nodes still reads RUNNING.
        ops.append(MoveNodes(execution_id=self.execution_id, node_ids=None,
                             target=ExecutionStatus.TERMINATED, at=now))
        ops.append(MoveExecutions(
            ids=(self.execution_id,), target=self.status, at=now, error=self.error,
            stop_reason=self.reason if self.status is ExecutionStatus.TERMINATED else None,
            stop_forced=forced))
        return FinalWrite(ops=tuple(ops), after=tuple(self._child_writes.values()))

    def committed(self, results: tuple[Any, ...]) -> None:
        self._results = results

    @property
    def persisted(self) -> bool:
        """Whether our own row moved in the final write (False: it was already terminal)."""
        return bool(self._results and self._results[-1])

    def ready_to_acknowledge(self) -> bool:
        return self._results is not None and not self._awaited_acks and not self.acknowledged

    def acknowledgement(self) -> AckTree:
        """Our own part (our row, the subtrees we wrote ourselves) and the children's, by reference."""
        assert self._results is not None
        self.acknowledged = True
        forced_moved = tuple(i for moved in self._results[:len(self._forced_children)] for i in moved)
        if self.persisted and self.status is ExecutionStatus.TERMINATED:
            own = (self.execution_id,)
            return AckTree(terminated=own + forced_moved, already_final=tuple(self._already_final),
                           forced=(own if self._forced_nodes else ()) + forced_moved,
                           children=tuple(self._acks.values()))
        # Ended otherwise: FAILED by a failure this stop met, or already terminal.
        return AckTree(terminated=forced_moved, already_final=(self.execution_id, *self._already_final),
                       forced=forced_moved, children=tuple(self._acks.values()))
