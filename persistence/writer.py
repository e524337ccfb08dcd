"""The shared write path: one thread, one connection, group commit.

Any number of actors submit operations; the writer takes everything queued,
runs it in one transaction, commits, and only then resolves each submitter's
future. A thousand actors writing at once cost one commit, one connection
and no lock waits, and nobody is told "done" before the data is durable.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Any, Sequence

import peewee

from persistence.dialect import Dialect
from persistence.errors import DatabaseError
from persistence.promise import Promise
from persistence.writes import Operation

logger = logging.getLogger(__name__)

# How many submissions one transaction may take: enough to batch a whole
# level of a large tree, small enough to keep each commit short.
MAX_BATCH = 4096

_CLOSE = object()


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
    """Runs submitted operations in batches on its own thread and connection."""

    def __init__(self, database: peewee.Database) -> None:
        self._sql = Dialect(database)
        self._database = database
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
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
        if self._closed:
            submission.future.set_exception(DatabaseError("the database writer is closed"))
        else:
            self._queue.put(submission)
        return submission.future

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the thread and release its connection."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_CLOSE)
        self._thread.join(timeout)

    def _loop(self) -> None:
        self._database.connect(reuse_if_open=True)
        try:
            while True:
                batch, closing = self._take_batch()
                if batch:
                    self._commit(batch)
                if closing:
                    return
        finally:
            self._database.close()

    def _take_batch(self) -> tuple[list[_Submission], bool]:
        first = self._queue.get()
        if first is _CLOSE:
            return [], True
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _CLOSE:
                return batch, True
            batch.append(item)
        return batch, False

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
    # Done-callbacks run here, on the writer thread; the promise logs (and
    # contains) any exception they raise.
    future.set_result(result)


def _fail(future: Promise[list[Any]], error: Exception) -> None:
    future.set_exception(error)
