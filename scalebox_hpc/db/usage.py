"""Resources per app and module: what the executions used and what the stage jobs held.

Reads the ``sbx_usage`` view (also queryable with ``psql``: ``SELECT * FROM sbx_usage``):
CPU core-hours of the executions that measured it (user + system of each run's process tree),
their wall hours, the core-hours the module's stage jobs were allocated (CPUs x elapsed, a
live job's up to now) and the efficiency used / allocated; the largest peak RSS of one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.sql import query


@dataclass(frozen=True)
class ModuleUsage:
    """One module's row of ``sbx_usage``."""

    module: str
    tasks: int
    executions: int
    measured: int
    """Executions whose CPU was measured (the others are left out of ``cpu_core_hours``)."""
    cpu_core_hours: float | None
    """CPU used (user + system) by the measured executions, in core-hours; None: none measured."""
    wall_hours: float | None
    """Wall time of all the executions, summed (hours); None: no execution."""
    alloc_core_hours: float | None
    """Allocated CPUs x elapsed time of the module's stage jobs; None: no job recorded it."""
    efficiency: float | None
    """cpu_core_hours / alloc_core_hours; None without an allocation."""
    max_rss_kb: int | None
    """The largest peak resident set of one process of one execution (KiB); None: not measured."""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ModuleUsage:
        """From a ``sbx_usage`` row (numeric columns come back as Decimal or float)."""
        def num(key: str) -> float | None:
            value = row[key]
            return None if value is None else float(value)

        return cls(
            module=str(row["module"]), tasks=int(row["tasks"]), executions=int(row["executions"]),
            measured=int(row["measured"]), cpu_core_hours=num("cpu_core_hours"), wall_hours=num("wall_hours"),
            alloc_core_hours=num("alloc_core_hours"), efficiency=num("efficiency"),
            max_rss_kb=None if row["max_rss_kb"] is None else int(row["max_rss_kb"]),
        )


def app_usage(conn: Connection, app_id: int) -> list[ModuleUsage]:
    """The app's modules' resources, in pipeline order (every module, also those without tasks)."""
    return [ModuleUsage.from_row(r) for r in conn.execute(query("app_usage"), {"app_id": app_id}).fetchall()]
