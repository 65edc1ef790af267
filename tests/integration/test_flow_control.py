"""Flow control against a real PostgreSQL: semaphores, max_pending, disk gates, check.sh, cancel."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.launcher.launcher import LauncherConfig
from scalebox_hpc.models import Message
from scalebox_hpc.node import run_launcher
from scalebox_hpc.pipeline import load_pipeline
from tests.helpers import wait_until, write_app

pytestmark = pytest.mark.pg

FAST = "heartbeat_seconds: 1, max_idle_polls: 3, sleep_interval_seconds: 0.2"


def create(dsn: str, root: Path, yaml_text: str, scripts: dict[str, str]) -> int:
    with connect(dsn) as conn:
        return apps.create_app(conn, load_pipeline(write_app(root, yaml_text, scripts)))


def statuses(dsn: str, app_id: int, module: str | None = None) -> list[int]:
    with connect(dsn) as conn:
        return sorted(t["status"] for t in apps.list_tasks(conn, app_id, module=module, limit=1000))


class Background:
    """run_launcher in a thread, stopped by a predicate or stop()."""

    def __init__(self, dsn: str, app_id: int, work: Path, **kw: Any) -> None:
        self.stop_now = threading.Event()
        config = LauncherConfig(app_id=app_id, host="h", work_root=work, local=True, **kw)
        self.thread = threading.Thread(
            target=run_launcher, args=(dsn, config), kwargs={"on_tick": self.stop_now.is_set, "tick_seconds": 0.1},
            daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        self.stop_now.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_semaphore_gates_claims(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: sem
        modules:
          a:
            arguments: {{semaphore: tokens, {FAST}}}
    """, {"a/run.sh": "true\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(5)])
        apps.semaphore_create(conn, app_id, "tokens", 2)
    bg = Background(pg_dsn, app_id, tmp_path / "work")
    wait_until(lambda: statuses(pg_dsn, app_id).count(0) == 2)
    time.sleep(1.0)
    assert statuses(pg_dsn, app_id).count(0) == 2  # no token, no claim
    with connect(pg_dsn) as conn:
        assert apps.semaphore_get(conn, app_id, "tokens") == 0
        apps.semaphore_add(conn, app_id, "tokens", 3)
    wait_until(lambda: statuses(pg_dsn, app_id) == [0] * 5)
    bg.stop()


def test_semaphore_is_atomic_under_concurrency(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", "name: s2\nmodules:\n  a: {}\n", {"a/run.sh": "true\n"})
    with connect(pg_dsn) as conn:
        apps.semaphore_create(conn, app_id, "n", 0)

    def bump() -> None:
        with connect(pg_dsn) as conn:
            for _ in range(100):
                apps.semaphore_add(conn, app_id, "n", 1)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with connect(pg_dsn) as conn:
        assert apps.semaphore_get(conn, app_id, "n") == 400


def test_max_pending_holds_back_upstream(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: bp
        modules:
          a:
            sink_modules: [b]
            arguments: {{{FAST}}}
          b:
            arguments: {{max_pending: 2, {FAST}}}
    """, {"a/run.sh": 'send-message "$1"\n', "b/run.sh": "true\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(6)])
    upstream = Background(pg_dsn, app_id, tmp_path / "work", modules=("a",))
    wait_until(lambda: statuses(pg_dsn, app_id, "b") == [-1, -1])
    time.sleep(1.0)
    assert statuses(pg_dsn, app_id, "a").count(0) == 2  # b is full: a waits
    downstream = Background(pg_dsn, app_id, tmp_path / "work", modules=("b",))
    wait_until(lambda: statuses(pg_dsn, app_id, "b") == [0] * 6)
    upstream.stop()
    downstream.stop()
    assert statuses(pg_dsn, app_id, "a") == [0] * 6


def test_disk_gates_stop_claims(pg_dsn: str, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "blob").write_bytes(b"x" * 20_000)
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: disk
        parameters: {{start_task: go}}
        modules:
          a:
            arguments: {{dir_limit_gb: {{"{full}": 0.00001}}, {FAST}}}
          b:
            parameters: {{start_task: go}}
            arguments: {{free_space_gb: 1000000000, {FAST}}}
    """, {"a/run.sh": "true\n", "b/run.sh": "true\n"})
    bg = Background(pg_dsn, app_id, tmp_path / "work")
    time.sleep(2.0)
    assert statuses(pg_dsn, app_id) == [-1, -1]
    (full / "blob").unlink()  # room again in a's directory; b's disk stays "full"
    wait_until(lambda: statuses(pg_dsn, app_id, "a") == [0])
    bg.stop()
    assert statuses(pg_dsn, app_id, "b") == [-1]


def test_check_test_feature(pg_dsn: str, tmp_path: Path) -> None:
    """Scalebox's check_test: check.sh exits 0, 1 or 2 at random and logs each code."""
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: check-test
        parameters: {{start_task: go}}
        modules:
          a:
            arguments: {{{FAST}}}
    """, {
        "a/check.sh": 'code=$((RANDOM % 3)); echo "check_code:$code" >> user-file.txt; exit "$code"\n',
        "a/run.sh": 'echo "check_test done!" >> user-file.txt\n',
    })
    bg = Background(pg_dsn, app_id, tmp_path / "work")
    wait_until(lambda: statuses(pg_dsn, app_id) == [0])
    bg.stop()
    with connect(pg_dsn) as conn:
        [task] = apps.list_tasks(conn, app_id)
        text = apps.get_task(conn, task["id"])["execs"][0]["user_text"]
    lines = text.strip().splitlines()
    assert lines[-2:] == ["check_code:0", "check_test done!"], lines
    assert all(ln in ("check_code:1", "check_code:2") for ln in lines[:-2])


def test_cancel_kills_running_tasks_and_claims_nothing(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: cancel
        modules:
          a:
            slots: [".*:2"]
            arguments: {{{FAST}}}
    """, {"a/run.sh": "echo $$ > pid-$1; sleep 60\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(4)])
    bg = Background(pg_dsn, app_id, tmp_path / "work")
    wait_until(lambda: len(list((tmp_path / "work").rglob("pid-*"))) == 2)
    t0 = time.monotonic()
    with connect(pg_dsn) as conn:
        apps.cancel_app(conn, app_id)
    bg.thread.join(20)
    assert not bg.thread.is_alive() and time.monotonic() - t0 < 10
    pids = [int(p.read_text()) for p in (tmp_path / "work").rglob("pid-*")]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert statuses(pg_dsn, app_id) == [-1] * 4  # released, never run again
    with connect(pg_dsn) as conn:
        row = apps.get_app(conn, app_id)
    assert (row["status"], row["result"], row["cancelled"]) == ("FINISHED", "cancelled", True)


def test_run_sh_gives_semaphore_units_back(pg_dsn: str, tmp_path: Path) -> None:
    """One token, returned by each run through the CLI from inside run.sh: tasks run one at a time."""
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: sem3
        modules:
          a:
            slots: [".*:2"]
            arguments: {{semaphore: token, {FAST}}}
    """, {"a/run.sh": 'scalebox variable set "last" "$1"\nscalebox semaphore increment token > /dev/null\n'})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(4)])
        apps.semaphore_create(conn, app_id, "token", 1)
    bg = Background(pg_dsn, app_id, tmp_path / "work")
    wait_until(lambda: statuses(pg_dsn, app_id) == [0] * 4, timeout=60)
    bg.stop()
    with connect(pg_dsn) as conn:
        assert apps.semaphore_get(conn, app_id, "token") == 1
        assert apps.variable_get(conn, app_id, "last") in {f"t{i}" for i in range(4)}
