"""Watches: a message to a watcher for every committed status change of an execution and its subtree.

pykka has no DeathWatch; this is actorgraph's. The feed is read from the
database, so it works the same for executions hosted here and elsewhere,
and a change is never delivered before its commit. Every status write
leaves its time in the row (``created_at``, ``started_at``, ``ended_at``),
so the history of an execution, QUEUED -> RUNNING -> terminal, can be read
back from its row whenever it is looked at; a watch remembers how much of
each execution's history it has delivered and sends the rest, in order.

One thread per runtime (or client) reads for every watch: woken by
PostgreSQL's NOTIFY, which every transaction that changes a status sends at
commit, and polling every ``POLL_INTERVAL`` as the fallback and on SQLite.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

import pykka

from actors.messages import StatusChanged
from persistence import DatabaseError, ExecutionStatus, NotFound, Store

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.2   # on SQLite, and PostgreSQL's fallback when a notice is missed
NOTICE_POLL = 1.0     # on PostgreSQL, with NOTIFY on
# At most one look per this interval: every status change in the database
# NOTIFYs, and a busy database would otherwise have us re-read the watched
# trees hundreds of times a second. It bounds the added latency too.
MIN_LOOK_INTERVAL = 0.05

Target = pykka.ActorRef | Callable[[StatusChanged], Any]
_RANK = {ExecutionStatus.QUEUED: 0, ExecutionStatus.RUNNING: 1}


@dataclasses.dataclass(eq=False)
class Watch:
    """A handle for ``unwatch``; its fields belong to the watch thread."""

    execution_id: str
    target: Target
    # Called once on the watch thread when the subtree is all terminal (or the watch broke).
    on_done: Callable[[], None] | None = None
    root_id: str | None = None
    # execution id -> how many of its changes were delivered
    delivered: dict[str, int] = dataclasses.field(default_factory=dict)
    done: bool = False


def history(row: dict[str, Any]) -> list[tuple[ExecutionStatus, dt.datetime]]:
    """Every status an execution has had, with when, read from its row.

    A row inserted RUNNING (a root admitted at once) has ``started_at ==
    created_at`` and was never QUEUED; any other row was QUEUED first.
    """
    status = ExecutionStatus(row["status"])
    created, started, ended = row["created_at"], row["started_at"], row["ended_at"]
    changes: list[tuple[ExecutionStatus, dt.datetime]] = []
    if started is None or started != created:
        changes.append((ExecutionStatus.QUEUED, created))
    if started is not None:
        changes.append((ExecutionStatus.RUNNING, started))
    if status.is_terminal:
        changes.append((status, ended or started or created))
    return changes


class WatchHub:
    """Delivers StatusChanged messages to every watch of one runtime or client."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._watches: list[Watch] = []
        self._lock = threading.Lock()
        self._notices = store.status_notices()
        self._interval = NOTICE_POLL if self._notices.listening else POLL_INTERVAL
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="actorgraph-watch", daemon=True)
        self._thread.start()

    def watch(self, execution_id: str, target: Target, on_done: Callable[[], None] | None = None) -> Watch:
        if not isinstance(target, pykka.ActorRef) and not callable(target):
            raise TypeError(f"a watch target is a pykka ActorRef or a callable, not {target!r}")
        if self._store.get(execution_id) is None:
            raise NotFound(f"execution {execution_id!r} does not exist")
        watch = Watch(execution_id=execution_id, target=target, on_done=on_done)
        with self._lock:
            self._watches.append(watch)
        self._notices.wake()  # its current state at once: no race with "ended before I watched"
        return watch

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)

    def changes(self, execution_id: str, timeout: float) -> Iterator[StatusChanged]:
        """The watch as an iterator; ends after the watched execution's terminal change."""
        inbox: queue.Queue[StatusChanged | None] = queue.Queue()
        watch = self.watch(execution_id, inbox.put, on_done=lambda: inbox.put(None))
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    change = inbox.get(timeout=max(0.0, remaining))
                except queue.Empty:
                    raise TimeoutError(f"execution {execution_id} is not terminal after {timeout}s") from None
                if change is None:
                    return
                yield change
        finally:
            self.unwatch(watch)

    def close(self) -> None:
        self._closed.set()
        self._notices.shut_down(self._thread)

    def _loop(self) -> None:
        while not self._closed.is_set():
            looked = time.monotonic()
            with self._lock:
                watches = list(self._watches)
            for watch in watches:
                try:
                    self._look(watch)
                except DatabaseError as exc:
                    logger.debug("watch of %s: %s", watch.execution_id, exc)
                except Exception:  # noqa: BLE001 - one broken watch must not stop the others
                    logger.exception("watch of %s failed; it is dropped", watch.execution_id)
                    watch.done = True
                if watch.done:
                    self.unwatch(watch)
                    if watch.on_done is not None:
                        watch.on_done()
            self._closed.wait(max(0.0, looked + MIN_LOOK_INTERVAL - time.monotonic()))
            self._notices.wait(self._interval)

    def _look(self, watch: Watch) -> None:
        """Read the watched subtree; deliver what it has not delivered yet, in order."""
        if watch.root_id is None:
            watch.root_id = self._store.root_of(watch.execution_id)
            if watch.root_id is None:
                raise NotFound(f"execution {watch.execution_id} does not exist any more")
        rows = self._store.subtree(watch.execution_id)
        fresh = []
        for row in rows:
            changes = history(row)
            for status, at in changes[watch.delivered.get(row["id"], 0):]:
                fresh.append((row, status, at))
            watch.delivered[row["id"]] = len(changes)
        fresh.sort(key=lambda item: _order(item, watch.execution_id))
        for row, status, at in fresh:
            if not self._deliver(watch, _message(row, status, at, watch.root_id)):
                watch.done = True
                return
        if all(ExecutionStatus(row["status"]).is_terminal for row in rows):
            watch.done = True

    @staticmethod
    def _deliver(watch: Watch, change: StatusChanged) -> bool:
        """Hand a change over; False if the target is gone (a dead actor): the watch ends."""
        target = watch.target
        if not isinstance(target, pykka.ActorRef):
            target(change)
            return True
        try:
            target.tell(change)
        except pykka.ActorDeadError:
            logger.debug("watcher of %s is dead; its watch is dropped", watch.execution_id)
            return False
        return True


def _order(item: tuple[dict[str, Any], ExecutionStatus, dt.datetime], watched: str) -> tuple:
    """Time first; at equal times a start before its children's, an end after them.

    The watched execution's own end comes last of all: its children end
    before it, and the feed promises that its end is the last change.
    """
    row, status, at = item
    rank = _RANK.get(status, 2)
    return (rank == 2 and row["id"] == watched, at, rank, -row["level"] if rank == 2 else row["level"])


def _message(row: dict[str, Any], status: ExecutionStatus, at: dt.datetime, root_id: str) -> StatusChanged:
    terminal = status.is_terminal
    return StatusChanged(
        execution_id=row["id"], parent_id=row["parent_id"], root_id=root_id, graph_id=row["graph_id"],
        status=status, at=at, error=row["error"] if terminal else None,
        stop_reason=row["stop_reason"] if terminal else None)



class Watching:
    """``watch``, ``unwatch`` and ``changes`` for a Runtime or a Client: the hub starts with the first watch."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._hub: WatchHub | None = None
        self._lock = threading.Lock()

    def _started(self) -> WatchHub:
        with self._lock:
            if self._hub is None:
                self._hub = WatchHub(self._store)
            return self._hub

    def watch(self, execution_id: str, target: Target) -> Watch:
        return self._started().watch(execution_id, target)

    def unwatch(self, watch: Watch) -> None:
        if self._hub is not None:
            self._hub.unwatch(watch)

    def changes(self, execution_id: str, timeout: float) -> Iterator[StatusChanged]:
        return self._started().changes(execution_id, timeout)

    def close(self) -> None:
        with self._lock:
            hub, self._hub = self._hub, None
        if hub is not None:
            hub.close()
