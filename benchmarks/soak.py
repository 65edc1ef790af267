#!/usr/bin/env python3
"""Soak: many tasks through two stages while launchers are killed with -9 at random.

A `work` stage gets N tasks; every 10th exits 3 (retry rule '3:1': one retry, then final
status 3), the others emit one message `s-<body>` to a `sink` stage, except the bad ones mixed
in (one in 20 of each kind): NUL bytes on stdout (still OK), a `statusCode` of -1, task-exec.json
nested 3000 deep, a FIFO as task-exec.json (each -103), more messages than `max_messages` (-102),
and a background process that writes into sink-tasks.txt after run.sh exited (must never be
credited to a later task). L launcher processes (S slots each)
run both stages; a killer SIGKILLs a random launcher every few seconds and starts a new one.
Prints one JSON object: final counts and whether they are exact (every work task 0 or 3, one
sink task per successful work task, nothing left READY/RUNNING), recovery times (kill → the
killed launcher's tasks back in the queue), kills, throughput.

Usage: python benchmarks/soak.py [--tasks 100000] [--launchers 2] [--slots 2] [--kill-every 5]
(SCALEBOX_DSN, else the embedded database)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.models import Message
from scalebox_hpc.node import resolve_dsn
from scalebox_hpc.pipeline import load_pipeline

PIPELINE = """
name: soak
modules:
  work:
    sink_modules: [sink]
    parameters: {retry_rules: ['3:1']}
    arguments: {heartbeat_seconds: 1, max_idle_polls: 1000000, sleep_interval_seconds: 0.5, max_messages: 5}
  sink:
    arguments: {heartbeat_seconds: 1, max_idle_polls: 1000000, sleep_interval_seconds: 0.5}
"""
WORK = r"""#!/bin/sh
case "$1" in *0) exit 3 ;; esac
case $(( $1 % 20 )) in
  1) printf 'nul\0byte\n' ;;
  3) echo '{"statusCode": -1}' > task-exec.json; exit 0 ;;
  5) cp "$(dirname "$0")/deep.json" task-exec.json; exit 0 ;;
  7) seq -f "many-$1-%g" 1 6 > sink-tasks.txt; exit 0 ;;
  9) mkfifo task-exec.json; exit 0 ;;
  11) (sleep 0.3; echo "bg-$1" >> sink-tasks.txt) & ;;
esac
echo "s-$1" > sink-tasks.txt
"""
SINK = "#!/bin/sh\nexit 0\n"


class Fleet:
    """The launcher processes, with a killer that SIGKILLs one at random now and then."""

    def __init__(self, dsn: str, app_id: int, launchers: int, slots: int, work: Path) -> None:
        self.args = [sys.executable, "-m", "scalebox_hpc", "launcher", "--app", str(app_id), "--slots", str(slots),
                     "--grace", "5"]
        self.env = dict(os.environ, SCALEBOX_DSN=dsn, SCALEBOX_WORK_ROOT=str(work))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills: list[tuple[str, float]] = []
        self.generation = 0
        for i in range(launchers):
            self._start(f"l{i}")

    def _start(self, slot_name: str) -> None:
        self.generation += 1
        host = f"{slot_name}-g{self.generation}"
        self.procs[slot_name] = subprocess.Popen(self.args, env=dict(self.env, SCALEBOX_HOST=host),
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.hosts = getattr(self, "hosts", {})
        self.hosts[slot_name] = host

    def kill_one(self) -> None:
        name = random.choice(sorted(self.procs))
        host = self.hosts[name]
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()
        self.kills.append((host, time.time()))
        time.sleep(0.5)
        self._start(name)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            proc.wait(60)


def counts(dsn: str, app_id: int) -> dict[str, dict[int, int]]:
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT m.name, t.status, count(*) AS n FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id "
            "WHERE t.app_id = %s GROUP BY 1, 2", (app_id,)).fetchall()
    out: dict[str, dict[int, int]] = {"work": {}, "sink": {}}
    for r in rows:
        out[r["name"]][int(r["status"])] = int(r["n"])
    return out


def expected_status(i: int) -> int:
    """What work task ``i`` must end as when it ran to its end."""
    return 3 if i % 10 == 0 else {3: -103, 5: -103, 7: -102, 9: -103}.get(i % 20, 0)


def expected_counts(n: int) -> dict[str, dict[int, int]]:
    """Final statuses by module: what each kind of task must end as."""
    work: dict[int, int] = {}
    for i in range(n):
        status = expected_status(i)
        work[status] = work.get(status, 0) + 1
    return {"work": work, "sink": {0: work.get(0, 0)}}


def killed_three_times(dsn: str, app_id: int) -> list[str]:
    """Work tasks that ended 123 because every one of their 3 attempts (2 stall retries) lost
    its launcher to a kill: the right outcome, not a loss."""
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT t.body FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id AND m.name = 'work' "
            "WHERE t.app_id = %s AND t.status = 123 AND (SELECT count(*) FROM sbx_task_execs e "
            "WHERE e.task_id = t.id AND e.status = 123) = 3 AND NOT EXISTS (SELECT 1 FROM sbx_task_execs e "
            "WHERE e.task_id = t.id AND e.status <> 123)", (app_id,)).fetchall()
    return [str(r["body"]) for r in rows]


def misattributed(dsn: str, app_id: int) -> int:
    """Sink tasks not from the work task they name (s-<body>), or written by a background process."""
    with connect(dsn) as conn:
        [row] = conn.execute(
            "SELECT count(*) AS n FROM sbx_tasks s JOIN sbx_modules m ON m.id = s.module_id AND m.name = 'sink' "
            "LEFT JOIN sbx_tasks w ON w.id = s.from_task_id "
            "WHERE s.app_id = %s AND (w.id IS NULL OR s.body <> 's-' || w.body)", (app_id,)).fetchall()
    return int(row["n"])


def recovery_times(dsn: str, app_id: int, kills: list[tuple[str, float]]) -> list[float]:
    """Per kill: seconds until the last of the killed launcher's leases was recovered."""
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT e.host, extract(epoch FROM max(e.finished_at)) AS at FROM sbx_task_execs e "
            "JOIN sbx_tasks t ON t.id = e.task_id WHERE t.app_id = %s AND e.status = 123 GROUP BY e.host",
            (app_id,)).fetchall()
    recovered = {r["host"]: float(r["at"]) for r in rows}
    return [round(recovered[host] - at, 3) for host, at in kills if host in recovered]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--launchers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=5.0, help="mean seconds between kills")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    dsn = resolve_dsn(create_schema=True)
    n = args.tasks
    with tempfile.TemporaryDirectory(prefix="sbx-soak-") as tmp:
        root = Path(tmp)
        for name, script in (("work", WORK), ("sink", SINK)):
            (root / name).mkdir()
            (root / name / "run.sh").write_text(script)
            (root / name / "run.sh").chmod(0o755)
        (root / "work" / "deep.json").write_text("[" * 3000 + "]" * 3000)
        (root / "app.yaml").write_text(PIPELINE)
        with connect(dsn) as conn:
            app_id = apps.create_app(conn, load_pipeline(root / "app.yaml"))
            for start in range(0, n, 10_000):
                apps.add_tasks(conn, app_id, "work", [Message(str(i)) for i in range(start, min(n, start + 10_000))])
        t0 = time.time()
        fleet = Fleet(dsn, app_id, args.launchers, args.slots, root / "wd")
        expected = expected_counts(n)
        done = threading.Event()
        result: dict[str, Any] = {}

        def finished() -> bool:
            c = counts(dsn, app_id)
            done = {m: sum(v for k, v in c[m].items() if k not in (-1, -3)) for m in c}
            return done["work"] == n and done["sink"] >= c["work"].get(0, 0)

        next_kill = time.time() + random.expovariate(1 / args.kill_every)
        while not finished():
            if time.time() > t0 + args.timeout:
                result["timed_out"] = True
                break
            if time.time() >= next_kill:
                fleet.kill_one()
                next_kill = time.time() + random.expovariate(1 / args.kill_every)
            time.sleep(0.2)
        wall = time.time() - t0
        done.set()
        fleet.stop()
        final = counts(dsn, app_id)
        recoveries = recovery_times(dsn, app_id, fleet.kills)
        misrouted = misattributed(dsn, app_id)
        stalled = killed_three_times(dsn, app_id)
    for body in stalled:  # its launcher was killed under it at every attempt: 123 is its right end
        kind = expected_status(int(body))
        expected["work"][kind] -= 1
        expected["work"][123] = expected["work"].get(123, 0) + 1
        if kind == 0:
            expected["sink"][0] -= 1
    expected = {m: {k: v for k, v in c.items() if v} for m, c in expected.items()}
    exact = final == expected and misrouted == 0
    result.update({
        "tasks": n, "launchers": args.launchers, "slots_per_launcher": args.slots,
        "final": {m: {str(k): v for k, v in sorted(c.items())} for m, c in final.items()},
        "expected": {m: {str(k): v for k, v in sorted(c.items())} for m, c in expected.items()},
        "misattributed_messages": misrouted, "stalled_by_kills": len(stalled),
        "exact": exact, "kills": len(fleet.kills),
        "recovery_s": {"n": len(recoveries), "p50": statistics.median(recoveries) if recoveries else None,
                       "max": max(recoveries) if recoveries else None},
        "wall_s": round(wall, 2), "work_tasks_per_s": round(n / wall, 1),
    })
    json.dump(result, sys.stdout, indent=2)
    print()
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
