"""Running limits for root executions, with a FIFO queue.

Only roots count and only roots wait: a child never waits for a slot, so a
parent can never deadlock on its own child. A root over a limit stays QUEUED
and starts, in arrival order, as soon as a slot that fits it frees.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

from actors.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class QueuedRoot:
    execution_id: str
    user_id: str
    graph_id: str
    inputs: dict[str, Any]
    # The graph version its row records (a later load may change the graph).
    bundle: Any


class Admission:
    def __init__(self, per_user: int | None, per_graph: int | None) -> None:
        for name, limit in (("max_running_per_user", per_user), ("max_running_per_graph", per_graph)):
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                raise InvalidInput(f"{name} must be a positive integer or None, not {limit!r}")
        self.per_user = per_user
        self.per_graph = per_graph
        self._by_user: collections.Counter[str] = collections.Counter()
        self._by_graph: collections.Counter[tuple[str, str]] = collections.Counter()
        self._queue: collections.OrderedDict[str, QueuedRoot] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _fits(self, user_id: str, graph_id: str) -> bool:
        return ((self.per_user is None or self._by_user[user_id] < self.per_user)
                and (self.per_graph is None or self._by_graph[user_id, graph_id] < self.per_graph))

    def _take(self, user_id: str, graph_id: str) -> None:
        self._by_user[user_id] += 1
        self._by_graph[user_id, graph_id] += 1

    def _may_start(self, user_id: str, graph_id: str) -> bool:
        # A root never overtakes an older queued root of the same user and graph.
        waiting = any(q.user_id == user_id and q.graph_id == graph_id for q in self._queue.values())
        return not waiting and self._fits(user_id, graph_id)

    def try_admit(self, user_id: str, graph_id: str) -> bool:
        """Take a slot if one is free for this user and graph."""
        with self._lock:
            if not self._may_start(user_id, graph_id):
                return False
            self._take(user_id, graph_id)
            return True

    def enqueue_or_admit(self, root: QueuedRoot) -> bool:
        """After the QUEUED row committed: take a slot if one freed meanwhile, else wait in line."""
        with self._lock:
            if self._may_start(root.user_id, root.graph_id):
                self._take(root.user_id, root.graph_id)
                return True
            self._queue[root.execution_id] = root
            return False

    def release(self, user_id: str, graph_id: str) -> list[QueuedRoot]:
        """Free a slot; return the queued roots that may start now, in FIFO order."""
        with self._lock:
            self._by_user[user_id] -= 1
            self._by_graph[user_id, graph_id] -= 1
            admitted = []
            for root in list(self._queue.values()):
                if self._fits(root.user_id, root.graph_id):
                    del self._queue[root.execution_id]
                    self._take(root.user_id, root.graph_id)
                    admitted.append(root)
            return admitted

    def remove(self, execution_id: str) -> QueuedRoot | None:
        """Take a root out of the queue (it is being stopped); None if it is not queued."""
        with self._lock:
            return self._queue.pop(execution_id, None)

    def queued(self) -> list[QueuedRoot]:
        with self._lock:
            return list(self._queue.values())
