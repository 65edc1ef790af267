#!/usr/bin/env python3
"""The queue's cost through PgBouncer (transaction mode) against a direct connection.

One cycle = PgQueue.claim (one task) + PgQueue.complete (no messages), the launcher's two
statements per task. Modes, each on a fresh app in the same database:
- direct:           direct, connect()'s default there: psycopg's automatic prepare (after 5 runs);
- direct_unprepared: direct, prepare_threshold=None (what the pooler mode needs): its cost alone;
- direct_pooled:    direct, but in the pooler mode (SCALEBOX_DB_POOLER=transaction): no prepare and
                    the per-transaction SET LOCAL statement_timeout;
- pgbouncer:        through PgBouncer with SCALEBOX_DB_POOLER=transaction: what a site gets.
Prints one JSON object: cycles per second per mode and worker count, every round.

Usage: python benchmarks/pgbouncer.py DIRECT_DSN BOUNCER_DSN [--cycles N] [--workers 1,4] [--rounds 2]
(the same database both ways; its schema is created when missing)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scalebox_hpc.db import apps, connection, queue, schema
from scalebox_hpc.models import Message, TaskResult
from scalebox_hpc.pipeline import load_pipeline

PIPELINE = "name: pgb-bench\nmodules:\n  a: {}\n"


def _app(dsn: str, tasks: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "app.yaml").write_text(PIPELINE)
        (root / "a").mkdir()
        (root / "a" / "run.sh").write_text("#!/bin/sh\n")
        (root / "a" / "run.sh").chmod(0o755)
        spec = load_pipeline(root / "app.yaml")
    with connection.connect(dsn) as conn:
        app_id = apps.create_app(conn, spec)
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(tasks)])
        conn.commit()
    return app_id


def _worker(dsn: str, app_id: int, cycles: int, errors: list[str]) -> None:
    q = queue.PgQueue(dsn)
    try:
        refs = q.modules(app_id)
        slot = q.create_slot(refs["a"].id, host="bench", seq=0, pid=os.getpid(), work_dir="/tmp")
        now = datetime.now(UTC)
        result = TaskResult(status=0, started_at=now, finished_at=now)
        for _ in range(cycles):
            tasks = q.claim(app_id, refs["a"].id, host="bench", slot_id=slot, slot_seq=0)
            for t in tasks:
                q.complete(t, result, slot_id=slot, host="bench", sender=refs["a"], modules=refs)
    except Exception as exc:  # reported in the JSON
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        q.close()


def run(dsn: str, workers: int, cycles: int) -> dict[str, Any]:
    app_id = _app(dsn, workers * cycles)
    errors: list[str] = []
    threads = [threading.Thread(target=_worker, args=(dsn, app_id, cycles, errors)) for _ in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    return {"cycles_per_s": round(workers * cycles / dt), "errors": sorted(set(errors))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("direct")
    ap.add_argument("bouncer")
    ap.add_argument("--cycles", type=int, default=1000, help="claim+complete cycles per worker")
    ap.add_argument("--workers", default="1,4")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with connection.connect(args.direct) as conn:
        schema.ensure(conn, create=True)
        conn.commit()
    plain = queue.connect
    modes = {
        "direct": (args.direct, "", plain),
        "direct_unprepared": (args.direct, "", functools.partial(plain, prepare_threshold=None)),
        "direct_pooled": (args.direct, "transaction", plain),
        "pgbouncer": (args.bouncer, "transaction", plain),
    }
    out: dict[str, Any] = {"cycles_per_worker": args.cycles, "results": {}}
    for rnd in range(args.rounds):
        for name, (dsn, pooler, conn_fn) in modes.items():
            os.environ[connection.POOLER_ENV] = pooler
            queue.connect = conn_fn  # type: ignore[assignment]  # the bench's switch, not the library's
            for w in (int(x) for x in args.workers.split(",")):
                res = run(dsn, w, args.cycles)
                out["results"].setdefault(f"{name}/{w}w", []).append(res["cycles_per_s"])
                if res["errors"]:
                    out.setdefault("errors", {})[f"{name}/{w}w/round{rnd}"] = res["errors"]
    queue.connect = plain  # type: ignore[assignment]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
