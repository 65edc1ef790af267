"""Slurm stage jobs in the database: what runs each module, and its scaling bounds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.sql import query
from scalebox_hpc.errors import NotFoundError
from scalebox_hpc.models import RECOVER_LIMIT

JobKey = tuple[str, str]
"""A stage job's key: (Slurm job id, cluster; '' unnamed)."""


@dataclass(frozen=True)
class StageModule:
    """One module as the autoscaler decides on it (a ``stage_modules`` row): its spec (JSON),
    the `scalebox stage scale` overrides, its queue and its live jobs."""

    id: int
    name: str
    spec: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    min_jobs: int | None = None
    """The `scalebox stage scale` override (None: the pipeline file's ``slurm.min_jobs``)."""
    max_jobs: int | None = None
    """The `scalebox stage scale` override (None: the pipeline file's ``slurm.max_jobs``)."""
    scaled_at: datetime | None = None
    """The module's last autoscale (the per-module rate limit counts from here)."""
    now: datetime | None = None
    """The database's clock when the row was read."""
    app_status: str = "RUNNING"
    cancelled: bool = False
    ready: int = 0
    """Its READY tasks."""
    running: int = 0
    """Its RUNNING tasks."""
    live_jobs: int = 0
    """Its stage jobs not ended and not draining."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StageModule:
        """The module of a ``stage_modules`` row."""
        return cls(
            id=int(row["id"]), name=str(row["name"]), spec=dict(row["spec"] or {}), seq=int(row["seq"]),
            min_jobs=row["min_jobs"], max_jobs=row["max_jobs"], scaled_at=row["scaled_at"], now=row["now"],
            app_status=str(row["app_status"]), cancelled=bool(row["cancelled"]), ready=int(row["ready"]),
            running=int(row["running"]), live_jobs=int(row["live_jobs"]),
        )

    @property
    def sink_modules(self) -> list[str]:
        """The modules its spec sends messages to."""
        return [str(m) for m in self.spec.get("sink_modules") or []]

    def scaled_within(self, interval: timedelta) -> bool:
        """True when the module was autoscaled less than ``interval`` ago (by the database's clock)."""
        return self.scaled_at is not None and self.now is not None and self.now - self.scaled_at < interval


@dataclass(frozen=True)
class StageJobRow:
    """One Slurm stage job as the database last saw it (a ``stage_jobs`` row: ``sbx_stage_jobs``
    with its module's name and ``submit_via``). Frozen: the autoscaler's refresh makes new ones
    with :func:`dataclasses.replace`."""

    id: int
    module_id: int
    slurm_job_id: str
    app_id: int = 0
    module: str = ""
    """The module's name."""
    cluster: str = ""
    state: str = "PENDING"
    """The Slurm state as last seen."""
    draining: bool = False
    nodes: str = ""
    """The nodes it runs on (or asked for), ``,``-separated."""
    exit_code: int | None = None
    reason: str = ""
    submitted_by: str = ""
    submitted_at: datetime | None = None
    updated_at: datetime | None = None
    ended_at: datetime | None = None
    end_time: datetime | None = None
    """Slurm's EndTime while it runs (its launchers' walltime)."""
    alloc_cpus: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    submit_via: tuple[str, ...] = ()
    """The module's cluster's ``submit_via`` argv prefix."""
    drain_seen: bool = False
    """An autoscale pass scaled its module knowing it drains (0020)."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StageJobRow:
        """The job of a ``stage_jobs`` row."""
        return cls(
            id=int(row["id"]), module_id=int(row["module_id"]), slurm_job_id=str(row["slurm_job_id"]),
            app_id=int(row["app_id"]), module=str(row["module"]), cluster=str(row["cluster"] or ""),
            state=str(row["state"]), draining=bool(row["draining"]), nodes=str(row["nodes"] or ""),
            exit_code=row["exit_code"], reason=str(row["reason"] or ""), submitted_by=str(row["submitted_by"]),
            submitted_at=row["submitted_at"], updated_at=row["updated_at"], ended_at=row["ended_at"],
            end_time=row["end_time"], alloc_cpus=row["alloc_cpus"], started_at=row["started_at"],
            finished_at=row["finished_at"], submit_via=tuple(str(a) for a in row["submit_via"] or ()),
            drain_seen=bool(row["drain_seen"]),
        )


@dataclass(frozen=True)
class JobModule:
    """The module of one stage job, locked (a ``lock_stage_job_module`` row), and whether the
    job drains."""

    id: int
    spec: dict[str, Any]
    draining: bool = False
    min_jobs: int | None = None
    max_jobs: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobModule:
        """The module of a ``lock_stage_job_module`` row."""
        return cls(id=int(row["id"]), spec=dict(row["spec"] or {}), draining=bool(row["draining"]),
                   min_jobs=row["min_jobs"], max_jobs=row["max_jobs"])


@dataclass(frozen=True)
class AutoscaleGate:
    """What decides whether an app's autoscale pass runs (an ``autoscale_gate`` row, read under
    the app's lock)."""

    now: datetime
    """The database's clock."""
    autoscaled_at: datetime | None = None
    """The app's last pass."""
    cluster: str = ""
    """The app's cluster ('' unnamed)."""
    calls_last_minute: int = 0
    """Slurm commands of the passes of the last minute on that cluster."""
    running_jobs: int = 0
    """Its stage jobs RUNNING as last seen, not ended, not draining."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AutoscaleGate:
        """The gate of an ``autoscale_gate`` row."""
        return cls(now=row["now"], autoscaled_at=row["autoscaled_at"], cluster=str(row["cluster"]),
                   calls_last_minute=int(row["calls_last_minute"]), running_jobs=int(row["running_jobs"]))

    def passed_within(self, interval: timedelta) -> bool:
        """True when the app had a pass less than ``interval`` ago."""
        return self.autoscaled_at is not None and self.now - self.autoscaled_at < interval


def try_lock(conn: Connection, app_id: int) -> bool:
    """Take the app's autoscale lock for the current transaction; False when another holds it."""
    row = conn.execute(query("autoscale_lock"), {"app_id": app_id}).fetchone()
    return bool(row and row["got"])


def lock_modules(conn: Connection, app_id: int) -> None:
    """Lock the app's module rows (id order) until the transaction ends: before any job row."""
    conn.execute(query("lock_app_modules"), {"app_id": app_id}).fetchall()


def modules(conn: Connection, app_id: int) -> list[StageModule]:
    """Per module (``seq`` order): spec, bounds, READY/RUNNING counts, live (non-draining) jobs, app status."""
    return [StageModule.from_row(r) for r in conn.execute(query("stage_modules"), {"app_id": app_id}).fetchall()]


def jobs(conn: Connection, app_id: int, *, include_ended: bool = False) -> list[StageJobRow]:
    """The app's stage jobs, newest first: the live ones (and the ended ones when asked)."""
    rows = conn.execute(query("stage_jobs"), {"app_id": app_id, "include_ended": include_ended}).fetchall()
    return [StageJobRow.from_row(r) for r in rows]


def input_holders(conn: Connection, module_id: int, *, limit: int = 10_000) -> list[tuple[str, int]]:
    """(host, inputs held) for the inputs of the module's oldest ``limit`` READY tasks, most first."""
    rows = conn.execute(query("input_holders"), {"module_id": module_id, "limit": limit}).fetchall()
    return [(r["host"], int(r["inputs"])) for r in rows]


def record_job(
    conn: Connection, app_id: int, module_id: int, slurm_job_id: str, cluster: str = "", nodes: str = "",
) -> int:
    """Remember a submitted job (PENDING), with the nodes it asked for, if any."""
    row = conn.execute(query("insert_stage_job"), {
        "app_id": app_id, "module_id": module_id, "slurm_job_id": slurm_job_id, "cluster": cluster,
        "nodes": nodes,
    }).fetchone()
    return int(row["id"])  # type: ignore[index]


def update_job(
    conn: Connection, job_row_id: int, *, state: str, ended: bool, nodes: str | None = None,
    exit_code: int | None = None, reason: str | None = None, end_time: datetime | None = None,
) -> None:
    """Store what Slurm last said of a job; ``ended`` stamps ``ended_at`` once; ``end_time``
    (Slurm's, while it runs) is what its launchers take as their walltime."""
    conn.execute(query("update_stage_job"), {
        "id": job_row_id, "state": state, "ended": ended, "nodes": nodes, "exit_code": exit_code,
        "reason": reason, "end_time": end_time,
    })


def mark_draining(conn: Connection, slurm_job_id: str, cluster: str = "") -> bool:
    """The job's launchers drain: it no longer counts as capacity. False if unknown or already so."""
    return conn.execute(query("drain_stage_job"), {"slurm_job_id": slurm_job_id, "cluster": cluster}).fetchone() \
        is not None


def drain_seen(conn: Connection, slurm_job_id: str, cluster: str = "") -> bool:
    """Whether an autoscale pass scaled the job's module knowing it drains; False for an unknown job."""
    row = conn.execute(query("stage_job_drain_seen"), {"slurm_job_id": slurm_job_id, "cluster": cluster}).fetchone()
    return bool(row and row["drain_seen"])


def mark_drain_seen(conn: Connection, job_row_ids: Sequence[int]) -> None:
    """Mark these draining jobs (row ids) as seen by the current pass (in its transaction)."""
    if job_row_ids:
        conn.execute(query("mark_drain_seen"), {"ids": list(job_row_ids)})


def lock_job_module(conn: Connection, slurm_job_id: str, cluster: str = "") -> JobModule | None:
    """The module of a stage job (spec, bounds, the job's ``draining``), its row locked until the
    transaction ends; None for a job the database does not know."""
    row = conn.execute(query("lock_stage_job_module"), {"slurm_job_id": slurm_job_id, "cluster": cluster}).fetchone()
    return None if row is None else JobModule.from_row(row)


def running_jobs(conn: Connection, module_id: int, slurm_job_id: str, cluster: str = "") -> int:
    """How many jobs of the module run and do not drain, counting the asking one."""
    row = conn.execute(query("running_stage_jobs"), {
        "module_id": module_id, "slurm_job_id": slurm_job_id, "cluster": cluster}).fetchone()
    return int(row["n"]) if row else 0


def mark_scaled(conn: Connection, module_id: int) -> None:
    """Stamp the module's last autoscale (the rate limit counts from here)."""
    conn.execute(query("set_module_scaled"), {"module_id": module_id})


def set_bounds(conn: Connection, app_id: int, module: str, min_jobs: int | None, max_jobs: int | None) -> None:
    """Override the module's min/max jobs (None: back to the pipeline's value)."""
    if conn.execute(query("set_module_bounds"), {
        "app_id": app_id, "module": module, "min_jobs": min_jobs, "max_jobs": max_jobs,
    }).fetchone() is None:
        raise NotFoundError("module", module)


def db_now(conn: Connection) -> datetime:
    """The database server's clock (leases, submissions and recovery all use it)."""
    row = conn.execute(query("db_now")).fetchone()
    assert row is not None
    return cast(datetime, row["now"])


def recover_expired(conn: Connection) -> int:
    """Return the tasks of dead launchers (expired leases) to READY before deciding on capacity:
    when a stage's last job was cancelled, no launcher is left to do it. Also unbinds the tasks
    bound to a dead host. Both through the launcher functions, over the apps the caller acts on."""
    rows = conn.execute(query("recover_expired"), {"every": 0.0, "bound_limit": RECOVER_LIMIT}).fetchall()
    return sum(1 for r in rows if r["id"] is not None)


def launch_state(conn: Connection, app_id: int) -> tuple[bool, tuple[str, str] | None]:
    """(the app is the caller's, its launch settings or None), in one read of the app's row."""
    row = conn.execute(query("launch_settings"), {"app_id": app_id}).fetchone()
    if row is None:
        return False, None
    if row["stage_python"] is None or row["stage_work_root"] is None:
        return bool(row["mine"]), None
    return bool(row["mine"]), (str(row["stage_python"]), str(row["stage_work_root"]))


def launch_settings(conn: Connection, app_id: int) -> tuple[str, str] | None:
    """(python, work root) the app's first stage job was submitted with; None before that."""
    return launch_state(conn, app_id)[1]


def save_launch_settings(conn: Connection, app_id: int, python: str, work_root: str) -> None:
    """Keep them with the app, once: every later job of the app (submitted by a launcher, by
    `scalebox status` elsewhere) uses the same interpreter and work root; no task can change
    them (they are not variables: audit F6)."""
    conn.execute(query("save_launch_settings"), {"app_id": app_id, "python": python, "work_root": work_root})


def job_flags(conn: Connection, slurm_job_id: str, cluster: str = "") -> tuple[bool, datetime | None]:
    """(asked to drain by `scalebox stage stop`, when its time limit expires as the app's last
    autoscale pass saw it) of a stage job, in one read; (False, None) for an unknown job."""
    row = conn.execute(query("stage_job_draining"), {"slurm_job_id": slurm_job_id, "cluster": cluster}).fetchone()
    return (False, None) if row is None else (bool(row["draining"]), row["end_time"])


def is_draining(conn: Connection, slurm_job_id: str, cluster: str = "") -> bool:
    """Whether the job was asked to drain (`scalebox stage stop`); False for an unknown job."""
    return job_flags(conn, slurm_job_id, cluster)[0]


def autoscale_gate(conn: Connection, app_id: int) -> AutoscaleGate:
    """What decides whether an autoscale pass runs (read under the app's lock): see :class:`AutoscaleGate`."""
    row = conn.execute(query("autoscale_gate"), {"app_id": app_id}).fetchone()
    if row is None:
        raise NotFoundError("app", app_id)
    return AutoscaleGate.from_row(row)


def mark_app_scaled(conn: Connection, app_id: int) -> None:
    """Stamp the app's autoscale pass: the other stage jobs of the app skip theirs for an interval."""
    conn.execute(query("set_app_autoscaled"), {"app_id": app_id})


def slurm_calls_by_cluster(conn: Connection) -> dict[str, int]:
    """Slurm commands of the autoscale passes of the last minute, per cluster (every app's)."""
    return {str(r["cluster"]): int(r["calls"]) for r in conn.execute(query("slurm_calls_by_cluster")).fetchall()}


def record_slurm_calls(conn: Connection, cluster: str, app_id: int, calls: int) -> None:
    """Count the Slurm commands one pass ran against its cluster's budget (and prune old counts)."""
    conn.execute(query("record_slurm_calls"), {"cluster": cluster, "app_id": app_id, "calls": calls})


def slurm_calls_last_minute(conn: Connection, app_id: int) -> tuple[int, int]:
    """(Slurm commands, passes) of the autoscale passes in the last minute on the app's cluster."""
    row = conn.execute(query("slurm_calls_last_minute"), {"app_id": app_id}).fetchone()
    if row is None:
        raise NotFoundError("app", app_id)
    return int(row["calls"]), int(row["passes"])


def job_started(conn: Connection, slurm_job_id: str, cluster: str = "", *, alloc_cpus: int | None) -> bool:
    """Record a stage job's allocated CPUs and its start (kept from the first call); False for a
    job the database does not know."""
    return conn.execute(query("stage_job_started"), {
        "slurm_job_id": slurm_job_id, "cluster": cluster, "alloc_cpus": alloc_cpus}).fetchone() is not None


def job_finished(conn: Connection, slurm_job_id: str, cluster: str = "") -> bool:
    """Record that a stage job's launcher left now (the end of its allocated core-hours)."""
    return conn.execute(query("stage_job_finished"), {
        "slurm_job_id": slurm_job_id, "cluster": cluster}).fetchone() is not None


def slurm_call_summary(conn: Connection, app_id: int) -> list[dict[str, Any]]:
    """Per cluster ('' = unnamed): ``last_minute``, ``last_hour`` and ``app_last_hour`` (this
    app's) Slurm commands counted, and the ``records`` (passes, cancels) they came in."""
    return list(conn.execute(query("slurm_calls_summary"), {"app_id": app_id}).fetchall())
