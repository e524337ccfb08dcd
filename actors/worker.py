"""A worker's claim loop: take submitted roots from PostgreSQL and run them here.

PostgreSQL is the only coordinator. A submit inserts a QUEUED root with no
owner and NOTIFYs ``actorgraph_claim``; every worker LISTENs, and polls
every ``POLL_INTERVAL`` in case a notice was missed. A claim
(``persistence.ClaimRoots``) moves roots to RUNNING under this runtime's id
in one transaction, with the global limits checked in the same statement;
the root's whole tree then runs here, where a parent holds its children's
actor references.

The same loop recovers runtimes whose lease lapsed (``Store.recover_lost``,
one process at a time under an advisory lock), so a worker killed with
``kill -9`` has its executions ended within about
``STALE_AFTER + RECOVER_EVERY`` (at once on the same host, where its pid is
seen gone).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from actors.catalog import Bundle, Catalog
from actors.errors import InvalidGraph
from persistence import ClaimedRoot, ClaimRoots, DatabaseError, LeaseLost, Store, utcnow

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0   # the fallback when no NOTIFY arrives
RECOVER_EVERY = 2.0   # how often a worker looks for lost runtimes


class Claimer:
    """Claims roots for one worker runtime, up to ``concurrency`` running at once."""

    def __init__(self, store: Store, catalog: Catalog, runtime_id: str, *, concurrency: int,
                 per_user: int | None, per_graph: int | None,
                 spawn: Callable[[ClaimedRoot, Bundle], None]) -> None:
        self._store = store
        self._catalog = catalog
        self._runtime_id = runtime_id
        self._concurrency = concurrency
        self._per_user = per_user
        self._per_graph = per_graph
        self._spawn = spawn
        # Roots claimed here and not yet ended; touched by this loop and by
        # the actors' last turns (root_ended), hence the lock.
        self._running: set[str] = set()
        self._lock = threading.Lock()
        # version -> its bundle, or None if a block it needs is not registered here.
        self._bundles: dict[str, Bundle | None] = {}
        self._blocks_seen = 0
        self._claiming = threading.Event()
        self._claiming.set()
        self._closed = threading.Event()
        self._notices = store.claim_notices()
        self._thread = threading.Thread(target=self._loop, name="actorgraph-claimer", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def root_ended(self, execution_id: str) -> None:
        """A root claimed here ended (any thread): its slot is free, so claim again now."""
        with self._lock:
            if execution_id not in self._running:
                return
            self._running.discard(execution_id)
        self._notices.wake()

    def pause(self) -> None:
        """Claim nothing more (draining, or the lease is lost)."""
        self._claiming.clear()
        self._notices.wake()

    def close(self) -> None:
        self._claiming.clear()
        self._closed.set()
        self._notices.shut_down(self._thread)

    def _loop(self) -> None:
        next_recovery = next_refresh = 0.0
        payloads: list[str] = []
        while not self._closed.is_set():
            try:
                if time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + RECOVER_EVERY
                    self._store.recover_lost()
                # Stored versions are read again once per poll, or at once
                # when a submit names one this worker has not seen.
                if time.monotonic() >= next_refresh or any(p not in self._bundles for p in payloads):
                    next_refresh = time.monotonic() + POLL_INTERVAL
                    self._refresh_versions()
                if self._claiming.is_set():
                    self._claim()
            except LeaseLost:
                self._claiming.clear()
            except DatabaseError as exc:
                # Reads and writes already retried; the outage is logged once, by them.
                logger.debug("claim loop (runtime %s): %s", self._runtime_id, exc)
            except Exception:  # noqa: BLE001 - keep the worker alive; the next round may succeed
                logger.exception("claim loop failed (runtime %s)", self._runtime_id)
            payloads = self._notices.wait(POLL_INTERVAL)

    def _claim(self) -> None:
        """Claim while slots are free and roots wait; each claim is one short transaction."""
        versions = tuple(version for version, bundle in self._bundles.items() if bundle is not None)
        while self._claiming.is_set():
            free = self._concurrency - self.running
            if free <= 0 or not versions:
                return
            (claimed,) = self._store.write(ClaimRoots(
                runtime_id=self._runtime_id, versions=versions, limit=free, per_user=self._per_user,
                per_graph=self._per_graph, at=utcnow()), independent=True)
            if not claimed:
                return
            with self._lock:
                self._running.update(root.id for root in claimed)
            for root in claimed:
                bundle = self._bundles[root.graph_version]
                assert bundle is not None  # only runnable versions are claimed
                self._spawn(root, bundle)

    def _refresh_versions(self) -> None:
        """Learn stored versions: runnable here if all their blocks are registered (again when blocks change)."""
        blocks = len(self._catalog.blocks)
        if blocks != self._blocks_seen:
            self._blocks_seen = blocks
            self._bundles = {version: b for version, b in self._bundles.items() if b is not None}
        for version in self._store.graph_versions():
            if version not in self._bundles:
                self._bundles[version] = self._read_bundle(version)

    def _read_bundle(self, version: str) -> Bundle | None:
        stored = self._store.graph_definition(version)
        if stored is None:
            return None
        graph_id, definition = stored
        try:
            return self._catalog.stored_bundle(version, graph_id, definition)
        except InvalidGraph as exc:
            logger.info("runtime %s does not claim graph %s version %s: %s", self._runtime_id, graph_id,
                        version[:12], exc)
            return None
