"""Messages between actors: frozen, keyword-only dataclasses.

``Stop`` and ``StopAck`` are public: any holder of an execution's ActorRef
may ``ask(Stop(...))`` and gets a ``StopAck``. The rest are internal. They
carry data only: the way down the supervision tree (``CascadeStop``) and the
way back up (``ChildWriteQueued``, ``ChildEnded``, ``ChildContinues``) are
messages into the other actor's mailbox, never callbacks into its code.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from actors.errors import InvalidInput
from persistence import ExecutionStatus, Promise


# A stop's wait_timeout when none is given (a request written before schema
# version 5 carries none either).
DEFAULT_WAIT_TIMEOUT = 15.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stop:
    """Ask an execution (and, with ``cascade``, its whole subtree) to end TERMINATED.

    Attributes:
        user_id: who asks; must own the execution, else PermissionDenied.
        cascade: stop every descendant too; False ends only this execution and
            lets its running children finish on their own.
        reason: stored in ``stop_reason``.
        wait_timeout: seconds the whole tree has to wind down before running
            work is terminated anyway (listed in ``StopAck.forced``); 0 forces
            everything at once.
    """

    user_id: str
    cascade: bool = True
    reason: str = "stopped by user"
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT


def check_wait_timeout(wait_timeout: object, name: str = "wait_timeout") -> None:
    """A finite number of seconds >= 0 (0: force everything at once), else InvalidInput naming ``name``."""
    if (not isinstance(wait_timeout, (int, float)) or isinstance(wait_timeout, bool)
            or not 0 <= wait_timeout < float("inf")):
        raise InvalidInput(f"{name} must be a number of seconds >= 0, not {wait_timeout!r}")


def check_stop(wait_timeout: object, cascade: object, reason: object) -> None:
    """What a stop is asked with, checked before anything changes; else InvalidInput.

    ``cascade`` must be a real bool: ``cascade="no"`` would otherwise read as
    True and stop the whole subtree.
    """
    check_wait_timeout(wait_timeout)
    if not isinstance(cascade, bool):
        raise InvalidInput(f"cascade must be True or False, not {cascade!r}")
    if not isinstance(reason, str):
        raise InvalidInput(f"reason must be a string, not {reason!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopAck:
    """The answer to a ``Stop``, sent only after every write it reports was committed.

    Attributes:
        execution_id: the execution the stop was sent to; it is always listed
            in ``terminated`` or in ``already_final``.
        terminated: executions of the subtree this stop moved to TERMINATED.
        already_final: executions it found terminal, or that ended otherwise
            (completed, or failed by a concurrent failure), and left alone.
        forced: executions whose running work did not end before the deadline
            and that were terminated anyway (their late results are discarded).
    """

    execution_id: str
    terminated: tuple[str, ...] = ()
    already_final: tuple[str, ...] = ()
    forced: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class AckTree:
    """What one execution's end did to its subtree, its children's parts held by reference.

    A parent folds its children's trees into its own in O(children), not
    O(subtree): the ids are flattened into a ``StopAck`` once, by whoever
    was asked the ``Stop``, with a loop (no recursion, whatever the depth).
    """

    terminated: tuple[str, ...] = ()
    already_final: tuple[str, ...] = ()
    forced: tuple[str, ...] = ()
    children: tuple["AckTree", ...] = ()

    def flatten(self, execution_id: str) -> StopAck:
        """The ``StopAck``: each id once, parents before their children."""
        terminated: dict[str, None] = {}
        already_final: dict[str, None] = {}
        forced: dict[str, None] = {}
        stack = [self]
        while stack:
            part = stack.pop()
            terminated.update(dict.fromkeys(part.terminated))
            already_final.update(dict.fromkeys(part.already_final))
            forced.update(dict.fromkeys(part.forced))
            stack.extend(reversed(part.children))
        return StopAck(execution_id=execution_id, terminated=tuple(terminated),
                       already_final=tuple(already_final), forced=tuple(forced))


# -- down the tree -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CascadeStop:
    """A stop travelling down the supervision tree (parent to child).

    The child answers with ``ChildWriteQueued`` then ``ChildEnded``, as every
    child does when it ends, or with ``ChildContinues`` when ``queued_only``
    leaves it running.

    Attributes:
        reason: the stop reason of the stop that started the cascade.
        deadline: ``time.monotonic()`` by which the whole tree must be terminal.
            A child already ending keeps the earlier of its deadline and this.
        queued_only: True for a non-cascading stop: only a child that has not
            started yet ends, so that nothing starts under a stopped parent.
    """

    reason: str
    deadline: float
    queued_only: bool = False


# -- up the tree ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChildWriteQueued:
    """A child's final write is queued with the writer (child to parent).

    A parent that is ending queues its own write after it, declared to depend
    on it: the writer's queue is FIFO, so the parent's row commits in the same
    transaction as the child's or a later one, and not at all if the child's
    failed.

    Attributes:
        child_id: the child.
        write: the future of the child's final write (resolved by the writer).
    """

    child_id: str
    write: Promise[Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChildEnded:
    """A child's terminal status is committed (child to parent).

    Attributes:
        child_id: the child.
        status: its terminal status.
        outputs: its outputs, when it completed.
        error: why it failed, when it did.
        stop_reason: why it was stopped, when it was.
        ack: what its end did to its own subtree, for the parent's ``StopAck``.
    """

    child_id: str
    status: ExecutionStatus
    outputs: dict[str, Any] | None
    error: str | None
    stop_reason: str | None
    ack: AckTree


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChildContinues:
    """A started child answers a non-cascading stop: it runs on to its own end."""

    child_id: str


# -- to oneself ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Begin:
    """The execution's row is committed: it may start its nodes."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeFinished:
    """A node running off the actor thread ended (outputs) or raised (error)."""

    node_id: str
    outputs: dict[str, Any] | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChildCommitted:
    """The writer committed (or failed to commit) a child's row."""

    child_id: str
    error: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class WriteFailed:
    """A write this execution submitted without waiting failed: the execution fails."""

    error: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinalCommitted:
    """The writer's answer to this execution's final write.

    Attributes:
        results: the results of its operations, in order, when it committed.
        error: why it was not written, when it was not.
    """

    results: tuple[Any, ...] = ()
    error: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SalvageCommitted(FinalCommitted):
    """The writer's answer to the write that ends a broken execution FAILED (see ExecutionActor._salvage).

    The same fields as ``FinalCommitted``; a type of its own, because a
    final write queued before the break may still answer with that one.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeadlinePassed:
    """The timer: the ending's deadline passed, or ``grace`` seconds more (see supervision.CHILD_GRACE)."""

    deadline: float
    grace: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForceSilent:
    """To itself: these children's actors stopped without a word; write them if they are still silent.

    Sent behind whatever is in the mailbox, so that a ``ChildEnded`` a child
    sent just before it stopped is handled first.
    """

    deadline: float
    child_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Halt:
    """To every live actor of a runtime that lost its lease: stop here, write nothing.

    Another process already ended these rows (see persistence.LeaseLost).
    """

    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatusChanged:
    """To a watcher (``Runtime.watch``): an execution's status changed, and the change is committed.

    ``at`` is when the row recorded the change (aware UTC).
    """

    execution_id: str
    parent_id: str | None
    root_id: str
    graph_id: str
    status: ExecutionStatus
    at: dt.datetime
    error: str | None
    stop_reason: str | None
