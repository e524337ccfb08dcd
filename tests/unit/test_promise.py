"""Promise: the subset of the Future API that actorgraph uses, with callbacks."""
from __future__ import annotations

import threading
from typing import Any

import pytest

from persistence import Promise
from tests.helpers import wait_until

WAIT = 10.0


@pytest.mark.parametrize("count", [1, 2, 3])
def test_callbacks_run_once_each_in_the_order_they_were_added(count):
    promise: Promise[str] = Promise()
    seen: list[tuple[int, str]] = []
    for index in range(count):
        promise.add_done_callback(lambda done, index=index: seen.append((index, done.result())))
    assert seen == []
    promise.set_result("value")
    assert seen == [(index, "value") for index in range(count)]


def test_a_callback_added_after_the_result_runs_at_once():
    promise = Promise.resolved(7)
    seen: list[Any] = []
    promise.add_done_callback(lambda done: seen.append(done.result()))
    assert seen == [7]


def test_a_failing_callback_does_not_keep_the_others_from_running():
    promise: Promise[int] = Promise()
    seen: list[int] = []
    promise.add_done_callback(lambda done: 1 / 0)
    promise.add_done_callback(lambda done: seen.append(done.result()))
    promise.set_result(1)
    assert seen == [1]


def test_an_error_is_raised_by_result_and_returned_by_exception():
    promise: Promise[int] = Promise()
    error = ValueError("no")
    promise.set_exception(error)
    assert promise.done()
    assert promise.exception(0) is error
    with pytest.raises(ValueError, match="no"):
        promise.result(0)


def test_a_promise_settles_once():
    promise: Promise[int] = Promise()
    promise.set_result(1)
    with pytest.raises(RuntimeError, match="already settled"):
        promise.set_result(2)
    assert promise.result(0) == 1


def test_result_waits_up_to_its_timeout():
    promise: Promise[int] = Promise()
    with pytest.raises(TimeoutError):
        promise.result(0.01)


def test_a_result_from_another_thread_releases_a_waiter():
    promise: Promise[str] = Promise()
    outcome: list[str] = []
    waiter = threading.Thread(target=lambda: outcome.append(promise.result(WAIT)))
    waiter.start()
    wait_until(lambda: promise._event is not None, WAIT, "the waiter to block")
    promise.set_result("done")
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert outcome == ["done"]
