"""Errors the runtime adds to the persistence layer's tree (one base class for all)."""
from __future__ import annotations

from persistence import ActorGraphError


class InvalidGraph(ActorGraphError, ValueError):
    """A graph file or dict that cannot run; the message names the graph and node."""


class InvalidInput(ActorGraphError, ValueError):
    """Arguments a caller passed that cannot be used (inputs that are not JSON, a bad limit)."""


class StopTimeout(ActorGraphError, TimeoutError):
    """A stop handed to another process did not see the subtree terminal in time."""
