#!/usr/bin/env python3
"""Location-aware vs random dispatch on the same workload, in one run.

Four launchers ("hosts" h0..h3, each with its own scratch directory and 2 slots) process N
tasks; each task reads one input file of SIZE bytes that sits in exactly one host's scratch.
Run twice: with `inputs` headers (location-aware: the claim prefers the holder), and without
(random: whichever slot asks first). A task that runs away from its input "copies" it: its
run.sh reads the file across the (shared, here) file system and counts the bytes.

Prints one JSON object: for each mode, the share of tasks run on the host holding their
input, bytes copied between hosts, tasks/s; and the ratio of bytes copied (aware / random).

Usage: python benchmarks/locality.py [--tasks N] [--size BYTES]   (SCALEBOX_DSN, else the embedded DB)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.launcher.launcher import LauncherConfig
from scalebox_hpc.models import Message
from scalebox_hpc.node import resolve_dsn, run_launcher
from scalebox_hpc.pipeline import load_pipeline

HOSTS = ("h0", "h1", "h2", "h3")
PIPELINE = """
name: locality-bench
modules:
  use:
    slots: [".*:2"]
    arguments: {max_idle_polls: 10, sleep_interval_seconds: 0.2, locality_wait_seconds: 5}
"""
def run_mode(dsn: str, root: Path, n: int, size: int, aware: bool) -> dict[str, Any]:
    app_dir = root / ("aware" if aware else "random")
    (app_dir / "use").mkdir(parents=True)
    (app_dir / "app.yaml").write_text(PIPELINE)
    (app_dir / "use" / "run.sh").write_text("#!/bin/sh\ncat \"$LOCAL_SCRATCH/../$1\" > /dev/null\n")
    (app_dir / "use" / "run.sh").chmod(0o755)
    scratch = {h: app_dir / "scratch" / h for h in HOSTS}
    holder: dict[str, str] = {}
    for i in range(n):
        host = HOSTS[i % len(HOSTS)]
        key = f"f{i}"
        scratch[host].mkdir(parents=True, exist_ok=True)
        (scratch[host] / key).write_bytes(b"x" * size)
        holder[f"{host}/{key}"] = host
    with connect(dsn) as conn:
        app_id = apps.create_app(conn, load_pipeline(app_dir / "app.yaml"))
    threads = [threading.Thread(target=run_launcher, args=(dsn, LauncherConfig(
        app_id=app_id, host=h, work_root=app_dir / "work", local_scratch=scratch[h]))) for h in HOSTS]
    for t in threads:
        t.start()
    _wait_live(dsn, len(HOSTS))
    messages = []
    for body in holder:
        key = body.split("/", 1)[1]
        messages.append(Message(body=body, headers={"inputs": [key]} if aware else {}))
    start = time.monotonic()
    with connect(dsn) as conn:
        apps.add_tasks(conn, app_id, "use", messages)
    for t in threads:
        t.join()
    with connect(dsn) as conn:
        rows = conn.execute("SELECT body, host, status, started_at, finished_at FROM sbx_tasks WHERE app_id = %s",
                            (app_id,)).fetchall()
    done = [r for r in rows if r["status"] == 0]
    local = sum(r["host"] == holder[r["body"]] for r in done)
    span = (max(r["finished_at"] for r in done) - min(r["started_at"] for r in done)).total_seconds()
    return {
        "tasks": len(done), "local_share": round(local / max(1, len(done)), 4),
        "bytes_copied_between_hosts": (len(done) - local) * size,
        "tasks_per_s": round(len(done) / span, 1) if span > 0 else None,
        "wall_s": round(time.monotonic() - start, 2),
    }


def _wait_live(dsn: str, hosts: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connect(dsn) as conn:
            row = conn.execute("SELECT count(DISTINCT host) AS n FROM sbx_slots WHERE status = 'READY'").fetchone()
        if row and row["n"] >= hosts:
            return
        time.sleep(0.1)
    raise SystemExit("launchers did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--size", type=int, default=64 * 1024)
    args = parser.parse_args()
    dsn = resolve_dsn()
    with tempfile.TemporaryDirectory(prefix="sbx-locality-") as tmp:
        aware = run_mode(dsn, Path(tmp), args.tasks, args.size, aware=True)
        random = run_mode(dsn, Path(tmp), args.tasks, args.size, aware=False)
    print(json.dumps({
        "hosts": len(HOSTS), "slots_per_host": 2, "input_bytes": args.size,
        "aware": aware, "random": random,
        "bytes_copied_ratio_aware_vs_random": round(
            aware["bytes_copied_between_hosts"] / random["bytes_copied_between_hosts"], 4)
        if random["bytes_copied_between_hosts"] else None,
    }, indent=2))


if __name__ == "__main__":
    main()
