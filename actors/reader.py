"""Read-only views of executions: what ``Runtime`` and ``run.py tree/list`` show.

A ``Reader`` opened on its own (``Reader.open(url)``) never writes a row, so
looking at a database that a live runtime is using cannot disturb it.
"""
from __future__ import annotations

from typing import Any

from actors.errors import InvalidInput
from persistence import ExecutionRecord, ExecutionStatus, NotFound, Store


class Reader:
    def __init__(self, store: Store) -> None:
        self._store = store

    @classmethod
    def open(cls, database: str | None = None) -> "Reader":
        """A reader on its own read-only connection pool. Raises DatabaseError."""
        return cls(Store.open(database, read_only=True))

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get(self, execution_id: str, user_id: str | None = None) -> ExecutionRecord:
        """The committed record; NotFound if missing or (with ``user_id``) another user's."""
        record = self._store.get(execution_id)
        if record is None or (user_id is not None and record.user_id != user_id):
            raise NotFound(f"execution {execution_id!r} does not exist")
        return record

    def children(self, execution_id: str, user_id: str | None = None) -> list[ExecutionRecord]:
        self.get(execution_id, user_id=user_id)
        return self._store.children(execution_id)

    def tree(self, execution_id: str, user_id: str | None = None) -> dict[str, Any]:
        """The execution and every descendant as nested dicts, read in one recursive query."""
        rows = self._store.subtree(execution_id)
        if not rows or (user_id is not None and rows[0]["user_id"] != user_id):
            raise NotFound(f"execution {execution_id!r} does not exist")
        return build_tree(rows)

    def list(self, user_id: str | None = None, status: ExecutionStatus | str | None = None,
             limit: int = 50, roots_only: bool = False) -> list[ExecutionRecord]:
        """Executions (with ``roots_only``, root executions: runs), newest first."""
        if status is not None and status not in {s.value for s in ExecutionStatus}:
            raise InvalidInput(f"unknown status {status!r}: use one of "
                               f"{', '.join(s.value for s in ExecutionStatus)}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InvalidInput(f"limit must be a positive integer, not {limit!r}")
        return self._store.list_executions(user_id, ExecutionStatus(status) if status else None, limit,
                                           roots_only)


def build_tree(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Nest rows (parents first, as Store.subtree returns them) into dicts."""
    nodes: dict[str, dict[str, Any]] = {}
    for row in rows:
        nodes[row["id"]] = {"id": row["id"], "graph_id": row["graph_id"], "status": row["status"],
                            "parent_id": row["parent_id"], "children": []}
        parent = nodes.get(row["parent_id"]) if row["level"] else None
        if parent is not None:
            parent["children"].append(nodes[row["id"]])
    return nodes[rows[0]["id"]]
