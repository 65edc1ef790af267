"""`scalebox` administration commands run as a subprocess, like a user would: the embedded
default database, `db` on a configured server, app steering (pause / resume / cancel /
set-finished), task add / list / show / retry, status counts, and click's help and usage errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from tests.helpers import wait_until, write_app

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parents[2]
SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]
FAST = "{max_idle_polls: 2, sleep_interval_seconds: 0.1}"  # module arguments: idle out quickly
PASSWORD_IN_URI = re.compile(r"//[^/@]*:[^/@]*@")  # user:secret@ in a postgresql:// URI


def sbx(env: dict[str, str], *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"scalebox {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def sbx_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(sbx(env, *args, "--json").stdout)


def sbx_all(
    env: dict[str, str], *calls: tuple[Any, ...], timeout: float = 60
) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands at once (each start-up costs ~0.5 s of CPU); a call may begin with
    a dict of environment changes (None removes a variable). Results in call order; not checked."""
    started = []
    for call in calls:
        extra, args = (call[0], call[1:]) if call and isinstance(call[0], dict) else ({}, call)
        call_env = {k: v for k, v in {**env, **extra}.items() if v is not None}
        proc = subprocess.Popen([*SCALEBOX, *args], env=call_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        started.append((args, proc))
    done = []
    for args, proc in started:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done.append(subprocess.CompletedProcess([*SCALEBOX, *args], proc.returncode, out, err))
    return done


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (proc.args[3:], proc.returncode, proc.stdout, proc.stderr)
    return proc


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(proc).stdout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 1, exactly one line on stderr containing every expected fragment, no traceback."""
    assert proc.returncode == 1, (proc.args[3:], proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def bare_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any database configuration (no SCALEBOX_*, no PG*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_"))}
    env.update(extra)
    return env


def tasks_of(env: dict[str, str], app_id: str, *extra: str) -> list[dict[str, Any]]:
    return list(sbx_json(env, "task", "list", "--app", app_id, *extra))


def by_body(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["body"]: r for r in rows}


def make_app(root: Path, name: str, modules: dict[str, str], *, tasks: tuple[str, ...] = (),
             arguments: str = FAST, parameters: str = "", starts: dict[str, str] | None = None) -> Path:
    """An app whose modules (name -> run.sh) all have ``arguments``; ``tasks`` become start tasks
    of the first module (one per line of a FILE: start_task), ``starts`` one per named module."""
    start = "start_task: 'FILE:tasks.txt'" if tasks else ""
    params = ", ".join(p for p in (parameters, start) if p)
    lines = [f"name: {name}", f"parameters: {{{params}}}", "modules:"]
    scripts = {}
    for i, (module, run_sh) in enumerate(modules.items()):
        lines += [f"  {module}:", f"    arguments: {arguments}"]
        if module in (starts or {}):
            lines.append(f"    parameters: {{start_task: {(starts or {})[module]}}}")
        if i == 0 and len(modules) > 1 and "send-message" in run_sh:
            lines.append(f"    sink_modules: [{list(modules)[1]}]")
        scripts[f"{module}/run.sh"] = run_sh
    app = write_app(root / name, "\n".join(lines) + "\n", scripts)
    (app.parent / "tasks.txt").write_text("".join(t + "\n" for t in tasks))
    return app


def create(env: dict[str, str], app_yaml: Path) -> str:
    return sbx(env, "app", "create", str(app_yaml)).stdout.strip()


def launcher(env: dict[str, str], app_id: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return sbx(env, "launcher", "--app", app_id, "--slots", "1", timeout=timeout)


@contextlib.contextmanager
def background(env: dict[str, str], *args: str) -> Iterator[subprocess.Popen[str]]:
    """`scalebox ARGS` in the background; drained with SIGTERM (then killed) if still running."""
    proc = subprocess.Popen([*SCALEBOX, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


# -- 1. the embedded default database ----------------------------------------------------------
def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if psutil.pid_exists(pid) else None


def _processes_using(path: Path) -> list[psutil.Process]:
    """Live processes whose command line mentions ``path`` (the postmaster runs `postgres -D path`)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(path) in arg for arg in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def embedded_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """No SCALEBOX_DSN, no PG*: the embedded server in a short private SCALEBOX_HOME (the unix
    socket path must stay under ~107 bytes). The server is always stopped afterwards."""
    home = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))
    env = bare_env(SCALEBOX_HOME=str(home), SCALEBOX_WORK_ROOT=str(tmp_path / "work"))
    try:
        yield env
    finally:
        subprocess.run([*SCALEBOX, "db", "stop"], env=env, capture_output=True, timeout=60, check=False)
        pid = _postmaster_pid(home / "pg")
        if pid is not None:  # `db stop` failed: do not leave a server behind
            proc = psutil.Process(pid)
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
        shutil.rmtree(home, ignore_errors=True)


def test_embedded_database_lifecycle(embedded_env: dict[str, str]) -> None:
    env = embedded_env
    home = Path(env["SCALEBOX_HOME"])
    pgdata = home / "pg"

    status = sbx_json(env, "db", "status")
    assert status["kind"] == "embedded" and status["running"] is False
    assert "dsn" not in status and "version" not in status

    proc = sbx(env, "db", "init", timeout=180)
    assert proc.stdout.startswith("created: "), proc.stdout
    assert str(pgdata) in proc.stdout and not PASSWORD_IN_URI.search(proc.stdout)

    status_proc, again_proc = sbx_all(env, ("db", "status", "--json"), ("db", "init"))
    status = as_json(status_proc)
    assert status["kind"] == "embedded" and status["running"] is True
    assert status["version"] == status["expected_version"]
    assert str(pgdata) in status["dsn"] and status["dsn"].endswith("/scalebox")
    assert not PASSWORD_IN_URI.search(status["dsn"]) and "password" not in status["dsn"]
    assert "password" not in (home / "embedded-db.json").read_text()
    assert ok(again_proc).stdout.startswith("already initialised: ")

    proc = sbx(env, "run", str(REPO / "examples/hello-scalebox/app.yaml"))
    assert "Hello scalebox, it is OK!" in proc.stdout

    postmaster = psutil.Process(_postmaster_pid(pgdata) or -1)
    server = [postmaster, *postmaster.children(recursive=True)]
    assert sbx(env, "db", "stop").stdout.strip() == "stopped"
    assert sbx_json(env, "db", "status")["running"] is False
    wait_until(lambda: not any(p.is_running() for p in server), 10, "the embedded server's processes to exit")
    assert _processes_using(pgdata) == []

    # the next command starts the server again on the same data: the app is still there
    [app] = sbx_json(env, "app", "list")
    assert (app["name"], app["status"], app["tasks"], app["result"]) == (
        "hello-scalebox", "FINISHED", 1, "Hello scalebox, it is OK!")
    assert sbx(env, "db", "stop").stdout.strip() == "stopped"

    proc = sbx(env, "db", "stop")
    assert proc.returncode == 0 and "not running" in proc.stdout
    assert _processes_using(pgdata) == []


# -- 2. db commands on a configured server -------------------------------------------------------
def test_db_commands_on_an_initialised_database(cli_env: dict[str, str], pg_dsn: str) -> None:
    # a password in SCALEBOX_DSN is never printed (the test server trusts local connections)
    secret = {"SCALEBOX_DSN": psycopg.conninfo.make_conninfo(pg_dsn, password="s3cr3tpw")}
    # without SCALEBOX_DSN, libpq's PG* variables name the server
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    pg_vars = {"SCALEBOX_DSN": None, "PGHOST": str(params["host"]), "PGPORT": str(params["port"]),
               "PGUSER": str(params["user"]), "PGDATABASE": str(params["dbname"])}
    init, upgrade, status_proc, stop, from_pg_vars, *with_password = sbx_all(
        cli_env, ("db", "init"), ("db", "upgrade"), ("db", "status", "--json"), ("db", "stop"),
        (pg_vars, "db", "status", "--json"),
        (secret, "db", "status", "--json"), (secret, "db", "init"), (secret, "app", "list"))
    assert ok(init).stdout.startswith("already initialised: postgresql://"), init.stdout
    assert ok(upgrade).stdout.strip() == "up to date"
    status = as_json(status_proc)
    assert status["kind"] == "configured" and status["running"] is True
    assert status["version"] == status["expected_version"]
    assert status["dsn"].endswith("/" + psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"])
    # `db stop` leaves a configured server alone
    assert "not running" in ok(stop).stdout
    for proc in with_password:
        assert "s3cr3tpw" not in ok(proc).stdout + proc.stderr, proc
    assert as_json(with_password[0])["dsn"] == status["dsn"]
    pg_status = as_json(from_pg_vars)
    assert (pg_status["kind"], pg_status["running"], pg_status["dsn"]) == ("configured", True, "from PG* variables")
    assert pg_status["version"] == pg_status["expected_version"]


def test_database_without_schema(empty_db: str, tmp_path: Path) -> None:
    env = bare_env(SCALEBOX_DSN=empty_db, SCALEBOX_HOME=str(tmp_path / "home"),
                   SCALEBOX_WORK_ROOT=str(tmp_path / "work"))
    status, *plain, with_flag, with_env = sbx_all(
        env, ("db", "status", "--json"),
        ("app", "list"), ("task", "add", "x"), ("status",), ("launcher", "--app", "1"),
        ("--traceback", "app", "list"), ({"SCALEBOX_TRACEBACK": "1"}, "task", "list"))
    info = as_json(status)
    assert (info["kind"], info["running"], info["version"]) == ("configured", True, None)
    for proc in plain:
        assert_one_line_error(proc, "scalebox db init", "hint:")
    for proc in (with_flag, with_env):
        assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr, proc.stderr
        assert "scalebox db init" in proc.stderr.strip().splitlines()[-1]

    proc = sbx(env, "db", "init")
    assert proc.stdout.startswith("created: postgresql://"), proc.stdout
    status, upgrade, apps = sbx_all(env, ("db", "status", "--json"), ("db", "upgrade"), ("app", "list", "--json"))
    assert as_json(status)["version"] == as_json(status)["expected_version"]
    assert ok(upgrade).stdout.strip() == "up to date"
    assert as_json(apps) == []


# -- 3. pause / resume / cancel --------------------------------------------------------------------
def test_pause_then_resume_while_a_launcher_waits(cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = create(cli_env, make_app(tmp_path, "pr", {"work": 'echo "did $1"\n'}, tasks=("t1", "t2", "t3")))
    sbx(cli_env, "app", "pause", app_id)
    with background(cli_env, "launcher", "--app", app_id, "--slots", "1") as proc:
        time.sleep(1.2)  # start-up plus four polls: a RUNNING app would have been drained by now
        shown, listed = sbx_all(cli_env, ("app", "show", app_id, "--json"), ("task", "list", "--app", app_id, "--json"))
        assert as_json(shown)["status"] == "PAUSED"
        assert {r["status"] for r in as_json(listed)} == {-1}, "a PAUSED app's tasks were claimed"
        assert proc.poll() is None, "a launcher on a PAUSED app should wait, not exit"

        sbx(cli_env, "app", "resume", app_id)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, err)
    shown, listed = sbx_all(cli_env, ("app", "show", app_id, "--json"), ("task", "list", "--app", app_id, "--json"))
    assert as_json(shown)["status"] == "RUNNING"
    assert [(r["status"], r["attempts"]) for r in as_json(listed)] == [(0, 1)] * 3


def test_cancel_finishes_the_app_and_launchers_run_nothing(cli_env: dict[str, str], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    app_id = create(cli_env, make_app(tmp_path, "cx", {"work": f'touch "{marker}"\n'}, tasks=("a", "b")))
    sbx(cli_env, "app", "cancel", app_id)
    start = time.monotonic()
    launcher(cli_env, app_id, timeout=30)
    assert time.monotonic() - start < 10
    assert not marker.exists()
    shown, listed = sbx_all(cli_env, ("app", "show", app_id, "--json"), ("task", "list", "--app", app_id, "--json"))
    shown_row = as_json(shown)
    assert shown_row["status"] == "FINISHED" and shown_row["result"] == "cancelled" and shown_row["finished_at"]
    rows = as_json(listed)
    assert [(r["status"], r["attempts"]) for r in rows] == [(-1, 0), (-1, 0)]

    # a cancelled app stays finished: resume / pause / set-finished neither revive it nor change its result
    for proc in sbx_all(cli_env, ("app", "resume", app_id), ("app", "pause", app_id),
                        ("app", "set-finished", "--app", app_id, "other text")):
        ok(proc)
    shown_row = sbx_json(cli_env, "app", "show", app_id)
    assert (shown_row["status"], shown_row["result"]) == ("FINISHED", "cancelled")


def test_cancel_kills_and_releases_a_running_task(cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = create(cli_env, make_app(
        tmp_path, "ck", {"work": 'echo $$ > "$WORK_DIR/started.tmp"\nmv "$WORK_DIR/started.tmp" "$WORK_DIR/started"\n'
                                  'exec sleep 60\n'}, tasks=("long",),
        arguments="{max_idle_polls: 2, sleep_interval_seconds: 0.2, heartbeat_seconds: 1}"))
    work = Path(cli_env["SCALEBOX_WORK_ROOT"])
    with background(cli_env, "launcher", "--app", app_id, "--slots", "1") as proc:
        wait_until(lambda: any(work.rglob("started")), 20, "the task to start")
        run = psutil.Process(int(next(work.rglob("started")).read_text()))  # run.sh, now `sleep 60`
        sbx(cli_env, "app", "cancel", app_id)
        start = time.monotonic()
        out, err = proc.communicate(timeout=20)
        assert time.monotonic() - start < 10, "the launcher did not end promptly after cancel"
        assert proc.returncode == 0, (out, err)
    assert not run.is_running() or run.status() == psutil.STATUS_ZOMBIE, "the cancelled run was not killed"
    shown, listed = sbx_all(cli_env, ("app", "show", app_id, "--json"), ("task", "list", "--app", app_id, "--json"))
    assert (as_json(shown)["status"], as_json(shown)["result"]) == ("FINISHED", "cancelled")
    [row] = as_json(listed)
    assert (row["status"], row["attempts"]) == (-1, 0), row  # released: READY, the attempt not counted


# -- 4. set-finished, app list / show ---------------------------------------------------------------
def test_set_finished_and_app_list_show(cli_env: dict[str, str], tmp_path: Path) -> None:
    first = create(cli_env, make_app(tmp_path, "one", {"work": "true\n"}, parameters="initial_status: INITIAL"))
    second = create(cli_env, make_app(tmp_path, "two", {"work": "true\n"}, tasks=("x", "y")))
    listed, default, chosen, *missing = sbx_all(
        cli_env, ("app", "list", "--json"), ("app", "show", "--json"),
        ({"SCALEBOX_APP_ID": first}, "app", "show", "--json"),
        ("app", "show", "999999"), ("app", "set-finished", "--app", "999999", "x"), ("app", "pause", "999999"),
        ("app", "cancel", "999999"))
    assert [(a["id"], a["name"], a["status"], a["tasks"], a["result"]) for a in as_json(listed)] == [
        (int(first), "one", "INITIAL", 0, None), (int(second), "two", "RUNNING", 2, None)]
    assert as_json(default)["id"] == int(second)  # default: the newest app ...
    assert as_json(chosen)["id"] == int(first)  # ... or SCALEBOX_APP_ID
    for proc in missing:
        assert_one_line_error(proc, "app 999999 not found")

    # the INITIAL app "one" is finished by id, "two" as the newest (default)
    for proc in sbx_all(cli_env, ("app", "set-finished", "--app", first, "all done: 42"),
                        ("app", "set-finished", "bye")):
        ok(proc)
    sbx(cli_env, "app", "set-finished", "--app", first, "later text")  # the first finisher's text wins
    shown_json, shown_text, list_json = sbx_all(
        cli_env, ("app", "show", first, "--json"), ("app", "show", first), ("app", "list", "--json"))
    shown = as_json(shown_json)
    assert (shown["id"], shown["name"], shown["status"], shown["result"]) == (int(first), "one", "FINISHED",
                                                                             "all done: 42")
    assert shown["finished_at"] is not None and shown["created_at"] is not None
    assert [(a["name"], a["status"], a["result"]) for a in as_json(list_json)] == [
        ("one", "FINISHED", "all done: 42"), ("two", "FINISHED", "bye")]
    text = ok(shown_text).stdout
    assert f"id: {first}\n" in text and "name: one\n" in text and "status: FINISHED\n" in text
    assert "result: all done: 42\n" in text


# -- 5. task add / list / show / retry ---------------------------------------------------------------
def test_task_add_variants(cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = create(cli_env, make_app(tmp_path, "ta", {"first": "true\n", "second": "true\n"}))
    lines = tmp_path / "bodies.txt"
    lines.write_text("from file 1\n\nfrom file 2\n   \nfrom file 3\n")
    add = ("task", "add", "--app", app_id)
    several, from_file, with_headers, held, s1, other_module = sbx_all(
        cli_env, (*add, "a", "b", "c"), (*add, "--file", str(lines)),
        (*add, "-H", "k=v", "-H", "eq=a=b", "--headers-json", '{"n": [1, 2], "o": {"p": true}}', "with-headers"),
        (*add, "-m", "second", "--initial", "held"), (*add, "-m", "second", "s1"),
        (*add, "-m", "second", "a"))  # the same body in another module is fine
    assert ok(several).stdout.strip() == "added 3 task(s)"
    assert ok(from_file).stdout.strip() == "added 3 task(s)"
    for proc in (with_headers, held, s1, other_module):
        assert ok(proc).stdout.strip() == "added 1 task(s)"

    listed, dup, dup_initial, dup_in_batch, no_value, not_object, not_json, no_body = sbx_all(
        cli_env, ("task", "list", "--app", app_id, "--json"),
        (*add, "new-one", "a"), (*add, "-m", "second", "--initial", "held"), (*add, "twice", "twice"),
        (*add, "-H", "novalue", "h1"), (*add, "--headers-json", "[1]", "h2"), (*add, "--headers-json", "{nope", "h3"),
        add)
    rows = {(r["module"], r["body"]): r for r in as_json(listed)}
    assert set(rows) == {("first", b) for b in ("a", "b", "c", "from file 1", "from file 2", "from file 3",
                                                 "with-headers")} | {("second", b) for b in ("held", "s1", "a")}
    assert rows["first", "with-headers"]["headers"] == {"k": "v", "eq": "a=b", "n": [1, 2], "o": {"p": True}}
    assert rows["first", "a"]["headers"] == {}
    assert {key: r["status"] for key, r in rows.items() if r["status"] != -1} == {("second", "held"): -9}
    # duplicate body (default CONFLICT_ACTION=FAIL): one line, exit 1, nothing of the batch written
    assert_one_line_error(dup, "CONFLICT_ACTION")
    assert_one_line_error(dup_initial, "CONFLICT_ACTION")
    assert_one_line_error(dup_in_batch, "CONFLICT_ACTION")
    # malformed headers: one line, exit 1
    assert_one_line_error(no_value, "k=v")
    assert_one_line_error(not_object, "JSON object")
    assert_one_line_error(not_json, "not JSON")
    assert no_body.returncode == 2 and "at least one BODY" in no_body.stderr

    # a launcher runs the READY tasks and leaves the INITIAL one alone
    launcher(cli_env, app_id)
    listed, second = sbx_all(cli_env, ("task", "list", "--app", app_id, "--json"),
                             ("task", "list", "--app", app_id, "-m", "second", "--json"))
    rows = as_json(listed)
    assert len(rows) == 10 and not {"new-one", "twice", "h1", "h2", "h3"} & {r["body"] for r in rows}
    assert [(r["status"], r["attempts"]) for r in rows if r["body"] == "held"] == [(-9, 0)]
    assert {r["status"] for r in rows if r["body"] != "held"} == {0}
    assert sorted(r["body"] for r in as_json(second)) == ["a", "held", "s1"]  # "a" is in both modules


def test_task_list_filters(cli_env: dict[str, str], tmp_path: Path) -> None:
    # an app created INITIAL runs once resumed
    app_id = create(cli_env, make_app(tmp_path, "tl", {"first": 'case "$1" in bad*) exit 7;; esac\n',
                                                       "second": "true\n"}, tasks=("ok1", "bad1", "ok2"),
                                      starts={"second": "s1"}, parameters="initial_status: INITIAL"))
    for proc in sbx_all(cli_env, ("task", "add", "--app", app_id, "--initial", "later"), ("app", "resume", app_id)):
        ok(proc)
    launcher(cli_env, app_id)

    queries: list[tuple[str, ...]] = [(), ("-s", "0"), ("--status", "7"), ("--status", "-9"), ("--status=-9",),
                                      ("-m", "second"), ("--module", "first", "-s", "0"), ("-n", "2")]
    *found, text_proc, shown = sbx_all(cli_env, *[("task", "list", "--app", app_id, "--json", *q) for q in queries],
                                       ("task", "list", "--app", app_id), ("app", "show", app_id, "--json"))
    assert as_json(shown)["status"] == "RUNNING"
    bodies = {q: [r["body"] for r in as_json(p)] for q, p in zip(queries, found, strict=True)}
    assert bodies == {
        (): ["ok1", "bad1", "ok2", "s1", "later"],  # oldest first
        ("-s", "0"): ["ok1", "ok2", "s1"],
        ("--status", "7"): ["bad1"],
        ("--status", "-9"): ["later"],
        ("--status=-9",): ["later"],
        ("-m", "second"): ["s1"],
        ("--module", "first", "-s", "0"): ["ok1", "ok2"],
        ("-n", "2"): ["ok1", "bad1"],
    }
    # an unknown module is an error naming the app's modules, not an empty list
    assert_one_line_error(sbx(cli_env, "task", "list", "--app", app_id, "-m", "nope", check=False),
                          "module 'nope' not found", "first, second")
    header, *text = ok(text_proc).stdout.splitlines()
    assert header.split() == ["id", "module", "status", "tries", "body"] and len(text) == 5
    assert re.search(r"\bfirst\s+OK\s+1\s+ok1$", text[0]) and re.search(r"\bfirst\s+EXIT_7\s+1\s+bad1$", text[1])
    assert re.search(r"\bsecond\s+OK\s+1\s+s1$", text[3]) and re.search(r"\bfirst\s+INITIAL\s+0\s+later$", text[4])


def test_task_show_and_retry(cli_env: dict[str, str], tmp_path: Path) -> None:
    # fails the first time a body is seen in the slot's (persistent) work dir, succeeds afterwards
    run_sh = ('if [ ! -f "seen-$1" ]; then touch "seen-$1"; echo "first try $1" >&2; exit 3; fi\n'
              'echo "ran $1 with $2"\n')
    app_id = create(cli_env, make_app(tmp_path, "rt", {"work": run_sh}))
    sbx(cli_env, "task", "add", "--app", app_id, "-H", "k=v", "x", "y")
    launcher(cli_env, app_id)
    rows = by_body(tasks_of(cli_env, app_id))
    assert rows["x"]["status"] == 3 and rows["y"]["status"] == 3
    x_id, y_id = str(rows["x"]["id"]), str(rows["y"]["id"])

    text = sbx(cli_env, "task", "show", x_id).stdout
    assert text.startswith(f"task {x_id} (work): EXIT_3, 1 attempt(s)\nbody: x\nheaders: "), text
    assert '"k": "v"' in text and "  stderr: first try x" in text
    assert re.search(r"^- attempt 1 on \S+: status 3, \d+\.\d{3}s$", text, re.M), text
    assert sbx(cli_env, "task", "retry", "--app", app_id, x_id).stdout.strip() == "requeued 1 task(s)"

    # --failed takes what failed (y), not x, which is READY again; retrying a READY task does nothing
    failed, again = sbx_all(cli_env, ("task", "retry", "--app", app_id, "--failed"),
                            ("task", "retry", "--app", app_id, x_id))
    assert ok(failed).stdout.strip() == "requeued 1 task(s)"
    assert ok(again).stdout.strip() == "requeued 0 task(s)"

    launcher(cli_env, app_id)
    x_json, x_text, y_json, usage, missing = sbx_all(
        cli_env, ("task", "show", x_id, "--json"), ("task", "show", x_id), ("task", "show", y_id, "--json"),
        ("task", "retry", "--app", app_id), ("task", "show", "999999"))
    shown = as_json(x_json)
    assert (shown["id"], shown["status"], shown["attempts"], shown["body"], shown["module"]) == (
        int(x_id), 0, 2, "x", "work")
    assert shown["headers"] == {"k": "v"}
    assert [(e["attempt"], e["status"]) for e in shown["execs"]] == [(1, 3), (2, 0)]
    assert shown["execs"][0]["stderr"] == "first try x\n"
    assert shown["execs"][1]["stdout"] == 'ran x with {"k": "v"}\n'
    text = ok(x_text).stdout
    assert text.startswith(f"task {x_id} (work): OK, 2 attempt(s)\n"), text
    assert re.search(r"^- attempt 2 on \S+: status 0, ", text, re.M) and '  stdout: ran x with {"k": "v"}' in text
    assert (as_json(y_json)["status"], as_json(y_json)["attempts"]) == (0, 2)
    assert usage.returncode == 2 and "--failed" in usage.stderr
    assert_one_line_error(missing, "task 999999 not found")

    # --status CODE requeues every task with that status, finished OK ones included
    assert sbx(cli_env, "task", "retry", "--app", app_id, "--status", "0").stdout.strip() == "requeued 2 task(s)"


# -- 6. status counts ---------------------------------------------------------------------------------
def _counts_from_tasks(rows: list[dict[str, Any]], module: str) -> dict[str, int]:
    statuses = [r["status"] for r in rows if r["module"] == module]
    return {
        "total": len(statuses), "ready": statuses.count(-1), "running": statuses.count(-3),
        "initial": statuses.count(-9), "ok": statuses.count(0),
        "failed": sum(1 for s in statuses if s > 0 or s < -100),
    }


def test_status_counts_match_task_list(cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = create(cli_env, make_app(tmp_path, "st", {
        "first": 'case "$1" in bad*) exit 5;; esac\nsend-message "$1-out"\n',
        "second": 'case "$1" in ok1-out) exit 9;; esac\n',
        "third": "true\n",
    }, tasks=("ok1", "ok2", "ok3", "bad1", "bad2"), starts={"second": "direct"}))
    sbx(cli_env, "task", "add", "--app", app_id, "--initial", "held")

    def check(*extra: tuple[str, ...]) -> tuple[dict[str, dict[str, Any]], list[subprocess.CompletedProcess[str]]]:
        status_proc, list_proc, *rest = sbx_all(cli_env, ("status", app_id, "--json"),
                                                ("task", "list", "--app", app_id, "-n", "1000", "--json"), *extra)
        status, rows = as_json(status_proc), as_json(list_proc)
        assert status["app"]["id"] == int(app_id) and status["app"]["name"] == "st"
        mods = {m["module"]: m for m in status["modules"]}
        assert list(mods) == ["first", "second", "third"]
        for name, m in mods.items():
            assert {k: m[k] for k in ("total", "ready", "running", "initial", "ok", "failed")} == \
                _counts_from_tasks(rows, name), name
            assert sum(m["by_status"].values()) == m["total"]
        return mods, rest

    before, _ = check()
    assert (before["first"]["ready"], before["first"]["initial"], before["second"]["ready"]) == (5, 1, 1)
    assert before["third"]["total"] == 0
    launcher(cli_env, app_id)
    after, [text] = check(("status", app_id))
    assert (after["first"]["ok"], after["first"]["failed"], after["first"]["initial"]) == (3, 2, 1)
    assert (after["second"]["total"], after["second"]["ok"], after["second"]["failed"]) == (4, 3, 1)
    assert after["first"]["by_status"] == {"-9": 1, "0": 3, "5": 2}
    assert after["second"]["by_status"] == {"0": 3, "9": 1}
    assert after["first"]["per_minute"] == 5 and after["second"]["per_minute"] == 4
    assert all(name in ok(text).stdout for name in ("first", "second", "third"))


# -- 7. help and usage errors ---------------------------------------------------------------------------
USAGE_ERRORS: dict[tuple[str, ...], str] = {
    ("frobnicate",): "No such command 'frobnicate'",
    ("app", "frobnicate"): "No such command 'frobnicate'",
    ("--bogus", "app", "list"): "No such option",
    ("task", "add", "--bogus", "x"): "No such option",
    ("task", "list", "--status", "many"): "Invalid value for '-s' / '--status'",
    ("task", "show"): "Missing argument 'TASK_ID'",
}


def test_help_and_usage_errors(cli_env: dict[str, str]) -> None:
    main_help, short_help, add_help, db_help, version, *errors = sbx_all(
        cli_env, ("--help",), ("-h",), ("task", "add", "--help"), ("db", "--help"), ("--version",), *USAGE_ERRORS)
    assert ok(main_help).stdout.startswith("Usage: scalebox ")
    for command in ("db", "app", "task", "launcher", "run", "status", "semaphore", "variable"):
        assert re.search(rf"^\s+{command}\s", main_help.stdout, re.M), command
    assert ok(short_help).stdout == main_help.stdout
    assert ok(add_help).stdout.startswith("Usage: scalebox task add ")
    for option in ("--app", "--module", "--header", "--headers-json", "--file", "--initial"):
        assert option in add_help.stdout
    assert ok(db_help).stdout.startswith("Usage: scalebox db ")
    assert re.search(r"\d+\.\d+", ok(version).stdout)

    for (args, message), proc in zip(USAGE_ERRORS.items(), errors, strict=True):
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert proc.stdout == "", args
        assert "Usage: scalebox" in proc.stderr and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


# -- bugs: unexpected input must still give an error line, not a Python traceback -------------------
@pytest.fixture(scope="module")
def shared_env(pg_server: str, pg_template: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One database with one app for the cheap error-message checks below (read-only for them)."""
    name = f"sbx_m_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            psycopg.sql.Identifier(name), psycopg.sql.Identifier(pg_template)))
    root = tmp_path_factory.mktemp("shared")
    params = psycopg.conninfo.conninfo_to_dict(pg_server)
    params["dbname"] = name
    env = bare_env(SCALEBOX_DSN=psycopg.conninfo.make_conninfo(**params), SCALEBOX_HOME=str(root / "home"),
                   SCALEBOX_WORK_ROOT=str(root / "work"))
    try:
        create(env, make_app(root, "shared", {"work": "true\n"}))
        yield env
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)))


def _non_utf8_file(tmp_path: Path) -> str:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine\ncaf\xe9\n")  # Latin-1, not UTF-8
    return str(path)


@pytest.mark.parametrize(("args", "fragment"), [
    pytest.param(("task", "add", "-H", "to_slot=abc", "x1"), "to_slot",
        id="to_slot-not-an-integer"),
    pytest.param(("task", "add", "--file", "{non_utf8_file}"), "UTF-8",
        id="file-not-utf8"),
    pytest.param(("task", "list", "-n", "-1"), "limit",
        id="negative-limit"),
    pytest.param(("task", "list", "--status", "99999999999"), "range", id="status-out-of-range"),
    pytest.param(("task", "list", "-n", "99999999999999999999"), "range", id="limit-out-of-range"),
    pytest.param(("task", "retry", "--status", "99999999999"), "range", id="retry-status-out-of-range"),
    pytest.param(("task", "show", "99999999999999999999"), "range", id="task-id-out-of-range"),
    pytest.param(("semaphore", "create", "s", "99999999999"), "range", id="semaphore-out-of-range"),
    pytest.param(("task", "list", "--app", "999999"), "not found", id="unknown-app"),
    pytest.param(("task", "add", "-H", "to_slot=99999999999", "x1"), "to_slot", id="to_slot-out-of-range"),
])
def test_bad_input_gives_an_error_line_not_a_traceback(shared_env: dict[str, str], tmp_path: Path,
                                                       args: tuple[str, ...], fragment: str) -> None:
    args = tuple(a.replace("{non_utf8_file}", _non_utf8_file(tmp_path)) if "{" in a else a for a in args)
    proc = sbx(shared_env, *args, check=False)
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(("scalebox: error: ", "Error: ")) and fragment.lower() in last.lower(), last
    assert {r["body"] for r in sbx_json(shared_env, "task", "list")} == set()  # nothing was added
