#!/usr/bin/env python3
"""Throughput of the whole path, measured as the peers are: submit → claim → run → hand-off.

For each N (default 2000 and 10000) and each workload, the clock starts before the submit
and stops when the last task is recorded (polled from the database every 20 ms; the launcher's
connections every 0.5 s):
- W2: a module whose run.sh is /bin/true (one process per task), 2 slots, one launcher;
- W1: a module with an in-slot Python no-op handler, 2 slots (skipped when the build has no
  handler support);
with, in the same run, `xargs -P2 -n1 /bin/true` over N arguments and a raw
`multiprocessing.Pool(2)` no-op loop as references, and the database floor: the same submit,
then one connection claiming and handing off batches of 500 with no slot, process or handler
(the most one node's database session records here: W1 cannot pass it). Also: hand-off latency
over a two-module pipeline, p50/p99, as the database records it (sender's recorded finish →
receiver's claim) and run to run (sender's run ended → receiver's run began), saturated and
paced (one task every 20 ms, each committed alone), the dispatcher's statement counts, and the
launcher's peak server connections.

Prints one JSON object. Usage:
    python benchmarks/throughput.py [--tasks 2000,10000] [--handoff 500] [--only W2,W1,floor,handoff]
    (SCALEBOX_DSN, else embedded)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.notify import Listener
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import Completion, Message, TaskResult
from scalebox_hpc.node import resolve_dsn
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.runtime.local import LocalRuntime

FAST = "arguments: {max_idle_polls: 100000, sleep_interval_seconds: 1, heartbeat_seconds: 10}"
W2 = f"""
name: bench-w2
modules:
  noop:
    slots: [".*:2"]
    {FAST}
"""
W1 = f"""
name: bench-w1
modules:
  noop:
    slots: [".*:2"]
    handler: noop.py:noop
    {FAST}
"""
HANDOFF = f"""
name: bench-handoff
modules:
  src:
    sink_modules: [dst]
    {FAST}
  dst:
    {FAST}
"""


def pct(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None


def make_app(root: Path, text: str, scripts: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for rel, body in scripts.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if body == "/bin/true":
            path.symlink_to("/bin/true")
        else:
            path.write_text(body)
            path.chmod(0o755)
    (root / "app.yaml").write_text(text)
    return root / "app.yaml"


def done_count(conn: Any, app_id: int) -> int:
    row = conn.execute("SELECT count(*) AS n FROM sbx_tasks WHERE app_id = %s AND status >= 0", (app_id,)).fetchone()
    return int(row["n"])


def connections(conn: Any) -> int:
    row = conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                       "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchone()
    return int(row["n"])


def backend_cpu(conn: Any) -> dict[int, float]:
    """CPU seconds used so far by each server process of this database (but the caller's), when
    the server runs on this machine (/proc readable); empty otherwise."""
    rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()").fetchall()
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for r in rows:
        try:
            fields = Path(f"/proc/{r['pid']}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(r["pid"])] = (int(fields[11]) + int(fields[12])) / tick
    return out


def timed_run(dsn: str, yaml_path: Path, module: str, bodies: list[str], work: Path, expect: int,
              pace: float = 0.0) -> dict[str, Any]:
    """Create the app, start a launcher, then (clock on) submit the bodies and wait for ``expect``
    recorded tasks (clock off). ``pace`` > 0: one body every ``pace`` seconds instead of all at once."""
    spec = load_pipeline(yaml_path)
    with connect(dsn) as conn:
        app_id = apps.create_app(conn, spec)
    wakeups = Wakeups()
    listener = Listener(dsn, wakeups.notify).start()
    listener.ready.wait(5)
    config = LauncherConfig(app_id=app_id, host="bench", work_root=work, local=True)
    launcher = Launcher(config, lambda: PgQueue(dsn), LocalRuntime(), wakeups)
    launcher.start()
    time.sleep(1.0)  # slots registered and idle: the window measures the tasks, not the start
    peak = 0
    with connect(dsn, autocommit=True) as conn:
        pg0 = backend_cpu(conn)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        # paced: each body committed on its own (one transaction would make them one burst)
        with connect(dsn, autocommit=pace > 0) as submit:
            if pace > 0:
                for body in bodies:
                    apps.add_tasks(submit, app_id, module, [Message(body)])
                    time.sleep(pace)
            else:
                apps.add_tasks(submit, app_id, module, [Message(b) for b in bodies])
        submitted = time.perf_counter() - t0
        polls = 0
        while done_count(conn, app_id) < expect:
            if polls % 25 == 0:  # every 0.5 s: the window's own queries cost the launcher's CPU too
                peak = max(peak, connections(conn))
            polls += 1
            time.sleep(0.02)
        peak = max(peak, connections(conn))
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        pg1 = backend_cpu(conn)
    launcher.stop(5)
    listener.stop()
    s = launcher.dispatcher.stats
    return {
        "app_id": app_id, "tasks_per_s": round(expect / seconds, 1), "seconds": round(seconds, 3),
        "submit_s": round(submitted, 3), "peak_connections": peak,
        # CPU per task, steadier than the rate on a shared machine: this process (the launcher's
        # threads, the submit and the 20 ms poll) and the database's processes (0 when remote)
        "cpu_ms_per_task": {"launcher": round(1000 * cpu / expect, 3),
                            "postgres": round(1000 * sum(v - pg0.get(k, 0.0) for k, v in pg1.items()) / expect, 3)},
        "statements": {**dataclasses.asdict(s),
                       "per_task": round((s.claim_statements + s.complete_statements + s.other_statements)
                                         / max(1, s.tasks_completed), 3)},
    }


def db_floor(dsn: str, yaml_path: Path, module: str, bodies: list[str], batch: int = 500) -> dict[str, Any]:
    """Submit (clock on), then claim ``batch`` and hand them off as finished no-ops, on one
    connection, until every task is recorded (clock off): the database's side of W1 alone."""
    spec = load_pipeline(yaml_path)
    with connect(dsn) as conn:
        app_id = apps.create_app(conn, spec)
    q = PgQueue(dsn)
    refs = q.modules(app_id)
    ref = refs[module]
    slot = q.create_slot(ref.id, host="floor", seq=0, pid=os.getpid(), work_dir="/tmp")
    t0 = time.perf_counter()
    with connect(dsn) as submit:
        apps.add_tasks(submit, app_id, module, [Message(b) for b in bodies])
    submitted = time.perf_counter() - t0
    done = 0
    while done < len(bodies):
        got = q.claim(app_id, ref.id, host="floor", slot_id=slot, slot_seq=0, limit=batch)
        now = datetime.now(UTC)
        q.complete_many([Completion(t, TaskResult(0, now, now), "floor") for t in got],
                        slot_id=slot, sender=ref, modules=refs)
        done += len(got)
    seconds = time.perf_counter() - t0
    q.close()
    return {"tasks_per_s": round(len(bodies) / seconds, 1), "seconds": round(seconds, 3),
            "submit_s": round(submitted, 3), "batch": batch}


def xargs_rate(n: int) -> float:
    args = "\n".join(str(i) for i in range(n)).encode()
    t0 = time.perf_counter()
    subprocess.run(["xargs", "-P2", "-n1", "/bin/true"], input=args, check=True, stdout=subprocess.DEVNULL)
    return n / (time.perf_counter() - t0)


def _noop(_: int) -> None:
    return None


def multiprocessing_rate(n: int) -> float:
    t0 = time.perf_counter()
    with multiprocessing.Pool(2) as pool:
        for _ in pool.imap_unordered(_noop, range(n), chunksize=1):
            pass
    return n / (time.perf_counter() - t0)


def handoff_latencies(dsn: str, app_id: int) -> list[float]:
    """The database's hand-off (ms): the sender's recorded finish → the receiver's claim."""
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM d.started_at - s.finished_at) * 1000 AS ms "
            "FROM sbx_tasks d JOIN sbx_tasks s ON s.id = d.from_task_id WHERE d.app_id = %s", (app_id,),
        ).fetchall()
    return [float(r["ms"]) for r in rows]


def run_to_run_latencies(dsn: str, app_id: int) -> list[float]:
    """The hand-off as the pipeline sees it (ms): the sender's run ended → the receiver's run
    began (the executions' times, taken by the launcher around each run)."""
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM de.started_at - se.finished_at) * 1000 AS ms "
            "FROM sbx_tasks d JOIN sbx_task_execs de ON de.task_id = d.id "
            "JOIN sbx_task_execs se ON se.task_id = d.from_task_id WHERE d.app_id = %s", (app_id,),
        ).fetchall()
    return [float(r["ms"]) for r in rows]


def handlers_supported() -> bool:
    from scalebox_hpc.pipeline import ModuleSpec

    return "handler" in ModuleSpec.model_fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="2000,10000")
    parser.add_argument("--handoff", type=int, default=500)
    parser.add_argument("--only", default="W2,W1,floor,handoff", help="workloads to run (comma-separated)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    sizes = [int(n) for n in args.tasks.split(",")]
    dsn = resolve_dsn(create_schema=True)
    import scalebox_hpc

    out: dict[str, Any] = {"slots": 2, "cpus": os.cpu_count(), "code": str(Path(scalebox_hpc.__file__).parent),
                           "load_before": os.getloadavg()[0], "runs": []}
    with tempfile.TemporaryDirectory(prefix="sbx-bench-") as tmp:
        root = Path(tmp)
        w2 = make_app(root / "w2", W2, {"noop/run.sh": "/bin/true"})
        w1 = make_app(root / "w1", W1, {"noop/noop.py": "def noop(task):\n    return 0\n"}) \
            if handlers_supported() else None
        for n in sizes:
            bodies = [f"t{i}" for i in range(n)]
            row: dict[str, Any] = {"tasks": n}
            row["xargs_P2_per_s"] = round(xargs_rate(n), 1)
            row["multiprocessing_noop_per_s"] = round(multiprocessing_rate(n), 1)
            if "W2" in only:
                row["W2"] = timed_run(dsn, w2, "noop", bodies, root / f"work-w2-{n}", n)
                row["W2"]["ratio_to_xargs"] = round(row["W2"]["tasks_per_s"] / row["xargs_P2_per_s"], 3)
            if w1 is not None and "W1" in only:
                row["W1"] = timed_run(dsn, w1, "noop", bodies, root / f"work-w1-{n}", n)
            if "floor" in only:
                row["db_floor"] = db_floor(dsn, w2, "noop", bodies)
            out["runs"].append(row)
        if "handoff" in only:
            ho = make_app(root / "ho", HANDOFF,
                          {"src/run.sh": '#!/bin/sh\nsend-message "$1"\n', "dst/run.sh": "/bin/true"})
            run = timed_run(dsn, ho, "src", [f"h{i}" for i in range(args.handoff)], root / "work-ho",
                            2 * args.handoff)
            lat = handoff_latencies(dsn, run["app_id"])
            e2e = run_to_run_latencies(dsn, run["app_id"])
            out["handoff_ms"] = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": len(lat),
                                 "run_to_run_p50": pct(e2e, 0.5), "run_to_run_p99": pct(e2e, 0.99),
                                 "note": "all submitted at once (a saturated two-stage pipeline: mostly the "
                                         "receiver's queue); sender's hand-off → receiver's claim",
                                 "run": run}
            # the hand-off itself: one task every 20 ms, so the receiver is idle when each arrives
            paced = timed_run(dsn, ho, "src", [f"p{i}" for i in range(args.handoff // 2)], root / "work-hop",
                              args.handoff, pace=0.02)
            lat = handoff_latencies(dsn, paced["app_id"])
            e2e = run_to_run_latencies(dsn, paced["app_id"])
            out["handoff_idle_ms"] = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": len(lat),
                                      "run_to_run_p50": pct(e2e, 0.5), "run_to_run_p99": pct(e2e, 0.99),
                                      "note": "one task every 20 ms (the receiver idle): sender's hand-off "
                                              "→ receiver's claim", "eager_claims": paced["statements"]["eager_claims"]}
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    threading.stack_size(0)
    main()
