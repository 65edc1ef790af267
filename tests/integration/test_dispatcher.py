"""The node's dispatcher on a real PostgreSQL: one session per launcher, batched claims and
hand-offs, prefetched tasks given back."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.db.notify import Listener
from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.launcher.launcher import Launcher, LauncherConfig
from scalebox_hpc.launcher.wakeups import Wakeups
from scalebox_hpc.models import Message
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.runtime.local import LocalRuntime
from tests.helpers import write_app

pytestmark = pytest.mark.pg

PIPELINE = """
name: disp
modules:
  a:
    sink_modules: [b]
    slots: [".*:4"]
    arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
  b:
    slots: [".*:3"]
    arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
"""
SCRIPTS = {"a/run.sh": 'send-message "$1-b"\n', "b/run.sh": "exit 0\n"}


def make_app(pg_dsn: str, root: Path, pipeline: str = PIPELINE, scripts: dict[str, str] | None = None) -> int:
    spec = load_pipeline(write_app(root, pipeline, SCRIPTS if scripts is None else scripts))
    with connect(pg_dsn) as conn:
        return apps.create_app(conn, spec)


def statuses(pg_dsn: str, app_id: int) -> list[tuple[str, int, int]]:
    with connect(pg_dsn) as conn:
        return [(r["module"], r["status"], r["attempts"]) for r in apps.list_tasks(conn, app_id, limit=100000)]


def backends(pg_dsn: str, watcher: Any) -> int:
    """Server connections to the test database other than the watcher's own."""
    row = watcher.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    ).fetchone()
    return int(row["n"])


def test_a_launcher_with_seven_slots_holds_two_connections(pg_dsn: str, tmp_path: Path) -> None:
    """Seven slots in two modules, heart-beating and handing off: the launcher's dispatcher
    and its listener are the only sessions (before: one per slot, plus two)."""
    app_id = make_app(pg_dsn, tmp_path / "app")
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(300)])
    wakeups = Wakeups()
    listener = Listener(pg_dsn, wakeups.notify)
    listener.start()
    listener.ready.wait(5.0)
    config = LauncherConfig(app_id=app_id, host="h", work_root=tmp_path / "work", local=True)
    launcher = Launcher(config, lambda: PgQueue(pg_dsn), LocalRuntime(), wakeups)
    peak = 0
    with connect(pg_dsn, autocommit=True) as watcher:
        assert launcher.start() == 7
        while launcher.alive():
            peak = max(peak, backends(pg_dsn, watcher))
            time.sleep(0.05)
        launcher.stop(5.0)
        listener.stop()
    assert 1 <= peak <= 2, peak
    done = statuses(pg_dsn, app_id)
    assert len(done) == 600 and {s for _, s, _ in done} == {0}
    stats = launcher.dispatcher.stats
    # batching happened: hand-offs shared statements, short tasks were prefetched (empty
    # polls of b's woken slots make claim statements outnumber the tasks here)
    assert stats.tasks_completed == 600
    assert stats.complete_statements < stats.tasks_completed, stats
    assert stats.prefetch_hits > 0, stats


def test_prefetched_tasks_go_back_uncounted_on_drain(pg_dsn: str, tmp_path: Path) -> None:
    """A drain gives back the running task and every prefetched one: READY, attempts as before."""
    pipeline = """
name: drain
modules:
  a:
    slots: [".*:2"]
    arguments: {max_idle_polls: 100, sleep_interval_seconds: 0.2}
"""
    app_id = make_app(pg_dsn, tmp_path / "app", pipeline, {"a/run.sh": '[ "$1" = slow ] && sleep 30\nexit 0\n'})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(40)])
        apps.add_tasks(conn, app_id, "a", [Message("slow")])
        apps.add_tasks(conn, app_id, "a", [Message(f"u{i}") for i in range(40)])
    config = LauncherConfig(app_id=app_id, host="h", work_root=tmp_path / "work", local=True)
    launcher = Launcher(config, lambda: PgQueue(pg_dsn), LocalRuntime(), Wakeups())
    launcher.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = statuses(pg_dsn, app_id)
        if sum(1 for _, s, _ in rows if s == 0) >= 45 and any(s == -3 for _, s, _ in rows):
            break
        time.sleep(0.1)
    held = launcher.dispatcher.stats.prefetch_hits
    launcher.stop(grace=0.5)
    rows = statuses(pg_dsn, app_id)
    assert not [r for r in rows if r[1] == -3], rows
    ready = [r for r in rows if r[1] == -1]
    assert ready and all(attempts == 0 for _, _, attempts in ready), ready
    assert held > 0  # the short tasks were prefetched


def test_concurrent_launchers_never_run_a_task_twice(pg_dsn: str, tmp_path: Path) -> None:
    """Three launchers (three dispatchers, prefetching) on one queue: each task runs once."""
    pipeline = """
name: many
modules:
  a:
    slots: [".*:3"]
    arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}
"""
    app_id = make_app(pg_dsn, tmp_path / "app", pipeline, {"a/run.sh": 'echo "$1" >> "$RUNS"\n'})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(600)])
    runs = tmp_path / "runs.txt"
    threads = []
    for n in range(3):
        config = LauncherConfig(app_id=app_id, host=f"h{n}", work_root=tmp_path / f"work{n}", local=True,
                                script_env={"RUNS": str(runs)})
        launcher = Launcher(config, lambda: PgQueue(pg_dsn), LocalRuntime(), Wakeups())
        launcher.start()
        threads.append(threading.Thread(target=launcher.wait))
        threads[-1].start()
    for t in threads:
        t.join(120)
    lines = runs.read_text().split()
    assert len(lines) == 600 and len(set(lines)) == 600
    assert {s for _, s, _ in statuses(pg_dsn, app_id)} == {0}
