"""Repetitions, their summaries, and the process's resident memory."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Summary:
    """Min, median and max of a series of repetitions, with the series itself."""

    min: float
    median: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary | None:
        """The summary of ``samples``, or None when there are none."""
        if not samples:
            return None
        return cls(min(samples), statistics.median(samples), max(samples), tuple(samples))

    def to_json(self) -> dict[str, Any]:
        return {"min": self.min, "median": self.median, "max": self.max, "samples": list(self.samples)}


def pairwise_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """``numerators[i] / denominators[i]`` for each repetition ``i``."""
    return [n / d for n, d in zip(numerators, denominators) if d > 0]


@dataclass
class Figure:
    """One figure of the report, measured repetition by repetition.

    ``runtime``, ``floor``, ``pooled_floor`` and ``reference`` hold one sample
    per counted repetition, in the order they ran (floor, pooled floor,
    runtime, reference, floor, ...), so that ratios are taken repetition by
    repetition. ``floor`` is plain pykka (ThreadingActor) at the interpreter's
    default GIL switch interval, as the runtime runs; ``floor_50ms`` the same
    with the interval raised to 50 ms, which plain pykka needs for large
    trees; ``pooled_floor`` is the runtime's own actor type without a database;
    ``write_floor`` the runtime's stop statements for the same rows without
    actors (see write_floor.py).

    Attributes:
        database: "sqlite" or "postgresql".
        name: what was measured, for example "stop tree fan-out 4 depth 5".
        executions: executions per repetition.
        unit: "s" for durations (lower is better), "exec/s" for rates.
        target: the issue's target, for the reader; "" when there is none.
        target_ratio: the median ratio to the floor that meets the target.
        target_speedup: the median speedup over the reference that meets it.
        target_vs_pooled: the median runtime / pooled floor that meets it.
        extra: figures that are not series (memory, connections, checks).
        error: why the figure is incomplete, if it is.
    """

    database: str
    name: str
    executions: int
    unit: str = "s"
    target: str = ""
    target_ratio: float | None = None
    target_speedup: float | None = None
    target_vs_pooled: float | None = None
    runtime: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    floor_50ms: list[float] = field(default_factory=list)
    pooled_floor: list[float] = field(default_factory=list)
    write_floor: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def ratios(self) -> Summary | None:
        """Runtime over floor, repetition by repetition (the 50 ms floor where the default was not run)."""
        return Summary.of(pairwise_ratios(self.runtime, self.floor or self.floor_50ms))

    def persistence_ratios(self) -> Summary | None:
        """Runtime over the pooled floor (same actor type, no database), repetition by repetition."""
        return Summary.of(pairwise_ratios(self.runtime, self.pooled_floor))

    def speedups(self) -> Summary | None:
        """Reference duration over runtime duration, repetition by repetition."""
        return Summary.of(pairwise_ratios(self.reference, self.runtime))

    def verdict(self) -> str:
        """"met", "MISSED" or "" (no target, or nothing measured) for the medians."""
        checks: list[bool] = []
        ratios, speedups = self.ratios(), self.speedups()
        if self.target_ratio is not None and ratios is not None:
            better_when_lower = self.unit == "s"
            checks.append(ratios.median <= self.target_ratio if better_when_lower
                          else ratios.median >= self.target_ratio)
        if self.target_speedup is not None and speedups is not None:
            checks.append(speedups.median >= self.target_speedup)
        persistence = self.persistence_ratios()
        if self.target_vs_pooled is not None and persistence is not None:
            checks.append(persistence.median <= self.target_vs_pooled)
        if "target_met" in self.extra:
            checks.append(bool(self.extra["target_met"]))
        if not checks:
            return ""
        return "met" if all(checks) else "MISSED"

    def to_json(self) -> dict[str, Any]:
        def summary(series: Sequence[float]) -> dict[str, Any] | None:
            found = Summary.of(series)
            return found.to_json() if found else None

        ratios, speedups, persistence = self.ratios(), self.speedups(), self.persistence_ratios()
        return {
            "database": self.database, "name": self.name, "executions": self.executions,
            "unit": self.unit, "target": self.target, "verdict": self.verdict(),
            "runtime": summary(self.runtime), "floor": summary(self.floor),
            "floor_50ms": summary(self.floor_50ms),
            "pooled_floor": summary(self.pooled_floor),
            "write_floor": summary(self.write_floor),
            "ratio_to_pooled_floor": persistence.to_json() if persistence else None,
            "reference": summary(self.reference),
            "ratio_to_floor": ratios.to_json() if ratios else None,
            "speedup_vs_reference": speedups.to_json() if speedups else None,
            "extra": self.extra, "error": self.error,
        }


def proc_status_kib(field_name: str) -> int:
    """A ``kB`` field of /proc/self/status, such as VmRSS or VmHWM, in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field_name} not in /proc/self/status")
