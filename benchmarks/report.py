"""The printed table, the JSON file, and the description of the machine."""
from __future__ import annotations

import json
import os
import platform
import sqlite3
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Sequence

from benchmarks.measure import Figure, Summary

_HEADERS = ("db", "figure", "n", "runtime min/med/max", "floor min/med/max", "floor@50ms med",
            "ratio min/med/max", "pooled floor med", "vs pooled med", "write floor med", "reference med",
            "speedup min/med/max", "target", "")


def machine_info(server_versions: dict[str, str]) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_kib": _meminfo_kib("MemTotal"),
        "python": sys.version.split()[0],
        "pykka": _version("pykka"),
        "peewee": _version("peewee"),
        "psycopg2": _version("psycopg2-binary") or _version("psycopg2"),
        "sqlite": sqlite3.sqlite_version,
        "servers": server_versions,
    }


def format_table(figures: Sequence[Figure]) -> str:
    """The timed figures as an aligned text table, then memory, connections and errors."""
    rows = [_HEADERS] + [_row(figure) for figure in figures if figure.unit in ("s", "exec/s")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.extend(_notes(figures))
    return "\n".join(lines)


def format_header(machine: dict[str, Any], plan_description: str) -> str:
    return (f"actorgraph stop benchmark, {plan_description}\n"
            f"{machine['date']}  {machine['platform']}  {machine['cpu']} x{machine['cpu_count']}\n"
            f"python {machine['python']}  pykka {machine['pykka']}  peewee {machine['peewee']}"
            f"  sqlite {machine['sqlite']}  psycopg2 {machine['psycopg2']}\n"
            "durations in ms; rates in executions per second; ratio = runtime/floor (plain pykka"
            " ThreadingActor, at the default GIL switch interval;\nfloor@50ms: the same at 50 ms, and"
            " the ratio's base where the floor column is '-'),\nvs pooled = runtime/pooled floor (the runtime's actor type, no database),"
            "\nwrite floor = the runtime's stop statements for the same rows, one transaction, no actors;"
            " speedup = reference/runtime; all per repetition")


def write_json(path: str, machine: dict[str, Any], plan: dict[str, Any],
               figures: Sequence[Figure]) -> None:
    document = {"machine": machine, "plan": plan, "figures": [f.to_json() for f in figures]}
    with open(path, "w", encoding="utf-8") as out:
        json.dump(document, out, indent=2, default=str)
        out.write("\n")


def _row(figure: Figure) -> tuple[str, ...]:
    scale, digits = (1000.0, 1) if figure.unit == "s" else (1.0, 0)
    reference = Summary.of(figure.reference)
    pooled, persistence = Summary.of(figure.pooled_floor), figure.persistence_ratios()
    floor_50 = Summary.of(figure.floor_50ms)
    write = Summary.of(figure.write_floor)
    return (
        figure.database, figure.name, str(figure.executions),
        _triple(Summary.of(figure.runtime), scale, digits),
        _triple(Summary.of(figure.floor), scale, digits),
        f"{floor_50.median * scale:.{digits}f}" if floor_50 else "-",
        _triple(figure.ratios(), 1.0, 2, "x"),
        f"{pooled.median * scale:.{digits}f}" if pooled else "-",
        f"{persistence.median:.2f}x" if persistence else "-",
        f"{write.median * scale:.{digits}f}" if write else "-",
        f"{reference.median * scale:.{digits}f}" if reference else "-",
        _triple(figure.speedups(), 1.0, 1, "x"),
        figure.target or "-",
        "ERROR" if figure.error else figure.verdict(),
    )


def _triple(summary: Summary | None, scale: float, digits: int, suffix: str = "") -> str:
    if summary is None:
        return "-"
    values = (summary.min, summary.median, summary.max)
    return "/".join(f"{v * scale:.{digits}f}" for v in values) + suffix


def _notes(figures: Sequence[Figure]) -> list[str]:
    notes: list[str] = []
    for figure in figures:
        if figure.unit == "KiB/exec" and figure.runtime:
            e = figure.extra
            notes.append(
                f"{figure.database}: memory, {figure.executions} live executions:"
                f" {figure.runtime[0]:.1f} KiB per execution (VmRSS {e['rss_before_kib']}"
                f" -> {e['rss_running_kib']} KiB, VmHWM {e['vmhwm_kib']} KiB)"
                f"  target {figure.target}: {figure.verdict()}")
        elif figure.unit == "connections":
            notes.append(f"{figure.database}: database connections: {_connections_note(figure.extra)}")
        for key, value in figure.extra.items():
            if key.startswith("check"):
                notes.append(f"{figure.database}: {figure.name}: {key}: {value}")
        if figure.error:
            notes.append(f"{figure.database}: {figure.name}: ERROR {figure.error}")
    return ["", *notes] if notes else []


def _connections_note(extra: dict[str, Any]) -> str:
    stats = extra.get("runtime_stats")
    if isinstance(stats, dict) and stats:
        opened = {key: (value or {}).get("connections_opened", "n/a") if isinstance(value, dict)
                  else "n/a" for key, value in stats.items()}
        opened_text = ", ".join(f"{key} {value}" for key, value in opened.items())
    else:
        opened_text = "n/a"
    return (f"opened per runtime (rt.stats()): {opened_text}; held at once, counted from outside:"
            f" max {extra.get('open_peak', 'n/a')} over {extra.get('samples', 0)} samples"
            f" (largest tree {extra.get('largest_tree', '-')} executions)")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(field_name: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
