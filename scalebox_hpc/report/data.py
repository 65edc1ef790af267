"""What ``scalebox report`` shows, read from PostgreSQL: plain, frozen values.

Every aggregate is one named query (sql/queries.sql, ``report_*``), so a report of an app with a
million tasks reads a few thousand rows; only the timeline reads executions one by one, at most
:data:`TIMELINE_LIMIT` of them (one in ``stride``, spread evenly by id).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from psycopg.pq import TransactionStatus

from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.sql import query
from scalebox_hpc.errors import NotFoundError

logger = logging.getLogger(__name__)

BUCKETS = 120
"""Time buckets of the charts over time (throughput, queue depth)."""
TIMELINE_LIMIT = 5000
"""The most execution bars in the timeline; beyond it the timeline is a sample (and says so)."""
TOP_STDERR = 20
STAGE_JOBS_LIMIT = 2000
CPU_COLUMNS = ("cpu_user_s", "cpu_system_s")
"""The sbx_task_execs columns core-hours are computed from (report_core_hours; migration 0014).
Migration 0014 (CPU and RSS per execution) is another change; until the schema has all of these
columns the report says "not recorded". Keep this and the query in step with that migration."""


@dataclass(frozen=True)
class AppInfo:
    """The app and the time span the report covers (epoch seconds, the database's clock)."""

    id: int
    name: str
    label: str | None
    status: str
    result: str | None
    cancelled: bool
    created_at: float
    finished_at: float | None
    now: float
    t0: float
    t1: float

    @property
    def snapshot(self) -> bool:
        """True while the app may still change (not FINISHED, or tasks still READY/RUNNING)."""
        return self.t1 >= self.now - 1e-6


@dataclass(frozen=True)
class Axis:
    """The time axis of the charts over time: ``count`` buckets of ``width`` seconds from ``t0``."""

    t0: float
    width: float
    count: int

    @staticmethod
    def over(t0: float, t1: float, count: int = BUCKETS) -> Axis:
        """``count`` buckets covering [t0, t1] (at least 1 ms each)."""
        return Axis(t0=t0, width=max((t1 - t0) / count, 0.001), count=count)


@dataclass(frozen=True)
class DurationStats:
    """Execution durations of one module (seconds) and its logarithmic histogram."""

    module: str
    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    slot_hours: float
    bins: tuple[tuple[int, int], ...] = ()
    """(k, count): durations in [10^(k/3), 10^((k+1)/3)) s; k = -9 also holds everything under 1 ms."""


@dataclass(frozen=True)
class Bar:
    """One execution in the timeline (epoch seconds; status -3 = still running)."""

    module: str
    host: str
    slot: str
    status: int
    start: float
    end: float
    task_id: int

    @property
    def lane(self) -> str:
        return f"{self.host} · {self.slot}"


@dataclass(frozen=True)
class Timeline:
    bars: tuple[Bar, ...]
    executions: int
    """Executions the app has in all (the bars are a sample when they are fewer)."""
    stride: int

    @property
    def sampled(self) -> bool:
        return self.stride > 1 or self.running_shown < self.running

    running: int = 0
    """tasks running now (drawn to the right edge, up to a fifth of the bars)"""

    @property
    def running_shown(self) -> int:
        return sum(1 for b in self.bars if b.status == -3)


@dataclass(frozen=True)
class Failure:
    module: str
    status: int
    tasks: int
    """tasks whose final status this is"""
    execs: int
    """executions (attempts, retried ones too) that ended so"""


@dataclass(frozen=True)
class StderrLine:
    module: str
    status: int
    line: str
    count: int
    example_task: int


@dataclass(frozen=True)
class Retries:
    module: str
    retried_tasks: int
    extra_attempts: int
    stalls: int
    lost_slots: int


@dataclass(frozen=True)
class Locality:
    module: str
    local: int
    remote: int
    no_holder: int
    no_inputs: int
    input_bytes_local: int
    input_bytes_other: int
    output_bytes: int

    @property
    def share(self) -> float | None:
        """The share of tasks with a preferred host that ran there (None: no such task)."""
        preferred = self.local + self.remote
        return self.local / preferred if preferred else None


@dataclass(frozen=True)
class StageJob:
    module: str
    job_id: str
    cluster: str
    state: str
    nodes: str
    submitted_at: float
    ended_at: float | None


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows; :func:`scalebox_hpc.report.html.render` takes only this."""

    app: AppInfo
    axis: Axis
    modules: tuple[str, ...]
    totals: dict[str, dict[int, int]]
    throughput: dict[str, tuple[int, ...]]
    """tasks reaching a final status per bucket"""
    queue_depth: dict[str, tuple[int, ...]]
    """READY tasks at the end of each bucket"""
    durations: tuple[DurationStats, ...]
    timeline: Timeline
    failures: tuple[Failure, ...]
    top_stderr: tuple[StderrLine, ...]
    retries: tuple[Retries, ...]
    stalls_by_host: tuple[tuple[str, int], ...]
    locality: tuple[Locality, ...]
    stage_jobs: tuple[StageJob, ...]
    stage_job_states: tuple[tuple[str, str, int], ...]
    stage_jobs_total: int
    core_hours: dict[str, float] | None
    """None: the schema records no CPU time (see CPU_COLUMNS)"""
    notes: tuple[str, ...] = field(default=())


_LOCALITY_COUNTS = ("local", "remote", "no_holder", "no_inputs", "input_bytes_local", "input_bytes_other",
                    "output_bytes")


def _rows(conn: Connection, name: str, **params: Any) -> list[dict[str, Any]]:
    return list(conn.execute(query(name), params).fetchall())


def series(rows: list[dict[str, Any]], modules: tuple[str, ...], key: str, count: int, *,
           carry: bool) -> dict[str, tuple[int, ...]]:
    """Per module, a value per bucket from (module, bucket, key) rows: missing buckets are 0, or
    (``carry``: a running value such as a queue depth) the previous bucket's value."""
    out: dict[str, list[int]] = {m: [0] * count for m in modules}
    seen: dict[str, dict[int, int]] = {}
    for r in rows:
        seen.setdefault(r["module"], {})[int(r["bucket"])] = int(r[key])
    for module, values in seen.items():
        line = out.setdefault(module, [0] * count)
        last = 0
        for b in range(count):
            if b in values:
                last = values[b]
                line[b] = last
            elif carry:
                line[b] = last
    return {m: tuple(v) for m, v in out.items()}


@dataclass(frozen=True)
class FineBin:
    """A row of report_durations: bin k holds durations in [10^(k/21), 10^((k+1)/21)) s."""

    k: int
    n: int
    seconds: float
    longest: float


FINE_PER_DECADE = 21
SHOWN_PER_DECADE = 3  # the histograms drawn merge 7 fine bins into one


def duration_stats(module: str, bins: list[FineBin]) -> DurationStats:
    """Count, mean, maximum and slot-hours (exact) and percentiles (read off the fine bins,
    interpolated geometrically inside a bin: within its width, about 11 %) of one module."""
    bins = sorted(bins, key=lambda b: b.k)
    n = sum(b.n for b in bins)
    total = sum(b.seconds for b in bins)
    longest = max((b.longest for b in bins), default=0.0)

    def percentile(q: float) -> float:
        rank, seen = q * n, 0
        for b in bins:
            if b.n and seen + b.n >= rank:
                lo = 10 ** (b.k / FINE_PER_DECADE) if b.k > -3 * FINE_PER_DECADE else 0.0
                hi = min(10 ** ((b.k + 1) / FINE_PER_DECADE), b.longest)
                frac = (rank - seen) / b.n
                value = lo * (hi / lo) ** frac if lo > 0 and hi > lo else lo + (hi - lo) * frac
                return min(max(value, 0.0), longest)
            seen += b.n
        return longest

    shown: dict[int, int] = {}
    for b in bins:
        coarse = b.k // (FINE_PER_DECADE // SHOWN_PER_DECADE)
        shown[coarse] = shown.get(coarse, 0) + b.n
    return DurationStats(module=module, n=n, mean=total / n if n else 0.0, p50=percentile(0.5), p90=percentile(0.9),
                         p99=percentile(0.99), max=longest, slot_hours=total / 3600.0,
                         bins=tuple(sorted(shown.items())))


def stride_for(executions: int, limit: int = TIMELINE_LIMIT) -> int:
    """One execution in ``stride`` keeps at most about ``limit`` bars."""
    return max(1, math.ceil(executions / limit)) if limit > 0 else 1


def read(conn: Connection, app_id: int, *, buckets: int = BUCKETS, timeline_limit: int = TIMELINE_LIMIT) -> ReportData:
    """Read the report of app ``app_id`` (a snapshot when it still runs), in one transaction, so
    every section shows the same moment (REPEATABLE READ: one snapshot for all the queries)."""
    with snapshot(conn):
        # the aggregates hash and sort up to every execution: memory for that, in this transaction only
        conn.execute("SET LOCAL work_mem = '64MB'")
        return _read(conn, app_id, buckets, timeline_limit)


@contextmanager
def snapshot(conn: Connection) -> Iterator[None]:
    """A read-only REPEATABLE READ transaction: every query inside sees the same moment. Inside
    a transaction the caller already has, its snapshot is used as it is."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        yield
        return
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        yield


def _read(conn: Connection, app_id: int, buckets: int, timeline_limit: int) -> ReportData:
    rows = _rows(conn, "report_app", app_id=app_id)
    if not rows:
        raise NotFoundError("app", app_id)
    a = rows[0]
    app = AppInfo(id=int(a["id"]), name=a["name"], label=a["label"], status=a["status"], result=a["result"],
                  cancelled=bool(a["cancelled"]), created_at=a["created_at"], finished_at=a["finished_at"],
                  now=a["now"], t0=a["t0"], t1=max(a["t1"], a["t0"]))
    axis = Axis.over(app.t0, app.t1, buckets)
    ax = {"app_id": app_id, "t0": axis.t0, "width": axis.width, "buckets": axis.count}

    totals: dict[str, dict[int, int]] = {}
    for r in _rows(conn, "report_module_totals", app_id=app_id):
        counts = totals.setdefault(r["module"], {})
        if r["status"] is not None:
            counts[int(r["status"])] = int(r["n"])
    modules = tuple(totals)

    fine: dict[str, list[FineBin]] = {}
    for r in _rows(conn, "report_durations", app_id=app_id):
        fine.setdefault(r["module"], []).append(
            FineBin(int(r["bin"]), int(r["n"]), float(r["seconds"]), float(r["longest"])))
    durations = tuple(duration_stats(module, bins) for module, bins in fine.items())

    executions = sum(d.n for d in durations)
    # running tasks get at most a fifth of the bars, the sample of executions the rest
    running = min(sum(c.get(-3, 0) for c in totals.values()), timeline_limit // 5)
    stride = stride_for(executions, timeline_limit - running)
    bars = tuple(
        Bar(module=r["module"], host=r["host"], slot=f"{r['module']}#{r['slot_seq']}" if r["slot_seq"] is not None
            else f"slot {r['slot_id'] or '?'}", status=int(r["status"]), start=r["started_at"],
            end=max(r["finished_at"], r["started_at"]), task_id=int(r["task_id"]))
        for r in _rows(conn, "report_timeline", app_id=app_id, stride=stride, limit=timeline_limit - running,
                       running_limit=running))

    core_hours = None
    columns = {r["column_name"] for r in _rows(conn, "report_exec_columns")}
    if all(c in columns for c in CPU_COLUMNS):
        core_hours = {r["module"]: float(r["core_hours"] or 0) for r in _rows(conn, "report_core_hours", app_id=app_id)}

    jobs = tuple(StageJob(module=r["module"], job_id=r["slurm_job_id"], cluster=r["cluster"], state=r["state"],
                          nodes=r["nodes"], submitted_at=r["submitted_at"], ended_at=r["ended_at"])
                 for r in _rows(conn, "report_stage_jobs", app_id=app_id, limit=STAGE_JOBS_LIMIT))
    states = tuple((r["module"], r["state"], int(r["n"]))
                   for r in _rows(conn, "report_stage_job_states", app_id=app_id))

    data = ReportData(
        app=app, axis=axis, modules=modules, totals=totals,
        throughput=series(_rows(conn, "report_throughput", **ax), modules, "n", axis.count, carry=False),
        queue_depth=series(_rows(conn, "report_queue_depth", **ax), modules, "depth", axis.count, carry=True),
        durations=durations,
        timeline=Timeline(bars=bars, executions=executions, stride=stride,
                          running=sum(c.get(-3, 0) for c in totals.values())),
        failures=tuple(Failure(module=r["module"], status=int(r["status"]), tasks=int(r["tasks"]),
                               execs=int(r["execs"])) for r in _rows(conn, "report_failures", app_id=app_id)),
        top_stderr=tuple(StderrLine(module=r["module"], status=int(r["status"]), line=r["line"], count=int(r["n"]),
                                    example_task=int(r["example_task"]))
                         for r in _rows(conn, "report_top_stderr", app_id=app_id, limit=TOP_STDERR)),
        retries=tuple(Retries(module=r["module"], retried_tasks=int(r["retried_tasks"]),
                              extra_attempts=int(r["extra_attempts"]), stalls=int(r["stalls"]),
                              lost_slots=int(r["lost_slots"])) for r in _rows(conn, "report_retries", app_id=app_id)),
        stalls_by_host=tuple((r["host"], int(r["n"])) for r in _rows(conn, "report_stalls_by_host", app_id=app_id)),
        locality=tuple(Locality(r["module"], *(int(r[k]) for k in _LOCALITY_COUNTS))
                       for r in _rows(conn, "report_locality", app_id=app_id)),
        stage_jobs=jobs, stage_job_states=states, stage_jobs_total=sum(n for _, _, n in states),
        core_hours=core_hours,
    )
    logger.debug("report of app %s read: %s modules, %s executions, %s timeline bars (stride %s)",
                 app_id, len(modules), executions, len(bars), stride)
    return data
