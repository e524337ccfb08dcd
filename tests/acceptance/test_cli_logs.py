"""ACTORGRAPH_LOG_FORMAT=json: one JSON object per log record, with the execution's ids as fields."""
from __future__ import annotations

import json


def test_json_logs_carry_execution_parent_and_root_ids(cli, observer):
    cli.env = {**cli.env, "ACTORGRAPH_LOG": "INFO", "ACTORGRAPH_LOG_FORMAT": "json"}
    run = cli.call("run", "graphs.json", "short_parent", "--user", "alice", "--stop-after", "0.5")

    assert run.returncode == 3, run.describe()
    root = run.stdout.splitlines()[0]
    records = [json.loads(line) for line in run.stderr_lines]  # every line is one JSON object
    assert records, run.describe()
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    about = [r for r in records if "execution_id" in r]
    tree = {row["id"]: row for row in observer.subtree(root)}
    assert {r["execution_id"] for r in about} == set(tree), "every execution logs, with its id as a field"
    for record in about:
        row = tree[record["execution_id"]]
        assert record["parent_id"] == row["parent_id"] and record["root_id"] == root, record


def test_text_logs_stay_the_default(cli):
    cli.env = {**cli.env, "ACTORGRAPH_LOG": "INFO"}
    run = cli.call("run", "graphs.json", "quick", "--user", "alice")

    assert run.returncode == 0, run.describe()
    assert run.stderr_lines and not any(line.startswith("{") for line in run.stderr_lines)
    assert any(" INFO " in line for line in run.stderr_lines)
