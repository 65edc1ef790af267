#!/usr/bin/env python3
"""Bulk submit: how long N task bodies take to go in, and how long the CLI takes to start.

Prints one JSON object:
- sizes.N.cli_s: `scalebox task add --file F` with N lines, run as a subprocess the way a user
  runs it (Python start-up, imports and connection included; target: 100 000 in <= 1 s);
- sizes.N.lib_s: the library call apps.submit (COPY through a temporary table);
- sizes.N.lib_json_s: the row-by-row path the hand-off uses (one JSON parameter,
  sbx_insert_messages_v1, apps.add_tasks_json), for comparison (skipped above --json-max);
- cli_start: `scalebox --help` and `scalebox task add BODY` (one body), median of --starts runs;
- load: the 1-minute load average before and after (the numbers mean little on a busy machine).
Each size is the median of --repeat runs, each into a fresh app (deleted afterwards).

Usage: python benchmarks/submit.py [--sizes 2000,10000,100000] [--repeat 3] [--starts 10]
       (SCALEBOX_DSN, else the embedded database)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scalebox_hpc.db import apps
from scalebox_hpc.db.bodyfile import BodyFile
from scalebox_hpc.db.connection import connect, redact
from scalebox_hpc.models import Message
from scalebox_hpc.node import resolve_dsn
from scalebox_hpc.pipeline import load_pipeline

PIPELINE = "name: bench-submit\nmodules:\n  work: {}\n"


def _load() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return -1.0


def _median(runs: int, once: Callable[[], float]) -> float:
    return round(statistics.median(once() for _ in range(runs)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,10000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--json-max", type=int, default=100_000, help="largest N for the row-by-row path")
    args = parser.parse_args()
    dsn = resolve_dsn(create_schema=True)
    env = {**os.environ, "SCALEBOX_DSN": dsn}
    scalebox = [sys.executable, "-m", "scalebox_hpc"]
    load_before = _load()

    with tempfile.TemporaryDirectory(prefix="sbx-bench-submit-") as tmp:
        root = Path(tmp)
        (root / "app.yaml").write_text(PIPELINE)
        (root / "work").mkdir()
        (root / "work" / "run.sh").write_text("#!/bin/sh\nexit 0\n")
        spec = load_pipeline(root / "app.yaml")

        def fresh_app() -> int:
            with connect(dsn) as conn:
                return apps.create_app(conn, spec)

        def drop_app(app_id: int) -> None:
            with connect(dsn) as conn:
                conn.execute("DELETE FROM sbx_apps WHERE id = %s", (app_id,))
                conn.commit()

        def bodies_file(n: int) -> Path:
            path = root / f"bodies-{n}.txt"
            tag = uuid.uuid4().hex[:8]
            path.write_text("".join(f"{tag}/sample-{i:07d}.fits\n" for i in range(n)), encoding="utf-8")
            return path

        def timed(n: int, how: str) -> float:
            app_id, path = fresh_app(), bodies_file(n)
            try:
                t0 = time.perf_counter()
                if how == "cli":
                    subprocess.run([*scalebox, "task", "add", "--app", str(app_id), "--file", str(path)],
                                   env=env, check=True, stdout=subprocess.DEVNULL)
                elif how == "lib":
                    with connect(dsn) as conn:
                        assert apps.submit(conn, app_id, [apps.Batch(file=BodyFile(path))]).written == n
                else:
                    with connect(dsn) as conn:
                        msgs = [Message(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
                        assert apps.add_tasks_json(conn, app_id, None, msgs) == n
                return time.perf_counter() - t0
            finally:
                drop_app(app_id)

        sizes: dict[str, dict[str, float | None]] = {}
        for n in (int(s) for s in args.sizes.split(",")):
            sizes[str(n)] = {
                "cli_s": _median(args.repeat, lambda n=n: timed(n, "cli")),  # type: ignore[misc]
                "lib_s": _median(args.repeat, lambda n=n: timed(n, "lib")),  # type: ignore[misc]
                "lib_json_s": _median(args.repeat, lambda n=n: timed(n, "json"))  # type: ignore[misc]
                if n <= args.json_max else None,
            }

        app_id = fresh_app()

        def start(argv: list[str]) -> float:
            argv = [a.replace("{i}", uuid.uuid4().hex) for a in argv]
            t0 = time.perf_counter()
            subprocess.run([*scalebox, *argv], env=env, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - t0

        cli_start = {
            "help_s": _median(args.starts, lambda: start(["--help"])),
            "add_one_s": _median(args.starts, lambda: start(["task", "add", "--app", str(app_id), "one-{i}"])),
            "python_s": round(statistics.median(
                _python_start(args.starts)), 3),
        }
        drop_app(app_id)

    result: dict[str, Any] = {
        "database": redact(dsn), "cpus": os.cpu_count(), "load_before": load_before, "load_after": _load(),
        "sizes": sizes, "cli_start": cli_start,
        "target": "100000 bodies via `scalebox task add --file` in <= 1 s",
    }
    print(json.dumps(result, indent=2))


def _python_start(runs: int) -> list[float]:
    """The bare interpreter's start: the floor under every CLI time."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out.append(time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    main()
