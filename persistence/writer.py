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
import contextlib
import itertools
import logging
import threading
import time
from typing import Any, Iterator, Sequence

import peewee

from persistence.dialect import Dialect
from persistence.errors import DatabaseError
from persistence.promise import Promise
from persistence.writes import Operation

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
    """Runs submitted operations in batches, on its own thread or a combining caller's."""

    def __init__(self, database: peewee.Database) -> None:
        self._sql = Dialect(database)
        self._database = database
        self._pending: collections.deque[_Submission] = collections.deque()
        self._queue_changed = threading.Condition(threading.Lock())
        # Held while a batch is taken from the queue and committed (see the module's doc).
        self._turn = threading.Lock()
        self._turn_owner: int | None = None
        self._closed = False
        self.commits = 0
        self._thread = threading.Thread(target=self._loop, name="actorgraph-writer", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

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
        with self._queue_changed:
            if not self._closed:
                self._pending.append(submission)
                if wake_writer:
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
                it was not committed within ``timeout`` seconds.
            RuntimeError: called from a commit callback (it would wait for itself).
        """
        if self._turn_owner == threading.get_ident():
            raise RuntimeError("a commit callback must submit, not wait for a write")
        own = _Submission(ops, ())
        if independent and not self._sql.is_sqlite:
            if self._closed:
                raise DatabaseError("the database writer is closed")
            with self._connection():
                self._commit([own])
            return own.future.result()
        deadline = time.monotonic() + timeout
        # Queued without waking the writer thread: this thread commits it.
        self._enqueue(own, wake_writer=False)
        while not own.future.done():
            if not self._turn.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise DatabaseError(f"the database did not commit within {timeout:.0f}s")
            try:
                if not own.future.done():
                    with self._connection():
                        self._commit_turn()
            finally:
                self._turn.release()
        return own.future.result()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        """A pooled connection for this thread's transaction; failing to get one is a DatabaseError."""
        try:
            context = self._database.connection_context()
            context.__enter__()
        except peewee.PeeweeException as exc:
            raise DatabaseError(f"cannot connect to write: {exc}") from exc
        try:
            yield
        finally:
            context.__exit__(None, None, None)

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the thread and release its connection."""
        with self._queue_changed:
            if self._closed:
                return
            self._closed = True
            self._queue_changed.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        self._database.connect(reuse_if_open=True)
        try:
            while self._wait_for_work():
                with self._turn:
                    self._commit_turn()
        finally:
            self._database.close()

    def _wait_for_work(self) -> bool:
        """Block until something is queued; False once closed with nothing left."""
        with self._queue_changed:
            while not self._pending:
                if self._closed:
                    return False
                self._queue_changed.wait()
            return True

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
            with self._database.atomic():
                results = self._run(batch)
        except Exception:
            # One bad submission must not sink the others: replay each alone,
            # so only the faulty one receives the error.
            logger.debug("batch of %d failed; retrying one by one", len(batch), exc_info=True)
            for submission in batch:
                self._commit_alone(submission)
            return
        self.commits += 1
        for submission, result in zip(batch, results):
            _resolve(submission.future, result)

    def _dependencies_hold(self, submission: _Submission) -> bool:
        error = submission.failed_dependency()
        if error is None:
            return True
        _fail(submission.future, DatabaseError(f"not written: a write it depends on failed: {error}"))
        return False

    def _commit_alone(self, submission: _Submission) -> None:
        if not self._dependencies_hold(submission):
            return
        try:
            with self._database.atomic():
                (result,) = self._run([submission])
        except Exception as exc:  # noqa: BLE001 - handed to the submitter, translated
            error = exc if isinstance(exc, DatabaseError) else DatabaseError(f"write failed: {exc}")
            error.__cause__ = exc
            _fail(submission.future, error)
            return
        self.commits += 1
        _resolve(submission.future, result)

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
