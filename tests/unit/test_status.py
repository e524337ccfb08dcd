"""The status machine: one table shared by memory and SQL."""
from __future__ import annotations

import itertools

import pytest

import persistence
from actors import ExecutionStatus

S = ExecutionStatus
ALLOWED = {
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.TERMINATED), (S.QUEUED, S.FAILED),
    (S.RUNNING, S.COMPLETED), (S.RUNNING, S.FAILED), (S.RUNNING, S.TERMINATED),
}


def test_status_is_a_str_enum_of_the_database_strings():
    assert [s.value for s in S] == ["QUEUED", "RUNNING", "COMPLETED", "FAILED", "TERMINATED"]
    assert all(isinstance(s, str) and s == s.value for s in S)
    assert S("TERMINATED") is S.TERMINATED
    assert persistence.ExecutionStatus is S


@pytest.mark.parametrize("current, target", list(itertools.product(S, S)))
def test_transition_table(current, target):
    expected = (current, target) in ALLOWED
    assert persistence.can_transition(current, target) is expected
    assert persistence.can_transition(current.value, target.value) is expected
    assert (target in persistence.TRANSITIONS[current]) is expected


def test_terminal_statuses_never_change():
    assert persistence.TERMINAL == {S.COMPLETED, S.FAILED, S.TERMINATED}
    for status in persistence.TERMINAL:
        assert persistence.TRANSITIONS[status] == frozenset()
        assert status.is_terminal
    assert not S.QUEUED.is_terminal and not S.RUNNING.is_terminal


def test_sources_of_a_write_come_from_the_table():
    assert set(persistence.sources_of(S.TERMINATED)) == {S.QUEUED, S.RUNNING}
    assert set(persistence.sources_of(S.COMPLETED)) == {S.RUNNING}
    assert set(persistence.sources_of(S.RUNNING)) == {S.QUEUED}
    assert persistence.sources_of(S.QUEUED) == ()


def test_unknown_status_is_rejected():
    with pytest.raises(ValueError):
        persistence.can_transition("RUNNING", "DONE")
