"""Log records about an execution carry its id, its parent's id and its root's id.

Both as attributes of the record (``extra=``, for structured handlers) and
in the message text, so a plain console log names them too.
``configure_logging`` sets up run.py's handler: plain text, or one JSON
object per record with ``ACTORGRAPH_LOG_FORMAT=json``.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
from typing import Any

EXECUTION_FIELDS = ("execution_id", "parent_id", "root_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the execution's ids as fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in EXECUTION_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(environ: Any = os.environ) -> None:
    """Log to stderr at ``ACTORGRAPH_LOG`` (default WARNING), as text or, with ``ACTORGRAPH_LOG_FORMAT=json``, JSON."""
    handler = logging.StreamHandler()
    kind = environ.get("ACTORGRAPH_LOG_FORMAT", "text").lower()
    handler.setFormatter(JsonFormatter() if kind == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=environ.get("ACTORGRAPH_LOG", "WARNING").upper(), handlers=[handler])


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
