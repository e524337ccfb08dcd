"""The execution actor: one pykka actor per graph execution.

Its turns (on the runtime's dispatcher, see dispatch.py) only move data and
messages: it starts nodes (which run on the timers, the worker pool or as
child executions), takes their results by message, writes through the
store's writer without waiting, and answers ``Stop``. It never runs user
code and never blocks on its parent, so a ``Stop`` is handled as soon as it
arrives.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import logging
import threading
import time
import uuid
from typing import Any, Mapping

import pykka

from actors import blocks as builtin
from actors.blocks import BlockContext, BlockKind, BlockSpec, NodeError
from actors.deferred import DeferredReplyActor
from actors.host import Ended, Host
from actors.logs import ExecutionLog, Identity
from actors.messages import (
    Begin,
    CascadeStop,
    ChildCommitted,
    ChildEnded,
    NodeFinished,
    RetryStop,
    Stop,
    StopAck,
    WriteFailed,
)
from actors.supervision import Ending
from persistence import (
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

# How long a Stop may wait for its stop request to commit before it fails.
PERSIST_TIMEOUT = 30.0


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
    ended: bool = False


class ExecutionActor(DeferredReplyActor):
    def __init__(self, host: Host, identity: Identity, inputs: Mapping[str, Any], *,
                 parent_ref: pykka.ActorRef | None, parent_halted: threading.Event | None,
                 running: bool) -> None:
        super().__init__(host.dispatcher)
        self.host = host
        self.identity = identity
        self.inputs = dict(inputs)
        self.graph = host.graphs[identity.graph_id]
        self.parent_ref = parent_ref
        self.parent_halted = parent_halted
        # A root admitted at once is inserted RUNNING; everything else QUEUED.
        # Either way, nodes start only on Begin, sent once the actor is
        # registered as live and its row is committed.
        self.status = ExecutionStatus.RUNNING if running else ExecutionStatus.QUEUED
        self.started = False
        self._stopping = False
        # Set when this execution stops or fails: the spawn gate, and the
        # stop_event user blocks see.
        self.halted = threading.Event()
        self.nodes = {node_id: NodeState() for node_id in self.graph.nodes}
        self.children: dict[str, ChildState] = {}
        self.outputs: dict[str, Any] = {}
        self.ending: Ending | None = None
        # Resolved with the final status once it is committed.
        self.final: Promise[ExecutionStatus] | None = None
        self._ops: list[Operation] = []
        self._after_commit: list[Any] = []
        self.log = ExecutionLog(logger, identity)

    # -- pykka hooks ------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        try:
            if isinstance(message, Stop):
                return self._on_stop(message)
            if isinstance(message, CascadeStop):
                return self._on_cascade(message)
            if isinstance(message, NodeFinished):
                return self._on_node_finished(message)
            if isinstance(message, ChildEnded):
                return self._on_child_ended(message)
            if isinstance(message, Begin):
                return self._on_begin()
            if isinstance(message, ChildCommitted):
                return self._on_child_committed(message)
            if isinstance(message, WriteFailed):
                return self._fail_execution(f"a database write failed: {message.error}")
            if isinstance(message, RetryStop):
                return self._on_retry_stop(message)
            raise TypeError(f"execution actor got an unknown message {message!r}")
        finally:
            self._flush()
            self._stop_if_done()

    def _stop_if_done(self) -> None:
        """Stop this actor in its own turn once its final write is queued.

        Stopping from the same turn costs no extra message; what is left (the
        commit and the acknowledgement) runs on whichever thread commits, and
        a late Stop finds the ending in ``host.endings``.
        """
        if self._stopping or self.ending is None or not self.ending.write_queued:
            return
        self._stopping = True
        self.stop()

    def on_failure(self, *args: Any) -> None:
        self.log.error("actor failed", exc_info=args)

    # -- stop ---------------------------------------------------------------

    def _on_stop(self, stop: Stop) -> Promise[StopAck]:
        if stop.user_id != self.identity.user_id:
            raise PermissionDenied(
                f"user {stop.user_id!r} may not stop execution {self.identity.execution_id}: "
                "it belongs to another user")
        if self.final is not None:
            return self._already_final()
        if self.ending is not None:
            # A second stop while one is in progress gets the same answer.
            return self.ending.result
        self.log.info("stop requested (cascade=%s): %s", stop.cascade, stop.reason)
        self._flush()
        # Persist first: if this process dies mid-stop, recovery still ends
        # the subtree TERMINATED, because the request is on record.
        self.host.store.write(
            RequestStop(execution_id=self.identity.execution_id, reason=stop.reason,
                        cascade=stop.cascade, at=utcnow()),
            timeout=PERSIST_TIMEOUT)
        self._end(ExecutionStatus.TERMINATED, reason=stop.reason,
                  deadline=time.monotonic() + stop.wait_timeout, queued_only=not stop.cascade)
        return self.ending.result  # type: ignore[union-attr]

    def _on_cascade(self, stop: CascadeStop) -> None:
        if self.final is not None:
            self._already_final().add_done_callback(lambda f: stop.on_ack(f.result()))
            return
        if self.ending is None:
            if stop.queued_only and self.status is not ExecutionStatus.QUEUED:
                # A non-cascading stop above: a started child runs on to its own end.
                stop.on_ack(StopAck(execution_id=self.identity.execution_id))
                return
            self._end(ExecutionStatus.TERMINATED, reason=stop.reason, deadline=stop.deadline)
        ending = self.ending
        assert ending is not None
        if stop.on_queued is not None:
            ending.on_write_queued(stop.on_queued)
        ending.result.add_done_callback(lambda f: f.exception() is None and stop.on_ack(f.result()))

    def _already_final(self) -> Promise[StopAck]:
        """Already terminal (or its final write is in flight): acknowledge after that commit."""
        ack = StopAck(execution_id=self.identity.execution_id,
                      already_final=(self.identity.execution_id,))
        if self.final is None or self.final.done():
            return Promise.resolved(ack)
        answer: Promise[StopAck] = Promise()
        self.final.add_done_callback(lambda _: answer.set_result(ack))
        return answer

    def _end(self, status: ExecutionStatus, *, reason: str, deadline: float,
             error: str | None = None, queued_only: bool = False) -> None:
        """Close the spawn gate and hand the rest of the way to an ``Ending``."""
        self.halted.set()
        self._flush()
        self.ending = Ending(self, status=status, reason=reason, deadline=deadline, error=error)
        self.host.endings[self.identity.execution_id] = self.ending
        # An agent node ends with its child's acknowledgement, so the ending
        # waits for it as a child, not as a node. With queued_only (a stop
        # that does not cascade) running children are acknowledged at once
        # and run on; only a child that has not started yet is stopped.
        running = [n for n, state in self.nodes.items()
                   if state.status is NodeStatus.RUNNING and not isinstance(state.handle, str)]
        live = [c for c, child in self.children.items() if not child.ended]
        ended = [c for c, child in self.children.items() if child.ended]
        self.ending.begin(running, live, ended, queued_only=queued_only)

    def interrupt_node(self, node_id: str) -> bool:
        """Stop a running node at once if it can be; True if it is over."""
        state = self.nodes[node_id]
        handle = state.handle
        if handle is None:
            return True
        if isinstance(handle, concurrent.futures.Future):
            return handle.cancel()  # only if the pool had not started it
        if state.ignore_stop:
            return False
        handle.cancel()
        return True

    def tell_child(self, child_id: str, message: Any) -> None:
        try:
            self.children[child_id].ref.tell(message)
        except pykka.ActorDeadError:
            if isinstance(message, CascadeStop):
                answer_for_gone_actor(self.host, child_id, message)

    def ending_failed(self, ending: Ending, error: BaseException) -> None:
        """The final write failed: the error reaches the caller; a later stop may retry."""
        self.log.error("final write failed: %s", error)
        try:
            self.actor_ref.tell(RetryStop(ending=ending))
        except pykka.ActorDeadError:
            pass

    def ended(self, status: ExecutionStatus, *, error: str | None, stop_reason: str | None,
              persisted: bool, outputs: dict[str, Any] | None = None) -> None:
        """Called on the committing thread (the writer's, or a caller's holding its turn) after the final commit."""
        if not persisted:
            self.log.warning("row was already terminal in the database; %s not written", status.value)
        else:
            self.log.info("ended %s", status.value)
        self.host.on_ended(Ended(identity=self.identity, status=status, outputs=outputs,
                                 error=error, stop_reason=stop_reason))
        # A parent that is itself ending hears of us through our acknowledgement.
        if self.parent_ref is not None and not self.parent_halted.is_set():  # type: ignore[union-attr]
            _tell(self.parent_ref, ChildEnded(child_id=self.identity.execution_id, status=status,
                                              outputs=outputs, error=error, stop_reason=stop_reason))
        if self.final is None:
            self.final = Promise()
        if not self.final.done():
            self.final.set_result(status)
        if not self._stopping:
            self._stopping = True
            try:
                self.stop()  # a tell: the actor answers what is already in its inbox, then ends
            except pykka.ActorDeadError:
                pass

    # -- starting -------------------------------------------------------------

    def _on_begin(self) -> None:
        if self.started or self.ending is not None or self.final is not None:
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

    def _start_nodes(self, node_ids: Any) -> None:
        """Start ready nodes; inline ones may make more nodes ready, handled here too."""
        ready = list(node_ids)
        while ready and not self.halted.is_set():
            node_id = ready.pop(0)
            ready.extend(self._start_node(node_id))
        self._maybe_complete()

    def _start_node(self, node_id: str) -> list[str]:
        node = self.graph.nodes[node_id]
        state = self.nodes[node_id]
        spec = self.host.blocks[node.block]
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
        state.handle = self.host.timers.call_later(seconds, lambda: self._tell_self(finished))

    def _start_pool(self, node_id: str, spec: BlockSpec, inputs: Mapping[str, Any]) -> None:
        context = BlockContext(self.identity.execution_id, self.identity.user_id, node_id, self.halted)
        future = self.host.pool.submit(_run_user_block, spec, context, dict(inputs))
        future.add_done_callback(lambda f: None if f.cancelled() else self._tell_self(f.result()))
        self.nodes[node_id].handle = future

    def _start_child(self, node_id: str, inputs: Mapping[str, Any]) -> None:
        graph_id = inputs.get("graph")
        child_inputs = inputs.get("inputs", {})
        depth = self.identity.depth + 1
        if graph_id not in self.host.graphs:
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
            runtime_id=self.host.runtime_id, created_at=utcnow(), started_at=None, inputs_json=inputs_json))
        ref = ExecutionActor.start(self.host, identity, child_inputs, parent_ref=self.actor_ref,
                                   parent_halted=self.halted, running=False)
        self.host.live.add(identity, ref)
        self.children[identity.execution_id] = ChildState(ref=ref, node_id=node_id)
        self.nodes[node_id].handle = identity.execution_id
        self._after_commit.append((ref, identity.execution_id))
        self.log.debug("spawned child %s of graph %s", identity.execution_id, graph_id)

    # -- results ----------------------------------------------------------------

    def _on_node_finished(self, message: NodeFinished) -> None:
        state = self.nodes[message.node_id]
        if state.status is not NodeStatus.RUNNING:
            return
        if self.ending is not None or self.final is not None:
            # Late result of work cut short by a stop: discarded.
            state.status = NodeStatus.DONE
            if self.ending is not None:
                self.ending.node_ended(message.node_id)
            return
        if message.error is not None:
            self._fail_node(message.node_id, message.error)
            return
        self._start_nodes(self._deliver(message.node_id, message.outputs or {}))

    def _on_child_ended(self, message: ChildEnded) -> None:
        child = self.children.get(message.child_id)
        if child is None:
            return
        child.ended = True
        if self.ending is not None or self.final is not None:
            return  # our own stop counts the child through its acknowledgement
        state = self.nodes[child.node_id]
        if state.status is not NodeStatus.RUNNING:
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
        child = self.children.get(message.child_id)
        if child is None or message.error is None:
            return
        child.ended = True
        child.ref.stop(block=False)
        self.host.live.remove(message.child_id)
        if self.ending is None and self.final is None:
            self._fail_node(child.node_id, f"could not create child execution: {message.error}")

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
        if self.status is not ExecutionStatus.RUNNING or self.ending is not None or self.final is not None:
            return
        if any(state.status is not NodeStatus.DONE for state in self.nodes.values()):
            return
        try:
            outputs_json = dumps(self.outputs)
        except TypeError as exc:
            self._fail_execution(f"outputs cannot be stored: {exc}")
            return
        self._finish(ExecutionStatus.COMPLETED, MoveExecutions(
            ids=(self.identity.execution_id,), target=ExecutionStatus.COMPLETED, at=utcnow(),
            outputs_json=outputs_json))

    def _finish(self, status: ExecutionStatus, final_op: MoveExecutions) -> None:
        """Natural end (nothing runs any more): one write, then tell whoever listens."""
        self.final = Promise()
        self._ops.append(final_op)
        outputs = dict(self.outputs)

        def committed(write: Promise) -> None:
            if write.exception() is not None:
                self.log.error("final write failed: %s", write.exception())
                self.final.set_exception(write.exception())  # type: ignore[union-attr]
                return
            persisted = bool(write.result()[-1])
            self.ended(status, error=final_op.error, stop_reason=None, persisted=persisted, outputs=outputs)

        self._flush(committed)

    # -- failure -------------------------------------------------------------------

    def _fail_node(self, node_id: str, message: str, recorded: bool = False) -> None:
        node = self.graph.nodes[node_id]
        self.nodes[node_id].status = NodeStatus.DONE
        if not recorded:
            self._ops.append(MoveNodes(execution_id=self.identity.execution_id, node_ids=(node_id,),
                                       target=ExecutionStatus.FAILED, at=utcnow(), error=message))
        self._fail_execution(f"node {node_id!r} ({node.block}) failed: {message}")

    def _fail_execution(self, error: str) -> None:
        """Terminate what still runs under us first, then write FAILED."""
        if self.ending is not None or self.final is not None:
            return
        self.log.info("failing: %s", error)
        self._end(ExecutionStatus.FAILED, reason=f"execution {self.identity.execution_id} failed",
                  deadline=time.monotonic() + self.host.failure_timeout, error=error)

    # -- plumbing ---------------------------------------------------------------------

    def _flush(self, on_commit: Any = None) -> None:
        """Submit this turn's writes as one unit, without waiting for the commit."""
        if not self._ops:
            return
        ops, self._ops = self._ops, []
        begins, self._after_commit = self._after_commit, []
        write = self.host.store.submit(*ops)
        if begins:
            write.add_done_callback(lambda w: self._children_committed(w, begins))
        if on_commit is not None:
            write.add_done_callback(on_commit)
        elif self.final is None:
            write.add_done_callback(self._check_write)

    def _children_committed(self, write: Promise, children: list) -> None:
        error = write.exception()
        for ref, child_id in children:
            if error is None:
                _tell(ref, Begin())
            else:
                self._tell_self(ChildCommitted(child_id=child_id, error=str(error)))

    def _check_write(self, write: Promise) -> None:
        if write.exception() is not None:
            self.log.error("write failed: %s", write.exception())
            self._tell_self(WriteFailed(error=str(write.exception())))

    def _tell_self(self, message: Any) -> None:
        _tell(self.actor_ref, message)

    def _on_retry_stop(self, message: RetryStop) -> None:
        if self.ending is message.ending:
            self.ending = None


def answer_for_gone_actor(host: Host, execution_id: str, stop: CascadeStop) -> None:
    """A stop for an execution whose actor already stopped: its ending (or the database) answers."""
    ending = host.endings.get(execution_id)
    if ending is None:
        # Its final write committed: its row is terminal, all a stop needs.
        stop.on_ack(StopAck(execution_id=execution_id, already_final=(execution_id,)))
        return
    if stop.on_queued is not None:
        ending.on_write_queued(stop.on_queued)
    ending.result.add_done_callback(lambda f: f.exception() is None and stop.on_ack(f.result()))


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
    except Exception as exc:  # noqa: BLE001 - any block failure fails the node, by message
        return NodeFinished(node_id=context.node_id, error=f"{type(exc).__name__}: {exc}")
