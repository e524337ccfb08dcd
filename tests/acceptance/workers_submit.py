"""A submitter process for the worker acceptance tests: an ``actors.Client`` that hosts nothing.

    python -m tests.acceptance.workers_submit URL GRAPH USER COUNT [USER COUNT ...]

Registers the blocks of ``tests.acceptance.worker_blocks`` (so that the
graphs that use them validate), loads the worker graphs, then submits
``COUNT`` roots of ``GRAPH`` per user, the users taking turns, and prints
``USER EXECUTION_ID`` for each, in submission order. Exit 0 when every
submit returned an id; an exception ends it with a traceback and exit 1.
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    url, graph, rest = argv[0], argv[1], argv[2:]
    if not rest or len(rest) % 2:
        print("usage: workers_submit URL GRAPH USER COUNT [USER COUNT ...]", file=sys.stderr)
        return 2
    counts = [(rest[i], int(rest[i + 1])) for i in range(0, len(rest), 2)]

    from actors import Client
    from tests.acceptance import worker_blocks
    from tests.acceptance.workers_support import WORKER_GRAPHS

    with Client(url) as client:
        worker_blocks.register(client)
        client.load(WORKER_GRAPHS)
        for turn in range(max(count for _, count in counts)):
            for user, count in counts:
                if turn < count:
                    execution_id = client.submit(graph, user_id=user, inputs={})
                    print(user, execution_id, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
