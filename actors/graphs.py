"""Graph loading and validation: everything is checked before anything runs.

The format (JSON file or dict)::

    {"graphs": {"<graph id>": {
        "nodes": {"<node id>": {"block": "<block>", "input": {"<port>": <static value>}}},
        "links": [{"from": "<node>.<port>", "to": "<node>.<port>"}]}}}
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from actors.blocks import BlockSpec
from actors.errors import InvalidGraph


@dataclasses.dataclass(frozen=True)
class Link:
    source: str
    source_port: str
    target: str
    target_port: str


@dataclasses.dataclass(frozen=True)
class Node:
    id: str
    block: str
    static: Mapping[str, Any]
    # Links arriving at this node's input ports; the node starts when all have delivered.
    incoming: tuple[Link, ...]
    outgoing: tuple[Link, ...]


@dataclasses.dataclass(frozen=True)
class Graph:
    id: str
    nodes: Mapping[str, Node]

    @property
    def roots(self) -> tuple[str, ...]:
        """Nodes with no linked input: ready as soon as the execution starts."""
        return tuple(node.id for node in self.nodes.values() if not node.incoming)


def read_graphs(source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """Parse a graph file (or accept a dict) without validating it yet."""
    if isinstance(source, Mapping):
        return source
    try:
        with open(source, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise InvalidGraph(f"graph file {os.fspath(source)!r} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise InvalidGraph(f"graph file {os.fspath(source)!r} is not valid JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidGraph(f"cannot read graph file {os.fspath(source)!r}: {exc}") from exc


def validate_graphs(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Graph]:
    """Check a graph file (or dict) against the built-in blocks, without a runtime.

    Graphs that use user-registered blocks need ``Runtime.load`` instead.
    """
    from actors.blocks import BUILTIN_BLOCKS

    return parse_graphs(read_graphs(source), BUILTIN_BLOCKS)


def parse_graphs(data: Any, blocks: Mapping[str, BlockSpec],
                 known_graphs: frozenset[str] = frozenset()) -> dict[str, Graph]:
    """Validate every graph in ``data`` and build them; raise one InvalidGraph listing all problems."""
    if not isinstance(data, Mapping) or not isinstance(data.get("graphs"), Mapping):
        raise InvalidGraph('a graph file must be an object with a "graphs" object')
    if not data["graphs"]:
        raise InvalidGraph('"graphs" is empty: nothing to load')
    problems: list[str] = []
    graphs: dict[str, Graph] = {}
    for graph_id, spec in data["graphs"].items():
        graph = _parse_graph(str(graph_id), spec, blocks, problems)
        if graph is not None:
            graphs[graph.id] = graph
    every_graph = known_graphs | set(graphs)
    for graph in graphs.values():
        _check_agents(graph, every_graph, problems)
    if problems:
        raise InvalidGraph("invalid graph definition: " + "; ".join(problems))
    return graphs


def _parse_graph(graph_id: str, spec: Any, blocks: Mapping[str, BlockSpec],
                 problems: list[str]) -> Graph | None:
    where = f"graph {graph_id!r}"
    if not isinstance(spec, Mapping) or not isinstance(spec.get("nodes"), Mapping) or not spec["nodes"]:
        problems.append(f'{where}: needs a non-empty "nodes" object')
        return None
    links_spec = spec.get("links", [])
    if not isinstance(links_spec, list):
        problems.append(f'{where}: "links" must be a list')
        return None
    unknown_keys = set(spec) - {"nodes", "links", "description"}
    if unknown_keys:
        problems.append(f"{where}: unknown keys {sorted(unknown_keys)}")
    before = len(problems)
    raw_nodes = {str(node_id): _parse_node(where, str(node_id), node, blocks, problems)
                 for node_id, node in spec["nodes"].items()}
    links = [_parse_link(where, i, link, raw_nodes, blocks, problems) for i, link in enumerate(links_spec)]
    if len(problems) > before:
        return None
    valid_links = [link for link in links if link is not None]
    _check_inputs(where, raw_nodes, valid_links, blocks, problems)
    _check_acyclic(where, raw_nodes, valid_links, problems)
    if len(problems) > before:
        return None
    nodes = {}
    for node_id, parsed in raw_nodes.items():
        assert parsed is not None  # a node that did not parse added a problem above
        block, static = parsed
        nodes[node_id] = Node(
            id=node_id, block=block, static=static,
            incoming=tuple(l for l in valid_links if l.target == node_id),
            outgoing=tuple(l for l in valid_links if l.source == node_id),
        )
    return Graph(id=graph_id, nodes=nodes)


def _parse_node(where: str, node_id: str, node: Any, blocks: Mapping[str, BlockSpec],
                problems: list[str]) -> tuple[str, dict[str, Any]] | None:
    here = f"{where} node {node_id!r}"
    if not isinstance(node, Mapping) or not isinstance(node.get("block"), str):
        problems.append(f'{here}: needs a "block" name')
        return None
    block = node["block"]
    static = node.get("input", {})
    if block not in blocks:
        problems.append(f"{here}: unknown block {block!r} (known: {', '.join(sorted(blocks))})")
        return None
    if not isinstance(static, Mapping):
        problems.append(f'{here}: "input" must be an object')
        return None
    declared = blocks[block].inputs
    if declared is not None and set(static) - declared:
        problems.append(f"{here}: block {block!r} has no input {sorted(set(static) - declared)}")
        return None
    return block, dict(static)


def _parse_link(where: str, index: int, link: Any, nodes: Mapping[str, Any],
                blocks: Mapping[str, BlockSpec], problems: list[str]) -> Link | None:
    here = f"{where} link #{index}"
    if not isinstance(link, Mapping) or not isinstance(link.get("from"), str) or not isinstance(link.get("to"), str):
        problems.append(f'{here}: needs "from" and "to" as "node.port"')
        return None
    ends = []
    for end, direction in ((link["from"], "outputs"), (link["to"], "inputs")):
        node_id, dot, port = end.rpartition(".")
        if not dot or not node_id or not port:
            problems.append(f"{here}: {end!r} is not of the form node.port")
            return None
        if node_id not in nodes:
            problems.append(f"{here}: {end!r} names unknown node {node_id!r}")
            return None
        if nodes[node_id] is None:
            return None
        ports = getattr(blocks[nodes[node_id][0]], direction)
        if ports is not None and port not in ports:
            kind = "output" if direction == "outputs" else "input"
            problems.append(f"{here}: node {node_id!r} (block {nodes[node_id][0]!r}) has no {kind} port {port!r}")
            return None
        ends.append((node_id, port))
    (source, source_port), (target, target_port) = ends
    return Link(source, source_port, target, target_port)


def _check_inputs(where: str, nodes: Mapping[str, Any], links: list[Link],
                  blocks: Mapping[str, BlockSpec], problems: list[str]) -> None:
    for node_id, (block, static) in nodes.items():
        linked = [l.target_port for l in links if l.target == node_id]
        doubled = {port for port in linked if linked.count(port) > 1 or port in static}
        if doubled:
            problems.append(f"{where} node {node_id!r}: input {sorted(doubled)} is given more than once")
        missing = blocks[block].required - set(static) - set(linked)
        if missing:
            problems.append(f"{where} node {node_id!r}: block {block!r} needs input {sorted(missing)}")


def _check_acyclic(where: str, nodes: Mapping[str, Any], links: list[Link], problems: list[str]) -> None:
    """Kahn's algorithm: whatever cannot be ordered sits on a cycle."""
    indegree = {node_id: 0 for node_id in nodes}
    for link in links:
        indegree[link.target] += 1
    ready = [node_id for node_id, degree in indegree.items() if degree == 0]
    while ready:
        node_id = ready.pop()
        for link in links:
            if link.source == node_id:
                indegree[link.target] -= 1
                if indegree[link.target] == 0:
                    ready.append(link.target)
    cyclic = sorted(node_id for node_id, degree in indegree.items() if degree > 0)
    if cyclic:
        problems.append(f"{where}: links form a cycle through nodes {cyclic}")


def _check_agents(graph: Graph, known: frozenset[str] | set[str], problems: list[str]) -> None:
    for node in graph.nodes.values():
        if node.block != "agent" or "graph" not in node.static:
            continue
        target = node.static["graph"]
        if not isinstance(target, str) or target not in known:
            problems.append(f"graph {graph.id!r} node {node.id!r}: agent names unknown graph {target!r}")
        inputs = node.static.get("inputs", {})
        if not isinstance(inputs, Mapping):
            problems.append(f"graph {graph.id!r} node {node.id!r}: agent \"inputs\" must be an object")
