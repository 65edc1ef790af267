"""``scalebox metrics``: the apps' state in the Prometheus text exposition format (0.0.4).

Made for node_exporter's textfile collector (a cron or scrontab line writes the file; nothing
runs in between): counters for what only grows (tasks created, executions and the seconds
they ran), gauges for the state now (tasks by status, queue depth, the oldest READY task's
age, live slots, stage jobs by state). Rates are the scraper's job (``rate()`` of a counter);
one recent rate is also given as a gauge for a quick look. :func:`collect` reads (SQL, named
queries ``metrics_*``), :func:`render` writes the text and does no I/O.

Not yet: the outbox depth of cross-cluster relaying (there is no outbox yet).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalebox_hpc.db.connection import Connection
from scalebox_hpc.db.sql import query
from scalebox_hpc.models import TaskStatus
from scalebox_hpc.report.data import snapshot

RECENT_SECONDS = 600.0
"""Without --app, apps FINISHED this recently are exported too: a scrape still sees their end."""


@dataclass
class Family:
    """One metric family: its name (a counter's ends in ``_total``), type, help and samples."""

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: object) -> None:
        self.samples.append(({k: str(v) for k, v in labels.items()}, value))


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers without a decimal point, other numbers in full precision; NaN and infinities
    as the format spells them."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The exposition text: each family's HELP and TYPE lines, then its samples."""
    out: list[str] = []
    for f in families:
        out.append(f"# HELP {f.name} {escape_help(f.help)}")
        out.append(f"# TYPE {f.name} {f.kind}")
        for labels, value in f.samples:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            out.append(f"{f.name}{{{text}}} {format_value(value)}" if text else f"{f.name} {format_value(value)}")
    return "\n".join(out) + "\n" if out else ""


def status_label(code: int) -> str:
    """A status code as a label value: ``ready``, ``ok``, ``timeout``, ``exit_1``, ``system_-104``."""
    return TaskStatus.describe(code).lower()


def _final(code: int) -> bool:
    return code >= 0 or code < -100


def families(apps: Sequence[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]],
             execs: Sequence[Mapping[str, Any]], slots: Sequence[Mapping[str, Any]],
             jobs: Sequence[Mapping[str, Any]], now: float) -> list[Family]:
    """The metric families from the rows of the ``metrics_*`` queries (pure: no database)."""
    info = Family("scalebox_app_info", "gauge", "An app exported here (1), with its name and status.")
    for a in apps:
        info.add(1, app=a["id"], name=a["name"], status=a["status"])
    stage = Family("scalebox_stage_jobs", "gauge", "Slurm stage jobs by module and state (as last seen).")
    for r in jobs:
        stage.add(int(r["n"]), app=r["app_id"], module=r["module"], state=str(r["state"]).lower())
    stamp = Family("scalebox_metrics_generated_timestamp_seconds", "gauge",
                   "When these values were read (the database's clock, Unix time).")
    stamp.add(now)
    return [info, *_task_families(tasks), *_exec_families(execs), *_slot_families(slots), stage, stamp]


def _task_families(tasks: Sequence[Mapping[str, Any]]) -> list[Family]:
    by_status = Family("scalebox_tasks", "gauge", "Tasks by module and status now.")
    created = Family("scalebox_tasks_created_total", "counter", "Tasks created (rows of sbx_tasks), by module.")
    finished = Family("scalebox_tasks_finished_total", "counter",
                      "Tasks in a final status (outcome ok or failed), by module; it drops only when `scalebox task "
                      "retry` or an OVERWRITE message sends finished tasks back, which Prometheus takes for a reset.")
    queue = Family("scalebox_queue_depth", "gauge", "READY tasks by module.")
    oldest = Family("scalebox_oldest_ready_age_seconds", "gauge",
                    "Age of the module's oldest READY task (by id) in seconds, 0 when none is READY.")
    recent = Family("scalebox_tasks_finished_recent_per_second", "gauge",
                    "Tasks that reached a final status in the last 60 s, per second (prefer rate() of the counters).")
    per_module: dict[tuple[str, str], dict[str, float]] = {}
    for r in tasks:
        key = (str(r["app_id"]), str(r["module"]))
        acc = per_module.setdefault(key, dict.fromkeys(("created", "ok", "failed", "ready", "recent", "age"), 0.0))
        acc["age"] = max(acc["age"], float(r["oldest_ready_age"] or 0))
        if r["status"] is None:  # a module without tasks
            continue
        code, n = int(r["status"]), int(r["n"])
        by_status.add(n, app=key[0], module=key[1], status=status_label(code))
        acc["created"] += n
        acc["recent"] += int(r["last_minute"]) if _final(code) else 0
        outcome = "ok" if code == TaskStatus.OK else "failed" if _final(code) else \
            "ready" if code == TaskStatus.READY else None
        if outcome:
            acc[outcome] += n
    for (app, module), acc in per_module.items():
        created.add(acc["created"], app=app, module=module)
        finished.add(acc["ok"], app=app, module=module, outcome="ok")
        finished.add(acc["failed"], app=app, module=module, outcome="failed")
        queue.add(acc["ready"], app=app, module=module)
        oldest.add(max(0.0, acc["age"]), app=app, module=module)
        recent.add(acc["recent"] / 60.0, app=app, module=module)
    return [by_status, created, finished, queue, oldest, recent]


def _exec_families(execs: Sequence[Mapping[str, Any]]) -> list[Family]:
    runs = Family("scalebox_task_executions_total", "counter",
                  "Executions (attempts) that ended, by module and status; retried attempts count too.")
    seconds = Family("scalebox_task_execution_seconds_total", "counter",
                     "Wall-clock seconds executions ran, by module.")
    busy: dict[tuple[str, str], float] = {}
    for r in execs:
        runs.add(int(r["n"]), app=r["app_id"], module=r["module"], status=status_label(int(r["status"])))
        key = (str(r["app_id"]), str(r["module"]))
        busy[key] = busy.get(key, 0.0) + float(r["seconds"] or 0)
    for (app, module), s in busy.items():
        seconds.add(s, app=app, module=module)
    return [runs, seconds]


def _slot_families(slots: Sequence[Mapping[str, Any]]) -> list[Family]:
    slot_status = Family("scalebox_slots", "gauge", "Slots by module, host and status (ended ones included).")
    live = Family("scalebox_live_slots", "gauge",
                  "Slots alive by module and host: not ended and heard from within two heartbeats.")
    alive: dict[tuple[str, str, str], int] = {}
    for r in slots:
        slot_status.add(int(r["n"]), app=r["app_id"], module=r["module"], host=r["host"], status=r["status"].lower())
        key = (str(r["app_id"]), str(r["module"]), str(r["host"]))
        alive[key] = alive.get(key, 0) + int(r["live"])
    for (app, module, host), n in alive.items():
        live.add(n, app=app, module=module, host=host)
    return [slot_status, live]


def collect(conn: Connection, app_id: int | None, recent_seconds: float = RECENT_SECONDS) -> list[Family]:
    """The metric families of app ``app_id``, or of every app not FINISHED (and those finished
    within ``recent_seconds``), read in one snapshot."""
    with snapshot(conn):
        apps = conn.execute(query("metrics_apps"), {"app_id": app_id, "recent_seconds": recent_seconds}).fetchall()
        ids = [int(a["id"]) for a in apps]
        params = {"app_ids": ids}
        tasks = conn.execute(query("metrics_tasks"), params).fetchall() if ids else []
        execs = conn.execute(query("metrics_execs"), params).fetchall() if ids else []
        slots = conn.execute(query("metrics_slots"), params).fetchall() if ids else []
        jobs = conn.execute(query("metrics_stage_jobs"), params).fetchall() if ids else []
        depth = conn.execute(query("outbox_depth"), {"app_id": app_id}).fetchall()
        row = conn.execute(query("server_epoch")).fetchone()
    outbox = Family("scalebox_outbox_depth", "gauge", "Messages waiting in the outbox for another database's app.")
    for d in depth:
        outbox.add(int(d["depth"]), app=d["app_id"], remote_app=d["remote_app_id"])
    return [*families(apps, tasks, execs, slots, jobs, float(row["now"]) if row else 0.0), outbox]


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename,
    so a collector reading the file sees the old or the new one, never half of one. The
    temporary name does not end in ``.prom``: the textfile collector skips it."""
    path = path.absolute()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: node_exporter may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
