#!/usr/bin/env python3
"""Messages through the outbox (one database per cluster) beside the same hand-offs on one database.

One sender module hands off ``--tasks`` tasks one by one, each emitting ``--messages`` messages
to module ``recv``:

- ``one_db``: ``recv`` is a module of the same app (the messages are READY at the commit);
- ``outbox``: ``recv`` is a module of an app in the second database (REMOTE_SERVER / APP_ID): the
  hand-off writes the outbox, the sender's background relay (kicked after each commit) delivers.

A poller on the receiving database notes when each message first appears there. Printed as one
JSON object, per mode: messages/s (all messages over the time from the first hand-off to the
last arrival) and the delivery latency p50/p99 in ms (a message's arrival minus its hand-off's
commit, both on this client's clock). Databases: temporary ones on the servers of
SCALEBOX_TEST_DSN and SCALEBOX_TEST_DSN2 (launchers/testbed/postgres2.sh), dropped after.

Usage: python benchmarks/crosscluster.py [--tasks 100] [--messages 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from scalebox_hpc.db import apps, schema
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.queue import PgQueue, insert_messages
from scalebox_hpc.models import Message, TaskResult
from scalebox_hpc.pipeline import load_pipeline


def _with_db(dsn: str, name: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = name
    return psycopg.conninfo.make_conninfo(**params)


@contextmanager
def temp_db(server: str) -> Iterator[str]:
    """A fresh database with the schema on ``server``, dropped after."""
    name = f"sbx_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _with_db(server, name)
    try:
        with connect(dsn) as conn:
            schema.init(conn)
            conn.commit()
        yield dsn
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _app(dsn: str, root: Path, text: str, modules: list[str]) -> int:
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.yaml").write_text(text)
    for m in modules:
        (root / m).mkdir(exist_ok=True)
        (root / m / "run.sh").write_text("#!/bin/sh\ntrue\n")
        (root / m / "run.sh").chmod(0o755)
    with connect(dsn) as conn:
        return apps.create_app(conn, load_pipeline(root / "app.yaml"))


class Poller(threading.Thread):
    """Notes when each message of ``app_id`` first shows in ``dsn`` (client clock)."""

    def __init__(self, dsn: str, app_id: int, expected: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.app_id, self.expected = dsn, app_id, expected
        self.seen: dict[str, float] = {}

    def run(self) -> None:
        last = 0
        with connect(self.dsn, autocommit=True) as conn:
            while len(self.seen) < self.expected:
                rows = conn.execute("SELECT t.id, t.body FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id "
                                    "WHERE t.app_id = %s AND m.name = 'recv' AND t.id > %s ORDER BY t.id",
                                    (self.app_id, last)).fetchall()
                now = time.perf_counter()
                for r in rows:
                    self.seen.setdefault(r["body"], now)
                    last = max(last, int(r["id"]))
                time.sleep(0.002)


def run_mode(sender_dsn: str, receiver_dsn: str, sender_app: int, receiver_app: int, tasks: int,
             messages: int) -> dict[str, Any]:
    """Hand off ``tasks`` tasks of module ``send`` one by one, ``messages`` messages each."""
    q = PgQueue(sender_dsn)
    refs = q.modules(sender_app)
    with connect(sender_dsn) as conn, conn.transaction():
        insert_messages(conn, sender_app, [(refs["send"], Message(f"t{i}")) for i in range(tasks)])
    slot = q.create_slot(refs["send"].id, host="bench", seq=0, pid=os.getpid(), work_dir="/tmp")
    claimed = []
    while len(claimed) < tasks:
        claimed += q.claim(sender_app, refs["send"].id, host="bench", slot_id=slot, slot_seq=0, limit=16)
    poller = Poller(receiver_dsn, receiver_app, tasks * messages)
    poller.start()
    committed: dict[str, float] = {}
    t0 = time.perf_counter()
    for task in claimed:
        now = datetime.now(UTC)
        msgs = [Message(f"{task.body}-{j}") for j in range(messages)]
        q.complete(task, TaskResult(status=0, started_at=now, finished_at=now, messages=msgs), slot_id=slot,
                   host="bench", sender=refs["send"], modules=refs)
        done = time.perf_counter()
        for m in msgs:
            committed[m.body] = done
    poller.join(600)
    q.close()
    total = tasks * messages
    lat = sorted((poller.seen[b] - committed[b]) * 1000 for b in committed if b in poller.seen)
    end = max(poller.seen.values()) if poller.seen else time.perf_counter()
    return {
        "messages": total, "arrived": len(poller.seen),
        "messages_per_s": round(total / (end - t0), 1),
        "latency_ms_p50": round(statistics.median(lat), 2) if lat else None,
        "latency_ms_p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--messages", type=int, default=5, help="messages per task")
    args = parser.parse_args()
    server1 = os.environ["SCALEBOX_TEST_DSN"]
    server2 = os.environ["SCALEBOX_TEST_DSN2"]
    out: dict[str, Any] = {"tasks": args.tasks, "messages_per_task": args.messages}
    with tempfile.TemporaryDirectory() as tmp, temp_db(server1) as db1, temp_db(server2) as db2:
        root = Path(tmp)
        one = _app(db1, root / "one", "name: one\nmodules:\n  send: {sink_modules: [recv]}\n"
                   "  recv: {arguments: {conflict_action: IGNORE}}\n", ["send", "recv"])
        out["one_db"] = run_mode(db1, db1, one, one, args.tasks, args.messages)
        part2 = _app(db2, root / "p2", "name: part2\nmodules:\n  recv: {}\n", ["recv"])
        part1 = _app(db1, root / "p1", "name: part1\nmodules:\n  send:\n    sink_modules: [recv]\n"
                     f"    environments: [REMOTE_SERVER={db2}, APP_ID={part2}]\n", ["send"])
        out["outbox"] = run_mode(db1, db2, part1, part2, args.tasks, args.messages)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
