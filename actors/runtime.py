"""The Runtime: what a Python program holds to start, watch and stop executions."""
from __future__ import annotations

import concurrent.futures
import builtins
import dataclasses
import functools
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Literal, Mapping, overload

import pykka

from actors.admission import Admission, QueuedRoot
from actors.catalog import Bundle, Catalog, check_inputs
from actors.dispatch import Dispatcher
from actors.errors import InvalidInput, StopTimeout
from actors.execution import ExecutionActor
from actors.host import Ended, Host, LiveActors, tell_if_live
from actors.logs import Identity
from actors.messages import (
    DEFAULT_WAIT_TIMEOUT, AckTree, Begin, CascadeStop, ChildEnded, Halt, Stop, StopAck, check_stop,
    check_wait_timeout,
)
from actors.reader import Reader
from actors.views import ExecutionViews
from actors.watch import Watching
from actors.remote import StopWatcher, ack_from_database, active_and_final, owned_record, stop_elsewhere
from actors.submit import submit_root
from actors.worker import Claimer
from actors.supervision import CHILD_GRACE_LIMIT
from actors.timers import Timers
from persistence import (
    ClaimedRoot,
    DatabaseError,
    ExecutionRecord,
    ExecutionStatus,
    InsertExecution,
    MoveExecutions,
    MoveNodes,
    NotFound,
    Operation,
    Promise,
    RegisterRuntime,
    Store,
    StopRequest,
    TerminateSubtree,
    UnregisterRuntime,
    default_url,
    dumps,
    forget_runtime,
    is_postgresql,
    loads,
    redact,
    utcnow,
)

logger = logging.getLogger(__name__)

WAIT_POLL = 0.05  # how often wait() re-reads an execution hosted elsewhere

# Beyond a stop's wait_timeout (and the grace a parent gives children that
# are forcing their work), how long its commits may take while the database
# answers, before the stop reports StopTimeout.
COMMIT_SLACK = 10.0
# How long the write of an execution whose actor died (FAILED) may wait for
# the database; if it does not commit, a stop or the next recovery ends it.
FAILED_WRITE_TIMEOUT = 60.0
# A commit still trying after this long counts as a database that does not
# answer (a SQLite lock held elsewhere, a server that accepts no more): a
# stop past its deadline then reports it. Long enough that a large but
# healthy commit (a whole big tree is one or a few) is not taken for one.
DATABASE_PATIENCE = 2.0

# A GIL switch interval for programs that run thousands of threads (such as
# the benchmark's plain-pykka floor, one ThreadingActor per execution): there,
# CPython's default 5 ms makes a stop of 11,111 threads spend minutes in the
# kernel (measured: 196 s at 5 ms, 5.5 s at 50 ms). The runtime itself does
# not need it: its actors share a dispatcher's few threads, so by default it
# leaves the interpreter's setting alone.
SWITCH_INTERVAL = 0.05


class Runtime(ExecutionViews):
    """Hosts graph executions as pykka actors on one database.

    Args:
        database: a URL (``sqlite:///file.db``, ``postgresql://user@host:port/db``);
            default: env ACTORGRAPH_DATABASE, else ``sqlite:///actorgraph.db``.
        max_running_per_user: running root executions per user; more wait QUEUED.
        max_running_per_graph: running roots per (user, graph) pair.
        max_depth: deepest level a child may run at (a root is at depth 0).
        block_workers: threads for user blocks (built-in blocks use none).
        actor_threads: threads that run the execution actors' turns; every
            actor of this runtime shares them. Turns never block, so one is
            enough (see actors/dispatch.py for why more is slower).
        failure_timeout: how long a failing execution waits for its running
            work to end before terminating it anyway.
        switch_interval: raise the interpreter's GIL switch interval to at
            least this many seconds (process-wide; see SWITCH_INTERVAL).
            The default, None, leaves it alone.
        worker: also claim roots submitted by any process (PostgreSQL only;
            see actors/worker.py). The limits above then count running roots
            across every worker, in each claim.
        concurrency: with ``worker``, how many claimed roots run here at once.

    Raises:
        InvalidInput: a bad argument, or ``worker`` on SQLite.
        DatabaseError: the database cannot be opened or migrated.
    """

    def __init__(self, database: str | None = None, *, max_running_per_user: int | None = None,
                 max_running_per_graph: int | None = None, max_depth: int = 32,
                 block_workers: int = 32, failure_timeout: float = 15.0, actor_threads: int = 1,
                 switch_interval: float | None = None, worker: bool = False, concurrency: int = 4) -> None:
        # Every argument is checked before anything is opened: a bad one leaves no thread or connection behind.
        if not isinstance(max_depth, int) or isinstance(max_depth, bool) or max_depth < 0:
            raise InvalidInput(f"max_depth must be a non-negative integer, not {max_depth!r}")
        for name, value in (("actor_threads", actor_threads), ("concurrency", concurrency),
                            ("block_workers", block_workers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInput(f"{name} must be a positive integer, not {value!r}")
        check_wait_timeout(failure_timeout, "failure_timeout")
        if switch_interval is not None:
            check_wait_timeout(switch_interval, "switch_interval")
        if not isinstance(worker, bool):
            raise InvalidInput(f"worker must be True or False, not {worker!r}")
        self._admission = Admission(max_running_per_user, max_running_per_graph)
        database = database or default_url()
        if worker and not is_postgresql(database):
            raise InvalidInput(f"a worker needs PostgreSQL (the only coordinator between processes), "
                               f"not {redact(database)}")
        if switch_interval is not None and sys.getswitchinterval() < switch_interval:
            sys.setswitchinterval(switch_interval)
        self._store = Store.open(database)
        self._reader = Reader(self._store)
        self.runtime_id = str(uuid.uuid4())
        self._closed = False
        self._close_lock = threading.Lock()
        # Serialises the ending of executions whose actor stopped without ending (_end_dead_actor).
        self._dead_lock = threading.Lock()
        try:
            # Executions of runtimes that died are ended before we take the database.
            self._store.recover_lost()
            self._store.write(RegisterRuntime(id=self.runtime_id, host=socket.gethostname(),
                                              pid=os.getpid(), at=utcnow()))
        except BaseException:
            self._store.close()  # its writer thread and connections: nothing else was made yet
            raise
        # From here on every write holds this runtime's lease (its row).
        self.lease_lost = threading.Event()
        self._store.hold_lease(self.runtime_id, self._on_lease_lost)
        self._catalog = Catalog()
        self._host = Host(
            store=self._store, runtime_id=self.runtime_id, timers=Timers(),
            dispatcher=Dispatcher(actor_threads),
            pool=concurrent.futures.ThreadPoolExecutor(block_workers, thread_name_prefix="actorgraph-block"),
            catalog=self._catalog, max_depth=max_depth, failure_timeout=failure_timeout, live=LiveActors(),
            on_ended=self._on_ended, on_halted=self._on_halted, on_failed=self._on_failed)
        self._watcher = StopWatcher(self._store, self.runtime_id, self._on_stop_request)
        self._watching = Watching(self._store)
        self._claimer = Claimer(
            self._store, self._catalog, self.runtime_id, concurrency=concurrency,
            per_user=max_running_per_user, per_graph=max_running_per_graph,
            spawn=self._spawn_claimed) if worker else None
        logger.info("runtime %s opened %s%s", self.runtime_id, redact(self._store.url),
                    f" as a worker (concurrency {concurrency})" if worker else "")

    # -- context manager ------------------------------------------------------

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- graphs and blocks --------------------------------------------------------

    def load(self, source: str | os.PathLike | Mapping[str, Any]) -> list[str]:
        """Validate and add the graphs of a JSON file (or dict); return their ids.

        Each graph is stored in the database as a version (see actors/catalog.py),
        which every execution of it records. Nothing is added unless every
        graph is valid. Raises InvalidGraph.
        """
        self._check_open()
        return self._catalog.load(source, self._store)

    def register_block(self, name: str, fn: Callable[..., Mapping[str, Any]],
                       inputs: Any = None, outputs: Any = None) -> None:
        """Add a block: ``fn(ctx, **inputs) -> dict`` runs on the worker pool.

        Declared ``inputs``/``outputs`` let links to the block be validated.
        """
        self._catalog.register_block(name, fn, inputs, outputs)

    # -- starting and watching ------------------------------------------------------------

    def start(self, graph_id: str, user_id: str, inputs: Mapping[str, Any] | None = None) -> str:
        """Start a root execution; its row exists (RUNNING, or QUEUED over a limit) on return."""
        self._check_open()
        bundle = self._catalog.bundle(graph_id)
        if not isinstance(user_id, str) or not user_id:
            raise InvalidInput(f"user_id must be a non-empty string, not {user_id!r}")
        inputs = check_inputs({} if inputs is None else inputs)
        try:
            inputs_json = dumps(inputs)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"inputs of graph {graph_id!r} cannot be stored: {exc}") from exc
        execution_id = str(uuid.uuid4())
        identity = Identity(execution_id=execution_id, parent_id=None, root_id=execution_id,
                            graph_id=graph_id, user_id=user_id, depth=0)
        admitted = self._admission.try_admit(user_id, graph_id)
        now = utcnow()
        try:
            # A new root's row depends on nothing queued (see Writer.write).
            self._store.write(InsertExecution(
                id=identity.execution_id, graph_id=graph_id, user_id=user_id,
                status=ExecutionStatus.RUNNING if admitted else ExecutionStatus.QUEUED,
                parent_id=None, depth=0, runtime_id=self.runtime_id, created_at=now,
                started_at=now if admitted else None, inputs_json=inputs_json,
                graph_version=bundle.version), independent=True)
        except Exception:
            if admitted:
                self._release(user_id, graph_id)
            raise
        if admitted:
            self._spawn_root(identity, inputs, bundle, running=True)
        elif self._admission.enqueue_or_admit(QueuedRoot(identity.execution_id, user_id, graph_id, inputs,
                                                         bundle)):
            self._spawn_root(identity, inputs, bundle, running=False)
        return identity.execution_id

    def submit(self, graph_id: str, user_id: str, inputs: Mapping[str, Any] | None = None) -> str:
        """Hand a root to the workers: a QUEUED row any worker may claim; no actor is created here.

        Raises:
            InvalidInput: on SQLite (no worker can claim it), or inputs that
                do not fit the graph's ``input`` nodes. Nothing is written.
            NotFound: the graph was never loaded here.
        """
        self._check_open()
        return submit_root(self._store, self._catalog, graph_id, user_id, inputs)

    def _spawn_root(self, identity: Identity, inputs: Mapping[str, Any], bundle: Bundle, *,
                    running: bool) -> None:
        ref = ExecutionActor.start(self._host, identity, inputs, bundle=bundle, parent_ref=None,
                                   parent_halted=None, running=running)
        # Registered before it begins, so its end always finds it registered.
        self._host.live.add(identity, ref)
        ref.tell(Begin())

    def _spawn_claimed(self, root: ClaimedRoot, bundle: Bundle) -> None:
        """On the claim loop's thread: a root this worker claimed (its row is RUNNING, owned here)."""
        identity = Identity(execution_id=root.id, parent_id=None, root_id=root.id, graph_id=root.graph_id,
                            user_id=root.user_id, depth=0)
        self._spawn_root(identity, loads(root.inputs_json) or {}, bundle, running=True)

    def wait(self, execution_id: str, timeout: float = 10.0, user_id: str | None = None) -> ExecutionRecord:
        """Block until the execution is terminal in the database; raise TimeoutError after ``timeout``."""
        check_wait_timeout(timeout, "timeout")
        deadline = time.monotonic() + timeout
        while True:
            record = self.get(execution_id, user_id=user_id)
            if record.status.is_terminal:
                return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"execution {execution_id} is still {record.status.value} after {timeout}s")
            if self._host.live.get(execution_id) is not None:
                self._host.live.wait_gone(execution_id, remaining)
            else:
                time.sleep(min(WAIT_POLL, remaining))

    def actor(self, execution_id: str) -> pykka.ActorRef:
        """The live actor of an execution hosted by this runtime."""
        ref = self._host.live.get(execution_id)
        if ref is None:
            raise NotFound(f"execution {execution_id!r} has no live actor in this runtime")
        return ref

    # -- stopping -------------------------------------------------------------------

    @overload
    def stop(self, execution_id: str, user_id: str, wait_timeout: float = ..., cascade: bool = ...,
             block: Literal[True] = ..., reason: str = ...) -> StopAck: ...

    @overload
    def stop(self, execution_id: str, user_id: str, wait_timeout: float = ..., cascade: bool = ...,
             *, block: Literal[False], reason: str = ...) -> pykka.Future[StopAck]: ...

    def stop(self, execution_id: str, user_id: str, wait_timeout: float = 15.0, cascade: bool = True,
             block: bool = True, reason: str = "stopped by user") -> StopAck | pykka.Future[StopAck]:
        """Stop an execution and (by default) its whole subtree.

        Returns the StopAck once every write it reports is committed, or with
        ``block=False`` a pykka Future of it. ``wait_timeout`` is how long
        running work may take to wind down; 0 forces everything at once.

        Raises:
            InvalidInput: ``wait_timeout`` is negative or not a number, or
                ``cascade``/``block`` is not a bool, or ``reason`` not a string.
            NotFound, PermissionDenied: nothing changes anywhere.
            DatabaseError: the database did not answer within ``wait_timeout``.
                The subtree is halted in memory (nothing in it starts, running
                blocks see ``stop_event``) and is written TERMINATED when the
                database answers, without another call.
            StopTimeout: another process did not end it in time.
        """
        check_stop(wait_timeout, cascade, reason)
        if not isinstance(block, bool):
            raise InvalidInput(f"block must be True or False, not {block!r}")
        stop = Stop(user_id=user_id, cascade=cascade, reason=reason, wait_timeout=float(wait_timeout))
        ref = self._host.live.get(execution_id)
        if ref is not None and block:
            # Hosted here: the actor checks the user itself (PermissionDenied).
            ack = self._stop_live(execution_id, ref, stop)
            if ack is not None:
                return self._stop_abandoned(ack, stop)
        record = owned_record(self._store, execution_id, user_id)
        if block:
            return self._stop(record, stop)
        future: pykka.ThreadingFuture[StopAck] = pykka.ThreadingFuture()
        threading.Thread(target=_settle, args=(future, self._stop, record, stop), daemon=True,
                         name=f"actorgraph-stop-{execution_id[:8]}").start()
        return future

    def _stop_live(self, execution_id: str, ref: pykka.ActorRef, stop: Stop) -> StopAck | None:
        """Ask the live actor; None if it is gone (its row is final: the database answers)."""
        try:
            answer = ref.ask(stop, block=False)
        except pykka.ActorDeadError:
            return None
        return self._await_ack(execution_id, answer, time.monotonic() + stop.wait_timeout)

    def _await_ack(self, execution_id: str, answer: pykka.Future[StopAck], deadline: float) -> StopAck | None:
        """Wait for a live actor's StopAck: until ``deadline``, then as long as the database answers.

        Returns None if the actor stopped without answering (its row is final).
        """
        give_up = deadline + CHILD_GRACE_LIMIT + COMMIT_SLACK
        while True:
            now = time.monotonic()
            try:
                return answer.get(timeout=max(0.0, deadline - now) if now < deadline else WAIT_POLL)
            except pykka.Timeout:
                pass
            except pykka.ActorDeadError:
                return None
            now = time.monotonic()
            if now >= deadline and self._store.database_away(DATABASE_PATIENCE):
                raise DatabaseError(
                    f"the database does not answer: execution {execution_id} is halted (nothing in its "
                    f"subtree starts, running blocks see stop_event), and the stop will complete when the "
                    f"database answers: its rows are then written TERMINATED without another call")
            if now >= give_up:
                raise StopTimeout(f"execution {execution_id} did not acknowledge its stop "
                                  f"{give_up - deadline:.0f}s after its deadline")

    def _stop_abandoned(self, ack: StopAck, stop: Stop) -> StopAck:
        """After a cascading stop: stop what a non-cascading stop left running in the subtree.

        A stop that did not cascade lets started children run on under a
        terminal parent, outside the supervision tree's reach. A later
        cascading stop of that parent, or of an ancestor, must reach them
        too, so it looks in the database for active descendants and stops
        the top of each active subtree. The look costs one query, paid
        only by a stop that found its execution already final, or once a
        non-cascading stop has left something running in this runtime.
        """
        if not stop.cascade:
            return ack
        if ack.execution_id not in ack.already_final and not self._host.left_running.is_set():
            return ack
        acks = [ack]
        for top in self._active_tops(ack.execution_id):
            ref = self._host.live.get(top)
            answer = self._stop_live(top, ref, stop) if ref is not None else None
            if answer is None:
                answer = self._stop(owned_record(self._store, top, stop.user_id), stop)
            acks.append(answer)
        if len(acks) == 1:
            return ack
        return StopAck(
            execution_id=ack.execution_id,
            terminated=tuple(dict.fromkeys(i for a in acks for i in a.terminated)),
            already_final=tuple(dict.fromkeys(i for a in acks for i in a.already_final)),
            forced=tuple(dict.fromkeys(i for a in acks for i in a.forced)))

    def _active_tops(self, execution_id: str) -> builtins.list[str]:
        """Active descendants whose parent is terminal: where each abandoned subtree starts."""
        rows = self._store.subtree(execution_id)
        active = {row["id"] for row in rows if not ExecutionStatus(row["status"]).is_terminal}
        return [row["id"] for row in rows if row["id"] in active and row["parent_id"] not in active]

    def _stop(self, record: ExecutionRecord, stop: Stop) -> StopAck:
        ref = self._host.live.get(record.id)
        if ref is not None:
            ack = self._stop_live(record.id, ref, stop)
            if ack is None:
                ack = self._end_dead_actor(record.id, reason=stop.reason, timeout=stop.wait_timeout + COMMIT_SLACK)
            if ack is not None:
                return self._stop_abandoned(ack, stop)
        queued = self._admission.remove(record.id)
        if queued is not None:
            return self._stop_queued(queued, stop)
        if self.lease_lost.is_set():
            raise DatabaseError(f"runtime {self.runtime_id} lost its lease: it stops nothing any more")
        current = self._store.get(record.id)
        if current is not None and current.status.is_terminal:
            return self._stop_abandoned(StopAck(execution_id=record.id, already_final=(record.id,)), stop)
        return stop_elsewhere(self._store, record, stop)

    def _end_dead_actor(self, execution_id: str, *, reason: str, error: str | None = None,
                        timeout: float) -> StopAck | None:
        """End an execution hosted here whose actor stopped without ending; None if it is not one.

        Only a bug in a turn and then in its salvage ends an actor so (see
        ExecutionActor.on_failure): an execution that ends as usual leaves
        the registry before its actor stops. Nothing else would ever write
        it (this runtime's lease keeps other processes' recovery away), so we
        do what a parent does for a child that stopped without ending: the
        live actors under it end at once, and its subtree is written
        TERMINATED, forced; with ``error`` (at its death), the execution
        itself FAILED. Its parent, if live here, hears that it ended, as from
        any child. A stop that meets it first ends it TERMINATED.

        Raises:
            DatabaseError: the write did not commit within ``timeout`` s (it
                stays registered: a later stop tries again).
        """
        ref = self._host.live.get(execution_id)
        identity = self._host.live.identity_of(execution_id)
        if ref is None or identity is None or ref.is_alive():
            return None  # it ended as usual meanwhile: its row is final
        with self._dead_lock:  # one at a time: its death, a stop here and one from elsewhere may meet
            if self._host.live.get(execution_id) is not ref:
                return None  # another one ended it
            return self._write_dead(identity, reason, error, timeout)

    def _write_dead(self, identity: Identity, reason: str, error: str | None, timeout: float) -> StopAck:
        execution_id = identity.execution_id
        logger.warning("execution %s (parent %s, root %s) has no live actor; writing it %s with its subtree",
                       execution_id, identity.parent_id, identity.root_id, "FAILED" if error else "TERMINATED")
        active, already_final = active_and_final(self._store, execution_id)
        # The live actors under it first, as ExecutionActor._end_orphans: each
        # closes its spawn gate and writes its own subtree, before or after ours.
        self._host.live.tell_children(execution_id, CascadeStop(reason=reason, deadline=time.monotonic()))
        self._store.write(*_dead_end(execution_id, reason, error), timeout=timeout)
        self._gone(identity)
        ack = ack_from_database(self._store, execution_id, active, already_final)
        record = self._store.get(execution_id)
        parent = self._host.live.get(identity.parent_id) if identity.parent_id is not None else None
        if parent is not None and record is not None and record.status.is_terminal:
            tree = AckTree(terminated=ack.terminated, already_final=ack.already_final, forced=ack.forced)
            tell_if_live(parent, ChildEnded(child_id=execution_id, status=record.status, outputs=record.outputs,
                                            error=record.error, stop_reason=record.stop_reason, ack=tree))
        return ack

    def _stop_queued(self, root: QueuedRoot, stop: Stop) -> StopAck:
        """A root still waiting for a slot: it never started, so one write ends it."""
        (moved,) = self._store.write(MoveExecutions(ids=(root.execution_id,), target=ExecutionStatus.TERMINATED,
                                                    at=utcnow(), stop_reason=stop.reason))
        self._host.live.remove(root.execution_id)
        if moved:
            return StopAck(execution_id=root.execution_id, terminated=moved)
        return StopAck(execution_id=root.execution_id, already_final=(root.execution_id,))

    def _on_stop_request(self, request: StopRequest) -> bool:
        """On the watcher thread: another process asked to stop something we host; True if handed on.

        The stop has the requester's wait_timeout: our actors force what runs
        past it, as for a stop asked here.
        """
        execution_id = request.execution_id
        ref = self._host.live.get(execution_id)
        wait_timeout = DEFAULT_WAIT_TIMEOUT if request.wait_timeout is None else request.wait_timeout
        stop = Stop(user_id=request.user_id, cascade=request.cascade, reason=request.reason,
                    wait_timeout=wait_timeout)
        if ref is not None:
            if not ref.is_alive():
                return self._end_dead_actor(execution_id, reason=stop.reason,
                                            timeout=wait_timeout + COMMIT_SLACK) is not None
            ref.ask(stop, block=False)  # answered by the actor; the requester reads the database
            return True
        if (queued := self._admission.remove(execution_id)) is not None:
            self._stop_queued(queued, stop)
            return True
        return False

    # -- bookkeeping ----------------------------------------------------------------------

    def _on_ended(self, ended: Ended) -> None:
        """In the execution actor's last turn, after its final commit."""
        self._gone(ended.identity)

    def _on_halted(self, identity: Identity) -> None:
        """In the actor's last turn, after it halted without writing (the lease was lost)."""
        self._gone(identity)

    def _on_failed(self, identity: Identity, error: str, unanswered: tuple[Promise[StopAck], ...]) -> None:
        """In the last turn of an actor that stopped without ending: end its execution FAILED, from a thread.

        Not in that turn, nor on the timers' thread: the write may wait for
        a database that is away, and both must stay free. The stops asked of
        it that it never answered are answered once the write is done.
        """
        threading.Thread(target=self._end_failed, args=(identity.execution_id, error, unanswered), daemon=True,
                         name=f"actorgraph-failed-{identity.execution_id[:8]}").start()

    def _end_failed(self, execution_id: str, error: str, unanswered: tuple[Promise[StopAck], ...]) -> None:
        try:
            ack = self._end_dead_actor(execution_id, reason=f"execution {execution_id} failed", error=error,
                                       timeout=FAILED_WRITE_TIMEOUT)
        except DatabaseError as exc:
            logger.error("execution %s could not be written FAILED (%s); it stays RUNNING until it, or an "
                         "ancestor, is stopped, or the next runtime on the database recovers it", execution_id, exc)
            for promise in unanswered:
                promise.set_exception(exc)
            return
        # It ended FAILED (or another stop ended it first): not by these stops.
        answer = StopAck(execution_id=execution_id, already_final=(execution_id,))
        if ack is not None:
            others = tuple(i for i in ack.already_final if i != execution_id)
            answer = dataclasses.replace(ack, already_final=(execution_id, *others))
        for promise in unanswered:
            promise.set_result(answer)

    def _gone(self, identity: Identity) -> None:
        if not self._host.live.remove(identity.execution_id):
            return  # gone already: a root's slot is freed once
        if identity.parent_id is None:
            if self._claimer is not None:
                self._claimer.root_ended(identity.execution_id)
            self._release(identity.user_id, identity.graph_id)

    def _release(self, user_id: str, graph_id: str) -> None:
        for root in self._admission.release(user_id, graph_id):
            identity = Identity(execution_id=root.execution_id, parent_id=None, root_id=root.execution_id,
                                graph_id=root.graph_id, user_id=root.user_id, depth=0)
            # Not in the commit callback, which holds the writer's turn: keep it short.
            self._host.timers.call_soon(functools.partial(self._spawn_root, identity, root.inputs, root.bundle,
                                                          running=False))

    def _on_lease_lost(self) -> None:
        """On the committing thread: another process recovered our executions; halt them all here.

        Only messages: each live actor halts in its own turn, without
        writing (nothing it writes would be let through anyway).
        """
        self.lease_lost.set()
        if self._claimer is not None:
            self._claimer.pause()
        for root in self._admission.queued():
            self._admission.remove(root.execution_id)
        # Every live actor halts, and so does any started from now on (a
        # child whose parent's turn was under way): none writes again.
        halted = self._host.live.seal(Halt(reason=f"runtime {self.runtime_id} lost its lease"))
        logger.error("runtime %s lost its lease: another process recovered its executions; %d executions "
                     "are halted here and nothing more is written for them", self.runtime_id, halted)

    @property
    def live_count(self) -> int:
        """How many executions this runtime hosts right now."""
        return len(self._host.live)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until this runtime hosts no execution (e.g. abandoned children ended)."""
        return self._host.live.wait_empty(timeout)

    def stats(self) -> dict[str, Any]:
        return {
            "runtime_id": self.runtime_id,
            "database": self._store.dialect,
            "live_executions": len(self._host.live),
            # Pooled connections opened so far (at most 8 at a time), plus the
            # LISTEN connection on PostgreSQL.
            "connections_opened": self._store.connections_opened,
            "listen_connection": self._watcher.listening,
            "commits": self._store.writer.commits if self._store.writer else 0,
            "claimed_running": self._claimer.running if self._claimer is not None else 0,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput("this runtime is closed")

    def close(self, timeout: float = 15.0) -> None:
        """Stop every live execution (cascading), then release threads and the database.

        Bounded even when the database is away: after ``timeout`` the
        runtime gives up on it, and the executions it could not write stay
        active in their rows, owned by this (now closed) runtime. The next
        runtime opened on the database, or ``run.py stop``, recovers them.
        """
        check_wait_timeout(timeout, "timeout")
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._claimer is not None:
            self._claimer.close()
        self._watcher.close()
        deadline = time.monotonic() + timeout
        stop = Stop(user_id="", reason="runtime closed", wait_timeout=timeout)
        pending = []
        for identity, ref in self._host.live.tops():
            # A dead actor's ask fails its future (ActorDeadError), read in _await_close.
            pending.append((identity.execution_id,
                            ref.ask(dataclasses.replace(stop, user_id=identity.user_id), block=False)))
        for root in self._admission.queued():
            if self._admission.remove(root.execution_id) is not None:
                self._close_queued(root, stop)
        for execution_id, future in pending:
            self._await_close(execution_id, future, stop, deadline)
        self._host.live.wait_empty(max(0.0, deadline - time.monotonic()))
        if len(self._host.live):
            logger.warning("runtime %s closed with %d executions still live", self.runtime_id,
                           len(self._host.live))
        self._host.timers.close()
        self._host.dispatcher.close()
        # Blocks stuck in uncooperative user code cannot be killed; their
        # records are already terminal and their results will be dropped.
        self._host.pool.shutdown(wait=False, cancel_futures=True)
        self._release_database()
        logger.info("runtime %s closed", self.runtime_id)

    def drain(self, timeout: float) -> None:
        """Claim nothing more, let running trees end on their own for up to ``timeout`` s, then close.

        What still runs after ``timeout`` is stopped with a cascade by close().
        """
        check_wait_timeout(timeout, "timeout")
        if self._claimer is not None:
            self._claimer.pause()
        logger.info("runtime %s drains: %d executions live, up to %gs", self.runtime_id,
                    len(self._host.live), timeout)
        self._host.live.wait_empty(timeout)
        self.close()

    def _close_queued(self, root: QueuedRoot, stop: Stop) -> None:
        try:
            self._stop_queued(root, dataclasses.replace(stop, user_id=root.user_id))
        except DatabaseError as exc:
            logger.warning("runtime %s: queued root %s could not be written TERMINATED: %s",
                           self.runtime_id, root.execution_id, exc)

    def _await_close(self, execution_id: str, future: pykka.Future[StopAck], stop: Stop, deadline: float) -> None:
        """Wait for one stop of close() as a stop waits, but only say what was left: close goes on.

        An actor that stopped without ending (without answering) is ended here.
        """
        try:
            if self._await_ack(execution_id, future, deadline) is None:
                self._end_dead_actor(execution_id, reason=stop.reason,
                                     timeout=max(0.0, deadline - time.monotonic()))
        except DatabaseError as exc:
            logger.debug("runtime %s: a stop during close waits for the database: %s", self.runtime_id, exc)
        except Exception as exc:  # noqa: BLE001 - keep closing; say what was left
            logger.warning("runtime %s: a stop during close failed: %s", self.runtime_id, exc)

    def _release_database(self) -> None:
        """Unregister and close the store; if the database is away, leave a trail for recovery."""
        if self.lease_lost.is_set():
            # Our row is gone and nothing of ours is written any more.
            self._watching.close()
            self._store.close(drain_timeout=1.0)
            return
        away = self._store.database_away(DATABASE_PATIENCE)
        if not away:
            try:
                self._store.write(UnregisterRuntime(runtime_id=self.runtime_id), timeout=COMMIT_SLACK)
            except DatabaseError as exc:
                logger.warning("runtime %s could not unregister: %s", self.runtime_id, exc)
                away = True
        if away:
            # Our runtime row stays; this process's next runtime treats it
            # as gone at once, any other process once its heartbeat is stale.
            forget_runtime(self.runtime_id)
            logger.warning("runtime %s closes while the database is unavailable: executions it could "
                           "not write stay active in the database until the next runtime or "
                           "run.py stop recovers them", self.runtime_id)
        self._watching.close()
        self._store.close(drain_timeout=1.0 if away else 30.0)


def _dead_end(execution_id: str, reason: str, error: str | None) -> tuple[Operation, ...]:
    """The write that ends an execution without its actor: TERMINATED with its subtree, or FAILED with ``error``.

    Its descendants first, then its nodes and its row, as an ending's final write.
    """
    at = utcnow()
    if error is None:
        return (TerminateSubtree(execution_id=execution_id, reason=reason, at=at, forced=True),)
    return (TerminateSubtree(execution_id=execution_id, reason=reason, at=at, forced=True, include_root=False),
            MoveNodes(execution_id=execution_id, node_ids=None, target=ExecutionStatus.TERMINATED, at=at),
            MoveExecutions(ids=(execution_id,), target=ExecutionStatus.FAILED, at=at, error=error))


def _settle(future: pykka.ThreadingFuture, fn: Callable[..., StopAck], *args: Any) -> None:
    try:
        future.set(fn(*args))
    except BaseException:  # noqa: BLE001 - handed to whoever gets the future
        future.set_exception()
