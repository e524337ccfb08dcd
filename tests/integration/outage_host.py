"""A runtime in a process of its own, for the close-during-an-outage test.

    python -m tests.integration.outage_host URL

It starts the ``tree`` graph (a root with three children that sleep far
longer than any test) and prints ``root ID``. On the line ``close`` on stdin
it calls ``rt.close(timeout=1)``, then prints ``closed SECONDS ok`` or
``closed SECONDS error TYPE: MESSAGE`` and exits. A process of its own,
because a runtime whose process still lives is not lost (its pid is alive),
so nothing would recover its rows; a runtime that closed during an outage
and exited is what a later runtime or ``run.py stop`` must clean up after.
"""
from __future__ import annotations

import sys
import time

from actors import Runtime
from tests.integration import graphs as g

USER = "alice"
CLOSE_TIMEOUT = 1.0
GRAPHS = g.graphs(leaf=g.leaf(), tree=g.agents("leaf", 3, {"seconds": g.LONG}))


def main(url: str) -> int:
    rt = Runtime(url)
    rt.load(GRAPHS)
    root = rt.start("tree", user_id=USER)
    print(f"root {root}", flush=True)
    for line in sys.stdin:
        if line.strip() == "close":
            break
    began = time.monotonic()
    try:
        rt.close(timeout=CLOSE_TIMEOUT)
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - reported to the test, which judges it
        outcome = f"error {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"closed {time.monotonic() - began:.3f} {outcome}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
