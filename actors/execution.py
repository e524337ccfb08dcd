"""The execution actor: one pykka actor per graph execution.

Its turns (on the runtime's dispatcher, see dispatch.py) only move data and
messages: it starts nodes (which run on the timers, the worker pool or as
child executions), takes their results by message, writes through the
store's writer without waiting, and answers ``Stop``. It never runs user
code and never blocks, so a ``Stop`` is handled as soon as it arrives.

Every field below is read and written only in this actor's turns. Other
threads (the writer committing, the timer thread, pool workers) reach it by
``tell``: commit callbacks and timers send a message, nothing more.

An actor lives until its final status is committed: then it tells its
parent (``ChildEnded``), answers whoever asked it to stop, and stops.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import functools
import logging
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

import pykka
from pykka import messages as pykka_messages

from actors import blocks as builtin
from actors.blocks import BlockContext, BlockKind, BlockSpec, NodeError
from actors.catalog import Bundle
from actors.deferred import DeferredReplyActor
from actors.errors import InvalidInput
from actors.flag import Flag
from actors.host import Ended, Host
from actors.logs import ExecutionLog, Identity
from actors.messages import (
    AckTree,
    Begin,
    CascadeStop,
    ChildCommitted,
    ChildContinues,
    ChildEnded,
    ChildWriteQueued,
    DeadlinePassed,
    FinalCommitted,
    ForceSilent,
    Halt,
    NodeFinished,
    SalvageCommitted,
    Stop,
    StopAck,
    WriteFailed,
    check_stop,
)
from actors.supervision import CHILD_GRACE, CHILD_GRACE_LIMIT, Ending
from persistence import (
    ActorGraphError,
    DatabaseError,
    ExecutionStatus,
    InsertExecution,
    InsertNodes,
    MoveExecutions,
    MoveNodes,
    NodeRow,
    Operation,
    PermissionDenied,
    Promise,
    RequestStop,
    dumps,
    utcnow,
)

logger = logging.getLogger(__name__)


class NodeStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


@dataclasses.dataclass
class NodeState:
    status: NodeStatus = NodeStatus.WAITING
    received: dict[str, Any] = dataclasses.field(default_factory=dict)
    # What to cancel on a stop: a TimerHandle, a pool Future, or a child id.
    handle: Any = None
    ignore_stop: bool = False


@dataclasses.dataclass
class ChildState:
    ref: pykka.ActorRef
    node_id: str
    # Its final status is committed (it told us ChildEnded).
    ended: bool = False
    # Its final write, once queued: an ending of ours submits after it.
    final_write: Promise[Any] | None = None


@dataclasses.dataclass
class Salvage:
    """A broken execution's way to FAILED (see ExecutionActor._salvage)."""

    ending: Ending
    # The live children it waits for, from the runtime's registry.
    children: dict[str, pykka.ActorRef]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NaturalEnd:
    """A final write that nobody asked for: every node is done, or the execution failed outright."""

    status: ExecutionStatus
    outputs: dict[str, Any] | None
    error: str | None


class ExecutionActor(DeferredReplyActor):
    # Its registry is the runtime's LiveActors (a dict: see PooledActor for why not pykka's).
    in_pykka_registry = False
    # A message sent through ``rt.actor(id)`` that it cannot take (unknown,
    # another user's Stop, a bad wait_timeout) is refused; the execution runs on.
    refusals = (ActorGraphError,)

    def __init__(self, host: Host, identity: Identity, inputs: Mapping[str, Any], *, bundle: Bundle,
                 parent_ref: pykka.ActorRef | None, parent_halted: Flag | None,
                 running: bool) -> None:
        super().__init__(host.dispatcher)
        self.host = host
        self.identity = identity
        self.inputs = dict(inputs)
        # The root's stored graph version: this execution and its children run its graphs.
        self.bundle = bundle
        self.graph = bundle.graphs[identity.graph_id]
        self.parent_ref = parent_ref
        # The parent's spawn gate: a child never starts once it is set.
        self.parent_halted = parent_halted
        # A root admitted at once is inserted RUNNING; everything else QUEUED.
        # Either way, nodes start only on Begin, sent once the row is committed.
        self.status = ExecutionStatus.RUNNING if running else ExecutionStatus.QUEUED
        self.started = False
        # Set when this execution stops or fails: the spawn gate, and the
        # stop_event user blocks see.
        self.halted = Flag()
        self.nodes = {node_id: NodeState() for node_id in self.graph.nodes}
        self.children: dict[str, ChildState] = {}
        # Children that answered a non-cascading stop by running on. (Sets
        # of ids here are dicts: see Ending, in supervision.py.)
        self.continuing: dict[str, None] = {}
        self.outputs: dict[str, Any] = {}
        self.ending: Ending | None = None
        self.natural: NaturalEnd | None = None
        # The final write once submitted, and the status once committed.
        self.final_write: Promise[Any] | None = None
        self.final_status: ExecutionStatus | None = None
        # Stops that arrived while a natural final write was in flight.
        self.stop_waiters: tuple[Promise[StopAck], ...] = ()
        # The parent sent us a cascade: it wants our ChildWriteQueued.
        self.cascaded = False
        # Set once a turn broke (a bug of ours): how the execution ends
        # instead (see _salvage). From then on _SALVAGE_HANDLERS apply.
        self.salvage: Salvage | None = None
        self._ops: list[Operation] = []
        self._after_commit: list[tuple[pykka.ActorRef, str]] = []
        self.log = ExecutionLog(logger, identity)

    # -- pykka hooks ------------------------------------------------------

    def _handle_receive(self, message: Any) -> Any:
        if isinstance(message, pykka_messages._ActorStop):  # noqa: SLF001
            # pykka's own ``ref.stop()`` stops the execution, as ``rt.stop``
            # does: its subtree is written TERMINATED before the actor stops.
            # Stopping the actor alone would leave its rows RUNNING for good.
            # Through on_receive, as any Stop: a bug in it is salvaged too.
            return self.on_receive(Stop(user_id=self.identity.user_id, reason="its actor was stopped"))
        return super()._handle_receive(message)

    def on_receive(self, message: Any) -> Any:
        handler = (_HANDLERS if self.salvage is None else _SALVAGE_HANDLERS).get(type(message))
        if handler is None:
            if self.salvage is not None and type(message) in _HANDLERS:
                return None  # late news: the salvage ends the execution without it
            raise InvalidInput(f"execution {self.identity.execution_id} cannot take the message {message!r}")
        try:
            return handler(self, message)
        except self.refusals:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not leave the execution RUNNING
            if self.salvage is not None:
                return self._broken_for_good(message, exc)  # the salvage's own handling broke
            self.log.error("handling %s failed; ending the execution FAILED", type(message).__name__,
                           exc_info=True)
            try:
                return self._salvage(f"internal error while handling {type(message).__name__}: "
                                     f"{type(exc).__name__}: {exc}")
            except Exception as salvage_error:  # noqa: BLE001 - see _broken_for_good
                return self._broken_for_good(message, salvage_error)
        finally:
            self._flush()

    def _broken_for_good(self, message: Any, error: Exception) -> Promise[StopAck] | None:
        """The salvage broke too: stop this actor, and let its runtime write the execution from outside.

        Done here, not left to pykka: pykka stops an actor whose told
        message raised, but hands an asked message's error to the asker and
        runs the actor on, broken. A Stop asked here would then raise, and
        the execution it asked to stop would run on. Instead every message
        stops the actor alike, and an asked Stop is answered by the runtime
        once it has written the execution (see on_failure).
        """
        waiter: Promise[StopAck] | None = None
        if isinstance(message, Stop):
            waiter = Promise()
            self.stop_waiters += (waiter,)
        self.fail_in_turn((type(error), error, error.__traceback__))
        return waiter

    def on_failure(self, *args: Any) -> None:
        # Only when the salvage broke too: this actor has stopped, and the
        # runtime writes the execution FAILED from outside it. Its running
        # blocks see stop_event, and a child not begun yet never begins.
        self.halted.set()
        self.log.error("actor failed", exc_info=args)
        self.host.on_failed(self.identity, f"internal error: its actor failed: {_describe(args[1])}",
                            self._unanswered_stops())

    def _unanswered_stops(self) -> tuple[Promise[StopAck], ...]:
        """The stops asked of this execution that still wait for their answer (read in its last turn)."""
        waiting = list(self.stop_waiters)
        if self.ending is not None and self.ending.asked:
            waiting.append(self.ending.result)
        return tuple(promise for promise in waiting if not promise.done())

    def on_refusal(self, message: Any, error: Exception) -> None:
        self.log.error("refused a message: %s", error)

    # -- stop ---------------------------------------------------------------

    def _on_stop(self, stop: Stop) -> Promise[StopAck]:
        if stop.user_id != self.identity.user_id:
            raise PermissionDenied(
                f"user {stop.user_id!r} may not stop execution {self.identity.execution_id}: "
                "it belongs to another user")
        check_stop(stop.wait_timeout, stop.cascade, stop.reason)
        own_id = self.identity.execution_id
        if self.final_status is not None:
            return Promise.resolved(StopAck(execution_id=own_id, already_final=(own_id,)))
        if self.natural is not None or self.salvage is not None:
            # Its final write is in flight: answer once it is committed.
            waiter: Promise[StopAck] = Promise()
            self.stop_waiters += (waiter,)
            return waiter
        if self.ending is not None:
            return self._join_ending(self.ending, stop)
        self.log.info("stop requested (cascade=%s, wait_timeout=%s): %s",
                      stop.cascade, stop.wait_timeout, stop.reason)
        # On record before the final write (the queue is FIFO): if this
        # process dies mid-stop, recovery ends the subtree TERMINATED.
        self._ops.append(RequestStop(execution_id=own_id, reason=stop.reason, cascade=stop.cascade,
                                     at=utcnow(), wait_timeout=stop.wait_timeout, by_host=self.host.runtime_id))
        ending = self._end(ExecutionStatus.TERMINATED, reason=stop.reason,
                           deadline=time.monotonic() + stop.wait_timeout, cascade=stop.cascade)
        ending.asked = True
        return ending.result

    def _join_ending(self, ending: Ending, stop: Stop) -> Promise[StopAck]:
        """A stop meets an ending in progress: the earlier deadline wins.

        Before the final write is submitted the stops share one ending and
        one answer. After it, this stop moves nothing: it is answered, after
        that commit, with the execution in ``already_final``.
        """
        own_id = self.identity.execution_id
        ending.asked = True
        if ending.submitted:
            return _then(ending.result, StopAck(execution_id=own_id, already_final=(own_id,)))
        self.log.info("stop joins the ending in progress (%s): %s", ending.status.value, stop.reason)
        if stop.cascade and not ending.cascade:
            self._cascade_to_continuing(ending)
        self._tighten(ending, time.monotonic() + stop.wait_timeout)
        return ending.result

    def _on_cascade(self, stop: CascadeStop) -> None:
        self.cascaded = True
        if self.final_status is not None:
            return  # our ChildEnded is already in the parent's mailbox
        if self.final_write is not None:
            self._tell_parent(ChildWriteQueued(child_id=self.identity.execution_id, write=self.final_write))
            return
        if self.ending is not None:
            if not stop.queued_only and not self.ending.cascade:
                self._cascade_to_continuing(self.ending)
            self._tighten(self.ending, stop.deadline)
            return
        if stop.queued_only and self.started:
            # A non-cascading stop above us: a started child runs on to its own end.
            self.cascaded = False
            self._tell_parent(ChildContinues(child_id=self.identity.execution_id))
            return
        self._end(ExecutionStatus.TERMINATED, reason=stop.reason, deadline=stop.deadline, timed_by_parent=True)

    def _end(self, status: ExecutionStatus, *, reason: str, deadline: float, error: str | None = None,
             cascade: bool = True, timed_by_parent: bool = False) -> Ending:
        """Close the spawn gate, interrupt what runs, and wait for the rest as an ``Ending``.

        ``timed_by_parent``: the deadline is the parent's, and the parent
        tells us when it passes (``DeadlinePassed``), so no timer of our own
        is armed: a cascade through a thousand executions arms one timer.
        """
        self.halted.set()
        self._flush()
        ending = Ending(self.identity.execution_id, status=status, reason=reason, deadline=deadline,
                        error=error, cascade=cascade)
        self.ending = ending
        # An agent node ends with its child, so the ending waits for it as a
        # child, not as a node.
        running = [node_id for node_id, state in self.nodes.items()
                   if state.status is NodeStatus.RUNNING and not isinstance(state.handle, str)]
        ending.wait_for((node_id for node_id in running if not self._interrupt_node(node_id)), ())
        for child_id, child in self.children.items():
            if child.ended:
                ending.child_already_final(child_id)
                continue
            ending.wait_for((), (child_id,))
            if child.final_write is not None:
                ending.child_write_queued(child_id, child.final_write)
            else:
                # With a stop that does not cascade, only a child that has not
                # started yet ends (queued_only); a started one answers
                # ChildContinues and runs on.
                self._tell_child(child, CascadeStop(reason=reason, deadline=deadline, queued_only=not cascade))
        if deadline <= time.monotonic():
            self._force_nodes(ending)
        elif not timed_by_parent:
            self._arm(ending, deadline)
        self._maybe_submit()
        return ending

    def _cascade_to_continuing(self, ending: Ending) -> None:
        """A cascading stop joins a non-cascading one: children that ran on are stopped too."""
        ending.cascade = True
        for child_id in sorted(self.continuing):
            child = self.children[child_id]
            if not child.ended:
                ending.wait_for((), (child_id,))
                self._tell_child(child, CascadeStop(reason=ending.reason, deadline=ending.deadline))
        self.continuing.clear()
        if ending.deadline <= time.monotonic():
            # Past the deadline already: these children get the grace too.
            self._force_nodes(ending)

    def _tighten(self, ending: Ending, deadline: float) -> None:
        """Another stop meets the ending: the earlier deadline wins, for this execution and its pending children.

        A deadline that has passed forces at once, whichever stop set it:
        the DeadlinePassed a parent sends may never come (a parent that
        stopped without ending, whose runtime tells its orphans to end now).
        """
        if deadline < ending.deadline:
            ending.deadline = deadline
            if ending.timer is not None:
                ending.timer.cancel()
            for child_id in ending.pending_children:
                self._tell_child(self.children[child_id], CascadeStop(reason=ending.reason, deadline=deadline))
            if deadline > time.monotonic():
                self._arm(ending, deadline)
        if ending.deadline <= time.monotonic() and not ending.submitted:
            self._force_nodes(ending)
        self._maybe_submit()

    def _arm(self, ending: Ending, deadline: float, *, grace: float = 0.0) -> None:
        """Have the timer thread tell us when the deadline (or ``grace`` s after it) passes.

        Deeper executions fire first among timers due at the same instant,
        so children force their work before their parents look.
        """
        message = DeadlinePassed(deadline=deadline, grace=grace)
        ending.timer = self.host.timers.call_at(deadline + grace, functools.partial(_tell, self.actor_ref, message),
                                                priority=self.identity.depth)

    def _on_deadline(self, message: DeadlinePassed) -> None:
        ending = self.ending
        if ending is None or ending.submitted or message.deadline != ending.deadline:
            return  # stale: a tighter deadline replaced it, or we are done
        if message.grace:
            self._look_at_silent_children(ending, message.grace)
        else:
            self._force_nodes(ending)
        self._maybe_submit()

    def _look_at_silent_children(self, ending: Ending, waited: float) -> None:
        """``waited`` s after the deadline, some children have not said their write is queued.

        A live child is still working through its subtree (its own children
        answer it first): it gets twice as long again, up to
        CHILD_GRACE_LIMIT, after which we write its subtree anyway. A child
        whose actor stopped will never answer; if it sent ``ChildEnded``
        just before it stopped, that message is in our mailbox already, so
        we look again behind it (``ForceSilent``) before writing its subtree.
        """
        silent = tuple(ending.pending_children)
        if waited >= CHILD_GRACE_LIMIT:
            self.log.warning("children %s did not end %.0fs after the deadline; writing their subtrees",
                             sorted(silent), waited)
            ending.force_children(silent)
            return
        stopped = tuple(child_id for child_id in silent if not self.children[child_id].ref.is_alive())
        if stopped:
            self._tell_self(ForceSilent(deadline=ending.deadline, child_ids=stopped))
        if len(stopped) < len(silent):
            self._arm(ending, ending.deadline, grace=min(2 * waited + CHILD_GRACE, CHILD_GRACE_LIMIT))

    def _on_force_silent(self, message: ForceSilent) -> None:
        ending = self.ending
        if ending is None or ending.submitted or message.deadline != ending.deadline:
            return  # a tighter deadline's grace looks again
        gone = [child_id for child_id in message.child_ids if child_id in ending.pending_children]
        if not gone:
            return
        self.log.warning("children %s stopped without ending; writing their subtrees", sorted(gone))
        ending.force_children(gone)
        self._end_orphans(gone, ending)
        self._maybe_submit()

    def _end_orphans(self, dead_children: Iterable[str], ending: Ending) -> None:
        """Children whose actors stopped without ending leave the registry, and the live actors under them end.

        Those would run on, spawning under rows we write TERMINATED: they
        end too (their writes then find their rows terminal), and nobody
        waits for their answers.
        """
        orphaned = CascadeStop(reason=ending.reason, deadline=ending.deadline)
        for child_id in dead_children:
            self.host.live.remove(child_id)
            self.host.live.tell_children(child_id, orphaned)

    def _force_nodes(self, ending: Ending) -> None:
        """At the deadline: own work still running is terminated anyway; its late results are dropped.

        Children still pending hear that the deadline passed from us (those
        whose deadline came from our cascade armed no timer); CHILD_GRACE
        later we look at those still silent (``_look_at_silent_children``).
        """
        for node_id in ending.pending_nodes:
            state = self.nodes[node_id]
            state.status = NodeStatus.DONE
            if state.handle is not None and not isinstance(state.handle, concurrent.futures.Future):
                state.handle.cancel()
        ending.force_nodes()
        # Once per deadline: a child forced at its own ``_end`` hears the
        # same deadline from us again, and must not pass it on again. (It
        # did: in a chain, depth k heard it k times and armed k grace
        # timers, so a 600-deep stop with wait_timeout=0 sent 180,000
        # messages and outlasted the grace.)
        if ending.pending_children and ending.graced_deadline != ending.deadline:
            ending.graced_deadline = ending.deadline
            passed = DeadlinePassed(deadline=ending.deadline)
            for child_id in ending.pending_children:
                self._tell_child(self.children[child_id], passed)
            self._arm(ending, ending.deadline, grace=CHILD_GRACE)

    def _interrupt_node(self, node_id: str) -> bool:
        """Stop a running node at once if it can be; True if it is over."""
        state = self.nodes[node_id]
        handle = state.handle
        over = True
        if isinstance(handle, concurrent.futures.Future):
            over = handle.cancel()  # only if the pool had not started it
        elif handle is not None:
            if state.ignore_stop:
                over = False
            else:
                handle.cancel()
        if over:
            state.status = NodeStatus.DONE
        return over

    def _maybe_submit(self) -> None:
        """Once nothing is pending, queue the final write after the children's."""
        ending = self.ending
        if ending is None or not ending.ready_to_submit():
            return
        if ending.timer is not None:
            ending.timer.cancel()
            ending.timer = None
        self._flush()
        final = ending.final_write()
        self._submit_final(final.ops, final.after)

    def _submit_final(self, ops: Iterable[Operation], after: Iterable[Promise[Any]] = ()) -> None:
        write = self.host.store.submit(*ops, after=tuple(after))
        self.final_write = write
        write.add_done_callback(functools.partial(_tell_outcome, self.actor_ref, FinalCommitted))
        if self.cascaded:
            self._tell_parent(ChildWriteQueued(child_id=self.identity.execution_id, write=write))

    def _on_final_committed(self, message: FinalCommitted) -> None:
        ending = self.ending
        if ending is not None:
            self._ending_committed(ending, message)
            return
        natural = self.natural
        assert natural is not None
        if message.error is not None:
            self.log.error("final write (%s) failed: %s", natural.status.value, message.error)
            self.natural, self.final_write = None, None
            waiters, self.stop_waiters = self.stop_waiters, ()
            ending = self._fail_execution(f"its final write failed: {message.error}")
            if ending is not None:
                ending.asked = True
            for waiter in waiters:
                _forward(ending.result if ending else None, waiter)
            return
        if not message.results[-1]:
            self.log.warning("row was already terminal in the database; %s not written", natural.status.value)
        own_id = self.identity.execution_id
        self._ended(natural.status, outputs=natural.outputs, error=natural.error, stop_reason=None,
                    ack=AckTree(already_final=(own_id,)))

    def _ending_committed(self, ending: Ending, message: FinalCommitted) -> None:
        if message.error is not None:
            # Not written (the writer retries a database that is away, so
            # this is an error that retrying cannot fix). The caller hears
            # it; the execution stays halted, and a later stop starts over.
            self.log.error("final write (%s) failed: %s", ending.status.value, message.error)
            self.ending, self.final_write = None, None
            ending.result.set_exception(DatabaseError(
                f"execution {self.identity.execution_id} could not be written {ending.status.value}: "
                f"{message.error}"))
            return
        ending.committed(message.results)
        if not ending.persisted:
            self.log.warning("row was already terminal in the database; %s not written", ending.status.value)
        self._maybe_acknowledge()

    def _maybe_acknowledge(self) -> None:
        ending = self.ending
        if ending is None or not ending.ready_to_acknowledge():
            return
        stopped = ending.status is ExecutionStatus.TERMINATED
        self._ended(ending.status, outputs=None, error=ending.error,
                    stop_reason=ending.reason if stopped else None, ack=ending.acknowledgement())

    def _ended(self, status: ExecutionStatus, *, outputs: dict[str, Any] | None, error: str | None,
               stop_reason: str | None, ack: AckTree) -> None:
        """Committed and acknowledged: tell everyone who listens, then stop this actor."""
        self.final_status = status
        own_id = self.identity.execution_id
        self.log.info("ended %s", status.value)
        self.host.on_ended(Ended(identity=self.identity, status=status, outputs=outputs,
                                 error=error, stop_reason=stop_reason))
        self._tell_parent(ChildEnded(child_id=own_id, status=status, outputs=outputs, error=error,
                                     stop_reason=stop_reason, ack=ack))
        if self.ending is not None and self.ending.asked:
            self.ending.result.set_result(ack.flatten(own_id))
        already_final = StopAck(execution_id=own_id, already_final=(own_id,))
        for waiter in self.stop_waiters:
            waiter.set_result(already_final)
        self.stop_waiters = ()
        # Whatever is still in our inbox is answered with ActorDeadError: a
        # Stop then finds the row terminal in the database, and a parent's
        # cascade already has our ChildEnded in its mailbox.
        self.stop_in_turn()

    # -- a broken turn --------------------------------------------------------------

    def _salvage(self, error: str) -> Promise[StopAck]:
        """A handler of ours raised: end FAILED, trusting only what is sure.

        The turn stopped half-way, so the actor's own bookkeeping (nodes,
        children, an ending in progress) may be wrong. The salvage is an
        ``Ending`` of its own, built from what does not depend on it: the
        live children are those in the runtime's registry, and our nodes'
        handles are only cancelled. Each child is told to stop at once, and
        our write follows theirs as in any ending: no reader sees this
        execution terminal while a child of it is active, and a child busy
        spawning when the turn broke ends what it spawned first. A child
        whose actor has stopped, or that is still silent CHILD_GRACE_LIMIT
        after, is written TERMINATED with its subtree by us, as in a stop.
        Our write (our nodes, then this execution FAILED) also follows any
        final write of ours queued before the break. The parent
        hears ChildWriteQueued and ChildEnded, as from any ending; a stop
        asked meanwhile is answered with the salvage's ack.
        """
        own_id = self.identity.execution_id
        self.halted.set()
        self._flush()  # the broken turn's writes first: a child it inserted is then in the registry and the database
        for state in self.nodes.values():
            # Timers and queued pool work; a running block sees stop_event.
            if state.status is NodeStatus.RUNNING and state.handle is not None and not isinstance(state.handle, str):
                state.handle.cancel()
        now = time.monotonic()
        ending = Ending(own_id, status=ExecutionStatus.FAILED, reason=f"execution {own_id} failed", deadline=now,
                        error=error)
        salvage = self.salvage = Salvage(ending=ending, children=self.host.live.children_of(own_id))
        ending.wait_for((), salvage.children)
        stop = CascadeStop(reason=ending.reason, deadline=now)
        for ref in salvage.children.values():
            _tell(ref, stop)
        if ending.pending_children:
            self._arm(ending, ending.deadline, grace=CHILD_GRACE)
        self._maybe_submit_salvage(salvage)
        waiter: Promise[StopAck] = Promise()
        self.stop_waiters += (waiter,)
        return waiter

    def _on_salvage_grace(self, message: DeadlinePassed) -> None:
        """As _look_at_silent_children: a stopped child never answers; a live one gets up to CHILD_GRACE_LIMIT."""
        salvage = self.salvage
        assert salvage is not None
        ending = salvage.ending
        if ending.submitted or message.deadline != ending.deadline:
            return  # our parent's deadline, or too late to matter
        silent = tuple(ending.pending_children)
        dead = tuple(child_id for child_id in silent if not salvage.children[child_id].is_alive())
        gone = silent if message.grace >= CHILD_GRACE_LIMIT else dead
        if gone:
            self.log.warning("children %s did not end; writing their subtrees", sorted(gone))
            ending.force_children(gone)
            self._end_orphans(dead, ending)
        if ending.pending_children:
            self._arm(ending, ending.deadline, grace=min(2 * message.grace + CHILD_GRACE, CHILD_GRACE_LIMIT))
        self._maybe_submit_salvage(salvage)

    def _on_salvage_child_write_queued(self, message: ChildWriteQueued) -> None:
        salvage = self.salvage
        assert salvage is not None
        salvage.ending.child_write_queued(message.child_id, message.write)
        self._maybe_submit_salvage(salvage)

    def _on_salvage_child_ended(self, message: ChildEnded) -> None:
        salvage = self.salvage
        assert salvage is not None
        salvage.ending.child_ended(message)
        self._maybe_submit_salvage(salvage)
        self._maybe_acknowledge_salvage(salvage)

    def _maybe_submit_salvage(self, salvage: Salvage) -> None:
        ending = salvage.ending
        if not ending.ready_to_submit():
            return
        if ending.timer is not None:
            ending.timer.cancel()
        own_id = self.identity.execution_id
        final = ending.final_write()
        after = final.after if self.final_write is None else (*final.after, self.final_write)
        write = self.host.store.submit(*final.ops, after=after)
        write.add_done_callback(functools.partial(_tell_outcome, self.actor_ref, SalvageCommitted))
        self._tell_parent(ChildWriteQueued(child_id=own_id, write=write))

    def _on_salvage_committed(self, message: SalvageCommitted) -> None:
        salvage = self.salvage
        assert salvage is not None
        if message.error is not None:
            # Not about connectivity (the writer retries that), so writing
            # again fails again: as for a failed ending (_ending_committed),
            # whoever waits hears the error; the rows stay as they are.
            self.log.error("could not write the failure: %s", message.error)
            self._answer_stops_with(DatabaseError(
                f"execution {self.identity.execution_id} could not be written FAILED: {message.error}"))
            self.host.on_halted(self.identity)
            self.stop_in_turn()
            return
        salvage.ending.committed(message.results)
        self._maybe_acknowledge_salvage(salvage)

    def _maybe_acknowledge_salvage(self, salvage: Salvage) -> None:
        ending = salvage.ending
        if not ending.ready_to_acknowledge():
            return
        status, outputs, error, stop_reason = ExecutionStatus.FAILED, None, ending.error, None
        if not ending.persisted:
            # A final write queued before the break committed first: report what it wrote.
            if self.natural is not None:
                status, outputs, error = self.natural.status, self.natural.outputs, self.natural.error
            elif self.ending is not None and self.ending.submitted:
                status, error = self.ending.status, self.ending.error
                stop_reason = self.ending.reason if status is ExecutionStatus.TERMINATED else None
        if self.ending is not None and self.ending.result.done():
            self.ending.asked = False  # answered before the break
        own_id = self.identity.execution_id
        ack = ending.acknowledgement()
        for waiter in self.stop_waiters:
            waiter.set_result(ack.flatten(own_id))
        self.stop_waiters = ()
        self._ended(status, outputs=outputs, error=error, stop_reason=stop_reason, ack=ack)

    def _answer_stops_with(self, error: Exception) -> None:
        """Whoever waits for a stop of ours hears ``error``."""
        if self.ending is not None and self.ending.asked and not self.ending.result.done():
            self.ending.result.set_exception(error)
        for waiter in self.stop_waiters:
            waiter.set_exception(error)
        self.stop_waiters = ()

    # -- lease lost ------------------------------------------------------------

    def _on_halt(self, halt: Halt) -> None:
        """Another process owns this row now: halt the work here and stop, writing nothing.

        Blocks see ``stop_event``; timers and queued pool work are cancelled.
        Whoever waits for a stop of ours hears DatabaseError. The parent is
        halted by the same message, so nobody waits for us.
        """
        self.halted.set()
        for node_id, state in self.nodes.items():
            # An agent node's handle is its child's id: the child halts on its own Halt.
            if state.status is NodeStatus.RUNNING and not isinstance(state.handle, str):
                self._interrupt_node(node_id)
        self._ops, self._after_commit = [], []
        self._answer_stops_with(DatabaseError(
            f"execution {self.identity.execution_id} was halted without being written: {halt.reason}"))
        self.log.warning("halted here, nothing written: %s", halt.reason)
        self.host.on_halted(self.identity)
        self.stop_in_turn()

    # -- starting -------------------------------------------------------------

    def _on_begin(self, _: Begin) -> None:
        if self.started or self.ending is not None or self.final_write is not None:
            return
        if self.parent_halted is not None and self.parent_halted.is_set():
            # The parent is stopping: never start; its cascade will end us.
            self.log.debug("parent is stopping; not starting")
            return
        self.started = True
        if self.status is ExecutionStatus.QUEUED:
            self.status = ExecutionStatus.RUNNING
            self._ops.append(MoveExecutions(ids=(self.identity.execution_id,),
                                            target=ExecutionStatus.RUNNING, at=utcnow()))
        self._start_nodes(self.graph.roots)

    def _start_nodes(self, node_ids: Iterable[str]) -> None:
        """Start ready nodes; inline ones may make more nodes ready, handled here too."""
        ready = list(node_ids)
        while ready and not self.halted.is_set():
            node_id = ready.pop(0)
            ready.extend(self._start_node(node_id))
        self._maybe_complete()

    def _start_node(self, node_id: str) -> list[str]:
        node = self.graph.nodes[node_id]
        state = self.nodes[node_id]
        spec = self.host.catalog.blocks[node.block]
        inputs = {**node.static, **state.received}
        state.status = NodeStatus.RUNNING
        now = utcnow()
        if spec.kind is BlockKind.INLINE:
            try:
                outputs = builtin.run_inline(node.block, inputs, self.inputs)
            except NodeError as exc:
                self._record_node(node_id, node.block, ExecutionStatus.FAILED, now, str(exc))
                self._fail_node(node_id, str(exc), recorded=True)
                return []
            if node.block == "output":
                self.outputs[str(inputs["name"])] = inputs["value"]
            self._record_node(node_id, node.block, ExecutionStatus.COMPLETED, now)
            return self._deliver(node_id, outputs, recorded=True)
        self._record_node(node_id, node.block, ExecutionStatus.RUNNING, now)
        if spec.kind is BlockKind.SLEEP:
            self._start_sleep(node_id, inputs)
        elif spec.kind is BlockKind.AGENT:
            self._start_child(node_id, inputs)
        else:
            self._start_pool(node_id, spec, inputs)
        return []

    def _record_node(self, node_id: str, block: str, status: ExecutionStatus, at: Any,
                     error: str | None = None) -> None:
        ended = at if status.is_terminal else None
        self._ops.append(InsertNodes(rows=(NodeRow(
            execution_id=self.identity.execution_id, node_id=node_id, block=block,
            status=status, started_at=at, ended_at=ended, error=error),)))

    def _start_sleep(self, node_id: str, inputs: Mapping[str, Any]) -> None:
        try:
            seconds = builtin.sleep_seconds(inputs)
        except NodeError as exc:
            self._fail_node(node_id, str(exc))
            return
        state = self.nodes[node_id]
        state.ignore_stop = bool(inputs.get("ignore_stop", False))
        finished = NodeFinished(node_id=node_id, outputs={"value": inputs.get("value")})
        # A partial of the reference, not a closure over the actor: fewer
        # objects for every sleeping leaf, and the timer holds no actor.
        state.handle = self.host.timers.call_later(seconds, functools.partial(_tell, self.actor_ref, finished))

    def _start_pool(self, node_id: str, spec: BlockSpec, inputs: Mapping[str, Any]) -> None:
        context = BlockContext(self.identity.execution_id, self.identity.user_id, node_id, self.halted)
        future = self.host.pool.submit(_run_user_block, spec, context, dict(inputs))
        future.add_done_callback(lambda f: None if f.cancelled() else self._tell_self(f.result()))
        self.nodes[node_id].handle = future

    def _start_child(self, node_id: str, inputs: Mapping[str, Any]) -> None:
        graph_id = inputs.get("graph")
        child_inputs = inputs.get("inputs", {})
        depth = self.identity.depth + 1
        if not isinstance(graph_id, str) or graph_id not in self.bundle.graphs:
            self._fail_node(node_id, f"agent names unknown graph {graph_id!r}")
            return
        if not isinstance(child_inputs, Mapping):
            self._fail_node(node_id, f"agent inputs must be an object, got {type(child_inputs).__name__}")
            return
        if depth > self.host.max_depth:
            self._fail_node(node_id, f"child of graph {graph_id!r} would run at depth {depth}, "
                                     f"deeper than max_depth {self.host.max_depth}")
            return
        identity = Identity(execution_id=str(uuid.uuid4()), parent_id=self.identity.execution_id,
                            root_id=self.identity.root_id, graph_id=graph_id,
                            user_id=self.identity.user_id, depth=depth)
        try:
            inputs_json = dumps(child_inputs)
        except TypeError as exc:
            self._fail_node(node_id, f"agent inputs cannot be stored: {exc}")
            return
        # The child's row, with its parent link, goes into the same commit
        # as this turn's other writes; the child starts its nodes only when
        # told the commit happened (Begin). Until then it is a QUEUED child
        # that a stop of ours ends without ever starting.
        self._ops.append(InsertExecution(
            id=identity.execution_id, graph_id=graph_id, user_id=identity.user_id,
            status=ExecutionStatus.QUEUED, parent_id=identity.parent_id, depth=depth,
            runtime_id=self.host.runtime_id, created_at=utcnow(), started_at=None, inputs_json=inputs_json,
            graph_version=self.bundle.version))
        ref = ExecutionActor.start(self.host, identity, child_inputs, bundle=self.bundle,
                                   parent_ref=self.actor_ref, parent_halted=self.halted, running=False)
        self.host.live.add(identity, ref)
        self.children[identity.execution_id] = ChildState(ref=ref, node_id=node_id)
        self.nodes[node_id].handle = identity.execution_id
        self._after_commit.append((ref, identity.execution_id))
        self.log.debug("spawned child %s of graph %s", identity.execution_id, graph_id)

    # -- results ----------------------------------------------------------------

    def _on_node_finished(self, message: NodeFinished) -> None:
        state = self.nodes[message.node_id]
        if state.status is not NodeStatus.RUNNING:
            return  # the late result of work a stop already cut short
        if self.ending is not None:
            state.status = NodeStatus.DONE
            self.ending.node_ended(message.node_id)
            self._maybe_submit()
            return
        if message.error is not None:
            self._fail_node(message.node_id, message.error)
            return
        self._start_nodes(self._deliver(message.node_id, message.outputs or {}))

    def _on_child_write_queued(self, message: ChildWriteQueued) -> None:
        child = self.children.get(message.child_id)
        if child is None:
            return
        child.final_write = message.write
        if self.ending is not None:
            self.ending.child_write_queued(message.child_id, message.write)
            self._maybe_submit()

    def _on_child_continues(self, message: ChildContinues) -> None:
        self.continuing[message.child_id] = None
        self.host.left_running.set()
        if self.ending is not None:
            self.ending.child_gone(message.child_id)
            self._maybe_submit()

    def _on_child_ended(self, message: ChildEnded) -> None:
        child = self.children.get(message.child_id)
        if child is None:
            return
        child.ended = True
        self.continuing.pop(message.child_id, None)
        if self.ending is not None:
            self.ending.child_ended(message)
            self._maybe_submit()
            self._maybe_acknowledge()
            return
        state = self.nodes[child.node_id]
        if self.final_write is not None or state.status is not NodeStatus.RUNNING:
            return
        if message.status is ExecutionStatus.COMPLETED:
            self._start_nodes(self._deliver(child.node_id, {"outputs": message.outputs or {}}))
        elif message.status is ExecutionStatus.FAILED:
            self._fail_node(child.node_id, f"child execution {message.child_id} (graph "
                                           f"{self.graph.nodes[child.node_id].static.get('graph')!r}) "
                                           f"failed: {message.error}")
        else:
            self._fail_node(child.node_id, f"child execution {message.child_id} was stopped: "
                                           f"{message.stop_reason}")

    def _on_child_committed(self, message: ChildCommitted) -> None:
        """The insert of a child's row failed: the child never existed."""
        child = self.children.get(message.child_id)
        if child is None:
            return
        child.ended = True
        _tell(child.ref, Halt(reason="its row was never written"))
        self.host.live.remove(message.child_id)
        if self.ending is not None:
            self.ending.child_gone(message.child_id)
            self._maybe_submit()
        else:
            self._fail_node(child.node_id, f"could not create child execution: {message.error}")

    def _on_write_failed(self, message: WriteFailed) -> None:
        self._fail_execution(f"a database write failed: {message.error}")

    def _deliver(self, node_id: str, outputs: Mapping[str, Any], recorded: bool = False) -> list[str]:
        """Mark a node done and pass its outputs along its links; return newly ready nodes."""
        state = self.nodes[node_id]
        state.status = NodeStatus.DONE
        state.handle = None
        if not recorded:
            self._ops.append(MoveNodes(execution_id=self.identity.execution_id, node_ids=(node_id,),
                                       target=ExecutionStatus.COMPLETED, at=utcnow()))
        ready = []
        for link in self.graph.nodes[node_id].outgoing:
            if link.source_port not in outputs:
                self._fail_execution(f"node {node_id!r} produced no output {link.source_port!r}")
                return []
            target = self.nodes[link.target]
            target.received[link.target_port] = outputs[link.source_port]
            if len(target.received) == len(self.graph.nodes[link.target].incoming):
                ready.append(link.target)
        return ready

    def _maybe_complete(self) -> None:
        if self.status is not ExecutionStatus.RUNNING or self.ending is not None or self.final_write is not None:
            return
        if any(state.status is not NodeStatus.DONE for state in self.nodes.values()):
            return
        try:
            outputs_json = dumps(self.outputs)
        except TypeError as exc:
            self._fail_execution(f"outputs cannot be stored: {exc}")
            return
        self.natural = NaturalEnd(status=ExecutionStatus.COMPLETED, outputs=dict(self.outputs), error=None)
        # This turn's writes (the last nodes' rows) and the final row: one submission.
        ops, self._ops = self._ops, []
        ops.append(MoveExecutions(ids=(self.identity.execution_id,), target=ExecutionStatus.COMPLETED,
                                  at=utcnow(), outputs_json=outputs_json))
        self._submit_final(ops)

    # -- failure -------------------------------------------------------------------

    def _fail_node(self, node_id: str, message: str, recorded: bool = False) -> None:
        node = self.graph.nodes[node_id]
        self.nodes[node_id].status = NodeStatus.DONE
        if not recorded:
            self._ops.append(MoveNodes(execution_id=self.identity.execution_id, node_ids=(node_id,),
                                       target=ExecutionStatus.FAILED, at=utcnow(), error=message))
        self._fail_execution(f"node {node_id!r} ({node.block}) failed: {message}")

    def _fail_execution(self, error: str) -> Ending | None:
        """Terminate what still runs under us first (up to failure_timeout), then write FAILED."""
        if self.ending is not None or self.final_write is not None:
            return self.ending
        self.log.info("failing: %s", error)
        return self._end(ExecutionStatus.FAILED, reason=f"execution {self.identity.execution_id} failed",
                         deadline=time.monotonic() + self.host.failure_timeout, error=error)

    # -- plumbing ---------------------------------------------------------------------

    def _flush(self) -> None:
        """Submit this turn's writes as one unit, without waiting for the commit."""
        if not self._ops:
            return
        ops, self._ops = self._ops, []
        begins, self._after_commit = self._after_commit, []
        write = self.host.store.submit(*ops)
        if begins:
            write.add_done_callback(lambda w: self._children_committed(w, begins))
        write.add_done_callback(self._check_write)

    def _children_committed(self, write: Promise[Any], children: list[tuple[pykka.ActorRef, str]]) -> None:
        """On the committing thread: tell each new child to begin (or ourselves that it could not)."""
        error = write.exception()
        for ref, child_id in children:
            if error is None:
                _tell(ref, Begin())
            else:
                self._tell_self(ChildCommitted(child_id=child_id, error=str(error)))

    def _check_write(self, write: Promise[Any]) -> None:
        error = write.exception()
        if error is not None:
            self.log.error("write failed: %s", error)
            self._tell_self(WriteFailed(error=str(error)))

    def _tell_self(self, message: Any) -> None:
        _tell(self.actor_ref, message)

    def _tell_parent(self, message: Any) -> None:
        if self.parent_ref is not None:
            _tell(self.parent_ref, message)

    def _tell_child(self, child: ChildState, message: Any) -> None:
        # A child whose actor already stopped has its ChildEnded in our
        # mailbox: the ending keeps waiting for it, and it comes.
        _tell(child.ref, message)


# Message type -> handler. One table for the class, not one per actor: bound
# methods in a per-actor dict were 13 of the 47 objects that every live
# execution adds for the garbage collector to walk (a full collection walks
# them all: about 0.3 s with an 11,111-execution tree live).
_HANDLERS: dict[type, Callable[[ExecutionActor, Any], Any]] = {
    Stop: ExecutionActor._on_stop,
    CascadeStop: ExecutionActor._on_cascade,
    NodeFinished: ExecutionActor._on_node_finished,
    ChildWriteQueued: ExecutionActor._on_child_write_queued,
    ChildEnded: ExecutionActor._on_child_ended,
    ChildContinues: ExecutionActor._on_child_continues,
    Begin: ExecutionActor._on_begin,
    ChildCommitted: ExecutionActor._on_child_committed,
    WriteFailed: ExecutionActor._on_write_failed,
    FinalCommitted: ExecutionActor._on_final_committed,
    DeadlinePassed: ExecutionActor._on_deadline,
    ForceSilent: ExecutionActor._on_force_silent,
    Halt: ExecutionActor._on_halt,
}
# What a broken execution handles (see ExecutionActor._salvage): its
# children's ends, its grace, its write's commit, stops (answered after it)
# and a lost lease. Any other message of _HANDLERS is ignored.
_SALVAGE_HANDLERS: dict[type, Callable[[ExecutionActor, Any], Any]] = {
    Stop: ExecutionActor._on_stop,
    ChildWriteQueued: ExecutionActor._on_salvage_child_write_queued,
    ChildEnded: ExecutionActor._on_salvage_child_ended,
    DeadlinePassed: ExecutionActor._on_salvage_grace,
    SalvageCommitted: ExecutionActor._on_salvage_committed,
    Halt: ExecutionActor._on_halt,
}


def _then(promise: Promise[Any], value: StopAck) -> Promise[StopAck]:
    """A promise of ``value`` once ``promise`` settles (its error, if it failed)."""
    answer: Promise[StopAck] = Promise()

    def settle(done: Promise[Any]) -> None:
        error = done.exception()
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(value)

    promise.add_done_callback(settle)
    return answer


def _forward(source: Promise[StopAck] | None, target: Promise[StopAck]) -> None:
    """Settle ``target`` as ``source`` settles."""
    if source is None:
        target.set_exception(DatabaseError("the execution ended without an acknowledgement"))
        return

    def settle(done: Promise[StopAck]) -> None:
        error = done.exception()
        if error is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    source.add_done_callback(settle)


def _tell_outcome(ref: pykka.ActorRef, answer: type[FinalCommitted], write: Promise[Any]) -> None:
    """On the committing thread: only a message to the actor whose final write (or salvage) this was."""
    error = write.exception()
    if error is not None:
        _tell(ref, answer(error=str(error)))
    else:
        _tell(ref, answer(results=tuple(write.result())))


def _tell(ref: pykka.ActorRef, message: Any) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        logger.debug("%s is gone; dropped %r", ref, message)


def _run_user_block(spec: BlockSpec, context: BlockContext, inputs: dict[str, Any]) -> NodeFinished:
    """On a pool thread: run the user's function, return what the actor should hear."""
    if context.stopped:
        return NodeFinished(node_id=context.node_id, error="stopped before it started")
    try:
        outputs = spec.fn(context, **inputs)  # type: ignore[misc]
        if outputs is None:
            outputs = {}
        if not isinstance(outputs, Mapping):
            raise NodeError(f"block {spec.name!r} returned {type(outputs).__name__}, not a dict")
        dumps(outputs)
        return NodeFinished(node_id=context.node_id, outputs=dict(outputs))
    except BaseException as exc:  # noqa: BLE001 - any block failure fails the node, by message
        # BaseException too: sys.exit() in a block raises SystemExit on this
        # pool thread. Whatever escapes here never reaches the actor (the
        # future's callback only logs it) and leaves the node RUNNING for good.
        return NodeFinished(node_id=context.node_id, error=_describe(exc))


def _describe(error: BaseException) -> str:
    """``Type: message``, even for an error whose message cannot be read (its ``__str__`` raises)."""
    try:
        return f"{type(error).__name__}: {error}"
    except Exception:  # noqa: BLE001 - the user's __str__: any error in it
        return f"{type(error).__name__} (its message could not be read)"
