"""The floors: the same cascade with no database at all.

The floor the issue names is plain pykka: one ``ThreadingActor`` per
execution of the same shape. On a ``FloorStop`` an actor asks all its
children at once (``ask(block=False)``), waits for every reply, stops itself
and replies: the same cascade as the runtime's stop, minus every write.

The runtime's actors are not ThreadingActors: they share a dispatcher's
threads (``actors/dispatch.py``). So a second floor runs the same cascade on
that actor type, with no database: the runtime's cost above *it* is the
price of persisting each status before acknowledging it, and the gap between
the two floors is what sharing threads saves.
"""
from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pykka

from actors.dispatch import Dispatcher, PooledActor
from benchmarks.shapes import Shape

# Bounds every wait on floor actors; a healthy floor needs a fraction of it.
FLOOR_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class FloorStop:
    """The floor's stop message; it carries nothing, as nothing is persisted."""


class FloorNode(pykka.ThreadingActor):
    """An actor holding references to its children's actors."""

    def __init__(self, children: list[pykka.ActorRef]) -> None:
        super().__init__()
        self._children = children

    def on_receive(self, message: object) -> object:
        if not isinstance(message, FloorStop):
            return None
        # Children first and in parallel, then ourselves: as the runtime does.
        replies = [child.ask(message, block=False) for child in self._children]
        pykka.get_all(replies, timeout=FLOOR_TIMEOUT_SECONDS)
        self.stop()
        return True


@dataclass(frozen=True)
class PooledFloorStop:
    """The pooled floor's stop: a pooled actor must not block its turn, so it replies by callback."""

    on_done: Callable[[], None]


class PooledFloorNode(PooledActor):
    """The same cascade on the runtime's actor type: tell every child, count their replies."""

    # As the runtime's execution actors: not in pykka's registry (see PooledActor).
    in_pykka_registry = False

    def __init__(self, dispatcher: Dispatcher, children: list[pykka.ActorRef]) -> None:
        super().__init__(dispatcher)
        self._children = children
        self._waiting = 0
        self._lock = threading.Lock()
        self._on_done: Callable[[], None] | None = None

    def on_receive(self, message: object) -> None:
        if not isinstance(message, PooledFloorStop):
            return
        self._on_done = message.on_done
        self._waiting = len(self._children)
        if not self._children:
            self._finish()
        for child in self._children:
            child.tell(PooledFloorStop(on_done=self._child_done))

    def _child_done(self) -> None:
        with self._lock:
            self._waiting -= 1
            last = self._waiting == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        self.stop()
        self._on_done()  # type: ignore[misc]


class BareActor(pykka.ThreadingActor):
    """An actor that does nothing: pykka's own cost of a start and a stop."""


def build_floor_tree(shape: Shape, start: Callable[[list[pykka.ActorRef]], pykka.ActorRef] = FloorNode.start,
                     ) -> tuple[pykka.ActorRef, list[pykka.ActorRef]]:
    """Start one floor actor per execution of ``shape``, leaves first.

    Args:
        shape: the tree to build.
        start: starts one actor, given its children's references
            (default: a plain-pykka ``FloorNode``).

    Returns:
        The root's reference and the references of every actor of the tree.
    """
    refs: list[pykka.ActorRef] = []

    def build(depth: int) -> pykka.ActorRef:
        fan_out = shape.levels[depth] if depth < shape.depth else 0
        ref = start([build(depth + 1) for _ in range(fan_out)])
        refs.append(ref)
        return ref

    return build(0), refs


def time_pooled_floor_stop(shape: Shape, dispatcher: Dispatcher) -> float:
    """Build a pooled floor tree of ``shape`` on ``dispatcher`` and time one cascading stop.

    Returns:
        The duration of the cascade, in seconds.
    """
    root, refs = build_floor_tree(shape, lambda children: PooledFloorNode.start(dispatcher, children))
    done = threading.Event()
    gc.collect()
    started = time.perf_counter()
    root.tell(PooledFloorStop(on_done=done.set))
    if not done.wait(FLOOR_TIMEOUT_SECONDS):
        raise TimeoutError(f"pooled floor tree did not stop within {FLOOR_TIMEOUT_SECONDS}s")
    elapsed = time.perf_counter() - started
    _wait_stopped(refs)
    return elapsed


def time_floor_stop(shape: Shape) -> float:
    """Build a floor tree of ``shape`` and time the cascade of one stop from its root.

    The clock runs from the root's ``ask`` until its reply, as the runtime's
    figure runs from ``rt.stop`` until it returns. The tree is then waited for
    until every actor has stopped, outside the clock.

    Returns:
        The duration of the cascade, in seconds.
    """
    root, refs = build_floor_tree(shape)
    gc.collect()  # garbage of earlier figures is not this one's to collect
    started = time.perf_counter()
    root.ask(FloorStop(), timeout=FLOOR_TIMEOUT_SECONDS)
    elapsed = time.perf_counter() - started
    _wait_stopped(refs)
    return elapsed


def bare_start_stop_rate(actors: int) -> float:
    """Start ``actors`` bare actors, then stop them all; return actors per second."""
    gc.collect()
    started = time.perf_counter()
    refs = [BareActor.start() for _ in range(actors)]
    pykka.get_all([ref.stop(block=False) for ref in refs], timeout=FLOOR_TIMEOUT_SECONDS)
    elapsed = time.perf_counter() - started
    _wait_stopped(refs)
    return actors / elapsed


def _wait_stopped(refs: list[pykka.ActorRef]) -> None:
    deadline = time.monotonic() + FLOOR_TIMEOUT_SECONDS
    for ref in refs:
        if not ref.actor_stopped.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"floor actor {ref} did not stop within {FLOOR_TIMEOUT_SECONDS}s")
