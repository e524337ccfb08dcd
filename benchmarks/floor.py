"""The floor: plain pykka, no database at all.

A floor tree has one ``ThreadingActor`` per execution of the same shape. On a
``FloorStop`` an actor asks all its children at once (``ask(block=False)``),
waits for every reply, stops itself and replies: the same cascade as the
runtime's stop, minus every write. The runtime's cost above this floor is the
price of persisting each status before acknowledging it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pykka

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


class BareActor(pykka.ThreadingActor):
    """An actor that does nothing: pykka's own cost of a start and a stop."""


def build_floor_tree(shape: Shape) -> tuple[pykka.ActorRef, list[pykka.ActorRef]]:
    """Start one ``FloorNode`` per execution of ``shape``, leaves first.

    Returns:
        The root's reference and the references of every actor of the tree.
    """
    refs: list[pykka.ActorRef] = []

    def build(depth: int) -> pykka.ActorRef:
        fan_out = shape.levels[depth] if depth < shape.depth else 0
        children = [build(depth + 1) for _ in range(fan_out)]
        ref = FloorNode.start(children)
        refs.append(ref)
        return ref

    return build(0), refs


def time_floor_stop(shape: Shape) -> float:
    """Build a floor tree of ``shape`` and time the cascade of one stop from its root.

    The clock runs from the root's ``ask`` until its reply, as the runtime's
    figure runs from ``rt.stop`` until it returns. The tree is then waited for
    until every actor has stopped, outside the clock.

    Returns:
        The duration of the cascade, in seconds.
    """
    root, refs = build_floor_tree(shape)
    started = time.perf_counter()
    root.ask(FloorStop(), timeout=FLOOR_TIMEOUT_SECONDS)
    elapsed = time.perf_counter() - started
    _wait_stopped(refs)
    return elapsed


def bare_start_stop_rate(actors: int) -> float:
    """Start ``actors`` bare actors, then stop them all; return actors per second."""
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
