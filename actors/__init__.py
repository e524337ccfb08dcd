"""actorgraph: graph executions as pykka actors, with a cascading Stop that is
persisted before it is acknowledged.

Everything a user may touch is listed here; the rest is internal.
"""
from actors.blocks import BlockContext
from actors.client import Client
from actors.errors import InvalidGraph, InvalidInput, StopTimeout
from actors.graphs import validate_graphs
from actors.messages import StatusChanged, Stop, StopAck
from actors.reader import Reader
from actors.remote import stop_execution
from actors.runtime import Runtime
from persistence import (
    ActorGraphError,
    DatabaseError,
    ExecutionRecord,
    ExecutionStatus,
    LeaseLost,
    NotFound,
    PermissionDenied,
)

__all__ = [
    # Runtime
    "Runtime",
    "Client",
    "Reader",
    "stop_execution",
    "BlockContext",
    "validate_graphs",
    # Records and statuses
    "ExecutionRecord",
    "ExecutionStatus",
    # Messages
    "Stop",
    "StopAck",
    "StatusChanged",
    # Errors
    "ActorGraphError",
    "NotFound",
    "PermissionDenied",
    "InvalidGraph",
    "InvalidInput",
    "StopTimeout",
    "DatabaseError",
    "LeaseLost",
]
