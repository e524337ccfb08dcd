"""The shared write path: callers that commit the queue themselves, and the writer thread.

Observed from outside: rows are read back through the test's own connection.
"""
from __future__ import annotations

import threading
import uuid
from typing import Iterator

import pytest

from persistence import (
    DatabaseError,
    ExecutionStatus,
    InsertExecution,
    MoveExecutions,
    Promise,
    Store,
    utcnow,
)

CALLERS = 6
WRITES_PER_CALLER = 40


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    opened = Store.open(database_url)
    yield opened
    opened.close()


def _insert(execution_id: str, status: ExecutionStatus = ExecutionStatus.RUNNING) -> InsertExecution:
    now = utcnow()
    return InsertExecution(id=execution_id, graph_id="g", user_id="writer-test", status=status,
                           parent_id=None, depth=0, runtime_id=None, created_at=now, started_at=now,
                           inputs_json="{}")


def _ids(observer, status: str) -> set[str]:
    rows = observer.query("SELECT id FROM graph_execution WHERE user_id = ? AND status = ?",
                          ("writer-test", status))
    return {row["id"] for row in rows}


@pytest.mark.parametrize("independent", [False, True])
def test_concurrent_waiting_writers_and_queued_writes_all_commit(store, observer, independent):
    queued = [str(uuid.uuid4()) for _ in range(200)]
    waited: list[list[str]] = [[] for _ in range(CALLERS)]
    errors: list[BaseException] = []

    def caller(index: int) -> None:
        try:
            for _ in range(WRITES_PER_CALLER):
                execution_id = str(uuid.uuid4())
                store.write(_insert(execution_id), independent=independent)
                waited[index].append(execution_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(index,)) for index in range(CALLERS)]
    for thread in threads:
        thread.start()
    # Meanwhile, actors' fire-and-forget writes: each later one completes an earlier row.
    futures = [store.submit(_insert(execution_id)) for execution_id in queued[:100]]
    futures += [store.submit(MoveExecutions(ids=(execution_id,), target=ExecutionStatus.COMPLETED, at=utcnow()))
                for execution_id in queued[:100]]
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    for future in futures:
        future.result(timeout=30)
    # Every move found its row: the insert it was queued after committed first.
    assert all(future.result() == [(execution_id,)]
               for future, execution_id in zip(futures[100:], queued[:100]))
    assert _ids(observer, "COMPLETED") == set(queued[:100])
    assert _ids(observer, "RUNNING") == {i for ids in waited for i in ids}
    assert sum(len(ids) for ids in waited) == CALLERS * WRITES_PER_CALLER


def test_a_failed_write_reaches_its_caller_and_writes_nothing(store, observer):
    execution_id = str(uuid.uuid4())
    store.write(_insert(execution_id))
    with pytest.raises(DatabaseError):
        # The same id twice in one transaction: the second insert fails, so the first row of it does too.
        store.write(_insert(str(uuid.uuid4())), _insert(execution_id))
    assert _ids(observer, "RUNNING") == {execution_id}


def test_a_commit_callback_may_not_wait_for_a_write(store):
    """It would wait for the turn its own thread holds: it gets an error instead of hanging."""
    for _ in range(50):
        outcome: Promise = Promise()

        def callback(_: Promise, outcome: Promise = outcome) -> None:
            try:
                store.write(_insert(str(uuid.uuid4())), timeout=5)
            except RuntimeError as exc:
                outcome.set_result((threading.get_ident(), str(exc)))
            else:
                outcome.set_result((threading.get_ident(), "no error"))

        store.submit(_insert(str(uuid.uuid4()))).add_done_callback(callback)
        thread_id, message = outcome.result(timeout=30)
        if thread_id != threading.get_ident():  # ran on the committing thread, as callbacks do
            assert "must submit" in message
            return
        # Committed before the callback was added: it ran here, outside any commit. Again.
    pytest.fail("no callback ran on the committing thread in 50 tries")

