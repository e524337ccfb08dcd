"""Flag: threading.Event's is_set/set/clear/wait, as one object until somebody waits."""
from __future__ import annotations

import threading

from actors.flag import Flag
from tests.helpers import wait_until

WAIT = 10.0


def test_a_new_flag_is_unset_and_a_wait_on_it_times_out():
    flag = Flag()
    assert not flag.is_set()
    assert flag.wait(0.01) is False


def test_a_set_flag_answers_a_wait_at_once():
    flag = Flag()
    flag.set()
    assert flag.is_set()
    assert flag.wait(0) is True


def test_set_releases_a_waiter_blocked_in_another_thread():
    flag = Flag()
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(flag.wait(WAIT)))
    waiter.start()
    # Wait until the waiter blocks on the event it had to build.
    wait_until(lambda: flag._event is not None, WAIT, "the waiter to block")
    flag.set()
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert outcome == [True]


def test_clear_makes_a_later_wait_block_again():
    flag = Flag()
    flag.set()
    flag.wait(0)
    flag.clear()
    assert not flag.is_set()
    assert flag.wait(0.01) is False
    flag.set()
    assert flag.wait(0) is True
