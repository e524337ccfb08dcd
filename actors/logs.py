"""Log records about an execution carry its id, its parent's id and its root's id.

Both as attributes of the record (``extra=``, for structured handlers) and
in the message text, so a plain console log names them too.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class Identity:
    """Who an execution is: fixed for its whole life."""

    execution_id: str
    parent_id: str | None
    root_id: str
    graph_id: str
    user_id: str
    depth: int


class ExecutionLog:
    def __init__(self, logger: logging.Logger, identity: Identity) -> None:
        self._logger = logger
        self._extra = {
            "execution_id": identity.execution_id,
            "parent_id": identity.parent_id,
            "root_id": identity.root_id,
        }
        self._prefix = (
            f"execution {identity.execution_id} (parent {identity.parent_id}, root {identity.root_id}): "
        )

    def log(self, level: int, message: str, *args: Any, exc_info: Any = None) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, self._prefix + message, *args, extra=self._extra, exc_info=exc_info)

    def debug(self, message: str, *args: Any) -> None:
        self.log(logging.DEBUG, message, *args)

    def info(self, message: str, *args: Any) -> None:
        self.log(logging.INFO, message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.log(logging.WARNING, message, *args)

    def error(self, message: str, *args: Any, exc_info: Any = None) -> None:
        self.log(logging.ERROR, message, *args, exc_info=exc_info)
