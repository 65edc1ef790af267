#!/usr/bin/env python3
"""`scalebox report` and `scalebox metrics` at scale: how long they take on an app of N tasks.

Fills a fresh app with N synthetic tasks in SQL (generate_series; triggers off, so it takes
seconds, not the hours real runs would): 3 modules, 16 hosts of 4 slots, an hour of history,
90 % OK, failures of two kinds with stderr, 10 % retried, 1 % stalled, READY and RUNNING tasks,
a third of the tasks with a preferred host. Then times `data.read` + `html.render` (the
report) and `metrics.collect` + `metrics.render`, and prints one JSON object: the seconds of
each (median of --repeat), the HTML size, the timeline's bars and stride, and the counts the
report shows next to the counts SQL gives (they must agree). Not a timed assertion: numbers on
a shared 2-core machine mean little alone.

Usage: python benchmarks/report.py [--tasks 1000000] [--repeat 3] [--keep] [--html FILE]
       (SCALEBOX_DSN, else the embedded database; the fill needs a superuser for
       session_replication_role, as the test database's `postgres` is)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import Connection, connect
from scalebox_hpc.node import resolve_dsn
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.report import data, html, metrics

PIPELINE = "name: bench-report\nmodules:\n  a: {sink_modules: [b]}\n  b: {sink_modules: [c]}\n  c: {}\n"
HOSTS, SLOTS_PER_HOST, HOUR = 16, 4, 3600

# One row per task: module by i (50/30/20 %), final status by i % 100, created over an hour.
FILL_TASKS = """
INSERT INTO sbx_tasks (app_id, module_id, body, status, attempts, host, pref_host, slot_id,
                       created_at, started_at, finished_at)
SELECT %(app)s, m.id, 'task-' || i, s.status, CASE WHEN i %% 10 = 3 THEN 2 ELSE 1 END * (s.status <> -1)::int,
       CASE WHEN s.status <> -1 THEN 'h' || (i %% %(hosts)s) END,
       CASE WHEN i %% 3 = 0 THEN 'h' || (CASE WHEN i %% 12 = 0 THEN i + 1 ELSE i END %% %(hosts)s) END,
       NULL, %(t0)s::timestamptz + make_interval(secs => (i::double precision / %(n)s) * %(span)s * 0.8),
       CASE WHEN s.status <> -1 THEN %(t0)s::timestamptz + make_interval(secs => (i::double precision / %(n)s)
            * %(span)s * 0.8 + 5) END,
       CASE WHEN s.status NOT IN (-1, -3) THEN %(t0)s::timestamptz + make_interval(secs => (i::double precision
            / %(n)s) * %(span)s * 0.8 + 5 + (i %% 17) * 0.7) END
FROM generate_series(1, %(n)s) AS i
CROSS JOIN LATERAL (SELECT CASE WHEN i %% 10 < 5 THEN 'a' WHEN i %% 10 < 8 THEN 'b' ELSE 'c' END AS name) k
JOIN sbx_modules m ON m.app_id = %(app)s AND m.name = k.name
CROSS JOIN LATERAL (SELECT CASE i %% 100 WHEN 11 THEN 1 WHEN 22 THEN 1 WHEN 33 THEN 1 WHEN 44 THEN 1
                                         WHEN 55 THEN 1 WHEN 66 THEN 124 WHEN 77 THEN 124
                                         WHEN 88 THEN -1 WHEN 99 THEN -1 WHEN 98 THEN -3
                                         WHEN 97 THEN 123 ELSE 0 END AS status) s
"""
# One execution per attempt that ended: a retried task's first attempt failed (exit 1), a stalled
# one's last attempt is 123; RUNNING tasks' current attempt has no execution yet.
FILL_EXECS = """
INSERT INTO sbx_task_execs (task_id, attempt, slot_id, host, status, started_at, finished_at, stderr,
                            input_bytes, output_bytes)
SELECT t.id, a.attempt, sl.id, t.host,
       CASE WHEN a.attempt < t.attempts THEN 1 ELSE t.status END,
       t.started_at - make_interval(secs => (t.attempts - a.attempt) * 2),
       COALESCE(t.finished_at, t.started_at + interval '1 second')
           - make_interval(secs => (t.attempts - a.attempt) * 2),
       CASE WHEN (CASE WHEN a.attempt < t.attempts THEN 1 ELSE t.status END) <> 0
            THEN E'some context\\nerror: <bad> input ' || (t.id %% 7) || E'\\n' ELSE '' END,
       (t.id %% 1000) * 1024, (t.id %% 100) * 512
FROM sbx_tasks t
CROSS JOIN LATERAL generate_series(1, t.attempts - (t.status = -3)::int) AS a (attempt)
LEFT JOIN sbx_slots sl ON sl.module_id = t.module_id AND sl.host = t.host AND sl.seq = t.id %% %(per_host)s
WHERE t.app_id = %(app)s
"""
FILL_RUNNING = """
UPDATE sbx_tasks t SET slot_id = sl.id
FROM sbx_slots sl
WHERE t.app_id = %(app)s AND t.status = -3 AND sl.module_id = t.module_id AND sl.host = t.host
  AND sl.seq = t.id %% %(per_host)s
"""
FILL_SLOTS = """
INSERT INTO sbx_slots (module_id, host, seq, status, heartbeat_at)
SELECT m.id, 'h' || h, s, 'EXITED', now() - interval '1 hour'
FROM sbx_modules m, generate_series(0, %(hosts)s - 1) AS h, generate_series(0, %(per_host)s - 1) AS s
WHERE m.app_id = %(app)s
"""


def fill(conn: Connection, tasks: int) -> int:
    """A new app with ``tasks`` synthetic tasks (see the module doc); returns its id."""
    spec_dir = Path("/tmp") / "sbx-bench-report"
    spec_dir.mkdir(exist_ok=True)
    for name in ("a", "b", "c"):
        (spec_dir / name).mkdir(exist_ok=True)
        (spec_dir / name / "run.sh").write_text("#!/bin/sh\ntrue\n")
        (spec_dir / name / "run.sh").chmod(0o755)
    (spec_dir / "app.yaml").write_text(PIPELINE)
    app_id = apps.create_app(conn, load_pipeline(str(spec_dir / "app.yaml")))
    t0 = conn.execute("SELECT now() - interval '1 hour' AS t").fetchone()["t"]  # type: ignore[index]
    params: dict[str, Any] = {"app": app_id, "n": tasks, "hosts": HOSTS, "per_host": SLOTS_PER_HOST, "t0": t0,
                              "span": HOUR}
    with conn.transaction():
        # triggers off (locality, NOTIFY): synthetic rows carry their own preferred hosts
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(FILL_SLOTS, params)
        conn.execute(FILL_TASKS, params)
        conn.execute(FILL_EXECS, params)
        conn.execute(FILL_RUNNING, params)
    conn.execute("ANALYZE sbx_tasks")
    conn.execute("ANALYZE sbx_task_execs")
    conn.commit()
    return app_id


def sql_counts(conn: Connection, app_id: int) -> dict[str, int]:
    """What the report's numbers must equal, counted directly."""
    row = conn.execute("""
        SELECT count(*) AS tasks, count(*) FILTER (WHERE status = -1) AS ready,
               count(*) FILTER (WHERE status > 0 OR status < -100) AS failed,
               (SELECT count(*) FROM sbx_task_execs e JOIN sbx_tasks x ON x.id = e.task_id
                WHERE x.app_id = %(app)s) AS execs
        FROM sbx_tasks WHERE app_id = %(app)s""", {"app": app_id}).fetchone()
    conn.commit()
    return {k: int(v) for k, v in (row or {}).items()}


def report_counts(d: data.ReportData) -> dict[str, int]:
    return {"tasks": sum(sum(c.values()) for c in d.totals.values()),
            "ready": sum(c.get(-1, 0) for c in d.totals.values()),
            "failed": sum(f.tasks for f in d.failures),
            "execs": d.timeline.executions,
            "queue_depth_now": sum(q[-1] for q in d.queue_depth.values() if q)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the app (default: delete it afterwards)")
    parser.add_argument("--html", default=None, help="also write the report to this file")
    args = parser.parse_args()
    dsn = resolve_dsn()
    out: dict[str, Any] = {"tasks": args.tasks}
    with connect(dsn) as conn:
        t = time.perf_counter()
        app_id = fill(conn, args.tasks)
        out["fill_s"] = round(time.perf_counter() - t, 2)
        out["app_id"] = app_id
        try:
            report_s, page, d = [], "", None
            for _ in range(args.repeat):
                t = time.perf_counter()
                d = data.read(conn, app_id)
                page = html.render(d)
                report_s.append(time.perf_counter() - t)
            metrics_s = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                text = metrics.render(metrics.collect(conn, app_id))
                metrics_s.append(time.perf_counter() - t)
            assert d is not None
            out.update({
                "report_s": round(statistics.median(report_s), 3), "report_runs_s": [round(x, 3) for x in report_s],
                "html_bytes": len(page.encode()), "timeline_bars": len(d.timeline.bars),
                "timeline_stride": d.timeline.stride,
                "metrics_s": round(statistics.median(metrics_s), 3), "metrics_bytes": len(text.encode()),
                "report_counts": report_counts(d), "sql_counts": sql_counts(conn, app_id),
            })
            if args.html:
                Path(args.html).write_text(page, encoding="utf-8")
        finally:
            if not args.keep:
                conn.execute("DELETE FROM sbx_apps WHERE id = %(app)s", {"app": app_id})
                conn.commit()
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
