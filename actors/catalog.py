"""The graphs and blocks a process knows, and the versions it stores.

A worker must run exactly the graph that was submitted, and a graph's
agents start other graphs by id. So the unit that is versioned and stored
is a *bundle*: a graph together with every graph its agents may start
(all known graphs, if one of its agents names its graph through a link
rather than statically). Its version is the SHA-256 of its canonical JSON,
so equal content is one stored row however often it is loaded. Every
execution of a tree runs its root's bundle and records its version.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping

from actors.blocks import BUILTIN_BLOCKS, BlockSpec, user_block
from actors.errors import InvalidGraph, InvalidInput
from actors.graphs import Graph, parse_graphs, read_graphs
from persistence import NotFound, Store, StoreGraphVersions, dumps, utcnow


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A graph and the graphs its agents may start, as one stored version."""

    version: str
    graph_id: str
    definition: str  # canonical JSON: {"graph": id, "graphs": {id: spec, ...}}
    graphs: Mapping[str, Graph]


class Catalog:
    """Blocks registered and graphs loaded in this process, with their bundles.

    Only the thread that owns the runtime or client (the caller of ``load``
    and ``register_block``) changes it; the worker's claim loop reads it,
    and every update replaces whole dicts, so a reader sees one state or the
    next, never half of one.
    """

    def __init__(self) -> None:
        self.blocks: dict[str, BlockSpec] = dict(BUILTIN_BLOCKS)
        self._specs: dict[str, Any] = {}
        self._graphs: dict[str, Graph] = {}
        self._bundles: dict[str, Bundle] = {}

    def register_block(self, name: str, fn: Callable[..., Mapping[str, Any]], inputs: Any = None,
                       outputs: Any = None) -> None:
        spec = user_block(name, fn, inputs, outputs)
        if name in self.blocks:
            raise InvalidGraph(f"block {name!r} is already registered")
        self.blocks = {**self.blocks, name: spec}

    def load(self, source: str | os.PathLike | Mapping[str, Any], store: Store) -> list[str]:
        """Validate a graph file (or dict), store its versions, then make its graphs known.

        Nothing changes, here or in the database, unless every graph is
        valid; the graphs become startable only once their versions are
        committed, so every execution's recorded version exists.
        """
        data = read_graphs(source)
        graphs = parse_graphs(data, self.blocks, frozenset(self._graphs))
        specs = {**self._specs, **{graph_id: data["graphs"][graph_id] for graph_id in graphs}}
        every = {**self._graphs, **graphs}
        # Every bundle again: a graph loaded earlier may start one loaded now.
        bundles = {graph_id: _bundle(graph_id, specs, every) for graph_id in every}
        store.write(StoreGraphVersions(
            versions=tuple((b.version, b.graph_id, b.definition) for b in bundles.values()), at=utcnow()))
        self._specs, self._graphs, self._bundles = specs, every, bundles
        return list(graphs)

    def bundle(self, graph_id: str) -> Bundle:
        bundle = self._bundles.get(graph_id)
        if bundle is None:
            raise NotFound(f"graph {graph_id!r} was never loaded")
        return bundle

    def stored_bundle(self, version: str, graph_id: str, definition: str) -> Bundle:
        """A bundle read back from the database; InvalidGraph if a block it needs is not registered here."""
        data = json.loads(definition)
        graphs = parse_graphs({"graphs": data["graphs"]}, self.blocks)
        if graph_id not in graphs:
            raise InvalidGraph(f"stored graph version {version} does not contain graph {graph_id!r}")
        return Bundle(version=version, graph_id=graph_id, definition=definition, graphs=graphs)


def check_inputs(inputs: Any) -> dict[str, Any]:
    """A root's inputs as a dict, if they are a mapping with string keys; else InvalidInput."""
    if not isinstance(inputs, Mapping) or not all(isinstance(key, str) for key in inputs):
        raise InvalidInput(f"inputs must be an object with string keys, not {inputs!r}")
    return dict(inputs)


def check_submission(bundle: Bundle, inputs: Any) -> str:
    """The inputs as stored JSON, if they fit the graph's ``input`` nodes; else InvalidInput."""
    inputs = check_inputs(inputs)
    graph = bundle.graphs[bundle.graph_id]
    wanted = {str(node.static["name"]) for node in graph.nodes.values()
              if node.block == "input" and "name" in node.static}
    missing, unknown = sorted(wanted - set(inputs)), sorted(set(inputs) - wanted)
    if missing or unknown:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
        raise InvalidInput(f"graph {bundle.graph_id!r} takes inputs {sorted(wanted)}: "
                           + ", ".join(problems))
    try:
        return dumps(dict(inputs))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"inputs of graph {bundle.graph_id!r} cannot be stored: {exc}") from exc


def _bundle(graph_id: str, specs: Mapping[str, Any], graphs: Mapping[str, Graph]) -> Bundle:
    members = _reachable(graph_id, graphs)
    document = {"graph": graph_id, "graphs": {member: specs[member] for member in sorted(members)}}
    definition = json.dumps(document, sort_keys=True, separators=(",", ":"))
    version = hashlib.sha256(definition.encode("utf-8")).hexdigest()
    return Bundle(version=version, graph_id=graph_id, definition=definition,
                  graphs={member: graphs[member] for member in members})


def _reachable(graph_id: str, graphs: Mapping[str, Graph]) -> set[str]:
    """The graph and every graph its agents may start, transitively (iterative)."""
    seen, todo = {graph_id}, [graph_id]
    while todo:
        for node in graphs[todo.pop()].nodes.values():
            if node.block != "agent":
                continue
            target = node.static.get("graph")
            if not isinstance(target, str):
                return set(graphs)  # named by a link: any known graph may run
            if target not in seen and target in graphs:
                seen.add(target)
                todo.append(target)
    return seen
