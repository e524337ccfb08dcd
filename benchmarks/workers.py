"""actorgraph's workers benchmark: ``python -m benchmarks.workers --postgres URL [--quick] [--json PATH]``.

Several ``python run.py worker`` processes on one PostgreSQL, driven from this
process through ``actors.Client`` (which hosts nothing) and observed through
a psycopg2 connection of its own. Every figure runs in a database of its own,
created on the URL's server (``CREATE DATABASE``) and dropped afterwards
(``DROP DATABASE ... WITH (FORCE)``); the URL's own database is only used to
create and drop them. The figures:

1. throughput: with 1, 2 and 4 worker processes (each ``--concurrency 4``),
   the benchmark submits K one-node roots (``shapes.ONE_NODE_GRAPH``: one
   ``value`` node, the graph of stop_tree's throughput figure) from one thread, *concurrently* with the workers, which are up, ready and
   idle before the first submit. A root is timed from the first ``submit``
   until this process's connection sees every root COMPLETED (polled every
   10 ms). Each pool first runs a backlog: K roots submitted while no worker
   runs, then the workers start and drain them; that rate is taken from the
   rows (first ``started_at`` to last ``ended_at``), apart from the submitter.
2. submit-to-start latency: with the workers idle and waiting, roots are
   submitted one at a time at a modest pace; the latency of each is
   ``started_at - created_at`` of its row. Both are written by Python on this
   host (``created_at`` by the submitter before its INSERT commits,
   ``started_at`` by the claiming worker), so no polling bias enters. The
   duration of the ``submit()`` call is reported beside it.
3. cross-process stop: a root sleeping for an hour runs on a worker; this
   process calls ``Client.stop(id, user_id, wait_timeout=5)`` and times it
   until it returns (the owner acknowledged and the rows are TERMINATED),
   then checks the rows. The same with ``actors.stop_execution``, which opens
   its own connection per call. Target: median under 100 ms.

While each throughput figure runs, the CPU time of the workers, of every
PostgreSQL process and of this process is read from /proc, with the
machine's busy time (/proc/stat) and PostgreSQL's commit count, to say where
the cores or the database saturate.

The benchmark reports and never fails on a figure: the exit status is 0
unless a figure could not be measured at all (an exception, reported with
the table). Every worker process it started is ended on the way out.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import psycopg2

from benchmarks.database import BENCH_APPLICATION_NAME, describe_url
from benchmarks.measure import Figure, Summary
from benchmarks.report import machine_info, write_json
from benchmarks.shapes import ONE_NODE_GRAPH, Shape, one_node_graph_document

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_ID = "bench"
DATABASE = "postgresql"
WORKER_READY = re.compile(r"^worker (\S+) ready\s*$")
WORKER_READY_TIMEOUT_SECONDS = 60.0
WORKER_EXIT_TIMEOUT_SECONDS = 15.0
# A worker asked to stop lets running trees finish this long, then stops them.
WORKER_DRAIN_TIMEOUT_SECONDS = 2
POLL_SECONDS = 0.01
STOP_WAIT_TIMEOUT_SECONDS = 5.0
STOP_TARGET_SECONDS = 0.100
# A lone root sleeping an hour: it runs until it is stopped.
SLEEPER = Shape("sleeper", "sleeping root", ())
CPU_SATURATED_FRACTION = 0.9

_STARTED = time.monotonic()


@dataclass(frozen=True)
class Plan:
    """What a run measures, and how much of it."""

    label: str
    roots: int
    warmup_roots: int
    reps: int
    backlog_roots: int
    worker_counts: tuple[int, ...]
    concurrency: int
    latency_roots: int
    latency_interval_s: float
    latency_workers: int
    stop_reps: int
    stop_warmups: int
    stop_workers: int

    def describe(self) -> str:
        return (f"{self.label} run: throughput {self.reps} x {self.roots} roots (after {self.warmup_roots}"
                f" warm-up roots) and a {self.backlog_roots}-root backlog per pool of"
                f" {'/'.join(map(str, self.worker_counts))} workers (--concurrency {self.concurrency});"
                f" latency {self.latency_roots} roots, one per {self.latency_interval_s * 1000:.0f} ms, on"
                f" {self.latency_workers} workers; stop {self.stop_warmups} warm-up + {self.stop_reps}"
                f" repetitions per call, on {self.stop_workers} workers")

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items()}


FULL_PLAN = Plan("full", roots=2000, warmup_roots=200, reps=3, backlog_roots=2000,
                 worker_counts=(1, 2, 4), concurrency=4, latency_roots=300, latency_interval_s=0.05,
                 latency_workers=2, stop_reps=30, stop_warmups=2, stop_workers=2)
QUICK_PLAN = Plan("quick", roots=300, warmup_roots=30, reps=1, backlog_roots=300,
                  worker_counts=(1, 2, 4), concurrency=4, latency_roots=60, latency_interval_s=0.05,
                  latency_workers=2, stop_reps=10, stop_warmups=1, stop_workers=2)


# ----------------------------------------------------------------- databases

def database_url(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` on the same server."""
    return urlparse(url)._replace(path="/" + name).geturl()


def connect(url: str) -> Any:
    """An autocommit psycopg2 connection, marked as the benchmark's own."""
    connection = psycopg2.connect(url, application_name=BENCH_APPLICATION_NAME)
    connection.autocommit = True
    return connection


@contextlib.contextmanager
def fresh_database(server_url: str, key: str) -> Iterator[str]:
    """A new, empty database on ``server_url``'s server; dropped (with force) afterwards."""
    name = f"actorgraph_bench_workers_{key}_{os.getpid()}"
    admin = connect(server_url)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield database_url(server_url, name)
    finally:
        try:
            with admin.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.close()


class Observer:
    """Reads the rows through this process's own connection, as a third party would."""

    def __init__(self, url: str) -> None:
        self.connection = connect(url)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def counts_of_user(self, user_id: str) -> dict[str, int]:
        rows = self.query("SELECT status, count(*) FROM graph_execution WHERE user_id = %s"
                          " GROUP BY status", (user_id,))
        return {status: count for status, count in rows}

    def wait_user_done(self, user_id: str, expected: int, timeout: float) -> dict[str, int]:
        """Poll until the ``expected`` roots of ``user_id`` are all terminal; their counts.

        Raises:
            TimeoutError: naming the counts reached, when ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts_of_user(user_id)
            terminal = sum(n for status, n in counts.items() if status not in ("QUEUED", "RUNNING"))
            if terminal >= expected:
                return counts
            if time.monotonic() >= deadline:
                raise TimeoutError(f"user {user_id}: {counts} after {timeout:.0f}s,"
                                   f" expected {expected} terminal")
            time.sleep(POLL_SECONDS)

    def wait_status(self, execution_id: str, wanted: str, timeout: float) -> tuple[Any, ...]:
        """Poll until the row is ``wanted``; return (status, runtime_id, started_at).

        Raises:
            RuntimeError: the row reached another terminal status first.
            TimeoutError: when ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            rows = self.query("SELECT status, runtime_id, started_at FROM graph_execution WHERE id = %s",
                              (execution_id,))
            if rows and rows[0][0] == wanted:
                return rows[0]
            if rows and rows[0][0] in ("COMPLETED", "FAILED", "TERMINATED"):
                raise RuntimeError(f"execution {execution_id} is {rows[0][0]}, expected {wanted}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"execution {execution_id}: {rows[0][0] if rows else 'no row'}"
                                   f" after {timeout:.0f}s, expected {wanted}")
            time.sleep(POLL_SECONDS / 2)

    def node_running(self, execution_id: str) -> bool:
        rows = self.query("SELECT count(*) FROM node_execution WHERE graph_execution_id = %s"
                          " AND status = 'RUNNING'", (execution_id,))
        return bool(rows and rows[0][0])

    def per_runtime(self, user_id: str) -> dict[str, int]:
        rows = self.query("SELECT runtime_id, count(*) FROM graph_execution WHERE user_id = %s"
                          " GROUP BY runtime_id ORDER BY 2 DESC", (user_id,))
        return {str(runtime_id): count for runtime_id, count in rows}

    def stat_counts(self) -> tuple[int, int]:
        """(commits, sessions established) in this database so far."""
        rows = self.query("SELECT xact_commit, sessions FROM pg_stat_database"
                          " WHERE datname = current_database()")
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    def clear_stats_snapshot(self) -> None:
        # pg_stat_* are cached for the transaction (autocommit: per statement
        # in PostgreSQL 15), and backends flush their counts about once a second.
        self.query("SELECT pg_stat_clear_snapshot()")


# ------------------------------------------------------------------- workers

@dataclass
class WorkerProcess:
    """One ``run.py worker`` subprocess, its stdout lines and its stderr file."""

    proc: subprocess.Popen[str]
    stderr_path: str
    lines: "queue.Queue[tuple[float, str]]" = field(default_factory=queue.Queue)
    stdout: list[str] = field(default_factory=list)
    runtime_id: str | None = None
    ready_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.time(), line.rstrip("\n")))

    def wait_ready(self, deadline: float) -> None:
        """Wait for the first "worker <id> ready" line.

        Raises:
            RuntimeError: the worker exited first.
            TimeoutError: no ready line before ``deadline``.
        """
        while True:
            try:
                at, line = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker pid {self.pid} exited with {self.proc.returncode}"
                                       f" before its ready line; stderr: {self.stderr_tail()}") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"worker pid {self.pid}: no ready line after"
                                       f" {WORKER_READY_TIMEOUT_SECONDS:.0f}s; stderr: {self.stderr_tail()}")
                continue
            self.stdout.append(line)
            match = WORKER_READY.match(line)
            if match:
                self.runtime_id, self.ready_at = match.group(1), at
                return

    def later_stdout(self) -> list[str]:
        """Lines printed after the ready line (another "ready": it lost its lease)."""
        while True:
            try:
                self.stdout.append(self.lines.get_nowait()[1])
            except queue.Empty:
                return self.stdout[1:]

    def stderr_text(self) -> str:
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as stderr:
                return stderr.read()
        except OSError:
            return ""

    def stderr_tail(self, lines: int = 5) -> str:
        text = self.stderr_text().strip().splitlines()
        return " | ".join(text[-lines:]) if text else "(empty)"

    def terminate(self) -> None:
        """SIGTERM: the worker stops claiming, drains and exits."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, deadline: float) -> int | str:
        """Its exit status, or "killed" after SIGKILL when it is still alive at ``deadline``."""
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            return "killed (no exit within the drain time after SIGTERM)"

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


class WorkerPool:
    """``count`` worker processes on ``url``; every one of them ends when the pool closes."""

    def __init__(self, url: str, count: int, concurrency: int, tracked: list[int] | None = None) -> None:
        self.url, self.count, self.concurrency = url, count, concurrency
        self.workers: list[WorkerProcess] = []
        # Each pid is appended as soon as it is spawned (for the CPU sampler).
        self.tracked = [] if tracked is None else tracked
        self.spawned_at = 0.0
        self.ready_spread_s = 0.0
        self._directory = tempfile.mkdtemp(prefix="actorgraph-bench-workers-")

    def start(self) -> WorkerPool:
        """Spawn every worker at once, then wait for each one's ready line."""
        self.spawned_at = time.time()
        for index in range(self.count):
            stderr_path = os.path.join(self._directory, f"worker-{index}.stderr")
            with open(stderr_path, "w", encoding="utf-8") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, "run.py", "worker", "--db", self.url,
                     "--concurrency", str(self.concurrency),
                     "--drain-timeout", str(WORKER_DRAIN_TIMEOUT_SECONDS)],
                    cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                    text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            worker = WorkerProcess(proc, stderr_path)
            self.workers.append(worker)
            self.tracked.append(proc.pid)
            threading.Thread(target=worker.read_stdout, name=f"worker-{index}-stdout", daemon=True).start()
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_SECONDS
        for worker in self.workers:
            worker.wait_ready(deadline)
        ready = [w.ready_at for w in self.workers if w.ready_at is not None]
        self.ready_spread_s = max(ready) - min(ready) if ready else 0.0
        return self

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]

    def close(self) -> list[str]:
        """End every worker; return what looked wrong (exit statuses, stderr, extra lines)."""
        problems: list[str] = []
        statuses: dict[int, int | str] = {}
        try:
            for worker in self.workers:
                worker.terminate()
            deadline = time.monotonic() + WORKER_EXIT_TIMEOUT_SECONDS
            for worker in self.workers:
                statuses[worker.pid] = worker.wait_exit(deadline)
        finally:
            # Whatever happened above (even Ctrl-C), no worker outlives the pool.
            for worker in self.workers:
                worker.kill()
        for worker in self.workers:
            status = statuses.get(worker.pid)
            if status != 0:
                problems.append(f"worker {worker.runtime_id or worker.pid}: exit status {status}"
                                f" (stderr: {worker.stderr_tail(3)})")
            later = worker.later_stdout()
            if later:
                problems.append(f"worker {worker.runtime_id or worker.pid}: later stdout {later[:3]}")
            stderr = worker.stderr_text()
            for marker in ("Traceback", "lease lost", "ERROR", "CRITICAL"):
                if marker in stderr:
                    problems.append(f"worker {worker.runtime_id or worker.pid}: stderr has {marker!r}:"
                                    f" {worker.stderr_tail(3)}")
                    break
        for worker in self.workers:
            with contextlib.suppress(OSError):
                os.remove(worker.stderr_path)
        with contextlib.suppress(OSError):
            os.rmdir(self._directory)
        return problems

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def worker_pool(url: str, count: int, concurrency: int, figures: Sequence[Figure],
                tracked: list[int] | None = None) -> Iterator[WorkerPool]:
    """Start ``count`` workers; on the way out end them all, noting problems on ``figures``."""
    pool = WorkerPool(url, count, concurrency, tracked)
    try:
        yield pool.start()
    finally:
        problems = pool.close()
        if problems and figures:
            # Once, on the first figure of the group: they share the pool.
            _note(figures[0], "check workers", "; ".join(problems))


# ------------------------------------------------------------------------ CPU

_TICKS = os.sysconf("SC_CLK_TCK")


def _all_processes_cpu() -> dict[int, tuple[str, float]]:
    """Every process's name and CPU seconds so far, from /proc/<pid>/stat."""
    found: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except OSError:
            continue
        name = text[text.find("(") + 1:text.rfind(")")]
        fields = text.rsplit(")", 1)[1].split()
        found[int(entry)] = (name, (int(fields[11]) + int(fields[12])) / _TICKS)
    return found


def _statement(query: str) -> str:
    """A statement, shortened to what tells it apart: its verb and its table."""
    words = query.split()
    verb = words[0].upper() if words else "?"
    tables = re.findall(r"(?:FROM|INTO|UPDATE|JOIN)\s+\"?(\w+)", query, re.IGNORECASE)
    table = tables[0] if tables else ""
    if "pg_advisory" in query:
        return f"{verb} pg_advisory_*"
    if verb == "WITH":
        # Named by its first common table expression, which tells the statements apart.
        found = re.match(r"WITH\s+(?:RECURSIVE\s+)?(\w+)", query, re.IGNORECASE)
        return f"WITH {found.group(1) if found else '?'} ... {table}".strip()
    return f"{verb} {table}".strip()


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()[:60]
    except OSError:
        return ""


def _system_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds so far of each party, and the machine's busy and total jiffies, at ``at``."""

    at: float  # time.time(): the clock the rows' timestamps are written with
    busy: int
    total: int
    workers: dict[int, float]
    postgres: dict[int, float]
    own: float
    others: dict[int, float]
    names: dict[int, str]
    # What the database's other sessions were executing: (statement, wait event) per active one.
    activity: tuple[tuple[str, str], ...] = ()


def _grown(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two samples; a process born in between counts whole."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


class CpuSampler:
    """Samples, every ``interval``, the CPU of the workers, of PostgreSQL and of this process.

    The figures integrate the samples over their own wall-clock windows, so
    that a window read from the rows (a backlog's first start to its last
    end) is measured as well as one timed here. PostgreSQL's commits and new
    sessions are counted from pg_stat_database around the whole figure.

    With ``activity_url``, each sample also reads pg_stat_activity there:
    which statements the other sessions of that database were executing (or
    waiting in), a sampling profile of where PostgreSQL spends its time.
    """

    def __init__(self, worker_pids: Any, interval: float = 0.1, activity_url: str | None = None) -> None:
        self._worker_pids = worker_pids  # a callable: the pool grows while it starts
        self._interval = interval
        self._activity = connect(activity_url) if activity_url else None
        self._samples: list[CpuSample] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed.set()
        self._thread.join(5)
        if self._activity is not None:
            self._activity.close()

    def _loop(self) -> None:
        while not self._closed.wait(self._interval):
            self._take()

    def _take(self) -> None:
        busy, total = _system_ticks()
        processes = _all_processes_cpu()
        worker_pids, own_pid = set(self._worker_pids()), os.getpid()
        workers = {pid: cpu for pid, (_, cpu) in processes.items() if pid in worker_pids}
        postgres = {pid: cpu for pid, (name, cpu) in processes.items()
                    if name == "postgres" and pid not in worker_pids}
        others = {pid: cpu for pid, (name, cpu) in processes.items()
                  if pid not in worker_pids and pid != own_pid and name != "postgres"}
        sample = CpuSample(time.time(), busy, total, workers, postgres,
                           processes.get(own_pid, ("", 0.0))[1], others,
                           {pid: name for pid, (name, _) in processes.items()}, self._read_activity())
        with self._lock:
            self._samples.append(sample)

    def _read_activity(self) -> tuple[tuple[str, str], ...]:
        if self._activity is None:
            return ()
        try:
            with self._activity.cursor() as cursor:
                cursor.execute(
                    "SELECT regexp_replace(left(query, 200), '\\s+', ' ', 'g'),"
                    " coalesce(wait_event_type || ':' || wait_event, 'CPU')"
                    " FROM pg_stat_activity WHERE state = 'active' AND datname = current_database()"
                    " AND application_name <> %s", (BENCH_APPLICATION_NAME,))
                return tuple((_statement(query), wait) for query, wait in cursor.fetchall())
        except psycopg2.Error:
            return ()

    def usage(self, start: float, end: float) -> dict[str, Any]:
        """Cores used by each party from ``start`` to ``end`` (time.time()), from the samples around it."""
        self._take()
        with self._lock:
            samples = list(self._samples)
        first = max((i for i, s in enumerate(samples) if s.at <= start), default=0)
        last = min((i for i, s in enumerate(samples) if s.at >= end), default=len(samples) - 1)
        window = samples[first:last + 1]
        wall = max(1e-9, window[-1].at - window[0].at)
        workers = sum(_grown(a.workers, b.workers) for a, b in zip(window, window[1:]))
        postgres = sum(_grown(a.postgres, b.postgres) for a, b in zip(window, window[1:]))
        own = window[-1].own - window[0].own
        by_other: dict[int, float] = {}
        for a, b in zip(window, window[1:]):
            for pid, seconds in b.others.items():
                by_other[pid] = by_other.get(pid, 0.0) + seconds - a.others.get(pid, 0.0)
        busiest = sorted(by_other.items(), key=lambda item: -item[1])[:3]
        by_backend: dict[int, float] = {}
        by_worker: dict[int, float] = {}
        for a, b in zip(window, window[1:]):
            for pid, seconds in b.postgres.items():
                by_backend[pid] = by_backend.get(pid, 0.0) + seconds - a.postgres.get(pid, 0.0)
            for pid, seconds in b.workers.items():
                by_worker[pid] = by_worker.get(pid, 0.0) + seconds - a.workers.get(pid, 0.0)
        activity: dict[tuple[str, str], int] = {}
        for sample in window[1:]:
            for key in sample.activity:
                activity[key] = activity.get(key, 0) + 1
        profiled = max(1, len(window) - 1)
        names = window[-1].names
        cpus = os.cpu_count() or 1
        busy = (window[-1].busy - window[0].busy) / max(1, window[-1].total - window[0].total) * cpus
        return {"wall_s": round(wall, 3), "cpus": cpus, "system_busy_cores": round(busy, 2),
                "workers_cores": round(workers / wall, 2), "postgres_cores": round(postgres / wall, 2),
                "bench_cores": round(own / wall, 2),
                "other_processes_cores": round(sum(by_other.values()) / wall, 2),
                "busiest_other_processes": [
                    f"{pid} {_command_line(pid) or names.get(pid, '?')}: {seconds / wall:.2f}"
                    for pid, seconds in busiest if seconds / wall >= 0.05],
                "other_cores": round(busy - (workers + postgres + own) / wall, 2),
                "busiest_postgres_process_cores": round(max(by_backend.values(), default=0.0) / wall, 2),
                "busiest_worker_cores": round(max(by_worker.values(), default=0.0) / wall, 2),
                "postgres_active_sessions_avg": round(sum(activity.values()) / profiled, 2),
                # Sessions executing each (statement, wait), on average over the samples.
                "postgres_activity": {
                    f"{statement} [{wait}]": round(count / profiled, 2)
                    for (statement, wait), count in sorted(activity.items(), key=lambda item: -item[1])}}


@dataclass
class PostgresCounts:
    """Commits and new sessions in this database, from pg_stat_database, over a window."""

    observer: Observer
    commits: int = 0
    sessions: int = 0

    def __enter__(self) -> PostgresCounts:
        self.commits, self.sessions = self._read()
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def _read(self) -> tuple[int, int]:
        self.observer.clear_stats_snapshot()
        return self.observer.stat_counts()

    def rates(self, wall: float) -> dict[str, Any]:
        """Per second of ``wall``; waits a second first, for the backends to flush their counts."""
        time.sleep(1.1)
        commits, sessions = self._read()
        return {"commits_per_s_approx": round((commits - self.commits) / wall),
                "new_sessions": sessions - self.sessions}


def cpu_text(cpu: dict[str, Any]) -> str:
    return (f"CPU {cpu['system_busy_cores']:.2f}/{cpu['cpus']} cores busy (workers"
            f" {cpu['workers_cores']:.2f}, postgres {cpu['postgres_cores']:.2f}, this process"
            f" {cpu['bench_cores']:.2f}, other processes {cpu['other_processes_cores']:.2f}"
            f"{' ' + str(cpu['busiest_other_processes']) if cpu['busiest_other_processes'] else ''},"
            f" kernel and unattributed {max(0.0, cpu['other_cores'] - cpu['other_processes_cores']):.2f}),"
            f" ~{cpu['commits_per_s_approx']} commits/s, {cpu['new_sessions']} new sessions;"
            f" busiest worker {cpu['busiest_worker_cores']:.2f} cores, busiest postgres process"
            f" {cpu['busiest_postgres_process_cores']:.2f} cores;"
            f" active PostgreSQL sessions {cpu['postgres_active_sessions_avg']:.2f} on average"
            f" {dict(list(cpu['postgres_activity'].items())[:4])}")


# -------------------------------------------------------------------- figures

def open_client(url: str) -> Any:
    from actors import Client  # imported late: the figure reports it if it is missing

    return Client(url)


def run_throughput(server_url: str, plan: Plan, workers: int) -> list[Figure]:
    """Backlog drain, then submitted-concurrently throughput, with ``workers`` processes."""
    plural = "s" if workers > 1 else ""
    backlog = Figure(DATABASE, f"backlog drain, {workers} worker{plural}", plan.backlog_roots,
                     unit="roots/s")
    concurrent = Figure(DATABASE, f"throughput, {workers} worker{plural}, submitted concurrently",
                        plan.roots, unit="roots/s")
    figures = [backlog, concurrent]
    current = backlog
    pids: list[int] = []
    try:
        with fresh_database(server_url, f"throughput{workers}") as url, open_client(url) as client, \
                Observer(url) as observer, CpuSampler(lambda: list(pids), activity_url=url) as sampler:
            client.load(one_node_graph_document())
            _progress(backlog, "submitting the backlog (no worker running)")
            backlog_user = f"{USER_ID}-backlog"
            submit_all(client, backlog_user, plan.backlog_roots)
            with PostgresCounts(observer) as counts, \
                    worker_pool(url, workers, plan.concurrency, figures, pids) as pool:
                _progress(backlog, "draining")
                measure_backlog(observer, sampler, counts, pool, backlog_user, plan.backlog_roots, backlog)
                current = concurrent
                _progress(concurrent, "warm-up")
                warmup_user = f"{USER_ID}-warmup"
                submit_all(client, warmup_user, plan.warmup_roots)
                observer.wait_user_done(warmup_user, plan.warmup_roots, completion_timeout(plan.warmup_roots))
                for rep in range(plan.reps):
                    _progress(concurrent, f"rep {rep + 1}/{plan.reps}")
                    measure_concurrent(client, observer, sampler, f"{USER_ID}-rep{rep}", plan.roots, concurrent)
    except Exception as exc:  # a figure that crashes is reported, and the run goes on
        current.error = f"{type(exc).__name__}: {exc}"
        if current is backlog:
            concurrent.error = "not run: the backlog failed first"
    return figures


def submit_all(client: Any, user_id: str, count: int) -> list[str]:
    return [client.submit(ONE_NODE_GRAPH, user_id=user_id, inputs={}) for _ in range(count)]


def completion_timeout(roots: int) -> float:
    return max(60.0, roots * 0.1)


def measure_backlog(observer: Observer, sampler: CpuSampler, counts: PostgresCounts, pool: WorkerPool,
                    user_id: str, roots: int, figure: Figure) -> None:
    """Wait for the backlog; its rate from the rows: first ``started_at`` to last ``ended_at``.

    Both are written with this host's clock (time.time() in UTC), which the
    CPU samples use too.
    """
    statuses = observer.wait_user_done(user_id, roots, completion_timeout(roots))
    check_completed(figure, statuses, roots)
    first_start, last_end = observer.query(
        "SELECT EXTRACT(EPOCH FROM min(started_at)), EXTRACT(EPOCH FROM max(ended_at))"
        " FROM graph_execution WHERE user_id = %s", (user_id,))[0]
    first_start, last_end = float(first_start), float(last_end)
    window = last_end - first_start
    figure.runtime.append(roots / window)
    ready = [w.ready_at for w in pool.workers if w.ready_at is not None]
    usage = sampler.usage(first_start, last_end)
    # Commits from before the workers started to the end: a little more than the window.
    usage.update(counts.rates(window))
    figure.extra.update({
        "drain_window_s": round(window, 3),
        "workers_ready_spread_s": round(pool.ready_spread_s, 3),
        "last_worker_ready_after_first_start_s": round(max(ready) - first_start, 3) if ready else None,
        "per_worker": list(observer.per_runtime(user_id).values()),
        "cpu": [usage],
    })


def measure_concurrent(client: Any, observer: Observer, sampler: CpuSampler, user_id: str, roots: int,
                       figure: Figure) -> None:
    """Submit ``roots`` from this thread while the workers run them; roots per second until all COMPLETED."""
    gc.collect()
    with PostgresCounts(observer) as counts:
        started_at, started = time.time(), time.perf_counter()
        submit_all(client, user_id, roots)
        submitted = time.perf_counter()
        statuses = observer.wait_user_done(user_id, roots, completion_timeout(roots))
        elapsed, ended_at = time.perf_counter() - started, time.time()
        usage = sampler.usage(started_at, ended_at)
        usage.update(counts.rates(elapsed))
    check_completed(figure, statuses, roots)
    figure.runtime.append(roots / elapsed)
    figure.extra.setdefault("submit_rate", []).append(round(roots / (submitted - started), 1))
    figure.extra.setdefault("cpu", []).append(usage)
    figure.extra.setdefault("per_worker", []).append(list(observer.per_runtime(user_id).values()))


def check_completed(figure: Figure, counts: dict[str, int], roots: int) -> None:
    if counts != {"COMPLETED": roots}:
        _note(figure, "check completed", f"{counts}, expected {roots} COMPLETED")


def run_latency(server_url: str, plan: Plan) -> list[Figure]:
    """Submit-to-start latency from the rows, and the duration of ``submit()``, on idle workers."""
    latency = Figure(DATABASE, f"submit-to-start latency (started_at - created_at),"
                               f" {plan.latency_workers} idle workers", plan.latency_roots)
    call = Figure(DATABASE, "submit() call, same roots", plan.latency_roots)
    figures = [latency, call]
    try:
        with fresh_database(server_url, "latency") as url, open_client(url) as client, \
                Observer(url) as observer, \
                worker_pool(url, plan.latency_workers, plan.concurrency, figures):
            client.load(one_node_graph_document())
            # One root through first, so that nothing below pays a first claim.
            warmup = client.submit(ONE_NODE_GRAPH, user_id=f"{USER_ID}-warmup", inputs={})
            observer.wait_status(warmup, "COMPLETED", 30.0)
            _progress(latency, f"{plan.latency_roots} roots, one per"
                               f" {plan.latency_interval_s * 1000:.0f} ms")
            user_id = f"{USER_ID}-latency"
            ids: list[str] = []
            next_at = time.perf_counter()
            for _ in range(plan.latency_roots):
                gc.collect()
                next_at += plan.latency_interval_s
                before = time.perf_counter()
                ids.append(client.submit(ONE_NODE_GRAPH, user_id=user_id, inputs={}))
                call.runtime.append(time.perf_counter() - before)
                time.sleep(max(0.0, next_at - time.perf_counter()))
            counts = observer.wait_user_done(user_id, len(ids), 60.0)
            check_completed(latency, counts, len(ids))
            rows = observer.query(
                "SELECT EXTRACT(EPOCH FROM started_at - created_at) FROM graph_execution"
                " WHERE user_id = %s AND started_at IS NOT NULL ORDER BY created_at", (user_id,))
            latency.runtime.extend(float(row[0]) for row in rows)
            latency.extra["per_worker"] = list(observer.per_runtime(user_id).values())
    except Exception as exc:
        for figure in figures:
            figure.error = f"{type(exc).__name__}: {exc}"
    return figures


def run_stop(server_url: str, plan: Plan) -> list[Figure]:
    """Stop a sleeping root that runs on a worker, from this process; time each call."""
    target = f"median < {STOP_TARGET_SECONDS * 1000:.0f} ms"
    by_client = Figure(DATABASE, "cross-process stop, Client.stop", plan.stop_reps, target=target)
    by_function = Figure(DATABASE, "cross-process stop, actors.stop_execution", plan.stop_reps, target=target)
    owner_side = Figure(DATABASE, "  of which: stop_requested_at to ended_at (rows)", plan.stop_reps * 2)
    figures = [by_client, by_function, owner_side]
    try:
        from actors import stop_execution

        with fresh_database(server_url, "stop") as url, open_client(url) as client, \
                Observer(url) as observer, \
                worker_pool(url, plan.stop_workers, plan.concurrency, figures) as pool:
            client.load(SLEEPER.graph_document())
            calls = (
                (by_client, lambda eid: client.stop(eid, user_id=USER_ID,
                                                    wait_timeout=STOP_WAIT_TIMEOUT_SECONDS)),
                (by_function, lambda eid: stop_execution(url, eid, USER_ID,
                                                         wait_timeout=STOP_WAIT_TIMEOUT_SECONDS)),
            )
            owners: dict[str, int] = {}
            for rep in range(plan.stop_warmups + plan.stop_reps):
                for figure, call in calls:
                    kind = "warm-up" if rep < plan.stop_warmups else f"rep {rep - plan.stop_warmups + 1}"
                    _progress(figure, kind, quiet=rep > plan.stop_warmups)
                    elapsed, owner, owner_s = stop_once(client, observer, call, figure)
                    if rep >= plan.stop_warmups:
                        figure.runtime.append(elapsed)
                        owner_side.runtime.append(owner_s)
                        owners[owner] = owners.get(owner, 0) + 1
            if set(owners) - {w.runtime_id for w in pool.workers}:
                _note(by_client, "check owners", f"owners {owners} are not all the pool's workers")
            for figure in (by_client, by_function):
                figure.extra["per_worker"] = list(owners.values())
                if figure.runtime:
                    figure.extra["target_met"] = statistics.median(figure.runtime) < STOP_TARGET_SECONDS
    except Exception as exc:
        for figure in figures:
            if not figure.error:
                figure.error = f"{type(exc).__name__}: {exc}"
    return figures


def stop_once(client: Any, observer: Observer, call: Any, figure: Figure) -> tuple[float, str, float]:
    """Start a sleeper on a worker, stop it with ``call``; (seconds, owner runtime id, owner-side seconds)."""
    execution_id = client.submit(SLEEPER.root_graph, user_id=USER_ID, inputs={})
    _, owner, _ = observer.wait_status(execution_id, "RUNNING", 30.0)
    # The sleep node itself running: the stop interrupts a block at work.
    deadline = time.monotonic() + 10.0
    while not observer.node_running(execution_id) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS / 2)
    gc.collect()
    started = time.perf_counter()
    ack = call(execution_id)
    elapsed = time.perf_counter() - started
    if execution_id not in ack.terminated:
        _note(figure, "check StopAck", f"{ack}: the root is not among terminated")
    if ack.forced:
        _note(figure, "check forced", f"{len(ack.forced)} executions forced")
    status, owner_after, window = observer.query(
        "SELECT status, runtime_id, EXTRACT(EPOCH FROM ended_at - stop_requested_at)"
        " FROM graph_execution WHERE id = %s", (execution_id,))[0]
    if status != "TERMINATED":
        _note(figure, "check rows", f"{execution_id} is {status} after the stop returned")
    if owner is None or owner_after != owner:
        _note(figure, "check owner", f"{execution_id} ran on {owner}, ended owned by {owner_after}")
    return elapsed, str(owner), float(window) if window is not None else math.nan


# --------------------------------------------------------------------- report

def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of ``samples``."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


_HEADERS = ("db", "figure", "n", "median/p50", "p99", "min/max", "unit", "target", "")


def _row(figure: Figure) -> tuple[str, ...]:
    samples = [s for s in figure.runtime if not math.isnan(s)]
    summary = Summary.of(samples)
    is_duration = figure.unit == "s"
    scale, digits, unit = (1000.0, 1, "ms") if is_duration else (1.0, 0, figure.unit)
    count = f"{figure.executions}" + (f" x{len(samples)}" if not is_duration and len(samples) > 1 else "")
    if summary is None:
        median = p99 = spread = "-"
    else:
        median = f"{summary.median * scale:.{digits}f}"
        p99 = f"{percentile(samples, 99) * scale:.{digits}f}" if is_duration else "-"
        spread = f"{summary.min * scale:.{digits}f}/{summary.max * scale:.{digits}f}"
    return (figure.database, figure.name, count, median, p99, spread, unit, figure.target or "-",
            "ERROR" if figure.error else figure.verdict())


def format_table(figures: Sequence[Figure]) -> str:
    rows = [_HEADERS] + [_row(figure) for figure in figures]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_header(machine: dict[str, Any], plan: Plan) -> str:
    return (f"actorgraph workers benchmark, {plan.describe()}\n"
            f"{machine['date']}  {machine['platform']}  {machine['cpu']} x{machine['cpu_count']}\n"
            f"python {machine['python']}  pykka {machine['pykka']}  peewee {machine['peewee']}"
            f"  psycopg2 {machine['psycopg2']}  {machine['servers'].get(DATABASE, '')}\n"
            f"before the run: {machine['load_before']['busy_cores']:.2f} of {machine['load_before']['cpus']}"
            f" cores busy (load {machine['load_before']['loadavg_1m']:.2f})"
            f"{' ' + str(machine['load_before']['busiest']) if machine['load_before']['busiest'] else ''};"
            " each figure's notes name what else ran beside it\n"
            "durations in ms (p99: nearest rank); rates in roots per second, min/median/max over"
            " repetitions; each figure in a database of its own\n"
            "throughput: one-node roots submitted by one thread of this process while the workers run"
            " them, timed from the first submit until all are COMPLETED;\nbacklog: the same number"
            " submitted before any worker starts, rate from the rows (first started_at to last ended_at)")


def format_notes(figures: Sequence[Figure]) -> str:
    notes: list[str] = []
    for figure in figures:
        extra = figure.extra
        if "drain_window_s" in extra:
            ready = extra.get("last_worker_ready_after_first_start_s")
            notes.append(f"{figure.name}: {extra['drain_window_s']:.2f} s from the first start to the last"
                         f" end (the last worker printed its ready line {ready * 1000:+.0f} ms from the"
                         f" first start; a worker claims before it prints it);"
                         f" {cpu_text(extra['cpu'][0])}; roots per worker {extra['per_worker']}")
        elif "cpu" in extra:
            for usage, rate, shares in zip(extra["cpu"], extra.get("submit_rate", []),
                                           extra.get("per_worker", [])):
                notes.append(f"{figure.name}: submit phase {rate:.0f} roots/s (one thread, beside the"
                             f" workers); {cpu_text(usage)}; roots per worker {shares}")
        elif "per_worker" in extra:
            notes.append(f"{figure.name}: roots per worker {extra['per_worker']}")
        for key, value in extra.items():
            if key.startswith("check"):
                notes.append(f"{figure.name}: {key}: {value}")
        if figure.error:
            notes.append(f"{figure.name}: ERROR {figure.error}")
    notes.extend(saturation(figures, "backlog"))
    notes.extend(saturation(figures, "throughput"))
    return "\n".join(["", *notes]) if notes else ""


def saturation(figures: Sequence[Figure], kind: str) -> list[str]:
    """The ``kind`` curve over the pool sizes, and at each point what was saturated."""
    curve = [(f, s) for f in figures if f.name.startswith(kind) and (s := Summary.of(f.runtime))]
    if not curve:
        return []
    base = curve[0][1].median
    points = ", ".join(f"{_pool_size(f)}: {s.median:.0f}/s (x{s.median / base:.2f})" for f, s in curve)
    lines = [f"{kind} curve: {points}"]
    for figure, summary in curve:
        usage = figure.extra["cpu"][-1]
        where = []
        if usage["system_busy_cores"] >= CPU_SATURATED_FRACTION * usage["cpus"]:
            where.append(f"the {usage['cpus']} cores are saturated ({usage['system_busy_cores']:.2f} busy:"
                         f" postgres {usage['postgres_cores']:.2f}, workers {usage['workers_cores']:.2f},"
                         f" this process {usage['bench_cores']:.2f}, others {usage['other_cores']:.2f})")
        activity = usage.get("postgres_activity", {})
        advisory = sum(n for key, n in activity.items() if "Lock:advisory" in key)
        wal = sum(n for key, n in activity.items() if "WALSync" in key or "WALWrite" in key)
        if advisory >= 0.3:
            where.append(f"claims queue on PostgreSQL's advisory lock ({advisory:.2f} sessions waiting"
                         " on average)")
        if wal >= 0.3:
            where.append(f"commits wait on the WAL flush ({wal:.2f} sessions on average)")
        if usage.get("busiest_worker_cores", 0.0) >= 0.8:
            where.append(f"one worker process uses {usage['busiest_worker_cores']:.2f} cores")
        if usage.get("busiest_postgres_process_cores", 0.0) >= 0.8:
            where.append(f"one PostgreSQL process uses {usage['busiest_postgres_process_cores']:.2f} cores")
        rates = figure.extra.get("submit_rate")
        if rates and summary.median >= 0.9 * statistics.median(rates):
            where.append(f"it runs as fast as one thread submits ({statistics.median(rates):.0f}/s)")
        if not where:
            where.append(f"nothing measured here saturates ({usage['system_busy_cores']:.2f} cores busy)")
        lines.append(f"  {_pool_size(figure)}: " + "; ".join(where))
    return lines


def _pool_size(figure: Figure) -> str:
    found = re.search(r"\d+ workers?", figure.name)
    return found.group(0) if found else figure.name


# --------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.workers",
        description="Throughput, submit-to-start latency and cross-process stop latency of"
                    " `run.py worker` processes on one PostgreSQL.")
    parser.add_argument("--postgres", metavar="URL", required=True,
                        help="a PostgreSQL server (the URL's database is used only to CREATE and DROP"
                             " one database per figure)")
    parser.add_argument("--quick", action="store_true", help="fewer roots and repetitions (about a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    return parser.parse_args(argv)


def _note(figure: Figure, key: str, message: str) -> None:
    figure.extra.setdefault(key, message)


def _progress(figure: Figure, what: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[{time.monotonic() - _STARTED:6.1f}s] {figure.name}: {what}", file=sys.stderr, flush=True)


def server_version(url: str) -> str:
    try:
        with Observer(url) as observer:
            return str(observer.query("SELECT version()")[0][0])
    except Exception as exc:  # noqa: BLE001 - best effort, for the header
        return f"unknown ({type(exc).__name__})"


def machine_load(seconds: float = 1.0) -> dict[str, Any]:
    """How busy the machine is before the run: cores busy over ``seconds``, and by whom."""
    with CpuSampler(lambda: []) as sampler:
        started = time.time()
        time.sleep(seconds)
        usage = sampler.usage(started, time.time())
    return {"busy_cores": usage["system_busy_cores"], "cpus": usage["cpus"],
            "busiest": usage["busiest_other_processes"], "loadavg_1m": os.getloadavg()[0]}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; return 0, or 1 when a figure crashed."""
    args = parse_args(argv)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    # SIGTERM unwinds like Ctrl-C, through every finally that ends a worker.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    load_before = machine_load()
    figures: list[Figure] = []
    for workers in plan.worker_counts:
        figures += run_throughput(args.postgres, plan, workers)
    figures += run_latency(args.postgres, plan)
    figures += run_stop(args.postgres, plan)
    machine = machine_info({DATABASE: server_version(args.postgres)})
    machine["databases"] = {DATABASE: describe_url(args.postgres)}
    machine["elapsed_seconds"] = round(time.monotonic() - started, 1)
    machine["load_before"] = load_before
    for figure in figures:
        if figure.unit == "s" and figure.runtime:
            samples = [s for s in figure.runtime if not math.isnan(s)]
            figure.extra.update({"p50": statistics.median(samples), "p99": percentile(samples, 99)})
    print(format_header(machine, plan))
    print(format_table(figures))
    print(format_notes(figures))
    print(f"\ntotal {machine['elapsed_seconds']} s")
    if args.json:
        write_json(args.json, machine, plan.to_json(), figures)
        print(f"figures written to {args.json}")
    return 1 if any(figure.error for figure in figures) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the workers were ended on the way out
        print(f"interrupted ({interrupt or 'SIGINT'}); every worker was ended", file=sys.stderr)
        sys.exit(130)
