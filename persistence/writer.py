"""The shared write path: one queue, group commit, a bounded number of connections.

Any number of actors submit operations; the writer takes everything queued,
runs it in one transaction, commits, and only then resolves each submitter's
future. A thousand actors writing at once cost one commit, one connection
and no lock waits, and nobody is told "done" before the data is durable.

Whoever holds the *turn* takes the queue and commits it: the writer thread,
or a caller of ``write`` that has to wait for its commit anyway (``start``
inserting a new root, a stop request). Such a caller queues its operations
like everyone else, then takes the turn itself: if nobody committed them
meanwhile, it commits everything queued, its own included, on its own
thread. That saves the hand-off to the writer thread and back, and callers
that arrive together share one commit (one WAL flush on PostgreSQL): while
one holds the turn, the others queue up behind it and the next one commits
them all. Taking the queue and committing it happen under the same lock, so
batches commit in the order they were queued: a parent's write, queued
after its children's, never commits before theirs. On SQLite the turn is
also what keeps two write transactions from meeting SQLite's busy handler,
which sleeps.

On PostgreSQL a write that depends on nothing queued, and that nothing
queued depends on (a new root's row), may skip the queue: it commits in a
transaction of its own beside the writer's, so that its WAL flush overlaps
the writer's instead of waiting behind it (``independent=True``).
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Any, Callable, Sequence


from persistence.database import Database, is_transient
from persistence.dialect import Dialect
from persistence.errors import DatabaseError, LeaseLost
from persistence.outage import Backoff, Outage
from persistence.promise import Promise
from persistence.writes import Operation, begin_transaction

logger = logging.getLogger(__name__)

# How many submissions one transaction may take: enough to batch a whole
# level of a large tree, small enough to keep each commit short.
MAX_BATCH = 4096


class _Submission:
    __slots__ = ("ops", "future", "after")

    def __init__(self, ops: Sequence[Operation], after: Sequence[Promise]) -> None:
        self.ops = ops
        self.after = after
        self.future: Promise[list[Any]] = Promise()

    def failed_dependency(self) -> BaseException | None:
        """The error of a write this one was submitted after and depends on, if it failed."""
        for dependency in self.after:
            if dependency.done() and dependency.exception() is not None:
                return dependency.exception()
        return None


class Writer:
    """Runs submitted operations in batches, on its own thread or a combining caller's.

    A batch that fails because the database is away (``is_transient``) is
    put back at the head of the queue, in order, and the writer thread
    retries it with a bounded backoff until it commits or the writer is
    closed: every operation is guarded by status, so a batch that did commit
    before its connection broke changes nothing when it runs again.
    """

    def __init__(self, database: Database) -> None:
        self._sql = Dialect(database)
        self._database = database
        self._pending: collections.deque[_Submission] = collections.deque()
        self._queue_changed = threading.Condition(threading.Lock())
        # Held while a batch is taken from the queue and committed (see the module's doc).
        self._turn = threading.Lock()
        self._turn_owner: int | None = None
        self._closed = False
        # Whether the writer thread waits for work: a submission wakes it only
        # then (a stop of a thousand executions submits a thousand times).
        self._writer_waiting = False
        # Set when close gives up on a database that is away: what is left fails.
        self._abandoned = False
        self._wake = threading.Event()
        self.outage = Outage(logger, "database writer")
        self._backoff = Backoff()
        self._attempt_started: float | None = None
        # The runtime whose lease fences every transaction (see fence), and
        # what to call, once, when it is found lost.
        self._fence_owner: str | None = None
        self._on_lease_lost: Callable[[], None] | None = None
        self._lease_lost: LeaseLost | None = None
        self.commits = 0
        self._thread = threading.Thread(target=self._loop, name="actorgraph-writer", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def unavailable(self, patience: float) -> bool:
        """Whether the database is away: an outage is on, or a commit has tried for ``patience`` s."""
        if self.outage.active:
            return True
        started = self._attempt_started
        return started is not None and time.monotonic() - started > patience

    def fence(self, runtime_id: str, on_lost: Callable[[], None]) -> None:
        """From now on, write only while ``runtime_id``'s row exists (its lease: see writes.begin_transaction).

        Once it is gone, the transaction that found it so writes nothing,
        ``on_lost`` is called once (on the committing thread, before any
        submitter hears of it), and every write from then on fails with
        LeaseLost.
        """
        self._on_lease_lost = on_lost
        self._fence_owner = runtime_id

    def submit(self, *ops: Operation,
               after: Sequence[Promise] = ()) -> Promise[list[Any]]:
        """Queue ``ops`` to run in order in one transaction; the future holds their results.

        ``after`` names earlier submissions this one depends on. The queue is
        FIFO, so they commit in an earlier transaction or in the same one; if
        one of them fails, this one fails too and writes nothing.
        """
        submission = _Submission(ops, after)
        self._enqueue(submission, wake_writer=True)
        return submission.future

    def _enqueue(self, submission: _Submission, *, wake_writer: bool) -> None:
        if self._lease_lost is not None:
            submission.future.set_exception(self._lease_lost)
            return
        with self._queue_changed:
            if not self._closed:
                self._pending.append(submission)
                if wake_writer and self._writer_waiting:
                    self._queue_changed.notify()
                return
        submission.future.set_exception(DatabaseError("the database writer is closed"))

    def write(self, *ops: Operation, timeout: float, independent: bool = False) -> list[Any]:
        """Queue ``ops`` and wait for their commit, committing the queue on this thread if need be.

        With ``independent`` (``ops`` depend on nothing queued, and nothing
        queued depends on them), PostgreSQL commits them at once in a
        transaction of their own.
        Returns their results in order.

        Raises:
            DatabaseError: the write failed (nothing of it was written), or
                the database did not answer within ``timeout`` seconds (then
                it was withdrawn: nothing of it will be written either).
            RuntimeError: called from a commit callback (it would wait for itself).
        """
        if self._turn_owner == threading.get_ident():
            raise RuntimeError("a commit callback must submit, not wait for a write")
        own = _Submission(ops, ())
        deadline = time.monotonic() + timeout
        if independent and not self._sql.is_sqlite and not self.outage.active:
            if self._closed:
                raise DatabaseError("the database writer is closed")
            try:
                self._commit([own])  # commits it, fails it, or queues it for a retry
            finally:
                self._release_connection()
        else:
            # Queued without waking the writer thread: this thread commits it.
            self._enqueue(own, wake_writer=False)
        while not own.future.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._give_up(own, timeout)
            elif self.outage.active:
                # The writer thread retries; wait for it (or for our deadline).
                self._wait_for(own, min(remaining, 0.1))
            elif self._turn.acquire(timeout=remaining):
                try:
                    if not own.future.done():
                        self._commit_turn()
                finally:
                    self._release_connection()
                    self._turn.release()
        return own.future.result()

    def _wait_for(self, own: _Submission, timeout: float) -> None:
        try:
            own.future.result(timeout=timeout)
        except TimeoutError:
            pass
        except Exception:  # noqa: BLE001 - settled with an error: write() raises it
            pass

    def _give_up(self, own: _Submission, timeout: float) -> None:
        """Past the caller's deadline: withdraw the write if it is still queued, else let it settle."""
        with self._queue_changed:
            try:
                self._pending.remove(own)
            except ValueError:
                withdrawn = False  # in flight: it commits or comes back to the queue soon
            else:
                withdrawn = True
        if withdrawn:
            raise DatabaseError(f"the database did not answer within {timeout:g}s; "
                                "the write was withdrawn and nothing of it was written")
        self._wait_for(own, 0.05)

    def _release_connection(self) -> None:
        """A caller's thread gives its connection back to the pool (the writer thread keeps its own)."""
        if threading.current_thread() is not self._thread and not self._database.is_closed():
            self._database.close()

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued (for up to ``timeout`` s), then stop the thread and release its connection.

        If the database does not answer by then, what is left fails with
        DatabaseError (its submitters hear it) and is not written.
        """
        with self._queue_changed:
            if self._closed:
                return
            self._closed = True
            self._queue_changed.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon()
            self._thread.join(timeout=15.0)

    def _abandon(self) -> None:
        with self._queue_changed:
            self._abandoned = True
            left, self._pending = list(self._pending), collections.deque()
            self._queue_changed.notify()
        self._wake.set()
        if left:
            logger.error("the database writer closed with %d writes the database never took", len(left))
        for submission in left:
            _fail(submission.future, DatabaseError(
                "not written: the runtime closed while the database was unavailable"))

    def _loop(self) -> None:
        try:
            while self._wait_for_work():
                if self.outage.active:
                    # Interruptible by close: an outage must not hold it up.
                    self._wake.wait(self._backoff.next_delay())
                with self._turn:
                    self._commit_turn()
        finally:
            self._drop_connection()

    def _wait_for_work(self) -> bool:
        """Block until something is queued; False once closed with nothing left (or abandoned)."""
        with self._queue_changed:
            while not self._pending:
                if self._closed or self._abandoned:
                    return False
                self._writer_waiting = True
                try:
                    self._queue_changed.wait()
                finally:
                    self._writer_waiting = False
            return not self._abandoned

    def _commit_turn(self) -> None:
        """Holding the turn: commit what is queued (up to MAX_BATCH submissions)."""
        self._turn_owner = threading.get_ident()
        try:
            batch = self._take_batch()
            if batch:
                self._commit(batch)
        finally:
            self._turn_owner = None

    def _take_batch(self) -> list[_Submission]:
        """Under the turn: everything queued, up to MAX_BATCH, oldest first."""
        with self._queue_changed:
            pending = self._pending
            if len(pending) <= MAX_BATCH:
                batch = list(pending)
                pending.clear()
                return batch
            return [pending.popleft() for _ in range(MAX_BATCH)]

    def _commit(self, batch: list[_Submission]) -> None:
        batch = [submission for submission in batch if self._dependencies_hold(submission)]
        if not batch:
            return
        try:
            results = self._transaction(batch)
        except LeaseLost as exc:
            self._fenced_out(batch, exc)
            return
        except Exception as exc:
            if is_transient(exc):
                self._retry_later(batch, exc)
                return
            # One bad submission must not sink the others: replay each alone,
            # so only the faulty one receives the error.
            logger.debug("batch of %d failed; retrying one by one", len(batch), exc_info=True)
            for index, submission in enumerate(batch):
                if not self._commit_alone(submission):
                    self._retry_later(batch[index:], None)
                    return
            return
        for submission, result in zip(batch, results):
            _resolve(submission.future, result)

    def _transaction(self, batch: list[_Submission]) -> list[list[Any]]:
        """Run ``batch`` in one transaction on this thread's connection (opened if need be)."""
        self._attempt_started = time.monotonic()
        try:
            self._database.connect(reuse_if_open=True)
            with self._database.atomic():
                owner = self._fence_owner
                changes_status = any(op.changes_status for submission in batch for op in submission.ops)
                if not begin_transaction(self._sql, owner, changes_status):
                    raise LeaseLost(f"runtime {owner} lost its lease: another process recovered its "
                                    "executions, and nothing more of this runtime is written")
                results = self._run(batch)
        finally:
            self._attempt_started = None
        self.commits += 1
        if self.outage.active:
            self.outage.succeeded()
            self._backoff.reset()
        return results

    def _fenced_out(self, batch: list[_Submission], error: LeaseLost) -> None:
        """The lease is gone: nothing of ``batch``, or of anything queued or submitted later, is written."""
        first = self._lease_lost is None
        self._lease_lost = error
        with self._queue_changed:
            left, self._pending = list(self._pending), collections.deque()
        if first:
            logger.error("%s", error)
            if self._on_lease_lost is not None:
                self._on_lease_lost()
        for submission in [*batch, *left]:
            _fail(submission.future, error)

    def _retry_later(self, batch: list[_Submission], error: BaseException | None) -> None:
        """The database is away: drop the connection and put ``batch`` back at the head, in order."""
        self._drop_connection()
        self._database.close_idle()  # the pool's idle connections died with it
        with self._queue_changed:
            abandoned = self._abandoned
            if not abandoned:
                self._pending.extendleft(reversed(batch))
                self._queue_changed.notify()
        if abandoned:
            for submission in batch:
                _fail(submission.future, DatabaseError(
                    "not written: the runtime closed while the database was unavailable"))
        if error is not None:
            self.outage.failed(error)

    def _drop_connection(self) -> None:
        """Close this thread's connection without returning it to the pool."""
        try:
            self._database.manual_close()
        except Exception:  # noqa: BLE001 - it is broken; all we want is to be rid of it
            logger.debug("closing a broken connection failed", exc_info=True)

    def _dependencies_hold(self, submission: _Submission) -> bool:
        error = submission.failed_dependency()
        if error is None:
            return True
        _fail(submission.future, DatabaseError(f"not written: a write it depends on failed: {error}"))
        return False

    def _commit_alone(self, submission: _Submission) -> bool:
        """Commit one submission; False if the database was away (it is not settled then)."""
        if not self._dependencies_hold(submission):
            return True
        try:
            (result,) = self._transaction([submission])
        except LeaseLost as exc:
            self._fenced_out([submission], exc)
            return True
        except Exception as exc:  # noqa: BLE001 - handed to the submitter, translated
            if is_transient(exc):
                self.outage.failed(exc)
                return False
            error = exc if isinstance(exc, DatabaseError) else DatabaseError(f"write failed: {exc}")
            error.__cause__ = exc
            _fail(submission.future, error)
            return True
        _resolve(submission.future, result)
        return True

    def _run(self, batch: list[_Submission]) -> list[list[Any]]:
        """Run every op phase by phase (see writes.py), merging runs of same-shaped ops.

        Results go back to each submission in its own op order.
        """
        flat = [(index, position, op) for index, submission in enumerate(batch)
                for position, op in enumerate(submission.ops)]
        flat.sort(key=lambda item: item[2].phase)  # stable: submission order within a phase
        results: list[list[Any]] = [[None] * len(submission.ops) for submission in batch]
        for _, group in itertools.groupby(flat, key=lambda item: _group_key(item[2])):
            members = list(group)
            ops = [op for _, _, op in members]
            outcomes = [ops[0].run(self._sql)] if len(ops) == 1 else type(ops[0]).run_many(self._sql, ops)
            for (index, position, _), outcome in zip(members, outcomes):
                results[index][position] = outcome
        return results


def _group_key(op: Operation) -> Any:
    key = op.merge_key()
    # An unmergeable op gets a key of its own (its identity), so it runs alone.
    return (type(op), key) if key is not None else ("alone", id(op))


def _resolve(future: Promise[list[Any]], result: list[Any]) -> None:
    # Done-callbacks run here, on the committing thread, still holding the
    # turn (so they run in commit order); the promise logs (and
    # contains) any exception they raise.
    future.set_result(result)


def _fail(future: Promise[list[Any]], error: Exception) -> None:
    future.set_exception(error)
