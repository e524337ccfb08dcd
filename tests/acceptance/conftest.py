"""Fixtures for the acceptance suite: run.py driven as real subprocesses.

Every command runs ``python run.py ...`` with its working directory in a
fresh temporary directory, ``ACTORGRAPH_DATABASE`` removed from the
environment and ``--db URL`` passed explicitly. Output is read by threads so
that no read can block the test forever, and every process launched is killed
in teardown.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pytest

from tests.helpers import wait_until
from tests.integration.graphs import leaf

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"

# Generous bounds: a 2-core machine, Python start-up and imports in every process.
COMMAND_TIMEOUT = 60.0
LINE_TIMEOUT = 60.0

# Sleep lengths of the test graphs. LONG outlives every test by far: a tree that
# ends in time proves it was stopped. SHORT is what the --no-cascade children
# sleep through after their parent was terminated.
LONG_SLEEP = 300
SHORT_SLEEP = 10


def _two_children(graph: str, seconds: float) -> dict:
    return {
        "nodes": {
            "a": {"block": "agent", "input": {"graph": graph, "inputs": {"seconds": seconds}}},
            "b": {"block": "agent", "input": {"graph": graph, "inputs": {"seconds": seconds}}},
        }
    }


GRAPHS = {
    "graphs": {
        "leaf": leaf(),
        # A root with two children that sleep far longer than any test.
        "parent": _two_children("leaf", LONG_SLEEP),
        # A root with two children that end on their own after a short sleep.
        "short_parent": _two_children("leaf", SHORT_SLEEP),
        # A root with two children whose naps ignore stops: only a deadline ends them.
        "stubborn_parent": {"nodes": {name: {"block": "agent", "input": {"graph": "stubborn_leaf"}}
                                      for name in ("a", "b")}},
        "stubborn_leaf": {"nodes": {"nap": {"block": "sleep",
                                            "input": {"seconds": LONG_SLEEP, "ignore_stop": True}}}},
        # Sleeps `seconds`, then outputs `word`: checks --input parsing.
        "echo": {
            "nodes": {
                "s": {"block": "input", "input": {"name": "seconds"}},
                "w": {"block": "input", "input": {"name": "word"}},
                "nap": {"block": "sleep"},
                "out": {"block": "output", "input": {"name": "word"}},
            },
            "links": [
                {"from": "s.value", "to": "nap.seconds"},
                {"from": "w.value", "to": "nap.value"},
                {"from": "nap.value", "to": "out.value"},
            ],
        },
        "quick": {
            "nodes": {
                "v": {"block": "value", "input": {"value": 42}},
                "out": {"block": "output", "input": {"name": "answer"}},
            },
            "links": [{"from": "v.value", "to": "out.value"}],
        },
        "boom": {"nodes": {"f": {"block": "fail", "input": {"message": "kaboom"}}}},
    }
}


@dataclass
class Result:
    """A finished one-shot command."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"run.py {' '.join(self.args)} -> exit {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def json(self):
        return json.loads(self.stdout)


class CliProcess:
    """A long-running ``run.py`` process whose output is collected by threads."""

    def __init__(self, args: tuple[str, ...], popen: subprocess.Popen) -> None:
        self.args = args
        self.popen = popen
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(popen.stdout, self.stdout_lines), daemon=True),
            threading.Thread(target=self._pump, args=(popen.stderr, self.stderr_lines), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for line in iter(stream.readline, ""):
            sink.append(line.rstrip("\n"))
        stream.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def first_line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The first stdout line, waited for without ever blocking on the pipe."""
        wait_until(
            lambda: self.stdout_lines or self.popen.poll() is not None,
            timeout,
            f"the first stdout line of run.py {' '.join(self.args)}",
        )
        self._join_if_exited()
        assert self.stdout_lines, f"process ended without printing a line:\n{self.describe()}"
        return self.stdout_lines[0].strip()

    def _join_if_exited(self) -> None:
        if self.popen.poll() is not None:
            for thread in self._threads:
                thread.join(timeout=10)

    def wait(self, timeout: float = COMMAND_TIMEOUT) -> int:
        """Wait for the exit (bounded) and for the readers to drain; return the exit code."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run.py {' '.join(self.args)} still running after {timeout}s:\n{self.describe()}")
        for thread in self._threads:
            thread.join(timeout=10)
        return code

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill_hard(self) -> int:
        """SIGKILL and reap (a zombie would still look alive to a pid check)."""
        self.popen.send_signal(signal.SIGKILL)
        return self.wait()

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def describe(self) -> str:
        return (
            f"run.py {' '.join(self.args)} (exit {self.popen.poll()})\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )

    def terminate_now(self) -> None:
        kill_and_reap(self.popen, self._threads)


def kill_and_reap(popen: subprocess.Popen, readers: Iterable[threading.Thread]) -> None:
    """Kill ``popen`` if it still runs, wait for it, then for the threads reading its output (all bounded)."""
    if popen.poll() is None:
        popen.kill()
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for thread in readers:
        thread.join(timeout=5)


class Cli:
    """Launches run.py with ``--db`` pointing at the test database."""

    def __init__(self, cwd: Path, database_url: str) -> None:
        self.cwd = cwd
        self.database_url = database_url
        self.env = {k: v for k, v in os.environ.items() if k != "ACTORGRAPH_DATABASE"}
        self._processes: list[CliProcess] = []

    def argv(self, args: tuple[str, ...], db: str | None | bool) -> tuple[str, ...]:
        """Insert ``--db URL`` right after the command name (db=False: leave it out)."""
        if db is False or not args:
            return args
        url = self.database_url if db is None or db is True else db
        return (args[0], "--db", url, *args[1:])

    def start(self, *args: str, db: str | None | bool = None) -> CliProcess:
        argv = self.argv(args, db)
        popen = subprocess.Popen(
            [sys.executable, str(RUN_PY), *argv],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        process = CliProcess(argv, popen)
        self._processes.append(process)
        return process

    def call(self, *args: str, db: str | None | bool = None, timeout: float = COMMAND_TIMEOUT) -> Result:
        """Run a command to its end (bounded) and return its exit code and output."""
        process = self.start(*args, db=db)
        code = process.wait(timeout)
        return Result(process.args, code, process.stdout, process.stderr)

    def close(self) -> None:
        for process in self._processes:
            process.terminate_now()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The working directory of every run.py process, holding graphs.json."""
    path = tmp_path / "cwd"
    path.mkdir()
    (path / "graphs.json").write_text(json.dumps(GRAPHS, indent=2))
    return path


@pytest.fixture
def cli(workdir: Path, database_url: str) -> Iterator[Cli]:
    if not RUN_PY.exists():
        pytest.fail(f"{RUN_PY} does not exist")
    launcher = Cli(workdir, database_url)
    try:
        yield launcher
    finally:
        launcher.close()
