"""Shared steps of the worker acceptance tests: the graphs, a launcher for workers and submitters.

Workers and submitters are real processes: ``python run.py worker|submit|stop``
and ``python -m tests.acceptance.workers_submit`` (an ``actors.Client`` that
submits many roots without paying one interpreter start-up per root). The
test observes everything through a PostgreSQL connection of its own.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.acceptance.conftest import Cli, CliProcess
from tests.acceptance.worker_blocks import RECORD_DB_ENV
from tests.helpers import Observer, wait_until
from tests.integration.graphs import leaf, quick, sleeper

REPO = Path(__file__).resolve().parents[2]
BLOCKS_MODULE = "tests.acceptance.worker_blocks"

# A sleep this long never ends during a test: only a stop (or a lost worker) ends it.
LONG_SLEEP = 300
# How long a limited root runs: long enough that the limits matter, short enough for the budget.
NAP_SECONDS = 0.5
# What the draining worker lets finish.
DRAIN_SECONDS = 2.0

READY = re.compile(r"^worker (\S+) ready$")
ACTIVE = ("QUEUED", "RUNNING")
TERMINAL = ("COMPLETED", "FAILED", "TERMINATED")

# Bounds: a 2-core machine, every process importing peewee, pykka and psycopg2.
READY_TIMEOUT = 60.0
SETTLE_TIMEOUT = 60.0


def _two_children(seconds: float) -> dict[str, Any]:
    return {
        "nodes": {
            "a": {"block": "agent", "input": {"graph": "leaf", "inputs": {"seconds": seconds}}},
            "b": {"block": "agent", "input": {"graph": "leaf", "inputs": {"seconds": seconds}}},
        }
    }


WORKER_GRAPHS: dict[str, Any] = {
    "graphs": {
        # A one-node root that records (execution id, worker pid) in worker_runs.
        "once": {"nodes": {"rec": {"block": "record", "input": {"tag": "once"}}}},
        # A root that runs NAP_SECONDS: the limits test's unit of work.
        "nap": sleeper(NAP_SECONDS),
        # A root that a draining worker lets finish.
        "short": sleeper(DRAIN_SECONDS),
        "leaf": leaf(),
        # A root with two children sleeping LONG_SLEEP: 3 executions, 2 RUNNING naps once settled.
        "parent": _two_children(LONG_SLEEP),
        "quick": quick(),
    }
}
PARENT_SIZE = 3


@dataclass
class Worker:
    """A ``run.py worker`` process that printed its ready line."""

    process: CliProcess
    runtime_id: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def ready_ids(self) -> list[str]:
        """The runtime id of every ``worker <id> ready`` line printed so far."""
        return [m.group(1) for m in (READY.match(line.strip()) for line in self.process.stdout_lines) if m]

    def alive(self) -> bool:
        return self.process.popen.poll() is None


class Workers:
    """Launches workers, submitters and one-shot commands on one database; kills them all in ``close``."""

    def __init__(self, cwd: Path, database_url: str) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        (cwd / "graphs.json").write_text(json.dumps(WORKER_GRAPHS, indent=2))
        self.cwd = cwd
        self.url = database_url
        self.cli = Cli(cwd, database_url)
        # The record block writes to the test's database (not through any proxy).
        self.cli.env[RECORD_DB_ENV] = database_url
        self._extra: list[CliProcess] = []

    # -- workers ---------------------------------------------------------------------

    def start_worker(self, *options: str, db: str | None = None) -> CliProcess:
        """``run.py worker --db URL --blocks worker_blocks OPTIONS``, not yet waited for."""
        return self.cli.start("worker", "--blocks", BLOCKS_MODULE, *options, db=db)

    @staticmethod
    def await_ready(process: CliProcess) -> Worker:
        line = process.first_line(READY_TIMEOUT)
        match = READY.match(line)
        assert match, f"the worker's first stdout line is not 'worker <id> ready': {line!r}\n{process.describe()}"
        assert process.popen.poll() is None, f"the worker exited after its ready line:\n{process.describe()}"
        return Worker(process=process, runtime_id=match.group(1))

    def workers(self, count: int, *options: str, db: str | None = None) -> list[Worker]:
        """Start ``count`` workers at once (as a deployment would), then wait for every ready line."""
        processes = [self.start_worker(*options, db=db) for _ in range(count)]
        return [self.await_ready(process) for process in processes]

    def worker(self, *options: str, db: str | None = None) -> Worker:
        return self.workers(1, *options, db=db)[0]

    # -- submitting and stopping -------------------------------------------------------

    def submit(self, graph: str, user: str = "alice", *inputs: str, db: str | None = None) -> str:
        """``run.py submit graphs.json GRAPH --user U``: the printed execution id."""
        args = ["submit", "graphs.json", graph, "--user", user, "--blocks", BLOCKS_MODULE]
        for pair in inputs:
            args += ["--input", pair]
        result = self.cli.call(*args, db=db)
        assert result.returncode == 0, result.describe()
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"submit must print exactly one line (the id):\n{result.describe()}"
        return lines[0]

    def start_submitter(self, graph: str, *user_counts: tuple[str, int]) -> CliProcess:
        """``python -m tests.acceptance.workers_submit``: an actors.Client submitting many roots."""
        argv: list[str] = ["-m", "tests.acceptance.workers_submit", self.url, graph]
        for user, count in user_counts:
            argv += [user, str(count)]
        env = dict(self.cli.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        popen = subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        process = CliProcess(tuple(argv), popen)
        self._extra.append(process)
        return process

    def close(self) -> None:
        for process in self._extra:
            process.terminate_now()
        self.cli.close()


def submitted_ids(process: CliProcess) -> list[tuple[str, str]]:
    """The ``USER EXECUTION_ID`` lines a finished submitter printed."""
    pairs = []
    for line in process.stdout_lines:
        words = line.split()
        assert len(words) == 2, f"unexpected submitter line {line!r}:\n{process.describe()}"
        pairs.append((words[0], words[1]))
    return pairs


# -- reading the database through the test's own connection ----------------------------------


def runtime_pid(observer: Observer, runtime_id: str) -> int | None:
    rows = observer.query("SELECT pid FROM runtime WHERE id = ?", (runtime_id,))
    return rows[0]["pid"] if rows else None


def active_rows(observer: Observer) -> list[dict[str, Any]]:
    """Every QUEUED or RUNNING row of either table (a drained or recovered database has none)."""
    graphs = observer.query(
        "SELECT 'graph' AS kind, id, graph_id, status FROM graph_execution WHERE status IN ('QUEUED', 'RUNNING')")
    nodes = observer.query(
        "SELECT 'node' AS kind, graph_execution_id AS id, node_id AS graph_id, status FROM node_execution"
        " WHERE status IN ('QUEUED', 'RUNNING')")
    return graphs + nodes


def settled_parent(observer: Observer, root_id: str, timeout: float = SETTLE_TIMEOUT,
                   workers: list[Worker] | None = None) -> dict[str, dict[str, Any]]:
    """The rows of a ``parent`` tree once its 3 executions RUN and both leaves' naps RUN."""

    def settled() -> dict[str, dict[str, Any]] | None:
        for worker in workers or ():
            assert worker.alive(), f"a worker died:\n{worker.process.describe()}"
        rows = {row["id"]: row for row in observer.subtree(root_id)}
        if len(rows) != PARENT_SIZE or any(row["status"] != "RUNNING" for row in rows.values()):
            return None
        for execution_id in rows:
            if execution_id != root_id:
                naps = [n for n in observer.nodes(execution_id) if n["node_id"] == "nap"]
                if not naps or naps[0]["status"] != "RUNNING":
                    return None
        return rows

    return wait_until(settled, timeout, f"the {PARENT_SIZE} executions of parent {root_id} to run")


def owner_of(rows: dict[str, dict[str, Any]]) -> str:
    """The one runtime id that owns every row of a tree (a tree runs on one worker)."""
    owners = {row["runtime_id"] for row in rows.values()}
    assert len(owners) == 1 and None not in owners, f"a tree's rows must all belong to one worker: {owners}"
    return owners.pop()


def tree_snapshot(observer: Observer, root_id: str) -> list[tuple]:
    """Every column of every graph_execution and node_execution row of a tree, for 'nothing changed'."""
    rows = sorted(observer.subtree(root_id), key=lambda row: row["id"])
    nodes = [node for row in rows for node in observer.nodes(row["id"])]
    return [tuple(sorted((key, str(value)) for key, value in row.items())) for row in rows + nodes]
