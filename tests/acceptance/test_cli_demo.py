"""run.py demo: a generated tree, stopped after a delay, printed TERMINATED."""
from __future__ import annotations

import re
import signal

from tests.acceptance.support import STATUSES
from tests.helpers import wait_until

STATUS_WORD = re.compile(r"\b(" + "|".join(sorted(STATUSES)) + r")\b")
DEMO_TIMEOUT = 120.0


def test_demo_ends_with_a_tree_whose_every_status_is_terminated(cli, observer):
    demo = cli.call("demo", "--depth", "2", "--fanout", "2", "--stop-after", "1", timeout=DEMO_TIMEOUT)

    assert demo.returncode == 0, demo.describe()
    assert "Traceback" not in demo.stderr
    rows = observer.query("SELECT id, status, parent_id FROM graph_execution")
    # depth 2, fan-out 2: 1 + 2 + 4 executions, every one TERMINATED.
    assert len(rows) == 7
    assert {row["status"] for row in rows} == {"TERMINATED"}
    assert sum(row["parent_id"] is None for row in rows) == 1

    # The output ends with the final tree: after the last line that names a
    # status other than TERMINATED (the progress lines), at least one line per
    # execution names TERMINATED.
    lines = demo.stdout.splitlines()
    live = [i for i, line in enumerate(lines) if set(STATUS_WORD.findall(line)) - {"TERMINATED"}]
    tail = lines[live[-1] + 1:] if live else lines
    assert sum("TERMINATED" in line for line in tail) >= 7, demo.describe()


def test_sigint_on_demo_stops_the_tree_and_exits_3(cli, observer):
    demo = cli.start("demo", "--depth", "1", "--fanout", "2", "--stop-after", "300")
    wait_until(
        lambda: demo.popen.poll() is not None or _statuses(observer) == ["RUNNING"] * 3,
        DEMO_TIMEOUT,
        "the demo's 3 executions to be RUNNING",
    )
    assert demo.popen.poll() is None, demo.describe()

    demo.send_signal(signal.SIGINT)

    assert demo.wait() == 3, demo.describe()
    assert _statuses(observer) == ["TERMINATED"] * 3
    assert "Traceback" not in demo.stderr


def _statuses(observer) -> list[str] | None:
    """Every execution's status, or None while the demo has not made the schema yet."""
    try:
        return [r["status"] for r in observer.query("SELECT status FROM graph_execution")]
    except Exception:  # the table does not exist yet (sqlite3 or psycopg2 error)
        return None
