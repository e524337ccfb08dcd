"""What a Runtime and a Client both offer on executions: reading them, and watching them."""
from __future__ import annotations

import builtins
from typing import Any, Iterator

from actors.messages import StatusChanged
from actors.reader import Reader
from actors.watch import Target, Watch, Watching
from persistence import ExecutionRecord, ExecutionStatus


class ExecutionViews:
    """Reads through ``_reader`` and watches through ``_watching``, which the subclass sets up."""

    _reader: Reader
    _watching: Watching

    def get(self, execution_id: str, user_id: str | None = None) -> ExecutionRecord:
        """The committed record; NotFound if missing or (with ``user_id``) another user's."""
        return self._reader.get(execution_id, user_id)

    def children(self, execution_id: str, user_id: str | None = None) -> builtins.list[ExecutionRecord]:
        """The execution's direct children, oldest first."""
        return self._reader.children(execution_id, user_id)

    def tree(self, execution_id: str, user_id: str | None = None) -> dict[str, Any]:
        """Nested dicts {"id", "graph_id", "status", "parent_id", "children"} read in one query."""
        return self._reader.tree(execution_id, user_id)

    def list(self, user_id: str | None = None, status: ExecutionStatus | str | None = None,
             limit: int = 50, roots_only: bool = False) -> builtins.list[ExecutionRecord]:
        """Executions (with ``roots_only``, root executions: runs), newest first."""
        return self._reader.list(user_id, status, limit, roots_only)

    def watch(self, execution_id: str, target: Target) -> Watch:
        """Send ``target`` a StatusChanged for every committed status change of the execution and its subtree.

        ``target`` is a pykka ActorRef (told each change) or a callable (called
        on the watch thread; keep it short). The changes of each execution
        come in order (QUEUED, RUNNING, then its end), never before their
        commit, and the watched execution's end comes last; an execution
        already terminal gets its history at once. Works for executions
        hosted by any process. A watcher actor that is dead is dropped.
        Raises NotFound for an unknown execution.
        """
        return self._watching.watch(execution_id, target)

    def unwatch(self, watch: Watch) -> None:
        """End a watch: after this returns nothing more reaches its target (but a change being delivered)."""
        self._watching.unwatch(watch)

    def changes(self, execution_id: str, timeout: float = 60.0) -> Iterator[StatusChanged]:
        """The same feed as an iterator, ending with the execution's end; TimeoutError after ``timeout`` s.

        A non-cascading stop lets children run on after their parent ended:
        the feed then ends once they have ended too.
        """
        return self._watching.changes(execution_id, timeout)
