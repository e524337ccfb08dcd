"""The write floor: what the database alone needs to write one stop of a tree.

The pooled floor is the stop without a database; this is the stop without
actors. It runs the runtime's own two statements for a stop of the same rows
(``MoveNodes`` for every execution's active nodes, then ``MoveExecutions``
for every row, each guarded by status and returning what moved: the SQL
that ``writes.py`` merges a whole tree's final writes into), in one
transaction, on a connection opened as the runtime opens its own (the same
pragmas on SQLite). The clock covers the statements and the commit only:
building the operations is the actors' work, and counts in the runtime's
figure.

No schedule of actors can end a tree faster than its rows can be written,
nor faster than its messages can travel: the larger of the two floors bounds
a stop from below, and their sum is what it costs when they never overlap.
"""
from __future__ import annotations

import time
from typing import Sequence

from persistence import ExecutionStatus, MoveExecutions, MoveNodes, utcnow
from persistence.database import open_database
from persistence.dialect import Dialect

REASON = "write floor"


class WriteFloor:
    """One connection of the runtime's own kind on ``url``, kept for every repetition."""

    def __init__(self, url: str) -> None:
        self._db = open_database(url)
        # Held from here on (open_database left it idle in the pool, where
        # it would be counted as the runtime's).
        self._db.connect(reuse_if_open=True)
        self._sql = Dialect(self._db)

    def __enter__(self) -> WriteFloor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close_all()

    @property
    def open_connections(self) -> int:
        """The connections it holds (0 or 1), so that they are not counted as the runtime's."""
        return 0 if self._db.is_closed() else 1

    def time_stop(self, execution_ids: Sequence[str]) -> tuple[float, int]:
        """Write ``execution_ids`` (RUNNING rows) TERMINATED as the runtime's stop does.

        Returns:
            The seconds the statements and their commit took, and how many
            rows moved (the caller checks it: all of them).
        """
        at = utcnow()
        nodes = [MoveNodes(execution_id=i, node_ids=None, target=ExecutionStatus.TERMINATED, at=at)
                 for i in execution_ids]
        rows = [MoveExecutions(ids=(i,), target=ExecutionStatus.TERMINATED, at=at, stop_reason=REASON)
                for i in execution_ids]
        started = time.perf_counter()
        with self._db.atomic():
            MoveNodes.run_many(self._sql, nodes)
            moved = MoveExecutions.run_many(self._sql, rows)
        elapsed = time.perf_counter() - started
        return elapsed, sum(len(ids) for ids in moved)
