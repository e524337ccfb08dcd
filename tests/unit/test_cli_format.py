"""run.py's pure formatting: colour rules (NO_COLOR, TERM=dumb, pipes), mermaid, change lines, the tree view."""
from __future__ import annotations

import datetime as dt
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

import run
from actors import ActorGraphError, ExecutionStatus

ESC = "\x1b["
SGR = re.compile(r"\x1b\[[0-9;]*m")
NODE = re.compile(r'^    (e\d+)\["(.*)<br/>(.*)"\]:::([a-z_]+)$')
EDGE = re.compile(r"^    (e\d+) --> (e\d+)$")
COMMENT = re.compile(r"^    %% (e\d+) = (.*)$")
CLASSDEF = re.compile(r"^    classDef ([a-z_]+) \S+$")


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def node(id_: str, graph_id: str, status: str, *children: dict[str, Any],
         parent_id: str | None = None) -> dict[str, Any]:
    kids = [dict(child, parent_id=id_) for child in children]
    return {"id": id_, "graph_id": graph_id, "status": status, "parent_id": parent_id, "children": kids}


TREE = node("r", "root", "RUNNING",
            node("a", "mid", "COMPLETED", node("a1", "leaf", "COMPLETED"), node("a2", "leaf", "FAILED")),
            node("b", "mid", "QUEUED"),
            node("c", "leaf", "TERMINATED"))


# -- colour rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tty, env, expected", [
    (True, {}, True),
    (True, {"TERM": "xterm-256color"}, True),
    (True, {"NO_COLOR": "1"}, False),
    (True, {"NO_COLOR": "anything"}, False),
    (True, {"NO_COLOR": ""}, True),          # set but empty: no-color.org says colour
    (True, {"TERM": "dumb"}, False),
    (False, {}, False),                      # a pipe never gets escape codes
    (False, {"TERM": "xterm"}, False),
])
def test_auto_colours_only_a_colour_terminal(tty, env, expected):
    assert run.use_color(FakeStream(tty), "auto", env) is expected


def test_the_color_flag_overrides_the_environment_and_the_stream():
    assert run.use_color(FakeStream(False), "always", {"NO_COLOR": "1", "TERM": "dumb"}) is True
    assert run.use_color(FakeStream(True), "never", {}) is False


def test_auto_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.delenv("TERM", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    assert run.use_color(FakeStream(True)) is False
    monkeypatch.delenv("NO_COLOR")
    assert run.use_color(FakeStream(True)) is True


def test_a_stream_that_is_no_terminal_or_closed_is_not_coloured():
    closed = io.StringIO()
    closed.close()
    assert run.use_color(closed, "auto", {}) is False
    assert run.use_color(object(), "auto", {}) is False


def test_each_status_has_its_own_colour_and_plain_text_is_untouched():
    codes = {status: run.paint(status, True) for status in run.STATUS_ORDER}
    assert len(set(codes.values())) == len(run.STATUS_ORDER)
    for status, text in codes.items():
        assert text.startswith(ESC) and text.endswith(f"{status}\x1b[0m")
        assert run.paint(status, False) == status
    assert run.paint("RUNNING", True) == "\x1b[33mRUNNING\x1b[0m"
    assert run.paint("COMPLETED", True) == "\x1b[32mCOMPLETED\x1b[0m"
    assert run.paint("FAILED", True) == "\x1b[31mFAILED\x1b[0m"
    assert run.paint("TERMINATED", True) == "\x1b[35mTERMINATED\x1b[0m"
    assert run.paint("SOMETHING", True) == "SOMETHING"


def test_tree_lines_colour_every_status_only_when_asked():
    plain = run.tree_lines(TREE)
    coloured = run.tree_lines(TREE, color=True)
    assert not any(ESC in line for line in plain)
    assert [SGR.sub("", line) for line in coloured] == plain
    assert all(line.endswith("\x1b[0m") for line in coloured)
    assert plain == [
        "root r RUNNING",
        "|-- mid a COMPLETED",
        "|   |-- leaf a1 COMPLETED",
        "|   `-- leaf a2 FAILED",
        "|-- mid b QUEUED",
        "`-- leaf c TERMINATED",
    ]


def test_summary_counts_in_the_order_of_the_status_machine():
    assert run.summary(TREE) == "QUEUED 1, RUNNING 1, COMPLETED 2, FAILED 1, TERMINATED 1"
    assert SGR.sub("", run.summary(TREE, color=True)) == run.summary(TREE)
    assert run.count_statuses(TREE) == {"RUNNING": 1, "COMPLETED": 2, "FAILED": 1, "QUEUED": 1, "TERMINATED": 1}


# -- mermaid --------------------------------------------------------------------------------------


def parse_mermaid(text: str) -> tuple[dict[str, tuple[str, str, str]], list[tuple[str, str]], dict[str, str], set[str]]:
    """(name -> (label graph, label status, class), edges, name -> execution id, classDefs)."""
    lines = text.split("\n")
    assert lines[0] == "flowchart TD"
    nodes: dict[str, tuple[str, str, str]] = {}
    edges: list[tuple[str, str]] = []
    ids: dict[str, str] = {}
    classes: set[str] = set()
    for line in lines[1:]:
        for pattern in (NODE, EDGE, COMMENT, CLASSDEF):
            match = pattern.match(line)
            if match:
                break
        else:
            raise AssertionError(f"unexpected mermaid line {line!r}")
        if pattern is NODE:
            assert match.group(1) not in nodes
            nodes[match.group(1)] = (match.group(2), match.group(3), match.group(4))
        elif pattern is EDGE:
            edges.append((match.group(1), match.group(2)))
        elif pattern is COMMENT:
            ids[match.group(1)] = match.group(2)
        else:
            classes.add(match.group(1))
    return nodes, edges, ids, classes


def test_mermaid_is_a_flowchart_with_one_node_per_execution_and_one_edge_per_parent_link():
    text = run.mermaid(TREE)
    nodes, edges, ids, classes = parse_mermaid(text)

    by_id = {each["id"]: each for each in run.walk(TREE)}
    assert sorted(ids.values()) == sorted(by_id)
    assert set(nodes) == set(ids)
    for name, (graph, status, klass) in nodes.items():
        execution = by_id[ids[name]]
        assert (graph, status) == (execution["graph_id"], execution["status"])
        assert klass == status.lower()
    names = {execution_id: name for name, execution_id in ids.items()}
    expected_edges = [(names[p["id"]], names[c["id"]]) for p in run.walk(TREE) for c in p["children"]]
    assert edges == expected_edges
    assert classes == {status.lower() for status in run.STATUS_ORDER}
    # Parents first, children in the order the tree gives: e0 is the root.
    assert ids["e0"] == "r"
    assert [ids[f"e{i}"] for i in range(len(ids))] == ["r", "a", "a1", "a2", "b", "c"]


def test_mermaid_is_deterministic():
    assert run.mermaid(TREE) == run.mermaid(json.loads(json.dumps(TREE)))


def test_mermaid_escapes_labels():
    tricky = node('x"1', 'say "hi" <b>#1</b> & `go`\\ é', "RUNNING")
    text = run.mermaid(tricky)
    nodes, _, ids, _ = parse_mermaid(text)
    (graph, status, _), = nodes.values()
    assert status == "RUNNING"
    assert '"' not in graph and "<" not in graph and ">" not in graph and "`" not in graph
    assert "\\" not in graph
    assert graph == "say #34;hi#34; #60;b#62;#35;1#60;/b#62; #38; #96;go#96;#92; #233;"
    assert ids["e0"] == "x#34;1"
    # Entities decode back to the graph id.
    assert re.sub(r"#(\d+);", lambda m: chr(int(m.group(1))), graph) == 'say "hi" <b>#1</b> & `go`\\ é'


def test_mermaid_of_a_single_execution_has_no_edge():
    nodes, edges, _, _ = parse_mermaid(run.mermaid(node("only", "quick", "COMPLETED")))
    assert list(nodes.values()) == [("quick", "COMPLETED", "completed")]
    assert edges == []


# -- change lines ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    execution_id: str
    graph_id: str
    status: Any
    at: dt.datetime
    error: str | None = None
    stop_reason: str | None = None
    parent_id: str | None = None
    root_id: str = "r"


AT = dt.datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)


def test_a_change_line_is_time_id_graph_status():
    line = run.change_line(Change("e1", "leaf", ExecutionStatus.RUNNING, AT))
    assert line == "2025-01-02T03:04:05.678+00:00 e1 leaf RUNNING"


def test_a_change_line_stays_one_line_whatever_the_error_and_reason_hold():
    error = 'node "f" failed:\nkaboom'
    line = run.change_line(Change("e1", "boom", ExecutionStatus.FAILED, AT, error=error, stop_reason="a b"))
    assert "\n" not in line
    head, rest = line.split(" error=", 1)
    assert head == "2025-01-02T03:04:05.678+00:00 e1 boom FAILED"
    error_json, reason_json = rest.split(" reason=", 1)
    assert json.loads(error_json) == error
    assert json.loads(reason_json) == "a b"


def test_a_change_line_is_coloured_only_when_asked():
    change = Change("e1", "leaf", "TERMINATED", AT, stop_reason="stopped by user")
    assert ESC not in run.change_line(change)
    coloured = run.change_line(change, color=True)
    assert "\x1b[35mTERMINATED\x1b[0m" in coloured
    assert SGR.sub("", coloured) == run.change_line(change)


# -- the live tree view ---------------------------------------------------------------------------


def test_the_view_redraws_in_place_on_a_terminal():
    stream = FakeStream(True)
    view = run.TreeView(stream, color=True, title="watch r ")
    view.show(TREE, 0.5)
    first = stream.getvalue()
    assert "\x1b[J" not in first and not re.search(r"\x1b\[\d+F", first)
    assert first.startswith("\x1b[?7l") and first.endswith("\x1b[?7h")
    drawn = len(run.tree_lines(TREE)) + 1
    view.show(TREE, 1.0)
    second = stream.getvalue()[len(first):]
    assert second.startswith(f"\x1b[?7l\x1b[{drawn}F\x1b[J")
    assert "watch r [  1.0s] " in SGR.sub("", second)
    assert "\x1b[33mRUNNING\x1b[0m" in second


def test_the_view_cuts_the_drawing_to_the_terminal_height():
    class Short(run.TreeView):
        def _rows(self) -> int:
            return 4

    stream = FakeStream(True)
    view = Short(stream)
    view.show(TREE, 0.0)
    view.show(TREE, 0.1)
    body = stream.getvalue().split("\x1b[?7h")
    first = body[0].removeprefix("\x1b[?7l").rstrip("\n").split("\n")
    assert len(first) == 3 and first[-1] == "... 5 more lines"
    assert body[1].startswith("\x1b[?7l\x1b[3F\x1b[J")


def test_the_view_prints_plain_summary_lines_when_piped():
    stream = FakeStream(False)
    view = run.TreeView(stream, color=False)
    view.show(TREE, 2.0)
    view.show(TREE, 2.5)
    assert stream.getvalue().splitlines() == [
        "[  2.0s] QUEUED 1, RUNNING 1, COMPLETED 2, FAILED 1, TERMINATED 1",
        "[  2.5s] QUEUED 1, RUNNING 1, COMPLETED 2, FAILED 1, TERMINATED 1",
    ]


# -- following changes ----------------------------------------------------------------------------


class FakeClient:
    """``changes`` plays one script per call: changes, then TimeoutError or the end of the feed."""

    def __init__(self, *calls: tuple[list[Change], bool]) -> None:
        self.calls = list(calls)
        self.timeouts: list[float] = []

    def changes(self, execution_id: str, timeout: float) -> Iterator[Change]:
        self.timeouts.append(timeout)
        items, times_out = self.calls.pop(0)
        yield from items
        if times_out:
            raise TimeoutError(f"{execution_id} not terminal after {timeout}s")


def _c(execution_id: str, status: str) -> Change:
    return Change(execution_id, "g", ExecutionStatus(status), AT)


def test_follow_subscribes_again_after_a_timeout_and_skips_what_it_repeats():
    client = FakeClient(
        ([_c("r", "RUNNING"), _c("a", "QUEUED")], True),
        ([_c("r", "RUNNING"), _c("a", "QUEUED"), _c("a", "RUNNING")], True),
        ([], True),
        ([_c("r", "RUNNING"), _c("a", "QUEUED"), _c("a", "RUNNING"), _c("a", "COMPLETED"),
          _c("r", "COMPLETED"), _c("late", "RUNNING")], False),
    )
    seen = [(c.execution_id, c.status.value) for c in run.follow(client, "r", call_timeout=0.5)]
    assert seen == [("r", "RUNNING"), ("a", "QUEUED"), ("a", "RUNNING"), ("a", "COMPLETED"), ("r", "COMPLETED")]
    assert client.timeouts == [0.5] * 4


def test_follow_reports_a_feed_that_ends_before_the_terminal_status():
    client = FakeClient(([_c("r", "RUNNING")], False))
    with pytest.raises(ActorGraphError, match="ended before its terminal status"):
        list(run.follow(client, "r"))
