"""actorgraph's benchmarks.

``python -m benchmarks.stop_tree`` measures the persisted cascading stop of
the runtime against two yardsticks measured in the same run: the floor (a
plain pykka tree of the same shape, no database) and the reference algorithm
that the runtime replaces (a recursive asyncio stop, one transaction per
execution, on the same database and the same rows).

Modules:
    shapes: the trees that are built and their graph documents.
    floor: the plain pykka trees and pykka's bare start-and-stop rate.
    reference: the recursive asyncio stop.
    database: the benchmark's own connections (observe, reset, drop).
    measure: repetitions, summaries, resident memory.
    report: the printed table, the JSON file and the machine description.
    stop_tree: the command line and the order in which figures are run.
"""
