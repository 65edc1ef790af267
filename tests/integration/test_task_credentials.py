"""A task's scripts get no database credentials and no launcher environment (audit F5, F6), and
reach semaphores and variables of their own app only, through the launcher's task services."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from scalebox_hpc.db import apps
from scalebox_hpc.db.connection import connect
from scalebox_hpc.pipeline import load_pipeline
from tests.helpers import write_app

pytestmark = pytest.mark.pg

FAST = "arguments: {max_idle_polls: 3, sleep_interval_seconds: 0.2}"
PASSWORD = "S3cretPW-for-the-grep"
SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-xyz-secret", "PGPASSWORD": PASSWORD, "MY_API_TOKEN": "tok-123",
           "SOME_LAUNCHER_SETTING": "launcher-only-value"}


def _dsn_with_password(pg_dsn: str) -> str:
    """The test DSN with a password in it (the test server trusts: libpq sends none unless asked)."""
    params = conninfo_to_dict(pg_dsn)
    params["password"] = PASSWORD
    return make_conninfo(**params)  # type: ignore[arg-type]


def _create(pg_dsn: str, root: Path, yaml_text: str, scripts: dict[str, str]) -> int:
    spec = load_pipeline(write_app(root, yaml_text, scripts))
    with connect(pg_dsn) as conn:
        return apps.create_app(conn, spec)


def _launch(pg_dsn: str, app_id: int, work: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **SECRETS, "SCALEBOX_DSN": _dsn_with_password(pg_dsn), "SCALEBOX_WORK_ROOT": str(work),
           "SCALEBOX_DSN_PASSWORD_OK": "1", **extra}
    return subprocess.run([sys.executable, "-m", "scalebox_hpc", "launcher", "--app", str(app_id)],
                          env=env, capture_output=True, text=True, timeout=120)


def _execs(pg_dsn: str, app_id: int) -> list[dict[str, Any]]:
    with connect(pg_dsn) as conn:
        return conn.execute(
            "SELECT t.body, t.status, e.stdout, e.stderr FROM sbx_tasks t JOIN sbx_task_execs e ON e.task_id = t.id"
            " WHERE t.app_id = %s ORDER BY t.id", (app_id,)).fetchall()


def test_run_sh_sees_no_credentials_and_no_launcher_environment(pg_dsn: str, tmp_path: Path) -> None:
    app_id = _create(pg_dsn, tmp_path / "app", f"""
        name: creds
        parameters: {{start_task: go}}
        modules:
          a:
            environments: {{GIVEN_ON_PURPOSE: pipeline-value}}
            {FAST}
    """, {"a/run.sh": "env\n"})
    work = tmp_path / "work"
    proc = _launch(pg_dsn, app_id, work)
    assert proc.returncode == 0, proc.stderr
    [row] = _execs(pg_dsn, app_id)
    assert row["status"] == 0, row
    env = dict(line.split("=", 1) for line in row["stdout"].splitlines() if "=" in line)
    assert "SCALEBOX_DSN" not in env and "PGPASSWORD" not in env
    assert not set(SECRETS) & set(env), sorted(set(SECRETS) & set(env))
    assert env["GIVEN_ON_PURPOSE"] == "pipeline-value"  # what the pipeline passes on purpose still goes
    assert env["PATH"] and env["TASK_ID"] and env["SCALEBOX_SERVICES"]
    # nothing the task could read holds the password: its output, its work and private dirs, the logs
    assert PASSWORD not in row["stdout"] + row["stderr"] + proc.stdout + proc.stderr
    for path in work.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_semaphores_and_variables_go_through_the_launcher(pg_dsn: str, tmp_path: Path) -> None:
    script = """
        scalebox semaphore create made 5
        scalebox semaphore decrement made 2
        scalebox variable set seen "$1"
        echo "value=$(scalebox variable get seen)"
        scalebox variable set _stage.python /tmp/evil-python && echo reserved-accepted
        scalebox semaphore get made --app 999999 && echo other-app-accepted
        scalebox app list && echo database-reached
        exit 0
    """
    app_id = _create(pg_dsn, tmp_path / "app", f"""
        name: svc
        parameters: {{start_task: go}}
        modules:
          a:
            {FAST}
    """, {"a/run.sh": "\n".join(line.strip() for line in script.strip().splitlines()) + "\n"})
    proc = _launch(pg_dsn, app_id, tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    [row] = _execs(pg_dsn, app_id)
    out, err = row["stdout"], row["stderr"]
    assert "value=go" in out, (out, err)
    assert "accepted" not in out and "database-reached" not in out, (out, err)
    assert "reserved" in err and "own app" in err and "no access" in err, err
    with connect(pg_dsn) as conn:
        assert apps.semaphore_get(conn, app_id, "made") == 3
        assert apps.variable_get(conn, app_id, "seen") == "go"
        assert "_stage.python" not in apps.variable_list(conn, app_id)


def test_a_call_for_a_task_that_does_not_run_here_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    """A process left behind by an ended task is killed by the run's fence; one that says it is
    another task (or an ended one) is refused by the launcher."""
    script = """
        TASK_ID=999999 scalebox semaphore increment n && echo foreign-accepted
        scalebox semaphore increment n
    """
    app_id = _create(pg_dsn, tmp_path / "app", f"""
        name: late
        parameters: {{start_task: go}}
        modules:
          a:
            {FAST}
    """, {"a/run.sh": "\n".join(line.strip() for line in script.strip().splitlines()) + "\n"})
    with connect(pg_dsn) as conn:
        apps.semaphore_create(conn, app_id, "n", 0)
    proc = _launch(pg_dsn, app_id, tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    [row] = _execs(pg_dsn, app_id)
    assert "foreign-accepted" not in row["stdout"] and "task 999999 is not running" in row["stderr"], row
    assert row["stdout"].strip() == "1"
    with connect(pg_dsn) as conn:
        assert apps.semaphore_get(conn, app_id, "n") == 1


def test_variable_set_refuses_reserved_names_from_the_cli(pg_dsn: str, tmp_path: Path) -> None:
    app_id = _create(pg_dsn, tmp_path / "app", "name: r\nmodules: {a: {}}\n", {"a/run.sh": "true\n"})
    env = {**os.environ, "SCALEBOX_DSN": pg_dsn}
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "variable", "set", "--app", str(app_id),
                           "_stage.python", "/tmp/evil"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "reserved" in proc.stderr, proc.stderr
    with connect(pg_dsn) as conn:
        assert apps.variable_list(conn, app_id) == {}


def test_the_default_app_is_the_callers_newest_never_someone_elses(pg_dsn: str, tmp_path: Path) -> None:
    mine = _create(pg_dsn, tmp_path / "mine", "name: mine\nmodules: {a: {}}\n", {"a/run.sh": "true\n"})
    theirs = _create(pg_dsn, tmp_path / "theirs", "name: theirs\nmodules: {a: {}}\n", {"a/run.sh": "true\n"})
    with connect(pg_dsn) as conn:
        conn.execute("UPDATE sbx_apps SET owner = 'someone_else' WHERE id = %s", (theirs,))
        conn.commit()
    env = {**os.environ, "SCALEBOX_DSN": pg_dsn}

    def sbx(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scalebox_hpc", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    shown = sbx("app", "cancel")  # the newest app is theirs; the default must be mine
    assert shown.returncode == 0, shown.stderr
    with connect(pg_dsn) as conn:
        assert apps.get_app(conn, mine)["cancelled"] and not apps.get_app(conn, theirs)["cancelled"]
