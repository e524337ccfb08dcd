"""A pykka actor type whose turns run on a few shared threads.

``pykka.ThreadingActor`` gives every actor an OS thread of its own. A tree of
thousands of executions then costs thousands of threads, and a stop makes
them all runnable at once: on two cores the time goes into thread wake-ups,
GIL hand-offs and thread teardown, not into our work (see the README's
benchmark notes). pykka is built for other actor types to plug in: an actor
type supplies its inbox, its future and its loop (``_create_actor_inbox``,
``_create_future``, ``_start_actor_loop``, "for implementors of new actor
types" in ``pykka/_actor.py``). ``PooledActor`` is one: a real
``pykka.Actor`` with an ``ActorRef``, ``tell``/``ask``/proxies, registered in
``pykka.ActorRegistry`` (unless its type opts out: ``in_pykka_registry``),
whose turns a ``Dispatcher`` runs.

The actor contract is kept: an actor handles one message at a time, in the
order they arrived, and no two threads ever run the same actor at once (a
mailbox is scheduled at most once; see ``Mailbox.put``). What changes: a turn
must not block for long, since it holds one of the dispatcher's threads.
Every message still in a stopped actor's mailbox is answered (an ask gets
``ActorDeadError``), as pykka's own teardown does, and so is a message that
slips in after the stop, which a ThreadingActor would leave unanswered.
"""
from __future__ import annotations

import collections
import logging
import queue
import sys
import threading
from types import TracebackType
from typing import Any, ClassVar, Self

import pykka
from pykka import messages as pykka_messages

from actors.flag import Flag

logger = logging.getLogger(__name__)

# How many messages one actor handles before the next runnable actor gets a
# turn: enough to drain a burst in one go, small enough to stay fair.
TURN_MESSAGES = 32

_CLOSE = None


class Dispatcher:
    """A fixed set of threads that run the turns of ``PooledActor`` mailboxes.

    Args:
        threads: how many turns may run at once (a turn holds its thread
            until it returns). Under the GIL more threads add no speed,
            only room for a turn that waits, and contention: a second
            thread made the 1,365-execution stop about 15% slower, its turns
            keeping the GIL from the writer thread between its statements.
        name: prefix of the threads' names.
    """

    def __init__(self, threads: int = 1, name: str = "actorgraph-actors") -> None:
        if threads < 1:
            raise ValueError(f"a dispatcher needs at least one thread, not {threads}")
        self._runnable: queue.SimpleQueue[Mailbox | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
                         for index in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        return tuple(self._threads)

    def schedule(self, mailbox: "Mailbox") -> None:
        self._runnable.put(mailbox)

    def close(self, timeout: float = 10.0) -> None:
        """Let the threads finish the turns already scheduled, then end them (bounded wait)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._runnable.put(_CLOSE)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _work(self) -> None:
        while True:
            mailbox = self._runnable.get()
            if mailbox is _CLOSE:
                return
            try:
                mailbox.run_turn()
            except BaseException:  # noqa: BLE001 - a worker must outlive any one actor
                logger.exception("an actor's turn failed outside its handlers")


class Mailbox:
    """An actor's inbox that schedules its actor's turn when a message arrives.

    ``_scheduled`` is what makes an actor single-threaded: it is set (under
    the lock) by the put that finds the mailbox idle, and cleared only by the
    turn that finds it empty, so at most one turn of an actor is ever queued
    or running.
    """

    def __init__(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._closed = False
        self._actor: PooledActor | None = None
        # For refusals after the close, which lets go of the actor.
        self._ref: pykka.ActorRef | None = None
        self._dispatcher: Dispatcher | None = None

    # -- pykka's ActorInbox protocol ----------------------------------------

    def put(self, envelope: Any, /) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                self._queue.append(envelope)
                if self._scheduled or self._actor is None:
                    return
                self._scheduled = True
        if closed:
            _refuse(envelope, self._ref)
            return
        self._dispatcher.schedule(self)  # type: ignore[union-attr]

    def get(self) -> Any:
        with self._lock:
            return self._queue.popleft()

    def empty(self) -> bool:
        return not self._queue

    # -- the dispatcher's side --------------------------------------------------

    def attach(self, actor: "PooledActor", dispatcher: Dispatcher) -> None:
        """Bind the mailbox to its actor and schedule the first turn (``on_start``)."""
        with self._lock:
            self._actor = actor
            self._ref = actor.actor_ref
            self._dispatcher = dispatcher
            self._scheduled = True
        dispatcher.schedule(self)

    def run_turn(self) -> None:
        """Handle up to TURN_MESSAGES messages, then give the thread to the next actor in line."""
        actor = self._actor
        assert actor is not None
        if not actor._started:
            actor._begin()
        for _ in range(TURN_MESSAGES):
            envelope = self._next(actor)
            if envelope is None:
                return
            actor._handle_envelope(envelope)
        if self._next(actor, peek=True) is not None:
            # More is waiting: go to the back of the line, behind other actors.
            self._dispatcher.schedule(self)  # type: ignore[union-attr]

    def _next(self, actor: "PooledActor", peek: bool = False) -> Any:
        """The next message; None ends the turn (the actor stopped, or the mailbox is empty and idle)."""
        if actor.actor_stopped.is_set():
            self._close()
            return None
        with self._lock:
            if not self._queue:
                self._scheduled = False
                return None
            return self._queue[0] if peek else self._queue.popleft()

    def _close(self) -> None:
        """The actor stopped: answer everything left, and refuse what comes later.

        The mailbox then lets go of its actor. An actor and its mailbox refer
        to each other, a cycle that reference counting never frees: without
        this, every stopped actor, with everything it held, would wait for
        the garbage collector's cycle detection instead of going at once.
        A stop of 1,365 executions left about 24,000 such objects for the
        collector, and its full passes walk every object alive.
        """
        with self._lock:
            self._closed = True
            left, self._queue = list(self._queue), collections.deque()
            self._actor = None
        for envelope in left:
            _refuse(envelope, self._ref)


def _refuse(envelope: Any, ref: pykka.ActorRef | None) -> None:
    """Answer a message its stopped actor will never handle, as pykka's teardown does."""
    if envelope.reply_to is None:
        return
    if isinstance(envelope.message, pykka_messages._ActorStop):  # noqa: SLF001
        envelope.reply_to.set(None)
        return
    error = pykka.ActorDeadError(f"{ref or 'actor'} stopped before handling the message")
    envelope.reply_to.set_exception(exc_info=(pykka.ActorDeadError, error, None))


class PooledActor(pykka.Actor):
    """A pykka actor whose turns run on a ``Dispatcher`` instead of a thread of its own.

    Subclasses pass their dispatcher to ``__init__`` and implement
    ``on_receive`` (and optionally ``on_start``, ``on_stop``, ``on_failure``)
    as for any pykka actor. Handlers must return promptly.
    """

    # Whether ``start`` enters the actor in ``pykka.ActorRegistry``. pykka keeps
    # its registry in a list: entering is cheap, but every stop scans the list
    # to leave it, so a stop of n actors costs O(n²) there (about 250 ms of
    # the 2.1 s stop of an 11,111-execution tree). An actor type that keeps a
    # registry of its own opts out.
    in_pykka_registry: ClassVar[bool] = True
    # Errors that refuse one message, not the actor: an ask gets the error;
    # a tell is logged and dropped, and the actor handles its next message.
    # Any other error in a tell is a failure, and stops the actor (pykka's rule).
    refusals: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__()
        # A Flag for pykka's Event (see flag.py): the same API, one object
        # for the garbage collector instead of six. The ActorRef holds it
        # too, so it is made again with it.
        self.actor_stopped = Flag()  # type: ignore[assignment]
        self._actor_ref = pykka.ActorRef(self)
        self._dispatcher_ = dispatcher
        self._started = False

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> pykka.ActorRef[Self]:
        if cls.in_pykka_registry:
            return super().start(*args, **kwargs)
        actor = cls(*args, **kwargs)
        actor._start_actor_loop()
        return actor.actor_ref

    def _stop(self) -> None:
        if self.in_pykka_registry:
            super()._stop()
            return
        # pykka's own _stop, less leaving the registry it never entered.
        self.actor_stopped.set()
        try:
            self.on_stop()
        except Exception:  # noqa: BLE001 - as pykka: a failing on_stop is reported, the actor still stops
            self._handle_failure(*sys.exc_info())

    def on_refusal(self, message: Any, error: Exception) -> None:
        """A told message was refused (one of ``refusals``): nobody else hears of it, so log it."""
        logger.error("%s refused %r: %s", self, message, error)

    def stop_in_turn(self) -> None:
        """Stop now, from this actor's own turn, without a stop message.

        ``stop()`` queues a message and costs one more turn; an actor that
        knows it is done (its final status committed and announced) ends
        here instead. Messages still in its inbox are answered as after any
        stop: an ask gets ``ActorDeadError``, a tell is dropped.
        """
        self._stop()

    def fail_in_turn(self, exc_info: tuple[type[BaseException] | None, BaseException | None, TracebackType | None],
                     ) -> None:
        """Fail now, from this actor's own turn, as pykka fails an actor whose told message raised.

        The actor is marked stopped (the rest of its inbox is answered as
        after any stop), then ``on_failure`` runs; an error there is logged.
        """
        self._handle_failure(*exc_info)
        try:
            self.on_failure(*exc_info)
        except Exception:  # noqa: BLE001 - as pykka: reported, the actor is stopped already
            self._handle_failure(*sys.exc_info())

    @staticmethod
    def _create_actor_inbox() -> Mailbox:
        return Mailbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        self.actor_inbox.attach(self, self._dispatcher_)  # type: ignore[attr-defined]

    def _begin(self) -> None:
        self._started = True
        self._actor_loop_setup()  # pykka's: on_start, failures stop the actor

    def _handle_envelope(self, envelope: Any) -> None:
        """One message, with the error handling of pykka's own loop (``_actor_loop_running``)."""
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except self.refusals as refusal:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self.on_refusal(envelope.message, refusal)
        except Exception:
            if envelope.reply_to is not None:
                logger.info("Exception returned from %s to caller:", self, exc_info=sys.exc_info())
                envelope.reply_to.set_exception()
            else:
                self.fail_in_turn(sys.exc_info())
        except BaseException:  # noqa: BLE001 - as pykka: stop everything, never block here
            logger.debug("%r in %s. Stopping all actors.", sys.exc_info()[1], self)
            self._stop()
            pykka.ActorRegistry.stop_all(block=False)
