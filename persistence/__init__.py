"""actorgraph's persistence layer: every line of SQL lives below this package.

It never imports ``actors``: the runtime depends on the store, not the reverse.
"""
from persistence.database import default_url, is_postgresql, redact, require_existing
from persistence.dialect import utcnow
from persistence.promise import Promise
from persistence.errors import (
    ActorGraphError,
    DatabaseError,
    LeaseLost,
    NotFound,
    PermissionDenied,
    TransitionRejected,
)
from persistence.records import ExecutionRecord, NodeRecord, StopRequest, dumps, loads
from persistence.schema import LATEST_VERSION, current_version
from persistence.status import ACTIVE, TERMINAL, TRANSITIONS, ExecutionStatus, can_transition, sources_of
from persistence.store import Store, forget_runtime, is_gone, pid_alive
from persistence.writes import (
    ClaimedRoot,
    ClaimRoots,
    Heartbeat,
    InsertExecution,
    InsertNodes,
    MoveExecutions,
    MoveNodes,
    NodeRow,
    Operation,
    RegisterRuntime,
    RequestStop,
    StoreGraphVersions,
    TerminateSubtree,
    TerminateUnclaimed,
    UnregisterRuntime,
    WakeWorkers,
)

__all__ = [
    # Status machine
    "ExecutionStatus", "TRANSITIONS", "TERMINAL", "ACTIVE", "can_transition", "sources_of",
    # Records
    "ExecutionRecord", "NodeRecord", "StopRequest", "dumps", "loads",
    # The store and its write operations
    "Store", "Promise", "Operation", "InsertExecution", "MoveExecutions", "InsertNodes", "NodeRow", "MoveNodes",
    "RequestStop", "TerminateSubtree", "RegisterRuntime", "Heartbeat", "UnregisterRuntime",
    # Graph versions, submitted roots and worker claims
    "StoreGraphVersions", "WakeWorkers", "ClaimRoots", "ClaimedRoot", "TerminateUnclaimed",
    "LATEST_VERSION", "current_version", "default_url", "is_postgresql", "redact", "utcnow", "is_gone", "pid_alive",
    "forget_runtime", "require_existing",
    # Errors
    "ActorGraphError", "NotFound", "PermissionDenied", "DatabaseError", "LeaseLost", "TransitionRejected",
]
