"""Graph dicts for the integration tests, built from the issue's examples.

Every sleeping node is called ``nap``, so a test can tell that an execution
reached its long-running work by finding a RUNNING ``nap`` row.
"""
from __future__ import annotations

from typing import Any

Graph = dict[str, Any]

# A sleep this long never ends during a test: only a stop ends it.
LONG = 60


def graphs(**named: Graph) -> dict[str, Any]:
    """The graph file structure ``{"graphs": {...}}`` for ``rt.load``."""
    return {"graphs": named}


def leaf() -> Graph:
    """The issue's ``leaf``: sleeps ``inputs["seconds"]`` and outputs ``slept``."""
    return {
        "nodes": {
            "in": {"block": "input", "input": {"name": "seconds"}},
            "nap": {"block": "sleep"},
            "out": {"block": "output", "input": {"name": "slept"}},
        },
        "links": [{"from": "in.value", "to": "nap.seconds"}, {"from": "nap.value", "to": "out.value"}],
    }


def sleeper(seconds: float = LONG, ignore_stop: bool = False, value: Any = None) -> Graph:
    """One ``sleep`` node with static inputs, its value sent to output ``value``."""
    nap: dict[str, Any] = {"seconds": seconds}
    if ignore_stop:
        nap["ignore_stop"] = True
    if value is not None:
        nap["value"] = value
    return {
        "nodes": {
            "nap": {"block": "sleep", "input": nap},
            "out": {"block": "output", "input": {"name": "value"}},
        },
        "links": [{"from": "nap.value", "to": "out.value"}],
    }


def agents(graph: str, count: int, inputs: dict[str, Any] | None = None) -> Graph:
    """``count`` agent nodes ``c0..c{count-1}``, each starting a child of ``graph``."""
    return {
        "nodes": {
            f"c{i}": {"block": "agent", "input": {"graph": graph, "inputs": dict(inputs or {})}}
            for i in range(count)
        }
    }


def parent(**children: tuple[str, dict[str, Any]]) -> Graph:
    """Agent nodes named by keyword: ``parent(a=("leaf", {"seconds": 30}))``."""
    return {
        "nodes": {
            name: {"block": "agent", "input": {"graph": graph, "inputs": inputs}}
            for name, (graph, inputs) in children.items()
        }
    }


def quick(value: Any = 42) -> Graph:
    """Completes at once with outputs ``{"answer": value}``."""
    return {
        "nodes": {
            "v": {"block": "value", "input": {"value": value}},
            "out": {"block": "output", "input": {"name": "answer"}},
        },
        "links": [{"from": "v.value", "to": "out.value"}],
    }


def failing(message: str = "boom") -> Graph:
    return {"nodes": {"f": {"block": "fail", "input": {"message": message}}}}


def held() -> Graph:
    """Runs the test's ``hold`` block (see tests.helpers.Gates) on ``inputs["key"]``."""
    return {
        "nodes": {
            "key": {"block": "input", "input": {"name": "key"}},
            "hold": {"block": "hold"},
            "out": {"block": "output", "input": {"name": "result"}},
        },
        "links": [{"from": "key.value", "to": "hold.key"}, {"from": "hold.value", "to": "out.value"}],
    }


def tree(fanout: int, depth: int, prefix: str = "level", seconds: float = LONG) -> dict[str, Graph]:
    """One graph per level: ``{prefix}_k`` has ``fanout`` agents starting ``{prefix}_{k+1}``.

    ``depth`` counts the levels below the root (graph ``{prefix}_0``); the
    last level sleeps ``seconds``. The tree holds ``tree_size(fanout, depth)``
    executions.
    """
    levels = {f"{prefix}_{k}": agents(f"{prefix}_{k + 1}", fanout) for k in range(depth)}
    levels[f"{prefix}_{depth}"] = sleeper(seconds)
    return levels


def tree_size(fanout: int, depth: int) -> int:
    return sum(fanout**k for k in range(depth + 1))
