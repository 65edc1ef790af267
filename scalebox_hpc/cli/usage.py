"""The resources table of `scalebox app show` (and `status`): core-hours used and allocated,
efficiency, peak RSS, per module."""

from __future__ import annotations

from collections.abc import Sequence

from scalebox_hpc.cli.common import _one_line
from scalebox_hpc.db.usage import ModuleUsage

NOT_KNOWN = "-"


def _hours(value: float | None) -> str:
    if value is None:
        return NOT_KNOWN
    return f"{value:.4f}" if value < 100 else f"{value:.0f}"


def _rss(kb: int | None) -> str:
    if kb is None:
        return NOT_KNOWN
    if kb >= 1024 * 1024:
        return f"{kb / (1024 * 1024):.1f} GiB"
    return f"{kb / 1024:.1f} MiB"


def usage_lines(rows: Sequence[ModuleUsage]) -> list[str]:
    """The table as lines: one per module with executions, plus a note for executions whose CPU
    was not measured (Podman/Docker containers, srun steps: see the README); [] when none ran."""
    shown = [r for r in rows if r.executions]
    if not shown:
        return []
    width = max(6, *(len(_one_line(r.module)) for r in shown))
    lines = [f"  {'module':<{width}} {'tasks':>7} {'execs':>7} {'cpu core-h':>10} {'wall h':>8} "
             f"{'alloc core-h':>12} {'efficiency':>10} {'max RSS':>10}"]
    unmeasured = 0
    for r in shown:
        eff = NOT_KNOWN if r.efficiency is None else f"{r.efficiency:.1%}"
        lines.append(f"  {_one_line(r.module):<{width}} {r.tasks:>7} {r.executions:>7} {_hours(r.cpu_core_hours):>10} "
                     f"{_hours(r.wall_hours):>8} {_hours(r.alloc_core_hours):>12} {eff:>10} {_rss(r.max_rss_kb):>10}")
        unmeasured += r.executions - r.measured
    if unmeasured:
        lines.append(f"  ({unmeasured} execution(s) without a CPU measurement are not in cpu core-h)")
    return lines
