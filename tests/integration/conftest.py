"""Fixtures of the integration suite: runtimes that are always closed, and user blocks."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from actors import Runtime
from tests.helpers import Gates, Recorder


@pytest.fixture
def runtime_factory(database_url: str) -> Iterator[Callable[..., Runtime]]:
    """``make(graphs=None, blocks=None, **kwargs) -> Runtime`` on the test's database.

    ``blocks`` maps a block name to ``(fn, inputs, outputs)``; they are
    registered before ``graphs`` (a dict) is loaded. Every runtime made is
    closed in teardown, also when the test failed.
    """
    runtimes: list[Runtime] = []

    def make(graphs: dict[str, Any] | None = None, blocks: dict[str, tuple] | None = None, **kwargs: Any) -> Runtime:
        rt = Runtime(database=database_url, **kwargs)
        runtimes.append(rt)
        for name, (fn, inputs, outputs) in (blocks or {}).items():
            rt.register_block(name, fn, inputs=inputs, outputs=outputs)
        if graphs is not None:
            rt.load(graphs)
        return rt

    yield make
    errors: list[BaseException] = []
    for rt in reversed(runtimes):
        try:
            rt.close()
        except Exception as exc:  # close the others before reporting
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def gates() -> Iterator[Gates]:
    gates = Gates()
    yield gates
    gates.open_all()  # no hold block outlives the test


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
