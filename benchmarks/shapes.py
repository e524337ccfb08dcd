"""The shapes of the trees that the benchmark builds.

A shape is a list of fan-outs, one per level below the root: ``(4, 4, 4, 4, 4)``
is the root, then 4, 16, 64, 256 and 1,024 leaves. The runtime builds it from
one graph per level: every level's graph holds one ``agent`` node per child,
and the last level's graph holds one long ``sleep`` node, so that every
execution stays RUNNING until it is stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Long enough that no leaf ever ends on its own during a benchmark.
LEAF_SLEEP_SECONDS = 3600


@dataclass(frozen=True)
class Shape:
    """A tree: ``levels[i]`` is the fan-out of every execution at depth ``i``.

    Attributes:
        key: a short identifier, used for graph ids and database file names.
        title: how the shape is named in the report.
        levels: fan-out per level below the root (empty: a lone root).
    """

    key: str
    title: str
    levels: tuple[int, ...]

    @property
    def depth(self) -> int:
        """The number of levels below the root."""
        return len(self.levels)

    @property
    def count(self) -> int:
        """The number of executions (or floor actors) in the tree."""
        total, width = 1, 1
        for fan_out in self.levels:
            width *= fan_out
            total += width
        return total

    def graph_id(self, level: int) -> str:
        """The id of the graph that executions at depth ``level`` run."""
        return f"{self.key}_level_{level}"

    @property
    def root_graph(self) -> str:
        return self.graph_id(0)

    def graph_document(self) -> dict[str, Any]:
        """The graph file (as a dict) that ``rt.load`` takes: one graph per level."""
        graphs = {self.graph_id(level): _agents_graph(self.graph_id(level + 1), fan_out)
                  for level, fan_out in enumerate(self.levels)}
        graphs[self.graph_id(self.depth)] = _sleeping_leaf_graph()
        return {"graphs": graphs}


def tree(key: str, fan_out: int, depth: int) -> Shape:
    """A tree where every execution above the leaves has ``fan_out`` children."""
    return Shape(key, f"tree fan-out {fan_out} depth {depth}", (fan_out,) * depth)


def chain(key: str, executions: int) -> Shape:
    """A chain of ``executions`` executions, each the only child of the previous one."""
    return Shape(key, f"chain of {executions}", (1,) * (executions - 1))


def flat(key: str, children: int) -> Shape:
    """One parent with ``children`` leaf children."""
    return Shape(key, f"flat parent, {children} children", (children,))


def one_node_graph_document() -> dict[str, Any]:
    """A graph of a single ``value`` node, for start-to-COMPLETED throughput."""
    return {"graphs": {"one_value": {"nodes": {"v": {"block": "value", "input": {"value": 1}}}}}}


ONE_NODE_GRAPH = "one_value"


def _agents_graph(child_graph: str, fan_out: int) -> dict[str, Any]:
    agent = {"block": "agent", "input": {"graph": child_graph, "inputs": {}}}
    return {"nodes": {f"child_{index}": dict(agent) for index in range(fan_out)}}


def _sleeping_leaf_graph() -> dict[str, Any]:
    return {"nodes": {"nap": {"block": "sleep", "input": {"seconds": LEAF_SLEEP_SECONDS}}}}
