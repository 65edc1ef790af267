#!/usr/bin/env python3
"""A simulated fleet on one PostgreSQL: K launcher processes, each a node of S slots.

Each emulated node is one OS process (multiprocessing, ``forkserver`` by default: a clean
server process that has imported scalebox forks the nodes, so 200 of them start in seconds
instead of 200 interpreter start-ups on 2 cores) running a real
:class:`~scalebox_hpc.launcher.launcher.Launcher` (host ``node-K``, S slots, one
:class:`~scalebox_hpc.launcher.dispatcher.Dispatcher`, a ``Wakeups`` and a ``Listener``) whose
runtime is fake: a run sleeps T ms in the slot's thread and exits 0 (no process per task).

Per point (K nodes, direct or through PgBouncer) on a fresh app: tasks are kept topped up
(COPY bulk submit), the nodes are started staggered, the window opens once all are up (and a
settle second has passed), and closes ``--seconds`` later. Reported:

- ``tasks_per_s``: tasks finished (status >= 0 in sbx_tasks) at the window's end minus at its
  start, over the window's length;
- ``gap_ms`` p50/p99: per slot, the next execution's started_at minus the previous one's
  finished_at (sbx_task_execs, executions started inside the window): the slot's idle time
  between two tasks = handing the result to the dispatcher + getting the next task (a
  prefetched one, or waiting for a claim statement). The end-to-end proxy of claim + hand-off.
  Executions that recovery recorded (status 123: a lease expired, the row spans claim →
  recovery, not a run) are left out of the gaps and counted as ``lease_expired`` (those
  finished in the window): a node too starved to heart-beat within its lease loses its
  prefetched tasks to other nodes, which run them again;
- ``slot_claim_ms`` p50/p99: the time a slot spends in its port's ``claim`` (0 on a prefetch
  hit; the wait for the node's claim statement otherwise), measured in the nodes;
- ``claim_stmt_ms`` / ``handoff_stmt_ms`` p50/p99: the dispatcher's batched statements
  (``claim_for_slots``, ``complete_many``: the group-committed hand-off) timed around the
  database round trip, in the nodes, for statements begun in the window;
- ``server_connections``: client backends of the database in pg_stat_activity (peak and
  median over the window, the benchmark's own sampling connection excluded); through
  PgBouncer also its ``SHOW POOLS`` row (server and client connections) for the database;
- the dispatchers' counters summed over the nodes (whole run, not only the window);
- ``raw_reference`` and ``ratio_to_raw`` (unless ``--no-reference``): right after the point, K
  processes on the same path each run the least a PostgreSQL queue does (claim up to S rows with
  SKIP LOCKED, sleep T ms, mark them done: no lease, heartbeat, execution record or message) on a
  table of their own over a window as long; the point's tasks/s over theirs. What this box can
  do at all with K nodes, measured beside us, so the ratio means more than the absolute numbers.

A point that cannot run (direct connections that would not fit the server's
max_connections — this server is shared, so it is not tried —, nodes failing to start) is
recorded with its reason instead.

Usage:
    python benchmarks/fleet.py [--nodes 10,50,100,200] [--task-ms 10] [--slots 32] [--seconds 30]
        [--both | --pgbouncer | --direct] [--direct-dsn DSN] [--bouncer-dsn DSN]
Defaults: postgresql://postgres@127.0.0.1:55432/sbx_fleet and
postgresql://postgres:sbxpgb@127.0.0.1:6433/sbx_fleet (the database is created when missing).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import os
import queue as stdqueue
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

DIRECT = "postgresql://postgres@127.0.0.1:55432/sbx_fleet"
BOUNCER = "postgresql://postgres:sbxpgb@127.0.0.1:6433/sbx_fleet"
PIPELINE = """
name: fleet-{tag}
modules:
  sleep:
    slots: [".*:{slots}"]
    arguments: {{max_idle_polls: 1000000, sleep_interval_seconds: 1, heartbeat_seconds: 10}}
"""
PRELOAD = ["scalebox_hpc.launcher.launcher", "scalebox_hpc.db.queue", "scalebox_hpc.db.notify",
           "scalebox_hpc.launcher.dispatcher", "scalebox_hpc.launcher.slot", "psycopg"]
CONN_MARGIN = 20
"""Server connections left free for the other users of the shared server."""


# -- the fake runtime (runs in the nodes) ------------------------------------------------------
class SleepRun:
    """A run that lasts ``seconds`` in the waiting thread and exits 0."""

    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    def wait(self, timeout: float | None = None) -> Any:
        from scalebox_hpc.runtime.base import Outcome

        left = self.until - time.monotonic()
        if left > 0:
            if timeout is not None and timeout < left:
                time.sleep(timeout)
                return None
            time.sleep(left)
        return Outcome(0)

    def kill(self, grace: float = 5.0) -> Any:
        from scalebox_hpc.runtime.base import Outcome

        self.until = 0.0
        return Outcome(-15, timed_out=True)


class SleepSession:
    """One slot's session: every run sleeps; its output files are created empty."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def start(self, spec: Any) -> SleepRun:
        for path in (spec.stdout_path, spec.stderr_path):
            Path(path).touch()
        return SleepRun(self.seconds)

    def close(self) -> None:
        """Nothing to release."""

    def host_path(self, path: str) -> str | None:
        return path


class SleepRuntime:
    """A ContainerRuntime whose runs sleep in-process."""

    name = "sleep"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def open(self, spec: Any) -> SleepSession:
        return SleepSession(self.seconds)


Samples = list[tuple[float, float]]
"""(wall-clock start, seconds) per timed call."""


def _timed(samples: Samples, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, t0 = time.time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            samples.append((wall, time.perf_counter() - t0))
    return wrapper


def node_main(index: int, app_id: int, dsn: str, env: dict[str, str], task_ms: float, work_root: str,
              report: Any, stop: multiprocessing.synchronize.Event, window: Any) -> None:
    """One emulated node: a real Launcher with sleeping runs until ``stop``; then it reports its
    dispatcher's counters and the timings of the window ``window`` (two doubles: start, end)."""
    os.environ.update(env)
    try:
        from scalebox_hpc.db.notify import Listener, listen_dsn
        from scalebox_hpc.db.queue import PgQueue
        from scalebox_hpc.launcher import dispatcher as dmod
        from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
        from scalebox_hpc.launcher.wakeups import Wakeups

        claim_stmt: Samples = []
        complete_stmt: Samples = []
        slot_claim: Samples = []

        def factory() -> PgQueue:
            q = PgQueue(dsn)
            q.claim_for_slots = _timed(claim_stmt, q.claim_for_slots)  # type: ignore[method-assign]
            q.complete_many = _timed(complete_stmt, q.complete_many)  # type: ignore[method-assign]
            return q

        dmod.SlotPort.claim = _timed(slot_claim, dmod.SlotPort.claim)  # type: ignore[method-assign]
        wakeups = Wakeups()
        listener = Listener(listen_dsn(dsn), wakeups.notify).start()
        listener.ready.wait(10)
        config = LauncherConfig(app_id=app_id, host=f"node-{index}", work_root=Path(work_root), local=True)
        launcher = Launcher(config, factory, SleepRuntime(task_ms / 1000.0), wakeups)
        started = launcher.start()
        report.put(("up", index, started, None))
        stop.wait()
        launcher.stop(10)
        listener.stop()
        t0, t1 = window[0], window[1]

        def inside(samples: Samples) -> list[float]:
            return [s for w, s in list(samples) if t0 <= w < t1]

        report.put(("done", index, asdict(launcher.dispatcher.stats),
                    {"claim_stmt": inside(claim_stmt), "complete_stmt": inside(complete_stmt),
                     "slot_claim": inside(slot_claim)}))
    except BaseException as exc:
        report.put(("error", index, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=3)))


# -- the reference: a raw SKIP LOCKED loop per node (runs in its processes) ---------------------
RAW_TABLE = "sbx_fleet_raw"
"""The reference's own table: id, status (-1 ready, -3 running, 0 done), node; nothing else."""


def raw_node_main(index: int, dsn: str, batch: int, task_ms: float, stop: multiprocessing.synchronize.Event,
                  report: Any) -> None:
    """The least a PostgreSQL queue can do per node: claim up to ``batch`` ready rows (SKIP
    LOCKED, lowest id first), let them "run" together for ``task_ms`` (the node's slots in
    parallel), mark them done; one autocommit statement each, no lease, heartbeat, execution
    record or message. As the issue's "raw SKIP LOCKED loop" reference, with K nodes."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            report.put(("up", index, 0, None))
            while not stop.is_set():
                ids = [r[0] for r in conn.execute(
                    f"UPDATE {RAW_TABLE} SET status = -3, node = %s WHERE id IN (SELECT id FROM {RAW_TABLE} "
                    "WHERE status = -1 ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id",
                    (index, batch)).fetchall()]
                time.sleep(task_ms / 1000.0 if ids else 0.05)
                if ids:
                    conn.execute(f"UPDATE {RAW_TABLE} SET status = 0 WHERE id = ANY(%s)", (ids,))
        report.put(("done", index, {}, {}))
    except BaseException as exc:
        report.put(("error", index, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=3)))


def raw_reference(ctx: Any, mode: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """K raw nodes (:func:`raw_node_main`, batch = slots per node) on the same server and path
    (direct or PgBouncer) as the point: tasks/s over a window as long as the point's."""
    from scalebox_hpc.db.connection import connect

    node_dsn = args.direct_dsn if mode == "direct" else args.bouncer_dsn
    with connect(args.direct_dsn, autocommit=True, application_name=DRIVER) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        conn.execute(f"CREATE TABLE {RAW_TABLE} (id bigserial PRIMARY KEY, status integer NOT NULL DEFAULT -1, "
                     "node integer)")
        conn.execute(f"CREATE INDEX {RAW_TABLE}_ready ON {RAW_TABLE} (id) WHERE status = -1")
        conn.execute(f"INSERT INTO {RAW_TABLE} (status) SELECT -1 FROM generate_series(1, %s)", (args.ready_low,))
        report, stop = ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=raw_node_main, name=f"raw-{i}", daemon=True,
                             args=(i, node_dsn, args.slots, args.task_ms, stop, report)) for i in range(k)]
        out: dict[str, Any] = {"nodes": k, "batch": args.slots}
        try:
            for p in procs:
                p.start()
            up, errors = 0, list[str]()
            deadline = time.monotonic() + args.start_timeout
            while up + len(errors) < k and time.monotonic() < deadline:
                with contextlib.suppress(stdqueue.Empty):
                    msg = report.get(timeout=0.5)
                    if msg[0] == "up":
                        up += 1
                    elif msg[0] == "error":
                        errors.append(f"raw-{msg[1]}: {msg[2]}")
            if errors or up < k:
                out["skipped"] = f"{up} of {k} raw nodes came up"
                out["errors"] = sorted(set(errors))[:5]
                return out
            time.sleep(args.settle)

            def count(status: str) -> int:
                row = conn.execute(f"SELECT count(*) AS n FROM {RAW_TABLE} WHERE {status}").fetchone()
                return int(row["n"]) if row else 0

            t0, n0 = time.time(), count("status = 0")
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:  # keep it topped up, as the point's feeder does
                if count("status = -1") < args.ready_low:
                    conn.execute(f"INSERT INTO {RAW_TABLE} (status) SELECT -1 FROM generate_series(1, %s)",
                                 (args.chunk,))
                time.sleep(0.5)
            t1, n1 = time.time(), count("status = 0")
            out["tasks_per_s"] = round((n1 - n0) / (t1 - t0), 1)
            return out
        finally:
            stop.set()
            for p in procs:
                p.join(max(0.1, 20.0 / max(1, len(procs))))
                if p.is_alive():
                    p.kill()
            conn.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")


# -- the driver --------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float, scale: float = 1.0) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale, 3) if ordered else None


def p50_p99(values: Sequence[float], scale: float = 1000.0) -> dict[str, Any]:
    return {"p50": pct(values, 0.5, scale), "p99": pct(values, 0.99, scale), "n": len(values)}


def ensure_database(direct: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(direct)
    name = str(params["dbname"])
    admin = make_conninfo(direct, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    from scalebox_hpc.db import connection, schema

    with connection.connect(direct) as conn:
        schema.ensure(conn, create=True)
        conn.commit()


def make_app(direct: str, root: Path, tag: str, slots: int) -> int:
    from scalebox_hpc.db import apps
    from scalebox_hpc.db.connection import connect
    from scalebox_hpc.pipeline import load_pipeline

    app = root / f"app-{tag}"
    (app / "sleep").mkdir(parents=True)
    (app / "sleep" / "run.sh").write_text("#!/bin/sh\n# never run: the fleet's runtime sleeps in-process\n")
    (app / "sleep" / "run.sh").chmod(0o755)
    (app / "app.yaml").write_text(PIPELINE.format(tag=tag, slots=slots))
    with connect(direct) as conn:
        app_id = apps.create_app(conn, load_pipeline(app / "app.yaml"))
        conn.commit()
    return app_id


class Feeder(threading.Thread):
    """Keeps at least ``low`` tasks READY (adds ``chunk`` at a time by COPY) until stopped."""

    def __init__(self, direct: str, app_id: int, low: int, chunk: int) -> None:
        super().__init__(name="feeder", daemon=True)
        self.direct, self.app_id, self.low, self.chunk = direct, app_id, low, chunk
        self.halt = threading.Event()
        self.submitted = 0
        self.error: str | None = None
        self.ran_dry = 0

    def top_up(self, conn: Any) -> None:
        from scalebox_hpc.db import apps
        from scalebox_hpc.models import Message

        n, base = self.chunk, self.submitted
        apps.add_tasks(conn, self.app_id, "sleep", (Message(f"t{base + i}") for i in range(n)))
        conn.commit()
        self.submitted += n

    def run(self) -> None:
        from scalebox_hpc.db.connection import connect

        try:
            with connect(self.direct, application_name=DRIVER) as conn:
                while not self.halt.is_set():
                    row = conn.execute("SELECT count(*) AS n FROM sbx_tasks WHERE app_id = %s AND status = -1",
                                       (self.app_id,)).fetchone()
                    conn.commit()
                    ready = int(row["n"]) if row else 0
                    if ready == 0 and self.submitted:
                        self.ran_dry += 1
                    if ready < self.low:
                        self.top_up(conn)
                        continue
                    self.halt.wait(0.5)
        except Exception as exc:  # reported in the JSON
            self.error = f"{type(exc).__name__}: {exc}"


def done_count(conn: Any, app_id: int) -> int:
    row = conn.execute("SELECT count(*) AS n FROM sbx_tasks WHERE app_id = %s AND status >= 0", (app_id,)).fetchone()
    return int(row["n"])


DRIVER = "sbx-fleet-driver"
"""application_name of the benchmark's own connections (feeder, sampler): not counted."""


def backends(conn: Any) -> int:
    row = conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                       "AND backend_type = 'client backend' AND application_name <> %s", (DRIVER,)).fetchone()
    return int(row["n"])


def cpu_seconds(pids: Sequence[int] | None, comm: str | None = None) -> float:
    """utime + stime of ``pids`` (or of every process named ``comm``), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    if pids is None:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        if comm is not None and name != comm:
            continue
        fields = text[text.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the machine, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return float(sum(vals) - idle), float(sum(vals))


def server_room(conn: Any) -> tuple[int, int]:
    """(max_connections - superuser_reserved, client backends now) of the whole server."""
    row = conn.execute("SELECT current_setting('max_connections')::int - "
                       "current_setting('superuser_reserved_connections')::int AS cap, "
                       "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS used"
                       ).fetchone()
    return int(row["cap"]), int(row["used"])


@contextlib.contextmanager
def bouncer_admin(bouncer: str) -> Iterator[Any]:
    import psycopg
    from psycopg.conninfo import make_conninfo

    with psycopg.connect(make_conninfo(bouncer, dbname="pgbouncer"), autocommit=True,
                         prepare_threshold=None) as conn:
        yield conn


def bouncer_pool(admin: Any, dbname: str) -> dict[str, int]:
    cur = admin.execute("SHOW POOLS")
    cols = [d.name for d in cur.description]
    for row in cur.fetchall():
        rec = dict(zip(cols, row, strict=False))
        if rec.get("database") == dbname:
            keys = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
            return {k: int(rec[k]) for k in keys if k in rec}
    return {}


def handoff_gaps(direct: str, app_id: int, t0: float, t1: float) -> dict[str, Any]:
    from scalebox_hpc.db.connection import connect
    from scalebox_hpc.models import TaskStatus

    with connect(direct) as conn:
        row = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY g) AS p50, "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY g) AS p99, count(g) AS n, "
            "avg(run) AS run_ms, count(*) FILTER (WHERE stalled) AS stalled FROM ("
            " SELECT extract(epoch FROM e.started_at - lag(e.finished_at) OVER w) * 1000 AS g,"
            "  extract(epoch FROM e.finished_at - e.started_at) * 1000 AS run, false AS stalled"
            " FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id"
            " WHERE t.app_id = %(app)s AND e.started_at >= to_timestamp(%(t0)s)"
            "  AND e.started_at < to_timestamp(%(t1)s) AND e.status <> %(stalled)s"
            " WINDOW w AS (PARTITION BY e.slot_id ORDER BY e.started_at)"
            # recovery's rows span claim → recovery, not a run: counted apart, never in a gap
            " UNION ALL SELECT NULL, NULL, true FROM sbx_task_execs e JOIN sbx_tasks t ON t.id = e.task_id"
            " WHERE t.app_id = %(app)s AND e.finished_at >= to_timestamp(%(t0)s)"
            "  AND e.finished_at < to_timestamp(%(t1)s) AND e.status = %(stalled)s) x",
            {"app": app_id, "t0": t0, "t1": t1, "stalled": int(TaskStatus.STALLED)},
        ).fetchone()
    assert row is not None

    def r(v: Any) -> float | None:
        return None if v is None else round(float(v), 3)
    return {"p50": r(row["p50"]), "p99": r(row["p99"]), "n": int(row["n"]), "mean_run_ms": r(row["run_ms"]),
            "lease_expired": int(row["stalled"])}


def run_point(ctx: Any, mode: str, k: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from psycopg.conninfo import conninfo_to_dict

    from scalebox_hpc.db.connection import connect

    direct, bouncer = args.direct_dsn, args.bouncer_dsn
    point: dict[str, Any] = {"mode": mode, "nodes": k}
    per_node = 2 if mode == "direct" else 0  # dispatcher + listener, both direct; through PgBouncer: none
    node_dsn = direct if mode == "direct" else bouncer
    env = {"SCALEBOX_DB_POOLER": "", "SCALEBOX_LISTEN_DSN": ""} if mode == "direct" else \
        {"SCALEBOX_DB_POOLER": "transaction", "SCALEBOX_LISTEN_DSN": "off"}
    with connect(direct, autocommit=True) as probe:
        cap, used = server_room(probe)
    point["server_max_connections_usable"], point["server_connections_before"] = cap, used
    if per_node and used + k * per_node + CONN_MARGIN > cap:
        point["skipped"] = (f"direct: {k} nodes need {k * per_node} server connections (dispatcher + listener "
                            f"per node); the shared server allows {cap} and {used} are in use: not tried "
                            f"(it would exhaust max_connections for everyone); use PgBouncer")
        return point
    tag = f"{mode}-{k}-{len(list(root.glob('app-*')))}"  # unique: --nodes 50,50 measures 50 twice
    app_id = make_app(direct, root, tag, args.slots)
    point["app_id"] = app_id
    feeder = Feeder(direct, app_id, low=args.ready_low, chunk=args.chunk)
    with connect(direct, application_name=DRIVER) as conn:
        feeder.top_up(conn)
    feeder.start()
    report = ctx.Queue()
    stop = ctx.Event()
    window = ctx.Array("d", [0.0, 0.0], lock=False)
    procs = []
    t_start = time.perf_counter()
    errors: list[str] = []
    up = 0
    slots_up = 0

    def drain(block: float) -> None:
        nonlocal up, slots_up
        try:
            while True:
                msg = report.get(timeout=block)
                block = 0.0
                if msg[0] == "up":
                    up += 1
                    slots_up += int(msg[2])
                elif msg[0] == "error":
                    errors.append(f"node-{msg[1]}: {msg[2]}")
                else:
                    finals.append(msg)
        except stdqueue.Empty:
            pass

    finals: list[Any] = []
    dbname = str(conninfo_to_dict(direct)["dbname"])
    try:
        for i in range(k):
            p = ctx.Process(target=node_main, name=f"node-{i}", daemon=True,
                            args=(i, app_id, node_dsn, env, args.task_ms, str(root / f"work-{tag}"),
                                  report, stop, window))
            p.start()
            procs.append(p)
            drain(args.stagger)
            if errors:
                break
        deadline = time.monotonic() + args.start_timeout
        while up + len(errors) < len(procs) and time.monotonic() < deadline:
            drain(0.5)
        point["start_s"] = round(time.perf_counter() - t_start, 2)
        point["nodes_up"], point["slots_up"] = up, slots_up
        if errors or up < k:
            point["skipped"] = f"{up} of {k} nodes came up in {args.start_timeout}s"
            point["errors"] = sorted(set(errors))[:5]
            return point
        time.sleep(args.settle)
        conns: list[int] = []
        pools: list[dict[str, int]] = []
        pids = [p.pid for p in procs if p.pid is not None]
        with connect(direct, autocommit=True, application_name=DRIVER) as conn, bouncer_admin(bouncer) as admin:
            window[0] = time.time()
            n0 = done_count(conn, app_id)
            cpu0 = (cpu_seconds(pids), cpu_seconds(None, "postgres"), cpu_seconds(None, "pgbouncer"), machine_busy())
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                conns.append(backends(conn))
                pools.append(bouncer_pool(admin, dbname))
                time.sleep(1.0)
            n1 = done_count(conn, app_id)
            cpu1 = (cpu_seconds(pids), cpu_seconds(None, "postgres"), cpu_seconds(None, "pgbouncer"), machine_busy())
            window[1] = time.time()
        seconds = window[1] - window[0]
        point["cpu_cores_used"] = {
            "nodes": round((cpu1[0] - cpu0[0]) / seconds, 2),
            "postgres_all": round((cpu1[1] - cpu0[1]) / seconds, 2),
            "pgbouncer": round((cpu1[2] - cpu0[2]) / seconds, 2),
            "machine_busy_fraction": round((cpu1[3][0] - cpu0[3][0]) / max(1.0, cpu1[3][1] - cpu0[3][1]), 3),
        }
        point["window_s"] = round(seconds, 2)
        point["tasks_in_window"] = n1 - n0
        point["tasks_per_s"] = round((n1 - n0) / seconds, 1)
        point["ideal_tasks_per_s"] = round(k * args.slots * 1000.0 / args.task_ms, 1)
        point["server_connections"] = {"peak": max(conns), "median": statistics.median(conns),
                                       "per_node_peak": round(max(conns) / k, 3)}
        if mode == "direct":  # PgBouncer's server connections to this database, left from a pooled point
            point["server_connections"]["of_which_pgbouncer_idle_peak"] = max(
                p.get("sv_idle", 0) + p.get("sv_used", 0) for p in pools)
        else:
            sv = [p.get("sv_active", 0) + p.get("sv_idle", 0) + p.get("sv_used", 0) + p.get("sv_tested", 0)
                  + p.get("sv_login", 0) for p in pools]
            point["pgbouncer"] = {"server_peak": max(sv),
                                  "client_active_peak": max(p.get("cl_active", 0) for p in pools),
                                  "client_waiting_peak": max(p.get("cl_waiting", 0) for p in pools),
                                  "last_pool_row": pools[-1]}
        feeder.halt.set()
        stop.set()
        deadline = time.monotonic() + 60
        while len(finals) + len(errors) < k and time.monotonic() < deadline:
            drain(0.5)
        point["gap_ms"] = handoff_gaps(direct, app_id, window[0], window[1])
        stats: dict[str, float] = {}
        timings: dict[str, list[float]] = {"claim_stmt": [], "complete_stmt": [], "slot_claim": []}
        for _, _, st, tm in finals:
            for key, value in st.items():
                stats[key] = max(stats.get(key, 0), value) if key == "largest_batch" else stats.get(key, 0) + value
            for key in timings:
                timings[key].extend(tm[key])
        point["nodes_reported"] = len(finals)
        point["slot_claim_ms"] = p50_p99(timings["slot_claim"])
        point["claim_stmt_ms"] = p50_p99(timings["claim_stmt"])
        point["handoff_stmt_ms"] = p50_p99(timings["complete_stmt"])
        if stats:
            stats["tasks_per_claim_statement"] = round(stats["tasks_claimed"] / max(1, stats["claim_statements"]), 2)
            stats["tasks_per_complete_statement"] = round(
                stats["tasks_completed"] / max(1, stats["complete_statements"]), 2)
            stats["prefetch_hit_ratio"] = round(stats["prefetch_hits"] / max(1, stats["tasks_completed"]), 3)
        point["dispatcher_stats_sum"] = stats
        point["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
        point["feeder"] = {"submitted": feeder.submitted, "polls_seen_empty": feeder.ran_dry, "error": feeder.error}
        if errors:
            point["errors"] = sorted(set(errors))[:5]
        return point
    finally:
        feeder.halt.set()
        stop.set()
        for p in procs:
            p.join(max(0.1, 20.0 / max(1, len(procs))))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        feeder.join(10)
        with contextlib.suppress(Exception), connect(direct) as conn:  # the slots are gone: leave nothing queued
            conn.execute("DELETE FROM sbx_tasks WHERE app_id = %s AND status < 0", (app_id,))
            conn.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", default="10,50,100,200")
    parser.add_argument("--task-ms", type=float, default=10.0)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="the measured window per point")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--both", action="store_const", dest="modes", const=["pgbouncer", "direct"])
    which.add_argument("--pgbouncer", action="store_const", dest="modes", const=["pgbouncer"])
    which.add_argument("--direct", action="store_const", dest="modes", const=["direct"])
    parser.add_argument("--direct-dsn", default=DIRECT)
    parser.add_argument("--bouncer-dsn", default=BOUNCER)
    parser.add_argument("--stagger", type=float, default=0.05, help="seconds between two node starts")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after all are up before the window")
    parser.add_argument("--ready-low", type=int, default=40_000, help="keep at least this many tasks READY")
    parser.add_argument("--chunk", type=int, default=40_000, help="tasks per top-up")
    parser.add_argument("--start-method", default="forkserver", choices=["forkserver", "spawn", "fork"])
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the raw SKIP LOCKED loop measured after each point")
    args = parser.parse_args()
    modes = args.modes or ["pgbouncer", "direct"]
    ctx = multiprocessing.get_context(args.start_method)
    if args.start_method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    ensure_database(args.direct_dsn)
    out: dict[str, Any] = {
        "cpus": os.cpu_count(), "task_ms": args.task_ms, "slots_per_node": args.slots,
        "window_s": args.seconds, "start_method": args.start_method, "points": [],
    }
    with tempfile.TemporaryDirectory(prefix="sbx-fleet-") as tmp:
        for mode in modes:
            for k in (int(x) for x in args.nodes.split(",")):
                try:
                    point = run_point(ctx, mode, k, args, Path(tmp))
                except Exception as exc:  # one point failing must not lose the others
                    point = {"mode": mode, "nodes": k, "failed": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc(limit=4)}
                if args.reference and "tasks_per_s" in point:
                    try:  # the same nodes, path and window, right after: the ratio is the number
                        ref = raw_reference(ctx, mode, k, args)
                    except Exception as exc:
                        ref = {"failed": f"{type(exc).__name__}: {exc}"}
                    point["raw_reference"] = ref
                    if ref.get("tasks_per_s"):
                        point["ratio_to_raw"] = round(point["tasks_per_s"] / ref["tasks_per_s"], 3)
                out["points"].append(point)
                print(json.dumps({k2: point.get(k2) for k2 in ("mode", "nodes", "tasks_per_s", "ratio_to_raw",
                                                                "skipped")}),
                      file=sys.stderr, flush=True)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
