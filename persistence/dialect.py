"""The few differences between SQLite and PostgreSQL that plain SQL meets.

Statements are written once with ``?`` placeholders; PostgreSQL's driver
wants ``%s``. Timestamps are stored as naive UTC (peewee's DateTimeField
layout on SQLite) and handed to callers as aware UTC datetimes.
"""
from __future__ import annotations

import datetime as dt
from functools import lru_cache
from typing import Any, Iterable, Sequence

import peewee

from persistence.database import SqliteDatabase

_SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

# SQLite accepts 32,766 bound parameters per statement; stay well below.
MAX_PARAMS = 30_000


def utcnow() -> dt.datetime:
    """The current time, naive UTC: the form every timestamp column holds."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Dialect:
    """Executes SQL on one database, adapting placeholders and timestamps."""

    def __init__(self, database: peewee.Database) -> None:
        self.database = database
        self.is_sqlite = isinstance(database, SqliteDatabase)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.database.execute_sql(self._placeholders(sql), tuple(params))

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cursor = self.execute(sql, params)
        try:
            return cursor.fetchall()
        finally:
            cursor.close()

    def _placeholders(self, sql: str) -> str:
        return sql if self.is_sqlite else _percent_placeholders(sql)

    def time(self, value: dt.datetime | None) -> Any:
        """A timestamp as the driver should bind it."""
        if value is None or not self.is_sqlite:
            return value
        return value.strftime(_SQLITE_TIME_FORMAT)

    @staticmethod
    def read_time(value: Any) -> dt.datetime | None:
        """A stored timestamp as an aware UTC datetime."""
        if value is None:
            return None
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        return value.replace(tzinfo=dt.timezone.utc)


@lru_cache(maxsize=256)
def _percent_placeholders(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def marks(values: Iterable[Any]) -> str:
    """``?, ?, ?`` for an IN list of the given values."""
    return ", ".join("?" for _ in values)


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
