"""Graph validation at load, without a database: every problem named by graph and node."""
from __future__ import annotations

import json

import pytest

from actors import InvalidGraph
from actors.blocks import BUILTIN_BLOCKS, user_block
from actors.graphs import parse_graphs, read_graphs

ISSUE_EXAMPLE = {
    "graphs": {
        "leaf": {
            "nodes": {
                "in": {"block": "input", "input": {"name": "seconds"}},
                "nap": {"block": "sleep"},
                "out": {"block": "output", "input": {"name": "slept"}},
            },
            "links": [{"from": "in.value", "to": "nap.seconds"}, {"from": "nap.value", "to": "out.value"}],
        },
        "parent": {
            "nodes": {
                "a": {"block": "agent", "input": {"graph": "leaf", "inputs": {"seconds": 30}}},
                "b": {"block": "agent", "input": {"graph": "leaf", "inputs": {"seconds": 30}}},
            }
        },
    }
}


def noop(ctx, **inputs):
    return {}


BLOCKS = {
    **BUILTIN_BLOCKS,
    "declared": user_block("declared", noop, inputs=("x",), outputs=("y",)),
    "loose": user_block("loose", noop),
}


def parse(graphs, known=frozenset()):
    return parse_graphs({"graphs": graphs}, BLOCKS, known)


def one_node(block, **static):
    return {"nodes": {"n": {"block": block, "input": static}}}


def test_the_issue_example_is_valid():
    graphs = parse_graphs(ISSUE_EXAMPLE, BLOCKS)

    assert set(graphs) == {"leaf", "parent"}
    leaf = graphs["leaf"]
    assert leaf.roots == ("in",)
    assert [(l.source, l.source_port) for l in leaf.nodes["nap"].incoming] == [("in", "value")]
    assert set(graphs["parent"].roots) == {"a", "b"}


def test_a_graph_may_start_itself():
    graphs = parse({"rec": {"nodes": {"again": {"block": "agent", "input": {"graph": "rec"}}}}})
    assert set(graphs) == {"rec"}


def test_an_agent_may_name_a_graph_loaded_before():
    graphs = parse({"p": {"nodes": {"a": {"block": "agent", "input": {"graph": "old"}}}}}, frozenset({"old"}))
    assert set(graphs) == {"p"}


def test_undeclared_ports_of_a_user_block_are_not_checked():
    graphs = parse({
        "g": {"nodes": {"v": {"block": "value", "input": {"value": 1}}, "u": {"block": "loose"}},
              "links": [{"from": "v.value", "to": "u.anything"}]}
    })
    assert graphs["g"].nodes["u"].incoming[0].target_port == "anything"


INVALID = {
    "unknown block": ({"g1": one_node("teleport")}, ["g1", "'n'", "teleport"]),
    "link to unknown node": (
        {"g1": {"nodes": {"v": {"block": "value", "input": {"value": 1}}},
                "links": [{"from": "v.value", "to": "ghost.value"}]}},
        ["g1", "ghost"],
    ),
    "link from unknown node": (
        {"g1": {"nodes": {"o": {"block": "output", "input": {"name": "x"}}},
                "links": [{"from": "ghost.value", "to": "o.value"}]}},
        ["g1", "ghost"],
    ),
    "link to unknown input port": (
        {"g1": {"nodes": {"v": {"block": "value", "input": {"value": 1}}, "s": {"block": "sleep", "input": {"seconds": 1}}},
                "links": [{"from": "v.value", "to": "s.nope"}]}},
        ["g1", "'s'", "nope"],
    ),
    "link from unknown output port": (
        {"g1": {"nodes": {"v": {"block": "value", "input": {"value": 1}}, "o": {"block": "output", "input": {"name": "x"}}},
                "links": [{"from": "v.nope", "to": "o.value"}]}},
        ["g1", "'v'", "nope"],
    ),
    "link to undeclared port of a user block": (
        {"g1": {"nodes": {"v": {"block": "value", "input": {"value": 1}}, "u": {"block": "declared"}},
                "links": [{"from": "v.value", "to": "u.missing"}]}},
        ["g1", "'u'", "missing"],
    ),
    "link not of the form node.port": (
        {"g1": {"nodes": {"v": {"block": "value", "input": {"value": 1}}}, "links": [{"from": "v", "to": "v.value"}]}},
        ["g1"],
    ),
    "two-node cycle": (
        {"g1": {"nodes": {"a": {"block": "value"}, "b": {"block": "value"}},
                "links": [{"from": "a.value", "to": "b.value"}, {"from": "b.value", "to": "a.value"}]}},
        ["g1", "cycle", "'a'", "'b'"],
    ),
    "self loop": (
        {"g1": {"nodes": {"a": {"block": "sleep", "input": {"seconds": 1}}},
                "links": [{"from": "a.value", "to": "a.value"}]}},
        ["g1", "cycle", "'a'"],
    ),
    "agent naming an unknown graph": (
        {"g1": {"nodes": {"a": {"block": "agent", "input": {"graph": "nowhere"}}}}},
        ["g1", "'a'", "nowhere"],
    ),
    "agent inputs not an object": (
        {"g1": {"nodes": {"a": {"block": "agent", "input": {"graph": "g1", "inputs": [1]}}}}},
        ["g1", "'a'", "inputs"],
    ),
    "required input missing": ({"g1": one_node("sleep")}, ["g1", "'n'", "seconds"]),
    "input given twice": (
        {"g1": {"nodes": {"v": {"block": "value", "input": {"value": 1}}, "s": {"block": "sleep", "input": {"seconds": 1}}},
                "links": [{"from": "v.value", "to": "s.seconds"}]}},
        ["g1", "'s'", "seconds"],
    ),
    "static input the block does not have": ({"g1": one_node("value", value=1, extra=2)}, ["g1", "'n'", "extra"]),
    "graph without nodes": ({"g1": {"links": []}}, ["g1", "nodes"]),
    "empty nodes": ({"g1": {"nodes": {}}}, ["g1", "nodes"]),
    "graph not an object": ({"g1": ["n"]}, ["g1"]),
    "node without block": ({"g1": {"nodes": {"n": {"input": {}}}}}, ["g1", "'n'", "block"]),
    "node input not an object": ({"g1": {"nodes": {"n": {"block": "value", "input": 3}}}}, ["g1", "'n'", "input"]),
    "links not a list": ({"g1": {"nodes": {"n": {"block": "value", "input": {"value": 1}}}, "links": {}}}, ["g1", "links"]),
    "link without to": (
        {"g1": {"nodes": {"n": {"block": "value", "input": {"value": 1}}}, "links": [{"from": "n.value"}]}},
        ["g1", "link"],
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_graph_is_rejected_with_a_message_naming_it(case):
    graphs, names = INVALID[case]

    with pytest.raises(InvalidGraph) as invalid:
        parse(graphs)

    message = str(invalid.value)
    for name in names:
        assert name in message, (case, message)


@pytest.mark.parametrize(
    "data", [[], "graphs", {}, {"graph": {}}, {"graphs": []}, {"graphs": {}}, None],
    ids=["list", "string", "empty", "misspelt", "graphs-list", "graphs-empty", "none"],
)
def test_malformed_top_level_structure_is_rejected(data):
    with pytest.raises(InvalidGraph) as invalid:
        parse_graphs(data, BLOCKS)
    assert "graphs" in str(invalid.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(InvalidGraph) as invalid:
        parse({"first": one_node("teleport"), "second": one_node("warp"), "fine": one_node("value", value=1)})

    message = str(invalid.value)
    assert "first" in message and "teleport" in message
    assert "second" in message and "warp" in message


def test_read_graphs_accepts_a_dict_and_a_path(tmp_path):
    path = tmp_path / "graphs.json"
    path.write_text(json.dumps(ISSUE_EXAMPLE))

    assert read_graphs(ISSUE_EXAMPLE) is ISSUE_EXAMPLE
    assert read_graphs(str(path)) == ISSUE_EXAMPLE
    assert read_graphs(path) == ISSUE_EXAMPLE


@pytest.mark.parametrize("content", ['{"graphs": {"x": ', "not json", ""])
def test_malformed_json_file_is_invalid_graph_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_text(content)

    with pytest.raises(InvalidGraph) as invalid:
        read_graphs(str(path))

    assert "broken.json" in str(invalid.value)


def test_missing_file_is_invalid_graph(tmp_path):
    with pytest.raises(InvalidGraph) as invalid:
        read_graphs(str(tmp_path / "absent.json"))
    assert "absent.json" in str(invalid.value)


@pytest.mark.parametrize("name", ["sleep", "agent", ""])
def test_builtin_or_empty_block_names_cannot_be_registered(name):
    with pytest.raises(InvalidGraph):
        user_block(name, noop)


def test_a_block_must_be_callable():
    with pytest.raises(InvalidGraph) as invalid:
        user_block("thing", "not callable")  # type: ignore[arg-type]
    assert "thing" in str(invalid.value)
