"""What every execution actor of one runtime shares.

The ``Host`` bundles the store, the timers, the actors' dispatcher, the worker pool, the loaded
graphs and blocks, and the registry of live actors. It is the runtime's
inside; ``Runtime`` (runtime.py) is its outside.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import Any, Callable

import pykka

from actors.catalog import Catalog
from actors.dispatch import Dispatcher
from actors.logs import Identity
from actors.timers import Timers
from persistence import ExecutionStatus, Promise, Store


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ended:
    """What a finished execution tells the runtime (after its final commit, in its actor's turn)."""

    identity: Identity
    status: ExecutionStatus
    outputs: dict[str, Any] | None
    error: str | None
    stop_reason: str | None


class LiveActors:
    """Execution id -> ActorRef for every execution hosted here and not yet ended."""

    def __init__(self) -> None:
        self._refs: dict[str, pykka.ActorRef] = {}
        self._identities: dict[str, Identity] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # How many threads wait on _changed: a removal with nobody waiting
        # (the common case, thousands per stop) skips the notify.
        self._waiters = 0
        # Once set (the lease is lost), told to every actor, and to every one added later.
        self._seal: Any = None

    def add(self, identity: Identity, ref: pykka.ActorRef) -> None:
        with self._lock:
            self._refs[identity.execution_id] = ref
            self._identities[identity.execution_id] = identity
            seal = self._seal
        if seal is not None:
            tell_if_live(ref, seal)

    def seal(self, message: Any) -> int:
        """Tell ``message`` to every live actor and to every actor added from now on; return how many were live.

        Under the lock, so that no actor added meanwhile is missed.
        """
        with self._lock:
            self._seal = message
            refs = list(self._refs.values())
        for ref in refs:
            tell_if_live(ref, message)
        return len(refs)

    def remove(self, execution_id: str) -> bool:
        """Forget the execution; False if it was not here (someone else removed it first)."""
        with self._lock:
            present = self._refs.pop(execution_id, None) is not None
            self._identities.pop(execution_id, None)
            if self._waiters:
                self._changed.notify_all()
            return present

    def get(self, execution_id: str) -> pykka.ActorRef | None:
        with self._lock:
            return self._refs.get(execution_id)

    def identity_of(self, execution_id: str) -> Identity | None:
        with self._lock:
            return self._identities.get(execution_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._refs)

    def children_of(self, parent_id: str) -> dict[str, pykka.ActorRef]:
        """Id -> ActorRef of the live executions whose parent is ``parent_id`` (a scan: for the rare broken actor)."""
        with self._lock:
            return {i: self._refs[i] for i, identity in self._identities.items() if identity.parent_id == parent_id}

    def tell_children(self, parent_id: str, message: Any) -> None:
        """Tell ``message`` to the live children of ``parent_id``: the orphans of a parent whose actor stopped."""
        for ref in self.children_of(parent_id).values():
            tell_if_live(ref, message)

    def tops(self) -> list[tuple[Identity, pykka.ActorRef]]:
        """Live executions whose parent is not live here: where a cascade must start."""
        with self._lock:
            return [(identity, self._refs[i]) for i, identity in self._identities.items()
                    if identity.parent_id not in self._refs]

    def wait_empty(self, timeout: float) -> bool:
        return self._wait(lambda: not self._refs, timeout)

    def wait_gone(self, execution_id: str, timeout: float) -> bool:
        return self._wait(lambda: execution_id not in self._refs, timeout)

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            self._waiters += 1
            try:
                return self._changed.wait_for(predicate, timeout)
            finally:
                self._waiters -= 1


def tell_if_live(ref: pykka.ActorRef, message: Any) -> None:
    """Tell ``message`` to ``ref``; nothing if its actor stopped meanwhile."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass  # it ended meanwhile


@dataclasses.dataclass(kw_only=True)
class Host:
    store: Store
    runtime_id: str
    timers: Timers
    # Runs every execution actor's turns: actors share its threads.
    dispatcher: Dispatcher
    pool: concurrent.futures.ThreadPoolExecutor
    # The blocks registered and the graphs loaded (a claimed root brings its own bundle).
    catalog: Catalog
    max_depth: int
    failure_timeout: float
    live: LiveActors
    # Called in an execution actor's last turn, after its final commit.
    on_ended: Callable[[Ended], None]
    # Called in an execution actor's last turn when it halted without writing (its lease was lost).
    on_halted: Callable[[Identity], None]
    # Called in an execution actor's last turn when it stopped without ending
    # (a bug in a turn, then in its salvage), with the error to record and
    # the promises of the stops asked of it that it never answered.
    on_failed: Callable[[Identity, str, tuple[Promise[Any], ...]], None]
    # Set (once, for good) when a non-cascading stop first leaves a started
    # child running under a terminal parent: from then on a cascading stop
    # also looks for such children in the database (Runtime._stop_abandoned).
    left_running: threading.Event = dataclasses.field(default_factory=threading.Event)
