"""The tables, as peewee models. They define the schema (DDL) only.

Row reads and writes are plain SQL in ``store.py`` and ``writes.py``, where a
reviewer can see every guard. Models are bound to a database only while the
schema is created or migrated (``schema.py``), so one process can hold
runtimes on several databases at once.
"""
from __future__ import annotations

import peewee

from persistence.status import ExecutionStatus

_STATUS_CHECK = "status IN ({})".format(", ".join(f"'{s.value}'" for s in ExecutionStatus))


class _Model(peewee.Model):
    class Meta:
        legacy_table_names = False


class GraphExecution(_Model):
    id = peewee.CharField(primary_key=True, max_length=36)
    graph_id = peewee.CharField()
    user_id = peewee.CharField(index=True)
    status = peewee.CharField(max_length=16, constraints=[peewee.Check(_STATUS_CHECK)])
    # The supervision link. Committed with the row, before the child runs.
    parent = peewee.ForeignKeyField(
        "self", null=True, column_name="parent_id", on_delete="SET NULL", index=True, backref="children"
    )
    depth = peewee.IntegerField(default=0)
    created_at = peewee.DateTimeField()
    started_at = peewee.DateTimeField(null=True)
    ended_at = peewee.DateTimeField(null=True)
    stop_requested_at = peewee.DateTimeField(null=True)
    stop_reason = peewee.TextField(null=True)
    inputs = peewee.TextField(default="{}")
    outputs = peewee.TextField(null=True)
    error = peewee.TextField(null=True)
    # Added in schema version 2 (see schema.py): which runtime hosts the row,
    # whether its pending stop cascades, and whether the stop had to force it.
    runtime_id = peewee.CharField(null=True)
    stop_cascade = peewee.BooleanField(default=True)
    stop_forced = peewee.BooleanField(default=False)
    # Added in schema version 3: the stored graph version (graph_version.version) it runs.
    graph_version = peewee.CharField(max_length=64, null=True)
    # Added in schema version 5: the seconds a stop request lets running work
    # wind down (the hosting runtime applies it; of several, the shortest),
    # and the runtime that asked, when it hosts the row itself (its actor has
    # the stop already: its own stop watcher leaves the request alone).
    stop_wait_timeout = peewee.DoubleField(null=True)
    stop_requested_by = peewee.CharField(null=True)

    class Meta:
        table_name = "graph_execution"
        # (runtime_id, status): a runtime's active rows without reading its
        # finished ones, which a long-lived worker gathers by the million
        # (schema version 4; see schema.py).
        indexes = ((("status", "created_at"), False), (("runtime_id", "status"), False))


class NodeExecution(_Model):
    id = peewee.AutoField()
    # No index of its own: the unique (graph_execution_id, node_id) index
    # below leads with it and serves every lookup by execution. A second
    # index only cost every insert and every status write of a node one more
    # index entry (schema version 6; see schema.py).
    graph_execution = peewee.ForeignKeyField(
        GraphExecution, column_name="graph_execution_id", on_delete="CASCADE", backref="nodes", index=False
    )
    node_id = peewee.CharField()
    block = peewee.CharField()
    status = peewee.CharField(max_length=16, constraints=[peewee.Check(_STATUS_CHECK)])
    started_at = peewee.DateTimeField(null=True)
    ended_at = peewee.DateTimeField(null=True)
    error = peewee.TextField(null=True)

    class Meta:
        table_name = "node_execution"
        indexes = ((("graph_execution", "node_id"), True),)


class RuntimeRow(_Model):
    """A runtime process that hosts executions (schema version 2)."""

    id = peewee.CharField(primary_key=True, max_length=36)
    host = peewee.CharField()
    pid = peewee.IntegerField()
    started_at = peewee.DateTimeField()
    heartbeat_at = peewee.DateTimeField()

    class Meta:
        table_name = "runtime"


class GraphVersionRow(_Model):
    """A graph definition as stored by ``load`` (schema version 3).

    ``definition`` is the canonical JSON of the graph and of every graph its
    agents may start; ``version`` is its SHA-256, so equal content is one row.
    """

    version = peewee.CharField(primary_key=True, max_length=64)
    graph_id = peewee.CharField(index=True)
    definition = peewee.TextField()
    created_at = peewee.DateTimeField()

    class Meta:
        table_name = "graph_version"


class SchemaVersion(_Model):
    version = peewee.IntegerField(primary_key=True)

    class Meta:
        table_name = "schema_version"


MODELS = (GraphExecution, NodeExecution, RuntimeRow, GraphVersionRow, SchemaVersion)
