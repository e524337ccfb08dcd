"""A small promise: the result of a write (or of a stop), with callbacks.

``concurrent.futures.Future`` builds a Condition for every instance; a stop
of a thousand executions makes thousands of these, and almost nobody ever
blocks on them. A Promise makes its Event only when someone does block,
and a list of callbacks only when a second one is added; its lock is one of
a shared few. Every write of a stop has a promise that lives until the
commit, long enough to survive the garbage collector's young collections and
count towards its full ones: a promise is one object the collector tracks,
not three. It offers the subset of the Future API that actorgraph uses:
``done``, ``result``, ``exception``, ``set_result``, ``set_exception`` and
``add_done_callback``.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PENDING = object()

# Promises share these locks, picked by identity: each critical section is a
# few field reads and writes, so two promises rarely want the same one.
_LOCKS = tuple(threading.Lock() for _ in range(64))


def _lock_of(promise: object) -> threading.Lock:
    # Objects are 16-byte aligned: the address's low bits are always zero.
    return _LOCKS[(id(promise) >> 4) % len(_LOCKS)]


class Promise(Generic[T]):
    __slots__ = ("_value", "_error", "_callbacks", "_event")

    def __init__(self) -> None:
        self._value: Any = _PENDING
        self._error: BaseException | None = None
        # None, the one callback, or a list of them (most promises get one).
        self._callbacks: Callable[["Promise[T]"], Any] | list[Callable[["Promise[T]"], Any]] | None = None
        self._event: threading.Event | None = None

    @classmethod
    def resolved(cls, value: T) -> "Promise[T]":
        promise: Promise[T] = cls()
        promise._value = value
        return promise

    def done(self) -> bool:
        return self._value is not _PENDING or self._error is not None

    def set_result(self, value: T) -> None:
        self._settle(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        with _lock_of(self):
            if self.done():
                raise RuntimeError("promise already settled")
            if error is not None:
                self._error = error
            else:
                self._value = value
            callbacks, self._callbacks = self._callbacks, None
            event = self._event
        if event is not None:
            event.set()
        if isinstance(callbacks, list):
            for callback in callbacks:
                self._run(callback)
        elif callbacks is not None:
            self._run(callbacks)

    def add_done_callback(self, callback: Callable[["Promise[T]"], Any]) -> None:
        """Run ``callback(self)`` once settled: at once, here, if it already is."""
        with _lock_of(self):
            if not self.done():
                if self._callbacks is None:
                    self._callbacks = callback
                elif isinstance(self._callbacks, list):
                    self._callbacks.append(callback)
                else:
                    self._callbacks = [self._callbacks, callback]
                return
        self._run(callback)

    def _run(self, callback: Callable[["Promise[T]"], Any]) -> None:
        try:
            callback(self)
        except Exception:  # noqa: BLE001 - one listener must not break the others
            logger.exception("promise callback failed")

    def _wait(self, timeout: float | None) -> None:
        if self.done():
            return  # settled for good: no lock needed to read it
        with _lock_of(self):
            if self.done():
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not event.wait(timeout):
            raise TimeoutError(f"no result within {timeout}s")

    def result(self, timeout: float | None = None) -> T:
        """The value, waiting up to ``timeout`` seconds; raises the error if it failed."""
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._error
