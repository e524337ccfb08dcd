"""A ``threading.Event`` that costs one object until somebody waits on it.

Every execution actor has two events: pykka's ``actor_stopped`` and its own
``halted`` (the spawn gate, and the ``stop_event`` user blocks see). A
``threading.Event`` is six objects for the garbage collector (the event, its
Condition, the Condition's lock, its deque of waiters and two bound
methods), so the two were twelve of the 33 that every live execution added
for each full collection to walk. Almost nobody ever waits on either: a
``Flag`` is a boolean, and builds a real Event only for a waiter.
"""
from __future__ import annotations

import threading

# Guards a flag's change against a waiter building its event. Each critical
# section is a few field reads and writes, so one lock serves every flag.
_LOCK = threading.Lock()


class Flag:
    """``is_set``, ``set``, ``clear`` and ``wait``, as ``threading.Event``."""

    __slots__ = ("_set", "_event")

    def __init__(self) -> None:
        self._set = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with _LOCK:
            self._set = True
            event = self._event
        if event is not None:
            event.set()

    def clear(self) -> None:
        with _LOCK:
            self._set = False
            if self._event is not None:
                self._event.clear()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is set or ``timeout`` seconds pass; return whether it is set."""
        if self._set:
            return True
        with _LOCK:
            if self._set:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def __repr__(self) -> str:
        return f"<Flag {'set' if self._set else 'unset'}>"
