"""The error tree every caller of actorgraph sees.

One base class, ``ActorGraphError``, and a few subclasses a caller can act
on. Driver errors (peewee, sqlite3, psycopg2) never leave ``persistence/``
untranslated: they are raised again as ``DatabaseError`` from the original.
"""
from __future__ import annotations


class ActorGraphError(Exception):
    """Base class of every error actorgraph raises on purpose."""


class NotFound(ActorGraphError, LookupError):
    """An execution id, graph id or live actor that does not exist (for this user)."""


class PermissionDenied(ActorGraphError):
    """A user acted on an execution that belongs to another user."""


class DatabaseError(ActorGraphError):
    """The database refused, failed or could not be reached."""


class LeaseLost(DatabaseError):
    """This runtime's lease lapsed and another process recovered its executions.

    Every write of the runtime is fenced by its lease: once its ``runtime``
    row is gone, nothing it submits is written any more.
    """


class TransitionRejected(ActorGraphError):
    """A status write found the row in a status it may not leave that way."""
