"""PooledActor and Dispatcher: pykka's actor contract, on shared threads.

Every test stops what it started (the ``dispatcher`` fixture closes its
threads, ``_stop_all`` stops any actor left), and every wait is bounded.
"""
from __future__ import annotations

import gc
import threading
import weakref
from typing import Any, Iterator

import pykka
import pytest

from actors.dispatch import TURN_MESSAGES, Dispatcher, PooledActor
from tests.helpers import wait_until

WAIT = 10.0


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    pool = Dispatcher(threads=2, name="test-dispatch")
    yield pool
    pykka.ActorRegistry.stop_all(block=True, timeout=WAIT)
    pool.close(timeout=WAIT)
    assert not any(thread.is_alive() for thread in pool.threads)


class Recorder(PooledActor):
    """Records what it handles; checks that no two turns of it ever overlap."""

    def __init__(self, dispatcher: Dispatcher, shared: list[Any] | None = None) -> None:
        super().__init__(dispatcher)
        self.events: list[Any] = []
        # Messages of several actors, in the order they were handled.
        self.shared = shared if shared is not None else []
        self.overlaps = 0
        self._inside = threading.Lock()

    def on_start(self) -> None:
        self.events.append("started")

    def on_stop(self) -> None:
        self.events.append("stopped")

    def on_receive(self, message: Any) -> Any:
        if not self._inside.acquire(blocking=False):
            self.overlaps += 1
            return None
        try:
            if message == "boom":
                raise ValueError("boom")
            if isinstance(message, threading.Event):
                message.wait(WAIT)  # holds this actor's turn until the test lets go
                return "released"
            self.events.append(message)
            self.shared.append(message)
            return ("echo", message)
        finally:
            self._inside.release()

    def snapshot(self) -> tuple[list[Any], int]:
        return list(self.events), self.overlaps


def test_ask_answers_and_on_start_runs_first(dispatcher):
    ref = Recorder.start(dispatcher)
    assert ref.ask("hello", timeout=WAIT) == ("echo", "hello")
    events, _ = ref.proxy().snapshot().get(timeout=WAIT)
    assert events == ["started", "hello"]


def test_messages_from_many_threads_are_handled_one_at_a_time_in_each_senders_order(dispatcher):
    ref = Recorder.start(dispatcher)
    senders, per_sender = 4, 300

    def send(sender: int) -> None:
        for index in range(per_sender):
            ref.tell((sender, index))

    threads = [threading.Thread(target=send, args=(sender,)) for sender in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    events, overlaps = ref.proxy().snapshot().get(timeout=WAIT)
    assert overlaps == 0
    received = [event for event in events if isinstance(event, tuple)]
    assert len(received) == senders * per_sender
    for sender in range(senders):
        assert [index for s, index in received if s == sender] == list(range(per_sender))


def test_an_exception_reaches_the_asker_and_the_actor_lives_on(dispatcher):
    ref = Recorder.start(dispatcher)
    with pytest.raises(ValueError, match="boom"):
        ref.ask("boom", timeout=WAIT)
    assert ref.ask("after", timeout=WAIT) == ("echo", "after")


def test_an_unanswered_failure_stops_the_actor(dispatcher):
    ref = Recorder.start(dispatcher)
    ref.tell("boom")  # no one to answer: pykka's rule is that the actor stops
    assert ref.actor_stopped.wait(WAIT)
    assert ref not in pykka.ActorRegistry.get_all()


def test_stop_unregisters_runs_on_stop_and_answers_what_was_still_queued(dispatcher):
    ref = Recorder.start(dispatcher)
    assert ref in pykka.ActorRegistry.get_all()
    gate = threading.Event()
    held = ref.ask(gate, block=False)  # the actor's turn waits on the gate
    stop = ref.stop(block=False)
    queued = ref.ask("too late", block=False)  # behind the stop in the mailbox
    gate.set()
    assert held.get(timeout=WAIT) == "released"
    stop.get(timeout=WAIT)
    with pytest.raises(pykka.ActorDeadError):
        queued.get(timeout=WAIT)
    assert ref not in pykka.ActorRegistry.get_all()
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("after the stop")


class Unregistered(Recorder):
    in_pykka_registry = False

    def on_stop(self) -> None:
        self.shared.append("stopped")


def test_an_actor_type_outside_pykkas_registry_keeps_the_actor_contract(dispatcher):
    shared: list[Any] = []
    ref = Unregistered.start(dispatcher, shared)
    try:
        assert ref not in pykka.ActorRegistry.get_all()
        assert ref.ask("hello", timeout=WAIT) == ("echo", "hello")
        assert ref.proxy().events.get(timeout=WAIT) == ["started", "hello"]
    finally:
        ref.stop(block=True, timeout=WAIT)
    assert ref.actor_stopped.is_set()
    assert shared == ["hello", "stopped"]
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("after the stop")


class Traced(PooledActor):
    """Hands out a weak reference to itself, to see when it is freed."""

    in_pykka_registry = False

    def __init__(self, dispatcher: Dispatcher, traces: list[weakref.ref[PooledActor]]) -> None:
        super().__init__(dispatcher)
        traces.append(weakref.ref(self))

    def on_receive(self, message: Any) -> Any:
        return message


def test_a_stopped_actor_is_freed_at_once_not_left_to_the_cycle_collector(dispatcher):
    traces: list[weakref.ref[PooledActor]] = []
    ref = Traced.start(dispatcher, traces)
    assert ref.ask("hello", timeout=WAIT) == "hello"
    gc.disable()  # only reference counting frees it now
    try:
        ref.stop(block=True, timeout=WAIT)
        # The caller keeps its ActorRef (and through it the mailbox), as a
        # parent execution keeps its children's.
        wait_until(lambda: traces[0]() is None, WAIT, "the stopped actor to be freed")
    finally:
        gc.enable()
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("after the stop")


def test_a_message_that_slips_in_after_the_stop_is_answered_not_lost(dispatcher):
    ref = Recorder.start(dispatcher)
    ref.stop(block=True, timeout=WAIT)
    # ActorRef.tell checks is_alive() before it puts; a sender that passed
    # that check just before the stop puts into the closed mailbox directly.
    from pykka._envelope import Envelope  # the envelope pykka itself would put

    reply = pykka.ThreadingFuture()
    ref.actor_inbox.put(Envelope("late", reply_to=reply))
    with pytest.raises(pykka.ActorDeadError):
        reply.get(timeout=WAIT)


def test_one_busy_actor_does_not_starve_another(dispatcher):
    single = Dispatcher(threads=1, name="test-single")
    try:
        order: list[Any] = []
        busy, other = Recorder.start(single, order), Recorder.start(single, order)
        gate = threading.Event()
        busy.tell(gate)  # holds the only thread until the gate opens
        for index in range(TURN_MESSAGES * 4):
            busy.tell(index)
        answer = other.ask("me", block=False)
        gate.set()
        assert answer.get(timeout=WAIT) == ("echo", "me")
        busy.ask("last", timeout=WAIT)
        # The other actor's message came after one turn of the busy actor, not after all of them.
        assert order.index("me") < TURN_MESSAGES
        assert order[-1] == "last" and len(order) == TURN_MESSAGES * 4 + 2
        busy.stop(timeout=WAIT)
        other.stop(timeout=WAIT)
    finally:
        single.close(timeout=WAIT)


def test_many_actors_share_a_few_threads(dispatcher):
    before = threading.active_count()
    refs = [Recorder.start(dispatcher) for _ in range(500)]
    assert threading.active_count() == before
    assert pykka.get_all([ref.ask(index, block=False) for index, ref in enumerate(refs)],
                         timeout=WAIT) == [("echo", index) for index in range(500)]
    pykka.get_all([ref.stop(block=False) for ref in refs], timeout=WAIT)
    assert all(not ref.is_alive() for ref in refs)


def test_a_dispatcher_needs_a_thread():
    with pytest.raises(ValueError, match="at least one thread"):
        Dispatcher(threads=0)
