#!/usr/bin/env python3
"""run.py: run, stop and look at actorgraph executions from a terminal.

    python run.py demo [--depth 3] [--fanout 3] [--stop-after 2.0]
    python run.py run GRAPHS.json GRAPH_ID [--user U] [--input k=v ...] [--stop-after S]
    python run.py submit GRAPHS.json GRAPH_ID --db postgresql://... [--user U] [--input k=v ...]
                         [--blocks MODULE ...]
    python run.py worker --db postgresql://... [--concurrency N] [--max-running-per-user N]
                         [--max-running-per-graph N] [--blocks MODULE ...] [--drain-timeout S]
    python run.py stop EXEC_ID --user U [--no-cascade] [--timeout S]
    python run.py watch EXEC_ID [--color auto|always|never]
    python run.py serve [--host 127.0.0.1] [--port 8765]
    python run.py tree EXEC_ID [--format text|json|mermaid] [--json] [--color auto|always|never]
    python run.py list [--user U] [--status S] [--limit N] [--json]
    python run.py bench [--quick] [--json PATH] [--postgres URL]

Every command takes ``--db URL`` (default: env ACTORGRAPH_DATABASE, else
sqlite:///actorgraph.db). Exit codes: 0 done (COMPLETED, or the stop/demo
succeeded), 1 FAILED, 2 bad input, 3 TERMINATED, 4 permission denied,
5 not found. ``watch`` exits with the watched execution's final status
(0, 1 or 3). Statuses are coloured on a colour terminal only: never in a
pipe, nor when NO_COLOR is set (https://no-color.org) or TERM=dumb, unless
``--color always`` asks for it.
"""
from __future__ import annotations

import argparse
import getpass
import importlib
import json
import os
import queue
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TERMINATED, EXIT_DENIED, EXIT_NOT_FOUND = 0, 1, 2, 3, 4, 5
STATUS_EXIT = {"COMPLETED": EXIT_OK, "FAILED": EXIT_FAILED, "TERMINATED": EXIT_TERMINATED}
REDRAW_EVERY = 0.25
# How long one ``Client.changes`` call may wait before watch subscribes again.
WATCH_CALL_TIMEOUT = 30.0
DEMO_LEAF_SECONDS = 3600


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the contract for bad input.
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _number(kind: Callable[[str], Any], accepts: Callable[[Any], bool], *, noun: str,
            requirement: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)``, refused in one line unless it parses and ``accepts`` it."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"{text!r} {requirement}")
        return value
    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return _number(kind, lambda value: value > 0, noun=f"a valid {kind.__name__}",
                   requirement="must be greater than 0")


_port = _number(int, lambda value: 0 <= value <= 65535, noun="a port number",
                requirement="is not a port number (0-65535)")
_non_negative_float = _number(float, lambda value: 0 <= value < float("inf"), noun="a valid float",
                              requirement="must be a number of seconds >= 0")


def _color_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--color", choices=COLOR_MODES, default="auto",
                        help="colour the statuses: auto (default: only on a terminal, without NO_COLOR "
                             "and TERM=dumb), always or never")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run.py", description="Run, stop and look at actorgraph executions.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--db", metavar="URL", default=None,
                         help="database URL (default: $ACTORGRAPH_DATABASE or sqlite:///actorgraph.db)")
        return sub

    demo = command("demo", "run a generated tree of nested executions, then stop it")
    demo.add_argument("--depth", type=_positive(int), default=3, help="levels below the root (default 3)")
    demo.add_argument("--fanout", type=_positive(int), default=3, help="children per execution (default 3)")
    demo.add_argument("--stop-after", type=_positive(float), default=2.0, metavar="S",
                      help="seconds before the root is stopped (default 2.0)")
    _color_option(demo)

    run = command("run", "run a graph from a JSON file and wait for its end")
    run.add_argument("graphs", metavar="GRAPHS.json")
    run.add_argument("graph_id", metavar="GRAPH_ID")
    run.add_argument("--user", default=None, help="user id (default: your login name)")
    run.add_argument("--input", action="extend", nargs="+", default=[], metavar="K=V",
                     help="an input; V is parsed as JSON when it parses, else kept as a string")
    run.add_argument("--stop-after", type=_positive(float), default=None, metavar="S",
                     help="stop the tree after S seconds")

    submit = command("submit", "hand a root to the workers (PostgreSQL); print its id")
    submit.add_argument("graphs", metavar="GRAPHS.json")
    submit.add_argument("graph_id", metavar="GRAPH_ID")
    submit.add_argument("--user", default=None, help="user id (default: your login name)")
    submit.add_argument("--input", action="extend", nargs="+", default=[], metavar="K=V",
                        help="an input; V is parsed as JSON when it parses, else kept as a string")
    submit.add_argument("--blocks", action="extend", nargs="+", default=[], metavar="MODULE",
                        help="import MODULE and call its register(registry) to declare user blocks")

    worker = command("worker", "claim and run submitted roots until SIGTERM or Ctrl-C (PostgreSQL)")
    worker.add_argument("--concurrency", type=_positive(int), default=4, metavar="N",
                        help="roots running here at once (default 4)")
    worker.add_argument("--max-running-per-user", type=_positive(int), default=None, metavar="N",
                        help="running roots per user, across every worker")
    worker.add_argument("--max-running-per-graph", type=_positive(int), default=None, metavar="N",
                        help="running roots per user and graph, across every worker")
    worker.add_argument("--blocks", action="extend", nargs="+", default=[], metavar="MODULE",
                        help="import MODULE and call its register(registry) to register user blocks")
    worker.add_argument("--drain-timeout", type=_non_negative_float, default=30.0, metavar="S",
                        help="on SIGTERM, how long running trees may take to end before they are "
                             "stopped (default 30)")

    stop = command("stop", "stop an execution (and its subtree) from any process")
    stop.add_argument("execution_id", metavar="EXEC_ID")
    stop.add_argument("--user", required=True)
    stop.add_argument("--no-cascade", action="store_true", help="stop only this execution")
    stop.add_argument("--timeout", type=_non_negative_float, default=15.0, metavar="S",
                      help="seconds running work has before it is terminated anyway (default 15; "
                           "0 terminates it at once)")

    serve = command("serve", "a local status page: runs, live trees, stop buttons (Ctrl-C ends it)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8765, help="port (default 8765; 0 picks a free one)")

    watch = command("watch", "follow an execution and its subtree, from any process, until it ends; "
                             "exit with its final status (0 COMPLETED, 1 FAILED, 3 TERMINATED)")
    watch.add_argument("execution_id", metavar="EXEC_ID")
    _color_option(watch)

    tree = command("tree", "print an execution's tree (read only)")
    tree.add_argument("execution_id", metavar="EXEC_ID")
    form = tree.add_mutually_exclusive_group()
    form.add_argument("--format", choices=TREE_FORMATS, default="text",
                      help="text (default), json, or a mermaid flowchart for documentation and issues")
    form.add_argument("--json", action="store_const", dest="format", const="json",
                      help="same as --format json")
    _color_option(tree)

    listing = command("list", "list executions, newest first (read only)")
    listing.add_argument("--user", default=None)
    listing.add_argument("--status", default=None,
                         choices=["QUEUED", "RUNNING", "COMPLETED", "FAILED", "TERMINATED"])
    listing.add_argument("--limit", type=_positive(int), default=50)
    listing.add_argument("--json", action="store_true")

    # Listed for --help; main() hands everything after "bench" to the benchmark as it is.
    commands.add_parser("bench", help="run the stop benchmark: python run.py bench --help",
                        add_help=False)
    return parser


def parse_inputs(pairs: Sequence[str]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"run.py run: malformed --input {pair!r}: expected KEY=VALUE")
        try:
            inputs[key] = json.loads(text)
        except json.JSONDecodeError:
            inputs[key] = text
    return inputs


# -- output ----------------------------------------------------------------------

STATUS_ORDER = ("QUEUED", "RUNNING", "COMPLETED", "FAILED", "TERMINATED")
TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "TERMINATED"})
# SGR colour codes: blue, yellow, green, red, magenta.
STATUS_COLORS = {"QUEUED": "34", "RUNNING": "33", "COMPLETED": "32", "FAILED": "31", "TERMINATED": "35"}
COLOR_MODES = ("auto", "always", "never")
TREE_FORMATS = ("text", "json", "mermaid")
# An execution's statuses only move forward: QUEUED, RUNNING, then one terminal status.
_RANK = {"QUEUED": 0, "RUNNING": 1, "COMPLETED": 2, "FAILED": 2, "TERMINATED": 2}
_FEED_END = object()
# Mermaid classDef styles, one per status (fill, border, text).
MERMAID_STYLES = {
    "QUEUED": "fill:#e7f5ff,stroke:#1c7ed6,color:#0b3d66",
    "RUNNING": "fill:#fff9db,stroke:#f08c00,color:#5c3c00",
    "COMPLETED": "fill:#ebfbee,stroke:#2f9e44,color:#1b4d2a",
    "FAILED": "fill:#fff5f5,stroke:#e03131,color:#5c1010",
    "TERMINATED": "fill:#f8f0fc,stroke:#ae3ec9,color:#4a1559",
}
_MERMAID_UNSAFE = re.compile(r'["#<>&\\`]|[^\x20-\x7e]')


def use_color(stream: Any, mode: str = "auto", environ: Mapping[str, str] | None = None) -> bool:
    """Whether statuses written to ``stream`` are coloured.

    ``always`` and ``never`` decide (a command-line flag overrides NO_COLOR,
    as https://no-color.org asks). ``auto`` colours only a terminal, and only
    when NO_COLOR is unset or empty and TERM is not ``dumb``.
    """
    if mode != "auto":
        return mode == "always"
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # not a file, or a closed one
        return False


def can_redraw(stream: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is a terminal that moves its cursor (a TERM=dumb one does not)."""
    env = os.environ if environ is None else environ
    try:
        return bool(stream.isatty()) and env.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def paint(status: str, color: bool) -> str:
    """``status``, wrapped in its colour's escape codes when ``color``."""
    code = STATUS_COLORS.get(status)
    return f"\x1b[{code}m{status}\x1b[0m" if color and code else status


def status_text(status: Any) -> str:
    """The status string of an ``ExecutionStatus`` or of a plain string."""
    return str(getattr(status, "value", status))


def tree_lines(node: dict[str, Any], prefix: str = "", last: bool = True, top: bool = True,
               color: bool = False) -> list[str]:
    branch = "" if top else ("`-- " if last else "|-- ")
    lines = [f"{prefix}{branch}{node['graph_id']} {node['id']} {paint(node['status'], color)}"]
    inner = prefix + ("" if top else ("    " if last else "|   "))
    children = node["children"]
    for index, child in enumerate(children):
        lines.extend(tree_lines(child, inner, index == len(children) - 1, top=False, color=color))
    return lines


def walk(tree: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of ``tree``, parents before children, children in their order (no recursion)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node["children"]))


def count_statuses(node: dict[str, Any], counts: dict[str, int] | None = None) -> dict[str, int]:
    counts = {} if counts is None else counts
    for each in walk(node):
        counts[each["status"]] = counts.get(each["status"], 0) + 1
    return counts


def summary(node: dict[str, Any], color: bool = False) -> str:
    """A count per status, in the order of the status machine: ``RUNNING 2, COMPLETED 1``."""
    counts = count_statuses(node)
    order = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts) - set(STATUS_ORDER))
    return ", ".join(f"{paint(status, color)} {counts[status]}" for status in order)


def mermaid_text(text: str) -> str:
    """``text`` made safe inside a quoted mermaid label: quotes, ``#``, ``<``, ``>``, ``&``,
    backslashes, backticks and anything outside printable ASCII become ``#code;`` entities."""
    return _MERMAID_UNSAFE.sub(lambda match: f"#{ord(match.group())};", text)


def mermaid(tree: dict[str, Any]) -> str:
    """A mermaid ``flowchart TD`` of ``tree``: one node per execution, labelled by graph and status.

    Node ids are ``e0, e1, ...`` in tree order (parents first); a ``%%``
    comment maps each to its execution id. Edges go parent --> child, and
    each node carries its status's class. The same tree gives the same text.
    """
    nodes = list(walk(tree))
    names = {node["id"]: f"e{index}" for index, node in enumerate(nodes)}
    lines = ["flowchart TD"]
    for node in nodes:
        name, status = names[node["id"]], node["status"]
        lines.append(f"    %% {name} = {mermaid_text(str(node['id']))}")
        lines.append(f'    {name}["{mermaid_text(str(node["graph_id"]))}<br/>{mermaid_text(status)}"]'
                     f":::{_mermaid_class(status)}")
    for node in nodes:
        lines.extend(f"    {names[node['id']]} --> {names[child['id']]}" for child in node["children"])
    lines.extend(f"    classDef {_mermaid_class(status)} {style}" for status, style in MERMAID_STYLES.items())
    return "\n".join(lines)


def _mermaid_class(status: str) -> str:
    return re.sub(r"[^a-z0-9]", "_", status.lower()) or "unknown"


def change_line(change: Any, color: bool = False) -> str:
    """One ``StatusChanged`` as a line: ``<iso time> <execution id> <graph id> <STATUS>``, then
    ``error=`` and ``reason=`` as JSON strings (one line whatever they hold) when set."""
    at = change.at.isoformat(timespec="milliseconds") if hasattr(change.at, "isoformat") else str(change.at)
    line = f"{at} {change.execution_id} {change.graph_id} {paint(status_text(change.status), color)}"
    if change.error:
        line += f" error={json.dumps(change.error)}"
    if change.stop_reason:
        line += f" reason={json.dumps(change.stop_reason)}"
    return line


class TreeView:
    """Shows a tree while it runs: redrawn in place on a terminal, plain summary lines when piped
    (or on a TERM=dumb terminal, which cannot move its cursor).

    On a terminal the drawing is cut to the screen's height (cursor-up
    cannot climb above it) and lines are clipped rather than wrapped, so
    that the next redraw erases exactly what this one drew.
    """

    def __init__(self, stream: Any = sys.stdout, color: bool = False, title: str = "") -> None:
        self.stream = stream
        self.tty = can_redraw(stream)
        self.color = color
        self.title = title
        self._drawn = 0

    def show(self, tree: dict[str, Any], elapsed: float) -> None:
        head = f"{self.title}[{elapsed:5.1f}s] {summary(tree, self.color)}"
        if not self.tty:
            print(head, file=self.stream, flush=True)
            return
        lines = [head, *tree_lines(tree, color=self.color)]
        rows = self._rows()
        if rows and len(lines) > rows - 1:
            hidden = len(lines) - (rows - 2)
            lines = [*lines[:rows - 2], f"... {hidden} more lines"]
        text = "\x1b[?7l"  # no autowrap while drawing: one line drawn, one line to erase
        if self._drawn:
            text += f"\x1b[{self._drawn}F\x1b[J"
        self.stream.write(text + "\n".join(lines) + "\n\x1b[?7h")
        self.stream.flush()
        self._drawn = len(lines)

    def _rows(self) -> int:
        """The terminal's height, or 0 when unknown (then nothing is cut)."""
        try:
            rows = os.get_terminal_size(self.stream.fileno()).lines
        except (AttributeError, OSError, ValueError):
            return 0
        return rows if rows >= 3 else 0


# -- commands -------------------------------------------------------------------------


def demo_graphs(depth: int, fanout: int) -> dict[str, Any]:
    """One graph per level: level k starts ``fanout`` children of level k+1; leaves sleep."""
    graphs: dict[str, Any] = {
        f"level{depth}": {"nodes": {"nap": {"block": "sleep", "input": {"seconds": DEMO_LEAF_SECONDS}}}}
    }
    for level in range(depth - 1, -1, -1):
        graphs[f"level{level}"] = {"nodes": {
            f"child{i}": {"block": "agent", "input": {"graph": f"level{level + 1}"}} for i in range(fanout)
        }}
    return {"graphs": graphs}


def cmd_demo(args: argparse.Namespace) -> int:
    from actors import Runtime

    expected = sum(args.fanout ** level for level in range(args.depth + 1))
    with Runtime(args.db, max_depth=max(32, args.depth)) as rt:
        rt.load(demo_graphs(args.depth, args.fanout))
        user = _login()
        root = rt.start("level0", user_id=user)
        print(f"demo: root {root}: depth {args.depth}, fan-out {args.fanout}: {expected} executions; "
              f"stopping the root after {args.stop_after}s", flush=True)
        color = use_color(sys.stdout, args.color)
        view = TreeView(color=color)
        started = time.monotonic()
        interrupted = False
        try:
            while time.monotonic() - started < args.stop_after:
                view.show(rt.tree(root), time.monotonic() - started)
                time.sleep(REDRAW_EVERY)
        except KeyboardInterrupt:
            interrupted = True
            print("demo: interrupted; stopping the tree", flush=True)
        began = time.perf_counter()
        ack = rt.stop(root, user_id=user)
        latency = time.perf_counter() - began
        final = rt.tree(root)
    print(f"demo: stop returned after {latency * 1000:.1f} ms: {len(ack.terminated)} terminated, "
          f"{len(ack.already_final)} already final, {len(ack.forced)} forced")
    print("final tree, read back from the database:")
    print("\n".join(tree_lines(final, color=color)))
    counts = count_statuses(final)
    ok = counts == {"TERMINATED": expected}
    print(f"demo: {summary(final, color)}: " + ("the whole tree ended TERMINATED" if ok else "NOT every execution ended TERMINATED"))
    if not ok:
        return EXIT_FAILED
    return EXIT_TERMINATED if interrupted else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from actors import Runtime, validate_graphs

    inputs = parse_inputs(args.input)
    graphs = validate_graphs(args.graphs)  # everything is checked before the database is touched
    if args.graph_id not in graphs:
        raise UsageError(f"run.py run: graph {args.graph_id!r} is not in {args.graphs} "
                         f"(graphs: {', '.join(sorted(graphs))})")
    user = args.user or _login()
    with Runtime(args.db) as rt:
        rt.load(args.graphs)
        root = rt.start(args.graph_id, user_id=user, inputs=inputs)
        print(root, flush=True)
        if args.stop_after is not None:
            timer = threading.Timer(args.stop_after, _stop_quietly, (rt, root, user))
            timer.daemon = True
            timer.start()
        try:
            record = _wait_forever(rt, root)
            # A stop from elsewhere without cascade leaves children running
            # here: keep hosting them until they reach their own end.
            while not rt.wait_idle(1.0):
                pass
        except KeyboardInterrupt:
            print("run: interrupted; stopping the tree", file=sys.stderr, flush=True)
            rt.stop(root, user_id=user, reason="interrupted (Ctrl-C)")
            record = rt.get(root)
        final = rt.tree(root)
    print("\n".join(tree_lines(final)))
    if record.error:
        print(f"error: {record.error}")
    return STATUS_EXIT[record.status.value]


def _wait_forever(rt: Any, root: str) -> Any:
    while True:
        try:
            return rt.wait(root, timeout=1.0)
        except TimeoutError:
            continue


def _stop_quietly(rt: Any, root: str, user: str) -> None:
    try:
        rt.stop(root, user_id=user, reason="--stop-after elapsed")
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on to its end
        print(f"run: --stop-after failed: {exc}", file=sys.stderr, flush=True)


def cmd_stop(args: argparse.Namespace) -> int:
    from actors import stop_execution

    ack = stop_execution(args.db, args.execution_id, args.user, cascade=not args.no_cascade,
                         wait_timeout=args.timeout)
    print(f"root: {ack.execution_id}")
    for label, ids in (("terminated", ack.terminated), ("already_final", ack.already_final),
                       ("forced", ack.forced)):
        print(f"{label}: {len(ids)} {' '.join(ids)}".rstrip())
    return EXIT_OK


def _require_postgresql(command: str, url: str | None) -> str:
    """Checked before anything is opened, so that nothing (not even a SQLite file) is created."""
    from persistence import default_url, is_postgresql, redact

    url = url or default_url()
    if not is_postgresql(url):
        raise UsageError(f"run.py {command} needs PostgreSQL (--db postgresql://...): workers coordinate "
                         f"through it; {redact(url)} is not one")
    return url


def register_block_modules(registry: Any, modules: Sequence[str]) -> None:
    """Import each module and let it register its blocks: ``register(registry)``."""
    # The current directory too, as `python -m` would: a project's own block modules.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is bad input
            raise UsageError(f"--blocks {name}: cannot import it: {exc}") from None
        register = getattr(module, "register", None)
        if not callable(register):
            raise UsageError(f"--blocks {name}: the module has no register(registry) function")
        register(registry)


def cmd_submit(args: argparse.Namespace) -> int:
    from actors import Client

    url = _require_postgresql("submit", args.db)
    inputs = parse_inputs(args.input)
    with Client(url) as client:
        register_block_modules(client, args.blocks)
        graphs = client.load(args.graphs)
        if args.graph_id not in graphs:
            raise UsageError(f"run.py submit: graph {args.graph_id!r} is not in {args.graphs} "
                             f"(graphs: {', '.join(sorted(graphs))})")
        print(client.submit(args.graph_id, user_id=args.user or _login(), inputs=inputs), flush=True)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """Claim and run roots until SIGTERM/SIGINT; then drain and exit 0.

    A runtime that lost its lease (it was cut off long enough for another
    worker to recover its trees) has halted them without writing; the
    worker goes on under a new runtime, with a new lease.
    """
    from actors import Runtime

    url = _require_postgresql("worker", args.db)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    while not stopping.is_set():
        rt = Runtime(url, worker=True, concurrency=args.concurrency,
                     max_running_per_user=args.max_running_per_user,
                     max_running_per_graph=args.max_running_per_graph)
        try:
            register_block_modules(rt, args.blocks)
        except BaseException:
            rt.close()
            raise
        print(f"worker {rt.runtime_id} ready", flush=True)
        while not stopping.is_set() and not rt.lease_lost.is_set():
            stopping.wait(0.5)
        if rt.lease_lost.is_set():
            print(f"worker: runtime {rt.runtime_id}: lease lost; its trees were halted here, nothing was "
                  f"written for them; continuing under a new lease", file=sys.stderr, flush=True)
            rt.close(timeout=1.0)
            continue
        print(f"worker: draining (up to {args.drain_timeout:g}s)", file=sys.stderr, flush=True)
        rt.drain(args.drain_timeout)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from actors.serve import serve

    return serve(args.db, host=args.host, port=args.port)


def cmd_tree(args: argparse.Namespace) -> int:
    from actors import Reader

    with Reader.open(args.db) as reader:
        tree = reader.tree(args.execution_id)
    if args.format == "json":
        print(json.dumps(tree, indent=2))
    elif args.format == "mermaid":
        print(mermaid(tree))
    else:
        print("\n".join(tree_lines(tree, color=use_color(sys.stdout, args.color))))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow an execution until its terminal status; exit with it (0, 1 or 3).

    On a terminal the live tree is redrawn in place; otherwise (a pipe, a
    file, TERM=dumb) one line is printed per change. An unknown id is
    NotFound (exit 5) before any wait. Watching never changes a row: Ctrl-C,
    or a reader that goes away (``| head``), stops the watch, not the tree,
    and exits 3.
    """
    from actors import Client
    from persistence import require_existing

    color = use_color(sys.stdout, args.color)
    require_existing(args.db)  # a Client would create it: watching must not
    with Client(args.db) as client:
        client.get(args.execution_id)  # NotFound at once, not after a first wait
        last: Any = None  # follow ends only after the watched execution's terminal change
        try:
            if can_redraw(sys.stdout):
                last = _watch_live(client, args.execution_id, color)
            else:
                for change in follow(client, args.execution_id):
                    print(change_line(change, color), flush=True)
                    last = change
        except BrokenPipeError:
            # Nothing can be written any more, not even at exit's flush.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_TERMINATED
    return STATUS_EXIT[status_text(last.status)]


def follow(client: Any, execution_id: str, call_timeout: float = WATCH_CALL_TIMEOUT) -> Iterator[Any]:
    """Every status change of ``execution_id`` and its subtree, ending with its terminal one.

    The end of ``execution_id`` ends the follow even if descendants it left
    running (a stop without cascade) still change. Each ``client.changes`` call waits at most ``call_timeout`` seconds; on
    its TimeoutError the execution is followed again by a new call. A status
    is yielded once: an execution only moves forward (QUEUED, RUNNING, then
    a terminal status), so whatever a new call repeats is skipped.
    """
    from actors import ActorGraphError

    seen: dict[str, int] = {}
    while True:
        try:
            for change in client.changes(execution_id, timeout=call_timeout):
                status = status_text(change.status)
                rank = _RANK.get(status, 0)
                if rank <= seen.get(change.execution_id, -1):
                    continue
                seen[change.execution_id] = rank
                yield change
                if change.execution_id == execution_id and status in TERMINAL_STATUSES:
                    return
        except TimeoutError:
            continue
        raise ActorGraphError(f"the changes of execution {execution_id} ended before its terminal status")


def _watch_live(client: Any, execution_id: str, color: bool) -> Any:
    """Redraw the tree after each batch of changes (and the clock in between); return the last change.

    A thread follows the changes into a queue, so that a burst of changes
    costs one read of the tree and one redraw, not one per change.
    """
    feed: queue.Queue[Any] = queue.Queue()
    closing = threading.Event()

    def pump() -> None:
        try:
            for change in follow(client, execution_id):
                feed.put(change)
            feed.put(_FEED_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            if not closing.is_set():
                feed.put(exc)

    threading.Thread(target=pump, name=f"watch-{execution_id}", daemon=True).start()
    view = TreeView(sys.stdout, color=color, title=f"watch {execution_id} ")
    started = time.monotonic()
    tree = client.tree(execution_id)
    last: Any = None
    try:
        while True:
            view.show(tree, time.monotonic() - started)
            batch = _drain(feed, REDRAW_EVERY)
            for item in batch:
                if isinstance(item, BaseException):
                    raise item
                if item is not _FEED_END:
                    last = item
            if batch:
                tree = client.tree(execution_id)
            if batch and batch[-1] is _FEED_END:
                break
    finally:
        closing.set()
    view.show(tree, time.monotonic() - started)
    print(change_line(last, color), flush=True)
    return last


def _drain(feed: queue.Queue[Any], timeout: float) -> list[Any]:
    """What ``feed`` holds: waits up to ``timeout`` for a first item, then takes the rest at once."""
    try:
        items = [feed.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            items.append(feed.get_nowait())
        except queue.Empty:
            return items


def cmd_list(args: argparse.Namespace) -> int:
    from actors import Reader

    with Reader.open(args.db) as reader:
        records = reader.list(user_id=args.user, status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps([record.to_json() for record in records], indent=2))
        return EXIT_OK
    for record in records:
        print(f"{record.id} {record.status.value:<10} {record.graph_id:<16} {record.user_id:<12} "
              f"{record.created_at.isoformat(timespec='seconds')} parent={record.parent_id or '-'}")
    return EXIT_OK


def run_bench(argv: Sequence[str]) -> int:
    from benchmarks.stop_tree import main as bench_main

    return bench_main(list(argv))


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in this environment
        return "user"


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": cmd_demo, "run": cmd_run, "submit": cmd_submit, "worker": cmd_worker, "stop": cmd_stop,
    "serve": cmd_serve, "watch": cmd_watch, "tree": cmd_tree, "list": cmd_list,
}


def main(argv: Sequence[str] | None = None) -> int:
    from actors.logs import configure_logging

    configure_logging()
    from actors import ActorGraphError, InvalidGraph, InvalidInput, NotFound, PermissionDenied
    from persistence import DatabaseError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return run_bench(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except PermissionDenied as exc:
        return _fail(f"permission denied: {exc}", EXIT_DENIED)
    except NotFound as exc:
        return _fail(f"not found: {exc}", EXIT_NOT_FOUND)
    except (InvalidGraph, InvalidInput, DatabaseError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ActorGraphError as exc:
        return _fail(f"error: {exc}", EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_TERMINATED)


def _fail(message: str, code: int) -> int:
    print(message.splitlines()[0] if message else "error", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
