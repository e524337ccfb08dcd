"""Write operations: each one a frozen value that knows its SQL.

Actors never write directly: they hand operations to the writer
(``writer.py``), which runs many actors' operations in one transaction.
Consecutive operations of the same shape (the same ``merge_key``) become one
statement, so terminating a thousand executions is one guarded UPDATE.

Every status write is guarded by the statuses it may leave, taken from the
transition table, and returns which rows it really moved (``RETURNING id``):
a row that was already terminal is left alone and reported as not moved.

Within one transaction the writer runs operations phase by phase, keeping
submission order inside a phase (``PHASE`` below). That lets a stop of a
thousand executions become two statements (all their nodes, then all their
rows) instead of two per execution. The rule that makes it safe: an
operation depends only on operations of an earlier phase, or of its own
phase submitted before it (a child row is inserted before its nodes; nodes
end before their execution; a subtree forced TERMINATED before its parent's
row). Readers see the transaction whole, so the order inside it is
invisible to them.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Hashable, Self, Sequence

from persistence.dialect import MAX_PARAMS, Dialect, chunks, marks
from persistence.notifications import CLAIM_CHANNEL, STATUS_CHANNEL, stop_channel
from persistence.status import ACTIVE, ExecutionStatus, sources_of

_ACTIVE = tuple(sorted(s.value for s in ACTIVE))

# Advisory lock keys (any constants; they name actorgraph's locks among others).
CLAIM_LOCK = 0x6163746F7201     # claims run one at a time (the limits read consistent counts)
RECOVERY_LOCK = 0x6163746F7202  # one process recovers lost runtimes at a time
# A runtime's lease lock: the (int, int) advisory key space, ours by its first half.
_LEASE_LOCK_KEY = "1633906546, hashtext(?)"

SUBTREE_CTE = (
    "WITH RECURSIVE subtree(id) AS ("
    " SELECT id FROM graph_execution WHERE id = ?"
    " UNION ALL SELECT g.id FROM graph_execution g JOIN subtree s ON g.parent_id = s.id) "
)


class Operation:
    """One write. ``run`` executes it inside the writer's open transaction."""

    phase = 2
    # Whether it may change an execution's status: a transaction that runs
    # one tells the watchers at commit (PostgreSQL NOTIFY, see Writer._run).
    changes_status = False

    def merge_key(self) -> Hashable | None:
        """Operations with equal non-None keys may run as one statement."""
        return None

    def run(self, sql: Dialect) -> Any:
        raise NotImplementedError

    @classmethod
    def run_many(cls, sql: Dialect, ops: Sequence[Self]) -> list[Any]:
        return [op.run(sql) for op in ops]


@dataclasses.dataclass(frozen=True, kw_only=True)
class InsertExecution(Operation):
    """A new execution row; its parent link is committed with it."""

    changes_status = True

    id: str
    graph_id: str
    user_id: str
    status: ExecutionStatus
    parent_id: str | None
    depth: int
    runtime_id: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    inputs_json: str
    graph_version: str | None = None

    phase = 0
    _COLUMNS = ("id, graph_id, user_id, status, parent_id, depth, runtime_id, created_at, started_at, inputs,"
                " stop_cascade, stop_forced, graph_version")

    def merge_key(self) -> Hashable:
        return "insert-execution"

    def _values(self, sql: Dialect) -> tuple:
        return (self.id, self.graph_id, self.user_id, self.status.value, self.parent_id, self.depth,
                self.runtime_id, sql.time(self.created_at), sql.time(self.started_at), self.inputs_json,
                True, False, self.graph_version)

    def run(self, sql: Dialect) -> None:
        self.run_many(sql, [self])

    @classmethod
    def run_many(cls, sql: Dialect, ops: Sequence[Self]) -> list[None]:
        for part in chunks(ops, MAX_PARAMS // 13):
            rows = ", ".join("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" for _ in part)
            params = [value for op in part for value in op._values(sql)]
            sql.execute(f"INSERT INTO graph_execution ({cls._COLUMNS}) VALUES {rows}", params)
        return [None] * len(ops)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoveExecutions(Operation):
    """Move executions to ``target`` if their status allows it; returns the ids moved.

    ``started_at``/``ended_at`` are written only when given. Stop fields are
    kept if a stop request already set them (COALESCE): the first reason wins.
    """

    changes_status = True

    phase = 5
    ids: tuple[str, ...]
    target: ExecutionStatus
    at: dt.datetime
    outputs_json: str | None = None
    error: str | None = None
    stop_reason: str | None = None
    stop_forced: bool = False

    def merge_key(self) -> Hashable:
        # Not ``at``: every actor stamps its own time, and merged rows take the
        # latest of them (they all commit in the same transaction anyway).
        return ("move-executions", self.target, self.outputs_json, self.error,
                self.stop_reason, self.stop_forced)

    def run(self, sql: Dialect) -> tuple[str, ...]:
        return self.run_many(sql, [self])[0]

    @classmethod
    def run_many(cls, sql: Dialect, ops: Sequence[Self]) -> list[tuple[str, ...]]:
        first = dataclasses.replace(ops[0], at=max(op.at for op in ops))
        assignments, params = first._assignments(sql)
        sources = tuple(s.value for s in sources_of(first.target))
        all_ids = [i for op in ops for i in op.ids]
        moved: set[str] = set()
        for part in chunks(all_ids, MAX_PARAMS - 32):
            statement = (
                f"UPDATE graph_execution SET {assignments} WHERE id IN ({marks(part)})"
                f" AND status IN ({marks(sources)}) RETURNING id"
            )
            moved.update(row[0] for row in sql.fetchall(statement, [*params, *part, *sources]))
        # The same id asked twice in one batch moved once: credit the first asker.
        results = []
        for op in ops:
            mine = tuple(i for i in op.ids if i in moved)
            moved.difference_update(mine)
            results.append(mine)
        return results

    def _assignments(self, sql: Dialect) -> tuple[str, list[Any]]:
        parts = ["status = ?"]
        params: list[Any] = [self.target.value]
        if self.target is ExecutionStatus.RUNNING:
            parts.append("started_at = ?")
            params.append(sql.time(self.at))
        else:
            parts.append("ended_at = ?")
            params.append(sql.time(self.at))
        if self.outputs_json is not None:
            parts.append("outputs = ?")
            params.append(self.outputs_json)
        if self.error is not None:
            parts.append("error = ?")
            params.append(self.error)
        if self.stop_reason is not None:
            parts.append("stop_reason = COALESCE(stop_reason, ?)")
            parts.append("stop_requested_at = COALESCE(stop_requested_at, ?)")
            params.extend([self.stop_reason, sql.time(self.at)])
        if self.stop_forced:
            parts.append("stop_forced = ?")
            params.append(True)
        return ", ".join(parts), params


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeRow:
    """A node that became ready, as first written."""

    execution_id: str
    node_id: str
    block: str
    status: ExecutionStatus
    started_at: dt.datetime | None
    ended_at: dt.datetime | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class InsertNodes(Operation):
    phase = 1
    rows: tuple[NodeRow, ...]

    _COLUMNS = "graph_execution_id, node_id, block, status, started_at, ended_at, error"

    def merge_key(self) -> Hashable:
        return "insert-nodes"

    def run(self, sql: Dialect) -> None:
        self.run_many(sql, [self])

    @classmethod
    def run_many(cls, sql: Dialect, ops: Sequence[Self]) -> list[None]:
        rows = [row for op in ops for row in op.rows]
        for part in chunks(rows, MAX_PARAMS // 7):
            values = ", ".join("(?, ?, ?, ?, ?, ?, ?)" for _ in part)
            params = [v for r in part for v in (r.execution_id, r.node_id, r.block, r.status.value,
                                               sql.time(r.started_at), sql.time(r.ended_at), r.error)]
            sql.execute(f"INSERT INTO node_execution ({cls._COLUMNS}) VALUES {values}", params)
        return [None] * len(ops)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoveNodes(Operation):
    """Move one execution's nodes to ``target``; returns the number of rows moved.

    ``node_ids=None`` means every node of the execution still QUEUED or RUNNING:
    the form a stop uses, mergeable across executions.
    """

    phase = 3
    execution_id: str
    node_ids: tuple[str, ...] | None
    target: ExecutionStatus
    at: dt.datetime
    error: str | None = None

    def merge_key(self) -> Hashable | None:
        return None if self.node_ids is not None else ("move-all-nodes", self.target, self.error)

    def run(self, sql: Dialect) -> int:
        if self.node_ids is None:
            return self.run_many(sql, [self])[0]
        sources = tuple(s.value for s in sources_of(self.target))
        time_column = "started_at" if self.target is ExecutionStatus.RUNNING else "ended_at"
        cursor = sql.execute(
            f"UPDATE node_execution SET status = ?, {time_column} = ?, error = COALESCE(?, error)"
            f" WHERE graph_execution_id = ? AND node_id IN ({marks(self.node_ids)})"
            f" AND status IN ({marks(sources)})",
            [self.target.value, sql.time(self.at), self.error, self.execution_id, *self.node_ids, *sources],
        )
        return cursor.rowcount

    @classmethod
    def run_many(cls, sql: Dialect, ops: Sequence[Self]) -> list[int]:
        first = ops[0]
        at = max(op.at for op in ops)
        ids = [op.execution_id for op in ops]
        moved: dict[str, int] = {}
        for part in chunks(ids, MAX_PARAMS - 32):
            rows = sql.fetchall(
                f"UPDATE node_execution SET status = ?, ended_at = ?, error = COALESCE(?, error)"
                f" WHERE graph_execution_id IN ({marks(part)}) AND status IN ({marks(_ACTIVE)})"
                f" RETURNING graph_execution_id",
                [first.target.value, sql.time(at), first.error, *part, *_ACTIVE],
            )
            for (execution_id,) in rows:
                moved[execution_id] = moved.get(execution_id, 0) + 1
        return [moved.pop(op.execution_id, 0) for op in ops]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestStop(Operation):
    """Persist a stop request on one active execution; returns its id if it was active.

    Written before anything is signalled, so a crash mid-stop still ends the
    rows TERMINATED on recovery: with ``cascade``, the request covers every
    descendant too (recovery follows the tree), without one row per
    descendant here. Each row also gets its stop fields when it ends.
    """

    execution_id: str
    reason: str
    cascade: bool
    at: dt.datetime
    # The seconds running work may take to wind down: the hosting runtime
    # applies it. Of several requests the shortest is kept, so the earliest
    # deadline wins there as it does in an actor.
    wait_timeout: float
    # The runtime that asks, when it hosts the execution itself: its actor is
    # already stopping, so neither its stop channel nor its stop watcher hands
    # the request back to it. Only the first request of a row is marked so:
    # one from elsewhere after it clears the mark, and is delivered.
    by_host: str | None = None

    def run(self, sql: Dialect) -> tuple[str, ...]:
        # Every SET expression reads the row as it was before this UPDATE.
        rows = sql.fetchall(
            f"UPDATE graph_execution SET stop_requested_at = COALESCE(stop_requested_at, ?),"
            f" stop_reason = COALESCE(stop_reason, ?), stop_cascade = ?,"
            f" stop_wait_timeout = CASE WHEN stop_wait_timeout IS NULL OR stop_wait_timeout > ?"
            f" THEN ? ELSE stop_wait_timeout END,"
            f" stop_requested_by = CASE WHEN stop_requested_at IS NULL THEN ? ELSE NULL END"
            f" WHERE id = ? AND status IN ({marks(_ACTIVE)}) RETURNING id, runtime_id",
            [sql.time(self.at), self.reason, self.cascade, self.wait_timeout, self.wait_timeout,
             self.by_host, self.execution_id, *_ACTIVE],
        )
        if not sql.is_sqlite and rows and rows[0][1] not in (None, self.by_host):
            # Delivered at commit to the hosting runtime alone (its own channel):
            # it reacts at once, and no other runtime wakes for it.
            sql.execute("SELECT pg_notify(?, ?)", [stop_channel(rows[0][1]), self.execution_id])
        return tuple(row[0] for row in rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TerminateSubtree(Operation):
    """End an execution and every active descendant TERMINATED; returns the ids moved.

    Used for children that did not acknowledge a stop before its deadline and
    for the subtrees of runtimes that are gone. Nodes are ended with them.
    """

    changes_status = True

    phase = 4
    execution_id: str
    reason: str
    at: dt.datetime
    forced: bool
    include_root: bool = True

    def run(self, sql: Dialect) -> tuple[str, ...]:
        root_filter = "" if self.include_root else " AND id <> ?"
        rows = sql.fetchall(
            f"{SUBTREE_CTE}UPDATE graph_execution SET status = ?, ended_at = ?,"
            f" stop_requested_at = COALESCE(stop_requested_at, ?), stop_reason = COALESCE(stop_reason, ?),"
            f" stop_forced = ? WHERE id IN (SELECT id FROM subtree) AND status IN ({marks(_ACTIVE)})"
            f"{root_filter} RETURNING id",
            [self.execution_id, ExecutionStatus.TERMINATED.value, sql.time(self.at), sql.time(self.at),
             self.reason, self.forced, *_ACTIVE, *([] if self.include_root else [self.execution_id])],
        )
        moved = tuple(row[0] for row in rows)
        _end_nodes(sql, moved, ExecutionStatus.TERMINATED, self.at, None)
        return moved


@dataclasses.dataclass(frozen=True)
class LostRuntime:
    """A runtime found gone, with the heartbeat it had when it was found (None: not registered)."""

    id: str
    description: str
    heartbeat_at: dt.datetime | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoverLostRuntimes(Operation):
    """End every active execution hosted by runtimes that are gone.

    A row with a pending stop request ends TERMINATED (the stop wins); every
    other row ends FAILED with an error naming the lost runtime. Both updates
    run in the writer's one transaction, so no reader ever sees a parent
    ended while its child is still active. Returns the ids ended.

    A runtime is taken only if its row still holds the heartbeat it had when
    it was found gone (compare-and-delete): one that renewed its lease
    meanwhile is left alone. Deleting its row is what fences it: every write
    of a runtime first holds its lease (``begin_transaction``), so it waits for
    this transaction and then finds the row gone. On PostgreSQL one process
    recovers at a time, under an advisory lock; another that finds the lock
    taken recovers nothing.
    """

    changes_status = True

    phase = 6
    runtimes: tuple[LostRuntime, ...]
    at: dt.datetime

    # Rows whose stop was requested, on them or (cascading) on an ancestor.
    _STOPPED = (
        "WITH RECURSIVE stopped(id, cascade) AS ("
        " SELECT id, stop_cascade FROM graph_execution WHERE runtime_id = ? AND stop_requested_at IS NOT NULL"
        " UNION ALL SELECT g.id, s.cascade FROM graph_execution g JOIN stopped s ON g.parent_id = s.id"
        " WHERE s.cascade = ?) "
    )

    def run(self, sql: Dialect) -> tuple[str, ...]:
        if not sql.is_sqlite and not sql.fetchall("SELECT pg_try_advisory_xact_lock(?)", [RECOVERY_LOCK])[0][0]:
            return ()
        ended: list[str] = []
        for runtime in self.runtimes:
            if _take_lease(sql, runtime):
                ended.extend(self._end_executions(sql, runtime.id, runtime.description))
        return tuple(ended)

    def _end_executions(self, sql: Dialect, runtime_id: str, description: str) -> list[str]:
        terminated = sql.fetchall(
            f"{self._STOPPED}UPDATE graph_execution SET status = ?, ended_at = ?,"
            f" stop_requested_at = COALESCE(stop_requested_at, ?),"
            f" stop_reason = COALESCE(stop_reason, ?)"
            f" WHERE id IN (SELECT id FROM stopped) AND runtime_id = ?"
            f" AND status IN ({marks(_ACTIVE)}) RETURNING id",
            [runtime_id, True, ExecutionStatus.TERMINATED.value, sql.time(self.at), sql.time(self.at),
             f"stopped; runtime {description} was lost", runtime_id, *_ACTIVE],
        )
        failed = sql.fetchall(
            f"UPDATE graph_execution SET status = ?, ended_at = ?, error = ? WHERE runtime_id = ?"
            f" AND status IN ({marks(_ACTIVE)}) RETURNING id",
            [ExecutionStatus.FAILED.value, sql.time(self.at), f"runtime {description} was lost",
             runtime_id, *_ACTIVE],
        )
        _end_nodes(sql, [r[0] for r in terminated], ExecutionStatus.TERMINATED, self.at, None)
        _end_nodes(sql, [r[0] for r in failed], ExecutionStatus.FAILED, self.at,
                   f"runtime {description} was lost")
        return [row[0] for row in terminated + failed]


def _take_lease(sql: Dialect, runtime: LostRuntime) -> bool:
    """Delete a lost runtime's row if it is as it was found; False if it came back meanwhile.

    On PostgreSQL the runtime's lease lock is taken first, exclusively: it
    waits for no transaction of that runtime (one cut off mid-commit holds
    its lock until the server ends its session, after
    idle_in_transaction_session_timeout); such a runtime is skipped, and the
    next round takes it.
    """
    if not sql.is_sqlite and not sql.fetchall(
            f"SELECT pg_try_advisory_xact_lock({_LEASE_LOCK_KEY})", [runtime.id])[0][0]:
        return False
    if runtime.heartbeat_at is None:
        return not sql.fetchall("SELECT id FROM runtime WHERE id = ?", [runtime.id])
    rows = sql.fetchall("SELECT heartbeat_at FROM runtime WHERE id = ?", [runtime.id])
    held = Dialect.read_time(rows[0][0]) if rows else None
    if held is None or held.replace(tzinfo=None) != runtime.heartbeat_at:
        return False
    sql.execute("DELETE FROM runtime WHERE id = ?", [runtime.id])
    return True


def begin_transaction(sql: Dialect, lease_holder: str | None, changes_status: bool) -> bool:
    """The first statement of every write transaction: the lease fence and the watchers' notice.

    Returns False if ``lease_holder``'s lease is gone (then nothing may be
    written). On PostgreSQL the transaction takes the runtime's lease lock
    shared (an advisory lock: in memory, no WAL), so the runtime's own
    transactions run side by side, while a recovery, which takes it
    exclusively before it deletes the runtime's row, waits for none of them
    and none runs beside it: a write either commits before the recovery
    looks, or sees the row gone and writes nothing. SQLite writes one
    transaction at a time anyway. A transaction that changes a status also
    NOTIFYs the watchers (delivered at commit, and only if it commits),
    in the same statement as the check.
    """
    lock = ""
    parts: list[str] = []
    params: list[Any] = []
    if lease_holder is not None:
        if not sql.is_sqlite:
            # A statement of its own, before the check: in READ COMMITTED each
            # statement reads with a snapshot taken when it starts, so the
            # check sees any recovery that committed while this waited for
            # the lock. Both go in one round trip.
            lock = f"SELECT pg_advisory_xact_lock_shared({_LEASE_LOCK_KEY}); "
            params.append(lease_holder)
        parts.append("EXISTS (SELECT 1 FROM runtime WHERE id = ?)")
        params.append(lease_holder)
    if changes_status and not sql.is_sqlite:
        parts.append("pg_notify(?, '') IS NOT NULL")  # pg_notify returns void, which is not NULL
        params.append(STATUS_CHANNEL)
    if not parts:
        return True
    (row,) = sql.fetchall(f"{lock}SELECT {', '.join(parts)}", params)
    return all(row)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreGraphVersions(Operation):
    """Store graph definitions by version; a version already stored is left as it is."""

    phase = 0
    versions: tuple[tuple[str, str, str], ...]  # (version, graph id, canonical JSON definition)
    at: dt.datetime

    def run(self, sql: Dialect) -> None:
        for version, graph_id, definition in self.versions:
            sql.execute(
                "INSERT INTO graph_version (version, graph_id, definition, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (version) DO NOTHING",
                [version, graph_id, definition, sql.time(self.at)],
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class WakeWorkers(Operation):
    """Tell every LISTENing worker, at commit, that a root of ``graph_version`` waits (PostgreSQL)."""

    phase = 6
    graph_version: str

    def run(self, sql: Dialect) -> None:
        if not sql.is_sqlite:
            sql.execute("SELECT pg_notify(?, ?)", [CLAIM_CHANNEL, self.graph_version])


@dataclasses.dataclass(frozen=True)
class ClaimedRoot:
    id: str
    graph_id: str
    user_id: str
    graph_version: str
    inputs_json: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClaimRoots(Operation):
    """Claim up to ``limit`` submitted roots for ``runtime_id``: QUEUED -> RUNNING, owned.

    PostgreSQL only. Roots are taken oldest first; rows another transaction
    holds (another worker's claim, a stop ending an unclaimed root) are
    skipped, not waited for (FOR UPDATE SKIP LOCKED), so claims of many
    workers run side by side. Only roots of ``versions``, the graph versions
    this worker can run, are considered.

    With limits, claims run one at a time (a transaction-scoped advisory
    lock), so that the running counts they read cannot change under them:
    two workers never both take the last slot of a user. Each user (and
    each user and graph) gets only as many of its oldest queued roots as its
    free slots: a limited root never overtakes an older one of the same user.
    """

    changes_status = True

    runtime_id: str
    versions: tuple[str, ...]
    limit: int
    per_user: int | None
    per_graph: int | None
    at: dt.datetime

    def run(self, sql: Dialect) -> tuple[ClaimedRoot, ...]:
        if sql.is_sqlite:
            raise ValueError("claiming submitted roots needs PostgreSQL")
        if not self.versions or self.limit < 1:
            return ()
        limited = bool(self.per_user or self.per_graph)
        if limited:
            # The running counts must not change under this claim: claims
            # with limits run one at a time, until this transaction ends.
            sql.execute("SELECT pg_advisory_xact_lock(?)", [CLAIM_LOCK])
        chosen = self._within_limits() if limited else self._oldest()
        rows = sql.fetchall(
            f"WITH {chosen} UPDATE graph_execution SET status = 'RUNNING', runtime_id = ?, started_at = ?"
            " WHERE id IN (SELECT g.id FROM graph_execution g JOIN chosen c ON c.id = g.id"
            "  WHERE g.status = 'QUEUED' AND g.runtime_id IS NULL FOR UPDATE OF g SKIP LOCKED)"
            " RETURNING id, graph_id, user_id, graph_version, inputs, created_at",
            [*self._chosen_params(limited), self.runtime_id, sql.time(self.at)],
        )
        # Oldest first: the order the worker starts them in.
        rows.sort(key=lambda row: (row[5], row[0]))
        return tuple(ClaimedRoot(id=row[0], graph_id=row[1], user_id=row[2], graph_version=row[3],
                                 inputs_json=row[4]) for row in rows)

    def _oldest(self) -> str:
        """Without limits: the oldest waiting roots; claims on other workers run alongside (SKIP LOCKED)."""
        # Locked as chosen: a worker claiming beside us skips these and takes the next ones.
        return ("chosen AS (SELECT id FROM graph_execution WHERE status = 'QUEUED' AND parent_id IS NULL"
                f" AND runtime_id IS NULL AND graph_version IN ({marks(self.versions)})"
                " ORDER BY created_at, id LIMIT ? FOR UPDATE SKIP LOCKED)")

    def _within_limits(self) -> str:
        """With limits: the oldest waiting roots that fit their user's (and user and graph's) free slots."""
        return (
            "running AS ("
            "  SELECT user_id, graph_id, COUNT(*) AS n FROM graph_execution"
            "  WHERE parent_id IS NULL AND status = 'RUNNING' GROUP BY user_id, graph_id),"
            " by_user AS (SELECT user_id, SUM(n) AS n FROM running GROUP BY user_id),"
            " waiting AS ("
            "  SELECT id, user_id, graph_id, created_at, ROW_NUMBER() OVER ("
            "   PARTITION BY user_id, graph_id ORDER BY created_at, id) AS graph_place"
            "  FROM graph_execution WHERE status = 'QUEUED' AND parent_id IS NULL AND runtime_id IS NULL"
            f"  AND graph_version IN ({marks(self.versions)})),"
            " fits_graph AS ("
            "  SELECT w.id, w.user_id, w.created_at, ROW_NUMBER() OVER ("
            "   PARTITION BY w.user_id ORDER BY w.created_at, w.id) AS user_place"
            "  FROM waiting w LEFT JOIN running r ON r.user_id = w.user_id AND r.graph_id = w.graph_id"
            "  WHERE w.graph_place + COALESCE(r.n, 0) <= ?),"
            " chosen AS ("
            "  SELECT f.id FROM fits_graph f LEFT JOIN by_user u ON u.user_id = f.user_id"
            "  WHERE f.user_place + COALESCE(u.n, 0) <= ? ORDER BY f.created_at, f.id LIMIT ?)"
        )

    def _chosen_params(self, limited: bool) -> list[Any]:
        if not limited:
            return [*self.versions, self.limit]
        unlimited = 2**31 - 1
        return [*self.versions, self.per_graph or unlimited, self.per_user or unlimited, self.limit]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TerminateUnclaimed(Operation):
    """End a submitted root that no worker claimed yet; returns its id if it moved.

    Guarded by ``runtime_id IS NULL``: a root a worker claimed meanwhile is
    left to its worker (the caller then stops it there).
    """

    changes_status = True

    execution_id: str
    reason: str
    at: dt.datetime

    def run(self, sql: Dialect) -> tuple[str, ...]:
        rows = sql.fetchall(
            "UPDATE graph_execution SET status = ?, ended_at = ?, stop_requested_at = COALESCE(stop_requested_at, ?),"
            " stop_reason = COALESCE(stop_reason, ?) WHERE id = ? AND status = ? AND runtime_id IS NULL"
            " RETURNING id",
            [ExecutionStatus.TERMINATED.value, sql.time(self.at), sql.time(self.at), self.reason,
             self.execution_id, ExecutionStatus.QUEUED.value],
        )
        return tuple(row[0] for row in rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegisterRuntime(Operation):
    id: str
    host: str
    pid: int
    at: dt.datetime

    def run(self, sql: Dialect) -> None:
        sql.execute(
            "INSERT INTO runtime (id, host, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
            [self.id, self.host, self.pid, sql.time(self.at), sql.time(self.at)],
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Heartbeat(Operation):
    runtime_id: str
    at: dt.datetime

    def run(self, sql: Dialect) -> int:
        return sql.execute(
            "UPDATE runtime SET heartbeat_at = ? WHERE id = ?", [sql.time(self.at), self.runtime_id]
        ).rowcount


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnregisterRuntime(Operation):
    runtime_id: str

    def run(self, sql: Dialect) -> None:
        sql.execute("DELETE FROM runtime WHERE id = ?", [self.runtime_id])


def _end_nodes(sql: Dialect, execution_ids: Sequence[str], target: ExecutionStatus,
               at: dt.datetime, error: str | None) -> None:
    for part in chunks(list(execution_ids), MAX_PARAMS - 32):
        sql.execute(
            f"UPDATE node_execution SET status = ?, ended_at = ?, error = COALESCE(?, error)"
            f" WHERE graph_execution_id IN ({marks(part)}) AND status IN ({marks(_ACTIVE)})",
            [target.value, sql.time(at), error, *part, *_ACTIVE],
        )
