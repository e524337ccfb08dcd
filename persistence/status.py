"""The execution status machine, shared by memory and SQL.

    QUEUED  -> RUNNING | TERMINATED | FAILED
    RUNNING -> COMPLETED | FAILED | TERMINATED
    COMPLETED, FAILED, TERMINATED: terminal, never change again.

The enum's values are the strings stored in the database, and every status
write names the statuses it may leave (``UPDATE ... WHERE status IN (...)``),
taken from ``TRANSITIONS`` below, so the table is the single source of truth.
"""
from __future__ import annotations

import enum


class ExecutionStatus(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TERMINATED = "TERMINATED"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TRANSITIONS: dict[ExecutionStatus, frozenset[ExecutionStatus]] = {
    ExecutionStatus.QUEUED: frozenset(
        {ExecutionStatus.RUNNING, ExecutionStatus.TERMINATED, ExecutionStatus.FAILED}
    ),
    ExecutionStatus.RUNNING: frozenset(
        {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.TERMINATED}
    ),
    ExecutionStatus.COMPLETED: frozenset(),
    ExecutionStatus.FAILED: frozenset(),
    ExecutionStatus.TERMINATED: frozenset(),
}

TERMINAL = frozenset(status for status, targets in TRANSITIONS.items() if not targets)
ACTIVE = frozenset(ExecutionStatus) - TERMINAL


def can_transition(current: ExecutionStatus | str, target: ExecutionStatus | str) -> bool:
    """Whether ``current -> target`` is allowed by the status machine."""
    return ExecutionStatus(target) in TRANSITIONS[ExecutionStatus(current)]


def sources_of(target: ExecutionStatus) -> tuple[ExecutionStatus, ...]:
    """The statuses a row may be in for a write that moves it to ``target``."""
    return tuple(sorted(s for s, targets in TRANSITIONS.items() if target in targets))
