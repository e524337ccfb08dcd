"""``run.py serve`` over HTTP: the list, escaping, the stop POST's token and ownership, the event stream.

The server runs as a subprocess (``--port 0``); trees run in other ``run.py
run`` processes; the tests read the database through their own connection
(the ``observer``), never through the server.
"""
from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from tests.acceptance.conftest import CliProcess
from tests.acceptance.support import start_tree
from tests.helpers import assert_stays, wait_until

HTTP_TIMEOUT = 30.0
EVIL_USER = '<script>alert("user")</script>'
EVIL_GRAPH = "<img src=x onerror=alert(1)>"


@dataclass
class Response:
    code: int
    headers: Any
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class Event:
    at: float
    kind: str
    data: Any


@dataclass
class EventStream:
    """An SSE response read by a thread: every event with the monotonic time it arrived."""

    response: Any
    events: list[Event] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        kind, data = "message", ""
        try:
            for raw in iter(self.response.readline, b""):
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: "):
                    data = line[len("data: "):]
                elif not line and data:
                    self.events.append(Event(time.monotonic(), kind, json.loads(data)))
                    kind, data = "message", ""
        except OSError:
            pass
        finally:
            self.closed.set()

    def of(self, kind: str) -> list[Event]:
        return [event for event in list(self.events) if event.kind == kind]

    def close(self) -> None:
        self.response.close()


class Page:
    """The running server, driven with urllib."""

    def __init__(self, process: CliProcess, base: str) -> None:
        self.process = process
        self.base = base
        self.streams: list[EventStream] = []

    def request(self, path: str, data: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Response:
        body = None if data is None else urlencode(data).encode()
        request = urllib.request.Request(self.base + path.lstrip("/"), data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                return Response(response.status, response.headers, response.read().decode())
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.headers, exc.read().decode())

    def get(self, path: str, **headers: str) -> Response:
        return self.request(path, headers=headers)

    def stop(self, fields: dict[str, str]) -> Response:
        return self.request("/stop", fields, {"Accept": "application/json"})

    def token(self, run_id: str) -> str:
        page = self.get(f"/runs/{run_id}")
        assert page.code == 200, page.text
        match = re.search(r'<script type="application/json" id="config">(.*?)</script>', page.text)
        assert match, page.text
        return json.loads(match[1])["token"]

    def events(self, run_id: str) -> EventStream:
        response = urllib.request.urlopen(self.base + f"runs/{run_id}/events", timeout=HTTP_TIMEOUT)
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        stream = EventStream(response)
        self.streams.append(stream)
        return stream


class _Rows(HTMLParser):
    """The text of every table body cell, row by row (entities decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def runs(page: Page, query: str = "") -> list[dict[str, str]]:
    """The list page's rows as dicts (graph, user, status, created, id)."""
    response = page.get("/" + query)
    assert response.code == 200, response.text
    parser = _Rows()
    parser.feed(response.text)
    rows = [row for row in parser.rows if len(row) == 5]
    return [dict(zip(("graph", "user", "status", "created", "id"), row)) for row in rows]


@pytest.fixture
def page(cli) -> Page:
    process = cli.start("serve", "--port", "0")
    line = process.first_line()
    match = re.fullmatch(r"serving (http://127\.0\.0\.1:(\d+)/)", line)
    assert match and int(match[2]) > 0, f"unexpected first line {line!r}:\n{process.describe()}"
    server = Page(process, match[1])
    yield server
    for stream in server.streams:
        stream.close()


def run_to_end(cli, graphs: str, graph: str, user: str) -> str:
    result = cli.call("run", graphs, graph, "--user", user)
    assert result.returncode in (0, 1), result.describe()
    return result.stdout.splitlines()[0]


def test_the_list_shows_roots_newest_first_filtered_by_user_and_status(cli, page, observer):
    completed = run_to_end(cli, "graphs.json", "quick", "alice")
    failed = run_to_end(cli, "graphs.json", "boom", "bob")
    _, running, _ = start_tree(cli, observer, "parent", 3, user="alice")

    everything = runs(page)
    assert [row["id"] for row in everything] == [running, failed, completed], "roots only, newest first"
    assert [(row["graph"], row["user"], row["status"]) for row in everything] == [
        ("parent", "alice", "RUNNING"), ("boom", "bob", "FAILED"), ("quick", "alice", "COMPLETED")]
    assert [row["id"] for row in runs(page, "?user=alice")] == [running, completed]
    assert [row["id"] for row in runs(page, "?status=FAILED")] == [failed]
    assert [row["id"] for row in runs(page, "?user=alice&status=COMPLETED")] == [completed]
    assert runs(page, "?user=nobody") == []
    assert page.get("/?status=SLEEPING").code == 400


def test_every_value_is_escaped(cli, page, workdir):
    (workdir / "odd.json").write_text(json.dumps({"graphs": {EVIL_GRAPH: {"nodes": {
        "f": {"block": "fail", "input": {"message": "<b>boom</b> & </script>"}}}}}}))
    root = run_to_end(cli, "odd.json", EVIL_GRAPH, EVIL_USER)

    listing = page.get("/?user=" + quote(EVIL_USER))
    run_page = page.get(f"/runs/{root}")
    assert listing.code == run_page.code == 200
    for response in (listing, run_page):
        assert "<script>alert" not in response.text and "<img" not in response.text
        assert "&lt;script&gt;alert(&quot;user&quot;)&lt;/script&gt;" in response.text
        assert "&lt;img src=x onerror=alert(1)&gt;" in response.text
    assert [(row["graph"], row["user"]) for row in runs(page, "?user=" + quote(EVIL_USER))] == [(EVIL_GRAPH, EVIL_USER)]
    # The filter field echoes the query, escaped.
    assert 'value="&lt;script&gt;alert(&quot;user&quot;)&lt;/script&gt;"' in listing.text

    # Values that come back in error pages are escaped too, and the page's
    # embedded JSON cannot end its <script> element.
    evil_id = '</script><script>alert("id")</script>'
    for path in (f"/runs/{quote(evil_id, safe='')}", "/?status=" + quote(evil_id)):
        response = page.get(path)
        assert response.code in (400, 404)
        assert "<script>alert" not in response.text
        assert "&lt;/script&gt;&lt;script&gt;alert(&quot;id&quot;)" in response.text
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", run_page.text, re.S)
    assert len(scripts) == 2, "the config JSON and the page's script, nothing else"
    assert "Content-Security-Policy" in run_page.headers


def test_a_stop_without_the_token_is_refused_and_changes_nothing(cli, page, observer):
    _, root, _ = start_tree(cli, observer, "parent", 3, user="alice")
    token = page.token(root)
    before = observer.snapshot()

    for fields in ({"execution_id": root, "user_id": "alice", "cascade": "1"},
                   {"execution_id": root, "user_id": "alice", "cascade": "1", "token": token[:-1] + "x"},
                   {"execution_id": root, "user_id": "alice", "cascade": "1", "token": ""}):
        response = page.stop(fields)
        assert response.code == 403, response.text
        assert "token" in response.json()["error"]
    # A stop is never a GET, even with the right token.
    assert page.get(f"/stop?execution_id={root}&user_id=alice&token={token}").code == 405
    # A page of another origin (DNS rebinding) is refused before anything else.
    assert page.request("/stop", {"execution_id": root, "user_id": "alice", "token": token},
                        {"Host": "attacker.example:80"}).code == 403

    assert_stays(lambda: observer.snapshot() == before, 1.0, "the tree's rows unchanged")
    assert set(observer.subtree_statuses(root).values()) == {"RUNNING"}


def test_a_stop_of_another_users_execution_is_refused_and_changes_nothing(cli, page, observer):
    _, root, rows = start_tree(cli, observer, "parent", 3, user="alice")
    token = page.token(root)
    child = next(execution_id for execution_id in rows if execution_id != root)
    before = observer.snapshot()

    denied = page.stop({"execution_id": child, "user_id": "mallory", "cascade": "1", "token": token})
    assert denied.code == 403, denied.text
    assert "mallory" in denied.json()["error"]
    assert page.stop({"execution_id": "no-such-id", "user_id": "alice", "token": token}).code == 404
    assert page.stop({"execution_id": root, "user_id": "", "token": token}).code == 400
    assert page.stop({"execution_id": "", "user_id": "alice", "token": token}).code == 400

    assert_stays(lambda: observer.snapshot() == before, 1.0, "the tree's rows unchanged")


def test_a_stop_terminates_the_subtree_in_the_database(cli, page, observer):
    process, root, rows = start_tree(cli, observer, "parent", 3, user="alice")
    token = page.token(root)

    response = page.stop({"execution_id": root, "user_id": "alice", "cascade": "1", "token": token})
    assert response.code == 200, response.text
    assert sorted(response.json()["terminated"]) == sorted(rows)
    # Client.stop returns once the subtree is terminal in the database.
    assert observer.subtree_statuses(root) == {execution_id: "TERMINATED" for execution_id in rows}
    assert process.wait() == 3, process.describe()
    assert runs(page)[0]["status"] == "TERMINATED"


def test_a_stop_without_cascade_leaves_the_children_running(cli, page, observer):
    _, root, rows = start_tree(cli, observer, "parent", 3, user="alice")
    token = page.token(root)
    stream = page.events(root)
    wait_until(lambda: {e.data["execution_id"] for e in stream.of("status")} == set(rows), 10.0, "the histories")

    # A plain form post (no JSON asked for) is answered with a redirect to the run's page.
    response = page.request("/stop", {"execution_id": root, "user_id": "alice", "token": token})
    assert response.code == 200 and f"/runs/{root}" in response.text  # urllib followed the 303
    statuses = observer.subtree_statuses(root)
    assert statuses.pop(root) == "TERMINATED"
    assert set(statuses.values()) == {"RUNNING"}
    # The page keeps following the children that run on.
    wait_until(lambda: any(e.data["status"] == "TERMINATED" for e in stream.of("status")), 10.0, "the root's end")
    assert_stays(lambda: not stream.closed.is_set() and not stream.of("end"), 1.0, "the stream open")


def test_the_event_stream_follows_a_tree_running_elsewhere(cli, page, observer):
    _, root, rows = start_tree(cli, observer, "parent", 3, user="alice")
    stream = page.events(root)

    first = wait_until(lambda: stream.events, 10.0, "the first event")[0]
    assert first.kind == "tree"
    assert first.data["id"] == root and first.data["status"] == "RUNNING"
    assert {child["id"] for child in first.data["children"]} == set(rows) - {root}
    # The watch delivers each execution's history, in order, ending RUNNING.
    wait_until(lambda: {e.data["execution_id"] for e in stream.of("status")} == set(rows), 10.0, "the histories")
    for execution_id in rows:
        history = [e.data["status"] for e in stream.of("status") if e.data["execution_id"] == execution_id]
        assert history in (["RUNNING"], ["QUEUED", "RUNNING"]), history

    # Stopped by yet another process: the server only watches.
    stopper = cli.start("stop", root, "--user", "alice")
    seen_in_db: dict[str, float] = {}

    def all_terminated_in_db() -> bool:
        for execution_id, status in observer.subtree_statuses(root).items():
            if status == "TERMINATED":
                seen_in_db.setdefault(execution_id, time.monotonic())
        return len(seen_in_db) == len(rows)

    wait_until(all_terminated_in_db, 30.0, "the tree TERMINATED in the database")
    assert stopper.wait() == 0, stopper.describe()
    assert stream.closed.wait(10.0), "the stream ends after the run's end"
    ended = {e.data["execution_id"]: e for e in stream.of("status") if e.data["status"] == "TERMINATED"}
    assert set(ended) == set(rows)
    for execution_id, event in ended.items():
        delay = event.at - seen_in_db[execution_id]
        assert delay < 1.0, f"{execution_id}: TERMINATED reached the page {delay:.2f}s after the database had it"
    assert ended[root].data["stop_reason"], "the terminal change carries the stop's reason"
    assert stream.events[-1].kind == "end" and stream.events[-1].data == {"status": "TERMINATED"}
    assert stream.of("status")[-1].data["execution_id"] == root, "the run's own end comes last"


def test_unknown_runs_are_404_and_the_server_ends_on_sigterm_with_a_stream_open(cli, page, observer):
    assert page.get("/runs/no-such-id").code == 404
    assert page.get("/runs/no-such-id/events").code == 404
    assert page.get("/nothing-here").code == 404
    _, root, _ = start_tree(cli, observer, "parent", 3, user="alice")
    stream = page.events(root)
    wait_until(lambda: stream.events, 10.0, "the first event")

    began = time.monotonic()
    page.process.send_signal(signal.SIGTERM)
    assert page.process.wait(10.0) == 0, page.process.describe()
    assert time.monotonic() - began < 5.0
    assert stream.closed.wait(5.0)
    assert set(observer.subtree_statuses(root).values()) == {"RUNNING"}, "serving never stops anything"
