"""A client: submit, stop and read executions without hosting any.

What a web API or a scheduler holds: it hands roots to the workers
(``submit``), stops executions wherever they run (the owner hears it through
its own NOTIFY channel), and reads the database. It creates no actor and
holds no lease.
"""
from __future__ import annotations

import builtins
import os
from typing import Any, Callable, Mapping

from actors.catalog import Catalog
from actors.messages import Stop, StopAck, check_stop
from actors.reader import Reader
from actors.views import ExecutionViews
from actors.watch import Watching
from actors.remote import owned_record, stop_elsewhere
from actors.submit import submit_root
from persistence import Store


class Client(ExecutionViews):
    """Submits, stops, reads and watches executions on one database; hosts nothing.

    Raises DatabaseError if the database cannot be opened or migrated.
    """

    def __init__(self, database: str | None = None) -> None:
        self._store = Store.open(database)
        self._reader = Reader(self._store)
        self._catalog = Catalog()
        self._watching = Watching(self._store)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._watching.close()
        self._store.close()

    def load(self, source: str | os.PathLike | Mapping[str, Any]) -> builtins.list[str]:
        """Validate graphs and store their versions (see Runtime.load); return their ids."""
        return self._catalog.load(source, self._store)

    def register_block(self, name: str, fn: Callable[..., Mapping[str, Any]], inputs: Any = None,
                       outputs: Any = None) -> None:
        """Declare a user block so that graphs using it validate here (workers run it)."""
        self._catalog.register_block(name, fn, inputs, outputs)

    def submit(self, graph_id: str, user_id: str, inputs: Mapping[str, Any] | None = None) -> str:
        """Hand a root to the workers (PostgreSQL); see Runtime.submit."""
        return submit_root(self._store, self._catalog, graph_id, user_id, inputs)

    def stop(self, execution_id: str, user_id: str, wait_timeout: float = 15.0, cascade: bool = True,
             reason: str = "stopped by user") -> StopAck:
        """Stop an execution wherever it runs; returns once its subtree is terminal in the database.

        The worker that runs it applies ``wait_timeout`` (0 forces at once).
        A root no worker claimed yet is written TERMINATED at once. Raises
        InvalidInput, NotFound, PermissionDenied, StopTimeout or DatabaseError
        as Runtime.stop does.
        """
        check_stop(wait_timeout, cascade, reason)
        record = owned_record(self._store, execution_id, user_id)
        return stop_elsewhere(self._store, record, Stop(user_id=user_id, cascade=cascade, reason=reason,
                                                        wait_timeout=float(wait_timeout)))
