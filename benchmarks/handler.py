#!/usr/bin/env python3
"""Throughput of in-slot Python handlers: claim → worker round trip → record → hand-off.

Prints one JSON object:
- launcher: for each N (default 2000 and 10000) no-op handler tasks through 2 slots of the real
  launcher and PostgreSQL: tasks_per_s (first start → last finish, from the database) and the
  wall time until all were recorded;
- worker_round_trip_us: one task through :class:`scalebox_hpc.launcher.pyworker.Worker` (request,
  the handler, reply, output bookkeeping), no database: mean µs over ``--raw`` tasks;
- slot_execute_us: one task through ``Slot.execute`` (the slot's handler path: the round trip
  plus building the result and its output tails), no database;
- reference_multiprocessing_us: a bare ``multiprocessing.Pipe`` send/recv round trip to a
  child doing nothing, same machine, same run (the floor of any worker protocol in Python).

Usage: python benchmarks/handler.py [--tasks 2000 10000] [--raw 20000]   (SCALEBOX_DSN, else the embedded DB)
Target (issue 13): ≥ 9,000 tasks/s on 2 slots.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import cast

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.notify import Listener
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.launcher import pyworker
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.ports import TaskQueue
from scalebox_hpc.launcher.slot import Slot, SlotContext, SlotControl
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import ConflictAction, Message, ModuleRef, Task
from scalebox_hpc.node import resolve_dsn
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.runtime.local import LocalRuntime

PIPELINE = """
name: bench-handler
modules:
  noop:
    handler: noop.py:handle
    slots: [".*:2"]
    arguments: {max_idle_polls: 100000, sleep_interval_seconds: 1}
"""
HANDLER = "def handle(task):\n    return 0\n"


def write_app(root: Path) -> Path:
    (root / "noop").mkdir(parents=True)
    (root / "noop" / "noop.py").write_text(HANDLER)
    (root / "app.yaml").write_text(PIPELINE)
    return root / "app.yaml"


def through_launcher(dsn: str, spec_path: Path, n: int, work: Path) -> dict[str, float]:
    spec = load_pipeline(spec_path)
    with connect(dsn) as conn:
        app_id = apps.create_app(conn, spec)
        apps.add_tasks(conn, app_id, "noop", [Message(f"t{i}") for i in range(n)])
    wakeups = Wakeups()
    listener = Listener(dsn, wakeups.notify).start()
    listener.ready.wait(5)
    config = LauncherConfig(app_id=app_id, host="bench", work_root=work, modules=("noop",), local=True)
    launcher = Launcher(config, lambda: PgQueue(dsn), LocalRuntime(), wakeups)
    t0 = time.perf_counter()
    launcher.start()
    with connect(dsn) as conn:
        while True:
            with conn.transaction():
                row = conn.execute("SELECT count(*) AS n FROM sbx_tasks WHERE app_id = %s AND status >= 0",
                                   (app_id,)).fetchone()
            if row is not None and row["n"] >= n:
                break
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    launcher.stop(5)
    listener.stop()
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) AS n, count(*) FILTER (WHERE status <> 0) AS bad, "
            "extract(epoch FROM max(finished_at) - min(started_at)) AS s FROM sbx_tasks WHERE app_id = %s",
            (app_id,)).fetchone()
    assert row is not None and row["bad"] == 0, row
    return {"tasks": n, "slots": 2, "tasks_per_s": round(float(row["n"]) / float(row["s"]), 1),
            "wall_s": round(wall, 3)}


def worker_round_trip(root: Path, n: int) -> float:
    code = root / "noop"
    work = root / "raw-work"
    work.mkdir()
    worker = pyworker.Worker("noop.py:handle", code, cwd=work, env=dict(os.environ), private=root)
    abort = threading.Event()
    try:
        emit = root / "emit.jsonl"
        worker.run(pyworker.request_for(0, "warm", {}, 1, emit), timeout=None, abort=abort)  # the start
        time.sleep(0.1)  # the work dir's mtime settles (the worker then checks it with one stat)
        t0 = time.perf_counter()
        for i in range(n):
            run = worker.run(pyworker.request_for(i, f"t{i}", {}, 1, emit), timeout=60.0, abort=abort)
            assert run.reply is not None and run.reply.status == 0
        elapsed = time.perf_counter() - t0
    finally:
        worker.close()
    return elapsed / n * 1e6


def slot_execute(spec_path: Path, root: Path, n: int) -> float:
    """µs per task of ``Slot.execute`` (the handler path of the slot: request, reply, result and
    output tails), no database: what the launcher's thread spends per task besides its queries."""
    module = load_pipeline(spec_path).modules[0]
    ref = ModuleRef(id=1, name=module.name, sink_modules=(), conflict_action=ConflictAction.FAIL)
    ctx = SlotContext(app_id=1, module=module, ref=ref, modules={module.name: ref}, host="bench", seq=0,
                      work_dir=root / "slot-work" / "noop-0", runtime=LocalRuntime(), wakeups=Wakeups(),
                      control=SlotControl(), base_env=dict(os.environ))
    slot = Slot(ctx, cast(TaskQueue, None))
    ctx.work_dir.mkdir(parents=True)
    slot.private.mkdir(parents=True)
    try:
        def one(i: int) -> None:
            result = slot.execute(Task(id=i, app_id=1, module_id=1, body=f"t{i}", headers={}, status=-3, attempts=1))
            assert result is not None and result.status == 0, result
        one(0)  # the worker's start
        time.sleep(0.1)  # the work dir's mtime settles (the worker then checks it with one stat)
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            one(i)
        elapsed = time.perf_counter() - t0
    finally:
        slot.close()
    return elapsed / n * 1e6


def _echo(conn: Connection) -> None:
    while True:
        msg = conn.recv_bytes()
        if not msg:
            return
        conn.send_bytes(b"0")


def multiprocessing_round_trip(n: int) -> float:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_echo, args=(child,))
    proc.start()
    for _ in range(100):
        parent.send_bytes(b"t")
        parent.recv_bytes()
    t0 = time.perf_counter()
    for _ in range(n):
        parent.send_bytes(b"t")
        parent.recv_bytes()
    elapsed = time.perf_counter() - t0
    parent.send_bytes(b"")
    proc.join(5)
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--raw", type=int, default=20000)
    args = parser.parse_args()
    dsn = resolve_dsn(create_schema=True)
    with tempfile.TemporaryDirectory(prefix="sbx-bench-handler-") as tmp:
        root = Path(tmp)
        spec_path = write_app(root / "app")
        launched = [through_launcher(dsn, spec_path, n, root / f"work-{n}") for n in args.tasks]
        raw = worker_round_trip(root / "app", args.raw)
        slot_us = slot_execute(spec_path, root, args.raw)
        ref = multiprocessing_round_trip(args.raw)
    result = {
        "launcher": launched,
        "worker_round_trip_us": round(raw, 2),
        "slot_execute_us": round(slot_us, 2),
        "reference_multiprocessing_us": round(ref, 2),
        "raw_tasks": args.raw,
        "cpus": os.cpu_count(),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
