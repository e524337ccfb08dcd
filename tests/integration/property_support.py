"""Inputs and observations for the stop properties (see test_properties.py).

- ``scenarios()``: a hypothesis strategy drawing a few graphs, the roots to
  start and the stops to send; ``Scenario.graph_file()`` is what ``rt.load`` takes.
- ``USER_BLOCKS``: the user blocks those graphs use (cooperative, stubborn, exploding).
- ``broken_turns``: about half the scenarios also break one turn of an
  execution actor (the n-th message of one type raises, as a bug of ours
  would), which must end that execution FAILED without breaking any invariant.
- ``run_example``: runs one scenario on a fresh runtime and returns what was
  seen: every ``rt.stop`` call with the subtree read right after it returned
  (``StopRecord``), every row of the example read every ~20 ms by a
  ``Sampler``, and the rows after ``rt.close()``.

Everything is read through connections of the test's own (``Observer``),
never through the runtime's memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import sys
import threading
import time
from typing import Any, Callable, Iterator, Protocol

from hypothesis import assume
from hypothesis import strategies as st

from actors import Runtime, StopAck, execution, messages, stop_execution
from tests.faultkit import SqliteLockHolder
from tests.helpers import Observer, wait_until

USER = "alice"

# Runtimes fail an execution's leftover work after this long (the default
# 15 s would make every example with a failure and stubborn work slow).
FAILURE_TIMEOUT = 2.0
# rt.close() stops what is still live with this wait_timeout.
CLOSE_TIMEOUT = 1.0
SAMPLE_INTERVAL = 0.02
# After the last stop returned, the sampler keeps reading this long before
# rt.close(), so that a node or child starting late would be seen.
SETTLE = 0.3
# A stop thread not back after wait_timeout + slack + this is reported as hung
# (the runtime's own ask times out after wait_timeout + 30 s).
HUNG_AFTER = 40.0
# Trees bigger than this are not drawn (3 roots of at most 4 levels).
MAX_EXECUTIONS = 40

ACTIVE = ("QUEUED", "RUNNING")
TERMINAL = ("COMPLETED", "FAILED", "TERMINATED")

# What a stop that cannot persist promises in its DatabaseError (Runtime.stop):
# it completes by itself once the database answers, which an example with
# outages checks for up to PROMISE_KEPT_WITHIN s after the last one healed.
PROMISE = "when the database answers"
PROMISE_KEPT_WITHIN = 30.0


# -- scenarios -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Node:
    """One drawn node (``late_*`` and ``held_fail`` are two or three nodes in the graph file).

    kind:
        sleep:      built-in ``sleep`` of ``seconds``, ``ignore_stop`` as drawn.
        agent:      starts a child of graph ``target`` at once.
        late_agent: a sleep of ``seconds``, then an agent starting ``target``
                    (children are created while stops may be under way).
        fail:       built-in ``fail``: fails as soon as it starts.
        bad_sleep:  a ``sleep`` whose ``seconds`` is not a number: fails when it starts.
        late_fail:  a sleep of ``seconds`` (``ignore_stop`` as drawn), then ``fail``.
        held_fail:  a late_fail beside a long sleep that ignores the stop: the
                    failing execution waits failure_timeout for it, and a stop
                    that meets the failure must not wait as long.
        coop:       user block looping on ``ctx.sleep`` for ``seconds``; a stop ends it.
        stubborn:   user block ignoring the stop (``time.sleep(seconds)``).
        explode:    user block waiting ``seconds`` cooperatively, then raising.
    """

    kind: str
    seconds: float = 0.0
    ignore_stop: bool = False
    target: int = 0

    def __repr__(self) -> str:
        if self.kind in ("agent",):
            return f"agent(g{self.target})"
        if self.kind == "late_agent":
            return f"late_agent({self.seconds}, g{self.target})"
        if self.kind in ("fail", "bad_sleep"):
            return self.kind
        if self.kind == "held_fail":
            return f"held_fail({self.seconds})"
        flag = ", ignore_stop" if self.ignore_stop else ""
        return f"{self.kind}({self.seconds}{flag})"

    def graph_nodes(self, name: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """The graph file's nodes and links for this node, named after ``name``."""
        if self.kind == "sleep":
            return {name: {"block": "sleep", "input": self._sleep_input()}}, []
        if self.kind == "agent":
            return {name: {"block": "agent", "input": {"graph": f"g{self.target}", "inputs": {}}}}, []
        if self.kind == "late_agent":
            nodes = {f"{name}_wait": {"block": "sleep", "input": {"seconds": self.seconds, "value": {}}},
                     name: {"block": "agent", "input": {"graph": f"g{self.target}"}}}
            return nodes, [{"from": f"{name}_wait.value", "to": f"{name}.inputs"}]
        if self.kind == "fail":
            return {name: {"block": "fail", "input": {"message": "drawn to fail"}}}, []
        if self.kind == "bad_sleep":
            return {name: {"block": "sleep", "input": {"seconds": "soon"}}}, []
        if self.kind in ("late_fail", "held_fail"):
            nodes = {f"{name}_wait": {"block": "sleep", "input": {**self._sleep_input(), "value": "late failure"}},
                     name: {"block": "fail"}}
            if self.kind == "held_fail":
                nodes[f"{name}_hold"] = {"block": "sleep", "input": {"seconds": LONG, "ignore_stop": True}}
            return nodes, [{"from": f"{name}_wait.value", "to": f"{name}.message"}]
        return {name: {"block": self.kind, "input": {"seconds": self.seconds}}}, []

    def _sleep_input(self) -> dict[str, Any]:
        return {"seconds": self.seconds, **({"ignore_stop": True} if self.ignore_stop else {})}


@dataclasses.dataclass(frozen=True)
class Start:
    graph: int
    delay: float  # seconds after the previous start


@dataclasses.dataclass(frozen=True)
class StopAction:
    """One step of the scenario: stop a root or one of its descendants.

    mode: "inline" waits for the stop before the next step; "background"
    goes on at once; "concurrent" sends a second stop of the same execution
    from another thread at the same instant (``twin_*`` are its flags).
    via: "here" is ``rt.stop`` in the hosting runtime; "elsewhere" is
    ``actors.stop_execution`` on the database URL, as another process
    stops it (a stop request the host's stop watcher hands on).
    """

    delay: float  # seconds after the previous step
    root: int  # which start (modulo the number of starts)
    pick: int | None  # None: the root; else an index into its subtree, sorted
    cascade: bool
    wait_timeout: float
    mode: str = "inline"
    twin_cascade: bool = True
    twin_wait_timeout: float = 1.0
    via: str = "here"
    twin_via: str = "here"


@dataclasses.dataclass(frozen=True)
class Break:
    """A bug of ours: the ``nth`` message of type ``message`` that any execution actor handles raises.

    With ``in_salvage``, that actor's salvage raises too: pykka stops it,
    and its runtime writes the execution from outside.
    """

    message: str
    nth: int
    in_salvage: bool = False


# Every message an execution actor handles in these examples. (Not its
# salvage's commit: ``in_salvage`` breaks the salvage itself.)
BREAKABLE = ("Stop", "CascadeStop", "NodeFinished", "ChildWriteQueued", "ChildEnded", "ChildContinues",
             "Begin", "FinalCommitted", "DeadlinePassed")


@dataclasses.dataclass(frozen=True)
class Scenario:
    graphs: tuple[tuple[Node, ...], ...]
    starts: tuple[Start, ...]
    stops: tuple[StopAction, ...]
    breaks: tuple[Break, ...] = ()

    def graph_file(self) -> dict[str, Any]:
        graphs = {}
        for index, nodes in enumerate(self.graphs):
            spec: dict[str, Any] = {"nodes": {}, "links": []}
            for position, node in enumerate(nodes):
                more_nodes, links = node.graph_nodes(f"n{position}_{node.kind}")
                spec["nodes"].update(more_nodes)
                spec["links"].extend(links)
            graphs[f"g{index}"] = spec
        return {"graphs": graphs}

    def executions(self, graph: int) -> int:
        """How many executions a root of ``graph`` makes if nothing fails or stops."""
        return 1 + sum(self.executions(n.target) for n in self.graphs[graph]
                       if n.kind in ("agent", "late_agent"))


# A sleep this long never ends during an example: only a stop (or, with
# ignore_stop, a deadline) ends it.
LONG = 30.0
SLEEP_SECONDS = (0.05, 0.3, 1.0, LONG)
DELAYS = (0.0, 0.05, 0.2, 0.5)
COOP_SECONDS = (0.1, 0.5, LONG)
# Stubborn blocks hold a worker thread past rt.close(): keep them short.
STUBBORN_SECONDS = (0.05, 0.3, 1.0)
# Weighted: agents and sleeps are the common case, failures the spice.
KINDS = ("sleep", "agent", "sleep", "agent", "late_agent", "coop", "stubborn",
         "late_fail", "held_fail", "explode", "fail", "bad_sleep")
# One stop in four comes from "another process".
VIAS = st.sampled_from(("here", "here", "here", "elsewhere"))
WAIT_TIMEOUTS = st.one_of(st.sampled_from((0.0, 0.05, 0.2, 0.5, 1.0, 2.0)),
                          st.floats(min_value=0.05, max_value=2.0, allow_nan=False))


@st.composite
def nodes(draw: Any, index: int, graph_count: int) -> Node:
    """A node of graph ``index``: agents only start later graphs (acyclic)."""
    kinds = KINDS if index + 1 < graph_count else tuple(k for k in KINDS if "agent" not in k)
    kind = draw(st.sampled_from(kinds))
    if kind == "agent":
        return Node(kind, target=draw(st.integers(index + 1, graph_count - 1)))
    if kind == "late_agent":
        return Node(kind, seconds=draw(st.sampled_from(DELAYS)),
                    target=draw(st.integers(index + 1, graph_count - 1)))
    if kind == "sleep":
        return Node(kind, seconds=draw(st.sampled_from(SLEEP_SECONDS)), ignore_stop=draw(st.booleans()))
    if kind == "late_fail":
        return Node(kind, seconds=draw(st.sampled_from(DELAYS)), ignore_stop=draw(st.booleans()))
    if kind == "held_fail":
        return Node(kind, seconds=draw(st.sampled_from(DELAYS)))
    if kind == "coop":
        return Node(kind, seconds=draw(st.sampled_from(COOP_SECONDS)))
    if kind == "stubborn":
        return Node(kind, seconds=draw(st.sampled_from(STUBBORN_SECONDS)))
    if kind == "explode":
        return Node(kind, seconds=draw(st.sampled_from(DELAYS)))
    return Node(kind)


@st.composite
def stop_actions(draw: Any) -> StopAction:
    return StopAction(
        delay=draw(st.sampled_from((0.0, 0.05, 0.1, 0.3, 0.6))),
        root=draw(st.integers(0, 2)),
        pick=draw(st.none() | st.integers(0, MAX_EXECUTIONS)),
        cascade=draw(st.booleans()),
        wait_timeout=draw(WAIT_TIMEOUTS),
        mode=draw(st.sampled_from(("inline", "background", "concurrent"))),
        twin_cascade=draw(st.booleans()),
        twin_wait_timeout=draw(WAIT_TIMEOUTS),
        via=draw(VIAS),
        twin_via=draw(VIAS),
    )


@st.composite
def scenarios(draw: Any) -> Scenario:
    graph_count = draw(st.integers(1, 4))
    graphs = tuple(tuple(draw(st.lists(nodes(index, graph_count), min_size=1, max_size=3)))
                   for index in range(graph_count))
    starts = tuple(draw(st.lists(
        st.builds(Start, graph=st.integers(0, graph_count - 1), delay=st.sampled_from((0.0, 0.05, 0.2))),
        min_size=1, max_size=3)))
    scenario = Scenario(graphs=graphs, starts=starts,
                        stops=tuple(draw(st.lists(stop_actions(), min_size=1, max_size=4))),
                        breaks=draw(st.one_of(st.just(()), st.tuples(st.builds(
                            Break, message=st.sampled_from(BREAKABLE), nth=st.integers(1, 3),
                            in_salvage=st.booleans())))))
    assume(sum(scenario.executions(s.graph) for s in starts) <= MAX_EXECUTIONS)
    return scenario


@dataclasses.dataclass(frozen=True)
class Outage:
    """A fault on the runtime's path to the database, ``at`` s after the last root started.

    On PostgreSQL (a ``TcpProxy``): kind "cut" resets every open connection
    and refuses every new one for ``seconds`` (a partition, or a server that
    is down); "blip" resets every open connection once, and new ones go
    through (a restart that is over at once). The test's own connections go
    around the proxy. On SQLite (``LockedSqlite``): another process holds
    the write lock for ``seconds``, or for an instant.
    """

    kind: str
    at: float
    seconds: float = 0.0


OUTAGE_AT = (0.0, 0.05, 0.1, 0.3, 0.6, 1.0)
# A lock holder of a test that died lets go by itself after this long.
LOCK_MAX_HOLD = 30.0
OUTAGE_SECONDS = (0.05, 0.2, 0.5, 1.0, 2.0, 7.0)


def outages() -> st.SearchStrategy[tuple[Outage, ...]]:
    """One or two outages, in the order they begin."""
    one = st.one_of(
        st.builds(Outage, kind=st.just("cut"), at=st.sampled_from(OUTAGE_AT), seconds=st.sampled_from(OUTAGE_SECONDS)),
        st.builds(Outage, kind=st.just("blip"), at=st.sampled_from(OUTAGE_AT)))
    return st.lists(one, min_size=1, max_size=2).map(lambda drawn: tuple(sorted(drawn, key=lambda o: o.at)))


# -- user blocks -------------------------------------------------------------------

def coop(ctx: Any, seconds: float) -> dict[str, Any]:
    """Works in small steps and gives up as soon as the execution is stopped."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if not ctx.sleep(min(0.05, remaining)):
            return {"value": "stopped"}
    return {"value": "done"}


def stubborn(ctx: Any, seconds: float) -> dict[str, Any]:
    """Ignores ctx.stop_event: the runtime can only terminate it in the record."""
    time.sleep(seconds)  # deliberately uncooperative
    return {"value": "late"}


def explode(ctx: Any, seconds: float) -> dict[str, Any]:
    """Fails after ``seconds`` unless stopped first."""
    if not ctx.sleep(seconds):
        return {"value": "stopped"}
    raise RuntimeError("drawn to explode")


USER_BLOCKS = {name: (fn, ("seconds",), ("value",)) for name, fn in
               (("coop", coop), ("stubborn", stubborn), ("explode", explode))}


# -- what the test sees ---------------------------------------------------------------

_SUBTREE = ("WITH RECURSIVE sub(id) AS (SELECT id FROM graph_execution WHERE id = ?"
            " UNION ALL SELECT g.id FROM graph_execution g JOIN sub ON g.parent_id = sub.id) ")
# One statement each, so one snapshot each on both databases.
SUBTREE_ROWS = (_SUBTREE + "SELECT g.id, g.parent_id, g.graph_id, g.depth, g.status, g.created_at,"
                " g.started_at, g.ended_at, g.stop_cascade FROM graph_execution g JOIN sub ON g.id = sub.id")
SUBTREE_NODES = (_SUBTREE + "SELECT n.id, n.graph_execution_id, n.node_id, n.status, n.started_at, n.ended_at"
                 " FROM node_execution n JOIN sub ON n.graph_execution_id = sub.id")
EXAMPLE_ROWS = ("SELECT id, parent_id, graph_id, depth, status, started_at, ended_at, stop_cascade"
                " FROM graph_execution WHERE runtime_id = ?")
EXAMPLE_NODES = ("SELECT n.id, n.graph_execution_id, n.node_id, n.status, n.started_at, n.ended_at"
                 " FROM node_execution n JOIN graph_execution g ON g.id = n.graph_execution_id"
                 " WHERE g.runtime_id = ?")


@dataclasses.dataclass
class StopRecord:
    """One stop call (``rt.stop``, or ``stop_execution`` from "elsewhere") and the subtree read right after it returned."""

    label: str
    target: str
    cascade: bool
    wait_timeout: float
    via: str = "here"
    sent_at: float = 0.0
    returned_at: float | None = None  # None: the call never returned (hung)
    returned_wall: dt.datetime | None = None  # the same moment in UTC, to compare with the rows' timestamps
    ack: StopAck | None = None
    error: BaseException | None = None  # what rt.stop raised
    harness_error: BaseException | None = None  # the test's own machinery failed
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    nodes: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def duration(self) -> float | None:
        return None if self.returned_at is None else self.returned_at - self.sent_at


@dataclasses.dataclass(frozen=True)
class Sample:
    """Every row of the example, read with one statement per table."""

    begun: float  # time.monotonic() before the first statement
    executions: dict[str, dict[str, Any]]
    nodes: dict[Any, dict[str, Any]]


def read_sample(observer: Observer, runtime_id: str) -> Sample:
    begun = time.monotonic()
    executions = {r["id"]: r for r in observer.query(EXAMPLE_ROWS, (runtime_id,))}
    nodes = {n["id"]: n for n in observer.query(EXAMPLE_NODES, (runtime_id,))}
    return Sample(begun=begun, executions=executions, nodes=nodes)


class Sampler:
    """A thread reading every row of one runtime every SAMPLE_INTERVAL, until stopped."""

    def __init__(self, url: str, runtime_id: str) -> None:
        self.url = url
        self.runtime_id = runtime_id
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="property-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            observer = Observer(self.url)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
            return
        try:
            while not self._stop.is_set():
                self.samples.append(read_sample(observer, self.runtime_id))
                self._stop.wait(SAMPLE_INTERVAL)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
        finally:
            observer.close()

    def has_sample_after(self, moment: float) -> bool:
        return bool(self.samples) and self.samples[-1].begun >= moment

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the sampler did not stop"
        if self.error is not None:
            raise AssertionError(f"the sampler failed (a test bug, not an invariant): {self.error!r}") \
                from self.error


class FaultPath(Protocol):
    """What the outages need of the runtime's path to the database (``TcpProxy``, ``LockedSqlite``)."""

    def cut(self) -> None: ...

    def heal(self) -> None: ...

    def drop_all(self) -> None: ...


class LockedSqlite:
    """The outages of a SQLite database: another process holds its write lock.

    ``cut`` takes the lock (a new ``SqliteLockHolder`` each time) and
    ``heal`` lets go; a blip holds it for an instant. Readers go on reading
    (WAL), so the test's own reads see every row throughout.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._holder: SqliteLockHolder | None = None

    def cut(self) -> None:
        self.heal()
        self._holder = SqliteLockHolder(self._path, max_hold=LOCK_MAX_HOLD)
        self._holder.acquire()

    def heal(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.close()

    def drop_all(self) -> None:
        self.cut()
        self.heal()


class OutageInjector:
    """A thread that puts each ``Outage`` on ``path`` at its time; ``windows`` says when each was on.

    ``finish`` waits for the schedule to run out (it is bounded: at most two
    outages of at most OUTAGE_SECONDS[-1] each) and heals the path whatever
    happened, so that an example never leaves it cut.
    """

    def __init__(self, path: FaultPath, planned: tuple[Outage, ...], note: Callable[..., None]) -> None:
        self.windows: list[tuple[float, float]] = []  # (on, off), time.monotonic()
        self.error: BaseException | None = None
        self._path = path
        self._planned = planned
        self._note = note
        self._began = time.monotonic()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="property-outages", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for outage in self._planned:
                # Drawn inputs: when each outage begins and how long it lasts, not waits.
                if self._abort.wait(max(0.0, self._began + outage.at - time.monotonic())):
                    return
                on = time.monotonic()
                if outage.kind == "blip":
                    self._path.drop_all()
                    self._note("outage: every connection of the runtime reset", at=on)
                    self.windows.append((on, on))
                    continue
                self._path.cut()
                self._note(f"outage: the runtime's path to the database cut for {outage.seconds}s", at=on)
                self._abort.wait(outage.seconds)
                self._path.heal()
                off = time.monotonic()
                self._note("outage: healed", at=off)
                self.windows.append((on, off))
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def finish(self, abort: bool = False) -> None:
        """Let the schedule run out (or cut it short with ``abort``), then make sure the path is healed."""
        if abort:
            self._abort.set()
        bound = sum(o.at + o.seconds for o in self._planned) + 30.0
        self._thread.join(timeout=bound)
        self._abort.set()
        self._thread.join(timeout=30.0)
        self._path.heal()
        if self._thread.is_alive():
            raise AssertionError("the outage injector did not finish (a test bug, not an invariant)")
        if self.error is not None:
            raise AssertionError(f"the outage injector failed (a test bug, not an invariant): {self.error!r}") \
                from self.error


@dataclasses.dataclass
class Outcome:
    """What one example did and saw."""

    began: float
    roots: list[str]
    records: list[StopRecord]
    samples: list[Sample]
    final: Sample | None  # read after rt.close()
    log: list[str]
    outages: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (on, off), monotonic
    # Stops that raised DatabaseError promising to complete on their own, whose
    # subtree was still active PROMISE_KEPT_WITHIN s after the last outage healed.
    broken_promises: list[str] = dataclasses.field(default_factory=list)

    def timeline(self) -> str:
        """The example's log, then its final tree (read after rt.close()) with every status."""
        lines = list(self.log)
        if self.final is not None:
            rows = self.final.executions
            children: dict[Any, list[dict[str, Any]]] = {}
            for row in sorted(rows.values(), key=lambda r: (str(r["started_at"]), r["id"])):
                children.setdefault(row["parent_id"], []).append(row)
            lines.append("final tree (after rt.close()):")

            def show(row: dict[str, Any], indent: int) -> None:
                nodes = sorted(f"{n['node_id']}={n['status']}" for n in self.final.nodes.values()
                               if n["graph_execution_id"] == row["id"])
                cascade = "" if row["stop_cascade"] else " (stopped without cascade)"
                lines.append(f"{'  ' * indent}{short(row['id'])} {row['graph_id']} {row['status']}"
                             f"{cascade} nodes: {', '.join(nodes)}")
                for child in children.get(row["id"], []):
                    show(child, indent + 1)

            for root in children.get(None, []):
                show(root, 1)
        return "\n".join(lines)


def abandons(row: dict[str, Any]) -> bool:
    """Ended by a non-cascading stop: its RUNNING children run on, no longer its subtree's."""
    return row["status"] == "TERMINATED" and not row["stop_cascade"]


def stopped_ids(record: StopRecord) -> set[str]:
    """What the stop answers for, from the rows read right after it returned.

    Non-cascading: the execution alone. Cascading: the execution and all its
    descendants, those a non-cascading stop left running included.
    """
    if not record.cascade:
        return {record.target}
    return {r["id"] for r in record.rows}


def short(execution_id: str) -> str:
    """How ids appear in the timeline (the final tree closing it names them all)."""
    return execution_id[:8]


def _stop_in_thread(rt: Runtime, url: str, record: StopRecord, barrier: threading.Barrier | None,
                    stopper_url: str) -> None:
    """``url``: the test's own path to the database; ``stopper_url``: the one a stop from elsewhere takes."""
    try:
        observer = Observer(url)  # opened first: the read after the return is immediate
    except BaseException as exc:  # noqa: BLE001 - reported as a harness error
        record.harness_error = exc
        return
    try:
        if barrier is not None:
            barrier.wait()
        record.sent_at = time.monotonic()
        try:
            if record.via == "elsewhere":
                record.ack = stop_execution(stopper_url, record.target, USER, wait_timeout=record.wait_timeout,
                                            cascade=record.cascade)
            else:
                record.ack = rt.stop(record.target, USER, wait_timeout=record.wait_timeout,
                                     cascade=record.cascade)
        except Exception as exc:  # noqa: BLE001 - checked by the invariants
            record.error = exc
        returned_at = time.monotonic()
        record.returned_wall = dt.datetime.now(dt.timezone.utc)
        record.rows = observer.query(SUBTREE_ROWS, (record.target,))
        record.nodes = observer.query(SUBTREE_NODES, (record.target,))
        record.returned_at = returned_at
    except BaseException as exc:  # noqa: BLE001 - reported as a harness error
        record.harness_error = exc
    finally:
        observer.close()


class _Example:
    """Runs one scenario; every thread it starts is joined (bounded) before it returns."""

    def __init__(self, url: str, scenario: Scenario, slack: float, path: FaultPath | None = None,
                 runtime_url: str | None = None, planned: tuple[Outage, ...] = ()) -> None:
        self.url = url
        self.runtime_url = runtime_url or url
        self.path = path
        self.planned = planned
        self.injector: OutageInjector | None = None
        self.broken_promises: list[str] = []
        self.scenario = scenario
        self.slack = slack
        self.began = time.monotonic()
        self.log: list[tuple[float, str]] = []
        self.records: list[StopRecord] = []
        self.threads: list[tuple[threading.Thread, StopRecord]] = []
        self.roots: list[str] = []

    def note(self, text: str, at: float | None = None) -> None:
        """Log ``text`` as of ``at`` (time.monotonic(), default now); the log is sorted by time."""
        self.log.append((time.monotonic() if at is None else at, text))

    def run(self) -> Outcome:
        with broken_turns(self.scenario.breaks, self.note):
            return self._run()

    def _run(self) -> Outcome:
        rt = Runtime(database=self.runtime_url, failure_timeout=FAILURE_TIMEOUT)
        sampler: Sampler | None = None
        final: Sample | None = None
        try:
            for block, (fn, inputs, outputs) in USER_BLOCKS.items():
                rt.register_block(block, fn, inputs=inputs, outputs=outputs)
            rt.load(self.scenario.graph_file())
            sampler = Sampler(self.url, rt.runtime_id)
            observer = Observer(self.url)
            try:
                self._start_roots(rt)
                if self.path is not None and self.planned:
                    self.injector = OutageInjector(self.path, self.planned, self.note)
                for number, action in enumerate(self.scenario.stops):
                    time.sleep(action.delay)  # a drawn input: when the stop is sent, not a wait
                    self._stop(rt, observer, number, action)
            finally:
                self._join_all()
                try:
                    if self.injector is not None:
                        self.injector.finish(abort=sys.exc_info()[0] is not None)
                        self._check_promises(observer)
                finally:
                    observer.close()
            last = max((r.returned_at for r in self.records if r.returned_at is not None), default=0.0)
            wait_until(lambda: sampler.has_sample_after(last + SETTLE), 30.0, "a sample after the last stop")
        finally:
            self.note("rt.close()")
            try:
                rt.close(timeout=CLOSE_TIMEOUT)
                self.note("closed")
            finally:
                if sampler is not None:
                    sampler.stop()
                    observer = Observer(self.url)
                    try:
                        final = read_sample(observer, rt.runtime_id)
                    finally:
                        observer.close()
        log = [f"{at - self.began:7.3f}s {text}" for at, text in sorted(self.log, key=lambda entry: entry[0])]
        return Outcome(began=self.began, roots=self.roots, records=self.records,
                       samples=sampler.samples if sampler else [], final=final, log=log,
                       outages=self.injector.windows if self.injector else [],
                       broken_promises=self.broken_promises)

    def _check_promises(self, observer: Observer) -> None:
        """A stop that raised DatabaseError promising to complete on its own does, once the path healed.

        Each one's subtree (as read right after it raised) must be terminal
        within PROMISE_KEPT_WITHIN s, nodes included, without another call.
        """
        promised = [r for r in self.records if r.error is not None and PROMISE in str(r.error)]
        if not promised:
            return
        def still_active() -> list[str]:
            active = []
            for record in promised:
                ids = stopped_ids(record)
                rows = observer.query(SUBTREE_ROWS, (record.target,))
                nodes = observer.query(SUBTREE_NODES, (record.target,))
                active += [f"{record.label}: {short(r['id'])}={r['status']}" for r in rows
                           if r["id"] in ids and r["status"] in ACTIVE]
                active += [f"{record.label}: {short(n['graph_execution_id'])}.{n['node_id']}={n['status']}"
                           for n in nodes if n["graph_execution_id"] in ids and n["status"] in ACTIVE]
            return active
        try:
            wait_until(lambda: not still_active(), PROMISE_KEPT_WITHIN, "the promised stops to complete")
            self.note("the promised stops completed")
        except AssertionError:
            self.broken_promises = still_active()

    def _start_roots(self, rt: Runtime) -> None:
        for start in self.scenario.starts:
            time.sleep(start.delay)  # a drawn input
            root = rt.start(f"g{start.graph}", user_id=USER)
            self.roots.append(root)
            self.note(f"started R{len(self.roots) - 1} = {short(root)} (g{start.graph})")

    def _target(self, observer: Observer, action: StopAction) -> str:
        root = self.roots[action.root % len(self.roots)]
        if action.pick is None:
            return root
        rows = sorted(observer.query(SUBTREE_ROWS, (root,)),
                      key=lambda r: (r["depth"], r["graph_id"], str(r["created_at"]), r["id"]))
        return rows[action.pick % len(rows)]["id"]

    def _stop(self, rt: Runtime, observer: Observer, number: int, action: StopAction) -> None:
        target = self._target(observer, action)
        flags = [(action.cascade, action.wait_timeout, action.via)]
        if action.mode == "concurrent":
            flags.append((action.twin_cascade, action.twin_wait_timeout, action.twin_via))
        barrier = threading.Barrier(len(flags), timeout=30) if len(flags) > 1 else None
        started = []
        for twin, (cascade, wait_timeout, via) in enumerate(flags):
            record = StopRecord(label=f"stop#{number}{'ab'[twin] if barrier else ''}", target=target,
                                cascade=cascade, wait_timeout=wait_timeout, via=via)
            self.records.append(record)
            self.note(f"{record.label} ({action.mode}, from {via}) of {short(target)}: "
                      f"cascade={cascade} wait_timeout={wait_timeout}")
            thread = threading.Thread(target=_stop_in_thread, args=(rt, self.url, record, barrier, self.runtime_url),
                                      name=f"property-{record.label}", daemon=True)
            thread.start()
            started.append((thread, record))
        if action.mode == "background":
            self.threads.extend(started)
        else:
            for thread, record in started:
                self._join(thread, record)

    def _join(self, thread: threading.Thread, record: StopRecord) -> None:
        thread.join(timeout=max(0.0, record.sent_at + record.wait_timeout + self.slack + HUNG_AFTER
                                - time.monotonic()) if record.sent_at else HUNG_AFTER)
        if thread.is_alive():
            self.note(f"{record.label} did not return")
            return
        if record.error is not None:
            self.note(f"{record.label} raised {record.error!r} after {record.duration:.3f}s",
                      at=record.returned_at)
        elif record.ack is not None:
            ack = record.ack
            self.note(f"{record.label} returned after {record.duration:.3f}s: "
                      f"terminated={[short(i) for i in ack.terminated]} "
                      f"already_final={[short(i) for i in ack.already_final]} "
                      f"forced={[short(i) for i in ack.forced]}", at=record.returned_at)

    def _join_all(self) -> None:
        threads, self.threads = self.threads, []
        for thread, record in threads:
            self._join(thread, record)


@contextlib.contextmanager
def broken_turns(breaks: tuple[Break, ...], note: Callable[[str], None]) -> Iterator[None]:
    """Make each ``Break``'s message raise in whichever actor handles it ``nth``, for the block's duration."""
    originals = dict(execution._HANDLERS)
    salvage = execution.ExecutionActor._salvage
    doomed: set[str] = set()  # executions whose salvage breaks too
    for fault in breaks:
        message_type = getattr(messages, fault.message)
        execution._HANDLERS[message_type] = _breaking(originals[message_type], fault, note, doomed)

    def salvage_or_break(actor: execution.ExecutionActor, error: str) -> Any:
        if actor.identity.execution_id in doomed:
            note(f"the salvage of {short(actor.identity.execution_id)} breaks too")
            raise RuntimeError("a bug planted in the salvage")
        return salvage(actor, error)

    execution.ExecutionActor._salvage = salvage_or_break  # type: ignore[method-assign]
    try:
        yield
    finally:
        execution.ExecutionActor._salvage = salvage  # type: ignore[method-assign]
        execution._HANDLERS.clear()
        execution._HANDLERS.update(originals)


def _breaking(handle: Callable[..., Any], fault: Break, note: Callable[[str], None],
              doomed: set[str]) -> Callable[..., Any]:
    lock = threading.Lock()
    seen = 0

    def handler(actor: execution.ExecutionActor, message: Any) -> Any:
        nonlocal seen
        with lock:
            seen += 1
            breaks_now = seen == fault.nth
        if breaks_now:
            if fault.in_salvage:
                doomed.add(actor.identity.execution_id)
            note(f"the turn of {short(actor.identity.execution_id)} handling {fault.message} #{fault.nth} breaks")
            raise RuntimeError(f"a bug planted in the {fault.nth}th {fault.message}")
        return handle(actor, message)

    return handler


def run_example(url: str, scenario: Scenario, slack: float, path: FaultPath | None = None,
                runtime_url: str | None = None, planned: tuple[Outage, ...] = ()) -> Outcome:
    """Run ``scenario``; with ``path``, the runtime and the stops from elsewhere use ``runtime_url``
    (through ``path``), which the ``planned`` outages break, while the test reads ``url`` directly."""
    return _Example(url, scenario, slack, path, runtime_url, planned).run()
