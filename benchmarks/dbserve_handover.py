#!/usr/bin/env python3
"""The outage window of a served database's hand-over (``scalebox db serve --slurm``).

Serves the database as a Slurm job (the test-bed's), then forces ``--runs`` hand-overs
(``db serve --handover-now``) while two clients query it, and prints one JSON object with, per
hand-over, seconds from ``handover_started`` (the old job begins its fast shutdown; written in
the service file) to:

- ``server_up``: the new generation answering (its ``up_since`` in the service file);
- ``first_query_polling``: the first successful query of a client that opens a new connection
  every 20 ms through ``db.connection.connect`` (the server's real gap, plus < 20 ms);
- ``first_query_launcher``: the first successful query of a client that does what a launcher's
  slot does (one ``PgQueue`` connection, a query every 0.5 s, after a failure
  ``outage_backoff`` 0.5, 1, 2 ... s between tries).

Both clients started with the DSN of generation 0 and find the new host/port because every
connect re-reads the service file. The job's and the clients' clocks are this host's (the
test-bed's nodes share one clock; on a real cluster add the node clock skew).

Usage: python benchmarks/dbserve_handover.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg


def sbx(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], capture_output=True, text=True,
                          timeout=300, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"scalebox {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class Prober(threading.Thread):
    """Queries until stopped, recording the wall time (epoch seconds) of every success."""

    def __init__(self, dsn: str, launcher_like: bool) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.launcher_like = launcher_like
        self.ok: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        if self.launcher_like:
            self._launcher()
        else:
            self._polling()

    def _polling(self) -> None:
        from scalebox_hpc.db.connection import connect
        from scalebox_hpc.errors import DatabaseError

        while not self.stop.is_set():
            try:
                with connect(self.dsn, timeout=1) as conn:
                    conn.execute("SELECT 1")
                self.ok.append(time.time())
            except (DatabaseError, psycopg.Error):
                pass
            self.stop.wait(0.02)

    def _launcher(self) -> None:
        from scalebox_hpc.db.queue import PgQueue
        from scalebox_hpc.errors import DatabaseError
        from scalebox_hpc.launcher.slot import outage_backoff

        queue, failures = PgQueue(self.dsn), 0
        while not self.stop.is_set():
            try:
                queue.conn.execute("SELECT 1")
                self.ok.append(time.time())
                failures = 0
                self.stop.wait(0.5)
            except (DatabaseError, psycopg.Error):
                queue.close()
                failures += 1
                self.stop.wait(outage_backoff(failures))
        queue.close()


def first_after(times: list[float], t0: float) -> float | None:
    later = [t for t in times if t > t0]
    return round(min(later) - t0, 3) if later else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    shared = Path(tempfile.mkdtemp(prefix="sbx-bench-dbserve-"))
    shared.chmod(0o777)
    for key in [k for k in os.environ if k.startswith(("SCALEBOX_", "PG"))]:
        del os.environ[key]
    os.environ["SCALEBOX_HOME"] = str(shared / "home")
    service = shared / "home" / "service" / "service.json"
    runs: list[dict[str, Any]] = []
    try:
        sbx("db", "serve", "--slurm", "--time", "30", "--handover-before", "1m", "--wait", "180")
        sbx("db", "init")
        from scalebox_hpc.db.connection import configured_dsn

        dsn = configured_dsn()
        assert dsn
        probers = [Prober(dsn, launcher_like=False), Prober(dsn, launcher_like=True)]
        for p in probers:
            p.start()
        for _ in range(args.runs):
            time.sleep(3)
            sbx("db", "serve", "--handover-now", "--wait", "180")
            time.sleep(8)  # the launcher-like client's backoff may still be running
            info = json.loads(service.read_text())
            t0 = datetime.fromisoformat(info["handover_started"]).timestamp()
            runs.append({
                "generation": info["generation"], "node": info["node"], "port": info["port"],
                "server_up": round(datetime.fromisoformat(info["up_since"]).timestamp() - t0, 3),
                "first_query_polling": first_after(probers[0].ok, t0),
                "first_query_launcher": first_after(probers[1].ok, t0),
            })
        for p in probers:
            p.stop.set()
            p.join(5)
    finally:
        subprocess.run([sys.executable, "-m", "scalebox_hpc", "db", "stop"], capture_output=True, timeout=180,
                       check=False)
        shutil.rmtree(shared, ignore_errors=True)

    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    print(json.dumps({"runs": runs, "median": {k: median(k) for k in
                                                ("server_up", "first_query_polling", "first_query_launcher")}},
                     indent=2))


if __name__ == "__main__":
    main()
