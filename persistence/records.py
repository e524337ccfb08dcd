"""What readers get back: frozen records, never live rows."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

from persistence.status import ExecutionStatus


@dataclasses.dataclass(frozen=True)
class ExecutionRecord:
    """One graph execution as committed in the database.

    Times are aware UTC datetimes; ``started_at`` stays None for an execution
    that never left QUEUED. ``stop_reason`` is set once a stop was requested.
    """

    id: str
    graph_id: str
    user_id: str
    status: ExecutionStatus
    parent_id: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    inputs: dict[str, Any]
    outputs: dict[str, Any] | None
    error: str | None
    stop_reason: str | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, times in ISO-8601."""
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        for key in ("created_at", "started_at", "ended_at"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        return data


@dataclasses.dataclass(frozen=True)
class StopRequest:
    """A pending stop request on an execution that a runtime hosts (``Store.pending_stops``).

    ``wait_timeout`` is None for a request written before schema version 5,
    which did not record it.
    """

    execution_id: str
    user_id: str
    cascade: bool
    reason: str
    wait_timeout: float | None


@dataclasses.dataclass(frozen=True)
class NodeRecord:
    """One node of a graph execution, as committed."""

    graph_execution_id: str
    node_id: str
    block: str
    status: ExecutionStatus
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    error: str | None


def dumps(value: Any) -> str:
    """JSON for a column; refuses what JSON cannot hold, naming the culprit."""
    return json.dumps(value, sort_keys=True, default=_refuse)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be stored as JSON")
