"""Replies that come later than ``on_receive`` returns.

pykka answers an ``ask`` with whatever ``on_receive`` returns. A stop cannot
answer then: it must first hear from its children and from the writer. So
an actor returns a ``Promise`` instead, and the reply future that pykka
created for the ask (our ``_ReplyFuture``) settles when that promise does.
The actor's turn never blocks waiting for it.
"""
from __future__ import annotations

from typing import Any

import pykka

from actors.dispatch import PooledActor
from persistence import Promise


class _ReplyFuture(pykka.ThreadingFuture):
    def set(self, value: Any | None = None) -> None:
        if isinstance(value, Promise):
            value.add_done_callback(self._settle)
            return
        super().set(value)

    def _settle(self, done: Promise) -> None:
        error = done.exception()
        if error is not None:
            super().set_exception((type(error), error, error.__traceback__))
        else:
            super().set(done.result())


class DeferredReplyActor(PooledActor):
    """A pooled actor whose ``on_receive`` may return a promise to reply later."""

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return _ReplyFuture()
