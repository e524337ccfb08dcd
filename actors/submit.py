"""Submitting a root for the workers: one QUEUED row, no actor in the submitting process."""
from __future__ import annotations

import uuid
from typing import Any, Mapping

from actors.catalog import Catalog, check_submission
from actors.errors import InvalidInput
from persistence import ExecutionStatus, InsertExecution, Store, WakeWorkers, utcnow


def submit_root(store: Store, catalog: Catalog, graph_id: str, user_id: str,
                inputs: Mapping[str, Any] | None) -> str:
    """Insert a QUEUED root of ``graph_id``'s loaded version, owned by no runtime; return its id.

    Everything is checked before the one write: the database (a worker needs
    PostgreSQL), the graph, the user and the inputs. The row and the NOTIFY
    that wakes the workers commit together.
    """
    if store.dialect != "postgresql":
        raise InvalidInput("submit needs PostgreSQL: workers claim submitted roots through it; "
                           "on SQLite, run the graph in this process with Runtime.start")
    bundle = catalog.bundle(graph_id)
    if not isinstance(user_id, str) or not user_id:
        raise InvalidInput(f"user_id must be a non-empty string, not {user_id!r}")
    inputs_json = check_submission(bundle, {} if inputs is None else inputs)
    execution_id = str(uuid.uuid4())
    store.write(InsertExecution(
        id=execution_id, graph_id=graph_id, user_id=user_id, status=ExecutionStatus.QUEUED, parent_id=None,
        depth=0, runtime_id=None, created_at=utcnow(), started_at=None, inputs_json=inputs_json,
        graph_version=bundle.version), WakeWorkers(graph_version=bundle.version), independent=True)
    return execution_id
