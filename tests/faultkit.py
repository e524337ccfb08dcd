"""Fault injection for the test suites: a PostgreSQL of our own, a cuttable TCP path, a held SQLite lock.

Every fault here is real, not mocked: a postmaster that is stopped, restarted
or SIGKILLed; TCP connections reset by a proxy; packets that vanish on a
network link whose far end is set down; a second process that holds SQLite's
write lock. The runtime under test sees exactly what it would see in
production, through its ordinary driver.

Nothing here touches a server it did not start: ``PostgresCluster`` runs its
own postmaster on a free port with its data in a temporary directory, and
``NetnsLink`` builds its own network namespace and veth pair. Every wait is
bounded, and every error says what the tool saw (pg_ctl's log tail, the
child's stderr).

Run as a program, the module is the forwarder that ``NetnsLink`` starts inside
its namespace: ``python -m tests.faultkit forward --listen HOST:PORT --unix PATH``.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import os
import pwd
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Sequence

from persistence import pid_alive

# Generous bounds for a 2-core machine running a test suite beside the server.
PG_CTL_TIMEOUT = 60.0
PORT_FREE_TIMEOUT = 30.0
CHILD_TIMEOUT = 30.0
LOG_TAIL_LINES = 40
POLL = 0.05


class FaultKitError(RuntimeError):
    """A fault tool could not do what it was asked (its message says what it saw)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now: bind port 0 and let the kernel choose."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise FaultKitError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (read from /proc)."""
    found = []
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_path, encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_path.split("/")[2]))
    return found


# -- PostgreSQL -----------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that holds initdb and pg_ctl, if any."""

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)

    candidates = [
        Path(path) for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
        if (Path(path) / "initdb").exists() and (Path(path) / "pg_ctl").exists()
    ]
    return candidates[0] if candidates else None


def postgres_unavailable() -> str | None:
    """Why ``PostgresCluster`` cannot run here, or None when it can."""
    if postgres_bindir() is None:
        return "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (initdb, pg_ctl)"
    if shutil.which("runuser") is None:
        return "runuser is missing (needed to run the server as the postgres user)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no 'postgres' OS user to run the server as"
    if os.geteuid() != 0:
        return "the suite's own PostgreSQL needs root (to run it as the postgres user)"
    return None


class PostgresCluster:
    """A PostgreSQL cluster of the test suite's own, in a temporary directory.

    ``initdb`` runs as the ``postgres`` OS user (through ``runuser``), with
    trust authentication, listening on 127.0.0.1 on a free port, its unix
    socket in the temporary directory and ``fsync=off`` (commits stay synchronous). Every method waits
    with a bound and raises ``FaultKitError`` with pg_ctl's log tail.

    Usage::

        cluster = PostgresCluster()
        cluster.start()
        cluster.create_database("t1")
        url = cluster.url("t1")
        cluster.kill9(); cluster.start()
        cluster.close()
    """

    def __init__(self, *, timeout: float = PG_CTL_TIMEOUT) -> None:
        reason = postgres_unavailable()
        if reason is not None:
            raise FaultKitError(reason)
        self.bindir = postgres_bindir()
        assert self.bindir is not None
        self.timeout = timeout
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.root = Path(tempfile.mkdtemp(prefix="actorgraph-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.socket_dir = self.root
        self._closed = False
        try:
            self._init_cluster()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _init_cluster(self) -> None:
        user = pwd.getpwnam("postgres")
        # The server runs as postgres: it must own (and reach) its directory.
        os.chown(self.root, user.pw_uid, user.pw_gid)
        os.chmod(self.root, 0o700)
        self._as_postgres(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", what="initdb",
        )
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            # fsync=off is safe against what the tests do (kill the server, not
            # the machine): written WAL stays in the OS page cache. An
            # asynchronous commit is not: a SIGKILLed postmaster would lose
            # commits the runtime was told were durable.
            "fsync": "off",
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
        }
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# actorgraph test suite\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    # -- commands -------------------------------------------------------------

    def _as_postgres(self, program: str, *args: str, what: str, timeout: float | None = None) -> str:
        assert self.bindir is not None
        command = ["runuser", "-u", "postgres", "--", str(self.bindir / program), *args]
        bound = (timeout or self.timeout) + 15.0
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=bound,
                                  stdin=subprocess.DEVNULL, cwd=self.root)
        except subprocess.TimeoutExpired as exc:
            raise FaultKitError(f"{what} did not finish within {bound:.0f}s\n{self.log_tail()}") from exc
        if done.returncode != 0:
            raise FaultKitError(
                f"{what} failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}\n"
                f"--- log tail ---\n{self.log_tail()}")
        return done.stdout

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server's log, for error messages."""
        return _tail(self.logfile, lines)

    def postmaster_pid(self) -> int | None:
        """The pid in ``postmaster.pid``, or None if there is no such file."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        return int(first) if first.strip().isdigit() else None

    def start(self, timeout: float | None = None) -> None:
        """Start the postmaster and wait until it accepts connections (``pg_ctl -w``)."""
        self._check_open()
        timeout = timeout or self.timeout
        self._remove_stale_lock_files()
        self._as_postgres("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w",
                          "-t", str(int(timeout)), "start", what="pg_ctl start", timeout=timeout)
        _wait_for(self.is_up, timeout, f"PostgreSQL on port {self.port} to answer\n{self.log_tail()}")

    def _remove_stale_lock_files(self) -> None:
        """Remove the lock files a SIGKILLed postmaster left (its data dir's and its socket's).

        PostgreSQL copes with a stale postmaster.pid unless the pid was
        reused meanwhile, but refuses a socket lock file naming a live pid:
        do not bet on either.
        """
        socket_lock = Path(f"{self.unix_socket}.lock")
        for lock, extra in ((self.datadir / "postmaster.pid", None), (socket_lock, self.unix_socket)):
            try:
                first = lock.read_text().splitlines()[0].strip()
            except (OSError, IndexError):
                continue
            if first.isdigit() and not pid_alive(int(first)):
                lock.unlink(missing_ok=True)
                if extra is not None:
                    extra.unlink(missing_ok=True)

    def stop(self, mode: str = "fast", timeout: float | None = None) -> None:
        """Stop the postmaster (``pg_ctl stop -m MODE``) and wait until its port is free."""
        self._check_open()
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown pg_ctl stop mode {mode!r}")
        timeout = timeout or self.timeout
        self._as_postgres("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(int(timeout)),
                          "stop", what=f"pg_ctl stop -m {mode}", timeout=timeout)
        self._wait_port_free(timeout)

    def restart(self, timeout: float | None = None) -> None:
        """Stop (fast: every session is terminated) and start again, on the same port."""
        self.stop("fast", timeout)
        self.start(timeout)

    def kill9(self, timeout: float = PORT_FREE_TIMEOUT) -> None:
        """SIGKILL the postmaster, as a crash would, and wait until the port is free.

        The backends notice their postmaster's death and exit on their own;
        any still alive after ``timeout`` are SIGKILLed too, so that ``start``
        never finds the old shared memory in use.
        """
        self._check_open()
        pid = self.postmaster_pid()
        if pid is None or not pid_alive(pid):
            raise FaultKitError(f"no live postmaster to kill (postmaster.pid says {pid})")
        children = _children_of(pid)
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not pid_alive(pid), timeout, f"postmaster {pid} to die")
        try:
            _wait_for(lambda: not any(pid_alive(child) for child in children), timeout,
                      "the backends of the killed postmaster to exit")
        except FaultKitError:
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            _wait_for(lambda: not any(pid_alive(child) for child in children), timeout,
                      "the SIGKILLed backends to exit")
        self._wait_port_free(timeout)

    def is_up(self) -> bool:
        """Whether the server answers a query on its TCP port right now."""
        if self._closed:
            return False
        import psycopg2

        try:
            conn = psycopg2.connect(self.url(), connect_timeout=2)
        except psycopg2.Error:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                return cur.fetchone() == (1,)
        except psycopg2.Error:
            return False
        finally:
            conn.close()

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DBNAME``."""
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    @property
    def unix_socket(self) -> Path:
        """The path of the server's unix socket (in the temporary directory)."""
        return self.socket_dir / f".s.PGSQL.{self.port}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (a plain identifier); return its URL."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"database name {name!r} is not a plain identifier")
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting its sessions."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"database name {name!r} is not a plain identifier")
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.url(), connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def close(self) -> None:
        """Stop the server (fast, else immediate, else SIGKILL) and remove its directory."""
        if self._closed:
            return
        try:
            pid = self.postmaster_pid()
            if pid is not None and pid_alive(pid):
                try:
                    self.stop("fast", timeout=30)
                except FaultKitError:
                    try:
                        self.stop("immediate", timeout=30)
                    except FaultKitError:
                        self.kill9()
        finally:
            self._closed = True
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FaultKitError("this cluster was closed")

    def _wait_port_free(self, timeout: float) -> None:
        _wait_for(lambda: not port_accepts(self.host, self.port, 0.2), timeout,
                  f"port {self.port} to be free\n{self.log_tail()}")


# -- TCP proxy -------------------------------------------------------------------------


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` abortively: SO_LINGER 0 sends a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One proxied connection: the client's socket and the one to the target."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False

    def abort(self) -> None:
        self.closed = True
        _abort(self.client)
        _abort(self.upstream)


class TcpProxy:
    """A TCP proxy on a free local port, in daemon threads, that can cut its connections.

    Modes:
        forwarding: every byte goes through, both ways.
        cut (``cut()``): every current connection is reset (RST) and every new
            one is reset as soon as it is accepted, until ``heal()``.
        blackhole (``blackhole()``): connections are accepted and kept open but
            nothing is forwarded either way, until ``heal()``. On loopback the
            kernel still acknowledges what the client sends, so TCP keepalives
            and ``tcp_user_timeout`` cannot detect it; only a client-side
            timeout can. ``NetnsLink`` makes packets really vanish.

    Args:
        target_host, target_port: where connections go, or
        target_unix: a unix socket path instead (a PostgreSQL socket).
        listen_host, listen_port: where the proxy listens (port 0: a free one).
    """

    def __init__(self, target_host: str = "127.0.0.1", target_port: int | None = None, *,
                 target_unix: str | None = None, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        if (target_port is None) == (target_unix is None):
            raise ValueError("give either target_port or target_unix")
        self.target_host = target_host
        self.target_port = target_port
        self.target_unix = target_unix
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, listen_port))
        self._listener.listen(128)
        self._listener.settimeout(POLL * 2)
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._held: list[socket.socket] = []  # accepted while blackholed
        self._mode = "forward"
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self.accepted = 0        # every connection accepted, whatever the mode
        self.forwarded = 0       # connections that were forwarded to the target
        self.refused = 0         # accepted while cut, and reset at once
        self.blackholed = 0      # accepted while blackholed, and held silent
        self.attempt_while_faulty = threading.Event()  # set by a connection accepted while cut or blackholed
        self._accept_thread = self._spawn(self._accept_loop, "faultkit-proxy-accept")

    # -- control ---------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``forward``, ``cut`` or ``blackhole``."""
        return self._mode

    def cut(self) -> None:
        """Reset every current connection and every new one until ``heal()``."""
        with self._lock:
            self._mode = "cut"
            self.attempt_while_faulty.clear()
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.abort()

    def blackhole(self) -> None:
        """Stop forwarding: current and new connections stay open and silent until ``heal()``."""
        with self._lock:
            self._mode = "blackhole"
            self.attempt_while_faulty.clear()

    def heal(self) -> None:
        """Forward again.

        After a blackhole every connection that lived through it is reset:
        bytes were dropped mid-stream, so its state is lost, as after a
        partition that outlived the server's memory of the connection.
        """
        with self._lock:
            was, self._mode = self._mode, "forward"
            held, self._held = self._held, []
            pairs = self._pairs if was == "blackhole" else []
            self._pairs = [pair for pair in self._pairs if not pair.closed and pair not in pairs]
        for sock in held:
            _abort(sock)
        for pair in pairs:
            pair.abort()

    def drop_all(self) -> None:
        """Reset every current connection, whatever the mode."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            held, self._held = self._held, []
        for pair in pairs:
            pair.abort()
        for sock in held:
            _abort(sock)

    def url_for(self, dbname: str, user: str = "postgres") -> str:
        """A PostgreSQL URL that goes through this proxy."""
        return f"postgresql://{user}@{self.host}:{self.port}/{dbname}"

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for pair in self._pairs if not pair.closed) + len(self._held)

    def close(self, timeout: float = 10.0) -> None:
        """Reset every connection, stop listening and join the threads (bounded)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.drop_all()
        with contextlib.suppress(OSError):
            self._listener.close()
        deadline = time.monotonic() + timeout
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- threads -----------------------------------------------------------------

    def _spawn(self, target: Any, name: str, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._threads_lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                self.accepted += 1
                mode = self._mode
                if mode == "blackhole":
                    self.blackholed += 1
                    self._held.append(client)
                    self.attempt_while_faulty.set()
                    continue
                if mode == "cut":
                    self.refused += 1
                    self.attempt_while_faulty.set()
            if mode == "cut":
                _abort(client)
                continue
            self._spawn(self._connect_and_pump, "faultkit-proxy-conn", client)

    def _connect_upstream(self) -> socket.socket:
        if self.target_unix is not None:
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.settimeout(10)
            upstream.connect(self.target_unix)
        else:
            upstream = socket.create_connection((self.target_host, self.target_port), timeout=10)
        upstream.settimeout(None)
        return upstream

    def _connect_and_pump(self, client: socket.socket) -> None:
        try:
            upstream = self._connect_upstream()
        except OSError:
            _abort(client)  # the target is down: the client sees a reset, as with no server
            return
        pair = _Pair(client, upstream)
        with self._lock:
            if self._mode != "forward" or self._closed.is_set():
                pair.abort()
                return
            self._pairs.append(pair)
            self.forwarded += 1
        self._spawn(self._pump, "faultkit-proxy-up", pair, client, upstream)
        self._pump(pair, upstream, client)

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket) -> None:
        """Copy ``source`` to ``sink`` until either end closes or the pair is aborted."""
        while not pair.closed:
            if self._mode == "blackhole":
                # Forward nothing; keep both ends open and look again soon.
                self._closed.wait(POLL)
                continue
            try:
                readable, _, _ = select.select([source], [], [], POLL * 2)
            except (OSError, ValueError):
                break
            if not readable:
                continue
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self._mode == "blackhole":
                continue  # read before the mode changed: dropped, as a lost packet would be
            try:
                sink.sendall(data)
            except OSError:
                break
        if not pair.closed:
            # One side ended: pass the end on to the other (a FIN, not a reset).
            pair.closed = True
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


# -- a link whose packets vanish ------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why ``NetnsLink`` cannot run here, or None when it can."""
    if shutil.which("ip") is None:
        return "iproute2's 'ip' is missing (needed for a network namespace and a veth pair)"
    if os.geteuid() != 0:
        return "a network namespace needs root"
    name = f"agprobe{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    try:
        veth = subprocess.run(["ip", "-n", name, "link", "add", "agp0", "type", "veth", "peer", "name", "agp1"],
                              capture_output=True, text=True, timeout=30)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


_LINK_NUMBERS = itertools.count(1)


class NetnsLink:
    """A path to a unix-socket server through a network link whose far end can be unplugged.

    A network namespace of our own is joined to this one by a veth pair with
    link-local addresses (169.254.N.1 here, 169.254.N.2 there). Inside the
    namespace a forwarder process (this module run as a program) listens on
    169.254.N.2 and relays each connection to ``target_unix`` (a unix socket
    is a file, reachable from every namespace). ``blackhole()`` sets the far
    end of the veth down: packets then vanish, with no reset and no
    acknowledgement, exactly what TCP keepalives and ``tcp_user_timeout``
    exist for. The forwarder also drops its connections, as a host that
    rebooted would, so a client that writes after ``heal()`` gets a reset.

    Only this namespace's veth end is ever added to the host; ``close()``
    deletes the namespace, which deletes the pair.
    """

    def __init__(self, target_unix: str | os.PathLike[str], *, timeout: float = CHILD_TIMEOUT) -> None:
        reason = netns_unavailable()
        if reason is not None:
            raise FaultKitError(reason)
        number = next(_LINK_NUMBERS)
        tag = f"{os.getpid() % 100000}x{number}"
        self.namespace = f"agns{tag}"
        self.outer = f"agh{tag}"[:15]
        self.inner = f"agi{tag}"[:15]
        # A /30 of 169.254.0.0/16 chosen from the pid and a counter; link-local, never routed.
        subnet = (os.getpid() * 7 + number * 4) % 250 + 2
        self.outer_address = f"169.254.{subnet}.1"
        self.host = f"169.254.{subnet}.2"
        self.port = 5432
        self.timeout = timeout
        self._forwarder: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._closed = False
        self._down = False
        try:
            self._build()
            self._start_forwarder(str(target_unix))
        except BaseException:
            self.close()
            raise

    def _ip(self, *args: str, namespace: bool = False) -> None:
        command = ["ip", *(("-n", self.namespace) if namespace else ()), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise FaultKitError(f"{' '.join(command)} failed: {done.stderr.strip()}")

    def _build(self) -> None:
        self._ip("netns", "add", self.namespace)
        self._ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner, "netns", self.namespace)
        self._ip("addr", "add", f"{self.outer_address}/30", "dev", self.outer)
        self._ip("link", "set", self.outer, "up")
        self._ip("addr", "add", f"{self.host}/30", "dev", self.inner, namespace=True)
        self._ip("link", "set", self.inner, "up", namespace=True)
        self._ip("link", "set", "lo", "up", namespace=True)
        # Fixed neighbour entries: while the far end is down, packets are sent
        # and lost, instead of failing at once for want of an ARP answer.
        inner_mac = self._mac(self.inner, namespace=True)
        outer_mac = self._mac(self.outer, namespace=False)
        self._ip("neigh", "replace", self.host, "lladdr", inner_mac, "dev", self.outer, "nud", "permanent")
        self._ip("neigh", "replace", self.outer_address, "lladdr", outer_mac, "dev", self.inner, "nud",
                 "permanent", namespace=True)

    def _mac(self, device: str, *, namespace: bool) -> str:
        command = ["ip", *(("-n", self.namespace) if namespace else ()), "-o", "link", "show", device]
        text = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
        found = re.search(r"link/ether ([0-9a-f:]{17})", text)
        if not found:
            raise FaultKitError(f"no MAC address for {device}: {text!r}")
        return found.group(1)

    def _start_forwarder(self, target_unix: str) -> None:
        repo = str(Path(__file__).resolve().parents[1])
        command = ["ip", "netns", "exec", self.namespace, sys.executable, "-m", "tests.faultkit", "forward",
                   "--listen", f"{self.host}:{self.port}", "--unix", target_unix]
        self._forwarder = subprocess.Popen(command, cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=_read_lines, args=(self._forwarder.stdout, self._lines), daemon=True,
                         name="faultkit-netns-stdout").start()
        self._expect("ready", "the forwarder to listen")

    def _expect(self, word: str, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise FaultKitError(f"timed out after {self.timeout:.0f}s waiting for {what}") from None
            if line is None:
                raise FaultKitError(f"the forwarder ended while waiting for {what}: {self._stderr()}")
            if line.split()[:1] == [word]:
                return

    def _stderr(self) -> str:
        if self._forwarder is None or self._forwarder.poll() is None:
            return "(still running)"
        assert self._forwarder.stderr is not None
        return self._forwarder.stderr.read()[-2000:]

    def _tell(self, command: str) -> None:
        assert self._forwarder is not None and self._forwarder.stdin is not None
        self._forwarder.stdin.write(command + "\n")
        self._forwarder.stdin.flush()
        self._expect("ok", f"the forwarder to {command}")

    def url_for(self, dbname: str, user: str = "postgres") -> str:
        """A PostgreSQL URL whose connections cross the link."""
        return f"postgresql://{user}@{self.host}:{self.port}/{dbname}"

    @property
    def is_down(self) -> bool:
        return self._down

    def blackhole(self) -> None:
        """Unplug the far end: packets vanish both ways; the forwarder forgets its connections."""
        self._ip("link", "set", self.inner, "down", namespace=True)
        self._down = True
        # Its resets are sent into the unplugged link and lost, as a reboot's would be.
        self._tell("drop")

    def heal(self) -> None:
        """Plug the far end back in; new connections go through again."""
        self._ip("link", "set", self.inner, "up", namespace=True)
        self._down = False

    def close(self) -> None:
        """Stop the forwarder and delete the namespace (and with it the veth pair)."""
        if self._closed:
            return
        self._closed = True
        if self._forwarder is not None:
            with contextlib.suppress(OSError, ValueError):
                assert self._forwarder.stdin is not None
                self._forwarder.stdin.write("quit\n")
                self._forwarder.stdin.flush()
            try:
                self._forwarder.wait(10)
            except subprocess.TimeoutExpired:
                self._forwarder.kill()
                self._forwarder.wait(10)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=30)
        # The namespace's end is gone with it; ours follows, but do not rely on timing.
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=30)

    def __enter__(self) -> "NetnsLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_lines(stream: IO[str] | None, lines: "queue.Queue[str | None]") -> None:
    """Move a child's output lines into a queue; None marks its end."""
    assert stream is not None
    try:
        for line in stream:
            lines.put(line.rstrip("\n"))
    except (OSError, ValueError):
        pass
    finally:
        lines.put(None)


def _forward_main(listen: str, unix: str) -> int:
    """The forwarder of ``NetnsLink``: a TcpProxy driven by lines on stdin."""
    host, _, port = listen.rpartition(":")
    proxy = TcpProxy(target_unix=unix, listen_host=host, listen_port=int(port))
    print(f"ready {proxy.port}", flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "drop":
                proxy.drop_all()
            elif command == "quit":
                break
            print(f"ok {command}", flush=True)
    finally:
        proxy.close()
    return 0


# -- SQLite ------------------------------------------------------------------------

_LOCK_CHILD = r"""
import select, sqlite3, sys, time
path, mode, max_hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
conn = sqlite3.connect(path, timeout=30, isolation_level=None)
try:
    conn.execute("BEGIN " + mode)
except sqlite3.Error as exc:
    print("error", exc, flush=True)
    sys.exit(1)
print("locked", flush=True)
deadline = time.monotonic() + max_hold
reason = "max_hold"
while time.monotonic() < deadline:
    ready, _, _ = select.select([sys.stdin], [], [], min(0.5, max(0.0, deadline - time.monotonic())))
    if ready:
        sys.stdin.readline()
        reason = "asked"
        break
conn.execute("ROLLBACK")
conn.close()
print("released", reason, flush=True)
"""


class SqliteLockHolder:
    """Another process that holds a SQLite database's write lock until told to let go.

    The child opens the file and runs ``BEGIN IMMEDIATE`` (or ``EXCLUSIVE``),
    then holds the lock until ``release()`` (a line on its stdin) or until
    ``max_hold`` seconds passed, whichever comes first: a test that dies
    never leaves the database locked for long. In WAL mode readers go on
    reading; every other writer waits for its busy timeout, then gets
    "database is locked".

    Usage::

        with SqliteLockHolder(path) as holder:   # acquired on entry
            ...                                   # writers are locked out
        # released on exit
    """

    def __init__(self, path: str | os.PathLike[str], *, mode: str = "IMMEDIATE", max_hold: float = 120.0,
                 timeout: float = CHILD_TIMEOUT) -> None:
        if mode.upper() not in ("IMMEDIATE", "EXCLUSIVE"):
            raise ValueError(f"lock mode must be IMMEDIATE or EXCLUSIVE, not {mode!r}")
        self.path = str(path)
        self.mode = mode.upper()
        self.max_hold = max_hold
        self.timeout = timeout
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.acquired_at: float | None = None   # time.monotonic() when the child reported the lock
        self.released_at: float | None = None

    @property
    def holding(self) -> bool:
        """Whether the child reported the lock and has not let go (nor died) since."""
        return (self.acquired_at is not None and self.released_at is None
                and self._process is not None and self._process.poll() is None)

    def acquire(self) -> None:
        """Start the child and wait (bounded) until it reports that it holds the lock."""
        if self._process is not None:
            raise FaultKitError("this lock holder was already started")
        self._process = subprocess.Popen(
            [sys.executable, "-c", _LOCK_CHILD, self.path, self.mode, str(self.max_hold)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=_read_lines, args=(self._process.stdout, self._lines), daemon=True,
                         name="faultkit-sqlite-lock").start()
        line = self._next_line("the child to take the lock")
        if line != "locked":
            self._kill()
            raise FaultKitError(f"the lock holder could not lock {self.path}: {line!r} {self._stderr()}")
        self.acquired_at = time.monotonic()

    def release(self) -> None:
        """Tell the child to roll back and wait (bounded) until it did; idempotent."""
        if self._process is None or self.released_at is not None:
            return
        try:
            if self._process.poll() is None:
                assert self._process.stdin is not None
                with contextlib.suppress(OSError, ValueError):
                    self._process.stdin.write("release\n")
                    self._process.stdin.flush()
                line = self._next_line("the child to release the lock")
                if line is None or not line.startswith("released"):
                    raise FaultKitError(f"the lock holder answered {line!r}: {self._stderr()}")
                self._process.wait(self.timeout)
        finally:
            self.released_at = time.monotonic()
            self._kill()

    def close(self) -> None:
        """Release if still holding; never leaves the child behind."""
        try:
            self.release()
        finally:
            self._kill()

    def __enter__(self) -> "SqliteLockHolder":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_line(self, what: str) -> str | None:
        try:
            return self._lines.get(timeout=self.timeout)
        except queue.Empty:
            self._kill()
            raise FaultKitError(f"timed out after {self.timeout:.0f}s waiting for {what}") from None

    def _stderr(self) -> str:
        if self._process is None or self._process.poll() is None or self._process.stderr is None:
            return ""
        return self._process.stderr.read()[-2000:]

    def _kill(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)


# -- command line (the forwarder inside a namespace) ---------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faultkit")
    commands = parser.add_subparsers(dest="command", required=True)
    forward = commands.add_parser("forward", help="relay TCP connections to a unix socket; commands on stdin")
    forward.add_argument("--listen", required=True, metavar="HOST:PORT")
    forward.add_argument("--unix", required=True, metavar="PATH")
    args = parser.parse_args(argv)
    return _forward_main(args.listen, args.unix)


if __name__ == "__main__":
    sys.exit(main())
