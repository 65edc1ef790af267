"""`scalebox run` of apps with the standard cron module (`code_path: scalebox:cron`) against a real
PostgreSQL: ticks of a short real schedule reach the right modules while the cron task runs, each
once; the app ends by CRON_DURATION or by `scalebox app set-finished`; a bad line fails the task
naming it. Then the cron sink itself on the real database: IGNORE dedupes a tick, the app's state."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scalebox_hpc.db.queue import PgQueue
from scalebox_hpc.errors import DatabaseError
from scalebox_hpc.launcher.services import TaskServices
from scalebox_hpc.modules.cron.database import LauncherSink, TaskIdentity
from scalebox_hpc.modules.cron.loop import AppState, Tick
from scalebox_hpc.modules.cron.schedule import parse_cron_file
from tests.acceptance.test_cli import SCALEBOX, sbx
from tests.helpers import write_app

pytestmark = pytest.mark.pg

TICK = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

APP = """
    name: cron-e2e
    modules:
      cron:
        code_path: scalebox:cron
        parameters: {{start_task: ANY}}
        sink_modules: [a, b]
        environments:
          CRON_FILE: {cron_txt}
{extra}
      a:
        environments: {{SEEN: {seen}/a}}
      b:
        environments: {{SEEN: {seen}/b}}
"""

# each tick: its body and when it was worked on (epoch seconds), one line per run
TARGET = 'printf "%s %s\\n" "$1" "$(date +%s.%N)" >> "$SEEN"\n'


def make_app(tmp_path: Path, cron_txt: str, extra: str = "", target: str = TARGET) -> Path:
    (tmp_path / "cron.txt").write_text(cron_txt)
    (tmp_path / "seen").mkdir()
    indent = " " * 10
    text = APP.format(cron_txt=tmp_path / "cron.txt", seen=tmp_path / "seen",
                      extra="\n".join(indent + line for line in extra.splitlines()))
    return write_app(tmp_path / "app", text, {"a/run.sh": target, "b/run.sh": target})


def seen(tmp_path: Path, module: str) -> list[tuple[str, float]]:
    path = tmp_path / "seen" / module
    lines = path.read_text().splitlines() if path.exists() else []
    return [(body, float(at)) for body, at in (line.split() for line in lines)]


def tasks(env: dict[str, str], module: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(sbx(env, "task", "list", "-m", module, "--json").stdout)
    return rows


def when(body: str) -> datetime:
    return datetime.fromisoformat(body).replace(tzinfo=UTC)


def test_ticks_reach_their_modules_while_the_cron_task_runs(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = make_app(tmp_path, "# two targets, ticks every second and every other\n@every 1s,a\n@every 2s,b\n",
                   "CRON_DURATION: 6s")
    proc = sbx(cli_env, "run", str(app))
    assert "cron: 0/1" not in proc.stderr
    a, b = seen(tmp_path, "a"), seen(tmp_path, "b")
    for module, got in (("a", a), ("b", b)):
        bodies = [body for body, _ in got]
        assert bodies and all(TICK.fullmatch(x) for x in bodies), got
        assert len(bodies) == len(set(bodies)), f"a tick of {module} ran twice: {bodies}"
        assert sorted(bodies) == sorted(t["body"] for t in tasks(cli_env, module))  # each task ran once, all OK
        assert all(t["status"] == 0 for t in tasks(cli_env, module))
    assert len(a) >= 3 and len(b) >= 1
    assert all(when(body).second % 2 == 0 for body, _ in b)  # @every 2s: on even seconds
    [cron] = tasks(cli_env, "cron")
    shown = json.loads(sbx(cli_env, "task", "show", str(cron["id"]), "--json").stdout)
    [run] = shown["execs"]
    assert run["status"] == 0 and "ran for 0:00:06" in run["stdout"], run
    # at the tick, not at the end of the cron task: the first tick was worked on while it still ran
    ended = datetime.fromisoformat(run["finished_at"]).timestamp()
    assert min(at for _, at in a) < ended - 1.0
    # the ticks lie inside the cron task's run, in UTC
    started = datetime.fromisoformat(run["started_at"])
    assert all(started - timedelta(seconds=1) <= when(body) <= started + timedelta(seconds=7) for body, _ in a + b)


def test_the_app_ends_when_a_module_sets_it_finished(cli_env: dict[str, str], tmp_path: Path) -> None:
    # no CRON_DURATION: the cron task runs until the app is FINISHED, then ends with status 0
    target = TARGET + '[ "$(wc -l < "$SEEN")" -lt 3 ] || scalebox app set-finished "three ticks"\n'
    app = make_app(tmp_path, "@every 1s,a\n@every 1h,b\n", target=target)
    proc = sbx(cli_env, "run", str(app), "--timeout", "60", check=False)
    assert proc.stdout.strip() == "three ticks", proc.stderr
    assert len(seen(tmp_path, "a")) >= 3
    # a tick written while the finishing task ran (before its set-finished was committed) stays READY,
    # and `scalebox run` says so (exit 1): nothing else may be left
    left = [t for t in tasks(cli_env, "a") if t["status"] != 0]
    assert proc.returncode == (1 if left else 0), proc.stderr
    assert all(t["status"] == -1 and TICK.fullmatch(t["body"]) for t in left) and len(left) <= 1, left
    assert "gave up after the timeout" not in proc.stderr
    [cron] = tasks(cli_env, "cron")
    assert cron["status"] == 0
    shown = json.loads(sbx(cli_env, "task", "show", str(cron["id"]), "--json").stdout)
    assert "the app ended" in shown["execs"][0]["stdout"]


def test_an_interrupted_run_continues_without_a_tick_twice(cli_env: dict[str, str], tmp_path: Path) -> None:
    # Ctrl-C drains `scalebox run`: after --grace the cron task gets TERM and goes back READY;
    # `scalebox run --app` starts it again, and the ticks go on from there, none sent twice
    app = make_app(tmp_path, "@every 1s,a\n", "CRON_DURATION: 5s")
    proc = subprocess.Popen([*SCALEBOX, "run", "--grace", "0.5", str(app)], env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(seen(tmp_path, "a")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "stopped; 1 task(s) left unfinished" in err, err
    [cron] = tasks(cli_env, "cron")
    assert cron["status"] == -1  # given back, to run again
    first = [body for body, _ in seen(tmp_path, "a")]
    sbx(cli_env, "run", "--app", "1")
    bodies = [body for body, _ in seen(tmp_path, "a")]
    assert len(bodies) > len(first) and len(bodies) == len(set(bodies)), bodies
    assert [t["status"] for t in tasks(cli_env, "cron")] == [0]


def test_a_bad_line_fails_the_cron_task_naming_it(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = make_app(tmp_path, "@every 1s,a\n# fine so far\n@every 1 s,b\n")
    proc = sbx(cli_env, "run", str(app), check=False)
    assert proc.returncode == 1
    [cron] = tasks(cli_env, "cron")
    assert cron["status"] == 14
    shown = json.loads(sbx(cli_env, "task", "show", str(cron["id"]), "--json").stdout)
    assert "cron.txt:3: " in shown["execs"][0]["stderr"] and "'@every 1 s,b'" in shown["execs"][0]["stderr"]
    assert not seen(tmp_path, "a")


def test_a_target_outside_sink_modules_is_refused(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = make_app(tmp_path, "@every 1s,a\n@every 1s,cron\n")
    sbx(cli_env, "run", str(app), check=False)
    [cron] = tasks(cli_env, "cron")
    shown = json.loads(sbx(cli_env, "task", "show", str(cron["id"]), "--json").stdout)
    assert cron["status"] == 14
    assert "cron.txt:2: module 'cron' is not in sink_modules of 'cron'" in shown["execs"][0]["stderr"]


def test_the_sink_writes_a_tick_once_and_reports_the_app_state(cli_env: dict[str, str], tmp_path: Path) -> None:
    """The cron sink through a real task-services socket over the real database (the launcher's
    side in-process: its queue, and which task it runs)."""
    app = make_app(tmp_path, "@every 1s,a\n")
    app_id = int(sbx(cli_env, "app", "create", str(app)).stdout.strip())
    [cron] = tasks(cli_env, "cron")
    [entry] = parse_cron_file("@every 1s,a")
    tick = Tick(datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC), entry)
    queue = PgQueue(cli_env["SCALEBOX_DSN"])
    running = {cron["id"]}
    sock_dir = Path(tempfile.mkdtemp(prefix="sbx-t-", dir="/tmp"))
    server = TaskServices(sock_dir / "s", lambda req: queue.task_service(app_id, req), lambda t: t in running)
    server.start()
    sink = LauncherSink(str(sock_dir / "s"), TaskIdentity(cron["id"]))
    try:
        assert set(sink.modules()) == {"cron", "a", "b"} and sink.modules()["cron"].sink_modules == ("a", "b")
        assert sink.deliver([tick]) == (AppState.RUNNING, 1)
        assert sink.deliver([tick]) == (AppState.RUNNING, 0)  # a restarted cron task: not sent twice
        [row] = tasks(cli_env, "a")
        assert (row["body"], row["status"]) == ("2026-12-01T12:00:00", -1)
        sbx(cli_env, "app", "pause", str(app_id))
        later = Tick(tick.time + timedelta(seconds=1), entry)
        assert sink.deliver([later]) == (AppState.PAUSED, 0)
        sbx(cli_env, "app", "resume", str(app_id))
        # the launcher no longer runs this task (recovered elsewhere, cancelled): an orphan, it stops
        running.clear()
        assert sink.deliver([later]).state is AppState.ENDED
        running.add(cron["id"])
        # an outage of the launcher's connection (its backend terminated): DatabaseError, then a new one
        with psycopg.connect(cli_env["SCALEBOX_DSN"], autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (queue.conn.info.backend_pid,))
        with pytest.raises(DatabaseError):
            sink.deliver([later])
        assert sink.deliver([later]) == (AppState.RUNNING, 1)
        sbx(cli_env, "app", "set-finished", "--app", str(app_id), "done")
        assert sink.deliver([]).state is AppState.ENDED
        assert [t["body"] for t in tasks(cli_env, "a")] == ["2026-12-01T12:00:00", "2026-12-01T12:00:01"]
    finally:
        server.stop()
        queue.close()
        sock_dir.rmdir()
    # the launcher gone: the socket too; the cron process stops instead of waiting for ever
    assert sink.deliver([later]).state is AppState.ENDED
