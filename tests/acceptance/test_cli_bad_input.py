"""Bad input: exactly one line on stderr, exit 2, no traceback, nothing written."""
from __future__ import annotations

import json

import pytest

from tests.helpers import database_snapshot

UNREACHABLE_POSTGRES = "postgresql://postgres@127.0.0.1:1/x"


def _write_bad_files(workdir) -> None:
    (workdir / "invalid.json").write_text('{"graphs": {"g": ')
    unknown_block = {"graphs": {"g": {"nodes": {"x": {"block": "no_such_block"}}}}}
    (workdir / "invalid_graph.json").write_text(json.dumps(unknown_block))


# id -> (argv after "run.py", where --db goes: None = the test database after
# the command name, False = no --db, a string = that URL).
BAD_INPUTS = {
    "missing file": (("run", "no_such_file.json", "quick", "--user", "alice"), None),
    "invalid JSON": (("run", "invalid.json", "quick", "--user", "alice"), None),
    "invalid graph": (("run", "invalid_graph.json", "g", "--user", "alice"), None),
    "unknown graph id": (("run", "graphs.json", "no_such_graph", "--user", "alice"), None),
    "malformed --input": (("run", "graphs.json", "quick", "--user", "alice", "--input", "novalue"), None),
    "unreachable database": (("run", "graphs.json", "quick", "--user", "alice"), UNREACHABLE_POSTGRES),
    "unknown command": (("frobnicate",), None),
    "missing argument": (("run", "graphs.json"), None),
    "stop without id": (("stop", "--user", "alice"), None),
    "negative stop --timeout": (("stop", "00000000-0000-4000-8000-000000000000", "--user", "alice",
                                 "--timeout", "-1"), None),
    "non-integer --limit": (("list", "--limit", "many"), None),
}


def _check_one_clear_line(result) -> None:
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(result.stderr_lines) == 1, f"expected exactly one stderr line:\n{result.describe()}"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_on_a_fresh_database_exits_2_and_writes_nothing(case, cli, workdir, database_url):
    _write_bad_files(workdir)
    args, db = BAD_INPUTS[case]
    before = database_snapshot(database_url)

    result = cli.call(*args, db=db)

    _check_one_clear_line(result)
    # Not even a schema: the database (or the SQLite file) stays as it was.
    assert database_snapshot(database_url) == before
    assert not (workdir / "actorgraph.db").exists(), "--db was ignored: a default database appeared"


def test_bad_inputs_leave_a_used_database_unchanged(cli, workdir, database_url):
    _write_bad_files(workdir)
    seed = cli.call("run", "graphs.json", "quick", "--user", "alice")
    assert seed.returncode == 0, seed.describe()
    before = database_snapshot(database_url)
    assert before.get("graph_execution"), "the seed run left no row"

    for case, (args, db) in BAD_INPUTS.items():
        result = cli.call(*args, db=db)
        _check_one_clear_line(result)
        assert database_snapshot(database_url) == before, f"{case} changed the database"


ANY_ID = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize("args", [("list",), ("tree", ANY_ID), ("watch", ANY_ID), ("stop", ANY_ID, "--user", "alice")],
                         ids=lambda args: args[0])
def test_commands_that_only_read_or_stop_refuse_a_sqlite_file_that_does_not_exist(args, cli, workdir):
    # Before, watch and stop created the (mistyped) database and then said
    # the id did not exist (exit 5), leaving an empty database behind.
    missing = workdir / "mistyped.db"

    result = cli.call(*args, db=f"sqlite:///{missing}")

    _check_one_clear_line(result)
    assert "does not exist" in result.stderr_lines[0], result.describe()
    assert not missing.exists(), "the command created the database"
