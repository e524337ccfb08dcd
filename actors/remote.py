"""Stops that cross processes, and executions whose runtime is gone.

A stop for an execution this process does not host is persisted as a stop
request; the hosting runtime's ``StopWatcher`` sees it (PostgreSQL NOTIFY at
once, else within one poll interval) and runs the ordinary cascade, with the
request's ``wait_timeout``. The
stopping side waits until the subtree is terminal in the database. If the
host is gone, the stopping side ends the rows itself (recovery), and since
the request was persisted first, they end TERMINATED.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from actors.errors import StopTimeout
from actors.messages import Stop, StopAck, check_stop
from actors.supervision import CHILD_GRACE_LIMIT
from persistence import (
    DatabaseError,
    ExecutionRecord,
    ExecutionStatus,
    Heartbeat,
    NotFound,
    PermissionDenied,
    Promise,
    RequestStop,
    Store,
    StopRequest,
    TerminateSubtree,
    TerminateUnclaimed,
    is_gone,
    require_existing,
    utcnow,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.1   # the watcher's poll: a remote stop is seen within 200 ms
HEARTBEAT_EVERY = 2.0
WAIT_INTERVAL = 0.02  # how often a remote stopper looks at the database
# How long a remote stopper waits beyond the stop's wait_timeout: the host
# applies that timeout itself, then gives a silent child up to
# CHILD_GRACE_LIMIT before writing it, then commits.
GRACE = CHILD_GRACE_LIMIT + 5.0


def stop_execution(database: str | None, execution_id: str, user_id: str, *, cascade: bool = True,
                   wait_timeout: float = 15.0, reason: str = "stopped by user") -> StopAck:
    """Stop an execution from a process that hosts no runtime (``run.py stop``).

    Unlike opening a ``Runtime``, this does not recover lost runtimes before
    it starts: it persists the stop request first, so that a crashed tree it
    then recovers ends TERMINATED, not FAILED.

    Raises:
        InvalidInput, NotFound, PermissionDenied: nothing changes anywhere.
        DatabaseError: the database did not answer. Before the stop request
            was committed (the database was away for 5 s as this began),
            nothing was stopped. After it, the message says so: the stop
            completes when the database answers, without another call.
        StopTimeout: the hosting runtime did not end the subtree within
            ``wait_timeout`` + GRACE s.
    """
    check_stop(wait_timeout, cascade, reason)
    # There is nothing to stop in a database that does not exist: say so,
    # rather than create an empty one and report the id as unknown.
    require_existing(database)
    # Patient: a server restarting as the stop begins is waited for, as long
    # as any read waits, rather than refused at once.
    store = Store.open(database, patient=True)
    try:
        record = owned_record(store, execution_id, user_id)
        return stop_elsewhere(store, record, Stop(user_id=user_id, cascade=cascade, reason=reason,
                                                  wait_timeout=float(wait_timeout)))
    finally:
        store.close()


def owned_record(store: Store, execution_id: str, user_id: str) -> ExecutionRecord:
    """The execution's record, if ``user_id`` may stop it."""
    record = store.get(execution_id)
    if record is None:
        raise NotFound(f"execution {execution_id!r} does not exist")
    if record.user_id != user_id:
        raise PermissionDenied(
            f"user {user_id!r} may not stop execution {execution_id}: it belongs to another user")
    return record


def stop_elsewhere(store: Store, record: ExecutionRecord, stop: Stop) -> StopAck:
    """Stop an execution hosted by another process (or by none) and wait for the database."""
    execution_id = record.id
    if record.status is ExecutionStatus.QUEUED and record.parent_id is None:
        # Submitted and not claimed yet: one guarded write ends it, and no
        # worker claims it afterwards. Claimed meanwhile: stop it on its worker.
        (moved,) = store.write(TerminateUnclaimed(execution_id=execution_id, reason=stop.reason, at=utcnow()))
        if moved:
            return StopAck(execution_id=execution_id, terminated=moved)
    active, already_final = active_and_final(store, execution_id, stop.cascade)
    if not active:
        return StopAck(execution_id=execution_id, already_final=already_final)
    # Persist first: whoever ends these rows from now on (the host, or a
    # recovery after the host died) ends them TERMINATED.
    # The request carries the wait_timeout: the host's actors force what runs
    # past it, as a stop asked in that process would.
    store.write(RequestStop(execution_id=execution_id, reason=stop.reason, cascade=stop.cascade, at=utcnow(),
                            wait_timeout=stop.wait_timeout))
    try:
        _wait_until_ended(store, execution_id, active, stop)
        return ack_from_database(store, execution_id, active, already_final, stop.cascade)
    except DatabaseError as exc:
        # The request is on record: its host (or, if the host is gone, the
        # next recovery) ends the rows TERMINATED whether we watch or not.
        raise DatabaseError(
            f"the database stopped answering while execution {execution_id} was stopping ({exc}); its stop "
            f"request is on record, so the stop will complete when the database answers: its runtime ends "
            f"the rows TERMINATED, or the recovery of a lost runtime does, without another call") from exc


def _wait_until_ended(store: Store, execution_id: str, active: list[str], stop: Stop) -> None:
    """Wait until ``active`` is terminal in the database, ending it here if its runtime is gone."""
    deadline = time.monotonic() + stop.wait_timeout + GRACE
    while store.count_active(active):
        host = store.runtime_of(execution_id)
        if host is None or is_gone(host["host"], host["pid"], host["heartbeat_at"], utcnow()):
            _end_without_host(store, execution_id, stop)
            continue
        if time.monotonic() >= deadline:
            raise StopTimeout(
                f"execution {execution_id} is not terminal {stop.wait_timeout + GRACE:.0f}s after the stop "
                f"request; its runtime {host['id']} (host {host['host']}, pid {host['pid']}) does not answer")
        time.sleep(WAIT_INTERVAL)


def active_and_final(store: Store, execution_id: str, cascade: bool = True) -> tuple[list[str], tuple[str, ...]]:
    """Before a stop: the active ids of the subtree (its top alone without ``cascade``), and the terminal ones."""
    scope = store.subtree(execution_id) if cascade else store.subtree(execution_id)[:1]
    active = [row["id"] for row in scope if not ExecutionStatus(row["status"]).is_terminal]
    already_final = tuple(row["id"] for row in scope if ExecutionStatus(row["status"]).is_terminal)
    return active, already_final


def ack_from_database(store: Store, execution_id: str, active: list[str],
                      already_final: tuple[str, ...], cascade: bool = True) -> StopAck:
    """After a stop ended ``active``: its StopAck, read back from the database (whoever wrote each row).

    A row of ``active`` that ended COMPLETED or FAILED meanwhile (its work
    finished, or failed, before the stop reached it) ended otherwise: it is
    named in ``already_final``, as an actor's own ack names it. A cascading
    stop also answers for the children born after ``active`` was read (an
    agent node that started one just before the stop reached its host).
    """
    rows = {row["id"]: row for row in store.subtree(execution_id)}
    scope = list(active)
    if cascade:
        known = {*active, *already_final}
        scope += [i for i in rows if i not in known]
    ended = [i for i in scope if i in rows and ExecutionStatus(rows[i]["status"]).is_terminal]
    terminated = tuple(i for i in ended if rows[i]["status"] == ExecutionStatus.TERMINATED.value)
    ended_otherwise = tuple(i for i in ended if i not in terminated)
    forced = tuple(i for i in terminated if rows[i]["stop_forced"])
    return StopAck(execution_id=execution_id, terminated=terminated,
                   already_final=(*already_final, *ended_otherwise), forced=forced)


def _end_without_host(store: Store, execution_id: str, stop: Stop) -> None:
    """The hosting runtime is gone: recover its rows (ours end TERMINATED: a stop is on record)."""
    if store.recover_lost():
        return
    # Rows with no registered runtime at all (never hosted): end them here.
    store.write(TerminateSubtree(execution_id=execution_id, reason=stop.reason, at=utcnow(), forced=False,
                                 include_root=True))


class StopWatcher:
    """Polls (or LISTENs) for stop requests aimed at this runtime, and keeps its heartbeat."""

    def __init__(self, store: Store, runtime_id: str, on_request: Callable[[StopRequest], bool]) -> None:
        self._store = store
        self._runtime_id = runtime_id
        self._on_request = on_request
        # Requests already handed on (only this thread touches it): a
        # request stays pending in the database until its subtree ends. One
        # that changed (a shorter wait_timeout, a cascade) is handed on again.
        self._handed_on: set[StopRequest] = set()
        self._notices = store.stop_notices(runtime_id)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="actorgraph-watcher", daemon=True)
        self._thread.start()

    @property
    def listening(self) -> bool:
        return self._notices.listening

    def close(self) -> None:
        self._closed.set()
        self._notices.shut_down(self._thread)

    def _loop(self) -> None:
        next_heartbeat = 0.0
        heartbeat: Promise[Any] | None = None
        while not self._closed.is_set():
            try:
                # One heartbeat in flight at a time: while the database is
                # away they would only pile up in the writer's queue.
                if time.monotonic() >= next_heartbeat and (heartbeat is None or heartbeat.done()):
                    heartbeat = self._store.submit(Heartbeat(runtime_id=self._runtime_id, at=utcnow()))
                    next_heartbeat = time.monotonic() + HEARTBEAT_EVERY
                pending = self._store.pending_stops(self._runtime_id)
                self._handed_on.intersection_update(pending)
                for request in pending:
                    if request not in self._handed_on and self._on_request(request):
                        self._handed_on.add(request)
            except DatabaseError as exc:
                # The reads already retried; the outage is logged once, by them.
                logger.debug("stop watcher poll failed (runtime %s): %s", self._runtime_id, exc)
            except Exception:  # noqa: BLE001 - keep watching; the next poll may succeed
                logger.exception("stop watcher poll failed (runtime %s)", self._runtime_id)
            self._notices.wait(POLL_INTERVAL)
