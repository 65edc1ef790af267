"""Semaphores and variables from run.sh inside Apptainer and Podman containers (busybox images,
no socket client): through the task's request directory, the same answers as a bare run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.launcher.launcher import LauncherConfig
from scalebox_hpc.models import Message, TaskStatus
from scalebox_hpc.node import run_launcher
from scalebox_hpc.pipeline import load_pipeline
from tests.components import apptainer_available, need, podman_available
from tests.helpers import write_app

pytestmark = [pytest.mark.pg]

REPO = Path(__file__).resolve().parents[2]
FAST = "max_idle_polls: 3, sleep_interval_seconds: 0.2, heartbeat_seconds: 1"
PASSWORD = "S3cretPW-for-the-container-grep"

# busybox sh: every call's exit status and stdout, in order (stderr differs for usage errors only)
CALLS = r"""#!/bin/sh
n=0
call() { n=$((n + 1)); scalebox "$@" >"out.$n" 2>"err.$n"; echo "$n rc=$?"; cat "out.$n"; }
esc=$(printf '\033[31m')
meta="q\"uote b\\ack \$(id) \`id\` ; & | * ? [x] {y} 'single' tab	nl
second line $esc red"
big=$(head -c 120000 /dev/zero | tr '\0' 'x')
big="$big\"\\$esc"
call semaphore create s 5
call semaphore decrement s 2
call semaphore increment s
call semaphore increment s -- -4
call semaphore get s
call semaphore get missing
call semaphore create s x
call semaphore create t 2147483648
call semaphore decrement s -- -2147483648
call semaphore create t
call semaphore list
call semaphore list --json
call variable set meta "$meta"
call variable get meta
call variable set empty ""
call variable get empty
call variable list
call variable list --json
call variable set _stage.python /tmp/evil
call variable get nothing-here
call semaphore get s --app "$OTHER_APP"
call semaphore increment s 7 --app "$OTHER_APP"
call variable set meta hijacked --app "$OTHER_APP"
call semaphore get s --app "$APP_ID"
call semaphore get s --app=0
call semaphore get s --app x
call semaphore get s --bogus
call semaphore get
call variable set only-name
call semaphore
call variable set binary "$(printf 'a\377b')"
call variable set "$(printf 'n\376')" x
# a value of 120 kB (one argv element holds 128 kB), last: no listing prints it
call variable set big "$big"
n=$((n + 1)); scalebox variable get big | md5sum; echo "$n big"
"""


def _dsn_with_password(pg_dsn: str) -> str:
    params = conninfo_to_dict(pg_dsn)
    params["password"] = PASSWORD
    return make_conninfo(**params)  # type: ignore[arg-type]


CONTAINERS = [pytest.param("apptainer", marks=pytest.mark.apptainer),
              pytest.param("apptainer-per-task", marks=pytest.mark.apptainer),
              pytest.param("podman", marks=pytest.mark.podman)]


@pytest.fixture(params=["bare", *CONTAINERS])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A bare run, or a container engine (skipped where it is not installed)."""
    return _engine(str(request.param), monkeypatch, tmp_path)


@pytest.fixture(params=CONTAINERS)
def container(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A container engine only."""
    return _engine(str(request.param), monkeypatch, tmp_path)


def _engine(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    if name.startswith("apptainer"):
        reason = apptainer_available()
        if reason:
            need("apptainer", reason)
        monkeypatch.setenv("SCALEBOX_SIF_CACHE", str(tmp_path.parent / "sif-cache-svc"))
    if name == "podman":
        reason = podman_available()
        if reason:
            need("podman", reason)
    monkeypatch.setenv("SCALEBOX_CONTAINERS", str(REPO / "containers"))
    monkeypatch.setenv("SCALEBOX_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.delenv("SCALEBOX_RUNTIME", raising=False)
    return name


def _arguments(mode: str, extra: str = "") -> tuple[str, str]:
    """The module's ``base_image`` line (a comment for a bare run) and its ``arguments``."""
    container = {"bare": "", "apptainer": "runtime: apptainer, ", "podman": "runtime: podman, ",
                 "apptainer-per-task": "runtime: apptainer, slot_options: [container_per_task], "}[mode]
    image = "# bare" if mode == "bare" else "base_image: scalebox-base"
    return image, f"arguments: {{{container}{FAST}{extra}}}"


def _app(pg_dsn: str, root: Path, mode: str, script: str, env: str = "{}", extra: str = "") -> int:
    image, arguments = _arguments(mode, extra)
    spec = load_pipeline(write_app(root, f"""
        name: svc-{mode}
        parameters: {{start_task: go}}
        modules:
          a:
            environments: {env}
            {image}
            {arguments}
    """, {"a/run.sh": ""}))
    (root / "a" / "run.sh").write_text(script)  # busybox sh: no bash in the image (write_app's shebang)
    spec = load_pipeline(root / "app.yaml")
    with connect(pg_dsn) as conn:
        return apps.create_app(conn, spec)


def _execs(pg_dsn: str, app_id: int) -> list[dict[str, Any]]:
    with connect(pg_dsn) as conn:
        return conn.execute(
            "SELECT t.id, t.body, t.status, e.stdout, e.stderr FROM sbx_tasks t "
            "JOIN sbx_task_execs e ON e.task_id = t.id WHERE t.app_id = %s ORDER BY e.id", (app_id,)).fetchall()


def _launch(pg_dsn: str, app_id: int, work: Path) -> None:
    """One launcher of one slot (the stale-request tests need the second task in the first's slot)."""
    run_launcher(_dsn_with_password(pg_dsn), LauncherConfig(app_id=app_id, host="testhost", work_root=work,
                                                             local=True, slots=1))


def _calls(pg_dsn: str, tmp_path: Path, mode: str) -> tuple[str, int, int, Path]:
    with connect(pg_dsn) as conn:
        other = apps.create_app(conn, load_pipeline(write_app(tmp_path / "other", """
            name: other
            modules: {b: {}}
        """, {"b/run.sh": "true\n"})))
        apps.semaphore_create(conn, other, "s", 100)
        apps.variable_set(conn, other, "meta", "theirs")
    app_id = _app(pg_dsn, tmp_path / "app", mode, CALLS + "env > env.txt\n", env=f"{{OTHER_APP: '{other}'}}")
    work = tmp_path / "work"
    _launch(pg_dsn, app_id, work)
    [row] = _execs(pg_dsn, app_id)
    assert row["status"] == 0, row["stderr"]
    return row["stdout"], app_id, other, work


@pytest.fixture
def bare_answers(pg_dsn: str, tmp_path: Path) -> str:
    """What the calls print in a bare run (the Python CLI through the launcher's socket)."""
    return _calls(pg_dsn, tmp_path / "bare", "bare")[0]


def test_calls_inside_a_container_answer_as_a_bare_run(mode: str, bare_answers: str, pg_dsn: str,
                                                      tmp_path: Path) -> None:
    out, app_id, other, work = _calls(pg_dsn, tmp_path, mode)
    assert out == bare_answers
    lines = out.splitlines()
    assert lines[:10] == ["1 rc=0", "5", "2 rc=0", "3", "3 rc=0", "4", "4 rc=0", "0", "5 rc=0", "0"], out
    assert "6 rc=1" in lines and "7 rc=2" in lines and "8 rc=2" in lines, out
    with connect(pg_dsn) as conn:
        # the other app was not touched; this one holds what the calls set, byte for byte
        assert apps.semaphore_get(conn, other, "s") == 100
        assert apps.variable_get(conn, other, "meta") == "theirs"
        assert apps.semaphore_get(conn, app_id, "s") == 0
        meta = apps.variable_get(conn, app_id, "meta")
        assert meta.startswith("q\"uote b\\ack $(id) `id` ; & |") and "\nsecond line \x1b[31m red" in meta
        assert len(apps.variable_get(conn, app_id, "big")) == 120007
        assert "_stage.python" not in apps.variable_list(conn, app_id)
    # no database password anywhere the task could read: its environment, its dirs, its output
    env = next(work.rglob("env.txt")).read_text()
    assert "SCALEBOX_DSN" not in env and "PGPASSWORD" not in env
    assert PASSWORD not in out
    for path in work.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert PASSWORD.encode() not in path.read_bytes(), path
    if mode != "bare":
        assert "SCALEBOX_SERVICES_DIR=/.scalebox/slot/svc-" in env and "SCALEBOX_SERVICES=" not in env
    # every request directory went with its run
    assert not [p for p in work.rglob("svc-*")], list(work.rglob("svc-*"))


STALE = r"""#!/bin/sh
# the first task leaves a request for itself in a directory of its own, and one (a copy of it)
# for whoever runs next in the slot, in the slot's private dir: neither may be answered later
case $1 in
  first)
    scalebox semaphore create s 10
    printf '{"task_id": "%s", "cmd": "semaphore increment", "name": "s", "value": "1000"}\n' "$TASK_ID" \
      >"$SCALEBOX_SERVICES_DIR/1.req.tmp"
    mkdir -p "$SCALEBOX_SERVICES_DIR/../svc-left"
    cp "$SCALEBOX_SERVICES_DIR/1.req.tmp" "$SCALEBOX_SERVICES_DIR/../svc-left/2.req"
    echo "$SCALEBOX_SERVICES_DIR" > "$WORK_DIR/first-dir"
    scalebox task add -m a second ;;
  second)
    # the first task's request, replayed into this task's directory, names the first task
    prev=$(cat "$WORK_DIR/first-dir")
    mv "$prev/1.req.tmp" "$SCALEBOX_SERVICES_DIR/5.req" 2>/dev/null && echo moved
    [ -d "$prev" ] && echo "first dir still there"
    [ -d "$SCALEBOX_SERVICES_DIR/../svc-left" ] && echo "left dir still there"
    i=0; while [ ! -e "$SCALEBOX_SERVICES_DIR/5.rc" ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i + 1)); done
    echo "replayed rc=$(cat "$SCALEBOX_SERVICES_DIR/5.rc" 2>/dev/null)"
    cat "$SCALEBOX_SERVICES_DIR/5.err" 2>/dev/null
    scalebox semaphore get s ;;
esac
"""


def test_a_stale_request_is_not_answered_into_the_next_task(container: str, pg_dsn: str, tmp_path: Path) -> None:
    mode = container
    app_id = _app(pg_dsn, tmp_path / "app", mode, STALE)
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_tasks SET body = 'first' WHERE app_id = %s", (app_id,))
    _launch(pg_dsn, app_id, tmp_path / "work")
    rows = {r["body"]: r for r in _execs(pg_dsn, app_id)}
    assert rows["first"]["status"] == 0 and rows["second"]["status"] == 0, rows
    out = rows["second"]["stdout"]
    # the first task's directory went with its run (nothing left to move); a planted one was swept
    assert "moved" not in out and "still there" not in out, out
    assert out.rstrip().endswith("10"), out
    with connect(pg_dsn) as conn:
        assert apps.semaphore_get(conn, app_id, "s") == 10


def test_a_request_naming_another_task_is_refused(container: str, pg_dsn: str, tmp_path: Path) -> None:
    mode = container
    script = r"""#!/bin/sh
scalebox semaphore create s 1
TASK_ID=999999 scalebox semaphore increment s 50; echo "foreign rc=$?"
scalebox semaphore get s
"""
    app_id = _app(pg_dsn, tmp_path / "app", mode, script)
    _launch(pg_dsn, app_id, tmp_path / "work")
    [row] = _execs(pg_dsn, app_id)
    assert row["stdout"] == "1\nforeign rc=1\n1\n", row
    assert "task 999999 is not running in this launcher" in row["stderr"], row


KILLED = r"""#!/bin/sh
case $1 in
  go)
    scalebox semaphore create s 0
    # concurrent callers (background processes of the task): every call answered, each counted once
    for i in 1 2 3 4; do
      ( j=0; while [ $j -lt 10 ]; do scalebox semaphore increment s >/dev/null || echo failed; j=$((j + 1)); done ) &
    done
    wait
    echo "total=$(scalebox semaphore get s)"
    # then killed (task_max_seconds) while calling
    for i in 1 2 3 4; do
      ( while :; do scalebox semaphore increment s >/dev/null || exit 1; done ) &
    done
    sleep 60 ;;
  *) scalebox semaphore get s ;;
esac
"""


def test_a_task_killed_while_calling_leaves_the_slot_working(container: str, pg_dsn: str, tmp_path: Path) -> None:
    mode = container
    app_id = _app(pg_dsn, tmp_path / "app", mode, KILLED, extra=", task_max_seconds: 8")
    with connect(pg_dsn) as conn:
        apps.add_tasks(conn, app_id, "a", [Message("after")])
    _launch(pg_dsn, app_id, tmp_path / "work")
    rows = {r["body"]: r for r in _execs(pg_dsn, app_id)}
    go, after = rows["go"], rows["after"]
    assert go["status"] == TaskStatus.TIMEOUT, go
    assert "total=40" in go["stdout"] and "failed" not in go["stdout"], go
    with connect(pg_dsn) as conn:
        final = apps.semaphore_get(conn, app_id, "s")
    # the killed task's calls in flight ended with its run: the next task of the slot sees them
    # all (and none comes after); its own call is answered
    assert after["status"] == 0 and int(after["stdout"]) == final, (after, final)
    assert not list((tmp_path / "work").rglob("svc-*"))


def test_a_caller_with_no_answer_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    """The helper's bounded wait (no launcher serves the directory), in busybox sh and dash."""
    helper = REPO / "scalebox_hpc" / "runtime" / "container_bin" / "scalebox"
    for shell in (["busybox", "sh"], ["sh"]):
        env = {"PATH": os.environ["PATH"], "SCALEBOX_SERVICES_DIR": str(tmp_path), "TASK_ID": "3",
               "SCALEBOX_SERVICES_WAIT": "1"}
        proc = subprocess.run([*shell, str(helper), "semaphore", "get", "s"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 1 and proc.stdout == "", proc
        assert "the launcher did not answer within 1s" in proc.stderr, proc.stderr
        assert not list(tmp_path.glob("*.req")), list(tmp_path.iterdir())
