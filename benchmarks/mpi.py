#!/usr/bin/env python3
"""MPI farm stage vs per-node launchers, same workload, same run, on the real (local) Slurm.

Prints one JSON object with, for each mode, tasks/s (first start → last finish of the N tasks,
from the database), the wall time of the Slurm step and its start-up (srun → first task
claimed), the workers, and the database
connections the stage held (the maximum of ``pg_stat_activity`` rows of the benchmark's own
database, sampled every 50 ms, the sampler excluded):

- ``farm``: ``srun --mpi=pmi2 -N NODES -n RANKS scalebox launcher --mpi -m work`` (RANKS-1 workers);
- ``launchers``: ``srun -N NODES -n NODES scalebox launcher -m work --slots S`` (NODES*S slots).

Usage: python benchmarks/mpi.py [--tasks N] [--nodes 4] [--ranks 8] [--slots 2] [--sleep 0]
Needs SCALEBOX_DSN (or SCALEBOX_TEST_DSN) for a server where it may create a scratch database,
Slurm with `MpiDefault=pmi2`-capable srun, and mpi4py + MPICH in this Python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from scalebox_hpc.db import apps, schema
from scalebox_hpc.db.connection import connect
from scalebox_hpc.models import Message
from scalebox_hpc.pipeline import load_pipeline


def pipeline(root: Path, farm: bool, sleep: float) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "work").mkdir(exist_ok=True)
    run = root / "work" / "run.sh"
    run.write_text("#!/bin/sh\n" + (f"sleep {sleep}\n" if sleep else "") + "exit 0\n")
    run.chmod(0o755)
    mpi = "    mpi: {mode: farm}\n" if farm else ""
    (root / "app.yaml").write_text(
        f"name: bench-{'farm' if farm else 'launchers'}\nmodules:\n  work:\n{mpi}"
        "    arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2, heartbeat_seconds: 5}\n")
    return root / "app.yaml"


class Sampler(threading.Thread):
    """Max connections to ``dbname`` (other than this sampler) while running."""

    def __init__(self, admin_dsn: str, dbname: str) -> None:
        super().__init__(daemon=True)
        self.admin_dsn, self.dbname = admin_dsn, dbname
        self.max = 0
        self.done = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            # the benchmark's own just-closed connections linger a moment in pg_stat_activity
            for _ in range(40):
                if self._count(conn) == 0:
                    break
                time.sleep(0.05)
            self.ready.set()
            while not self.done.wait(0.05):
                self.max = max(self.max, self._count(conn))

    def _count(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                           (self.dbname,)).fetchone()
        return int(row[0]) if row else 0


def measure(dsn: str, admin_dsn: str, dbname: str, app_id: int, argv: list[str], env: dict[str, str],
            n: int) -> dict[str, Any]:
    sampler = Sampler(admin_dsn, dbname)
    sampler.start()
    sampler.ready.wait(5.0)
    t0, epoch0 = time.monotonic(), time.time()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
    wall = time.monotonic() - t0
    sampler.done.set()
    sampler.join()
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 0) AS ok, "
            "extract(epoch FROM max(finished_at) - min(started_at)) AS span "
            "FROM sbx_tasks WHERE app_id = %s", (app_id,)).fetchone()
        first = conn.execute("SELECT extract(epoch FROM min(started_at)) AS t FROM sbx_tasks WHERE app_id = %s",
                             (app_id,)).fetchone()
    assert row is not None
    if proc.returncode != 0 or row["ok"] != n:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{argv[:6]}: exit {proc.returncode}, {row['ok']} of {n} tasks done")
    span = float(row["span"] or 0.0)
    startup = float(first["t"]) - epoch0 if first and first["t"] else None
    return {"tasks_per_s": round(n / span, 1) if span else None, "span_s": round(span, 2),
            "step_wall_s": round(wall, 2), "startup_s": None if startup is None else round(startup, 2),
            "db_connections_max": sampler.max}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=600)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=8, help="farm ranks (rank 0 dispatches)")
    ap.add_argument("--slots", type=int, default=2, help="slots per node for the launchers")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds each run.sh sleeps")
    args = ap.parse_args()
    server = os.environ.get("SCALEBOX_DSN") or os.environ.get("SCALEBOX_TEST_DSN")
    if not server:
        raise SystemExit("set SCALEBOX_DSN (a server where a scratch database may be created)")
    dbname = f"sbx_bench_mpi_{uuid.uuid4().hex[:8]}"
    params = psycopg.conninfo.conninfo_to_dict(server)
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    dsn = psycopg.conninfo.make_conninfo(**{**params, "dbname": dbname})
    tmp = Path(tempfile.mkdtemp(prefix="sbx-bench-mpi-"))
    tmp.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PG"))}
    env.update({"SCALEBOX_DSN": dsn, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    py = [sys.executable, "-m", "scalebox_hpc", "launcher"]
    try:
        with connect(dsn) as conn:
            schema.init(conn)
            conn.commit()
        out: dict[str, Any] = {"tasks": args.tasks, "nodes": args.nodes, "run_sh_sleep_s": args.sleep}
        for mode in ("farm", "launchers"):
            with connect(dsn) as conn:
                app_id = apps.create_app(conn, load_pipeline(pipeline(tmp / mode, mode == "farm", args.sleep)))
                apps.add_tasks(conn, app_id, "work", [Message(str(i)) for i in range(args.tasks)])
            common = ["--app", str(app_id), "-m", "work", "--work-root", str(tmp / "work")]
            if mode == "farm":
                argv = ["srun", "--mpi=pmi2", "--kill-on-bad-exit=1", f"-N{args.nodes}", f"-n{args.ranks}",
                        "--time=15", "-J", "sbx_bench_farm", *py, "--mpi", *common]
                workers = args.ranks - 1
            else:
                argv = ["srun", f"-N{args.nodes}", f"-n{args.nodes}", "--ntasks-per-node=1", "--time=15",
                        "-J", "sbx_bench_launchers", *py, "--slots", str(args.slots), *common]
                workers = args.nodes * args.slots
            out[mode] = {"workers": workers, **measure(dsn, server, dbname, app_id, argv, env, args.tasks)}
        out["speedup_farm_vs_launchers"] = (
            round(out["farm"]["tasks_per_s"] / out["launchers"]["tasks_per_s"], 2)
            if out["farm"]["tasks_per_s"] and out["launchers"]["tasks_per_s"] else None)
        print(json.dumps(out, indent=2))
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


if __name__ == "__main__":
    main()
