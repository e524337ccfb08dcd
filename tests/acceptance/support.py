"""Shared steps of the acceptance tests: start a tree, parse run.py's output."""
from __future__ import annotations

import uuid
from typing import Any

from tests.helpers import wait_until

TERMINAL = {"COMPLETED", "FAILED", "TERMINATED"}
STATUSES = TERMINAL | {"QUEUED", "RUNNING"}
STOP_KEYS = ("root", "terminated", "already_final", "forced")
TREE_TIMEOUT = 60.0


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def settled_tree(observer, root_id: str, size: int) -> dict[str, dict[str, Any]] | None:
    """The subtree's rows once all ``size`` executions RUN and every leaf sleeps, else None.

    Once every leaf's ``nap`` node runs, no row of the tree changes until a
    stop arrives, so snapshots taken from then on can be compared.
    """
    rows = {row["id"]: row for row in observer.subtree(root_id)}
    if len(rows) != size or any(row["status"] != "RUNNING" for row in rows.values()):
        return None
    for execution_id in rows:
        if execution_id == root_id:
            continue
        naps = [n for n in observer.nodes(execution_id) if n["node_id"] == "nap"]
        if not naps or naps[0]["status"] != "RUNNING":
            return None
    return rows


def start_tree(cli, observer, graph: str = "parent", size: int = 3, user: str = "alice"):
    """``run.py run graphs.json GRAPH --user USER``: the process, the root id, the rows once settled."""
    process = cli.start("run", "graphs.json", graph, "--user", user)
    root_id = process.first_line()
    assert is_uuid(root_id), f"first stdout line is not an execution id: {root_id!r}\n{process.describe()}"

    def settled_or_exited():
        if process.popen.poll() is not None:
            return "exited"
        return settled_tree(observer, root_id, size)

    rows = wait_until(settled_or_exited, TREE_TIMEOUT, f"the {size} executions of {graph} {root_id} to be RUNNING")
    assert rows != "exited", f"run process ended early:\n{process.describe()}"
    return process, root_id, rows


def parse_stop_output(stdout: str) -> dict[str, list[str]]:
    """Parse ``run.py stop``: ``root: ID`` then ``key: N ids...`` for the three lists."""
    parsed: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, sep, rest = line.partition(":")
        key = key.strip()
        if not sep or key not in STOP_KEYS:
            continue
        words = rest.split()
        if key == "root":
            parsed[key] = words
            continue
        count, ids = int(words[0]), words[1:]
        assert len(ids) == count, f"{key}: announces {count} ids, lists {len(ids)}: {line!r}"
        parsed[key] = ids
    missing = [key for key in STOP_KEYS if key not in parsed]
    assert not missing, f"run.py stop output lacks {missing}:\n{stdout}"
    return parsed


def statuses_in(observer, root_id: str) -> dict[str, str]:
    return observer.subtree_statuses(root_id)
