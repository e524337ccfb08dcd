"""Messages between actors: frozen, keyword-only dataclasses.

``Stop`` and ``StopAck`` are public: any holder of an execution's ActorRef
may ``ask(Stop(...))`` and gets a ``StopAck``. The rest are internal.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from persistence import ExecutionStatus


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stop:
    """Ask an execution (and, with ``cascade``, its whole subtree) to end TERMINATED.

    Attributes:
        user_id: who asks; must own the execution, else PermissionDenied.
        cascade: stop every descendant too; False ends only this execution and
            lets its running children finish on their own.
        reason: stored in ``stop_reason``.
        wait_timeout: seconds the whole tree has to wind down before running
            work is terminated anyway (listed in ``StopAck.forced``).
    """

    user_id: str
    cascade: bool = True
    reason: str = "stopped by user"
    wait_timeout: float = 15.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopAck:
    """The answer to a ``Stop``, sent only after every write it reports was committed.

    Attributes:
        execution_id: the execution the stop was sent to.
        terminated: executions of the subtree this stop moved to TERMINATED.
        already_final: executions it found terminal and left alone.
        forced: executions whose running work did not end before the deadline
            and that were terminated anyway (their late results are discarded).
    """

    execution_id: str
    terminated: tuple[str, ...] = ()
    already_final: tuple[str, ...] = ()
    forced: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class CascadeStop:
    """A stop travelling down the supervision tree (parent to child).

    Attributes:
        reason: the stop reason of the stop that started the cascade.
        deadline: ``time.monotonic()`` by which the whole tree must be terminal.
        on_ack: called with the child's ``StopAck`` once its writes committed.
        on_queued: called with the future of the child's final write as soon
            as it is queued; the parent's own write may follow it at once.
        queued_only: True for a non-cascading stop: only a child that has not
            started yet ends, so that nothing starts under a stopped parent.
    """

    reason: str
    deadline: float
    on_ack: Callable[[StopAck], None]
    on_queued: Callable[[Any], None] | None = None
    queued_only: bool = False


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
class ChildEnded:
    """A child execution reached a terminal status on its own (committed)."""

    child_id: str
    status: ExecutionStatus
    outputs: dict[str, Any] | None
    error: str | None
    stop_reason: str | None


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
class RetryStop:
    """The final write of ``ending`` failed: a later stop may start over."""

    ending: Any
