"""A user always knows what is happening and why (issue 14): `scalebox` as a subprocess, as a
user runs it, on a real PostgreSQL: a run that cannot go on ends with the reason, failures are
summarised with their stderr, slots are visible, app states are honest, user mistakes are one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import write_app

pytestmark = pytest.mark.pg

SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]
RUN_BOUND = 60.0
"""A `scalebox run` that cannot go on must end well within this (seconds)."""


def sbx(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"scalebox {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def timed_run(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`scalebox run ARGS` under `timeout` (a hang is killed, and then fails the test)."""
    start = time.monotonic()
    proc = subprocess.run(["timeout", "-s", "KILL", str(RUN_BOUND), *SCALEBOX, "run", *args], env=env,
                          capture_output=True, text=True, timeout=RUN_BOUND + 30)
    return proc, time.monotonic() - start


QUICK = "{max_idle_polls: 3, sleep_interval_seconds: 0.2}"


def broken_pipeline(root: Path, how: str) -> Path:
    """``prep`` (works) feeds 14 tasks to ``hasher``, whose 3 slots cannot start: a missing
    image (``image``) or a setup.sh that exits 1 (``setup``)."""
    hasher = ("base_image: no-such-image\n            arguments: {runtime: podman, max_idle_polls: 3, "
              "sleep_interval_seconds: 0.2}" if how == "image" else f"arguments: {QUICK}")
    scripts = {"prep/run.sh": 'send-message "$1"\n', "hasher/run.sh": 'echo "$1"\n'}
    if how == "setup":
        scripts["hasher/setup.sh"] = 'echo "setup: the reference data is missing" >&2\nexit 1\n'
    app = write_app(root, f"""
        name: broken
        parameters:
          start_task: "FILE:list.txt"
        modules:
          prep:
            sink_modules: [hasher]
            arguments: {QUICK}
          hasher:
            slots: [".*:3"]
            {hasher}
    """, scripts)
    (root / "list.txt").write_text("".join(f"item-{i}\n" for i in range(14)))
    return app


@pytest.mark.parametrize("how", ["image", "setup"])
def test_run_ends_with_the_reason_when_no_slot_can_take_the_ready_tasks(
        cli_env: dict[str, str], tmp_path: Path, how: str) -> None:
    proc, took = timed_run(cli_env, str(broken_pipeline(tmp_path / how, how)))
    assert proc.returncode not in (0, -9, 137), (proc.returncode, proc.stderr)  # failed, not killed by timeout
    assert took < RUN_BOUND, took
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("scalebox: hasher: all 3 slot(s) failed: "), proc.stderr
    assert "14 task(s) left READY" in last and "scalebox run --app 1" in last, last
    if how == "image":
        assert "no-such-image" in last
    else:
        assert "setup.sh" in last
    # the launcher's log is shown, as `scalebox launcher` shows it
    assert how == "setup" or ("ERROR" in proc.stderr and "slot hasher/" in proc.stderr), proc.stderr

    # the slots say the same; `run --app` continues the app (and ends the same way)
    slots = json.loads(sbx(cli_env, "slot", "list", "--json").stdout)
    errors = [s for s in slots if s["module"] == "hasher"]
    assert len(errors) == 3 and {s["state"] for s in errors} == {"ERROR"}, errors
    assert all(s["message"] for s in errors)
    table = sbx(cli_env, "slot", "list").stdout
    assert table.splitlines()[0].split()[:4] == ["host", "module", "slot", "state"]
    assert sum("ERROR" in line and "hasher" in line for line in table.splitlines()) == 3, table
    status = sbx(cli_env, "status").stdout
    assert "WAITING" in status and "hasher: all 3 slot(s) failed" in status, status
    again, took = timed_run(cli_env, "--app", "1")
    assert again.returncode == 1 and took < RUN_BOUND
    assert "continued here" in again.stderr and "14 task(s) left READY" in again.stderr.strip().splitlines()[-1]


def test_slot_list_shows_an_error_slot_with_its_message(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "s", f"""
        name: setup-fails
        parameters: {{start_task: go}}
        modules:
          work:
            arguments: {QUICK}
    """, {"work/run.sh": "true\n",
          "work/setup.sh": 'echo "loading the model" >&2\nprintf "model.bin: \\033[31mno such file\\n" >&2\nexit 3\n'})
    proc, took = timed_run(cli_env, str(app))
    assert proc.returncode == 1 and took < RUN_BOUND
    said = "setup.sh exited 3: loading the model / model.bin: ?[31mno such file"  # terminal-safe
    assert said in proc.stderr.strip().splitlines()[-1], proc.stderr  # `scalebox run`'s error line
    out = sbx(cli_env, "slot", "list", "--app", "1").stdout.splitlines()
    [row] = [line for line in out[1:] if line.split()[1] == "work"]
    assert row.split()[3] == "ERROR" and row.endswith(said), out
    assert f"work: all 1 slot(s) failed: {said}" in sbx(cli_env, "status").stdout
    [shown] = json.loads(sbx(cli_env, "slot", "list", "--json").stdout)
    assert (shown["state"], shown["module"], shown["seq"], shown["live"]) == ("ERROR", "work", 0, False)


def failing_pipeline(root: Path) -> Path:
    """8 tasks; those divisible by 3 fail with exit 2 and a stderr line naming their input."""
    app = write_app(root, f"""
        name: some-fail
        parameters:
          start_task: "FILE:list.txt"
        modules:
          calc:
            arguments: {QUICK}
    """, {"calc/run.sh": 'if [ $(($1 % 3)) = 0 ]; then echo "working on $1"; '
                         'echo "calc: cannot open input-$1.dat" >&2; exit 2; fi\n'})
    (root / "list.txt").write_text("".join(f"{i}\n" for i in range(1, 9)))
    return app


def test_failure_summary_names_the_tasks_and_their_stderr(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc, _ = timed_run(cli_env, str(failing_pipeline(tmp_path / "f")))
    assert proc.returncode == 1
    ids = {r["body"]: r["id"] for r in json.loads(sbx(cli_env, "task", "list", "--json").stdout)}
    for body in ("3", "6"):
        assert f"{ids[body]} calc EXIT_2 {body} → calc: cannot open input-{body}.dat" in proc.stderr, proc.stderr
    assert f"scalebox task show {ids['3']}" in proc.stderr and "scalebox task list --failed" in proc.stderr

    for args in (("app", "show"), ("status",)):
        out = sbx(cli_env, *args).stdout
        assert f"{ids['6']} calc EXIT_2 6 → calc: cannot open input-6.dat" in out, (args, out)
        assert "IDLE" in out and "6 ok, 2 failed" in out, (args, out)
    status = json.loads(sbx(cli_env, "status", "--json").stdout)
    assert status["app"]["state"] == "IDLE" and status["app"]["status"] == "RUNNING"
    assert [(f["body"], f["last_line"]) for f in status["failures"]] == [
        ("3", "calc: cannot open input-3.dat"), ("6", "calc: cannot open input-6.dat")]

    # --watch stops by itself on an IDLE app
    watch = sbx(cli_env, "status", "--watch", timeout=20)
    assert "IDLE" in watch.stdout

    # failed tasks and status names
    failed = [r["body"] for r in json.loads(sbx(cli_env, "task", "list", "--failed", "--json").stdout)]
    assert failed == ["3", "6"]
    assert [r["body"] for r in json.loads(sbx(cli_env, "task", "list", "-s", "failed", "--json").stdout)] == failed
    assert len(json.loads(sbx(cli_env, "task", "list", "-s", "ok", "--json").stdout)) == 6
    assert json.loads(sbx(cli_env, "task", "list", "-s", "READY", "--json").stdout) == []
    assert len(json.loads(sbx(cli_env, "task", "list", "-s", "2", "--json").stdout)) == 2
    listed = sbx(cli_env, "task", "list", "-n", "3")
    assert listed.stdout.splitlines()[0].split() == ["id", "module", "status", "tries", "body"]
    assert len(listed.stdout.splitlines()) == 4 and "the first 3 shown" in listed.stderr
    bad = sbx(cli_env, "task", "list", "-s", "faild", check=False)
    assert bad.returncode == 2 and "did you mean 'failed'" in bad.stderr


def test_an_app_that_ended_idle_without_a_result_is_said(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "i", f"""
        name: quiet
        parameters: {{start_task: go}}
        modules:
          work:
            arguments: {QUICK}
    """, {"work/run.sh": "true\n"})
    proc, _ = timed_run(cli_env, str(app))
    assert proc.returncode == 0, proc.stderr
    assert "ended idle without a result" in proc.stderr.strip().splitlines()[-1]
    assert "IDLE" in sbx(cli_env, "app", "show").stdout


def test_empty_database_says_no_apps_yet(cli_env: dict[str, str]) -> None:
    listed = sbx(cli_env, "app", "list")
    assert "no apps yet" in listed.stderr and "scalebox run app.yaml" in listed.stderr
    for args in (("status",), ("task", "list"), ("slot", "list"), ("app", "show")):
        proc = sbx(cli_env, *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (args, proc.stderr)
        assert "no apps yet" in lines[0] and "not found" not in lines[0], (args, lines)


@pytest.mark.parametrize("dsn", ["not a dsn ===", "postgresql://alice:s3cr%zzet@db/x"])
def test_malformed_dsn_is_one_line_with_a_hint(cli_env: dict[str, str], dsn: str) -> None:
    for args in (("app", "list"), ("status",), ("db", "status"), ("task", "add", "x")):
        proc = sbx(dict(cli_env, SCALEBOX_DSN=dsn), *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (args, proc.stderr)
        assert "SCALEBOX_DSN is not a PostgreSQL connection string" in lines[0] and "hint:" in lines[0], lines
        assert "Traceback" not in proc.stderr and "s3cr" not in proc.stderr


def test_unknown_module_is_an_error_with_a_did_you_mean(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "m", """
        name: mods
        modules:
          hasher: {}
          gather: {}
    """, {"hasher/run.sh": "true\n", "gather/run.sh": "true\n"})
    sbx(cli_env, "app", "create", str(app))
    for args in (("task", "list", "-m", "hashr"), ("task", "add", "-m", "hashr", "x"),
                 ("task", "retry", "--failed", "-m", "hashr")):
        proc = sbx(cli_env, *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (args, proc.stderr)
        assert "module 'hashr' not found" in lines[0] and "did you mean 'hasher'?" in lines[0], lines
        assert "hasher, gather" in lines[0]
    assert json.loads(sbx(cli_env, "task", "list", "--json").stdout) == []


def test_run_off_a_terminal_prints_progress_lines(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "p", f"""
        name: slowish
        parameters: {{start_task: go}}
        modules:
          work:
            arguments: {QUICK}
    """, {"work/run.sh": "sleep 8\n"})
    proc, _ = timed_run(cli_env, str(app))
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert any(re.fullmatch(r"\[ *\d+s\] work 0/1 \(1 running\)", line) for line in progress), proc.stderr
    assert "\x1b[" not in proc.stderr  # no bars, no cursor moves in a log


def test_ctrl_c_drains_says_so_and_says_how_to_continue(cli_env: dict[str, str], tmp_path: Path) -> None:
    app = write_app(tmp_path / "c", f"""
        name: interrupted
        parameters: {{start_task: "FILE:list.txt"}}
        modules:
          work:
            slots: [".*:2"]
            arguments: {QUICK}
    """, {"work/run.sh": "sleep 6\n"})  # long enough to be seen running by two slow CLI calls
    (app.parent / "list.txt").write_text("".join(f"t{i}\n" for i in range(6)))
    proc = subprocess.Popen([*SCALEBOX, "run", "--grace", "20", str(app)], env=cli_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = sbx(cli_env, "task", "list", "-s", "running", "--json", check=False)
            if listed.returncode == 0 and json.loads(listed.stdout):
                break
            time.sleep(0.2)
        shown = sbx(cli_env, "task", "show", str(json.loads(listed.stdout)[0]["id"])).stdout
        assert re.search(r"^running on \S+ slot [01] for \ds$", shown, re.M), shown
        proc.send_signal(2)  # Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "scalebox: stopping: no new tasks; " in err and "get up to 20 s to finish" in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("scalebox: stopped; ") and "continue with `scalebox run --app 1`" in last, err
    rows = json.loads(sbx(cli_env, "task", "list", "--json").stdout)
    assert {r["status"] for r in rows} <= {0, -1} and any(r["status"] == -1 for r in rows), rows  # drained, not lost
    retried = sbx(cli_env, "task", "retry", "--status", "ok")
    assert retried.stdout.strip() == f"requeued {sum(r['status'] == 0 for r in rows)} task(s)"
