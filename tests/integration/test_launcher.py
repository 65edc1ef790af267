"""The launcher's slot loop against a real PostgreSQL and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
from tests.helpers import running, wait_until, write_app

pytestmark = pytest.mark.pg

FAST = "arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}"


def create(pg_dsn: str, root: Path, yaml_text: str, scripts: dict[str, str]) -> int:
    spec = load_pipeline(write_app(root, yaml_text, scripts))
    with connect(pg_dsn) as conn:
        return apps.create_app(conn, spec)


def launch(pg_dsn: str, app_id: int, work: Path, **kw: Any) -> None:
    run_launcher(pg_dsn, LauncherConfig(app_id=app_id, host="testhost", work_root=work, local=True, **kw))


def tasks(pg_dsn: str, app_id: int, module: str | None = None) -> list[dict[str, Any]]:
    with connect(pg_dsn) as conn:
        return apps.list_tasks(conn, app_id, module=module, limit=1000)


def slots(pg_dsn: str, app_id: int) -> list[dict[str, Any]]:
    with connect(pg_dsn) as conn:
        return [dict(r) for r in conn.execute(
            "SELECT s.* FROM sbx_slots s JOIN sbx_modules m ON m.id = s.module_id WHERE m.app_id = %s ORDER BY s.id",
            (app_id,)).fetchall()]


def test_setup_failure_marks_slot_error_and_runs_nothing(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: s
        parameters: {{start_task: go}}
        modules:
          a:
            {FAST}
    """, {"a/setup.sh": "exit 4\n", "a/run.sh": "touch ran\n"})
    launch(pg_dsn, app_id, tmp_path / "work")
    [slot] = slots(pg_dsn, app_id)
    assert slot["status"] == "ERROR" and "setup.sh" in slot["message"]
    assert [t["status"] for t in tasks(pg_dsn, app_id)] == [-1]
    assert not list((tmp_path / "work").rglob("ran"))


def test_work_dir_persists_and_scripts_run_in_order(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: w
        modules:
          a:
            {FAST}
    """, {
        "a/setup.sh": 'echo setup >> log; [ "$PWD" = "$WORK_DIR" ]\n',
        "a/check.sh": "echo check >> log\n",
        "a/run.sh": 'echo "run $1" >> log\n',
        "a/teardown.sh": "echo teardown >> log\n",
    })
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message("1"), Message("2")])
    launch(pg_dsn, app_id, tmp_path / "work")
    [log] = list((tmp_path / "work").rglob("log"))
    lines = log.read_text().split()
    assert lines[0] == "setup" and lines[-1] == "teardown"
    runs = [ln for ln in log.read_text().splitlines() if ln.startswith("run")]
    assert runs == ["run 1", "run 2"]


def test_check_script_gates_claims(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: c
        parameters: {{start_task: go}}
        modules:
          a:
            {FAST}
    """, {
        # refuse the first two checks, then allow
        "a/check.sh": 'n=$(cat n 2>/dev/null || echo 0); echo $((n+1)) > n; [ "$n" -ge 2 ]\n',
        "a/run.sh": "cat n > seen\n",
    })
    launch(pg_dsn, app_id, tmp_path / "work")
    [seen] = list((tmp_path / "work").rglob("seen"))
    assert seen.read_text().strip() == "3"
    assert [t["status"] for t in tasks(pg_dsn, app_id)] == [0]


def test_task_exec_files_and_emits_reach_the_database(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: x
        parameters: {{start_task: go}}
        modules:
          a:
            sink_modules: [b, c]
            {FAST}
          b: {{{FAST}}}
          c: {{{FAST}}}
    """, {
        "a/run.sh": """
            head -c 300 /dev/zero > out.bin
            echo '{"statusCode": 0, "inputBytes": 7, "outputFiles": ["out.bin"], "userText": "hi"}' > task-exec.json
            echo "2026-01-01T00:00:00,begin" > timestamps.txt
            echo "user notes" > user-file.txt
            printf 'from-file\\nc,to-c,{"k":"v"}\\n' > sink-tasks.txt
            send-message "via-send-message"
            send-job-message c "via-send-job-message"
            scalebox task add -H x=1 "via-task-add"
            echo printed
        """,
        "b/run.sh": "true\n", "c/run.sh": "true\n",
    })
    launch(pg_dsn, app_id, tmp_path / "work")
    rows = tasks(pg_dsn, app_id)
    by = {(r["module"], r["body"]): r for r in rows}
    assert set(by) == {("a", "go"), ("b", "from-file"), ("c", "to-c"), ("b", "via-send-message"),
                       ("c", "via-send-job-message"), ("b", "via-task-add")}
    assert all(r["status"] == 0 for r in rows), rows
    assert by[("c", "to-c")]["headers"]["k"] == "v"
    assert by[("b", "via-task-add")]["headers"]["x"] == "1"
    assert by[("b", "via-task-add")]["headers"]["from_module"] == "a"
    with connect(pg_dsn) as conn:
        ex = apps.get_task(conn, by[("a", "go")]["id"])["execs"][0]
    assert (ex["input_bytes"], ex["output_bytes"]) == (7, 300)
    assert ex["user_text"] == "hi\nuser notes\n"
    assert ex["timestamps"] == [{"time": "2026-01-01T00:00:00", "label": "begin"}]
    assert ex["stdout"] == "printed\n"
    assert not list((tmp_path / "work").rglob("task-exec.json"))


def test_failed_run_emits_nothing(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: f
        parameters: {{start_task: go}}
        modules:
          a:
            sink_modules: [b]
            {FAST}
          b: {{{FAST}}}
    """, {"a/run.sh": "send-message early\nscalebox app set-finished nope\nexit 5\n", "b/run.sh": "true\n"})
    launch(pg_dsn, app_id, tmp_path / "work")
    assert [(t["module"], t["status"]) for t in tasks(pg_dsn, app_id)] == [("a", 5)]
    with connect(pg_dsn) as conn:
        assert apps.get_app(conn, app_id)["status"] == "RUNNING"


def test_timeout_kills_the_tree_and_keeps_output(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", """
        name: t
        parameters: {start_task: go}
        modules:
          a:
            arguments: {task_max_seconds: 1.5, max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {"a/run.sh": "sleep 300 &\necho $! > child.pid\nfor i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done\n"})
    t0 = time.monotonic()
    launch(pg_dsn, app_id, tmp_path / "work")
    assert time.monotonic() - t0 < 20
    [task] = tasks(pg_dsn, app_id)
    assert task["status"] == 124
    with connect(pg_dsn) as conn:
        ex = apps.get_task(conn, task["id"])["execs"][0]
    assert "tick 1" in ex["stdout"] and "tick 6" not in ex["stdout"]
    [pidfile] = list((tmp_path / "work").rglob("child.pid"))
    pid = int(pidfile.read_text())
    # Gone or a zombie: the orphan is reparented to init, which may reap it late (a container's).
    wait_until(lambda: not running(pid), timeout=5, what=f"the task's child {pid} to end")


def test_set_finished_ends_the_slots(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", """
        name: h
        parameters: {start_task: go}
        modules:
          a:
            arguments: {max_idle_polls: 1000, sleep_interval_seconds: 0.2}
    """, {"a/run.sh": 'scalebox app set-finished "done: $1"\n'})
    t0 = time.monotonic()
    launch(pg_dsn, app_id, tmp_path / "work")
    assert time.monotonic() - t0 < 15  # not the 200 s of idle polls
    with connect(pg_dsn) as conn:
        row = apps.get_app(conn, app_id)
    assert (row["status"], row["result"]) == ("FINISHED", "done: go")


def test_sigterm_drains_running_task_to_completion(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", """
        name: d
        modules:
          a:
            arguments: {max_idle_polls: 1000, sleep_interval_seconds: 0.2}
    """, {"a/run.sh": "touch started-$1; sleep 2; echo finished\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(5)])
    env = dict(os.environ, SCALEBOX_DSN=pg_dsn, SCALEBOX_WORK_ROOT=str(tmp_path / "work"))
    proc = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "launcher", "--app", str(app_id), "--slots", "1",
                             "--grace", "20"], env=env)
    deadline = time.monotonic() + 30
    while not list((tmp_path / "work").rglob("started-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    rows = tasks(pg_dsn, app_id)
    statuses = sorted(r["status"] for r in rows)
    assert statuses == [-1, -1, -1, -1, 0], rows  # the running one finished, nothing else claimed
    [slot] = slots(pg_dsn, app_id)
    assert slot["status"] == "EXITED"


def test_drain_past_grace_releases_the_task(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", """
        name: g
        parameters: {start_task: go}
        modules:
          a:
            arguments: {max_idle_polls: 1000, sleep_interval_seconds: 0.2}
    """, {"a/run.sh": "touch started; sleep 60\n"})
    env = dict(os.environ, SCALEBOX_DSN=pg_dsn, SCALEBOX_WORK_ROOT=str(tmp_path / "work"))
    proc = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "launcher", "--app", str(app_id), "--grace", "1"],
                            env=env)
    deadline = time.monotonic() + 30
    while not list((tmp_path / "work").rglob("started")) and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert time.monotonic() - t0 < 15
    [task] = tasks(pg_dsn, app_id)
    assert (task["status"], task["attempts"]) == (-1, 0)


def test_emit_to_unknown_module_is_reported(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: u
        parameters: {{start_task: go}}
        modules:
          a:
            {FAST}
    """, {"a/run.sh": "send-job-message nowhere hello\n"})
    launch(pg_dsn, app_id, tmp_path / "work")
    [task] = tasks(pg_dsn, app_id)
    assert task["status"] == -102
    with connect(pg_dsn) as conn:
        assert "unknown sink module 'nowhere'" in apps.get_task(conn, task["id"])["execs"][0]["stderr"]


def test_headers_reach_run_sh_as_json(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: hj
        modules:
          a:
            {FAST}
    """, {"a/run.sh": 'printf "%s" "$2" > headers.json\n'})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message("x", {"q": "it's \"quoted\" $(x)"})])
    launch(pg_dsn, app_id, tmp_path / "work")
    [path] = list((tmp_path / "work").rglob("headers.json"))
    assert json.loads(path.read_text()) == {"q": "it's \"quoted\" $(x)"}


def test_crash_looping_slot_stops_claiming(pg_dsn: str, tmp_path: Path) -> None:
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: crash
        modules:
          a:
            {FAST}
    """, {"a/run.sh": "kill -9 $$\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message(f"t{i}") for i in range(8)])
    launch(pg_dsn, app_id, tmp_path / "work")
    [slot] = slots(pg_dsn, app_id)
    assert slot["status"] == "ERROR" and "crash loop" in slot["message"]
    done = [t["status"] for t in tasks(pg_dsn, app_id)]
    assert sorted(done) == [-1, -1, -1] + [137] * 5


def test_setup_timeout_ends_the_slot(pg_dsn: str, tmp_path: Path) -> None:
    """task_max_seconds bounds setup.sh too: a hanging setup is killed and the slot goes to ERROR."""
    app_id = create(pg_dsn, tmp_path / "app", """
        name: st
        parameters: {start_task: go}
        modules:
          a:
            arguments: {task_max_seconds: 1, max_idle_polls: 2, sleep_interval_seconds: 0.2}
    """, {"a/setup.sh": "sleep 120\n", "a/run.sh": "true\n"})
    t0 = time.monotonic()
    launch(pg_dsn, app_id, tmp_path / "work")
    assert time.monotonic() - t0 < 15
    [slot] = slots(pg_dsn, app_id)
    assert slot["status"] == "ERROR"
    assert [t["status"] for t in tasks(pg_dsn, app_id)] == [-1]


def test_a_finished_upstream_stage_idles_out_while_its_downstream_has_work(pg_dsn: str, tmp_path: Path) -> None:
    """Idle by reachability: `up`'s slots end after max_idle_polls although `down` still has READY
    tasks (they will never become `up`'s; holding its nodes would starve `down`'s stage job),
    while `down`'s slot stays up as long as `up` has work that may still reach it."""
    app_id = create(pg_dsn, tmp_path / "app", f"""
        name: reach
        modules:
          up:
            sink_modules: [down]
            slots: [".*:2"]
            {FAST}
          down:
            {FAST}
    """, {"up/run.sh": 'send-message "from-$1"\n', "down/run.sh": "true\n"})
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "up", [Message("u1")])
        apps.add_tasks(conn, app_id, "down", [Message("queued")])
    try:
        _reachability(pg_dsn, app_id, tmp_path)
    finally:  # a wedged slot thread ends with its app
        with connect(pg_dsn) as conn:
            apps.finish_app(conn, app_id, "test over")


def _reachability(pg_dsn: str, app_id: int, tmp_path: Path) -> None:
    import threading

    upstream = threading.Thread(target=launch, args=(pg_dsn, app_id, tmp_path / "work"),
                                kwargs={"modules": ("up",)})
    upstream.start()
    upstream.join(30)  # it did not wedge: 3 idle polls of 0.2 s once u1 is done
    assert not upstream.is_alive(), "the upstream slots stayed up for the downstream's work"
    by = {(t["module"], t["body"]): t["status"] for t in tasks(pg_dsn, app_id)}
    assert by == {("up", "u1"): 0, ("down", "from-u1"): -1, ("down", "queued"): -1}
    up_slots = slots(pg_dsn, app_id)
    assert len(up_slots) == 2 and {s["status"] for s in up_slots} == {"EXITED"}

    # the other way round: a READY upstream task keeps the downstream slot polling
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "up", [Message("u2")])
    downstream = threading.Thread(target=launch, args=(pg_dsn, app_id, tmp_path / "work"),
                                  kwargs={"modules": ("down",)})
    downstream.start()
    time.sleep(3)  # five idle timeouts of `down` (3 polls x 0.2 s) after its two tasks
    assert downstream.is_alive(), "the downstream slot ended while its upstream still had work"
    with connect(pg_dsn) as conn:  # `up` gets done (no launcher of it runs here)
        conn.execute("UPDATE sbx_tasks SET status = 0 WHERE app_id = %s AND body = 'u2'", (app_id,))
        conn.commit()
    downstream.join(30)
    assert not downstream.is_alive()
    assert {t["status"] for t in tasks(pg_dsn, app_id, module="down")} == {0}
