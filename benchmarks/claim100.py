#!/usr/bin/env python3
"""The claim on the hot path: how long one claim of 100 tasks takes through PgQueue.

Makes a fresh database next to the one SCALEBOX_DSN names (the role must be allowed to
CREATE DATABASE), puts TASKS READY tasks in one module, and times ROUNDS claims of 100 for
one slot, each followed by giving the tasks back (not timed). Prints one JSON object with
the median and minimum milliseconds of a claim; the database is dropped at the end. Takes
a few seconds. Where the schema has the launcher functions (migration 0018), each round also
times the bare claim statement (queries.sql claim_tasks, what the launcher ran before 0018)
on the same connection, alternating with the claim through sbx_l_claim_v1: on a busy machine
only numbers taken side by side compare.

Usage: SCALEBOX_DSN=postgresql://postgres@127.0.0.1:55432/scalebox python benchmarks/claim100.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from scalebox_hpc.db import apps, schema
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import PgQueue, claim_params
from scalebox_hpc.db.sql import queries, query
from scalebox_hpc.models import Message, SlotWant
from scalebox_hpc.pipeline import load_pipeline

PIPELINE = "name: claim100\nmodules:\n  c: {}\n"


def _with_db(dsn: str, name: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = name
    return make_conninfo(**params)  # type: ignore[arg-type]


def measure(dsn: str, tasks: int, rounds: int) -> dict[str, float | int]:
    """Median and minimum milliseconds of a claim of 100 on a fresh app of ``tasks`` tasks."""
    with tempfile.TemporaryDirectory() as tmp:
        app_dir = Path(tmp) / "app"
        (app_dir / "c").mkdir(parents=True)
        (app_dir / "app.yaml").write_text(PIPELINE)
        (app_dir / "c" / "run.sh").write_text("true\n")
        with connect(dsn) as conn:
            app_id = apps.create_app(conn, load_pipeline(app_dir / "app.yaml"))
            apps.add_tasks(conn, app_id, "c", [Message(f"m{i}") for i in range(tasks)])
            conn.execute("ANALYZE sbx_tasks")
            conn.commit()
    queue = PgQueue(dsn)
    module_id = queue.modules(app_id)["c"].id
    slot = queue.create_slot(module_id, host="h1", seq=0, pid=os.getpid(), work_dir="/tmp")
    params = claim_params(app_id, module_id, "h1", [SlotWant(slot, 0, 100)], 30.0)
    names = ["claim", "claim_tasks"] if "claim" in queries() else ["claim_tasks"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds + 3):  # the first three warm the plan cache up
        for name in names:
            start = time.perf_counter()
            got = queue.conn.execute(query(name), params).fetchall()
            times[name].append((time.perf_counter() - start) * 1000)
            assert len(got) == 100, len(got)
            queue.release(slot)
    queue.close()
    out: dict[str, float | int] = {"tasks": tasks, "rounds": rounds}
    for name, kept in times.items():
        out[f"{name}_ms_median"] = round(statistics.median(kept[3:]), 3)
        out[f"{name}_ms_min"] = round(min(kept[3:]), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    server = os.environ["SCALEBOX_DSN"]
    name = f"sbx_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _with_db(server, name)
    try:
        with psycopg.connect(dsn, row_factory=dict_row) as conn:
            schema.init(conn)  # type: ignore[arg-type]
        print(json.dumps(measure(dsn, args.tasks, args.rounds)))
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
