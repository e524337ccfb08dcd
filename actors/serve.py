"""``run.py serve``: a local status page with live trees and stop buttons.

Built on the standard library's ``http.server``: a page for one person on
their own machine needs no framework, and actorgraph gains no dependency.

- ``GET /`` lists root executions, newest first, filtered by ``user`` and
  ``status``.
- ``GET /runs/ID`` draws an execution's tree; ``GET /runs/ID/events`` streams
  its status changes as server-sent events, fed by ``Client.watch``.
- ``POST /stop`` stops an execution (``execution_id``, ``user_id``,
  ``cascade``) wherever it runs, through ``Client.stop``.

Security: it listens on 127.0.0.1 by default, and when bound to loopback it
refuses a Host header naming any other host (DNS rebinding). Every value it
shows is escaped with ``html.escape``; JSON embedded in a page has ``<``,
``>`` and ``&`` escaped, and a Content-Security-Policy admits only the page's
own script. A stop is a POST that carries this server's random token
(compared in constant time; a page of another origin cannot read it) and the
user id it stops as; ownership is checked by ``Client.stop`` as in the API.
"""
from __future__ import annotations

import functools
import hmac
import html
import importlib.resources
import json
import logging
import queue
import re
import secrets
import signal
import socket
import string
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable
from urllib.parse import SplitResult, parse_qs, quote, unquote, urlsplit

from actors import StatusChanged
from actors.client import Client
from actors.errors import InvalidInput, StopTimeout
from persistence import TERMINAL, ActorGraphError, DatabaseError, ExecutionStatus, NotFound, PermissionDenied

logger = logging.getLogger(__name__)

LIST_LIMIT = 100          # runs shown on the list page
KEEPALIVE = 1.0           # seconds between SSE keepalives: a gone browser is noticed within ~2 s
SOCKET_TIMEOUT = 30.0     # a stalled client cannot hold a thread forever
MAX_BODY = 16 * 1024      # a stop form is a few hundred bytes
SHUTDOWN_GRACE = 3.0      # how long open event streams get to end before the client closes
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # UTC
STATUSES = [status.value for status in ExecutionStatus]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

_RUN = re.compile(r"/runs/([^/]+)")
_EVENTS = re.compile(r"/runs/([^/]+)/events")
_ERRORS: list[tuple[type[Exception], int]] = [
    (InvalidInput, 400), (PermissionDenied, 403), (NotFound, 404), (StopTimeout, 504), (DatabaseError, 503),
]


def serve(database: str | None, host: str = "127.0.0.1", port: int = 8765) -> int:
    """Serve the status page until SIGINT or SIGTERM; return the exit code (0; 2 if it cannot listen).

    The first stdout line is ``serving http://HOST:PORT/`` with the real port
    (``port=0`` picks a free one). Raises DatabaseError if the database cannot
    be opened.
    """
    client = Client(database)
    state = _State(client=client)
    try:
        server = _Server(host, port, state)
    except OSError as exc:
        client.close()
        print(f"run.py serve: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 2
    bound_port = server.server_address[1]
    state.allowed_hosts = _allowed_hosts(host, bound_port)
    print(f"serving http://{_netloc(host, bound_port)}/", flush=True)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: state.stopping.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="serve", daemon=True)
    thread.start()
    try:
        while not state.stopping.wait(0.5):
            pass
    finally:
        # Order: tell the event streams to end, stop accepting, let the streams
        # unwatch (bounded), and only then close the client they use.
        state.stopping.set()
        server.shutdown()
        server.server_close()
        state.wait_streams(SHUTDOWN_GRACE)
        client.close()
    logger.info("status page stopped")
    return 0


@dataclass
class _State:
    """What every request handler shares."""

    client: Client
    allowed_hosts: set[str] | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    stopping: threading.Event = field(default_factory=threading.Event)
    streams: int = 0
    lock: threading.Condition = field(default_factory=threading.Condition)

    def stream_started(self) -> None:
        with self.lock:
            self.streams += 1

    def stream_ended(self) -> None:
        with self.lock:
            self.streams -= 1
            self.lock.notify_all()

    def wait_streams(self, timeout: float) -> None:
        with self.lock:
            self.lock.wait_for(lambda: self.streams == 0, timeout)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request thread never keeps the process alive

    def __init__(self, host: str, port: int, state: _State) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.state = state
        super().__init__((host, port), _Handler)


def _allowed_hosts(host: str, port: int) -> set[str] | None:
    """Host headers accepted when bound to loopback (None: any, for a deliberate --host)."""
    if host not in LOOPBACK:
        return None
    names = {"127.0.0.1", "localhost", "[::1]"}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "actorgraph-serve"
    timeout = SOCKET_TIMEOUT

    # -- dispatch ------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _dispatch(self, route: Callable[[SplitResult], None]) -> None:
        allowed = self.server.state.allowed_hosts
        if allowed is not None and self.headers.get("Host") not in allowed:
            self._error(403, "unexpected Host header: open the page at the address run.py serve printed")
            return
        try:
            route(urlsplit(self.path))
        except ActorGraphError as exc:  # first: StopTimeout is a TimeoutError too
            code = next((code for kind, code in _ERRORS if isinstance(exc, kind)), 500)
            self._error(code, str(exc))
        except (ConnectionError, TimeoutError):
            logger.debug("client went away: %s %s", self.command, self.path)
        except Exception:
            logger.exception("%s %s failed", self.command, self.path)
            self._error(500, "internal error (see the server's log)")

    def _get(self, url: SplitResult) -> None:
        if url.path == "/":
            self._list(parse_qs(url.query))
        elif url.path == "/stop":
            self._error(405, "a stop is a POST", [("Allow", "POST")])
        elif match := _EVENTS.fullmatch(url.path):
            self._events(unquote(match[1]))
        elif match := _RUN.fullmatch(url.path):
            self._run(unquote(match[1]))
        else:
            self._error(404, f"no page at {url.path}")

    def _post(self, url: SplitResult) -> None:
        if url.path != "/stop":
            self._error(404, f"no POST at {url.path}: only /stop takes one")
            return
        self._stop(self._form())

    # -- pages ---------------------------------------------------------------------

    def _list(self, query: dict[str, list[str]]) -> None:
        user = query.get("user", [""])[0]
        status = query.get("status", [""])[0]
        roots = self.server.state.client.list(user_id=user or None, status=status or None, limit=LIST_LIMIT,
                                              roots_only=True)
        options = "".join(
            f'<option value="{s}"{" selected" if s == status else ""}>{s or "any status"}</option>'
            for s in ["", *STATUSES]
        )
        rows = "".join(
            f'<tr><td class="graph">{_e(r.graph_id)}</td><td>{_e(r.user_id)}</td>'
            f'<td>{_badge(r.status.value)}</td><td>{_e(r.created_at.strftime(TIME_FORMAT))}</td>'
            f'<td><a class="id" href="/runs/{_e(quote(r.id, safe=""))}">{_e(r.id)}</a></td></tr>'
            for r in roots
        )
        main = (
            '<h2>Runs</h2><form class="filters" method="get" action="/">'
            f'<label>user <input type="text" name="user" value="{_e(user)}"></label>'
            f'<label>status <select name="status">{options}</select></label><button>Filter</button>'
            '<a href="/">clear</a></form>'
            '<table><thead><tr><th>graph</th><th>user</th><th>status</th><th>created (UTC)</th><th>id</th></tr>'
            f'</thead><tbody>{rows or _EMPTY_ROW}</tbody></table>'
            f'<p class="muted">Root executions, newest first (at most {LIST_LIMIT}).</p>'
        )
        self._page("Runs", main)

    def _run(self, execution_id: str) -> None:
        client = self.server.state.client
        record = client.get(execution_id)
        tree = client.tree(execution_id)
        config = {"events": f"/runs/{quote(execution_id, safe='')}/events", "token": self.server.state.token}
        main = (
            f'<h2>{_e(record.graph_id)} <span class="id">{_e(record.id)}</span></h2>'
            f'<p>user <b>{_e(record.user_id)}</b> · created {_e(record.created_at.strftime(TIME_FORMAT))}'
            f' UTC{_parent_link(record.parent_id)} · <span id="counts"></span> · <span id="live">loading</span></p>'
            '<div class="toolbar"><label>stop as user <input type="text" id="stop-user" autocomplete="off"'
            ' placeholder="user id"></label><span id="message" role="status"></span></div>'
            f'<ul class="tree">{_node(tree)}</ul>'
            f'<template id="node-template">{_node({"id": "", "graph_id": "", "status": "QUEUED", "children": []})}'
            f'</template><script type="application/json" id="config">{_json_for_html(config)}</script>'
        )
        self._page(f"{record.graph_id} {record.id}", main)

    def _events(self, execution_id: str) -> None:
        """Stream the subtree's status changes: a ``tree`` snapshot, ``status`` events, then ``end``.

        The watch starts before the snapshot is read, so that no change falls
        between the two (a change the snapshot already shows is harmless: the
        page never moves a status backwards). It ends once the watched
        execution and everything seen under it ended, when the browser goes
        away (a keepalive write fails), or when the server stops.
        """
        state = self.server.state
        changes: queue.SimpleQueue[StatusChanged] = queue.SimpleQueue()
        watch = state.client.watch(execution_id, changes.put)
        state.stream_started()
        try:
            tree = state.client.tree(execution_id)  # an error here still gets an error page: nothing was sent
            self.send_response(200)
            self._headers("text/event-stream", [("Cache-Control", "no-store")])
            self._send_event("tree", tree, retry=2000)
            self._stream(execution_id, changes)
        finally:
            state.client.unwatch(watch)
            state.stream_ended()
        self.close_connection = True

    def _stream(self, execution_id: str, changes: queue.SimpleQueue[StatusChanged]) -> None:
        """Forward changes until the watched execution and every execution seen under it are terminal.

        Not at the watched execution's end alone: after a stop without cascade
        its children run on, and the page follows them to their own ends.
        """
        active: set[str] = set()
        ended: str | None = None
        stopping = self.server.state.stopping
        while not stopping.is_set():
            try:
                change = changes.get(timeout=KEEPALIVE)
            except queue.Empty:
                self._write(b": keepalive\n\n")
                continue
            self._send_event("status", _change_json(change))
            if change.status not in TERMINAL:
                active.add(change.execution_id)
                continue
            active.discard(change.execution_id)
            if change.execution_id == execution_id:
                ended = ExecutionStatus(change.status).value
            if ended is not None and not active:
                self._send_event("end", {"status": ended})
                return

    def _stop(self, form: dict[str, str]) -> None:
        state = self.server.state
        if not hmac.compare_digest(form.get("token", "").encode(), state.token.encode()):
            self._error(403, "missing or wrong token: reload the status page")
            return
        execution_id, user_id = form.get("execution_id", ""), form.get("user_id", "")
        if not execution_id or not user_id:
            raise InvalidInput("a stop needs execution_id and user_id")
        cascade = form.get("cascade", "") not in ("", "0", "false", "off")
        logger.info("stop %s as %r (cascade=%s)", execution_id, user_id, cascade)
        ack = state.client.stop(execution_id, user_id, cascade=cascade,
                                reason=f"stopped by {user_id} from the status page")
        if "application/json" in self.headers.get("Accept", ""):
            self._json(200, {"execution_id": ack.execution_id, "terminated": list(ack.terminated),
                             "already_final": list(ack.already_final), "forced": list(ack.forced)})
            return
        self.send_response(303)
        self.send_header("Location", f"/runs/{quote(execution_id, safe='')}")
        self._headers("text/plain; charset=utf-8", [("Content-Length", "0")])

    def _form(self) -> dict[str, str]:
        """The urlencoded body, first value of each field. Bad input -> InvalidInput."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise InvalidInput("a stop needs a Content-Length") from None
        if not 0 <= length <= MAX_BODY:
            raise InvalidInput(f"a stop's body must be at most {MAX_BODY} bytes")
        try:
            fields = parse_qs(self.rfile.read(length).decode("utf-8"), keep_blank_values=True,
                              max_num_fields=20, strict_parsing=False)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidInput(f"malformed form: {exc}") from None
        return {name: values[0] for name, values in fields.items()}

    # -- responses -------------------------------------------------------------------

    def _page(self, title: str, main: str, code: int = 200, extra: Iterable[tuple[str, str]] = ()) -> None:
        # A fresh nonce per page: the Content-Security-Policy admits only this page's own <script> and <style>.
        nonce = secrets.token_urlsafe(16)
        body = _template().substitute(title=_e(title), nonce=nonce, main=main).encode()
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
        self.send_response(code)
        self._headers("text/html; charset=utf-8", [("Content-Length", str(len(body))),
                                                   ("Content-Security-Policy", csp), *extra])
        self._write(body)

    def _json(self, code: int, data: Any, extra: Iterable[tuple[str, str]] = ()) -> None:
        body = json.dumps(data).encode()
        self.send_response(code)
        self._headers("application/json", [("Content-Length", str(len(body))), *extra])
        self._write(body)

    def _error(self, code: int, message: str, extra: Iterable[tuple[str, str]] = ()) -> None:
        logger.info("%s %s -> %d: %s", self.command, self.path, code, message)
        self.close_connection = True  # an unread request body must not be taken for the next request
        if "application/json" in self.headers.get("Accept", ""):
            self._json(code, {"error": message}, extra)
            return
        main = f'<h2>{code}</h2><p class="error">{_e(message)}</p><p><a href="/">all runs</a></p>'
        self._page(str(code), main, code, extra)

    def _headers(self, content_type: str, extra: Iterable[tuple[str, str]]) -> None:
        self.send_header("Content-Type", content_type)
        for name, value in extra:
            self.send_header(name, value)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()

    def _send_event(self, kind: str, data: Any, retry: int | None = None) -> None:
        prefix = f"retry: {retry}\n" if retry else ""
        self._write(f"{prefix}event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


_EMPTY_ROW = '<tr><td colspan="5" class="muted">No runs match.</td></tr>'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _badge(status: str) -> str:
    return f'<span class="status s-{_e(status)}">{_e(status)}</span>'


def _parent_link(parent_id: str | None) -> str:
    if parent_id is None:
        return ""
    return f' · parent <a class="id" href="/runs/{_e(quote(parent_id, safe=""))}">{_e(parent_id)}</a>'


def _node(node: dict[str, Any]) -> str:
    """One execution and its subtree as nested list items; a stop form while it is active."""
    status = node["status"]
    stop = "" if status in TERMINAL else (
        '<form class="stop" method="post" action="/stop">'
        f'<input type="hidden" name="execution_id" value="{_e(node["id"])}">'
        '<label><input type="checkbox" name="cascade" value="1" checked> cascade</label>'
        '<button type="submit">stop</button></form>'
    )
    children = "".join(_node(child) for child in node["children"])
    return (
        f'<li class="node" data-id="{_e(node["id"])}" data-status="{_e(status)}"><div class="row">'
        f'<span class="graph">{_e(node["graph_id"])}</span>{_badge(status)}<span class="id">{_e(node["id"])}</span>'
        f'<span class="detail"></span>{stop}</div><ul>{children}</ul></li>'
    )


def _json_for_html(data: Any) -> str:
    """JSON that cannot end the <script> element it sits in, nor open a comment."""
    return json.dumps(data).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _change_json(change: StatusChanged) -> dict[str, Any]:
    return {"execution_id": change.execution_id, "parent_id": change.parent_id, "root_id": change.root_id,
            "status": ExecutionStatus(change.status).value, "at": change.at.isoformat(), "error": change.error,
            "stop_reason": change.stop_reason, "graph_id": change.graph_id}


@functools.cache
def _template() -> string.Template:
    """The page around every view: actors/serve_page.html (package data)."""
    return string.Template(importlib.resources.files("actors").joinpath("serve_page.html").read_text("utf-8"))

