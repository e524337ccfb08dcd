"""Fixtures and helpers of the fault-injection tests: a PostgreSQL of the suite's own, a cuttable path to it.

Import them into a test module with::

    from tests.integration.fault_fixtures import *  # noqa: F401,F403

Everything a test breaks is put back by one fixture, ``scene``, in an order
that cannot hang: first every fault is healed (the server started, the proxy
and the link healed, the SQLite lock released), then every runtime is closed
(each close bounded), then the observers, the proxies and the database go.

The observers here reconnect: a test reads through its own connection to the
server, and a restart or a SIGKILL breaks that connection too.
"""
from __future__ import annotations

import functools
import os
import sqlite3
import threading
import uuid
from typing import Any, Callable, Iterator

import pytest

from actors import Runtime
from tests.faultkit import (
    FaultKitError,
    NetnsLink,
    PostgresCluster,
    SqliteLockHolder,
    TcpProxy,
    netns_unavailable,
    postgres_unavailable,
)
from tests.helpers import TERMINAL_STATUSES, Observer, wait_until

__all__ = [
    "ObserverUnavailable",
    "ResilientObserver",
    "Scene",
    "StatusSampler",
    "close_bounded",
    "fault_db",
    "lock_holder",
    "netns_link",
    "observe",
    "pg_cluster",
    "proxy",
    "readable",
    "runtimes",
    "sampler",
    "scene",
]

# A runtime's close in teardown gets this long before the test is reported as hanging.
TEARDOWN_CLOSE_TIMEOUT = 60.0
SAMPLE_EVERY = 0.05


def _skip_or_fail(reason: str) -> None:
    """Skip locally; under CI=true a missing tool is a failure (as tests/conftest.py does)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true requires it")
    pytest.skip(reason)


# -- observing through a connection of the test's own ---------------------------------------


class ObserverUnavailable(Exception):
    """The observer's database does not answer right now (the fault is still on)."""


class ResilientObserver(Observer):
    """An ``Observer`` that reconnects once per read when its PostgreSQL connection broke.

    While the server is down a read raises ``ObserverUnavailable``; wrap a
    ``wait_until`` predicate in ``readable`` to keep polling through it.
    """

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:"):
            super().__init__(url)
            return
        self.url = url
        self.is_sqlite = False
        self._conn = self._connect()

    def _connect(self) -> Any:
        import psycopg2

        try:
            conn = psycopg2.connect(self.url, connect_timeout=3)
        except psycopg2.OperationalError as exc:
            raise ObserverUnavailable(str(exc).strip().splitlines()[0]) from exc
        conn.autocommit = True
        return conn

    def _retrying(self, method: Callable[..., Any], *args: Any) -> Any:
        if self.is_sqlite:
            return method(*args)
        import psycopg2

        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                return method(*args)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                if self._conn is not None:
                    try:
                        self._conn.close()
                    except psycopg2.Error:
                        pass
                self._conn = None
                if attempt == 2:
                    raise ObserverUnavailable(str(exc).strip().splitlines()[0]) from exc
        raise AssertionError("unreachable")

    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        return self._retrying(super().query, sql, params)

    def execute(self, sql: str, params: tuple = ()) -> int:
        return self._retrying(super().execute, sql, params)

    def statuses(self) -> dict[tuple[str, Any], str]:
        """Every row's status in both tables: ``{("graph", id) or ("node", id): status}``."""
        found: dict[tuple[str, Any], str] = {}
        for row in self.query("SELECT id, status FROM graph_execution"):
            found[("graph", row["id"])] = row["status"]
        for row in self.query("SELECT id, status FROM node_execution"):
            found[("node", row["id"])] = row["status"]
        return found

    def active_rows(self) -> list[dict[str, Any]]:
        """Every QUEUED or RUNNING row of either table (there should be none once a fault healed)."""
        graphs = self.query("SELECT id, graph_id, status FROM graph_execution WHERE status IN ('QUEUED', 'RUNNING')")
        nodes = self.query(
            "SELECT graph_execution_id, node_id, status FROM node_execution WHERE status IN ('QUEUED', 'RUNNING')")
        return graphs + nodes

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - a broken connection is closed anyway
                pass


def readable(predicate: Callable[[], Any]) -> Callable[[], Any]:
    """A ``wait_until`` predicate that reads None while the observer's database does not answer."""

    def attempt() -> Any:
        try:
            return predicate()
        except ObserverUnavailable:
            return None

    return attempt


class StatusSampler:
    """Samples every row's status in the background; proves that no terminal status ever changes.

    It reads through a connection of its own every ``SAMPLE_EVERY`` seconds,
    skipping the samples that fail while a fault is on. Once it has seen a row
    (execution or node) in COMPLETED, FAILED or TERMINATED, any other status
    of that row seen later is a violation.
    """

    def __init__(self, url: str, every: float = SAMPLE_EVERY) -> None:
        self.url = url
        self.every = every
        self.samples = 0
        self.failed_samples = 0
        self.violations: list[str] = []
        self._terminal: dict[tuple[str, Any], str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> "StatusSampler":
        self._thread = threading.Thread(target=self._run, name="fault-status-sampler", daemon=True)
        self._thread.start()
        wait_until(lambda: self.samples > 0 or self._error is not None, 30.0, "the sampler's first sample")
        if self._error is not None:
            raise AssertionError(f"the status sampler could not start: {self._error!r}")
        return self

    def _run(self) -> None:
        observer: ResilientObserver | None = None
        try:
            while not self._stop.is_set():
                try:
                    if observer is None:
                        observer = ResilientObserver(self.url)
                    self._look(observer.statuses())
                except (ObserverUnavailable, sqlite3.Error):
                    self.failed_samples += 1
                self._stop.wait(self.every)
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self._error = exc
        finally:
            if observer is not None:
                observer.close()

    def _look(self, statuses: dict[tuple[str, Any], str]) -> None:
        for key, status in statuses.items():
            first = self._terminal.get(key)
            if first is None:
                if status in TERMINAL_STATUSES:
                    self._terminal[key] = status
            elif status != first:
                self.violations.append(f"{key[0]} {key[1]}: {first} then {status}")
        self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def check(self, min_samples: int = 3) -> None:
        """Stop sampling, take a last sample now; assert that no terminal status ever changed."""
        self.stop()
        assert self._error is None, f"the status sampler failed: {self._error!r}"
        last = ResilientObserver(self.url)
        try:
            self._look(last.statuses())
        finally:
            last.close()
        assert self.samples >= min_samples, f"only {self.samples} status samples were taken"
        assert not self.violations, "terminal statuses changed:\n" + "\n".join(self.violations[:20])


# -- the scene: everything a test breaks, put back in an order that cannot hang ----------------


class Scene:
    """What one test set up; ``teardown`` heals every fault, then closes everything, bounded."""

    def __init__(self) -> None:
        self.cluster: PostgresCluster | None = None
        self.databases: list[str] = []
        self.proxies: list[TcpProxy] = []
        self.links: list[NetnsLink] = []
        self.locks: list[SqliteLockHolder] = []
        self.runtimes: list[Runtime] = []
        self.observers: list[ResilientObserver] = []
        self.samplers: list[StatusSampler] = []

    def heal(self) -> None:
        """Put every fault back: release SQLite locks, heal paths, start the server."""
        for holder in self.locks:
            holder.close()
        for proxy in self.proxies:
            proxy.heal()
        for link in self.links:
            link.heal()
        if self.cluster is not None and not self.cluster.is_up():
            self.cluster.start()

    def teardown(self) -> None:
        errors: list[str] = []

        def attempt(what: str, action: Callable[[], Any]) -> None:
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - go on cleaning, report at the end
                errors.append(f"{what}: {type(exc).__name__}: {exc}")

        attempt("healing the faults", self.heal)
        for sampler in self.samplers:
            attempt("stopping a sampler", sampler.stop)
        for rt in reversed(self.runtimes):
            attempt("closing a runtime", functools.partial(close_bounded, rt, TEARDOWN_CLOSE_TIMEOUT))
        for observer in self.observers:
            attempt("closing an observer", observer.close)
        for proxy in self.proxies:
            attempt("closing a proxy", proxy.close)
        for link in self.links:
            attempt("closing a link", link.close)
        if self.cluster is not None:
            for name in self.databases:
                attempt(f"dropping database {name}", functools.partial(self.cluster.drop_database, name))
        if errors:
            raise AssertionError("fault test teardown: " + "; ".join(errors))


def close_bounded(rt: Runtime, timeout: float, **kwargs: Any) -> None:
    """``rt.close(**kwargs)`` on a thread of its own; raise AssertionError if it hangs past ``timeout``."""
    outcome: dict[str, BaseException] = {}

    def close() -> None:
        try:
            rt.close(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=close, name="fault-close", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"Runtime.close() did not return within {timeout:.0f}s")
    if "error" in outcome:
        raise outcome["error"]


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this module's own (skipped locally when it cannot run, failed under CI=true)."""
    reason = postgres_unavailable()
    if reason is not None:
        _skip_or_fail(f"the suite's own PostgreSQL cannot run: {reason}")
    try:
        cluster = PostgresCluster()
    except FaultKitError as exc:
        _skip_or_fail(f"the suite's own PostgreSQL cannot be created: {exc}")
        raise
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def scene() -> Iterator[Scene]:
    scene = Scene()
    yield scene
    scene.teardown()


@pytest.fixture
def fault_db(pg_cluster: PostgresCluster, scene: Scene) -> str:
    """The name of a fresh database on the suite's cluster (dropped after the test); the server is up."""
    scene.cluster = pg_cluster
    if not pg_cluster.is_up():  # a test before this one may have died with the server down
        pg_cluster.start()
    name = f"fault_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(name)
    scene.databases.append(name)
    return name


@pytest.fixture
def proxy(pg_cluster: PostgresCluster, scene: Scene) -> TcpProxy:
    """A TcpProxy to the suite's cluster; ``proxy.url_for(fault_db)`` goes through it."""
    scene.cluster = pg_cluster
    made = TcpProxy(target_port=pg_cluster.port)
    scene.proxies.append(made)
    return made


@pytest.fixture
def netns_link(pg_cluster: PostgresCluster, scene: Scene) -> NetnsLink:
    """A NetnsLink to the cluster's unix socket (skipped when namespaces are unavailable, failed under CI)."""
    reason = netns_unavailable()
    if reason is not None:
        _skip_or_fail(f"a link whose packets vanish needs a network namespace: {reason}")
    scene.cluster = pg_cluster
    made = NetnsLink(pg_cluster.unix_socket)
    scene.links.append(made)
    return made


@pytest.fixture
def runtimes(scene: Scene) -> Callable[..., Runtime]:
    """``make(url, graphs=None, blocks=None, **kwargs) -> Runtime``, closed in teardown after the faults heal.

    ``blocks`` maps a block name to ``(fn, inputs, outputs)``.
    """

    def make(url: str, graphs: dict[str, Any] | None = None, blocks: dict[str, tuple] | None = None,
             **kwargs: Any) -> Runtime:
        rt = Runtime(database=url, **kwargs)
        scene.runtimes.append(rt)
        for name, (fn, inputs, outputs) in (blocks or {}).items():
            rt.register_block(name, fn, inputs=inputs, outputs=outputs)
        if graphs is not None:
            rt.load(graphs)
        return rt

    return make


@pytest.fixture
def observe(scene: Scene) -> Callable[[str], ResilientObserver]:
    """``observe(url) -> ResilientObserver``: a connection of the test's own, closed in teardown.

    Make it after the runtime created the schema.
    """

    def make(url: str) -> ResilientObserver:
        observer = ResilientObserver(url)
        scene.observers.append(observer)
        return observer

    return make


@pytest.fixture
def sampler(scene: Scene) -> Callable[[str], StatusSampler]:
    """``sampler(url) -> StatusSampler``, started; stopped in teardown if the test did not check it."""

    def make(url: str) -> StatusSampler:
        made = StatusSampler(url)
        scene.samplers.append(made)
        return made.start()

    return make


@pytest.fixture
def lock_holder(scene: Scene) -> Callable[..., SqliteLockHolder]:
    """``lock_holder(path, **kwargs) -> SqliteLockHolder`` (not yet acquired); released in teardown."""

    def make(path: str, **kwargs: Any) -> SqliteLockHolder:
        holder = SqliteLockHolder(path, **kwargs)
        scene.locks.append(holder)
        return holder

    return make

