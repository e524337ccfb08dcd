"""actorgraph's stop benchmark: ``python -m benchmarks.stop_tree [--quick] [--json PATH]``.

For each database (SQLite always, PostgreSQL with ``--postgres URL``) and each
shape, in a fresh database, every repetition runs in this order:

1. the floor: a plain pykka tree of the same shape cascades a stop, no database;
   then the pooled floor: the same on the runtime's own actor type;
2. the runtime: the tree is built through the public API (``rt.load``,
   ``rt.start``), waited for until every row is RUNNING, and ``rt.stop(root)``
   is timed until it returns;
3. the write floor: the rows and the nodes the stop ended are set back to
   RUNNING, and the runtime's own stop statements are timed on them, one
   transaction, no actors (``write_floor.py``);
4. the reference: the same rows are set back to RUNNING with one UPDATE, and
   the recursive asyncio stop is timed on them.

Before each timed section the garbage of earlier sections is collected
(``gc.collect()``), so that no section pays for another's; what a section
allocates itself is still collected on its own clock. The first repetition
of each figure is a warm-up and is not counted. The
benchmark reports and never fails on a figure: the exit status is 0 unless a
figure could not be measured at all (an exception, reported with the table).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from actors.runtime import SWITCH_INTERVAL as FLOOR_SWITCH_INTERVAL
from benchmarks.database import (
    Observer, describe_url, drop_actorgraph_tables, remove_sqlite_files)
from actors.dispatch import Dispatcher
from benchmarks.floor import bare_start_stop_rate, time_floor_stop, time_pooled_floor_stop
from benchmarks.measure import Figure, proc_status_kib
from benchmarks.reference import Reference
from benchmarks.report import format_header, format_table, machine_info, write_json
from benchmarks.shapes import ONE_NODE_GRAPH, Shape, chain, flat, one_node_graph_document, tree
from benchmarks.write_floor import WriteFloor

USER_ID = "bench"
STOP_WAIT_TIMEOUT_SECONDS = 60.0
COMPLETION_TIMEOUT_SECONDS = 60.0
MEMORY_TARGET_KIB = 100.0
# The second throughput figure starts roots from this many threads at once.
CONCURRENT_CALLERS = 4
# Plain pykka's floor at the default GIL switch interval is measured up to
# this many executions. Above it, one ThreadingActor per execution makes a
# stop spend minutes in the kernel (196 s for 11,111 executions, measured on
# 2026-12-01): that shape's floor is reported at 50 ms only.
DEFAULT_INTERVAL_FLOOR_MAX = 5000

log = logging.getLogger("benchmarks.stop_tree")
_PROCESS_STARTED = time.monotonic()


@dataclass(frozen=True)
class Plan:
    """What a run measures: the shapes and how many repetitions of each."""

    label: str
    reps: int
    warmups: int
    tree: Shape
    chain: Shape
    flat: Shape
    memory: Shape
    throughput_roots: int

    def describe(self) -> str:
        return (f"{self.label} run: {self.warmups} warm-up + {self.reps} repetitions per figure,"
                " interleaved with the floor")

    def to_json(self) -> dict[str, Any]:
        shapes = {s.key: {"title": s.title, "levels": list(s.levels), "executions": s.count}
                  for s in (self.tree, self.chain, self.flat, self.memory)}
        return {"label": self.label, "reps": self.reps, "warmups": self.warmups,
                "shapes": shapes, "throughput_roots": self.throughput_roots}


FULL_PLAN = Plan("full", reps=5, warmups=1, tree=tree("tree", 4, 5), chain=chain("chain", 200),
                 flat=flat("flat", 1000), memory=tree("wide", 10, 4), throughput_roots=1000)
QUICK_PLAN = Plan("quick", reps=3, warmups=1, tree=tree("tree", 4, 4), chain=chain("chain", 50),
                  flat=flat("flat", 200), memory=tree("wide", 10, 3), throughput_roots=200)


class Backend(Protocol):
    """A database kind, and how each shape gets a fresh, empty database of it."""

    name: str

    def fresh_url(self, key: str) -> str: ...


@dataclass
class SqliteBackend:
    """A new SQLite file per shape, in ``directory``."""

    directory: str
    name: str = "sqlite"

    def fresh_url(self, key: str) -> str:
        path = os.path.abspath(os.path.join(self.directory, f"{key}.db"))
        remove_sqlite_files(path)
        return f"sqlite:///{path}"


@dataclass
class PostgresBackend:
    """One PostgreSQL database whose actorgraph tables are dropped before each shape."""

    url: str
    name: str = "postgresql"

    def fresh_url(self, key: str) -> str:
        drop_actorgraph_tables(self.url)
        return self.url


@dataclass
class ConnectionTally:
    """The runtime's database connections: its own stats, and counts taken from outside."""

    open_samples: list[int] = field(default_factory=list)
    runtime_stats: dict[str, Any] = field(default_factory=dict)
    largest_tree: int = 0

    def sample(self, observer: Observer, bench_connections: int, tree_size: int) -> None:
        """Count the runtime's connections: all of the process's, less the observer's and ``bench_connections``."""
        self.open_samples.append(observer.runtime_connections(bench_connections))
        self.largest_tree = max(self.largest_tree, tree_size)

    def figure(self, database: str) -> Figure:
        stats = self.runtime_stats or "n/a"
        return Figure(database, "database connections", self.largest_tree, unit="connections",
                      target="bounded",
                      extra={"runtime_stats": stats,
                             "open_peak": max(self.open_samples, default=None),
                             "samples": len(self.open_samples),
                             "largest_tree": self.largest_tree})


# ---------------------------------------------------------------- the runtime

def open_runtime(url: str, depth: int = 0) -> Any:
    """A Runtime on ``url`` whose ``max_depth`` admits a tree of ``depth`` levels."""
    from actors import Runtime  # imported late: the runtime may fail to import

    return Runtime(database=url, max_depth=max(32, depth + 1))


def runtime_stats(rt: Any) -> Any:
    """The runtime's own statistics (connections opened), or None when it offers none."""
    stats = getattr(rt, "stats", None)
    if callable(stats):
        value = stats()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return dict(value) if isinstance(value, dict) else repr(value)
    for name in ("connections_opened", "connection_count"):
        if hasattr(rt, name):
            value = getattr(rt, name)
            return {name: value() if callable(value) else value}
    return None


def build_runtime_tree(rt: Any, observer: Observer, shape: Shape) -> str:
    """Start the root of ``shape`` and wait until every execution of the tree is RUNNING."""
    root = rt.start(shape.root_graph, user_id=USER_ID, inputs={})
    observer.wait_all_running(root, shape.count, timeout=max(60.0, shape.count * 0.05))
    return root


def time_runtime_stop(rt: Any, root: str, shape: Shape, figure: Figure) -> float:
    """Time ``rt.stop(root)`` until it returns; note anything the acknowledgement got wrong."""
    gc.collect()
    started = time.perf_counter()
    ack = rt.stop(root, user_id=USER_ID, wait_timeout=STOP_WAIT_TIMEOUT_SECONDS)
    elapsed = time.perf_counter() - started
    if len(ack.terminated) != shape.count:
        _note_once(figure, "check StopAck", f"{len(ack.terminated)} terminated, expected {shape.count}")
    if ack.forced:
        _note_once(figure, "check forced", f"{len(ack.forced)} executions forced")
    return elapsed


def check_all(observer: Observer, root: str, status: str, expected: int, figure: Figure,
              what: str) -> None:
    """Note (once per figure) when the rows under ``root`` are not all ``status``."""
    counts = observer.status_counts(root)
    if counts != {status: expected}:
        _note_once(figure, f"check {what}", f"{counts}, expected {expected} {status}")


def _note_once(figure: Figure, key: str, message: str) -> None:
    figure.extra.setdefault(key, message)


# ------------------------------------------------------------------ figures

def run_stop_figure(backend: Backend, shape: Shape, plan: Plan, tally: ConnectionTally,
                    target: str = "", target_ratio: float | None = None,
                    target_speedup: float | None = None, target_vs_pooled: float | None = None,
                    measure_memory: bool = False) -> list[Figure]:
    """The stop of ``shape`` against its floor and the reference, on a fresh database.

    With ``measure_memory``, the warm-up also measures the resident memory per
    live execution, before any floor tree of that shape ran.
    """
    figure = Figure(backend.name, f"stop {shape.title}", shape.count, target=target,
                    target_ratio=target_ratio, target_speedup=target_speedup,
                    target_vs_pooled=target_vs_pooled)
    figures = [figure]
    try:
        url = backend.fresh_url(shape.key)
        with open_runtime(url, shape.depth) as rt, Observer(url) as observer, \
                Reference(url) as reference, WriteFloor(url) as write_floor:
            rt.load(shape.graph_document())
            bench = StopBench(rt, observer, reference, write_floor, shape, figure, tally)
            for rep in range(plan.warmups + plan.reps):
                _progress(backend, figure, rep, plan)
                if rep == 0 and measure_memory:
                    # The memory is measured first, before any floor tree of this
                    # shape ran, and the floor's warm-up comes after the runtime's
                    # tree is gone, so that the two never live side by side.
                    root, memory = bench.build_measuring_memory()
                    figures.append(memory)
                    bench.stop_all(root)
                    with switch_interval(FLOOR_SWITCH_INTERVAL):
                        time_floor_stop(shape)
                    continue
                floor_s, floor_50_s, pooled_s, write_s, runtime_s, reference_s = bench.repetition()
                if rep >= plan.warmups:
                    if floor_s is not None:
                        figure.floor.append(floor_s)
                    figure.floor_50ms.append(floor_50_s)
                    figure.pooled_floor.append(pooled_s)
                    figure.write_floor.append(write_s)
                    figure.runtime.append(runtime_s)
                    figure.reference.append(reference_s)
            if reference.errors:
                _note_once(figure, "check reference errors", repr(reference.errors[:3]))
            tally.runtime_stats[shape.key] = runtime_stats(rt)
    except Exception as exc:  # a figure that crashes is reported, and the run goes on
        log.debug("figure %s failed", figure.name, exc_info=True)
        figure.error = f"{type(exc).__name__}: {exc}"
    return figures


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """Run the block with the GIL switch interval at ``seconds``, then restore it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@dataclass
class StopBench:
    """One shape on one database: the runtime, the benchmark's connections, the figure."""

    rt: Any
    observer: Observer
    reference: Reference
    write_floor: WriteFloor
    shape: Shape
    figure: Figure
    tally: ConnectionTally

    def repetition(self) -> tuple[float | None, float, float, float, float, float]:
        """Floor (default switch interval, then 50 ms), pooled floor, write floor, runtime, reference; seconds.

        The write floor runs after the runtime (on the rows its stop ended), but is returned before it.
        """
        floor_s = None
        if self.shape.count <= DEFAULT_INTERVAL_FLOOR_MAX:
            floor_s = time_floor_stop(self.shape)
            # The floor's actors have stopped, but their OS threads may still be
            # exiting; building the next tree beside them would measure both.
            _wait_threads_settled(self.figure)
        with switch_interval(FLOOR_SWITCH_INTERVAL):
            floor_50_s = time_floor_stop(self.shape)
            _wait_threads_settled(self.figure)
        dispatcher = Dispatcher()  # as many threads as a Runtime's, by default
        try:
            pooled_s = time_pooled_floor_stop(self.shape, dispatcher)
        finally:
            dispatcher.close()
        root = build_runtime_tree(self.rt, self.observer, self.shape)
        runtime_s, write_s, reference_s = self.stop_all(root)
        return floor_s, floor_50_s, pooled_s, write_s, runtime_s, reference_s

    def build_measuring_memory(self) -> tuple[str, Figure]:
        """Build the tree and measure the resident memory it added, per execution."""
        gc.collect()
        before = proc_status_kib("VmRSS")
        root = build_runtime_tree(self.rt, self.observer, self.shape)
        running = proc_status_kib("VmRSS")
        return root, memory_figure(self.figure.database, self.shape.count, before, running)

    def stop_all(self, root: str) -> tuple[float, float, float]:
        """Time the runtime's stop of ``root``; reset its rows and time the write floor, then the reference, on them."""
        shape, figure = self.shape, self.figure
        self.tally.sample(self.observer, self._bench_connections(), shape.count)
        runtime_s = time_runtime_stop(self.rt, root, shape, figure)
        self.tally.sample(self.observer, self._bench_connections(), shape.count)
        check_all(self.observer, root, "TERMINATED", shape.count, figure, "after rt.stop")
        self._reset(root, nodes=True)
        ids = self.observer.subtree(root)
        gc.collect()
        write_s, moved = self.write_floor.time_stop(ids)
        if moved != shape.count:
            _note_once(figure, "check write floor", f"{moved} rows moved, expected {shape.count}")
        check_all(self.observer, root, "TERMINATED", shape.count, figure, "after the write floor")
        self._reset(root)
        gc.collect()
        reference_s = self.reference.time_stop(root)
        check_all(self.observer, root, "TERMINATED", shape.count, figure, "after reference")
        return runtime_s, write_s, reference_s

    def _bench_connections(self) -> int:
        """The benchmark's connections besides the observer's: the reference's and the write floor's."""
        return self.reference.open_connections + self.write_floor.open_connections

    def _reset(self, root: str, nodes: bool = False) -> None:
        reset = self.observer.reset_to_running(root, nodes=nodes)
        if reset != self.shape.count:
            _note_once(self.figure, "check reset", f"{reset} rows reset, expected {self.shape.count}")


def memory_figure(database: str, executions: int, before_kib: int, running_kib: int) -> Figure:
    """The resident memory that ``executions`` live executions added, per execution."""
    per_execution = (running_kib - before_kib) / executions
    return Figure(database, "resident memory per live execution", executions,
                  unit="KiB/exec", target=f"<= {MEMORY_TARGET_KIB:.0f} KiB/exec",
                  runtime=[per_execution],
                  extra={"rss_before_kib": before_kib, "rss_running_kib": running_kib,
                         "vmhwm_kib": proc_status_kib("VmHWM"), "threads": _thread_count(),
                         "target_met": per_execution <= MEMORY_TARGET_KIB})


def run_throughput_figures(backend: Backend, plan: Plan, tally: ConnectionTally) -> list[Figure]:
    """Executions started and run to COMPLETED per second, against pykka's bare start+stop.

    Twice: one caller starting every root in turn (each ``start`` returns
    after its row's commit), and ``CONCURRENT_CALLERS`` threads sharing the
    same roots, whose rows then share commits.
    """
    roots = plan.throughput_roots
    target = ">= 0.5x pykka start+stop"
    figures = [Figure(backend.name, "start to COMPLETED, one-node roots", roots, unit="exec/s",
                      target=target, target_ratio=0.5),
               Figure(backend.name, f"same, {CONCURRENT_CALLERS} threads calling start", roots,
                      unit="exec/s", target=target, target_ratio=0.5)]
    try:
        url = backend.fresh_url("throughput")
        with open_runtime(url) as rt, Observer(url) as observer, \
                concurrent.futures.ThreadPoolExecutor(CONCURRENT_CALLERS) as callers:
            rt.load(one_node_graph_document())
            for rep in range(plan.warmups + plan.reps):
                for figure, pool in zip(figures, (None, callers)):
                    _progress(backend, figure, rep, plan)
                    floor_rate = bare_start_stop_rate(roots)
                    runtime_rate = runtime_completion_rate(rt, roots, figure, pool)
                    tally.sample(observer, 0, 1)
                    if rep >= plan.warmups:
                        figure.floor.append(floor_rate)
                        figure.runtime.append(runtime_rate)
            tally.runtime_stats["throughput"] = runtime_stats(rt)
    except Exception as exc:
        log.debug("throughput figures failed", exc_info=True)
        for figure in figures:
            figure.error = f"{type(exc).__name__}: {exc}"
    return figures


def runtime_completion_rate(rt: Any, roots: int, figure: Figure,
                            callers: concurrent.futures.Executor | None = None) -> float:
    """Start ``roots`` one-node executions, wait for each to end; return executions per second.

    With ``callers``, the roots are started from its threads at once.
    """
    def start(_: int) -> str:
        return rt.start(ONE_NODE_GRAPH, user_id=USER_ID, inputs={})

    gc.collect()
    started = time.perf_counter()
    if callers is None:
        ids = [start(index) for index in range(roots)]
    else:
        ids = list(callers.map(start, range(roots)))
    records = [rt.wait(execution_id, timeout=COMPLETION_TIMEOUT_SECONDS) for execution_id in ids]
    elapsed = time.perf_counter() - started
    not_completed = [r for r in records if str(getattr(r.status, "value", r.status)) != "COMPLETED"]
    if not_completed:
        _note_once(figure, "check completed", f"{len(not_completed)} of {roots} did not complete:"
                   f" {not_completed[0]}")
    return roots / elapsed


FIGURES = ("wide", "tree", "chain", "flat", "throughput")


def run_backend(backend: Backend, plan: Plan, only: tuple[str, ...] = FIGURES) -> list[Figure]:
    """Every figure on one database, the memory tree first (before other shapes grew the heap)."""
    tally = ConnectionTally()
    figures: list[Figure] = []
    if "wide" in only:
        figures += run_stop_figure(backend, plan.memory, plan, tally, target="<= 2x floor",
                                   target_ratio=2.0, measure_memory=True)
    if "tree" in only:
        figures += run_stop_figure(backend, plan.tree, plan, tally,
                                   target="<= 1.5x floor, >= 4x ref, <= 4x pooled",
                                   target_ratio=1.5, target_speedup=4.0, target_vs_pooled=4.0)
    if "chain" in only:
        figures += run_stop_figure(backend, plan.chain, plan, tally, target="<= 2x floor",
                                   target_ratio=2.0)
    if "flat" in only:
        figures += run_stop_figure(backend, plan.flat, plan, tally)
    if "throughput" in only:
        figures += run_throughput_figures(backend, plan, tally)
    figures.append(tally.figure(backend.name))
    return figures


# -------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stop_tree",
        description="Time actorgraph's persisted cascading stop against plain pykka and"
                    " the recursive asyncio reference, on SQLite and optionally PostgreSQL.")
    parser.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES), metavar="FIGURE",
                        help=f"run only these figures ({', '.join(FIGURES)}; default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller shapes and 3 repetitions (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--postgres", metavar="URL",
                        help="also run on PostgreSQL (its actorgraph tables are dropped!)")
    parser.add_argument("--sqlite-dir", metavar="DIR",
                        help="where the SQLite files go (default: a temporary directory)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def sqlite_directory(requested: str | None) -> Iterator[str]:
    """``requested`` (created if missing), or a temporary directory removed afterwards."""
    if requested:
        os.makedirs(requested, exist_ok=True)
        yield requested
        return
    directory = tempfile.mkdtemp(prefix="actorgraph-bench-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def server_versions(backends: list[Backend]) -> dict[str, str]:
    """Each database server's version, best effort."""
    versions: dict[str, str] = {}
    for backend in backends:
        if not isinstance(backend, PostgresBackend):
            versions[backend.name] = f"SQLite {sqlite3.sqlite_version}"
            continue
        try:
            with Observer(backend.url) as observer:
                versions[backend.name] = observer.server_version()
        except Exception as exc:
            versions[backend.name] = f"unknown ({type(exc).__name__})"
    return versions


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; return 0, or 1 when a figure crashed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    # The runtime leaves the GIL switch interval alone, and so does the
    # benchmark: every figure runs at the interpreter's default, except the
    # floor@50ms column (see switch_interval).
    started = time.monotonic()
    with sqlite_directory(args.sqlite_dir) as directory:
        backends: list[Backend] = [SqliteBackend(directory)]
        if args.postgres:
            backends.append(PostgresBackend(args.postgres))
        figures = [figure for backend in backends for figure in run_backend(backend, plan, tuple(args.only))]
        machine = machine_info(server_versions(backends))
    machine["databases"] = {b.name: describe_url(getattr(b, "url", "sqlite:///" + directory))
                            for b in backends}
    machine["elapsed_seconds"] = round(time.monotonic() - started, 1)
    machine["switch_interval_s"] = sys.getswitchinterval()
    print(format_header(machine, plan.describe()))
    print(format_table(figures))
    print(f"\ntotal {machine['elapsed_seconds']} s")
    if args.json:
        write_json(args.json, machine, plan.to_json(), figures)
        print(f"figures written to {args.json}")
    return 1 if any(figure.error for figure in figures) else 0


def _progress(backend: Backend, figure: Figure, rep: int, plan: Plan) -> None:
    kind = "warm-up" if rep < plan.warmups else f"rep {rep - plan.warmups + 1}/{plan.reps}"
    elapsed = time.monotonic() - _PROCESS_STARTED
    print(f"[{elapsed:6.1f}s] [{backend.name}] {figure.name}: {kind}", file=sys.stderr, flush=True)


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


# Threads a runtime keeps besides its actors (writer, timers, watcher, pool, ...).
_SETTLED_THREADS = 64


def _wait_threads_settled(figure: Figure, timeout: float = 120.0) -> None:
    """Wait (bounded) until the process is back to a handful of threads."""
    deadline = time.monotonic() + timeout
    while _thread_count() > _SETTLED_THREADS:
        if time.monotonic() >= deadline:
            _note_once(figure, "check threads", f"{_thread_count()} threads still alive before the build")
            return
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
