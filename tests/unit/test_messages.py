"""Messages and errors: frozen, keyword-only dataclasses and one error tree."""
from __future__ import annotations

import dataclasses

import pytest

from actors import (
    ActorGraphError,
    ExecutionRecord,
    InvalidGraph,
    NotFound,
    PermissionDenied,
    Stop,
    StopAck,
)


def test_stop_defaults():
    stop = Stop(user_id="alice")
    assert (stop.user_id, stop.cascade, stop.reason, stop.wait_timeout) == ("alice", True, "stopped by user", 15.0)


@pytest.mark.parametrize(
    "message",
    [Stop(user_id="alice"), StopAck(execution_id="x", terminated=("x",), already_final=(), forced=())],
)
def test_messages_are_frozen(message):
    field = dataclasses.fields(message)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(message, field, "changed")
    assert message == dataclasses.replace(message)
    hash(message)


def test_messages_are_keyword_only():
    with pytest.raises(TypeError):
        Stop("alice")  # type: ignore[misc]
    with pytest.raises(TypeError):
        StopAck("x", ("x",), (), ())  # type: ignore[misc]
    assert all(f.kw_only for f in dataclasses.fields(Stop))
    assert all(f.kw_only for f in dataclasses.fields(StopAck))


def test_stop_ack_reports_tuples_of_ids():
    ack = StopAck(execution_id="r", terminated=("r", "c"), already_final=("d",), forced=("c",))
    assert [f.name for f in dataclasses.fields(StopAck)] == ["execution_id", "terminated", "already_final", "forced"]
    assert ack.terminated == ("r", "c") and ack.forced == ("c",)


def test_execution_record_is_frozen_with_the_issue_fields():
    names = [f.name for f in dataclasses.fields(ExecutionRecord)]
    assert names == [
        "id", "graph_id", "user_id", "status", "parent_id", "created_at", "started_at", "ended_at",
        "inputs", "outputs", "error", "stop_reason",
    ]
    assert ExecutionRecord.__dataclass_params__.frozen


@pytest.mark.parametrize("error", [NotFound, PermissionDenied, InvalidGraph])
def test_errors_share_one_base(error):
    assert issubclass(error, ActorGraphError)
    assert issubclass(ActorGraphError, Exception)
    assert str(error("execution x: why")) == "execution x: why"


def test_every_message_dataclass_is_frozen_and_keyword_only():
    import actors.messages

    classes = [
        value for value in vars(actors.messages).values()
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == "actors.messages"
    ]
    assert {Stop, StopAck} <= set(classes)
    for cls in classes:
        assert cls.__dataclass_params__.frozen, cls.__name__
        assert all(f.kw_only for f in dataclasses.fields(cls)), cls.__name__
