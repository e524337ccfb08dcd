"""run.py watch and tree --format, driven as subprocesses; the database read through a separate connection.

``watch`` runs in its own process, apart from the ``run`` process that hosts
the tree: piped, it prints one line per change, and each line is checked
against the database (order per execution, completeness, nothing printed
before its commit); under a pseudo-terminal it redraws the tree in colour.
"""
from __future__ import annotations

import copy
import datetime as dt
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.acceptance.conftest import GRAPHS, RUN_PY, CliProcess, kill_and_reap
from tests.acceptance.support import is_uuid, start_tree
from tests.helpers import as_datetime, wait_until
from tests.integration.graphs import leaf

WATCH_TIMEOUT = 90.0
UNREACHABLE_POSTGRES = "postgresql://postgres@127.0.0.1:1/x"
RANK = {"QUEUED": 0, "RUNNING": 1, "COMPLETED": 2, "FAILED": 2, "TERMINATED": 2}
ALLOWED = {None: {"QUEUED", "RUNNING"}, "QUEUED": {"RUNNING", "TERMINATED", "FAILED"},
           "RUNNING": {"COMPLETED", "FAILED", "TERMINATED"}}
EXIT = {"COMPLETED": 0, "FAILED": 1, "TERMINATED": 3}
LINE = re.compile(r'^(\S+) (\S+) (\S+) (QUEUED|RUNNING|COMPLETED|FAILED|TERMINATED)'
                  r'(?: error=("(?:[^"\\]|\\.)*"))?(?: reason=("(?:[^"\\]|\\.)*"))?$')
SGR = re.compile(rb"\x1b\[[0-9;]*m")
REDRAW = re.compile(rb"\x1b\[\d+F\x1b\[J")
# Leaves that end on their own soon after the watch subscribed (a 2-core machine
# starts the watch process in about a second), yet never block a test for long.
FIRST_LEAF, SECOND_LEAF = 2.0, 3.0


def _agent(graph: str, **inputs: Any) -> dict:
    return {"block": "agent", "input": {"graph": graph, "inputs": inputs}}


WATCH_GRAPHS = copy.deepcopy(GRAPHS)
WATCH_GRAPHS["graphs"].update({
    "leaf": leaf(),
    # 1 + 2 + 4 executions that all complete.
    "mid": {"nodes": {"a": _agent("leaf", seconds=FIRST_LEAF), "b": _agent("leaf", seconds=SECOND_LEAF)}},
    "nested": {"nodes": {"a": _agent("mid"), "b": _agent("mid")}},
    # A child that fails after a while, its sibling sleeps on: the root FAILS.
    "late_boom": {
        "nodes": {
            "nap": {"block": "sleep", "input": {"seconds": SECOND_LEAF, "value": "kaboom"}},
            "f": {"block": "fail"},
        },
        "links": [{"from": "nap.value", "to": "f.message"}],
    },
    "failing_parent": {"nodes": {"a": _agent("late_boom"), "b": _agent("leaf", seconds=300)}},
})


@pytest.fixture
def graphs_file(workdir: Path) -> str:
    (workdir / "watch_graphs.json").write_text(json.dumps(WATCH_GRAPHS, indent=2))
    return "watch_graphs.json"


@dataclass(frozen=True)
class Line:
    at: dt.datetime
    execution_id: str
    graph_id: str
    status: str
    error: str | None
    reason: str | None


def parse_line(text: str) -> Line:
    match = LINE.match(text)
    assert match, f"not a watch line: {text!r}"
    at = dt.datetime.fromisoformat(match.group(1))
    assert at.tzinfo is not None and at.utcoffset() == dt.timedelta(0), text
    error, reason = (json.loads(g) if g else None for g in match.group(5, 6))
    return Line(at, match.group(2), match.group(3), match.group(4), error, reason)


def watch_to_its_end(watch: CliProcess, observer, timeout: float = WATCH_TIMEOUT) -> tuple[int, list[Line]]:
    """Wait for the watch to exit; check every line, as soon as it is read, against the database.

    A status only moves forward, so a line whose status is ahead of its row
    would be a change printed before its commit.
    """
    checked = 0

    def step() -> bool:
        nonlocal checked
        exited = watch.popen.poll() is not None
        lines = list(watch.stdout_lines)
        for text in lines[checked:]:
            line = parse_line(text)
            row = observer.status(line.execution_id)
            assert row is not None and RANK[row] >= RANK[line.status], (
                f"{text!r} printed before its commit: the row is {row}\n{watch.describe()}")
        checked = len(lines)
        return exited

    wait_until(step, timeout, f"run.py {' '.join(watch.args)} to end")
    code = watch.wait()
    lines = [parse_line(text) for text in watch.stdout_lines]
    return code, lines


def check_feed(lines: list[Line], observer, root_id: str) -> dict[str, list[Line]]:
    """Every execution of the tree, each in order up to its terminal status as the database has it;
    the root's terminal status last. Returns the lines per execution."""
    rows = {row["id"]: row for row in observer.subtree(root_id)}
    per: dict[str, list[Line]] = {}
    for line in lines:
        per.setdefault(line.execution_id, []).append(line)
    assert set(per) == set(rows), f"watched {sorted(per)}, the tree holds {sorted(rows)}"
    for execution_id, seen in per.items():
        row = rows[execution_id]
        statuses = [line.status for line in seen]
        previous = None
        for status in statuses:
            assert status in ALLOWED[previous], f"{execution_id}: {statuses} is not a path of the status machine"
            previous = status
        assert statuses[-1] == row["status"], f"{execution_id}: watched {statuses}, the row is {row['status']}"
        assert {line.graph_id for line in seen} == {row["graph_id"]}
        times = [line.at for line in seen]
        assert times == sorted(times), f"{execution_id}: times go back: {times}"
        final = seen[-1]
        assert final.error == row["error"] and final.reason == row["stop_reason"], (final, row)
        assert all(line.error is None and line.reason is None for line in seen[:-1])
        ended = as_datetime(row["ended_at"])
        assert ended is not None and abs(final.at - ended) < dt.timedelta(milliseconds=1), (final, ended)
    last = lines[-1]
    assert (last.execution_id, last.status) == (root_id, rows[root_id]["status"])
    return per


def start_run(cli, graphs_file: str, graph: str) -> tuple[CliProcess, str]:
    run = cli.start("run", graphs_file, graph, "--user", "alice")
    root_id = run.first_line()
    assert is_uuid(root_id), run.describe()
    return run, root_id


# -- piped: one line per change ---------------------------------------------------------------------


def test_watch_follows_a_tree_hosted_by_another_process_to_completion(cli, observer, graphs_file):
    run, root_id = start_run(cli, graphs_file, "nested")

    watch = cli.start("watch", root_id)
    code, lines = watch_to_its_end(watch, observer)

    assert code == 0, watch.describe()
    assert run.wait() == 0, run.describe()
    per = check_feed(lines, observer, root_id)
    assert len(per) == 7
    assert {line.status for line in lines if line.execution_id in per} >= {"RUNNING", "COMPLETED"}
    assert watch.stderr == "", watch.describe()


def test_watch_of_a_tree_stopped_from_another_process_exits_3(cli, observer):
    run, root_id, rows = start_tree(cli, observer)
    watch = cli.start("watch", root_id)
    # The watch has caught up with the live tree (every execution RUNNING) before the stop.
    wait_until(lambda: sum(" RUNNING" in line for line in watch.stdout_lines) == len(rows)
               or watch.popen.poll() is not None, WATCH_TIMEOUT, "the watch to show the running tree")
    assert watch.popen.poll() is None, watch.describe()

    stop = cli.call("stop", root_id, "--user", "alice")
    code, lines = watch_to_its_end(watch, observer)

    assert stop.returncode == 0, stop.describe()
    assert code == 3, watch.describe()
    per = check_feed(lines, observer, root_id)
    assert {execution_id: seen[-1].status for execution_id, seen in per.items()} == {
        execution_id: "TERMINATED" for execution_id in rows}
    assert all(seen[-1].reason for seen in per.values()), "a TERMINATED line names its reason"
    assert run.wait() == 3, run.describe()


def test_watch_ends_with_its_execution_when_a_stop_without_cascade_leaves_children_running(cli, observer):
    run, root_id, rows = start_tree(cli, observer, graph="short_parent")
    children = set(rows) - {root_id}
    watch = cli.start("watch", root_id)
    wait_until(lambda: sum(" RUNNING" in line for line in watch.stdout_lines) == len(rows)
               or watch.popen.poll() is not None, WATCH_TIMEOUT, "the watch to show the running tree")

    stop = cli.call("stop", root_id, "--user", "alice", "--no-cascade")
    code, lines = watch_to_its_end(watch, observer)

    assert stop.returncode == 0, stop.describe()
    assert code == 3, watch.describe()
    assert (lines[-1].execution_id, lines[-1].status) == (root_id, "TERMINATED")
    assert [line for line in lines if line.execution_id == root_id][-1] == lines[-1]
    # The children were left running; the watch did not wait for their own end.
    assert {line.execution_id for line in lines} == set(rows)
    assert all(line.status in ("QUEUED", "RUNNING") for line in lines if line.execution_id in children)


def test_watch_of_a_failing_tree_exits_1_with_the_error(cli, observer, graphs_file):
    run, root_id = start_run(cli, graphs_file, "failing_parent")

    watch = cli.start("watch", root_id)
    code, lines = watch_to_its_end(watch, observer)

    assert code == 1, watch.describe()
    assert run.wait() == 1, run.describe()
    per = check_feed(lines, observer, root_id)
    finals = {observer.execution(eid)["graph_id"]: seen[-1] for eid, seen in per.items()}
    assert finals["failing_parent"].status == "FAILED" and "kaboom" in finals["failing_parent"].error
    assert finals["late_boom"].status == "FAILED" and "kaboom" in finals["late_boom"].error
    assert finals["leaf"].status == "TERMINATED"


@pytest.mark.parametrize("graph, args, status", [
    ("quick", (), "COMPLETED"),
    ("boom", (), "FAILED"),
    ("parent", ("--stop-after", "0.5"), "TERMINATED"),
])
def test_watch_of_a_finished_execution_prints_its_final_status_at_once(cli, observer, graph, args, status):
    run = cli.call("run", "graphs.json", graph, "--user", "alice", *args)
    assert run.returncode == EXIT[status], run.describe()
    root_id = run.stdout.splitlines()[0]
    before = observer.snapshot()

    watch = cli.call("watch", root_id, timeout=30)

    assert watch.returncode == EXIT[status], watch.describe()
    lines = [parse_line(text) for text in watch.stdout.splitlines()]
    check_feed(lines, observer, root_id)
    assert lines[-1].status == status
    assert observer.snapshot() == before, "watch changed a row"


def test_watch_of_a_child_follows_its_subtree_only(cli, observer):
    run, root_id, rows = start_tree(cli, observer)
    child = sorted(set(rows) - {root_id})[0]
    watch = cli.start("watch", child)
    wait_until(lambda: any(" RUNNING" in line for line in watch.stdout_lines) or watch.popen.poll() is not None,
               WATCH_TIMEOUT, "the watch of the child to show it running")

    stop = cli.call("stop", child, "--user", "alice")
    code, lines = watch_to_its_end(watch, observer)

    assert stop.returncode == 0, stop.describe()
    assert code == 3, watch.describe()
    check_feed(lines, observer, child)
    assert {line.execution_id for line in lines} == {child}


def test_watch_of_an_unknown_id_exits_5_at_once(cli, observer):
    seed = cli.call("run", "graphs.json", "quick", "--user", "alice")
    assert seed.returncode == 0, seed.describe()
    before = observer.snapshot()
    unknown = str(uuid.uuid4())

    watch = cli.call("watch", unknown, timeout=30)

    assert watch.returncode == 5, watch.describe()
    assert len(watch.stderr_lines) == 1 and unknown in watch.stderr, watch.describe()
    assert "Traceback" not in watch.stderr
    assert watch.stdout == ""
    assert observer.snapshot() == before


@pytest.mark.parametrize("args, db", [
    (("watch", str(uuid.UUID(int=1))), UNREACHABLE_POSTGRES),
    (("watch",), None),
    (("watch", str(uuid.UUID(int=1)), "--color", "sometimes"), None),
], ids=["unreachable database", "no id", "bad --color"])
def test_watch_bad_input_exits_2_with_one_line(cli, args, db):
    watch = cli.call(*args, db=db, timeout=30)

    assert watch.returncode == 2, watch.describe()
    assert len(watch.stderr_lines) == 1, watch.describe()
    assert "Traceback" not in watch.stderr


# -- on a terminal: the tree redrawn in place, coloured ---------------------------------------------


class PtyProcess:
    """``run.py`` with its stdout on a pseudo-terminal (80x50); stderr piped; killed in teardown."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.popen = subprocess.Popen([sys.executable, str(RUN_PY), *args], cwd=cwd, env=env,
                                      stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        self._master = master
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = b""

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            with self._lock:
                self._chunks.append(chunk)
        os.close(self._master)

    @property
    def output(self) -> bytes:
        with self._lock:
            return b"".join(self._chunks)

    def wait(self, timeout: float = WATCH_TIMEOUT) -> int:
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"watch under a terminal still running after {timeout}s:\n{self.output!r}")
        self.stderr = self.popen.stderr.read() if self.popen.stderr else b""
        self._reader.join(10)
        return code

    def kill(self) -> None:
        kill_and_reap(self.popen, [self._reader])
        if self.popen.stderr:
            self.popen.stderr.close()


@pytest.fixture
def pty_watch(cli) -> Iterator:
    started: list[PtyProcess] = []

    def start(execution_id: str, **env: str | None) -> PtyProcess:
        environ = {k: v for k, v in cli.env.items() if k not in ("NO_COLOR", "TERM")}
        environ["TERM"] = "xterm-256color"
        environ.update({k: v for k, v in env.items() if v is not None})
        process = PtyProcess(["watch", "--db", cli.database_url, execution_id], cli.cwd, environ)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.mark.parametrize("env, coloured", [({}, True), ({"NO_COLOR": "1"}, False)], ids=["colour", "NO_COLOR"])
def test_watch_on_a_terminal_redraws_the_tree_in_place(cli, observer, pty_watch, env, coloured):
    run, root_id, rows = start_tree(cli, observer)
    watch = pty_watch(root_id, **env)
    # The first drawing shows the running tree and its count per status.
    wait_until(lambda: b"RUNNING 3" in SGR.sub(b"", watch.output) or watch.popen.poll() is not None,
               WATCH_TIMEOUT, "the watch to draw the running tree")
    assert watch.popen.poll() is None, watch.output

    stop = cli.call("stop", root_id, "--user", "alice")

    assert stop.returncode == 0, stop.describe()
    assert watch.wait() == 3, (watch.output, watch.stderr)
    output = watch.output
    plain = SGR.sub(b"", output)
    assert REDRAW.search(output), f"no cursor-up and clear sequence: {output!r}"
    assert b"TERMINATED 3" in plain, "the final drawing counts the TERMINATED executions"
    for execution_id in rows:
        assert execution_id.encode() in plain
    if coloured:
        assert b"\x1b[33mRUNNING\x1b[0m" in output
        assert b"\x1b[35mTERMINATED\x1b[0m" in output
    else:
        assert not SGR.search(output), f"colour codes despite {env}: {output!r}"
    assert b"Traceback" not in watch.stderr
    assert run.wait() == 3, run.describe()


def test_watch_on_a_dumb_terminal_prints_plain_lines(cli, observer, pty_watch):
    run, root_id, rows = start_tree(cli, observer)
    watch = pty_watch(root_id, TERM="dumb")
    wait_until(lambda: watch.output.count(b" RUNNING") == len(rows) or watch.popen.poll() is not None,
               WATCH_TIMEOUT, "the watch to print the running tree")

    stop = cli.call("stop", root_id, "--user", "alice")

    assert stop.returncode == 0, stop.describe()
    assert watch.wait() == 3, (watch.output, watch.stderr)
    assert b"\x1b" not in watch.output, "a TERM=dumb terminal got escape codes"
    lines = [parse_line(text) for text in watch.output.decode().splitlines() if text.strip()]
    check_feed(lines, observer, root_id)
    assert run.wait() == 3, run.describe()


# -- tree --format ----------------------------------------------------------------------------------

NODE = re.compile(r'^    (e\d+)\["(.*)<br/>([A-Z]+)"\]:::([a-z]+)$')
EDGE = re.compile(r"^    (e\d+) --> (e\d+)$")
COMMENT = re.compile(r"^    %% (e\d+) = (\S+)$")
CLASSDEF = re.compile(r"^    classDef ([a-z]+) \S+$")


def test_tree_format_mermaid_draws_every_execution_and_parent_link(cli, observer, graphs_file):
    # Side by side: a tree that fails (FAILED and TERMINATED nodes) and a deeper one that completes.
    failing = cli.start("run", graphs_file, "failing_parent", "--user", "alice")
    nested = cli.start("run", graphs_file, "nested", "--user", "alice")
    assert failing.wait(WATCH_TIMEOUT) == 1, failing.describe()
    assert nested.wait(WATCH_TIMEOUT) == 0, nested.describe()

    for result in (failing, nested):
        root_id = result.stdout_lines[0]
        rows = {row["id"]: row for row in observer.subtree(root_id)}
        chart = cli.call("tree", root_id, "--format", "mermaid")
        assert chart.returncode == 0, chart.describe()
        lines = chart.stdout.splitlines()
        assert lines[0] == "flowchart TD", chart.describe()
        nodes, edges, ids, classes = {}, set(), {}, set()
        for line in lines[1:]:
            if match := NODE.match(line):
                nodes[match.group(1)] = match.group(2, 3, 4)
            elif match := EDGE.match(line):
                edges.add(match.group(1, 2))
            elif match := COMMENT.match(line):
                ids[match.group(1)] = match.group(2)
            elif match := CLASSDEF.match(line):
                classes.add(match.group(1))
            else:
                raise AssertionError(f"unexpected line {line!r}:\n{chart.stdout}")
        assert len(nodes) == len(rows) == len(ids) and set(nodes) == set(ids)
        assert sorted(ids.values()) == sorted(rows)
        names = {execution_id: name for name, execution_id in ids.items()}
        for name, (graph, status, klass) in nodes.items():
            row = rows[ids[name]]
            assert (graph, status, klass) == (row["graph_id"], row["status"], row["status"].lower())
            assert klass in classes
        assert edges == {(names[row["parent_id"]], names[row["id"]]) for row in rows.values()
                         if row["id"] != root_id}
        assert names[root_id] == "e0"
        assert cli.call("tree", root_id, "--format", "mermaid").stdout == chart.stdout, "not deterministic"


def test_tree_format_json_equals_json_and_text_is_the_default(cli, observer):
    run, root_id, rows = start_tree(cli, observer)

    as_json = cli.call("tree", root_id, "--json")
    as_format = cli.call("tree", root_id, "--format", "json")
    text = cli.call("tree", root_id)
    as_text = cli.call("tree", root_id, "--format", "text")
    coloured = cli.call("tree", root_id, "--color", "always")

    for result in (as_json, as_format, text, as_text, coloured):
        assert result.returncode == 0, result.describe()
    assert as_format.stdout == as_json.stdout
    assert as_format.json()["id"] == root_id
    assert as_text.stdout == text.stdout
    assert "\x1b[" not in text.stdout, "a pipe got escape codes"
    assert text.stdout.count("RUNNING") == len(rows)
    assert coloured.stdout.count("\x1b[33mRUNNING\x1b[0m") == len(rows)
    assert SGR.sub(b"", coloured.stdout.encode()).decode() == text.stdout


@pytest.mark.parametrize("args", [("--format", "svg"), ("--json", "--format", "mermaid")])
def test_tree_bad_format_exits_2_with_one_line(cli, args):
    result = cli.call("tree", str(uuid.UUID(int=1)), *args)

    assert result.returncode == 2, result.describe()
    assert len(result.stderr_lines) == 1, result.describe()
    assert "Traceback" not in result.stderr


def test_sigint_stops_watching_and_leaves_the_tree_running(cli, observer):
    run, root_id, rows = start_tree(cli, observer)
    watch = cli.start("watch", root_id)
    wait_until(lambda: sum(" RUNNING" in line for line in watch.stdout_lines) == len(rows)
               or watch.popen.poll() is not None, WATCH_TIMEOUT, "the watch to show the running tree")
    before = observer.snapshot()

    watch.send_signal(signal.SIGINT)

    assert watch.wait(30) == 3, watch.describe()
    assert watch.stderr_lines == ["interrupted"], watch.describe()
    assert observer.snapshot() == before, "watching changed the tree"
    assert run.popen.poll() is None, run.describe()


def test_a_reader_that_goes_away_stops_the_watch_quietly(cli, observer):
    """``run.py watch ID | head -1``: the watch ends (exit 3) without a traceback; the tree is untouched."""
    run, root_id, rows = start_tree(cli, observer)
    watch = subprocess.Popen([sys.executable, str(RUN_PY), "watch", "--db", cli.database_url, root_id],
                             cwd=cli.cwd, env=cli.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([watch.stdout], [], [], WATCH_TIMEOUT)
        assert ready, "the watch printed nothing"
        assert os.read(watch.stdout.fileno(), 4096)
        watch.stdout.close()  # the reader goes away; the next change cannot be written

        stop = cli.call("stop", root_id, "--user", "alice")

        assert stop.returncode == 0, stop.describe()
        assert watch.wait(timeout=WATCH_TIMEOUT) == 3
        stderr = watch.stderr.read().decode()
        assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    finally:
        if watch.poll() is None:
            watch.kill()
        watch.wait(timeout=10)
        watch.stderr.close()
    assert run.wait() == 3, run.describe()
