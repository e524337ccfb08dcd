"""Blocks: what a node does.

Built-in blocks never run user code on the actor thread:
- ``input``, ``output``, ``value`` and ``fail`` are pure data moves the
  execution actor evaluates itself, in constant time;
- ``sleep`` is a timer entry (no thread is held while it sleeps);
- ``agent`` starts a child execution and completes when the child ends.
Every user-registered block runs on the runtime's worker pool and reports
back by message, so the actor stays free to handle a ``Stop``.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Iterable, Mapping

from actors.errors import InvalidGraph
from actors.flag import Flag


class BlockKind(enum.Enum):
    INLINE = "inline"
    SLEEP = "sleep"
    AGENT = "agent"
    POOL = "pool"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSpec:
    """A block's name, its ports and how it runs.

    ``inputs``/``outputs`` left as None mean "undeclared": links to or from
    such a block are not checked. ``required`` inputs must be linked or given.
    """

    name: str
    kind: BlockKind
    inputs: frozenset[str] | None
    outputs: frozenset[str] | None
    required: frozenset[str] = frozenset()
    fn: Callable[..., Mapping[str, Any]] | None = None


class BlockContext:
    """What a user block sees of its execution.

    Attributes:
        execution_id, user_id, node_id: where the block runs.
        stop_event: set when the execution stops; long work should check it
            (``is_set()``) or wait on it (``wait(timeout)``), as on a
            ``threading.Event``.
    """

    def __init__(self, execution_id: str, user_id: str, node_id: str, stop_event: Flag) -> None:
        self.execution_id = execution_id
        self.user_id = user_id
        self.node_id = node_id
        self.stop_event = stop_event

    def sleep(self, seconds: float) -> bool:
        """Sleep cooperatively; True if the full time passed, False if a stop cut it short."""
        return not self.stop_event.wait(max(0.0, float(seconds)))

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()


def _ports(block: str, kind: str, names: Any) -> frozenset[str] | None:
    """Declared port names: None (undeclared), or an iterable of non-empty strings.

    A bare string is refused: ``inputs="url"`` would declare ports u, r and l.
    """
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise InvalidGraph(f"block {block!r}: {kind} must be a list of port names, not {names!r}")
    ports = tuple(names)
    bad = [name for name in ports if not isinstance(name, str) or not name]
    if bad:
        raise InvalidGraph(f"block {block!r}: {kind} port names must be non-empty strings, not {bad!r}")
    return frozenset(ports)


BUILTIN_BLOCKS: dict[str, BlockSpec] = {
    "input": BlockSpec(name="input", kind=BlockKind.INLINE, inputs=frozenset({"name"}),
                       outputs=frozenset({"value"}), required=frozenset({"name"})),
    "output": BlockSpec(name="output", kind=BlockKind.INLINE, inputs=frozenset({"name", "value"}),
                        outputs=frozenset(), required=frozenset({"name", "value"})),
    "value": BlockSpec(name="value", kind=BlockKind.INLINE, inputs=frozenset({"value"}),
                       outputs=frozenset({"value"}), required=frozenset({"value"})),
    "fail": BlockSpec(name="fail", kind=BlockKind.INLINE, inputs=frozenset({"message"}),
                      outputs=frozenset()),
    "sleep": BlockSpec(name="sleep", kind=BlockKind.SLEEP, inputs=frozenset({"seconds", "value", "ignore_stop"}),
                       outputs=frozenset({"value"}), required=frozenset({"seconds"})),
    "agent": BlockSpec(name="agent", kind=BlockKind.AGENT, inputs=frozenset({"graph", "inputs"}),
                       outputs=frozenset({"outputs"}), required=frozenset({"graph"})),
}


def user_block(name: str, fn: Callable[..., Mapping[str, Any]], inputs: Any = None,
               outputs: Any = None) -> BlockSpec:
    """Validate a user block registration and describe it."""
    if not isinstance(name, str) or not name:
        raise InvalidGraph(f"block name must be a non-empty string, not {name!r}")
    if name in BUILTIN_BLOCKS:
        raise InvalidGraph(f"block {name!r} is built in and cannot be replaced")
    if not callable(fn):
        raise InvalidGraph(f"block {name!r}: {fn!r} is not callable")
    return BlockSpec(name=name, kind=BlockKind.POOL, inputs=_ports(name, "inputs", inputs),
                     outputs=_ports(name, "outputs", outputs), fn=fn)


def run_inline(block: str, inputs: Mapping[str, Any], execution_inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate a pure built-in block. Raises ``NodeError`` for a failing node."""
    if block == "input":
        name = inputs["name"]
        if name not in execution_inputs:
            raise NodeError(f"input {name!r} was not given")
        return {"value": execution_inputs[name]}
    if block == "value":
        return {"value": inputs["value"]}
    if block == "output":
        return {}
    if block == "fail":
        raise NodeError(str(inputs.get("message", "failed")))
    raise AssertionError(f"{block} is not an inline block")


def sleep_seconds(inputs: Mapping[str, Any]) -> float:
    try:
        seconds = float(inputs["seconds"])
    except (TypeError, ValueError) as exc:
        raise NodeError(f"sleep needs a number of seconds, got {inputs['seconds']!r}") from exc
    if seconds < 0 or seconds != seconds:
        raise NodeError(f"sleep needs a non-negative number of seconds, got {seconds}")
    return seconds


class NodeError(Exception):
    """A node failed; the message becomes the node's and the execution's error."""
