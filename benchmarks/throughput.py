#!/usr/bin/env python3
"""Throughput and latency of the whole path: claim → run.sh → record → hand-off.

Prints one JSON object:
- tasks_per_s: N no-op tasks through 2 slots (first start → last finish, from the database);
- claim_ms p50/p99: time of a successful claim call, measured in the slot;
- handoff_ms p50/p99: emit (the sender's commit) → downstream task running (its claim);
- reference_xargs_per_s: `xargs -P2 -n1 /bin/true` over N arguments on the same machine, same run;
- reference_script_per_s: the same xargs running our no-op run.sh (process start cost of a script);
- ratio: tasks_per_s / reference_xargs_per_s  (target ≥ 0.6); ratio_script likewise.

Usage: python benchmarks/throughput.py [--tasks N] [--handoff M]   (SCALEBOX_DSN, else the embedded DB)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.notify import Listener
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import Message, Task
from scalebox_hpc.node import resolve_dsn
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.runtime.local import LocalRuntime

PIPELINE = """
name: bench
modules:
  noop:
    slots: [".*:2"]
    arguments: {max_idle_polls: 100000, sleep_interval_seconds: 1}
  src:
    sink_modules: [dst]
    arguments: {max_idle_polls: 100000, sleep_interval_seconds: 1}
  dst:
    arguments: {max_idle_polls: 100000, sleep_interval_seconds: 1}
"""
NOOP = "#!/bin/sh\nexit 0\n"
SRC = '#!/bin/sh\nprintf "%s\\n" "$1" > sink-tasks.txt\n'


class TimedQueue(PgQueue):
    """PgQueue that records how long successful claims take."""

    claims: list[float] = []

    def claim(self, *args: Any, **kwargs: Any) -> list[Task]:
        t0 = time.perf_counter()
        got = super().claim(*args, **kwargs)
        if got:
            TimedQueue.claims.append(time.perf_counter() - t0)
        return got


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def write_app(root: Path) -> Path:
    for name, script in (("noop", NOOP), ("src", SRC), ("dst", NOOP)):
        (root / name).mkdir(parents=True)
        (root / name / "run.sh").write_text(script)
        (root / name / "run.sh").chmod(0o755)
    (root / "app.yaml").write_text(PIPELINE)
    return root / "app.yaml"


def run_until_done(dsn: str, app_id: int, modules: tuple[str, ...], total: int, work: Path) -> None:
    wakeups = Wakeups()
    listener = Listener(dsn, wakeups.notify).start()
    listener.ready.wait(5)
    config = LauncherConfig(app_id=app_id, host="bench", work_root=work, modules=modules, local=True)
    launcher = Launcher(config, lambda: TimedQueue(dsn), LocalRuntime(), wakeups)
    launcher.start()
    with connect(dsn) as conn:
        while True:
            with conn.transaction():
                done = conn.execute(
                    "SELECT count(*) AS n FROM sbx_tasks WHERE app_id = %s AND status >= 0", (app_id,)
                ).fetchone()["n"]  # type: ignore[index]
            if done >= total:
                break
            time.sleep(0.05)
    launcher.stop(5)
    listener.stop()


def span_rate(dsn: str, app_id: int, module: str) -> float:
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) AS n, extract(epoch FROM max(t.finished_at) - min(t.started_at)) AS s "
            "FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id WHERE t.app_id = %s AND m.name = %s",
            (app_id, module),
        ).fetchone()
    assert row is not None
    return float(row["n"]) / float(row["s"])


def handoff_latencies(dsn: str, app_id: int) -> list[float]:
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM d.started_at - s.finished_at) * 1000 AS ms "
            "FROM sbx_tasks d JOIN sbx_tasks s ON s.id = d.from_task_id WHERE d.app_id = %s",
            (app_id,),
        ).fetchall()
    return [float(r["ms"]) for r in rows]


def xargs_rate(n: int, command: str) -> float:
    args = "\n".join(str(i) for i in range(n)).encode()
    t0 = time.perf_counter()
    subprocess.run(["xargs", "-P2", "-n1", command], input=args, check=True, stdout=subprocess.DEVNULL)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--handoff", type=int, default=300)
    args = parser.parse_args()
    dsn = resolve_dsn(create_schema=True)
    with tempfile.TemporaryDirectory(prefix="sbx-bench-") as tmp:
        root = Path(tmp)
        spec = load_pipeline(write_app(root / "app"))
        with connect(dsn) as conn:
            app_id = apps.create_app(conn, spec)
            apps.add_tasks(conn, app_id, "noop", [Message(f"t{i}") for i in range(args.tasks)])
        run_until_done(dsn, app_id, ("noop",), args.tasks, root / "work")
        rate = span_rate(dsn, app_id, "noop")
        claims = [c * 1000 for c in TimedQueue.claims]

        with connect(dsn) as conn:
            app2 = apps.create_app(conn, spec)
        config_total = 2 * args.handoff
        with connect(dsn) as conn:
            apps.add_tasks(conn, app2, "src", [Message(f"h{i}") for i in range(args.handoff)])
        run_until_done(dsn, app2, ("src", "dst"), config_total, root / "work2")
        handoff = handoff_latencies(dsn, app2)

        ref = xargs_rate(args.tasks, "/bin/true")
        ref_script = xargs_rate(args.tasks, str(root / "app" / "noop" / "run.sh"))
    result = {
        "tasks": args.tasks, "slots": 2,
        "tasks_per_s": round(rate, 1),
        "claim_ms": {"p50": round(pct(claims, 0.5), 3), "p99": round(pct(claims, 0.99), 3), "n": len(claims)},
        "handoff_ms": {"p50": round(pct(handoff, 0.5), 3), "p99": round(pct(handoff, 0.99), 3),
                       "mean": round(statistics.fmean(handoff), 3) if handoff else None, "n": len(handoff)},
        "reference_xargs_per_s": round(ref, 1),
        "reference_script_per_s": round(ref_script, 1),
        "ratio": round(rate / ref, 3),
        "ratio_script": round(rate / ref_script, 3),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
