#!/usr/bin/env python3
"""run.py: run, stop and look at actorgraph executions from a terminal.

    python run.py demo [--depth 3] [--fanout 3] [--stop-after 2.0]
    python run.py run GRAPHS.json GRAPH_ID [--user U] [--input k=v ...] [--stop-after S]
    python run.py submit GRAPHS.json GRAPH_ID --db postgresql://... [--user U] [--input k=v ...]
                         [--blocks MODULE ...]
    python run.py worker --db postgresql://... [--concurrency N] [--max-running-per-user N]
                         [--max-running-per-graph N] [--blocks MODULE ...] [--drain-timeout S]
    python run.py stop EXEC_ID --user U [--no-cascade] [--timeout S]
    python run.py tree EXEC_ID [--json]
    python run.py list [--user U] [--status S] [--limit N] [--json]
    python run.py bench [--quick] [--json PATH] [--postgres URL]

Every command takes ``--db URL`` (default: env ACTORGRAPH_DATABASE, else
sqlite:///actorgraph.db). Exit codes: 0 done (COMPLETED, or the stop/demo
succeeded), 1 FAILED, 2 bad input, 3 TERMINATED, 4 permission denied,
5 not found.
"""
from __future__ import annotations

import argparse
import getpass
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, NoReturn, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TERMINATED, EXIT_DENIED, EXIT_NOT_FOUND = 0, 1, 2, 3, 4, 5
STATUS_EXIT = {"COMPLETED": EXIT_OK, "FAILED": EXIT_FAILED, "TERMINATED": EXIT_TERMINATED}
REDRAW_EVERY = 0.25
DEMO_LEAF_SECONDS = 3600


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the contract for bad input.
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value
    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid float") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds >= 0")
    return value


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
    stop.add_argument("--timeout", type=_positive(float), default=15.0, metavar="S",
                      help="seconds running work has before it is terminated anyway (default 15)")

    tree = command("tree", "print an execution's tree (read only)")
    tree.add_argument("execution_id", metavar="EXEC_ID")
    tree.add_argument("--json", action="store_true")

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


def tree_lines(node: dict[str, Any], prefix: str = "", last: bool = True, top: bool = True) -> list[str]:
    branch = "" if top else ("`-- " if last else "|-- ")
    lines = [f"{prefix}{branch}{node['graph_id']} {node['id']} {node['status']}"]
    inner = prefix + ("" if top else ("    " if last else "|   "))
    children = node["children"]
    for index, child in enumerate(children):
        lines.extend(tree_lines(child, inner, index == len(children) - 1, top=False))
    return lines


def count_statuses(node: dict[str, Any], counts: dict[str, int] | None = None) -> dict[str, int]:
    counts = {} if counts is None else counts
    counts[node["status"]] = counts.get(node["status"], 0) + 1
    for child in node["children"]:
        count_statuses(child, counts)
    return counts


def summary(node: dict[str, Any]) -> str:
    counts = count_statuses(node)
    return ", ".join(f"{status} {count}" for status, count in sorted(counts.items()))


class TreeView:
    """Shows a tree while it runs: redrawn in place on a terminal, plain summary lines when piped."""

    def __init__(self, stream: Any = sys.stdout) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._drawn = 0

    def show(self, tree: dict[str, Any], elapsed: float) -> None:
        if not self.tty:
            print(f"[{elapsed:5.1f}s] {summary(tree)}", file=self.stream, flush=True)
            return
        lines = [f"[{elapsed:5.1f}s] {summary(tree)}", *tree_lines(tree)]
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)


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
        view = TreeView()
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
    print("\n".join(tree_lines(final)))
    counts = count_statuses(final)
    ok = counts == {"TERMINATED": expected}
    print(f"demo: {summary(final)}: " + ("the whole tree ended TERMINATED" if ok else "NOT every execution ended TERMINATED"))
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


def cmd_tree(args: argparse.Namespace) -> int:
    from actors import Reader

    with Reader.open(args.db) as reader:
        tree = reader.tree(args.execution_id)
    print(json.dumps(tree, indent=2) if args.json else "\n".join(tree_lines(tree)))
    return EXIT_OK


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
    "tree": cmd_tree, "list": cmd_list,
}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("ACTORGRAPH_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
